"""Conversion throughput with a Hugging Face tokenizer folder (the `tokenizers` path), beside bench_convert.py's
SentencePiece one: the tutorial's algorithm written with transformers vs ours, same input, same run, padded layout.

The tokenizer is a Qwen2.5-style byte-level BPE folder trained here on the train split
(mindrlhf.tools.hf_tokenizer), and pairs are rendered with its chat template. Baseline: the tutorial's
cvalues_comparison.py with transformers' fast tokenizer in place of LlamaTokenizer: apply_chat_template and five
tokenizer calls per pair, one FileWriter.write_raw_data per pair. Ours: `--template chat` through
mindrlhf.data.convert: batched, multi-threaded `tokenizers` encoding overlapped with batched writes. Both outputs
are compared row by row. The floor is the MindRecord writer: ours_write_share says how close the run is to it.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

import bench_convert as sentencepiece_bench
from bench_convert import SCHEMA, make_input, tutorial_sample
from common import TRAIN_JSONL, require_inputs, save, timed


def messages(prompt, response):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def tutorial_convert(src, dst, seq, times, folder):
    """The upstream algorithm step for step, with transformers' tokenizer and its chat template."""
    from mindspore.mindrecord import FileWriter
    from transformers import AutoTokenizer

    with timed(times, "baseline_load_tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    pad = tokenizer.pad_token_id
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
                texts = [tokenizer.apply_chat_template(messages(prompt, r), tokenize=False) for r in (chosen, reject)]
                c, r = (tokenizer(t, truncation=True, max_length=seq, padding="max_length", add_special_tokens=False)
                        for t in texts)
            with timed(times, "baseline_build"):
                sample = tutorial_sample(c, r, pad, seq)
                if sample is None:
                    continue
            with timed(times, "baseline_write"):
                writer.write_raw_data([sample])
            count += 1
    with timed(times, "baseline_write"):
        writer.commit()
    return count


def ours_convert(src, dst, seq, times, folder):
    """Ours, as bench_convert.py times it, with the tokenizer folder, its own pad id and its chat template."""
    return sentencepiece_bench.ours_convert(src, dst, seq, times, tokenizer_path=folder, pad_token_id=None,
                                            template="chat")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=10, help="copies of the 4,049-pair train set (10 -> 40,490)")
    parser.add_argument("--seq_length", type=int, default=1024)
    args = parser.parse_args()
    require_inputs()
    import mindrlhf.training.registry  # noqa: F401  (imports MindSpore/MindFormers before any timing)
    from mindrlhf.tools.hf_tokenizer import corpus, train_hf_tokenizer

    work = tempfile.mkdtemp(prefix="bench_convert_tokenizers_")
    try:
        folder = train_hf_tokenizer(corpus(str(TRAIN_JSONL)), os.path.join(work, "tokenizer"), "qwen2")
        src = os.path.join(work, "pairs.jsonl")
        pairs = make_input(src, args.copies)
        result = {"tokenizer": "Qwen2.5-style byte-level BPE folder (tokenizer.json), chat template"}
        result.update(sentencepiece_bench.race(
            src, work, args.seq_length, pairs, lambda *a: tutorial_convert(*a, folder),
            lambda *a: ours_convert(*a, folder), {}))
        print(f"tokenizers-path conversion speedup {result['speedup']}x ({result['ours_pairs_per_s']} vs "
              f"{result['baseline_pairs_per_s']} pairs/s); our writer share {result['ours_write_share']:.0%}")
        save("convert_tokenizers", result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
