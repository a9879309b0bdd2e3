"""Reading and validating CValues-Comparison rows (prompt, pos_resp, neg_resp, pos_type, neg_type).

Every problem is reported with file, line and field; with skip_invalid the bad rows are counted per reason
instead. Nothing here tokenizes.
"""
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

from mindrlhf.errors import InputError

PAIR_FIELDS = ("prompt", "pos_resp", "neg_resp")
TYPE_FIELDS = ("pos_type", "neg_type")
NUMBER_FIELDS = ("margin",)


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    pos_type: Optional[str] = None
    neg_type: Optional[str] = None
    line: int = 0
    margin: Optional[float] = None
    # Conversational layouts (mindrlhf.data.formats): the whole conversation ending in each final turn
    chosen_messages: Optional[list] = None
    rejected_messages: Optional[list] = None


@dataclass
class SkipReport:
    """What was left out and why: counts per reason and the first few line numbers of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, line: int):
        self.counts[reason] += 1
        lines = self.examples.setdefault(reason, [])
        if len(lines) < self.max_examples:
            lines.append(line)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total,
                "by_reason": {r: {"count": c, "first_lines": self.examples[r]} for r, c in self.counts.items()}}

    def lines(self) -> List[str]:
        return [f"skipped {c} row(s): {r} (first lines: {', '.join(map(str, self.examples[r]))})"
                for r, c in sorted(self.counts.items())]


def iter_json_rows(path) -> Iterator[tuple]:
    """(line_number, dict) for each non-blank line of a jsonl file, or each element of a .json array."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(path, reason="file does not exist")
    with open(path, "rb") as fh:
        if path.endswith(".json"):
            raw = fh.read()
            try:
                data = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                line = raw[:err.start].count(b"\n") + 1
                raise InputError(path, line, reason=f"bytes are not UTF-8 ({err.reason})") from None
            except json.JSONDecodeError as err:
                raise InputError(path, err.lineno, reason=f"malformed JSON: {err.msg}") from None
            if isinstance(data, dict):
                data = [data]
            if not isinstance(data, list):
                raise InputError(path, 1, reason="a .json file must hold an object or a list of objects")
            for i, row in enumerate(data, 1):
                yield i, row
            return
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, InputError(path, number, reason=f"bytes are not UTF-8 ({err.reason})")
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as err:
                yield number, InputError(path, number, reason=f"malformed JSON: {err.msg} (column {err.colno})")


def check_text_field(path, line, row, name) -> str:
    """The named field as a non-empty string, or an InputError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise InputError(path, line, reason=f"expected a JSON object, got {type(row).__name__}")
    if name not in row:
        raise InputError(path, line, name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise InputError(path, line, name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(path, line, name, "is empty")
    return value


def check_number_field(path, line, row, name) -> Optional[float]:
    """An optional numeric field as a finite float (None when absent), or an InputError."""
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise InputError(path, line, name, f"must be a finite number, got {value!r}")
    return float(value)


def _reason(err: InputError) -> str:
    return f"field '{err.field}' {err.reason}" if err.field else err.reason


def read_rows(path, fields, optional=(), skip_invalid=False, report: Optional[SkipReport] = None, numbers=()):
    """Validated rows as dicts holding `fields` (required non-empty strings), `optional` (str or None) and
    `numbers` (finite float or None)."""
    for line, row in iter_json_rows(path):
        try:
            if isinstance(row, InputError):
                raise row
            out = {name: check_text_field(path, line, row, name) for name in fields}
            for name in optional:
                value = row.get(name)
                out[name] = value if isinstance(value, str) else None
            for name in numbers:
                out[name] = check_number_field(path, line, row, name)
        except InputError as err:
            if not skip_invalid:
                raise
            if report is not None:
                report.add(_reason(err), line)
            continue
        yield line, out


def read_pairs(path, skip_invalid=False, report: Optional[SkipReport] = None) -> Iterator[PreferencePair]:
    """PreferencePairs from a CValues-Comparison jsonl file."""
    for line, row in read_rows(path, PAIR_FIELDS, TYPE_FIELDS, skip_invalid, report, NUMBER_FIELDS):
        yield PreferencePair(row["prompt"], row["pos_resp"], row["neg_resp"],
                             row["pos_type"], row["neg_type"], line, row["margin"])
