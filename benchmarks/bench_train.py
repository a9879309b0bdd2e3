"""Training throughput: fixed padding to seq 1024 (the tutorial's way) vs length bucketing, same model, same
data order, same number of pairs, same run; then pairwise accuracy of both on the shared test set.

Real tokens/s counts only non-pad tokens (both runs see the same pairs). Target: >= 4x at equal accuracy.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

from common import ROOT, TEST_JSONL, TINY_CONFIG, TOKENIZER, TRAIN_JSONL, require_inputs, save

EXAMPLES = ROOT / "examples" / "reward_model_train_tutorial"
STEP_TIME = re.compile(r"step:\[\s*(\d+)/\s*\d+\].*?per_step_time: (\d+)ms")


def write_config(directory, seq_length, boundaries):
    raw = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    raw["model"]["model_config"]["seq_length"] = seq_length
    raw["train_dataset"]["bucket_boundaries"] = boundaries
    raw["train_dataset_task"]["dataset_config"] = raw["train_dataset"]
    name = "bucketed" if boundaries else "fixed"
    path = os.path.join(directory, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, allow_unicode=True)
    return path


def run(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq_length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=150, help="steps of 8 pairs for each run")
    parser.add_argument("--boundaries", default="128,256,384,512,768")
    args = parser.parse_args()
    require_inputs()
    work = tempfile.mkdtemp(prefix="bench_train_")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    data = os.path.join(work, f"train_{args.seq_length}.mindrecord")
    run([sys.executable, str(EXAMPLES / "cvalues_comparison.py"), "--model", str(TOKENIZER), "--src_file",
         str(TRAIN_JSONL), "--dst_file", data, "--seq_length", str(args.seq_length)], env)
    from mindspore.mindrecord import FileReader

    reader = FileReader(data, num_consumer=1, columns=["chosen_attention_mask", "rejected_attention_mask"])
    real = [int(r["chosen_attention_mask"].sum() + r["rejected_attention_mask"].sum()) for r in reader.get_next()]
    reader.close()
    pairs = args.steps * 8
    tokens = float(np.mean(real)) * pairs  # same seed, same shuffle: both runs see the same pairs
    results = {"seq_length": args.seq_length, "pairs_trained": pairs, "mean_real_tokens_per_pair": round(np.mean(real), 1),
               "padding_share_fixed": round(1 - np.mean(real) / (2 * args.seq_length), 3), "runs": {}}
    boundaries = [int(b) for b in args.boundaries.split(",") if b]
    for name, bounds in (("fixed", []), ("bucketed", boundaries)):
        config = write_config(work, args.seq_length, bounds)
        out = os.path.join(work, name)
        start = time.perf_counter()
        run([sys.executable, str(EXAMPLES / "reward_train.py"), "--config", config, "--train_dataset", data,
             "--output_dir", out, "--stop_step", str(args.steps)], env)
        wall = time.perf_counter() - start
        log = open(os.path.join(out, "log", "rank_0", "info.log"), encoding="utf-8").read()
        step_ms = [int(ms) for _, ms in STEP_TIME.findall(log)]
        steady = sum(step_ms[1:]) / 1000.0
        eval_json = os.path.join(work, f"{name}_eval.json")
        run([sys.executable, str(EXAMPLES / "reward_eval.py"), "--config", config, "--distributed_ckpt_path",
             os.path.join(out, "checkpoint"), "--eval_dataset", str(TEST_JSONL), "--tokenizer", str(TOKENIZER),
             "--output_file", eval_json], env)
        accuracy = json.load(open(eval_json, encoding="utf-8"))["checkpoints"][-1]["accuracy"]
        results["runs"][name] = {"boundaries": bounds, "process_seconds": round(wall, 1),
                                 "train_seconds_all_steps": round(sum(step_ms) / 1000.0, 1),
                                 "train_seconds_after_first_step": round(steady, 1),
                                 "real_tokens_per_s": round(tokens * (len(step_ms) - 1) / len(step_ms) / steady, 1),
                                 "accuracy": accuracy}
    fixed, bucketed = results["runs"]["fixed"], results["runs"]["bucketed"]
    results["speedup_real_tokens_per_s"] = round(bucketed["real_tokens_per_s"] / fixed["real_tokens_per_s"], 2)
    results["speedup_all_steps"] = round(fixed["train_seconds_all_steps"] / bucketed["train_seconds_all_steps"], 2)
    results["accuracy_difference"] = round(bucketed["accuracy"] - fixed["accuracy"], 4)
    print(f"training speedup {results['speedup_real_tokens_per_s']}x real tokens/s "
          f"(all steps incl. compiles: {results['speedup_all_steps']}x); accuracy fixed {fixed['accuracy']:.4f} "
          f"bucketed {bucketed['accuracy']:.4f}")
    save("train", results)


if __name__ == "__main__":
    sys.exit(main())
