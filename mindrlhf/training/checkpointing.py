"""CheckpointMonitor as training uses it: a save is whole before anything is deleted, and a failed save stops
every rank with one clear error.

MindFormers' CheckpointMonitor removes the oldest checkpoint before writing the new one, so with
keep_checkpoint_max 1 a full disk leaves none. Here the new file is written (MindSpore writes <name>.tmp and
renames it), flushed to disk, and only then are the oldest beyond keep_checkpoint_max removed. A save that fails
(ENOSPC, EIO) removes its .tmp file and raises OutputWriteError naming the folder, its free space and the size
needed; under a launcher every rank raises the first failing rank's error (the ranks agree after each save).
Importing this module makes the YAML's `CheckpointMonitor` this class (a subclass: MindFormers' own handling of
that type name, its directory and batch-size arguments, stays as it is).
"""
import os
import time

import mindrlhf._mindformers  # noqa: F401  (quiet import first)
from mindformers.core.callback.callback import CheckpointMonitor
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindrlhf import distributed
from mindrlhf.io import disk_fault_error, is_disk_fault
from mindrlhf.training import preemption


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SafeCheckpointMonitor(CheckpointMonitor):
    """CheckpointMonitor, rotating after a whole save; the stop checkpoint of preemption is its end() save."""

    collective = False  # set by train(): every rank checks the outcome of each save together

    def end(self, run_context):
        state = preemption.current()
        if state is not None and state.stop_step is not None and state.skip_save:
            return
        super().end(run_context)

    def save_checkpoint(self, cb_params):
        state = preemption.current()
        stopping = state is not None and state.stop_step is not None
        step_in_epoch = int((cb_params.cur_step_num - 1) % cb_params.batch_num + 1)
        target = os.path.join(self._directory, f"{self._prefix}-{cb_params.cur_epoch_num}_{step_in_epoch}."
                                               f"{self._config.format}")
        keep = self._config._keep_checkpoint_max  # pylint: disable=protected-access
        self._config._keep_checkpoint_max = 0  # pylint: disable=protected-access  (rotated below, once whole)
        failure, start = None, time.perf_counter()
        try:
            if stopping:
                state.saving = True
                preemption.send_test_signal("save", distributed.rank_and_size()[0])
            super().save_checkpoint(cb_params)
            _fsync(target)
            _fsync(self._directory)
        except BaseException as err:  # pylint: disable=broad-except  (reported on every rank below)
            failure = err
        finally:
            self._config._keep_checkpoint_max = keep  # pylint: disable=protected-access
            if stopping:
                state.saving = False
        if failure is not None:
            tmp = os.path.splitext(target)[0] + ".tmp"
            if os.path.exists(tmp):
                os.remove(tmp)
            if not isinstance(failure, Exception):
                raise failure  # KeyboardInterrupt, SystemExit: the save is abandoned, nothing partial is left
            if is_disk_fault(failure):
                failure = disk_fault_error(failure, target, self._needed_bytes(cb_params))
        if self.collective:
            failure = distributed.first_error(failure)
        if failure is not None:
            raise failure
        seconds = time.perf_counter() - start
        if state is not None:
            state.last_save_seconds = seconds
            if stopping:
                state.saved_file = target
        self._rotate(keep)

    def _rotate(self, keep: int):
        self._manager.update_ckpoint_filelist(self._directory, self._prefix)
        while keep and 0 < keep < self._manager.ckpoint_num:
            self._manager.remove_oldest_ckpoint_file()

    def _needed_bytes(self, cb_params) -> int:
        """What one checkpoint of this rank takes: its newest file, else the bytes of the network's parameters."""
        self._manager.update_ckpoint_filelist(self._directory, self._prefix)
        if self._manager.ckpoint_filelist:
            return max(os.path.getsize(f) for f in self._manager.ckpoint_filelist)
        return sum(p.nbytes for p in cb_params.train_network.get_parameters())


MindFormerRegister.register_cls(SafeCheckpointMonitor, module_type=MindFormerModuleType.CALLBACK,
                                alias="CheckpointMonitor")
