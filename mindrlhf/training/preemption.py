"""Stopping a run at a step boundary with a whole checkpoint: SIGTERM, SIGINT or a stop file (a preempting
scheduler), then exit PREEMPTED_EXIT_CODE; `--resume` continues bit-exactly.

A signal only sets a flag; the step in progress finishes. At every step end each rank adds its flag to one
AllGather of three numbers (flag, global step, last save seconds), so all ranks stop after the same step even when
only one was signalled; CheckpointMonitor's end-of-training save (checkpointing.SafeCheckpointMonitor) then writes
that step's checkpoint, optimizer state, data position and loss scale included, as a regular one.
A second signal during that save is logged and ignored (the save is a rename of a whole file, so the scheduler's
SIGKILL after its grace period leaves the previous checkpoint the newest whole one). While a graph runs,
MindSpore's own SIGINT guard takes a Ctrl-C and passes it on as SIGTERM: the same stop.

MINDRLHF_TEST_SIGNALS (tests only) sends signals to the process itself at known points, so tests stop at a known
step without timing: comma-separated SIG@WHEN[/rankN], WHEN a global step (sent at that step's end, before the
check) or `save` (at the start of the stop checkpoint's save), e.g. `TERM@5/rank1,TERM@save`.
"""
import os
import shlex
import signal
import sys
import threading
import time
from typing import List, Optional

import numpy as np

from mindrlhf import distributed

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a whole checkpoint; run again with --resume
TEST_SIGNALS = "MINDRLHF_TEST_SIGNALS"


class StopState:
    """One per process (signal handlers are per process): why and where the run stops, and whether the stop
    checkpoint is being written."""

    def __init__(self, stop_file: Optional[str] = None, save_time_limit: Optional[float] = None, log=print):
        self.stop_file = os.path.abspath(stop_file) if stop_file else None
        self.save_time_limit = save_time_limit
        self.log = log
        self.reason: Optional[str] = None      # set by a signal or the stop file, on this rank
        self.stop_step: Optional[int] = None   # the step all ranks agreed to stop after
        self.saving = False                     # the stop checkpoint's save is running
        self.skip_save = False                  # the save would take longer than save_time_limit
        self.last_save_seconds = 0.0            # the duration of this process's last checkpoint save
        self.saved_file: Optional[str] = None
        self.check_seconds: List[float] = []    # the cost of each step-end check
        self._previous = {}

    def install(self):
        """Handle SIGTERM and SIGINT, except one the process was started ignoring (a background job's SIGINT)
        and off the main thread, where Python cannot set handlers (the stop file works everywhere)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.saving:
            self.log(f"{name} received while saving the stop checkpoint of step {self.stop_step}: finishing the "
                     "save (a SIGKILL now leaves the previous checkpoint the newest whole one)")
            return
        if self.reason is None:
            self.reason = name
            self.log(f"{name} received: stopping after the current step with a checkpoint")

    def check_ms(self) -> float:
        """The median cost of the step-end check in milliseconds, past the first (which sets the collective up)."""
        later = self.check_seconds[1:] or self.check_seconds
        return 1000 * float(np.median(later)) if later else 0.0

    def report(self) -> dict:
        """The summary entry of a stopped run; its `message` (for the log) names the step and how to resume."""
        command = resume_command()
        if self.stop_file:
            command = f"rm {shlex.quote(self.stop_file)} && {command}"
        if self.skip_save:
            saved = "no checkpoint saved (over --save_time_limit); resume goes back to the newest whole one"
        else:
            saved = f"checkpoint {self.saved_file or 'of that step saved'}"
        message = (f"stopped after step {self.stop_step} ({self.reason}): {saved}; exit code {PREEMPTED_EXIT_CODE}; "
                   f"resume with: {command}  (under a launcher: the same launch with --resume)")
        return {"step": self.stop_step, "reason": self.reason, "checkpoint": self.saved_file,
                "saved": not self.skip_save, "resume_command": command, "exit_code": PREEMPTED_EXIT_CODE,
                "check_ms_median": self.check_ms(), "message": message}

    def local_request(self) -> bool:
        if self.reason is None and self.stop_file and os.path.exists(self.stop_file):
            self.reason = f"stop file {self.stop_file}"
            self.log(f"{self.stop_file} exists: stopping after the current step with a checkpoint")
        return self.reason is not None


_STATE: Optional[StopState] = None


def current() -> Optional[StopState]:
    """The running training's stop state (None outside train())."""
    return _STATE


def test_signals(rank: int) -> dict:
    """{when: signal} of MINDRLHF_TEST_SIGNALS for this rank (see the module doc)."""
    plan = {}
    for item in filter(None, (part.strip() for part in os.environ.get(TEST_SIGNALS, "").split(","))):
        what, _, where = item.partition("@")
        when, _, only = where.partition("/")
        if only and only != f"rank{rank}":
            continue
        plan[when] = getattr(signal, f"SIG{what.upper()}")
    return plan


def send_test_signal(when: str, rank: int):
    sig = test_signals(rank).get(when)
    if sig is not None:
        os.kill(os.getpid(), sig)


def stop_callback(state: StopState, collective: bool, rank: int):
    """The step-end check: every rank joins one AllGather (under a launcher) of (flag, global step, last save
    seconds); any flag stops all ranks after this step."""
    from mindspore.train.callback import Callback

    class StopOnRequest(Callback):
        def on_train_step_end(self, run_context):
            optimizer = run_context.original_args().train_network.optimizer
            step = int(optimizer.global_step.asnumpy().reshape(-1)[0])
            send_test_signal(str(step), rank)
            start = time.perf_counter()
            mine = np.array([[int(state.local_request()), step, int(state.last_save_seconds * 1000)]], np.int64)
            rows = distributed.all_gather(mine) if collective else mine
            state.check_seconds.append(time.perf_counter() - start)
            if not rows[:, 0].any():
                return
            if len(set(rows[:, 1].tolist())) != 1:
                raise RuntimeError(f"ranks are at different steps {rows[:, 1].tolist()} at a stop request")
            state.stop_step = step
            if state.reason is None:
                state.reason = f"rank {int(np.flatnonzero(rows[:, 0])[0])}'s request"
            slowest = rows[:, 2].max() / 1000
            if state.save_time_limit is not None and slowest > state.save_time_limit:
                state.skip_save = True
                state.log(f"stopping after step {step} WITHOUT a checkpoint: the last save took {slowest:.1f} s, "
                          f"over --save_time_limit {state.save_time_limit:g} s")
            else:
                state.log(f"stopping after step {step} ({state.reason}): saving its checkpoint")
            run_context.request_stop()

    return StopOnRequest()


def resume_command(argv=None) -> str:
    """This process's command line with --resume, the way to continue the run."""
    argv = list(sys.argv if argv is None else argv)
    if "--resume" not in argv and not any(a.startswith("--resume=") for a in argv):
        argv.append("--resume")
    return shlex.join(["python", *argv])


def begin(stop_file: Optional[str], save_time_limit: Optional[float], log) -> StopState:
    """Install the handlers for one train() call (end() removes them)."""
    global _STATE  # pylint: disable=global-statement
    _STATE = StopState(stop_file, save_time_limit, log)
    _STATE.install()
    return _STATE


def end():
    global _STATE  # pylint: disable=global-statement
    if _STATE is not None:
        _STATE.uninstall()
    _STATE = None
