"""Preference layouts: the rows users keep, read as PreferencePairs (and RewardBench 2 groups) for conversion,
evaluation and inference.

Files: .json, .jsonl, .parquet, or a folder written by `datasets`' save_to_disk (local only). The layout is read
from the first row's columns, or named with --format; every row is then checked against it and a bad one is an
InputError naming file, line (row number for Parquet and datasets folders) and field.

| layout | columns |
| --- | --- |
| cvalues | prompt, pos_resp, neg_resp (pos_type, neg_type) |
| standard | prompt, chosen, rejected: strings (TRL) |
| implicit | chosen, rejected: strings sharing a prefix, the prompt (HH-RLHF) |
| conversational | prompt: messages (or its text), chosen/rejected: the final assistant turn(s); or whole conversations in
  chosen/rejected differing only in the last assistant turn, with or without the prompt's text (UltraFeedback-binarized,
  Skywork) |
| bestofn | prompt, chosen: strings, rejected: strings, subset (RewardBench 2) |

Each may carry a numeric `margin`. Conversations render with a chat template only (the run's `--template chat` or a
.jinja file): the whole conversation, every turn, so the reward is read at the last token of the final assistant
turn.
"""
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

from mindrlhf.data.pairs import (PreferencePair, SkipReport, check_number_field, check_text_field, iter_json_rows,
                                 read_pairs)
from mindrlhf.errors import ConfigError, InputError, MindRLHFError

FORMATS = ("cvalues", "standard", "implicit", "conversational", "bestofn")
HH_ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant", "tool")


def is_rows_source(path) -> bool:
    """Preference rows (.jsonl, .json, .parquet, a datasets folder), not MindRecord."""
    path = str(path)
    return path.endswith((".jsonl", ".json", ".parquet")) or _is_datasets_folder(path)


