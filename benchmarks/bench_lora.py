"""Full fine-tuning vs LoRA at a real model shape, ours and TRL + PEFT's, side by side in one run.

The shape is Qwen2.5-0.5B's (vocab 151,936, hidden 896, 24 layers, 14 query / 2 key-value heads, FFN 4,864,
q/k/v biases, tied embeddings), random weights, float32, 8 pairs a step at seq 512 (random token ids, every
sequence 512 tokens long), LoRA rank 16 / alpha 32 on all seven projections with the value head (score) trained.
Each mode runs in its own process, so each peak resident memory (ru_maxrss) is its own:

    ours-full, ours-lora   reward_train.py's code path (mindrlhf.training.trainer.train, the MindFormers Trainer)
    trl-full,  trl-lora    TRL's RewardTrainer (+ PEFT), benchmarks/peer_lora.py in the peer venv

Reported per mode: trainable and total parameters, peak RSS, the RSS before the model is built (the framework
alone), s/step after one warm-up step, and bytes per parameter: (peak - framework) / total parameters, against the
theoretical 16 for full fine-tuning in float32 (weight, gradient, two Adam moments) and 4 + 16 x trainable share
for LoRA. Activations come on top of both. Writes benchmarks/results/lora.json; names the CPU.

    .venv/bin/python benchmarks/bench_lora.py                     # all four modes (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/bench_lora.py --modes ours-lora --layers 2 --steps 2   # a quick check
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile

import numpy as np
import yaml

from common import ROOT, cpu_line, cpu_name, save

QWEN_CONFIG = ROOT / "model_configs" / "qwen2_5_config" / "run_qwen2_5_tiny_rm_cpu.yaml"
SHAPE = {"vocab_size": 151936, "hidden_size": 896, "num_layers": 24, "num_heads": 14, "n_kv_heads": 2,
         "intermediate_size": 4864, "qkv_has_bias": True, "tie_word_embeddings": True, "theta": 1000000.0,
         "rms_norm_eps": 1.0e-6}
LORA = {"pet_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3"}
MODES = ("ours-full", "ours-lora", "trl-full", "trl-lora")
STEP_MS = re.compile(r"step:\[\s*(\d+)/\s*\d+\].*?per_step_time: (\d+)ms")


def rss_mb() -> float:
    """Current resident memory of this process, MB."""
    with open("/proc/self/status", encoding="utf-8") as fh:
        return int(re.search(r"VmRSS:\s+(\d+) kB", fh.read()).group(1)) / 1024


def write_pairs(path: str, pairs: int, seq: int, vocab: int, seed: int = 0):
    """pairs rows of the tutorial's 7 columns: random ids, every sequence seq tokens, differing from token 8."""
    from mindrlhf.data.convert import AtomicMindRecordWriter, build_samples

    rng = np.random.default_rng(seed)
    chosen = rng.integers(8, vocab, size=(pairs, seq))
    rejected = chosen.copy()
    rejected[:, 8:] = rng.integers(8, vocab, size=(pairs, seq - 8))
    samples, _ = build_samples(chosen.tolist(), rejected.tolist(), seq, 0)
    rows = [dict({k: samples[k][i] for k in samples}, position_id=np.arange(seq, dtype=np.int32))
            for i in range(pairs)]
    with AtomicMindRecordWriter(path) as writer:
        writer.write(rows)
        writer.commit()


