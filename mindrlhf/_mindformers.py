"""Import MindFormers once, quietly: its import-time warnings go to stderr, since stdout carries results (JSON,
tables). Every mindrlhf module that uses MindFormers imports this first."""
import contextlib
import os
import sys

os.environ.setdefault("GLOG_v", "3")

with contextlib.redirect_stdout(sys.stderr):
    import mindformers  # noqa: F401
