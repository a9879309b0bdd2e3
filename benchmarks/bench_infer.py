"""Inference throughput: one sequence at a time at full length (the tutorial's reward_infer.py) vs batched,
length-sorted, bucket-trimmed scoring (RewardScorer), same weights, same sequences, same run.

Target: >= 8x sequences/s (tiny backbone, seq 1024). Both paths must give the same scores.
"""
import argparse
import sys
import tempfile
import time

import numpy as np
import yaml

from common import TEST_JSONL, TINY_CONFIG, TOKENIZER, require_inputs, save


def config_at(seq_length: int, directory: str) -> str:
    raw = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    raw["model"]["model_config"]["seq_length"] = seq_length
    path = f"{directory}/tiny_{seq_length}.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh, allow_unicode=True)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--seq_length", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    require_inputs()
    import mindspore as ms

    import mindrlhf.training.registry  # noqa: F401
    from mindrlhf.data.pairs import read_pairs
    from mindrlhf.data.prompt import format_prompt
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.evaluation.scorer import RewardScorer

    tmp = tempfile.mkdtemp(prefix="bench_infer_")
    config = config_at(args.seq_length, tmp)
    tok = load_tokenizer(str(TOKENIZER))
    pairs = list(read_pairs(str(TEST_JSONL)))
    texts = [format_prompt(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)][:args.sequences]
    ids = tok.encode(texts)
    ms.set_seed(0)
    ours = RewardScorer(config, batch_size=args.batch_size)
    ckpt = f"{tmp}/weights.ckpt"
    ms.save_checkpoint(ours.network, ckpt)
    base = RewardScorer(config, ckpt, batch_size=1, buckets=())
    ours.load_weights(ckpt)

    # warm-up: compile every shape once on both sides, outside the timing
    base.score_ids(ids[:1])
    ours.score_ids(ids)
    start = time.perf_counter()
    base_scores = base.score_ids(ids)
    baseline = time.perf_counter() - start
    start = time.perf_counter()
    our_scores = ours.score_ids(ids)
    fast = time.perf_counter() - start
    diff = float(np.abs(base_scores - our_scores).max())
    lengths = [min(len(x), args.seq_length) for x in ids]
    result = {"sequences": len(ids), "seq_length": args.seq_length, "mean_tokens": round(float(np.mean(lengths)), 1),
              "baseline": "batch 1, padded to seq_length", "ours": f"batch {args.batch_size}, sorted, bucketed",
              "baseline_seq_per_s": round(len(ids) / baseline, 2), "ours_seq_per_s": round(len(ids) / fast, 2),
              "speedup": round(baseline / fast, 2), "max_abs_score_difference": diff}
    print(f"inference speedup {result['speedup']}x; max |score difference| {diff:.2e}")
    assert diff < 1e-3, diff
    save("infer", result)


if __name__ == "__main__":
    sys.exit(main())
