"""Model-parallel checkpoint slices (integrated_save: False) -> one whole checkpoint, with the run's strategy file.

    python scripts/merge_checkpoint.py --src_checkpoint output/checkpoint --output_path whole.ckpt \
        [--src_strategy output/strategy] [--overwrite]
--src_checkpoint is the root holding rank_N/ (its newest checkpoint is merged) or one file in rank_0/; the
strategy defaults to <output_dir>/strategy/ beside <output_dir>/checkpoint/. reward_eval.py and
reward_infer.py merge on load by themselves; this writes the merged file once, e.g. to share it.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from mindrlhf.cli import main_guard  # noqa: E402


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src_checkpoint", required=True, help="checkpoint root holding rank_N/, or a rank_0 file")
    parser.add_argument("--src_strategy", default=None, help="strategy file or folder (default: the run's own)")
    parser.add_argument("--output_path", required=True, help="the whole .ckpt to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    from mindrlhf.errors import ConfigError
    from mindrlhf.evaluation.scorer import list_checkpoints
    from mindrlhf.io import check_new_output
    from mindrlhf.checkpoints.slices import STRATEGY_HINT, find_strategy, merge_slices

    check_new_output(args.output_path, args.overwrite)
    checkpoint = list_checkpoints(args.src_checkpoint)[-1]
    strategy = find_strategy(checkpoint, args.src_strategy)
    if strategy is None:
        raise ConfigError(f"{checkpoint}: no strategy file found; {STRATEGY_HINT}")
    merge_slices(checkpoint, strategy, args.output_path)
    print(json.dumps({"checkpoint": checkpoint, "strategy": strategy, "output_path": args.output_path}))


if __name__ == "__main__":
    main()
