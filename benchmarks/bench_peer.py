"""Ours vs a peer: mindrlhf's reward training (tutorial path: reward_train.py, tiny CPU YAML) and TRL's
RewardTrainer, on the same pairs (tests/data/cvalues_synth), the same token ids (the tutorial template, no BOS,
Llama 2 SentencePiece, via mindrlhf: both sides read the ids of one converted MindRecord), the same shape
(LlamaForSequenceClassification mirroring the YAML), 8 pairs a step, one epoch, the same warm-up + cosine
schedule, AdamW betas/eps, clip 1.0, 2 threads. Prints real tokens/s, s/step, wall time and pairwise accuracy
on the test split for each, and the ratios; writes benchmarks/results/peer.json.

TRL needs a newer transformers than the one MindFormers pins in .venv, so the peer runs in its own interpreter
(--peer_python, default .venv-peer/bin/python; `make peer-venv` creates it). Without it this prints how to
create it and exits 0.

Shapes (--shapes): tiny (the tiny CPU YAML, seq 256), medium (hidden 256, 4 layers, 8 heads, seq 512), long
(the tiny model at seq 1024). Both sides train the last-token Bradley-Terry loss unless --loss_type span (the
tutorial's CompareLoss, ours only). A difference that stays (reported, not hidden): TRL pads each batch to its
longest pair, ours pads each batch to the bucket boundary that conversion suggests for this data ([] at
seq 256: every pair to 256, as most batches reach it), so ours compiles one graph per bucket.

--packing (pairs, issues #25 and #33): ours trains the packed YAML instead (model_config.packing: pairs, rows of
--row_length tokens, at least twice the shape's seq so that any pair fits one row; the data is still converted at the
shape's seq; bucket_boundaries []; pack_rows the dataset's default), against TRL in the same run, at the same shapes
and the same recipe: batch_size pairs a step (TRL's 8) drawn in shuffled order, so the same number of steps an
epoch (give or take TRL's last, partial batch). Reported: real tokens/s over the epoch (the epoch's real tokens /
steps x steady s/step) with the ratio against the target (>= 1.5x, met/missed), wall time, each side's steps and
pairs a step, and accuracy (ours: reward_eval.py with the shape's plain YAML over the packed run's checkpoint: no
weight depends on packing), and the row counts ours' steps may take (the dataset's 'packing ...'
line). Also TRL's padding share, from the tokens its own collator handed its model (benchmarks/peer_trl.py
counts them), and the ceiling it sets: TRL's computed over its real tokens, the most a run computing no padding at
all reaches over TRL at TRL's cost per token. Where that ceiling is below the target, removing padding cannot meet
the target at this recipe and data; only a lower cost per token can. Writes benchmarks/results/peer_packed.json
(peer_packed_span.json with --loss_type span).
"""
import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime

import numpy as np
import yaml

from common import (PACKING_LINE, ROOT, TEST_JSONL, TINY_CONFIG, TOKENIZER, TRAIN_JSONL, cpu_line, require_inputs,
                    save)

EXAMPLES = ROOT / "examples" / "reward_model_train_tutorial"
STEP_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*?step:\[\s*(\d+)/\s*\d+\].*?per_step_time: (\d+)ms",
                       re.M)
# The packed dataset's log line (mindrlhf.data.dataset.create_packed_dataset), printed by reward_train.py
PACKED_TARGET = 1.5  # issue #25: packed ours >= 1.5x TRL's real tokens/s at every shape
PEER_SETUP = ("python3 -m venv .venv-peer && .venv-peer/bin/pip install torch transformers trl datasets "
              "(or `make peer-venv`; a CPU-only torch wheel avoids the multi-GB CUDA build)")


