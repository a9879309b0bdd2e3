"""Resume continues bit for bit: after a clean stop, after SIGKILL, after SIGTERM, and past a corrupt checkpoint;
the stop file and the save time limit."""
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

import mindspore as ms

from conftest import EXAMPLES, TINY_CONFIG, cli_env, run_cli, run_main

pytestmark = pytest.mark.slow
TRAIN = EXAMPLES / "reward_train.py"


@pytest.fixture(scope="module")
def dynamic_scale_config(tmp_path_factory):
    """The tiny config with a dynamic loss scale, so the CPU overflow check is exercised for real."""
    raw = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    raw["runner_wrapper"]["scale_sense"] = {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1024,
                                            "scale_factor": 2, "scale_window": 1000}
    raw["model"]["model_config"]["num_layers"] = 1
    path = tmp_path_factory.mktemp("cfg") / "tiny_dynamic.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def train(config, data, out, *extra, check=True):
    return run_cli(TRAIN, "--config", config, "--train_dataset", data, "--output_dir", out,
                   "--batch_size", 4, *extra, check=check)


def newest(out):
    files = sorted((out / "checkpoint" / "rank_0").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return files[-1]


def weights(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


# Counters of the process that wrote the file (this run's own step count), not training state.
RUN_BOOKKEEPING = {"current_iterator_step", "last_overflow_iterator_step"}


def assert_same(a, b):
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    assert any(k.startswith("adam_m.") for k in wa)  # optimizer state is part of the comparison
    assert {"global_step", "loss_scale", "scale_sense"} <= set(wa)
    for name in sorted(set(wa) - RUN_BOOKKEEPING):
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


@pytest.fixture(scope="module")
def uninterrupted(dynamic_scale_config, test_mindrecord, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(dynamic_scale_config, test_mindrecord, out, "--stop_step", 16, "--save_steps", 8)
    return newest(out)


@pytest.fixture(scope="module")
def stopped_at_8(dynamic_scale_config, test_mindrecord, tmp_path_factory):
    """A run stopped cleanly at step 8 (--stop_step 8, a checkpoint at 8): the start of both clean-stop resumes
    below, each resuming its own copy."""
    out = tmp_path_factory.mktemp("stopped") / "out"
    train(dynamic_scale_config, test_mindrecord, out, "--stop_step", 8, "--save_steps", 8)
    return out


def copy_of(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run, out)  # file times kept: the newest checkpoint stays the newest
    assert int(weights(newest(out))["global_step"].reshape(-1)[0]) == 8
    return out


def test_resume_after_a_clean_stop_is_bit_exact(dynamic_scale_config, test_mindrecord, tmp_path, uninterrupted,
                                                stopped_at_8):
    out = copy_of(stopped_at_8, tmp_path)
    train(dynamic_scale_config, test_mindrecord, out, "--stop_step", 16, "--save_steps", 8,
          "--resume", "True", "--load_checkpoint", out / "checkpoint")
    assert int(weights(newest(out))["global_step"].reshape(-1)[0]) == 16
    assert_same(newest(out), uninterrupted)


# reward_train.py run as a user runs it, with one change: the --stop_step callback, instead of stopping, writes
# a file and then blocks until the process is killed. So the kill lands at a known step, however fast the machine.
HALT_AT_STOP_STEP = """import pathlib, runpy, sys, threading
from mindspore.train.callback import Callback
from mindrlhf.training import trainer
mark, sys.argv = pathlib.Path(sys.argv[1]), sys.argv[2:]  # python -c CODE MARK reward_train.py ARGS...

def halt_at(step):
    class HaltAtStep(Callback):
        def on_train_step_end(self, run_context):
            optimizer = run_context.original_args().train_network.optimizer
            if int(optimizer.global_step.asnumpy().reshape(-1)[0]) >= step:
                mark.write_text(str(step))
                threading.Event().wait()  # until SIGKILL
    return HaltAtStep()

trainer.stop_at = halt_at
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_then_resume_matches(dynamic_scale_config, test_mindrecord, tmp_path, uninterrupted):
    """SIGKILL at step 10, between the checkpoints of steps 8 and 12 (steps 9-10 are lost), then resume."""
    out, mark = tmp_path / "out", tmp_path / "halted"
    cmd = [sys.executable, "-c", HALT_AT_STOP_STEP, str(mark), str(TRAIN), "--config", str(dynamic_scale_config),
           "--train_dataset", str(test_mindrecord), "--output_dir", str(out), "--batch_size", "4",
           "--save_steps", "4", "--stop_step", "10"]
    log = tmp_path / "killed_run.log"
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600  # only a hang guard
        while not mark.exists():
            assert proc.poll() is None, f"training ended before step 10: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "training never reached step 10"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(int(weights(p)["global_step"].reshape(-1)[0])
                  for p in (out / "checkpoint" / "rank_0").glob("*.ckpt")) == [4, 8]
    train(dynamic_scale_config, test_mindrecord, out, "--stop_step", 16, "--save_steps", 4, "--resume")
    assert_same(newest(out), uninterrupted)


def test_corrupt_newest_checkpoint_is_skipped(dynamic_scale_config, test_mindrecord, tmp_path, uninterrupted):
    out = tmp_path / "out"
    train(dynamic_scale_config, test_mindrecord, out, "--stop_step", 12, "--save_steps", 4)
    bad = newest(out)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a crash mid-write; rewriting keeps it the newest by mtime
    proc = train(dynamic_scale_config, test_mindrecord, out, "--stop_step", 16, "--save_steps", 4, "--resume")
    assert f"skipping corrupt or truncated checkpoint {bad}" in proc.stderr
    # The resumed run's files are newer than the rewritten one (a future mtime on it once made this race the clock).
    final = newest(out)
    assert int(weights(final)["global_step"].reshape(-1)[0]) == 16
    assert_same(final, uninterrupted)


def test_resume_from_a_single_file_is_refused(dynamic_scale_config, test_mindrecord, tmp_path, uninterrupted):
    # refused in prepare_config, before any context is built: the same main() in this process (the exit-2 path of
    # reward_train.py runs for real in test_preflight)
    proc = run_main(TRAIN, "--config", dynamic_scale_config, "--train_dataset", test_mindrecord, "--output_dir",
                    tmp_path / "x", "--batch_size", 4, "--resume", "--load_checkpoint", uninterrupted, check=False)
    assert proc.returncode == 2
    assert "not a single .ckpt file" in proc.stderr and "Traceback" not in proc.stderr


def test_the_tutorials_yaml_only_resume_continues_the_run(dynamic_scale_config, test_mindrecord, tmp_path,
                                                           uninterrupted, stopped_at_8):
    """The tutorial resumes by pointing load_checkpoint in the YAML at the checkpoint directory and running the
    same command again (no --resume flag)."""
    out = copy_of(stopped_at_8, tmp_path)
    raw = yaml.safe_load(dynamic_scale_config.read_text(encoding="utf-8"))
    raw["load_checkpoint"] = str(out / "checkpoint")
    resumed_config = tmp_path / "resume.yaml"
    resumed_config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    train(resumed_config, test_mindrecord, out, "--stop_step", 16, "--save_steps", 8)
    assert int(weights(newest(out))["global_step"].reshape(-1)[0]) == 16
    assert_same(newest(out), uninterrupted)


def steps_saved(out):
    return sorted(int(weights(p)["global_step"].reshape(-1)[0]) for p in (out / "checkpoint" / "rank_0").glob("*.ckpt"))


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_bit_exactly(
        dynamic_scale_config, test_mindrecord, tmp_path, uninterrupted, monkeypatch):
    """SIGTERM at the end of step 5 (the test hook sends it) and again while step 5's checkpoint is written: the
    run saves step 5 whole, exits 75 and logs the resume command, which continues to step 16 bit-exactly."""
    out = tmp_path / "out"
    monkeypatch.setenv("MINDRLHF_TEST_SIGNALS", "TERM@5,TERM@save")
    proc = train(dynamic_scale_config, test_mindrecord, out, "--stop_step", 16, "--save_steps", 4, check=False)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "SIGTERM received while saving the stop checkpoint of step 5: finishing the save" in proc.stderr
    assert steps_saved(out) == [4, 5]
    assert not list((out / "checkpoint" / "rank_0").glob("*.tmp"))
    stopped = json.loads((out / "train_summary.json").read_text())["stopped"]
    assert stopped["step"] == 5 and stopped["reason"] == "SIGTERM" and stopped["exit_code"] == 75
    line = next(l for l in proc.stderr.splitlines() if l.startswith("stopped after step 5 (SIGTERM): checkpoint "))
    command = shlex.split(re.search(r"resume with: (.*?)  \(under a launcher", line).group(1))
    assert command[0] == "python" and command[-1] == "--resume"
    monkeypatch.delenv("MINDRLHF_TEST_SIGNALS")
    subprocess.run([sys.executable, *command[1:]], env=cli_env(), check=True, capture_output=True)
    assert steps_saved(out)[-1] == 16
    assert_same(newest(out), uninterrupted)


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(dynamic_scale_config, test_mindrecord, tmp_path, monkeypatch):
    """Ctrl-C at the end of step 5 and again as its checkpoint starts: step 5 is saved whole and the run exits 75.
    (While a graph runs MindSpore's own SIGINT guard takes the signal and passes it on as SIGTERM.)"""
    out = tmp_path / "out"
    monkeypatch.setenv("MINDRLHF_TEST_SIGNALS", "INT@5,INT@save")
    proc = train(dynamic_scale_config, test_mindrecord, out, "--stop_step", 16, "--save_steps", 4, check=False)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert re.search(r"stopped after step 5 \(SIG(INT|TERM)\): checkpoint ", proc.stderr)
    assert steps_saved(out) == [4, 5]
    assert not [p for p in (out / "checkpoint" / "rank_0").iterdir() if p.suffix == ".tmp"]


# reward_train.py as a user runs it, with --stop_step's callback replaced by one that creates the --stop_file at
# that step (a scheduler's hook, at a known step).
TOUCH_STOP_FILE_AT_STOP_STEP = """import pathlib, runpy, sys
from mindspore.train.callback import Callback
from mindrlhf.training import trainer
sys.argv = sys.argv[1:]  # python -c CODE reward_train.py ARGS...
stop_file = pathlib.Path(sys.argv[sys.argv.index("--stop_file") + 1])

def touch_at(step):
    class TouchAtStep(Callback):
        def on_train_step_end(self, run_context):
            optimizer = run_context.original_args().train_network.optimizer
            if int(optimizer.global_step.asnumpy().reshape(-1)[0]) >= step:
                stop_file.touch()
    return TouchAtStep()

trainer.stop_at = touch_at
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_stop_file_stops_and_save_time_limit_skips_a_slow_save(dynamic_scale_config, test_mindrecord, tmp_path):
    """The stop file appears at step 3; with --save_time_limit 0 the save of step 2 already took longer, so the
    run stops without a checkpoint (resume goes back to step 2), exits 75, and names the file to remove."""
    out, stop = tmp_path / "out", tmp_path / "stop"
    cmd = [sys.executable, "-c", TOUCH_STOP_FILE_AT_STOP_STEP, str(TRAIN), "--config", str(dynamic_scale_config),
           "--train_dataset", str(test_mindrecord), "--output_dir", str(out), "--batch_size", "4",
           "--save_steps", "2", "--stop_step", "3", "--stop_file", str(stop), "--save_time_limit", "0"]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert f"stopped after step 3 (stop file {stop}): no checkpoint saved" in proc.stderr
    assert f"resume with: rm {stop} && python " in proc.stderr
    assert steps_saved(out) == [2]
    again = run_main(TRAIN, "--config", dynamic_scale_config, "--train_dataset", test_mindrecord, "--output_dir", out,
                     "--resume", "--stop_file", stop, check=False)
    assert again.returncode == 2 and f"{stop}: the stop file exists already" in again.stderr
