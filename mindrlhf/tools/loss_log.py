"""The training log's loss lines: the one pattern that parses them, for plots, tests and summaries.

MindFormers 1.9 writes `{ Epoch:[  1/  1], step:[   16/  506], loss:[0.114781/0.475559], ... lr: 0.00075, ...
global_norm: [1.9468232], ...`; older MindFormers (the tutorial's screenshots) wrote
`epoch: 1 step: 16, loss: 0.744`, MindSpore's LossMonitor `epoch: 1 step: 16, loss is 0.744`, and the
tutorial's own log `Epoch:[  1/  2], step:[    2/29134], loss: 0.744, ..., overflow cond: False, loss_scale: 128.0`.
Lines with `Epoch:[e/E], step:[s/S]` are placed at the global step (e - 1) * S + s.
"""
import re
from dataclasses import dataclass
from typing import Iterable, List, Optional

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"
NEW_LINE = re.compile(
    r"Epoch:\[\s*(?P<epoch>\d+)/\s*(?P<epochs>\d+)\],\s*step:\[\s*(?P<step>\d+)/\s*(?P<steps>\d+)\],\s*"
    r"loss:\s*\[?\s*(?P<loss>" + _NUM + r")(?:/\s*(?P<avg>" + _NUM + r"))?")
OLD_LINE = re.compile(r"(?:epoch:\s*(?P<epoch>\d+)\s*,?\s*)?(?:step:\s*(?P<step>\d+)\s*,?\s*)?"
                      r"\bloss(?:\s+is\s+|\s*[:=]\s*)(?P<loss>" + _NUM + r")(?![\d/])", re.IGNORECASE)
LR = re.compile(r"\blr:\s*\[?\s*(?P<v>" + _NUM + r")")
GLOBAL_NORM = re.compile(r"global_norm:\s*\[?\s*(?P<v>" + _NUM + r")")
LOSS_SCALE = re.compile(r"loss_scale:\s*\[?\s*(?P<v>" + _NUM + r")")
OVERFLOW = re.compile(r"overflow cond:\s*(?P<v>True|False)")


@dataclass
class LossPoint:
    step: int              # global step (epoch-aware), or the line's ordinal when the log has no step numbers
    loss: float
    epoch: Optional[int] = None
    lr: Optional[float] = None
    global_norm: Optional[float] = None
    loss_scale: Optional[float] = None
    overflow: Optional[bool] = None


def parse_line(line: str, ordinal: int = 0, sink_size: int = 1) -> Optional[LossPoint]:
    """One LossPoint for a loss line, else None. ordinal is used when the line carries no step."""
    match = NEW_LINE.search(line)
    if match:
        epoch, step, steps = int(match["epoch"]), int(match["step"]), int(match["steps"])
        point = LossPoint(step=(epoch - 1) * steps + step, loss=float(match["loss"]), epoch=epoch)
    else:
        match = OLD_LINE.search(line)
        if not match:
            return None
        step = int(match["step"]) if match["step"] else ordinal * sink_size
        point = LossPoint(step=step, loss=float(match["loss"]),
                          epoch=int(match["epoch"]) if match["epoch"] else None)
    for attr, pattern in (("lr", LR), ("global_norm", GLOBAL_NORM), ("loss_scale", LOSS_SCALE)):
        found = pattern.search(line)
        setattr(point, attr, float(found["v"]) if found else None)
    overflow = OVERFLOW.search(line)
    point.overflow = (overflow["v"] == "True") if overflow else None
    return point


def parse_lines(lines: Iterable[str], sink_size: int = 1) -> List[LossPoint]:
    points = []
    for line in lines:
        point = parse_line(line, ordinal=len(points) + 1, sink_size=sink_size)
        if point is not None:
            points.append(point)
    return points


def parse_log(path: str, sink_size: int = 1) -> List[LossPoint]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return parse_lines(fh, sink_size)
