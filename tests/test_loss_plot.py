"""reward_loss_plot.py: loss lines -> TensorBoard events that read back exactly, live following, a real PNG."""
import json
import signal
import subprocess
import sys
import threading

import pytest
from PIL import Image

from mindrlhf.tools.loss_log import parse_line
from mindrlhf.tools.loss_plot import follow, read_events

from conftest import EXAMPLES, SEEN_PAIRS, cli_env, run_cli

PLOT = EXAMPLES / "reward_loss_plot.py"


def mf_line(step, steps, loss, epoch=1, epochs=1, lr=1e-3, norm=2.5):
    return (f"2026-11-25 20:27:51,009 - mindformers[callback.py:747] - INFO - {{ Epoch:[{epoch:3d}/{epochs:3d}], "
            f"step:[{step:5d}/{steps:5d}], loss:[{loss}/0.5], per_step_time: 112ms, lr: {lr}, overflow cond: False, "
            f"loss_scale: 1.0, global_norm: [{norm}], train_throughput_per_npu: 0.019T\n")


@pytest.mark.parametrize("line, step, loss", [
    (mf_line(7, 16, "0.515193"), 7, 0.515193),
    (mf_line(3, 16, "2", epoch=2, epochs=3), 19, 2.0),
    (mf_line(1, 5, "-1.5e-03"), 1, -0.0015),
    (mf_line(1, 5, "7.25E+2"), 1, 725.0),
    ("epoch: 1 step: 20, loss: 0.744\n", 20, 0.744),
    ("epoch: 2 step: 5, loss is 1e-2\n", 5, 0.01),
])
def test_parse_line_formats(line, step, loss):
    point = parse_line(line, ordinal=1)
    assert point.step == step and point.loss == pytest.approx(loss)


TUTORIAL_LINE = ("print_output_info: Epoch:[  1/  2], step:[    2/29134], loss: 0.744, time:68580.279 ms, "
                 "lr:8e-08, overflow cond: False, loss_scale: 128.0")


def tutorial_line(epoch, step, loss, overflow=False, scale=128.0):
    """The tutorial's own log line (its section on loss curves), with other numbers."""
    return (TUTORIAL_LINE.replace("[  1/  2]", f"[{epoch:3d}/  2]").replace("[    2/29134]", f"[{step:5d}/29134]")
            .replace("0.744", loss).replace("False", str(overflow)).replace("128.0", str(scale)) + "\n")


def test_the_tutorials_line_at_its_epoch_aware_step(tmp_path):
    point = parse_line(TUTORIAL_LINE, ordinal=1)
    assert (point.step, point.epoch, point.loss, point.lr) == (2, 1, 0.744, 8e-08)
    assert point.loss_scale == 128.0 and point.overflow is False
    # Two epochs through the CLI: the first step of epoch 2 lands at 29,135, not at the line's ordinal.
    log = tmp_path / "info.log"
    log.write_text(tutorial_line(1, 1, "0.75") + TUTORIAL_LINE + "\n" + tutorial_line(1, 29134, "0.5") +
                   tutorial_line(2, 1, "0.4", overflow=True, scale=64.0) + tutorial_line(2, 2, "0.3"),
                   encoding="utf-8")
    out = tmp_path / "loss_dir"
    run_cli(PLOT, "--log_file", log, "--output_file_dir", out)
    events = read_events(str(out))
    assert events["loss"] == [(1, 0.75), (2, pytest.approx(0.744)), (29134, 0.5), (29135, pytest.approx(0.4)),
                              (29136, pytest.approx(0.3))]
    assert [v for _, v in events["loss_scale"]] == [128.0, 128.0, 128.0, 64.0, 128.0]
    assert events["overflow"] == [(1, 0.0), (2, 0.0), (29134, 0.0), (29135, 1.0), (29136, 0.0)]
    assert [s for s, _ in events["learning_rate"]] == [1, 2, 29134, 29135, 29136]


def test_parse_line_ignores_other_lines():
    assert parse_line("INFO - Training Over! loss_scale: 1.0, global_norm: [2.0]") is None
    assert parse_line("per_step_time: 112ms, lr: 0.00075") is None


def test_old_format_without_steps_uses_sink_size():
    points = [parse_line("loss: 0.5", ordinal=i, sink_size=2) for i in (1, 2, 3)]
    assert [p.step for p in points] == [2, 4, 6]


