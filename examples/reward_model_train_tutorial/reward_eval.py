"""Pairwise accuracy of reward-model checkpoints on the whole test set (the tutorial's reward_eval.py).

    python reward_eval.py --config run_llama_2_7b_rm.yaml --distributed_ckpt_path output/checkpoint \
        --load_all_ckpt True --eval_dataset data/jsonl/test.jsonl --tokenizer /path/to/tokenizer.model
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from mindrlhf.cli import add_format_arg, add_scoring_args, main_guard, str2bool  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run YAML used for training")
    parser.add_argument("--distributed_ckpt_path", required=True,
                        help="checkpoint root holding rank_N/, a rank_N directory, or one .ckpt file")
    parser.add_argument("--load_all_ckpt", default=False, type=str2bool, nargs="?", const=True,
                        help="True: every checkpoint in order with a summary table; False: the newest only")
    parser.add_argument("--eval_dataset", default=None,
                        help="MindRecord file/dir, or a CValues .jsonl (needs --tokenizer); default: the YAML's")
    parser.add_argument("--tokenizer", default=None,
                        help="local tokenizer.model or tokenizer folder, for a .jsonl eval set")
    parser.add_argument("--batch_size", type=int, default=None, help="pairs per forward pass")
    parser.add_argument("--output_file", default=None, help="JSON results (default: <output_dir>/eval_results.json)")
    parser.add_argument("--scores_file", default=None, help="also write per-pair scores as jsonl")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--skip_invalid", action="store_true", help="skip malformed jsonl rows and report them")
    parser.add_argument("--save_stats", action="store_true",
                        help="also write the reward mean/std over the eval set (chosen and rejected) to "
                             "<checkpoint root>/reward_stats.json, for --normalize in reward_infer.py / the server")
    parser.add_argument("--benchmark", default=None, choices=["rewardbench", "rewardbench2"],
                        help="score --eval_dataset as RewardBench (v1 rows: prompt, chosen, rejected, subset, id) or "
                             "RewardBench 2 (prompt, chosen: [..], rejected: [..], subset, id): subsets, sections, "
                             "overall as published (docs/data.md)")
    parser.add_argument("--report_dir", default=None,
                        help="length bias, calibration and figures: report.md, PNGs and TensorBoard events "
                             "(default: <output_file without .json>_report/)")
    add_format_arg(parser)
    add_scoring_args(parser)
    return parser.parse_args(argv)


@main_guard
def main(argv=None):
    args = get_args(argv)
    from mindrlhf.evaluation.run import evaluate

    summary = evaluate(args.config, args.distributed_ckpt_path, load_all=args.load_all_ckpt,
                       eval_dataset=args.eval_dataset, tokenizer=args.tokenizer, output_file=args.output_file,
                       batch_size=args.batch_size, scores_file=args.scores_file, skip_invalid=args.skip_invalid,
                       overwrite=args.overwrite, src_strategy=args.src_strategy, template=args.template,
                       save_stats=args.save_stats, adapter=args.adapter, fmt=args.format,
                       benchmark=args.benchmark, report_dir=args.report_dir)
    print(f"evaluated {summary['pairs']} pairs; results: {summary['output_file']}; report: {summary['report']}")


if __name__ == "__main__":
    main()
