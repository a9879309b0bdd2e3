"""Padding at seq 4096 on a long-tailed length mix (issue #25): fixed padding vs length buckets vs packing.

Real CValues pairs are mostly short with a long tail, and at seq 4096 fixed padding computes mostly pad tokens.
This makes such a mix from tests/data/cvalues_synth/train.jsonl: each response's text is repeated until its
sequence reaches a length drawn from a seeded lognormal (--median, --sigma; clipped to --seq_length), the result
converted with the tutorial's cvalues_comparison.py at --seq_length (length percentiles reported after
conversion). Then the tiny model (hidden 64, 2 layers; the tiny CPU YAML with seq_length set) trains one epoch
of those --pairs pairs three ways, one after another:
  fixed    every pair padded to seq_length (bucket_boundaries []);
  buckets  each batch padded to the bucket conversion suggests for it (what bucket_boundaries: auto picks);
  packed   model_config.packing: pairs, rows of 2 x seq_length (any pair fits one), the padded runs' batch_size
           pairs a step (pack_steps batch_size) in the fewest of 1, 2, 4, ... rows; pack_rows (the most rows) the
           dataset's default unless --pack_rows.
Each: real tokens/s (the epoch's real tokens / steps x steady s/step; steady = first to last logged step, so the
first step's compile is left out), s/step, steps and the padding share of the computed tokens, counted exactly by
iterating the same dataset pipeline (create_reward_dataset, the run's seed and shuffle): fixed and buckets:
rows x width per batch vs real tokens; packed: filler plus pad tokens inside spans, from the steps' layout codes
(mindrlhf.data.packing.segment_of / kind_of). Target: packed padding share < 5% (printed met/missed).

The loss is last_token by default (each sequence at its own length: no pads inside spans). --loss_type span
(the tutorial's loss) extends the shorter side of each packed pair with pads to the pair's end, and those count as
padding. Writes benchmarks/results/packing.json (packing_span.json with --loss_type span).
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

from common import PACKING_LINE, ROOT, TINY_CONFIG, TOKENIZER, TRAIN_JSONL, cpu_line, require_inputs, save

EXAMPLES = ROOT / "examples" / "reward_model_train_tutorial"
STEP_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*?step:\[\s*(\d+)/\s*\d+\].*?per_step_time: (\d+)ms",
                       re.M)
PADDING_TARGET = 0.05  # issue #25: packed steps compute under 5% padding
PERCENTILES = (10, 25, 50, 75, 90, 95, 99, 100)
# Default --pairs: one epoch of the fixed run at seq 4096 (8 pairs, 16 rows of 4096 a step) in a few minutes on
# 2 cores: a smoke run took 2.1 s/step there with the compiled kernels on a loaded machine, so 128 steps ~4.5 min
# (less on a quiet one). The packed run's padding share includes the rows left empty when the epoch's rows are
# rounded up to whole steps (at most pack_rows - 1): at this size that is a few percent (printed apart).
DEFAULT_PAIRS = 1024


def run(cmd, env):
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    return proc


def stretched_jsonl(path, pairs, seq_length, median, sigma, seed):
    """`pairs` rows of train.jsonl (cycled) with each response repeated until its sequence (prompt, template and
    response) reaches a length drawn from lognormal(log(median), sigma), clipped to [its own length, seq_length].
    Tokens per character are measured per response with the tokenizer, so the drawn lengths hold roughly; the
    converted lengths are what gets reported."""
    from mindrlhf.data.tokenizer import load_tokenizer

    rows = [json.loads(line) for line in open(TRAIN_JSONL, encoding="utf-8") if line.strip()]
    rows = [rows[i % len(rows)] for i in range(pairs)]
    tokenizer = load_tokenizer(str(TOKENIZER))
    responses = [r[k] for r in rows for k in ("pos_resp", "neg_resp")]
    response_tokens = [len(t) for t in tokenizer.encode(responses)]
    prompt_tokens = [len(t) for t in tokenizer.encode([r["prompt"] for r in rows])]
    template_tokens = 16  # the tutorial template's words around prompt and response, roughly
    rng = np.random.default_rng(seed)
    targets = np.minimum(rng.lognormal(np.log(median), sigma, size=2 * pairs), seq_length)
    with open(path, "w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            out = dict(row)
            for j, key in enumerate(("pos_resp", "neg_resp")):
                text, n_tokens = row[key], max(response_tokens[2 * i + j], 1)
                want = int(targets[2 * i + j]) - prompt_tokens[i] - template_tokens
                if want > n_tokens:
                    chars = int(np.ceil(want * len(text) / n_tokens))
                    out[key] = (text * (chars // len(text) + 1))[:chars]
            fh.write(json.dumps(out, ensure_ascii=False) + "\n")


def converted_lengths(path):
    """(chosen, rejected) real lengths of every converted pair, in file order."""
    from mindspore.mindrecord import FileReader

    reader = FileReader(path, num_consumer=1, columns=["chosen_attention_mask", "rejected_attention_mask"])
    lengths = [(int(r["chosen_attention_mask"].sum()), int(r["rejected_attention_mask"].sum()))
               for r in reader.get_next()]
    reader.close()
    return np.array(lengths, dtype=np.int64).reshape(-1, 2)


def percentiles(values):
    return {f"p{p}": int(np.percentile(values, p)) for p in PERCENTILES}


def padded_share(data, batch, seed, boundaries, pad_token_id):
    """Steps, computed and real tokens of one epoch of the padded pipeline (fixed: boundaries [])."""
    from mindrlhf.data.dataset import create_reward_dataset

    dataset = create_reward_dataset(data, batch, shuffle=True, seed=seed, bucket_boundaries=boundaries,
                                    pad_token_id=pad_token_id)
    steps = computed = real = 0
    for item in dataset.create_dict_iterator(output_numpy=True, num_epochs=1):
        mask = item["attention_mask"]
        steps += 1
        computed += int(mask.size)
        real += int(mask.sum())
    return {"steps": steps, "computed_tokens": computed, "real_tokens": real, "padding_tokens": computed - real}


def packed_share(data, batch, seed, rows, seq_length, loss_type, pad_token_id):
    """Steps, computed and real tokens of one epoch of the packed pipeline: padding = filler (segment 0) plus
    pad tokens inside spans (kind +4; span loss only), from the layout codes of every step. Rows left wholly
    filler (the epoch's rows rounded up to whole steps: at most pack_rows - 1, a share that shrinks as the epoch
    grows; fill plan only) are counted too, and apart."""
    from mindrlhf.data.dataset import create_reward_dataset
    from mindrlhf.data.packing import PAD, kind_of, segment_of

    dataset = create_reward_dataset(data, batch, shuffle=True, seed=seed, bucket_boundaries=[],
                                    pad_token_id=pad_token_id, packing="pairs", pack_rows=rows,
                                    loss_type=loss_type, seq_length=seq_length)
    steps = computed = filler = pads = empty_rows = 0
    shapes = {}
    for item in dataset.create_dict_iterator(output_numpy=True, num_epochs=1):
        codes = item["attention_mask"]
        shapes[int(codes.shape[0])] = shapes.get(int(codes.shape[0]), 0) + 1
        steps += 1
        computed += int(codes.size)
        filler += int((segment_of(codes) == 0).sum())
        pads += int(((kind_of(codes) & PAD) != 0).sum())
        empty_rows += int((segment_of(codes) == 0).all(axis=1).sum())
    width = int(codes.shape[1])
    used = computed - empty_rows * width
    return {"steps": steps, "computed_tokens": computed, "real_tokens": computed - filler - pads,
            "padding_tokens": filler + pads, "filler_tokens": filler, "in_span_pad_tokens": pads,
            "empty_rows": empty_rows,
            "padding_share_in_used_rows": round((filler + pads - (computed - used)) / used, 4),
            "pack_rows": rows or max(shapes), "steps_by_rows": dict(sorted(shapes.items())), "row_tokens": width}


def train(name, raw, data, work, env, stop_step):
    """reward_train.py on this YAML: steps, steady s/step (first to last logged step) and its stdout."""
    config = os.path.join(work, f"{name}.yaml")
    with open(config, "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, allow_unicode=True, sort_keys=False)
    out = os.path.join(work, name)
    cmd = [sys.executable, EXAMPLES / "reward_train.py", "--config", config, "--train_dataset", data,
           "--output_dir", out]
    if stop_step:
        cmd += ["--stop_step", stop_step]
    start = time.perf_counter()
    proc = run(cmd, env)
    wall = time.perf_counter() - start
    log = open(os.path.join(out, "log", "rank_0", "info.log"), encoding="utf-8").read()
    lines = STEP_LINE.findall(log)
    if len(lines) < 2:
        sys.exit(f"{name}: {len(lines)} step(s) logged; steady s/step needs two or more (raise --pairs)")
    stamps = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp() for t, _, _ in lines]
    return {"steps_trained": len(lines), "process_seconds": round(wall, 1),
            "first_step_s": round(int(lines[0][2]) / 1000.0, 2),
            "steady_s_per_step": round((stamps[-1] - stamps[0]) / (len(stamps) - 1), 4),
            "median_step_s": round(float(np.median([int(ms) for _, _, ms in lines[1:]])) / 1000.0, 4)}, \
        proc.stdout + proc.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="pairs in the epoch")
    parser.add_argument("--seq_length", type=int, default=4096, help="conversion's and the padded runs' length")
    parser.add_argument("--median", type=float, default=80.0, help="median tokens of a sequence (lognormal)")
    parser.add_argument("--sigma", type=float, default=1.3, help="lognormal sigma of the sequence lengths")
    parser.add_argument("--seed", type=int, default=0, help="the length draw's and the runs' seed")
    parser.add_argument("--loss_type", default="last_token", choices=["last_token", "span"],
                        help="last_token (default): no pads inside packed spans; span: the tutorial's loss, the "
                             "shorter side of a packed pair padded to the pair's end (counted as padding)")
    parser.add_argument("--pack_rows", type=int, default=None,
                        help="rows of 2 x seq_length per packed step (default: the dataset's, the padded step's "
                             "token count)")
    parser.add_argument("--runs", default="fixed,buckets,packed", help="comma-separated subset of the three")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stop_step", type=int, default=None,
                        help="each run trains this many steps instead of the epoch (quick checks only)")
    args = parser.parse_args()
    require_inputs()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if set(runs) - {"fixed", "buckets", "packed"}:
        parser.error(f"--runs: unknown {sorted(set(runs) - {'fixed', 'buckets', 'packed'})}")
    seq = args.seq_length
    raw = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    batch = int(raw["runner_config"]["batch_size"])
    pad_id = int(raw["model"]["model_config"]["pad_token_id"])
    raw["seed"] = args.seed
    raw["model"]["model_config"].update(seq_length=seq, loss_type=args.loss_type)
    raw["train_dataset"]["seed"] = args.seed  # the dataset's shuffle (and the plan) use it; so does the count
    raw["train_dataset_task"]["dataset_config"] = raw["train_dataset"]
    work = tempfile.mkdtemp(prefix="bench_packing_")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])

    jsonl = os.path.join(work, "long_tail.jsonl")
    stretched_jsonl(jsonl, args.pairs, seq, args.median, args.sigma, args.seed)
    data = os.path.join(work, f"long_tail_{seq}.mindrecord")
    run([sys.executable, EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", jsonl,
         "--dst_file", data, "--seq_length", seq, "--batch_size", batch], env)
    stats = json.load(open(data + ".stats.json", encoding="utf-8"))
    boundaries = list(stats["buckets"]["bucket_boundaries"])
    lengths = converted_lengths(data)
    sequences, pair_tokens = lengths.reshape(-1), lengths.sum(axis=1)
    results = {"seq_length": seq, "pairs": int(len(lengths)), "pairs_per_padded_step": batch,
               "loss_type": args.loss_type, "threads": args.threads, "seed": args.seed,
               "model": f"hidden {raw['model']['model_config']['hidden_size']}, "
                        f"{raw['model']['model_config']['num_layers']} layers",
               "length_mix": {"source": "tests/data/cvalues_synth/train.jsonl, responses repeated to lognormal "
                                        f"lengths (median {args.median}, sigma {args.sigma}, seed {args.seed})",
                              "sequence_tokens": percentiles(sequences), "pair_tokens": percentiles(pair_tokens),
                              "pairs_under_512_tokens": round(float(np.mean(pair_tokens < 512)), 3),
                              "sequences_at_seq_length": int(np.sum(sequences >= seq)),
                              "truncated_pairs": stats.get("stats", {}).get("overlong_pairs")},
               "bucket_boundaries_suggested": boundaries, "load_average_before": os.getloadavg(), "runs": {}}
    if args.stop_step:
        results["stop_step"] = args.stop_step  # a quick check, not a measurement
    mix = results["length_mix"]
    print(f"length mix after conversion at {seq}: sequence tokens {mix['sequence_tokens']}, pair tokens "
          f"{mix['pair_tokens']}, {mix['pairs_under_512_tokens']:.0%} of pairs under 512 tokens", flush=True)

    for name in runs:
        cfg = copy.deepcopy(raw)
        dataset_cfg = cfg["train_dataset"]
        if name == "packed":
            cfg["model"]["model_config"].update(packing="pairs", seq_length=2 * seq)
            dataset_cfg["bucket_boundaries"] = []
            if args.pack_rows:
                dataset_cfg["pack_rows"] = args.pack_rows
            count = packed_share(data, batch, args.seed, args.pack_rows, 2 * seq, args.loss_type, pad_id)
            padding = (f"packed (pairs): {batch} pairs a step in {sorted(count['steps_by_rows'])} rows of "
                       f"{count['row_tokens']}; padding = "
                       "filler" + (" + pads inside spans (span loss)" if args.loss_type == "span" else ""))
        else:
            dataset_cfg["bucket_boundaries"] = boundaries if name == "buckets" else []
            count = padded_share(data, batch, args.seed, dataset_cfg["bucket_boundaries"], pad_id)
            padding = f"every pair to {seq}"
            if name == "buckets" and boundaries:
                padding = f"each batch to its bucket of {sorted(set(boundaries) | {seq})}"
        cfg["train_dataset_task"]["dataset_config"] = dataset_cfg
        print(f"== {name}: {padding}", flush=True)
        timing, output = train(name, cfg, data, work, env, args.stop_step)
        entry = {"padding": padding, "steps": count["steps"], **timing,
                 "real_tokens_per_s": round(count["real_tokens"] / count["steps"] / timing["steady_s_per_step"], 1),
                 "padding_share": round(count["padding_tokens"] / count["computed_tokens"], 4), **count}
        if name == "packed":
            found = PACKING_LINE.findall(output)
            if found:  # the dataset's own line: pairs a step (batch_size x ranks, as the padded runs) and row counts
                entry["pairs_per_step"] = int(found[-1][4]) * int(found[-1][5])
                entry["row_counts"] = [int(c) for c in found[-1][7].split(",")]
            entry["padding_target"] = f"< {PADDING_TARGET:.0%}"
            entry["padding_target_met"] = bool(entry["padding_share"] < PADDING_TARGET)
        if name == "buckets":
            entry["note"] = ("conversion suggested no buckets for this data: the same as fixed" if not boundaries else
                             "one graph per bucket: the steady time includes the compiles of the buckets after the "
                             "first (median_step_s leaves them out)")
        results["runs"][name] = entry
        print(f"{name}: {entry['steps']} steps, {entry['steady_s_per_step']:.3f} s/step, "
              f"{entry['real_tokens_per_s']:.1f} real tokens/s, padding share {entry['padding_share']:.1%}",
              flush=True)
    base = results["runs"].get("fixed")
    if base:
        for name, entry in results["runs"].items():
            entry["speedup_real_tokens_per_s_vs_fixed"] = round(entry["real_tokens_per_s"] / base["real_tokens_per_s"],
                                                                2)
    results["load_average_after"] = os.getloadavg()
    save("packing" if args.loss_type == "last_token" else f"packing_{args.loss_type}", results)
    print()
    print(f"seq {seq}, {results['pairs']} pairs ({mix['pairs_under_512_tokens']:.0%} under 512 tokens, "
          f"pair tokens p50 {mix['pair_tokens']['p50']} p99 {mix['pair_tokens']['p99']}), loss {args.loss_type}")
    print(f"{'run':8s} {'steps':>5s} {'s/step':>8s} {'real tokens/s':>13s} {'vs fixed':>8s} {'padding':>8s}")
    for name, entry in results["runs"].items():
        vs = entry.get("speedup_real_tokens_per_s_vs_fixed")
        print(f"{name:8s} {entry['steps']:5d} {entry['steady_s_per_step']:8.3f} {entry['real_tokens_per_s']:13.1f} "
              f"{(f'{vs:.2f}x' if vs else '-'):>8s} {entry['padding_share']:8.1%}")
    if "packed" in results["runs"]:
        packed = results["runs"]["packed"]
        print(f"packed padding share {packed['padding_share']:.1%}: target < {PADDING_TARGET:.0%} "
              f"{'met' if packed['padding_target_met'] else 'missed'}"
              + (" (in-span pads of the span loss count as padding)" if args.loss_type == "span" else "")
              + f"; {packed['empty_rows']} wholly empty row(s) of {packed['steps'] * packed['pack_rows']} (the epoch "
                f"rounded up to whole steps), {packed['padding_share_in_used_rows']:.1%} in the rows in use")
    print(cpu_line(results["cpu"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
