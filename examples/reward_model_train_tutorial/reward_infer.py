"""Reward scores for prompt+response rows (the tutorial's reward_infer.py), with the training template.

    python reward_infer.py --config run_llama_2_7b_rm.yaml --data_file data/jsonl/test.jsonl \
        --tokenizer /path/to/tokenizer.model --distributed_ckpt_path output/checkpoint
Rows: {"prompt", "response"} (one score) or {"prompt", "pos_resp", "neg_resp"} (both scored), or {"query"}: a full
text as an RL loop sends it to reward_server.py, normalised as the server normalises it (BOS/EOS written as text).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from mindrlhf.cli import add_format_arg, add_run_args, add_scoring_args, main_guard  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser)
    parser.add_argument("--data_file", required=True,
                        help="rows to score: .json, .jsonl, .parquet or a datasets folder (prompt + response, "
                             "query, or preference rows of any layout: both sides scored)")
    add_format_arg(parser)
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--output_file", default=None,
                        help="jsonl of {prompt, response, score} (default: <output_dir>/reward_infer_scores.jsonl)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--skip_invalid", action="store_true", help="skip malformed rows and report them")
    parser.add_argument("--normalize", action="store_true",
                        help="score = (raw - mean) / std with <checkpoint root>/reward_stats.json "
                             "(reward_eval.py --save_stats); raw_score keeps the raw reward")
    add_scoring_args(parser)
    return parser.parse_args(argv)


@main_guard
def main(argv=None):
    args = get_args(argv)
    from mindrlhf.evaluation.run import infer

    result = infer(args.config, args.data_file, args.tokenizer, args.distributed_ckpt_path,
                   output_file=args.output_file, batch_size=args.batch_size, skip_invalid=args.skip_invalid,
                   overwrite=args.overwrite, src_strategy=args.src_strategy, template=args.template,
                   normalize=args.normalize, adapter=args.adapter, fmt=args.format)
    print(f"scored {result['scored']} responses with {result['checkpoint']}; scores: {result['output_file']}")


if __name__ == "__main__":
    main()
