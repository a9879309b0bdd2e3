"""Training log -> TensorBoard event files (TensorBoard's own writer, no PyTorch) and a PNG of the loss.

One-shot parses a finished log; live mode follows a growing log (also one that is truncated or replaced),
flushing as it goes, and ends on Ctrl-C or after `idle_timeout` seconds without a new line.
"""
import os
import time
from typing import Callable, Iterable, List, Optional

import numpy as np

from mindrlhf.errors import InputError
from mindrlhf.io import replaced_whole
from mindrlhf.tools.loss_log import LossPoint, parse_line


def prepare_output_dir(output_dir: str, overwrite: bool = False):
    """Old event files would show up as a second curve in TensorBoard: refuse them, or remove with overwrite."""
    from mindrlhf.errors import OutputExistsError

    if not os.path.isdir(output_dir):
        return
    old = [f for f in os.listdir(output_dir) if f.startswith("events.out.tfevents") or f == "loss.png"]
    if old and not overwrite:
        raise OutputExistsError(f"{output_dir} already holds {', '.join(sorted(old)[:3])}; pass --overwrite to "
                                "replace them or choose another --output_file_dir")
    for name in old:
        os.remove(os.path.join(output_dir, name))


class ScalarWriter:
    """Scalars into a tfevents file via tensorboard.summary.writer (protobuf only, no TF/PyTorch)."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(logdir, exist_ok=True)
        self.writer = EventFileWriter(logdir)

    def add(self, tag: str, value: float, step: int, wall_time: Optional[float] = None):
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
        self.writer.add_event(event_pb2.Event(wall_time=wall_time or time.time(), step=int(step), summary=summary))

    def add_point(self, point: LossPoint):
        self.add("loss", point.loss, point.step)
        if point.lr is not None:
            self.add("learning_rate", point.lr, point.step)
        if point.global_norm is not None:
            self.add("global_norm", point.global_norm, point.step)
        if point.loss_scale is not None:
            self.add("loss_scale", point.loss_scale, point.step)
        if point.overflow is not None:
            self.add("overflow", float(point.overflow), point.step)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()

    @property
    def path(self) -> str:
        """The event file itself (the writer names it events.out.tfevents.<time>.<host>...)."""
        return getattr(self.writer, "_file_name", None) or self.writer.get_logdir()


def smooth(values: Iterable[float], weight: float = 0.9) -> List[float]:
    """TensorBoard-style exponential moving average with bias correction."""
    out, avg = [], 0.0
    for i, value in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight ** i))
    return out


def save_png(points: List[LossPoint], path: str, title: str = "reward model training loss") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p.step for p in points]
    losses = [p.loss for p in points]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="loss")
    ax.plot(steps, smooth(losses), color="#08519c", linewidth=1.8, label="smoothed (EMA 0.9)")
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with replaced_whole(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def plot_once(log_file: str, output_dir: str, sink_size: int = 1, png: bool = True) -> dict:
    if not os.path.isfile(log_file):
        raise InputError(log_file, reason="log file does not exist")
    writer = ScalarWriter(output_dir)
    points = []
    with open(log_file, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            point = parse_line(line, ordinal=len(points) + 1, sink_size=sink_size)
            if point is not None:
                points.append(point)
                writer.add_point(point)
    return _finish(writer, points, output_dir, png)


def _finish(writer: ScalarWriter, points: List[LossPoint], output_dir: str, png: bool) -> dict:
    writer.close()
    result = {"points": len(points), "event_dir": output_dir, "event_file": writer.path}
    if png and points:
        result["png"] = save_png(points, os.path.join(output_dir, "loss.png"))
    return result


def follow(log_file: str, output_dir: str, sink_size: int = 1, idle_timeout: float = 600.0, poll: float = 0.5,
           png: bool = True, log: Callable[[str], None] = print, stop: Optional[Callable[[], bool]] = None,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Live mode. Waits for the log to appear, re-reads it from the start when truncated or replaced.

    Each time it has read to the end of the file (first, and after a replacement) it logs "caught up": from then
    on everything already in the log is in the event file. `clock`/`sleep` measure the idle time (a monotonic
    clock: a wall-clock jump neither stops nor prolongs it); tests pass their own to step it poll by poll.
    """
    writer = ScalarWriter(output_dir)
    points: List[LossPoint] = []
    handle, inode, position = None, None, 0
    last_activity = clock()
    buffer = ""
    caught_up = False
    log(f"following {log_file} (Ctrl-C to stop; stops after {idle_timeout:g}s without new lines)")
    try:
        while stop is None or not stop():
            try:
                stat = os.stat(log_file)
            except FileNotFoundError:
                stat = None
            if stat is not None and (handle is None or stat.st_ino != inode or stat.st_size < position):
                if handle is not None:
                    handle.close()
                    log(f"{log_file} was replaced or truncated; reading it from the start")
                handle = open(log_file, encoding="utf-8", errors="replace")  # pylint: disable=consider-using-with
                inode, position, buffer, caught_up = stat.st_ino, 0, "", False
            chunk = handle.read() if handle is not None else ""
            if chunk:
                position = handle.tell()
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                for line in lines:
                    point = parse_line(line, ordinal=len(points) + 1, sink_size=sink_size)
                    if point is not None:
                        points.append(point)
                        writer.add_point(point)
                writer.flush()
                last_activity = clock()
                continue  # read again before sleeping: caught up only once a read finds nothing more
            if handle is not None and not caught_up:
                caught_up = True
                log(f"caught up: {len(points)} point(s) from {log_file}; waiting for new lines")
            if clock() - last_activity > idle_timeout:
                log(f"no new lines for {idle_timeout:g}s; stopping")
                break
            sleep(poll)
    except KeyboardInterrupt:
        log("interrupted; writing what was read")
    finally:
        if handle is not None:
            handle.close()
    return _finish(writer, points, output_dir, png)


def read_events(event_dir: str) -> dict:
    """tag -> [(step, value)] as TensorBoard itself reads them (for tests and checks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(event_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def as_array(points: List[LossPoint]) -> np.ndarray:
    return np.array([[p.step, p.loss] for p in points], dtype=np.float64)
