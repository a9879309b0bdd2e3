"""Peer side of bench_peer.py: TRL's RewardTrainer on the same token ids. Runs in the peer interpreter
(.venv-peer: torch + transformers + trl), never in .venv (MindFormers pins an older transformers).

Input: a JSON file written by bench_peer.py with the model shape, the optimizer/schedule settings and the
pre-tokenized train/test pairs (chosen_ids, rejected_ids: real tokens only, no padding). Output: a JSON file
with wall time, steady s/step, pairwise test accuracy, and the tokens TRL's own collator gave the model: computed
(the batches' ids, padding included) and real (their attention mask), counted as it trains.
"""
import argparse
import json
import os
import time

PEER_PAD_ID = 0


def step_clock():
    """A TrainerCallback recording when each optimizer step ends (`.ends`): steady s/step without the first."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, _args, state, control, **_kwargs):
            self.ends.append(time.perf_counter())

    return StepClock()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--work_dir", required=True)
    args = parser.parse_args()
    spec = json.load(open(args.spec, encoding="utf-8"))
    threads = int(spec["threads"])
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    from trl import RewardConfig, RewardTrainer

    from torch_batches import padded

    torch.set_num_threads(threads)
    torch.manual_seed(spec["seed"])
    shape = spec["model"]
    config = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                         num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_heads"],
                         max_position_embeddings=shape["seq_length"], rms_norm_eps=shape["rms_norm_eps"],
                         rope_theta=shape["rope_theta"], pad_token_id=shape["pad_token_id"], bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False, num_labels=1, attention_dropout=0.0,
                         torch_dtype="float32")

    # The ids are already tokenized (by mindrlhf's SentencePiece wrapper, as ours): the processing class is only
    # asked for its pad token. Pad with 0 (<unk>, never a real token here) rather than our 2 (= eos): HF's
    # sequence classifier reads the reward at the last non-pad token, which then is each row's own last real
    # token exactly as ours (end_ind - 1), even where a row ends with eos.
    pad_id = PEER_PAD_ID
    config.pad_token_id = pad_id
    stub = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    processing = PreTrainedTokenizerFast(tokenizer_object=stub, pad_token="<unk>", eos_token="</s>")

    model = LlamaForSequenceClassification(config)
    train = Dataset.from_dict({"chosen_ids": [p[0] for p in spec["train"]],
                               "rejected_ids": [p[1] for p in spec["train"]]})
    opt = spec["optim"]
    rconfig = RewardConfig(
        output_dir=os.path.join(args.work_dir, "trl_out"), per_device_train_batch_size=spec["batch_size"],
        num_train_epochs=1, learning_rate=opt["learning_rate"], lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": opt["lr_end"]}, warmup_steps=opt["warmup_steps"], adam_beta1=opt["beta1"],
        adam_beta2=opt["beta2"], adam_epsilon=opt["eps"], weight_decay=opt["weight_decay"],
        max_grad_norm=opt["max_grad_norm"], max_length=shape["seq_length"], logging_steps=1, save_strategy="no",
        report_to=[], seed=spec["seed"], dataloader_drop_last=True, use_cpu=True, bf16=False, fp16=False,
        disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=False)  # TRL defaults to True; ours recomputes nothing (YAML recompute: False)

    clock = step_clock()
    trainer = RewardTrainer(model=model, args=rconfig, train_dataset=train, processing_class=processing,
                            callbacks=[clock])
    tokens = {"computed": 0, "real": 0}
    collate = trainer.data_collator

    def counting(examples):
        """TRL's collator, counting what it hands the model (its train dataloader is built in train())."""
        batch = collate(examples)
        tokens["computed"] += int(batch["input_ids"].numel())
        tokens["real"] += int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    steps = len(clock.ends)
    steady = (clock.ends[-1] - clock.ends[0]) / (steps - 1) if steps > 1 else train_seconds

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(spec["test"]), 16):
            batch = spec["test"][i:i + 16]
            ids, mask = padded([p[0] for p in batch] + [p[1] for p in batch], pad_id)
            rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
            n = len(batch)
            correct += int((rewards[:n] > rewards[n:]).sum())
    result = {"framework": f"trl {__import__('trl').__version__} / transformers "
                           f"{__import__('transformers').__version__} / torch {torch.__version__}",
              "threads": torch.get_num_threads(), "gradient_checkpointing": False, "steps": steps,
              "train_seconds": round(train_seconds, 2),
              "steady_s_per_step": round(steady, 4), "test_pairs": len(spec["test"]),
              "accuracy": round(correct / len(spec["test"]), 4), "computed_tokens": tokens["computed"],
              "real_tokens": tokens["real"], "padding_share": round(1 - tokens["real"] / tokens["computed"], 4)}
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
