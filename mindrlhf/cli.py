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
