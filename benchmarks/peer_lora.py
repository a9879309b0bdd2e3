"""Peer side of the LoRA benchmark (issue #24): TRL's RewardTrainer at Qwen2.5-0.5B's shape, full fine-tuning or
LoRA through peft, one mode per process so that the peak resident memory is that mode's alone. Runs in the peer
interpreter (.venv-peer: torch + transformers + trl + peft, `make peer-venv`), never in .venv; a driver in .venv
calls it as a subprocess, as bench_peer.py calls peer_trl.py.

The model is Qwen2ForSequenceClassification with random float32 weights (vocab 151936, hidden 896, intermediate
4864, 24 layers, 14 heads, 2 kv heads, tied embeddings, RoPE theta 1e6); each step trains on --pairs pairs of
random token ids, every sequence --length tokens (default --seq: no padding at all). LoRA: r 16, alpha 32,
dropout 0 on all seven projections, the score head trained in full (modules_to_save=["score"]).
The optimizer is TRL's default (transformers' AdamW, fused on torch >= 2.8), its states float32 as the weights.
No gradient checkpointing (TRL's default is on; --gradient_checkpointing turns it on), no mixed precision.

Memory: without checkpointing the activations dominate. Measured in LoRA mode (peak minus RSS before training,
1 and 2 layers at 8 pairs x seq 512): ~1.2 GiB per layer plus ~0.5 GiB, so all 24 layers need ~30 GiB besides
the weights, more than a 24 GiB machine; full fine-tuning adds 12 bytes per parameter (grads, AdamW states).
--grad_accum N keeps 8 pairs per optimizer step but runs them as N micro-batches of pairs/N (TRL's
gradient_accumulation_steps), dividing the activations by N (LoRA --grad_accum 4: ~9.5 GiB estimated);
--gradient_checkpointing is the other way out.

Prints one JSON object (and writes it to --output): the mode, trainable and total parameters, resident memory
(after building the model, before training, and the process's peak, ru_maxrss), s/step over the timed steps after
one warm-up step, the optimizer's measured state bytes per trainable parameter, torch's threads and the CPU.
Check it cheaply first: --layers 2 --seq 128 --steps 2 (the full shape trains ~0.5 B parameters on CPU).
"""
import argparse
import json
import os
import platform
import resource
import sys
import time

PAD_ID = 0  # the stub tokenizer's pad; the random ids are drawn from 1 up, so the last token is always the reward's
VECTOR_FLAGS = ("sse", "ssse3", "avx", "fma", "f16c", "amx", "vnni", "bf16", "fp16")