def _is_datasets_folder(path: str) -> bool:
    """A Dataset (state.json) or DatasetDict (dataset_dict.json) that save_to_disk wrote."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                       for name in ("state.json", "dataset_dict.json"))


def iter_table_rows(path) -> Iterator[tuple]:
    """(line, row) for .json/.jsonl (line numbers), .parquet and save_to_disk folders (1-based row numbers)."""
    path = str(path)
    if os.path.isdir(path):
        if not _is_datasets_folder(path):
            raise InputError(path, reason="a folder must be one written by datasets' save_to_disk (it holds no "
                             "state.json or dataset_dict.json)")
        from datasets import load_from_disk

        try:
            data = load_from_disk(path)
        except (OSError, ValueError, FileNotFoundError) as err:
            raise InputError(path, reason=f"not a datasets folder ({err})") from None
        if hasattr(data, "keys"):  # a DatasetDict: its splits one after the other
            splits = list(data.keys())
            number = 0
            for split in splits:
                for row in data[split]:
                    number += 1
                    yield number, row
            return
        for number, row in enumerate(data, 1):
            yield number, row
        return
    if path.endswith(".parquet"):
        if not os.path.isfile(path):
            raise InputError(path, reason="file does not exist")
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pylint: disable=broad-except  (pyarrow raises its own ArrowInvalid/OSError)
            raise InputError(path, reason=f"not a Parquet file ({str(err).splitlines()[0]})") from None
        for number, row in enumerate(table.to_pylist(), 1):
            yield number, row
        return
    yield from iter_json_rows(path)


def detect_format(row, path, line) -> str:
    """The layout a row's columns fit, or an InputError naming the field that fits none."""
    if not isinstance(row, dict):
        raise InputError(path, line, reason=f"expected an object with preference columns, got {type(row).__name__}")
    if "pos_resp" in row or "neg_resp" in row:
        return "cvalues"
    for name in ("chosen", "rejected"):
        if name not in row:
            raise InputError(path, line, name, "missing: the row fits no preference layout (columns: "
                             f"{', '.join(sorted(map(str, row))) or 'none'}; see docs/data.md)")
    chosen = row["chosen"]
    if isinstance(chosen, str):
        return "standard" if "prompt" in row else "implicit"
    if isinstance(chosen, list) and chosen and all(isinstance(c, str) for c in chosen):
        return "bestofn"
    if isinstance(chosen, list) and chosen and all(isinstance(c, dict) for c in chosen):
        return "conversational"
    raise InputError(path, line, "chosen", "fits no preference layout: a string (standard, implicit), a list of "
                     f"strings (bestofn) or a list of messages (conversational), got {_shown(chosen)}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _messages(path, line, name, value) -> List[dict]:
    if not isinstance(value, list) or not value:
        raise InputError(path, line, name, f"must be a non-empty list of messages, got {_shown(value)}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            raise InputError(path, line, f"{name}[{i}]", "must be a message {'role': one of "
                             f"{'/'.join(ROLES)}, 'content': a string}}, got {_shown(message)}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _last_assistant(path, line, name, messages):
    if messages[-1]["role"] != "assistant":
        raise InputError(path, line, name, f"must end with an assistant turn, ends with '{messages[-1]['role']}'")
    if not messages[-1]["content"].strip():
        raise InputError(path, line, name, "its last assistant turn is empty")


def shared_prefix_prompt(chosen: str, rejected: str) -> str:
    """The prompt of an implicit-prompt pair: their common prefix, cut after its last HH-RLHF assistant marker
    when it holds one (so a response starting with the same words stays whole), else at the last whitespace."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    prefix = chosen[:n]
    marker = prefix.rfind(HH_ASSISTANT)
    if marker >= 0:
        return prefix[:marker + len(HH_ASSISTANT)]
    if n < min(len(chosen), len(rejected)):  # stopped mid-text: back off to a word boundary
        cut = max(prefix.rfind(" "), prefix.rfind("\n"))
        return prefix[:cut + 1] if cut >= 0 else ""
    return prefix


@dataclass
class BestOfN:
    """A RewardBench 2 row: one prompt, its chosen and rejected completions, subset, id."""

    prompt: str
    chosen: List[str]
    rejected: List[str]
    subset: str
    id: str
    line: int
    num_correct: Optional[int] = None


def _text(path, line, row, name):
    return check_text_field(path, line, row, name)


def _strings(path, line, row, name) -> List[str]:
    value = row.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise InputError(path, line, name, f"must be a non-empty list of non-empty strings, got {_shown(value)}")
    return value


def read_bestofn(path, line, row) -> BestOfN:
    prompt = _text(path, line, row, "prompt")
    subset = _text(path, line, row, "subset")
    num_correct = row.get("num_correct")
    return BestOfN(prompt, _strings(path, line, row, "chosen"), _strings(path, line, row, "rejected"), subset,
                   str(row.get("id", line)), line, int(num_correct) if isinstance(num_correct, int) else None)


def row_pairs(fmt: str, path, line, row) -> List[PreferencePair]:
    """The PreferencePairs of one row in layout `fmt` (a bestofn row: each chosen against each rejected)."""
    if not isinstance(row, dict):
        raise InputError(path, line, reason=f"expected an object, got {type(row).__name__}")
    margin = check_number_field(path, line, row, "margin")
    if fmt == "standard":
        return [PreferencePair(_text(path, line, row, "prompt"), _text(path, line, row, "chosen"),
                               _text(path, line, row, "rejected"), line=line, margin=margin)]
    if fmt == "implicit":
        chosen, rejected = _text(path, line, row, "chosen"), _text(path, line, row, "rejected")
        prompt = shared_prefix_prompt(chosen, rejected)
        if not prompt.strip():
            raise InputError(path, line, "chosen", "shares no prefix with 'rejected': an implicit-prompt pair needs "
                             "its prompt at the start of both (or give a 'prompt' column)")
        c, r = chosen[len(prompt):], rejected[len(prompt):]
        for name, value in (("chosen", c), ("rejected", r)):
            if not value.strip():
                raise InputError(path, line, name, "is empty after the shared prompt")
        return [PreferencePair(prompt, c, r, line=line, margin=margin)]
    if fmt == "conversational":
        return [_conversation_pair(path, line, row, margin)]
    if fmt == "bestofn":
        group = read_bestofn(path, line, row)
        return [PreferencePair(group.prompt, c, r, line=line, margin=margin)
                for c in group.chosen for r in group.rejected]
    raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _conversation_pair(path, line, row, margin) -> PreferencePair:
    chosen = _messages(path, line, "chosen", row.get("chosen"))
    rejected = _messages(path, line, "rejected", row.get("rejected"))
    prompt = row.get("prompt")
    if isinstance(prompt, str) and chosen[0]["role"] != "assistant":
        prompt = None  # UltraFeedback-binarized: the prompt's text, and whole conversations holding it
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": _text(path, line, row, "prompt")}]
    if prompt is not None:
        prompt = _messages(path, line, "prompt", prompt)
        chosen, rejected = prompt + chosen, prompt + rejected
    else:  # whole conversations: everything before the last turn is shared
        if chosen[:-1] != rejected[:-1]:
            first = next(i for i, (a, b) in enumerate(zip(chosen + [None], rejected + [None])) if a != b)
            raise InputError(path, line, f"rejected[{first}]", "differs from 'chosen' before the last assistant "
                             "turn: whole conversations must share every turn but the last")
    _last_assistant(path, line, "chosen", chosen)
    _last_assistant(path, line, "rejected", rejected)
    if chosen == rejected:
        raise InputError(path, line, "rejected", "is the same conversation as 'chosen'")
    prompt_text = "\n".join(m["content"] for m in chosen[:-1])
    return PreferencePair(prompt_text, chosen[-1]["content"], rejected[-1]["content"], line=line, margin=margin,
                          chosen_messages=chosen, rejected_messages=rejected)


def _first_row(path):
    for line, row in iter_table_rows(path):
        if isinstance(row, MindRLHFError):
            raise row
        return line, row
    return None, None


def resolve_format(path, fmt: Optional[str] = None) -> str:
    """--format, else the layout of the first row's columns ('cvalues' for an empty file)."""
    if fmt:
        if fmt not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    line, row = _first_row(path)
    return "cvalues" if row is None else detect_format(row, str(path), line)


def read_preference_pairs(path, fmt: Optional[str] = None, skip_invalid: bool = False,
                          report: Optional[SkipReport] = None) -> Iterator[PreferencePair]:
    """PreferencePairs from a file or datasets folder in any layout (FORMATS)."""
    fmt = resolve_format(path, fmt)
    if fmt == "cvalues" and not os.path.isdir(str(path)) and not str(path).endswith(".parquet"):
        yield from read_pairs(path, skip_invalid=skip_invalid, report=report)
        return
    for line, row in iter_table_rows(path):
        try:
            if isinstance(row, InputError):
                raise row
            pairs = (_cvalues_pair(path, line, row) if fmt == "cvalues" else row_pairs(fmt, str(path), line, row))
        except InputError as err:
            if not skip_invalid:
                raise
            if report is not None:
                report.add(f"field '{err.field}' {err.reason}" if err.field else err.reason, line)
            continue
        yield from pairs


def _cvalues_pair(path, line, row) -> List[PreferencePair]:
    values = [_text(path, line, row, name) for name in ("prompt", "pos_resp", "neg_resp")]
    types = [row.get(t) if isinstance(row.get(t), str) else None for t in ("pos_type", "neg_type")]
    return [PreferencePair(*values, *types, line, check_number_field(path, line, row, "margin"))]


def read_bestofn_rows(path, skip_invalid: bool = False, report: Optional[SkipReport] = None) -> List[BestOfN]:
    """RewardBench 2 rows (prompt, chosen: [..], rejected: [..], subset, id)."""
    out = []
    for line, row in iter_table_rows(path):
        try:
            if isinstance(row, InputError):
                raise row
            if not isinstance(row, dict):
                raise InputError(path, line, reason=f"expected an object, got {type(row).__name__}")
            out.append(read_bestofn(str(path), line, row))
        except InputError as err:
            if not skip_invalid:
                raise
            if report is not None:
                report.add(f"field '{err.field}' {err.reason}" if err.field else err.reason, line)
    return out


def render_pair_texts(template, pairs: List[PreferencePair]) -> List[str]:
    """The chosen texts then the rejected texts the template renders (whole conversations for conversational
    pairs, which need a chat template)."""
    texts = []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            messages = getattr(pair, f"{side}_messages")
            if messages is not None:
                texts.append(template.render_messages(messages, where=f"line {pair.line}"))
            else:
                texts.append(template.render(pair.prompt, getattr(pair, side)))
    return texts


def encode_pairs(template, tokenizer, pairs: List[PreferencePair]) -> List[List[int]]:
    """Token ids of render_pair_texts: chosen for every pair, then rejected."""
    return tokenizer.encode(render_pair_texts(template, pairs), special_tokens=template.special_tokens)
