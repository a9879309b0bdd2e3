"""What every CLI shares: boolean flags that mean what they say, and one-line errors with exit code 2."""
import argparse
import functools
import sys

from mindrlhf.errors import MindRLHFError


def str2bool(value) -> bool:
    """'True'/'False' (and yes/no/1/0) as a real boolean: the tutorial passes `--load_all_ckpt True`."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got '{value}'")


def add_run_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The trained run that reward_infer.py, reward_server.py and export_hf.py read: YAML, checkpoint, tokenizer."""
    parser.add_argument("--config", required=True, help="the run YAML used for training")
    parser.add_argument("--distributed_ckpt_path", required=True,
                        help="checkpoint root holding rank_N/, a rank_N directory, or one .ckpt (newest is used)")
    parser.add_argument("--tokenizer", required=True,
                        help="local tokenizer.model, tokenizer.json, or a directory holding one")
    return parser


def add_scoring_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The checkpoint-reading flags reward_eval.py and reward_infer.py share."""
    parser.add_argument("--src_strategy", default=None,
                        help="strategy file (or folder) of a model-parallel run whose checkpoints are slices "
                             "(default: <output_dir>/strategy/ of that run, when it is there)")
    parser.add_argument("--template", default=None,
                        help="default: the template recorded beside the checkpoints by training (else the "
                             "tutorial's); given, it must render as the recorded one (tutorial, chat, or a file)")
    parser.add_argument("--use_parallel", default=False, type=str2bool, help="accepted for tutorial compatibility")
    add_adapter_arg(parser)
    return parser


def add_adapter_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--adapter", default=None,
                        help="a LoRA adapter (.safetensors, scripts/lora_adapter.py or <output_dir>/adapter/); "
                             "--distributed_ckpt_path then names the base weights file it was trained on. The "
                             "template and reward_stats.json are read beside the adapter")
    return parser


def add_format_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--format: the preference layout of the rows read (mindrlhf.data.formats)."""
    from mindrlhf.data.formats import FORMATS

    parser.add_argument("--format", default=None, choices=FORMATS,
                        help="the rows' preference layout (docs/data.md); default: read from the first row's columns")
    return parser


def main_guard(func):
    """Run a CLI main; project errors become 'error: ...' on stderr and exit code 2, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MindRLHFError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