def ours(mode: str, args, work: str) -> dict:
    """One of our modes, in this process (the driver starts one process per mode)."""
    import mindrlhf._mindformers  # noqa: F401
    import mindspore  # noqa: F401
    import mindformers  # noqa: F401

    framework = rss_mb()
    from mindrlhf.training.trainer import train

    raw = yaml.safe_load(open(QWEN_CONFIG, encoding="utf-8"))
    model = raw["model"]["model_config"]
    model.update(SHAPE, seq_length=args.seq, num_layers=args.layers, loss_type="last_token", batch_size=args.pairs)
    if mode == "ours-lora":
        model["pet_config"] = dict(LORA)
    raw["runner_config"]["batch_size"] = raw["train_dataset"]["batch_size"] = args.pairs
    raw["train_dataset"]["bucket_boundaries"] = []
    raw["recompute_config"]["recompute"] = bool(args.recompute)  # full recompute of every layer's activations
    for item in args.ms_context or []:
        key, _, value = item.partition("=")
        raw["context"][key] = yaml.safe_load(value)
    raw["lr_schedule"]["warmup_steps"] = 1
    # No checkpoint: saving one serialises every tensor once more, a peak of its own that is not training's
    raw["callbacks"] = [c for c in raw["callbacks"] if c.get("type") != "CheckpointMonitor"]
    config = os.path.join(work, f"{mode}.yaml")
    with open(config, "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    data = os.path.join(work, "pairs.mindrecord")
    if not os.path.exists(data):
        write_pairs(data, args.pairs * (args.steps + 1), args.seq, SHAPE["vocab_size"])
    out = os.path.join(work, mode)
    train(config, data, output_dir=out, stop_step=args.steps + 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log = open(os.path.join(out, "log", "rank_0", "info.log"), encoding="utf-8").read()
    times = [int(ms) / 1000 for _, ms in STEP_MS.findall(log)]
    counts = re.search(r"([\d,]+) parameters train .*?, ([\d,]+) frozen", log)
    if counts:
        trainable, frozen = (int(g.replace(",", "")) for g in counts.groups())
    else:
        trainable, frozen = count_params(SHAPE, args), 0
    return {"mode": mode, "framework": "mindrlhf / MindSpore graph mode", "trainable_params": trainable,
            "total_params": trainable + frozen, "framework_rss_mb": round(framework, 1), "peak_rss_mb": round(peak, 1),
            "s_per_step": round(float(np.mean(times[1:])), 2) if len(times) > 1 else None,
            "first_step_s": times[0] if times else None, "steps_timed": max(len(times) - 1, 0)}


def count_params(shape: dict, args) -> int:
    """Parameters of the reward model at this shape (embedding, layers, final norm, value head)."""
    h, f, heads, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_heads"], shape["n_kv_heads"]
    kv_dim = h // heads * kv
    layer = h * h * 2 + h * kv_dim * 2 + (h + 2 * kv_dim) + 3 * h * f + 2 * h
    return shape["vocab_size"] * h + args.layers * layer + h + h


def peer(mode: str, args, work: str) -> dict:
    output = os.path.join(work, f"{mode}.json")
    cmd = [args.peer_python, str(ROOT / "benchmarks" / "peer_lora.py"), "--mode", mode.split("-")[1], "--work_dir", work,
           "--layers", str(args.layers), "--seq", str(args.seq), "--pairs", str(args.pairs), "--steps",
           str(args.steps), "--threads", str(args.threads), "--output", output]
    if args.recompute:
        cmd.append("--gradient_checkpointing")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    if proc.returncode != 0:
        return {"mode": mode, "error": proc.stderr[-2000:]}
    peer_result = json.load(open(output, encoding="utf-8"))
    memory = peer_result["memory_mib"]
    return {"mode": mode, "framework": peer_result["framework"], "trainable_params": peer_result["trainable_params"],
            "total_params": peer_result["total_params"], "framework_rss_mb": memory["rss_after_imports"],
            "peak_rss_mb": memory["peak"], "s_per_step": peer_result["s_per_step"],
            "first_step_s": peer_result["first_step_seconds"], "steps_timed": peer_result["timed_steps"],
            "peer": peer_result}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--layers", type=int, default=SHAPE["num_layers"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps, after one warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recompute", type=int, default=0,
                        help="1: recompute each layer's activations in the backward pass (MindFormers' recompute; "
                             "TRL's gradient_checkpointing). Off by default: on CPU MindSpore's recompute raised the "
                             "peak (LoRA, 2 layers, seq 512, 8 pairs: 4.39 -> 16.5 GB; docs/lora.md)")
    parser.add_argument("--ms_context", action="append", default=None, metavar="KEY=VALUE",
                        help="a MindSpore context setting for our modes (the YAML's context section), repeatable")
    parser.add_argument("--peer_python", default=str(ROOT / ".venv-peer" / "bin" / "python"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(ours(args.worker, args, args.work)), flush=True)
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {list(MODES)}")
    work = tempfile.mkdtemp(prefix="bench_lora_")
    result = {"cpu": cpu_name(), "shape": dict(SHAPE, num_layers=args.layers), "seq_length": args.seq,
              "recompute": bool(args.recompute),
              "pairs_per_step": args.pairs, "lora": LORA, "threads": args.threads, "runs": {}}
    print(cpu_line(result["cpu"]), flush=True)
    for mode in modes:
        print(f"== {mode}", flush=True)
        if mode.startswith("ours"):
            cmd = [sys.executable, __file__, "--worker", mode, "--work", work, "--layers", str(args.layers), "--seq",
                   str(args.seq), "--pairs", str(args.pairs), "--steps", str(args.steps), "--recompute",
                   str(args.recompute)] + [f"--ms_context={item}" for item in args.ms_context or []]
            env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            run = json.loads(line[-1][7:]) if proc.returncode == 0 and line else {"mode": mode,
                                                                                   "error": proc.stderr[-2000:]}
        elif not os.access(args.peer_python, os.X_OK):
            run = {"mode": mode, "skipped": f"no peer interpreter at {args.peer_python} (make peer-venv)"}
        else:
            run = peer(mode, args, work)
        if "peak_rss_mb" in run:
            run["bytes_per_param"] = round((run["peak_rss_mb"] - run["framework_rss_mb"]) * 2 ** 20
                                           / run["total_params"], 2)
            share = run["trainable_params"] / run["total_params"]
            run["theoretical_bytes_per_param"] = round(4 + 12 * share if share < 1 else 16.0, 2)
        result["runs"][mode] = run
        print(json.dumps(run), flush=True)
        save("lora", result)
    runs = result["runs"]
    for side in ("ours", "trl"):
        full, lora = runs.get(f"{side}-full", {}), runs.get(f"{side}-lora", {})
        if "peak_rss_mb" in full and "peak_rss_mb" in lora:
            result[f"{side}_lora_over_full_peak"] = round(lora["peak_rss_mb"] / full["peak_rss_mb"], 3)
    if "peak_rss_mb" in runs.get("ours-lora", {}) and "peak_rss_mb" in runs.get("trl-lora", {}):
        result["ours_over_trl_lora_peak"] = round(runs["ours-lora"]["peak_rss_mb"] / runs["trl-lora"]["peak_rss_mb"], 3)
    save("lora", result)
    print("\n" + cpu_line(result["cpu"]))
    print(f"{'mode':10s} {'trainable':>12s} {'total':>12s} {'peak RSS MB':>12s} {'framework MB':>12s} "
          f"{'B/param':>8s} {'theory':>7s} {'s/step':>8s}")
    for mode, r in runs.items():
        if "peak_rss_mb" in r:
            print(f"{mode:10s} {r['trainable_params']:12,d} {r['total_params']:12,d} {r['peak_rss_mb']:12.0f} "
                  f"{r['framework_rss_mb']:12.0f} {r['bytes_per_param']:8.2f} {r['theoretical_bytes_per_param']:7.2f} "
                  f"{r['s_per_step'] if r['s_per_step'] is not None else float('nan'):8.2f}")
        else:
            print(f"{mode:10s} {r.get('skipped') or 'failed: ' + r.get('error', '')[-200:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
