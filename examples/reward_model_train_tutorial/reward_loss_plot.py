"""Turn a training log into TensorBoard event files and a PNG (the tutorial's reward_loss_plot.py).

    python reward_loss_plot.py --log_file output/log/rank_0/info.log --output_file_dir loss_dir
    tensorboard --logdir=loss_dir --port=6006
Live: --parse_mode real-time follows the log while training runs (Ctrl-C or --idle_timeout ends it).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from mindrlhf.cli import main_guard  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log_file", required=True, help="training log, e.g. output/log/rank_0/info.log")
    parser.add_argument("--output_file_dir", default="loss_dir", help="where event files and loss.png go")
    parser.add_argument("--sink_size", type=int, default=1,
                        help="steps per loss line, only for old logs without step numbers")
    parser.add_argument("--parse_mode", default="one-time", choices=["one-time", "real-time"])
    parser.add_argument("--idle_timeout", type=float, default=600.0,
                        help="real-time: stop after this many seconds without a new line")
    parser.add_argument("--no_png", action="store_true", help="skip the PNG")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace event files and loss.png already in output_file_dir")
    return parser.parse_args(argv)


@main_guard
def main(argv=None):
    args = get_args(argv)
    from mindrlhf.tools.loss_plot import follow, plot_once, prepare_output_dir

    prepare_output_dir(args.output_file_dir, args.overwrite)
    if args.parse_mode == "one-time":
        result = plot_once(args.log_file, args.output_file_dir, args.sink_size, png=not args.no_png)
    else:
        result = follow(args.log_file, args.output_file_dir, args.sink_size, args.idle_timeout, png=not args.no_png,
                        log=lambda message: print(message, flush=True))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
