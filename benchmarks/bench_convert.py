"""Conversion throughput: the tutorial's algorithm vs ours, same input, same run, tutorial's padded layout.

The baseline re-implements upstream cvalues_comparison.py: mindformers' LlamaTokenizer called five times per
pair (three length probes, two padded encodes), numpy loss_mask/end_ind, one FileWriter.write_raw_data per
pair. Ours: batched multi-threaded SentencePiece, vectorised samples, batched writes. Both outputs are
compared row by row. Target: >= 6x pairs/s, whole process, seq 1024, >= 40,000 pairs.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from common import TOKENIZER, TRAIN_JSONL, require_inputs, save, timed

TEMPLATE = "根据以下问题，写一个合适的回答。\n\n### 问题：\n{instruction}\n\n### 回答：\n{response}"
SCHEMA = {"chosen_input_ids": {"type": "int32", "shape": [-1]}, "chosen_attention_mask": {"type": "int32", "shape": [-1]},
          "rejected_input_ids": {"type": "int32", "shape": [-1]},
          "rejected_attention_mask": {"type": "int32", "shape": [-1]}, "position_id": {"type": "int32", "shape": [-1]},
          "loss_mask": {"type": "int32", "shape": [-1]}, "end_ind": {"type": "int64"}}


def make_input(path, copies):
    rows = [line for line in TRAIN_JSONL.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(copies):
            fh.write("\n".join(rows) + "\n")
    return len(rows) * copies


def tutorial_sample(c, r, pad, seq):
    """The upstream 7-field sample from two padded tokenizer outputs (None when the pair is identical), as its
    cvalues_comparison.py builds it; shared by both conversion benchmarks' baselines."""
    # int32 casts: MindSpore 2.9's FileWriter rejects the int64/float64 arrays upstream wrote.
    sample = {"chosen_input_ids": np.array(c["input_ids"], np.int32),
              "chosen_attention_mask": np.array(c["attention_mask"], np.int32),
              "rejected_input_ids": np.array(r["input_ids"], np.int32),
              "rejected_attention_mask": np.array(r["attention_mask"], np.int32)}
    diff = np.nonzero(sample["chosen_input_ids"] != sample["rejected_input_ids"])[0]
    if len(diff) == 0:
        return None
    sample["position_id"] = np.arange(seq, dtype=np.int32)
    c_idx = np.nonzero(sample["chosen_input_ids"] == pad)[0]
    r_idx = np.nonzero(sample["rejected_input_ids"] == pad)[0]
    end = max(c_idx[0] if len(c_idx) else seq, r_idx[0] if len(r_idx) else seq)
    loss_mask = np.zeros(seq, dtype=np.int32)
    loss_mask[diff[0]:end] = 1
    sample["loss_mask"] = loss_mask
    sample["end_ind"] = int(end)
    return sample


def tutorial_convert(src, dst, seq, times):
    """The upstream algorithm, step for step."""
    from mindformers import LlamaTokenizer
    from mindspore.mindrecord import FileWriter

    with timed(times, "baseline_load_tokenizer"):
        tokenizer = LlamaTokenizer(vocab_file=str(TOKENIZER))
        tokenizer.pad_token = tokenizer.eos_token
    writer = FileWriter(file_name=dst, shard_num=1, overwrite=True)
    writer.add_schema(SCHEMA)
    count = 0
    with open(src, encoding="utf-8") as fh:
        for line in fh:
            item = json.loads(line)
            with timed(times, "baseline_tokenize"):
                prompt, chosen, reject = item["prompt"].strip(), item["pos_resp"].strip(), item["neg_resp"].strip()
                for text in (prompt, chosen, reject):
                    np.array(tokenizer(text, truncation=True, max_length=seq, add_special_tokens=False)["input_ids"])
                c = tokenizer(TEMPLATE.format_map({"instruction": prompt, "response": chosen}), truncation=True,
                              max_length=seq, padding="max_length", add_special_tokens=False)
                r = tokenizer(TEMPLATE.format_map({"instruction": prompt, "response": reject}), truncation=True,
                              max_length=seq, padding="max_length", add_special_tokens=False)
            with timed(times, "baseline_build"):
                sample = tutorial_sample(c, r, 2, seq)
                if sample is None:
                    continue
            with timed(times, "baseline_write"):
                writer.write_raw_data([sample])
            count += 1
    with timed(times, "baseline_write"):
        writer.commit()
    return count