@pytest.mark.slow
def test_events_from_a_real_training_log_read_back(trained_run, tmp_path):
    log = trained_run["log"]
    expected = [parse_line(line) for line in log.read_text(encoding="utf-8").splitlines() if "loss:[" in line]
    out = tmp_path / "loss_dir"
    proc = run_cli(PLOT, "--log_file", log, "--output_file_dir", out)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    events = read_events(str(out))
    assert result["points"] == len(expected) == len(events["loss"]) == SEEN_PAIRS // 8
    assert [s for s, _ in events["loss"]] == [p.step for p in expected]
    assert [v for _, v in events["loss"]] == pytest.approx([p.loss for p in expected], rel=1e-6)
    assert len(events["learning_rate"]) == len(events["global_norm"]) == SEEN_PAIRS // 8
    image = Image.open(result["png"])
    image.load()
    assert image.size == (800, 450)
    colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors is not None and len(colors) > 20  # a drawn curve, not a blank canvas
    assert (out / "loss.png").stat().st_size > 10_000


def test_live_mode_follows_a_growing_replaced_and_truncated_log(tmp_path):
    """follow() driven poll by poll: each of its sleeps (it sleeps only once a read found nothing new) is the
    moment the next change is made, and its clock advances by the poll interval, so no step can be missed or
    merged and the idle stop falls on a known poll, however fast or loaded the machine."""
    log, out = tmp_path / "info.log", tmp_path / "live"
    now, messages, seen = [0.0], [], []

    def append(text):
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(text)

    def replace(text):
        (tmp_path / "info.log.new").write_text(text, encoding="utf-8")
        (tmp_path / "info.log.new").replace(log)  # a restarted run replaces the file (a new inode)

    half = mf_line(6, 10, "0.3")
    changes = [
        lambda: None,  # the plotter is up and waits for a log that does not exist yet
        lambda: append("".join(mf_line(step, 10, f"0.{9 - step}") for step in range(1, 6))),
        lambda: append(half[:40]),  # half a line: not parsed until complete
        lambda: seen.append([s for s, _ in read_events(str(out))["loss"]]) or append(half[40:]),
        lambda: replace(mf_line(7, 10, "0.25") + mf_line(8, 10, "0.2")),
        lambda: log.write_text(mf_line(9, 10, "0.1"), encoding="utf-8"),  # truncated in place, shorter
    ]
    idle_polls = []

    def sleep(seconds):
        assert seconds == 0.5
        now[0] += seconds
        if changes:
            changes.pop(0)()
        else:
            idle_polls.append(now[0])

    result = follow(str(log), str(out), idle_timeout=4, poll=0.5, png=False, log=messages.append,
                    clock=lambda: now[0], sleep=sleep)
    assert seen == [[1, 2, 3, 4, 5]]  # the half line was read on its own and held back
    assert result["points"] == 9
    events = read_events(str(out))
    assert [s for s, _ in events["loss"]] == list(range(1, 10))
    assert events["loss"][5][1] == pytest.approx(0.3)
    assert [m.split(" from ")[0] for m in messages if m.startswith("caught up")] == \
        ["caught up: 5 point(s)", "caught up: 8 point(s)", "caught up: 9 point(s)"]
    assert sum("was replaced or truncated" in m for m in messages) == 2
    # Idle from the last new line (read at t=3.0): the polls up to t=7.0 are within 4 s, the one at 7.5 stops it.
    assert idle_polls == [3.0 + 0.5 * k for k in range(1, 10)] and messages[-1] == "no new lines for 4s; stopping"


def test_live_cli_stops_on_ctrl_c_once_caught_up(tmp_path):
    """The CLI in real-time mode on a finished log: once it says it caught up, Ctrl-C (SIGINT) ends it with
    everything written. Driven by its own "caught up" line, not by a wait; the timer only guards a hang."""
    log = tmp_path / "info.log"
    log.write_text("".join(mf_line(step, 3, f"0.{9 - step}") for step in (1, 2, 3)), encoding="utf-8")
    out = tmp_path / "live"
    proc = subprocess.Popen([sys.executable, str(PLOT), "--log_file", str(log), "--output_file_dir", str(out),
                             "--parse_mode", "real-time", "--idle_timeout", "600"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(300, proc.kill)
    guard.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("caught up:"):
                break
        assert lines and lines[-1].startswith(f"caught up: 3 point(s) from {log}"), lines
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate()
    finally:
        guard.cancel()
        proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "interrupted; writing what was read" in stdout
    assert json.loads(stdout.strip().splitlines()[-1])["points"] == 3
    assert [s for s, _ in read_events(str(out))["loss"]] == [1, 2, 3]