def run(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return proc


def read_ids(path):
    """[(chosen_ids, rejected_ids)] with padding removed, in file order."""
    from mindspore.mindrecord import FileReader

    cols = ["chosen_input_ids", "chosen_attention_mask", "rejected_input_ids", "rejected_attention_mask"]
    reader = FileReader(path, num_consumer=1, columns=cols)
    pairs = []
    for row in reader.get_next():
        chosen = row["chosen_input_ids"][row["chosen_attention_mask"].astype(bool)]
        rejected = row["rejected_input_ids"][row["rejected_attention_mask"].astype(bool)]
        pairs.append(([int(t) for t in chosen], [int(t) for t in rejected]))
    reader.close()
    return pairs


def ffn_size(hidden, multiple_of, multiplier=None):
    """MindFormers' legacy Llama FeedForward width."""
    size = int(2 * 4 * hidden / 3)
    if multiplier:
        size = int(multiplier * size)
    return multiple_of * ((size + multiple_of - 1) // multiple_of)


# The shapes: the tiny CPU YAML as it is (seq 256), a wider and deeper model at seq 512, and the tiny
# model at seq 1024. Ours uses the bucket_boundaries that conversion suggests for the train split at this
# batch size (at seq 256 that is [], as most batches reach 256); TRL pads each batch to its longest pair.
SHAPES = {
    "tiny": {},
    "medium": {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "seq_length": 512},
    "long": {"seq_length": 1024},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer_python", default=str(ROOT / ".venv-peer" / "bin" / "python"))
    parser.add_argument("--config", default=str(TINY_CONFIG))
    parser.add_argument("--shapes", default="tiny,medium,long", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loss_type", default="last_token", choices=["last_token", "span"],
                        help="ours: last_token (default) is TRL's loss, Bradley-Terry on each sequence's last real "
                             "token; span is the tutorial's CompareLoss over the answers' differing tokens")
    parser.add_argument("--stop_step", type=int, default=None,
                        help="both sides train this many steps instead of one epoch (quick checks only)")
    parser.add_argument("--packing", nargs="?", const="pairs", default=None, choices=["pairs"],
                        help="ours trains packed steps (model_config.packing: pairs, rows of --row_length "
                             "tokens); results to peer_packed.json")
    parser.add_argument("--row_length", type=int, default=2048,
                        help="packed rows hold this many tokens (at least 2 x the shape's seq, so a pair fits a "
                             "row); longer rows leave less filler, and the kernel's attention cost is per sequence, "
                             "not per row; a step keeps the padded step's token count")
    args = parser.parse_args()
    require_inputs()
    if not os.path.isfile(args.peer_python) or not os.access(args.peer_python, os.X_OK):
        print(f"bench_peer: skipped: no peer interpreter at {args.peer_python}. Create it with:\n  {PEER_SETUP}")
        return 0
    shapes = [name.strip() for name in args.shapes.split(",") if name.strip()]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    results = {"threads": args.threads, "loss_type": args.loss_type, "shapes": {}}
    name_of_results = "peer_packed" if args.packing else "peer"
    if args.loss_type != "last_token":
        name_of_results += f"_{args.loss_type}"
    if args.packing:
        results.update(packing=args.packing, target_real_tokens_per_s_ratio=PACKED_TARGET)
    if args.stop_step:
        results["stop_step"] = args.stop_step  # a quick check, not a measurement
    for name in shapes:
        print(f"== {name}", flush=True)
        results["shapes"][name] = compare(name, args)
        save(name_of_results, results)  # after each shape
    print()
    if args.packing:
        print_packed(results)
        return 0
    print(f"{'shape':7s} {'model':32s} {'ours s/step':>11s} {'TRL s/step':>10s} {'tokens/s ours/TRL':>17s} "
          f"{'wall ours/TRL':>13s} {'accuracy ours':>13s} {'TRL':>6s}")
    for name, r in results["shapes"].items():
        ours, trl = r["runs"]["ours"], r["runs"]["trl"]
        print(f"{name:7s} {r['model']:32s} {ours['steady_s_per_step']:11.4f} {trl['steady_s_per_step']:10.4f} "
              f"{r['ratio_real_tokens_per_s_ours_over_trl']:16.2f}x {r['ratio_wall_ours_over_trl']:12.2f}x "
              f"{ours['accuracy']:13.4f} {trl['accuracy']:6.4f}")
    print(cpu_line(results.get("cpu")))
    return 0


def print_packed(results):
    """The --packing summary: real tokens/s of both, the ratio against the target, the zero-padding ceiling,
    accuracy, steps, pairs a step."""
    print(f"{'shape':7s} {'model':32s} {'tokens/s ours':>13s} {'TRL':>8s} {'ratio':>6s} {'target':>13s} "
          f"{'ceiling':>7s} {'accuracy ours':>13s} {'TRL':>6s} {'steps ours':>10s} {'TRL':>4s} {'pairs/step':>10s}")
    for name, r in results["shapes"].items():
        ours, trl = r["runs"]["ours"], r["runs"]["trl"]
        print(f"{name:7s} {r['model']:32s} {ours['real_tokens_per_s']:13.1f} {trl['real_tokens_per_s']:8.1f} "
              f"{r['ratio_real_tokens_per_s_ours_over_trl']:5.2f}x "
              f"{'>= ' + str(PACKED_TARGET) + 'x ' + ('met' if r['target_met'] else 'missed'):>13s} "
              f"{r['zero_padding_ceiling']:6.2f}x {ours['accuracy']:13.4f} {trl['accuracy']:6.4f} "
              f"{ours['steps']:10d} {trl['steps']:4d} {ours['pairs_per_step']:10d}")
    print(cpu_line(results.get("cpu")))


def packed_config(raw, seq, row_length=2048):
    """The packed twin of a shape's YAML (PACKING.md): rows of max(row_length, 2 x seq) tokens (every pair,
    chosen + rejected, each at most seq, fits one row); no buckets; batch_size pairs a step, as TRL's; pack_rows
    left to the dataset's default (enough rows for any batch_size pairs)."""
    packed = copy.deepcopy(raw)
    packed["model"]["model_config"].update(packing="pairs", seq_length=max(int(row_length), 2 * seq))
    packed["train_dataset"]["bucket_boundaries"] = []
    packed["train_dataset"].pop("pack_rows", None)
    packed["train_dataset_task"]["dataset_config"] = packed["train_dataset"]
    return packed


def packing_report(text):
    """The packed dataset's line from reward_train.py's output -> its figures (the last one: the trainer may
    build the dataset more than once)."""
    found = PACKING_LINE.findall(text)
    if not found:
        sys.exit("bench_peer: the packed run printed no 'packing ... pairs a rank' line; is packing on?")
    mode, loss, pairs, steps, per_rank, ranks, width, counts = found[-1]
    return {"packing": mode, "loss": loss, "pairs": int(pairs), "steps": int(steps),
            "pairs_per_step": int(per_rank) * int(ranks), "row_tokens": int(width),
            "row_counts": [int(c) for c in counts.split(",")]}


def compare(shape, args):
    """One shape: ours (the tutorial's CLIs on a YAML with the shape's overrides), then TRL, same ids."""
    raw = yaml.safe_load(open(args.config, encoding="utf-8"))
    raw["model"]["model_config"].update(SHAPES[shape], loss_type=args.loss_type)
    mc = raw["model"]["model_config"]
    seq = int(mc["seq_length"])
    batch = int(raw["runner_config"]["batch_size"])
    work = tempfile.mkdtemp(prefix=f"bench_peer_{shape}_")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    data = {}
    for split, src in (("train", TRAIN_JSONL), ("test", TEST_JSONL)):
        data[split] = os.path.join(work, f"{split}_{seq}.mindrecord")
        run([sys.executable, str(EXAMPLES / "cvalues_comparison.py"), "--model", str(TOKENIZER), "--src_file",
             str(src), "--dst_file", data[split], "--seq_length", str(seq), "--batch_size", str(batch)], env)
    suggestion = json.load(open(data["train"] + ".stats.json", encoding="utf-8"))["buckets"]
    raw["train_dataset"]["bucket_boundaries"] = suggestion["bucket_boundaries"]
    config = os.path.join(work, f"{shape}.yaml")
    with open(config, "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, allow_unicode=True, sort_keys=False)
    train_config = config  # what ours trains; `config` (plain) also scores the test split
    if args.packing:
        train_config = os.path.join(work, f"{shape}_packed.yaml")
        with open(train_config, "w", encoding="utf-8") as fh:
            yaml.safe_dump(packed_config(raw, seq, args.row_length), fh, allow_unicode=True, sort_keys=False)
    train_ids, test_ids = read_ids(data["train"]), read_ids(data["test"])
    steps = len(train_ids) // batch  # drop_remainder on both sides
    if args.stop_step:
        steps = min(steps, args.stop_step)
    lengths = np.array([len(c) + len(r) for c, r in train_ids], dtype=np.float64)
    tokens_per_step = float(lengths.mean()) * batch  # both sides shuffle: count the epoch's mean
    # (TRL, and ours padded: 8 pairs a step, the remainder dropped; ours packed: every pair, in its own steps)

    sched, opt = raw["lr_schedule"], raw["optimizer"]
    spec = {"seed": int(raw.get("seed", 0)), "threads": args.threads, "batch_size": batch,
            "model": {"vocab_size": int(mc["vocab_size"]), "hidden_size": int(mc["hidden_size"]),
                      "intermediate_size": int(mc.get("intermediate_size") or ffn_size(
                          int(mc["hidden_size"]), int(mc.get("multiple_of", 256)), mc.get("ffn_dim_multiplier"))),
                      "num_layers": int(mc["num_layers"]), "num_heads": int(mc["num_heads"]),
                      "seq_length": seq, "rms_norm_eps": float(mc.get("rms_norm_eps", 1e-5)),
                      "rope_theta": float(mc.get("theta", 10000.0)), "pad_token_id": int(mc["pad_token_id"])},
            "optim": {"learning_rate": float(sched["learning_rate"]), "lr_end": float(sched["lr_end"]),
                      "warmup_steps": int(sched["warmup_steps"]), "beta1": float(opt["beta1"]),
                      "beta2": float(opt["beta2"]), "eps": float(opt["eps"]),
                      "weight_decay": float(opt["weight_decay"]),
                      "max_grad_norm": float(raw["runner_wrapper"].get("max_grad_norm", 1.0))},
            "train": train_ids[:steps * batch] if args.stop_step else train_ids, "test": test_ids}
    spec_path = os.path.join(work, "peer_spec.json")
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)

    results = {"model": f"hidden {mc['hidden_size']}, {mc['num_layers']} layers, seq {seq}",
               "seq_length": seq, "pairs_per_step": batch, "steps": steps, "train_pairs": len(train_ids),
               "test_pairs": len(test_ids), "mean_real_tokens_per_pair": round(float(lengths.mean()), 1),
               "threads": args.threads, "load_average_before": os.getloadavg(), "runs": {}}

    # ours: the tutorial's command line
    out = os.path.join(work, "ours")
    cmd = [sys.executable, str(EXAMPLES / "reward_train.py"), "--config", train_config, "--train_dataset",
           data["train"], "--output_dir", out]
    if args.stop_step:
        cmd += ["--stop_step", str(args.stop_step)]
    start = time.perf_counter()
    proc = run(cmd, env)
    wall = time.perf_counter() - start
    log = open(os.path.join(out, "log", "rank_0", "info.log"), encoding="utf-8").read()
    lines = STEP_LINE.findall(log)
    stamps = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp() for t, _, _ in lines]
    steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    eval_json = os.path.join(work, "ours_eval.json")
    run([sys.executable, str(EXAMPLES / "reward_eval.py"), "--config", config, "--distributed_ckpt_path",
         os.path.join(out, "checkpoint"), "--eval_dataset", str(TEST_JSONL), "--tokenizer", str(TOKENIZER),
         "--output_file", eval_json], env)
    accuracy = json.load(open(eval_json, encoding="utf-8"))["checkpoints"][-1]["accuracy"]
    buckets = raw["train_dataset"].get("bucket_boundaries")
    ours_tokens_per_step = tokens_per_step
    packed = None
    if args.packing:
        packed = packing_report(proc.stdout + proc.stderr + log)
        # the pairs the epoch's steps hold (the remainder past whole steps is dropped, as a padded run drops it)
        ours_tokens_per_step = float(lengths.sum()) / len(lengths) * packed["pairs_per_step"]
    results["runs"]["ours"] = {
        "framework": "mindrlhf / MindSpore graph mode", "steps": len(lines), "process_seconds": round(wall, 1),
        "steady_s_per_step": round(steady, 4),
        "mean_per_step_time_s": round(float(np.mean([int(ms) for _, _, ms in lines[1:]])) / 1000.0, 4),
        "real_tokens_per_s": round(ours_tokens_per_step / steady, 1), "accuracy": accuracy,
        "padding": f"each batch to its bucket {buckets}" if buckets else f"every pair to {seq}",
        "loss": mc.get("loss_type") or "span"}
    if packed:
        results["runs"]["ours"].update(
            padding=f"packed ({packed['packing']}): {packed['row_counts']} rows of {packed['row_tokens']} tokens a "
                    f"step, filler at the rows' ends", epoch_steps=packed["steps"], row_counts=packed["row_counts"],
            row_tokens=packed["row_tokens"], pairs_per_step=packed["pairs_per_step"],
            real_tokens_per_step=round(ours_tokens_per_step, 1),
            accuracy_scored_with="the shape's plain YAML (packing off) over the packed run's last checkpoint")

    peer_json = os.path.join(work, "peer_result.json")
    start = time.perf_counter()
    proc = subprocess.run([args.peer_python, str(ROOT / "benchmarks" / "peer_trl.py"), "--spec", spec_path,
                           "--output", peer_json, "--work_dir", work],
                          env=dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false"),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"peer run failed:\n{proc.stderr[-3000:]}")
    peer = json.load(open(peer_json, encoding="utf-8"))
    peer.update({"process_seconds": round(time.perf_counter() - start, 1),
                 "real_tokens_per_s": round(tokens_per_step / peer["steady_s_per_step"], 1),
                 "real_tokens_per_step": round(tokens_per_step, 1),
                 "padding": "each batch to its longest pair", "loss": "last_token"})
    results["runs"]["trl"] = peer
    ours = results["runs"]["ours"]
    results["ratio_s_per_step_ours_over_trl"] = round(ours["steady_s_per_step"] / peer["steady_s_per_step"], 2)
    results["ratio_real_tokens_per_s_ours_over_trl"] = round(ours["real_tokens_per_s"] / peer["real_tokens_per_s"], 2)
    results["ratio_wall_ours_over_trl"] = round(ours["process_seconds"] / peer["process_seconds"], 2)
    results["accuracy_difference_ours_minus_trl"] = round(ours["accuracy"] - peer["accuracy"], 4)
    # what removing all padding could give at TRL's cost per token: its computed tokens over its real ones
    results["trl_padding_share"] = peer["padding_share"]
    results["zero_padding_ceiling"] = round(peer["computed_tokens"] / peer["real_tokens"], 2)
    if args.packing:
        results["target_met"] = bool(results["ratio_real_tokens_per_s_ours_over_trl"] >= PACKED_TARGET)
    results["load_average_after"] = os.getloadavg()
    if max(results["load_average_before"][0], results["load_average_after"][0]) > (os.cpu_count() or 1):
        # Seen here: torch's OpenMP threads spin-wait; with more runnable threads than cores its steps got
        # up to 30x slower (2 threads vs 1 on short pairs), far more than ours. Rerun on a quiet machine.
        results["warning"] = (f"load average above the {os.cpu_count()} cores during the run: the peer's "
                              "OpenMP threads may be starved; rerun on a quiet machine")
        print(f"warning: {results['warning']}")
    for name, r in results["runs"].items():
        print(f"{name:5s} {r['steady_s_per_step']:.4f} s/step  {r['real_tokens_per_s']:9.1f} real tokens/s  "
              f"wall {r['process_seconds']:6.1f} s  accuracy {r['accuracy']:.4f}", flush=True)
    print(f"ours/trl: s/step {results['ratio_s_per_step_ours_over_trl']}x, real tokens/s "
          f"{results['ratio_real_tokens_per_s_ours_over_trl']}x, wall {results['ratio_wall_ours_over_trl']}x; TRL "
          f"computes {100 * results['trl_padding_share']:.1f}% padding: no padding at its cost per token reaches "
          f"{results['zero_padding_ceiling']}x", flush=True)
    if args.packing:
        print(f"ours packed: {packed['steps']} steps of {packed['pairs_per_step']} pairs in {packed['row_counts']} "
              f"rows of {packed['row_tokens']} tokens (TRL: {peer['steps']} steps); real tokens/s ours/TRL "
              f"{results['ratio_real_tokens_per_s_ours_over_trl']}x, target >= {PACKED_TARGET}x "
              f"{'met' if results['target_met'] else 'missed'}", flush=True)
    print(cpu_line(), flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