def ours_convert(src, dst, seq, times, layout="padded", tokenizer_path=TOKENIZER, pad_token_id=2, template=None):
    """mindrlhf.data.convert with its tokenizing and writing timed apart (times['ours_tokenize'/'ours_write']).

    template: None for the tutorial's, or a name for resolve_template (bench_convert_tokenizers.py: "chat")."""
    from mindrlhf.data import convert as conv
    from mindrlhf.data.templates import resolve_template
    from mindrlhf.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_path))
    options = {"template": resolve_template(template, tokenizer)} if template else {}
    encode = tokenizer.encode

    def timed_encode(*args, **kwargs):
        with timed(times, "ours_tokenize"):
            return encode(*args, **kwargs)

    tokenizer.encode = timed_encode
    original_write = conv.AtomicMindRecordWriter.write

    def timed_write(self, rows):
        with timed(times, "ours_write"):
            original_write(self, rows)

    conv.AtomicMindRecordWriter.write = timed_write
    try:
        result = conv.convert_file(str(src), tokenizer, dst, seq, pad_token_id, overwrite=True, progress=False,
                                   layout=layout, **options)
    finally:
        conv.AtomicMindRecordWriter.write = original_write
    return result["rows"]


def compare(a, b, limit=2000):
    from mindspore.mindrecord import FileReader

    ra, rb = FileReader(a, num_consumer=1), FileReader(b, num_consumer=1)
    checked = 0
    for x, y in zip(ra.get_next(), rb.get_next()):
        for key in SCHEMA:
            if not np.array_equal(np.asarray(x[key]), np.asarray(y[key])):
                raise AssertionError(f"row {checked}: field {key} differs")
        checked += 1
        if checked >= limit:
            break
    ra.close()
    rb.close()
    return checked


def race(src, work, seq_length, pairs, tutorial, ours, times):
    """Both conversions of src, timed in turn (tutorial.mindrecord, ours.mindrecord in work) and compared row by
    row; the result fields every conversion benchmark reports. tutorial, ours: (src, dst, seq, times) -> rows."""
    start = time.perf_counter()
    base_rows = tutorial(src, os.path.join(work, "tutorial.mindrecord"), seq_length, times)
    baseline = time.perf_counter() - start
    start = time.perf_counter()
    our_rows = ours(src, os.path.join(work, "ours.mindrecord"), seq_length, times)
    elapsed = time.perf_counter() - start
    checked = compare(os.path.join(work, "tutorial.mindrecord"), os.path.join(work, "ours.mindrecord"))
    assert base_rows == our_rows, (base_rows, our_rows)
    return {
        "pairs": pairs, "seq_length": seq_length, "rows_written": our_rows, "rows_compared": checked,
        "baseline_seconds": round(baseline, 2), "ours_seconds": round(elapsed, 2),
        "baseline_pairs_per_s": round(pairs / baseline, 1), "ours_pairs_per_s": round(pairs / elapsed, 1),
        "speedup": round(baseline / elapsed, 2),
        "ours_tokenize_seconds": round(times.get("ours_tokenize", 0), 2),
        "ours_write_seconds": round(times.get("ours_write", 0), 2),
        "ours_write_share": round(times.get("ours_write", 0) / elapsed, 3),
        "baseline_breakdown_seconds": {k: round(v, 2) for k, v in times.items() if k.startswith("baseline")},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=10, help="copies of the 4,049-pair train set (10 -> 40,490)")
    parser.add_argument("--seq_length", type=int, default=1024)
    args = parser.parse_args()
    require_inputs()
    import mindrlhf.training.registry  # noqa: F401  (imports MindSpore/MindFormers before any timing)

    work = tempfile.mkdtemp(prefix="bench_convert_")
    try:
        src = os.path.join(work, "pairs.jsonl")
        pairs = make_input(src, args.copies)
        times = {}
        result = race(src, work, args.seq_length, pairs, tutorial_convert, ours_convert, times)
        compact_times = {}
        start = time.perf_counter()
        ours_convert(src, os.path.join(work, "compact.mindrecord"), args.seq_length, compact_times, "compact")
        compact = time.perf_counter() - start
        sizes = {name: os.path.getsize(os.path.join(work, f"{name}.mindrecord"))
                 for name in ("tutorial", "ours", "compact")}
        baseline = result["baseline_seconds"]
        result.update({
            "compact_seconds": round(compact, 2), "compact_speedup": round(baseline / compact, 2),
            "file_mb": {k: round(v / 2 ** 20, 1) for k, v in sizes.items()},
            "compact_size_ratio": round(sizes["ours"] / sizes["compact"], 1),
        })
        print(f"conversion speedup {result['speedup']}x ({result['ours_pairs_per_s']} vs "
              f"{result['baseline_pairs_per_s']} pairs/s); our writer share {result['ours_write_share']:.0%}; "
              f"compact layout {result['compact_speedup']}x, {result['compact_size_ratio']}x smaller")
        save("convert", result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