def rss_mib():
    """This process's resident set now (VmRSS), in MiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib():
    """The process's peak resident set so far (ru_maxrss is in KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_info():
    """The CPU's model name and its vector extensions, from /proc/cpuinfo."""
    name, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = value.split()
                if name != "unknown" and flags:
                    break
    except OSError:
        pass
    return {"model_name": name, "cores": os.cpu_count(),
            "vector_extensions": sorted(f for f in flags if f.startswith(VECTOR_FLAGS))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", required=True, choices=["full", "lora"])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--seq", type=int, default=512, help="max_length of the trainer")
    parser.add_argument("--length", type=int, default=None, help="tokens in every chosen/rejected row (default --seq)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--grad_accum", type=int, default=1,
                        help="run each step as this many micro-batches of pairs/grad_accum pairs")
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--intermediate", type=int, default=4864)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="TRL's RewardConfig default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--work_dir", default=None, help="the trainer's output_dir (nothing is saved there)")
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    args = parser.parse_args()
    length = args.length or args.seq
    if not 1 <= length <= args.seq:
        parser.error(f"--length {length} must be within 1..--seq {args.seq}")
    if args.grad_accum < 1 or args.pairs % args.grad_accum:
        parser.error(f"--grad_accum {args.grad_accum} must divide --pairs {args.pairs}")
    if args.steps < 1:
        parser.error("--steps must be at least 1 (s/step is timed after the warm-up step)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()
    rss_start = rss_mib()

    import tempfile

    import torch
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification
    import trl
    from trl import RewardConfig, RewardTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rss_imports = rss_mib()  # the framework alone, before the model: what bench_lora.py subtracts on both sides
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(32768, args.seq),
                         max_window_layers=args.layers, use_sliding_window=False, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         tie_word_embeddings=True, num_labels=1, pad_token_id=PAD_ID, bos_token_id=1,
                         eos_token_id=2, attention_dropout=0.0, use_cache=False)
    model = Qwen2ForSequenceClassification(config).to(torch.float32)
    rss_model = rss_mib()
    total_base = sum(p.numel() for p in model.parameters())

    peft_config = None
    if args.mode == "lora":
        import peft
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="SEQ_CLS", r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], modules_to_save=["score"])

    # Pre-tokenized rows: the processing class is only asked for its pad token (as in peer_trl.py)
    stub = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    processing = PreTrainedTokenizerFast(tokenizer_object=stub, pad_token="<unk>", eos_token="</s>")
    gen = torch.Generator().manual_seed(args.seed)
    n_pairs = args.pairs * (1 + args.steps)
    ids = torch.randint(PAD_ID + 1, args.vocab, (n_pairs, 2, length), generator=gen).tolist()
    train = Dataset.from_dict({"chosen_ids": [p[0] for p in ids], "rejected_ids": [p[1] for p in ids]})
    work = args.work_dir or tempfile.mkdtemp(prefix=f"peer_lora_{args.mode}_")
    rconfig = RewardConfig(
        output_dir=os.path.join(work, "trl_out"), per_device_train_batch_size=args.pairs // args.grad_accum,
        gradient_accumulation_steps=args.grad_accum, max_steps=1 + args.steps, learning_rate=args.learning_rate,
        max_length=args.seq, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
        dataloader_drop_last=True, dataloader_num_workers=0, use_cpu=True, bf16=False, fp16=False,
        disable_tqdm=True, gradient_checkpointing=args.gradient_checkpointing)

    from peer_trl import step_clock

    clock = step_clock()
    trainer = RewardTrainer(model=model, args=rconfig, train_dataset=train, processing_class=processing,
                            peft_config=peft_config, callbacks=[clock])
    trained = trainer.model
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trained.parameters())
    rss_before_train = rss_mib()
    peak_before_train = peak_rss_mib()

    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    steps = len(clock.ends)
    if steps != 1 + args.steps:
        sys.exit(f"peer_lora: trained {steps} steps, not {1 + args.steps}")
    gaps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    s_per_step = (clock.ends[-1] - clock.ends[0]) / (steps - 1)

    # the optimizer's own state tensors (exp_avg, exp_avg_sq, step), measured, not assumed
    optimizer = trainer.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    optim_name = getattr(rconfig.optim, "value", rconfig.optim)
    state_bytes = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                      if torch.is_tensor(t))
    state_dtypes = sorted({str(t.dtype) for st in optimizer.state.values() for k, t in st.items()
                           if torch.is_tensor(t) and k != "step"})
    weight_bytes = next(p for p in trained.parameters() if p.requires_grad).element_size()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    load_after = os.getloadavg()
    result = {
        "mode": args.mode,
        "framework": f"trl {trl.__version__} / transformers {transformers.__version__} / torch {torch.__version__}"
                     + (f" / peft {peft.__version__}" if args.mode == "lora" else ""),
        "model": {"architecture": "Qwen2ForSequenceClassification", "vocab_size": args.vocab,
                  "hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_layers": args.layers,
                  "num_heads": args.heads, "num_kv_heads": args.kv_heads, "tie_word_embeddings": True,
                  "rope_theta": 1e6, "dtype": "float32", "base_params": total_base},
        "lora": ({"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0,
                  "target_modules": sorted(peft_config.target_modules),
                  "modules_to_save": ["score"]} if peft_config else None),
        "seq_length": args.seq, "row_length": length, "pairs_per_step": args.pairs,
        "pairs_per_micro_batch": args.pairs // args.grad_accum,
        "tokens_per_step": 2 * args.pairs * length,
        "trainable_params": trainable, "total_params": total,
        "trainable_fraction": round(trainable / total, 6),
        "optimizer": f"{optim_name} ({type(inner).__name__}), lr {args.learning_rate}",
        "optimizer_state_dtypes": state_dtypes,
        "gradient_checkpointing": args.gradient_checkpointing,
        "memory_mib": {"rss_at_start": round(rss_start, 1), "rss_after_imports": round(rss_imports, 1),
                       "rss_after_model": round(rss_model, 1),
                       "rss_before_train": round(rss_before_train, 1),
                       "peak_before_train": round(peak_before_train, 1), "peak": round(peak, 1),
                       "peak_minus_rss_before_train": round(peak - rss_before_train, 1)},
        "bytes_per_trainable_param": {
            "weight": weight_bytes, "grad": weight_bytes,
            "optimizer_states_measured": round(state_bytes / trainable, 3),
            "total_estimate": round(2 * weight_bytes + state_bytes / trainable, 3),
            "note": "weight + grad + AdamW states; activations, the frozen weights and the allocator come on top "
                    "(peak_minus_rss_before_train_per_trainable_param includes them)"},
        "peak_minus_rss_before_train_per_trainable_param":
            round((peak - rss_before_train) * 2 ** 20 / trainable, 2),
        "warmup_steps": 1, "timed_steps": steps - 1,
        "s_per_step": round(s_per_step, 4), "step_seconds": [round(g, 4) for g in gaps],
        "first_step_seconds": round(clock.ends[0] - start, 4), "train_seconds": round(train_seconds, 2),
        "losses": [round(v, 5) for v in losses],
        "torch_threads": torch.get_num_threads(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_info(), "load_average_before": load_before, "load_average_after": load_after,
    }
    if max(load_before[0], load_after[0]) > (os.cpu_count() or 1):
        result["warning"] = (f"load average above the {os.cpu_count()} cores during the run: torch's OpenMP "
                             "threads may have been starved; rerun on a quiet machine")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
