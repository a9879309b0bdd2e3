"""Convert CValues-Comparison jsonl into the reward model's 7-field MindRecord (the tutorial's script).

    python cvalues_comparison.py --model /path/to/llama2/tokenizer.model --src_file data/jsonl/train.jsonl \
        --dst_file data/mindrecord/train_4096.mindrecord --seq_length 4096 --pad_token_id 2
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from mindrlhf.cli import add_format_arg, main_guard  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a local SentencePiece tokenizer.model, a Hugging Face tokenizer.json, or a directory "
                             "holding one (nothing is downloaded)")
    parser.add_argument("--template", default="tutorial",
                        help="tutorial (default, the tutorial's prompt), chat (the tokenizer folder's own chat "
                             "template, user + assistant turn), or a template file (.jinja: a chat template; else "
                             "a format string with {instruction} and {response}); recorded in <dst>.stats.json")
    parser.add_argument("--overlong", default="truncate", choices=["truncate", "drop", "error"],
                        help="pairs longer than --seq_length after the template: truncate (the tutorial's way), "
                             "drop (counted and reported by line), or error (stop, naming file and line)")
    parser.add_argument("--padding_side", default="right", choices=["right"],
                        help="padding side; loss_mask and end_ind are defined for right padding only")
    parser.add_argument("--src_file", required=True,
                        help="preference rows: .jsonl, .json, .parquet, or a datasets save_to_disk folder")
    add_format_arg(parser)
    parser.add_argument("--dst_file", required=True, help="output .mindrecord path (a .db index is written beside it)")
    parser.add_argument("--seq_length", type=int, default=1024, help="tokens per sequence after truncation/padding")
    parser.add_argument("--pad_token_id", type=int, default=None,
                        help="padding id; default 2 for a tokenizer.model (Llama 2 has none; the tutorial uses 2), "
                             "the pad_token (else eos_token) of a Hugging Face tokenizer")
    parser.add_argument("--layout", default="padded", choices=["padded", "compact"],
                        help="padded: the tutorial's fixed-length rows; compact: unpadded rows (files shrink by the "
                             "padding share), padded per batch by RewardModelDataset")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="pairs per device per step in training: the suggested bucket_boundaries fit batches "
                             "of this size")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="skip malformed rows and report them, instead of stopping at the first one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dst_file")
    parser.add_argument("--num_threads", type=int, default=-1, help="tokenizer threads (default: all cores)")
    return parser.parse_args(argv)


@main_guard
def main(argv=None):
    args = get_args(argv)
    from mindrlhf.data.convert import convert_file
    from mindrlhf.data.templates import resolve_template
    from mindrlhf.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model, num_threads=args.num_threads)
    result = convert_file(args.src_file, tokenizer, args.dst_file, args.seq_length, args.pad_token_id,
                          overwrite=args.overwrite, skip_invalid=args.skip_invalid, layout=args.layout,
                          template=resolve_template(args.template, tokenizer), overlong=args.overlong,
                          batch_pairs=args.batch_size, fmt=args.format)
    print(json.dumps(result["stats"], ensure_ascii=False))
    skipped = result["skipped"]
    print(f"skipped: {skipped['total']}")
    for reason, detail in skipped["by_reason"].items():
        print(f"  {detail['count']} x {reason} (first lines: {detail['first_lines']})")
    buckets = result["buckets"]
    if buckets and buckets["bucket_boundaries"]:
        print(f"suggested train_dataset.bucket_boundaries for {buckets['batch_pairs']} pairs a batch: "
              f"{buckets['bucket_boundaries']} ({buckets['tokens_vs_fixed']:.0%} of the tokens of padding every pair "
              f"to {args.seq_length}, {buckets['tokens_vs_longest']:.2f}x those of padding each batch to its longest)")
    elif buckets:
        print(f"bucket_boundaries: [] fits: for {buckets['batch_pairs']} pairs a batch, buckets would still pad to "
              f"{buckets['tokens_vs_fixed']:.0%} of the tokens of padding every pair to {args.seq_length}")
    print(f"Transformation finished! Output file refer: {args.dst_file} ({result['rows']} pairs)")


if __name__ == "__main__":
    main()
