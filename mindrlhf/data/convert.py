"""Preference pairs -> the tutorial's 7-field samples -> one MindRecord, written atomically.

Semantics equal the tutorial's cvalues_comparison.py (template, truncation, right padding, loss_mask, end_ind)
but pairs that are identical after truncation are skipped and counted instead of crashing, tokenization is
batched over all cores, and the file appears only when complete. The template (mindrlhf.data.templates) and
the over-long policy are recorded in the sidecar; rows with a `margin` add an eighth column.
"""
import itertools
import os
import secrets
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import numpy as np

from mindrlhf.data.buckets import suggest_buckets
from mindrlhf.data.formats import encode_pairs, read_preference_pairs, resolve_format
from mindrlhf.data.pairs import PreferencePair, SkipReport
from mindrlhf.data.records import (COMPACT_SCHEMA, LAYOUTS, MARGIN_COLUMN, MARGIN_SCHEMA, RECORD_SCHEMA,
                                   check_record_pair, schema_description, stamp_index)
from mindrlhf.data.templates import TUTORIAL, Template
from mindrlhf.errors import ConfigError, InputError, OutputExistsError
from mindrlhf.io import replaced_together, write_json

SKIP_IDENTICAL = "chosen and rejected are identical after truncation"
SKIP_OVERLONG = "longer than --seq_length with the template (--overlong drop)"
# What to do with a pair whose chosen or rejected text is longer than seq_length after the template:
# truncate (the tutorial's silent default, counted), drop (TRL's max_length filter, counted and reported by
# line), error (stop at the first, naming file and line).
OVERLONG_POLICIES = ("truncate", "drop", "error")


@dataclass
class LengthStats:
    """The tutorial's statistics: count and prompt/chosen/reject max, min and average token lengths."""

    seq_length: int
    count: int = 0
    totals: Dict[str, int] = field(default_factory=lambda: {"prompt": 0, "chosen": 0, "reject": 0})
    maxima: Dict[str, int] = field(default_factory=lambda: {"prompt": 0, "chosen": 0, "reject": 0})
    minima: Dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    max_token_id: int = -1
    overlong_policy: str = "truncate"
    overlong: int = 0

    def add(self, prompt_len, chosen_len, reject_len):
        self.count += 1
        for key, value in (("prompt", prompt_len), ("chosen", chosen_len), ("reject", reject_len)):
            self.totals[key] += value
            self.maxima[key] = max(self.maxima[key], value)
            self.minima[key] = min(self.minima.get(key, value), value)

    def as_dict(self) -> dict:
        out = {"count": self.count}
        for key in ("prompt", "chosen", "reject"):
            out[f"{key}_max"] = self.maxima[key]
            out[f"{key}_min"] = self.minima.get(key, 0)
            out[f"{key}_avg"] = round(self.totals[key] / self.count, 2) if self.count else 0.0
        out["truncated_pairs"] = self.truncated
        out["max_token_id"] = self.max_token_id
        out["overlong_policy"] = self.overlong_policy
        out["overlong_pairs"] = self.overlong  # longer than seq_length: truncated, or dropped with 'drop'
        return out


def build_samples(chosen_ids: List[List[int]], rejected_ids: List[List[int]], seq_length: int, pad_token_id: int):
    """Tokenized full texts -> (samples dict of arrays, keep mask). Rows with no differing token are dropped."""
    n = len(chosen_ids)
    chosen = np.full((n, seq_length), pad_token_id, dtype=np.int32)
    rejected = np.full((n, seq_length), pad_token_id, dtype=np.int32)
    c_len = np.zeros(n, dtype=np.int64)
    r_len = np.zeros(n, dtype=np.int64)
    for i, (c, r) in enumerate(zip(chosen_ids, rejected_ids)):
        c, r = c[:seq_length], r[:seq_length]
        c_len[i], r_len[i] = len(c), len(r)
        chosen[i, :len(c)] = c
        rejected[i, :len(r)] = r
    differ = chosen != rejected
    keep = differ.any(axis=1)
    divergence = differ.argmax(axis=1)
    end_ind = np.maximum(c_len, r_len)
    positions = np.arange(seq_length)
    loss_mask = ((positions[None, :] >= divergence[:, None]) & (positions[None, :] < end_ind[:, None]))
    samples = {
        "chosen_input_ids": chosen,
        "chosen_attention_mask": (positions[None, :] < c_len[:, None]).astype(np.int32),
        "rejected_input_ids": rejected,
        "rejected_attention_mask": (positions[None, :] < r_len[:, None]).astype(np.int32),
        "loss_mask": loss_mask.astype(np.int32),
        "end_ind": end_ind,
    }
    return samples, keep


class AtomicMindRecordWriter:
    """A FileWriter into a private staging folder beside the destination (mindrlhf.io.replaced_together), used as
    a context manager: the .mindrecord and its .db (last) are moved into place when the block ends after
    commit(), and removed on an error. Both carry one write id (records.check_record_pair), checked before the
    first rename. An existing output is kept unless overwrite.
    The schema may be changed until the first write (conversion learns from the first row whether there are
    margins).
    """

    def __init__(self, dst_file: str, schema: dict = None, overwrite: bool = False):
        self.dst_file = os.path.abspath(dst_file)
        if not overwrite and (os.path.exists(self.dst_file) or os.path.exists(self.dst_file + ".db")):
            raise OutputExistsError(f"{dst_file} already exists; pass --overwrite to replace it")
        self.write_id = secrets.token_hex(8)
        self._staged = replaced_together([self.dst_file, self.dst_file + ".db"], self._check_staged)
        self.tmp_file = None
        self.schema = schema or RECORD_SCHEMA
        self.writer = None
        self.rows = 0

    def _open(self):
        if self.writer is None:
            from mindspore.mindrecord import FileWriter

            self.writer = FileWriter(file_name=self.tmp_file, shard_num=1, overwrite=True)
            self.writer.add_schema(self.schema, schema_description(self.write_id))
        return self.writer

    def write(self, rows: List[dict]):
        if rows:
            self._open().write_raw_data(rows)
            self.rows += len(rows)

    def commit(self):
        """Finish both files and stamp the index with the write id; they move into place when the block ends."""
        self._open().commit()
        stamp_index(self.tmp_file, self.write_id)

    def _check_staged(self, staged):
        if check_record_pair(staged[0]) != self.write_id:
            raise ConfigError(f"{staged[0]}: written without this write's id {self.write_id}; not replacing "
                              f"{self.dst_file}")

    def __enter__(self):
        self.tmp_file = os.path.join(self._staged.__enter__(), os.path.basename(self.dst_file))
        return self

    def __exit__(self, exc_type, exc, tb):
        return self._staged.__exit__(exc_type, exc, tb)


def _chunks(items: Iterable, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def compact_row(row: dict, seq_length: int) -> dict:
    """A padded 7-field row cut to its own lengths, plus the length it pads back to."""
    c_len, r_len = int(row["chosen_attention_mask"].sum()), int(row["rejected_attention_mask"].sum())
    end = int(row["end_ind"])
    return {"chosen_input_ids": row["chosen_input_ids"][:c_len],
            "chosen_attention_mask": row["chosen_attention_mask"][:c_len],
            "rejected_input_ids": row["rejected_input_ids"][:r_len],
            "rejected_attention_mask": row["rejected_attention_mask"][:r_len],
            "position_id": row["position_id"][:end], "loss_mask": row["loss_mask"][:end], "end_ind": end,
            "seq_length": seq_length, **({MARGIN_COLUMN: row[MARGIN_COLUMN]} if MARGIN_COLUMN in row else {})}


@dataclass
class ChunkOptions:
    """How _prepare_chunk treats a chunk: template, over-long policy, whether rows carry a margin."""

    template: Template = field(default_factory=lambda: TUTORIAL)
    overlong: str = "truncate"
    margin: bool = False
    source: str = "input"
    skip_invalid: bool = False
    sides: tuple = ("pos_resp", "neg_resp")  # the chosen and rejected columns, as errors name them


def _check_margin(pair: PreferencePair, options: ChunkOptions):
    if options.margin and pair.margin is None:
        raise InputError(options.source, pair.line, MARGIN_COLUMN,
                         "missing: the first row has a margin; give every row a margin or none")
    if not options.margin and pair.margin is not None:
        raise InputError(options.source, pair.line, MARGIN_COLUMN,
                         "given, but the first row has none; give every row a margin or none")


def _usable(chunk, full_c, full_r, seq_length: int, options: ChunkOptions):
    """Indices of the pairs to build, and (reason, line) of those left out (margin mismatch, over-long)."""
    usable, skipped = [], []
    for i, pair in enumerate(chunk):
        try:
            _check_margin(pair, options)
        except InputError as err:
            if not options.skip_invalid:
                raise
            skipped.append((f"field '{err.field}' {err.reason}", pair.line))
            continue
        longest = max(len(full_c[i]), len(full_r[i]))
        if longest > seq_length and options.overlong == "error":
            side = options.sides[0] if len(full_c[i]) >= len(full_r[i]) else options.sides[1]
            raise InputError(options.source, pair.line, side,
                             f"{longest} tokens with the template, longer than --seq_length {seq_length} "
                             "(--overlong error; use --overlong truncate or drop to go on)")
        if longest > seq_length and options.overlong == "drop":
            skipped.append((SKIP_OVERLONG, pair.line))
            continue
        usable.append(i)
    return usable, skipped


def _check_pad(samples, keep, chunk, usable, pad_token_id: int, options: ChunkOptions):
    """The model masks every pad id as padding (MindFormers builds the attention mask from ids != pad), so a
    pad id inside the text would silently vanish from the model's view."""
    for side, ids, mask in ((options.sides[0], "chosen_input_ids", "chosen_attention_mask"),
                            (options.sides[1], "rejected_input_ids", "rejected_attention_mask")):
        inside = ((samples[ids] == pad_token_id) & (samples[mask] == 1)).any(axis=1) & keep
        if inside.any():
            line = chunk[usable[int(np.argmax(inside))]].line
            raise InputError(options.source, line, side,
                             f"the text holds token id {pad_token_id}, the pad id, which the model masks as "
                             "padding; pass a --pad_token_id that never occurs in the text (e.g. the tokenizer's "
                             "own pad token)")


def _prepare_chunk(chunk: List[PreferencePair], tokenizer, seq_length: int, pad_token_id: int,
                   position_id: np.ndarray, compact: bool = False, options: Optional[ChunkOptions] = None):
    """Tokenize and build one chunk: (rows to write, per-pair lengths, skipped (reason, line), truncated count,
    max id, over-long count)."""
    options = options or ChunkOptions()
    n = len(chunk)
    raw = tokenizer.encode([p.prompt.strip() for p in chunk] + [p.chosen.strip() for p in chunk] +
                           [p.rejected.strip() for p in chunk], special_tokens=False)
    full = encode_pairs(options.template, tokenizer, chunk)
    prompt_ids, chosen_ids, reject_ids = raw[:n], raw[n:2 * n], raw[2 * n:]
    full_c, full_r = full[:n], full[n:]
    overlong = sum(max(len(c), len(r)) > seq_length for c, r in zip(full_c, full_r))
    usable, skipped = _usable(chunk, full_c, full_r, seq_length, options)
    samples, keep = build_samples([full_c[i] for i in usable], [full_r[i] for i in usable], seq_length,
                                  pad_token_id)
    _check_pad(samples, keep, chunk, usable, pad_token_id, options)
    rows, lengths, truncated = [], [], 0
    max_id = -1
    if keep.any():
        max_id = max(int(samples["chosen_input_ids"][keep].max()), int(samples["rejected_input_ids"][keep].max()))
    for j, i in enumerate(usable):
        pair = chunk[i]
        if not keep[j]:
            skipped.append((SKIP_IDENTICAL, pair.line))
            continue
        if len(full_c[i]) > seq_length or len(full_r[i]) > seq_length:
            truncated += 1
        lengths.append((min(len(prompt_ids[i]), seq_length), min(len(chosen_ids[i]), seq_length),
                        min(len(reject_ids[i]), seq_length)))
        row = {name: samples[name][j] for name in samples}
        row["position_id"] = position_id
        row["end_ind"] = int(samples["end_ind"][j])
        if options.margin:
            row[MARGIN_COLUMN] = float(pair.margin)
        rows.append(compact_row(row, seq_length) if compact else row)
    return rows, lengths, sorted(skipped, key=lambda s: s[1]), truncated, max_id, overlong


def convert_pairs(pairs: Iterable[PreferencePair], tokenizer, dst_file: str, seq_length: int,
                  pad_token_id: Optional[int] = None, overwrite: bool = False, chunk_size: int = 2048,
                  report: Optional[SkipReport] = None, progress: bool = True, layout: str = "padded",
                  template: Optional[Template] = None, overlong: str = "truncate", source: str = "input",
                  skip_invalid: bool = False, batch_pairs: int = 8, sides=("pos_resp", "neg_resp")) -> dict:
    """Write the MindRecord and return {'stats', 'skipped', 'rows', 'dst_file', 'template', 'buckets', ...}.

    'buckets': train_dataset.bucket_boundaries that fit these lengths for batches of `batch_pairs` pairs
    (mindrlhf.data.buckets.suggest_buckets), None for fewer pairs than a batch.

    Streams in chunks; the next chunk is tokenized on a worker thread while this one is written, so the
    whole run approaches the MindRecord writer's own speed. pad_token_id None: the tokenizer's default (2 for
    SentencePiece, as the tutorial; pad_token, else eos_token for a Hugging Face tokenizer).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    if pad_token_id is None:
        pad_token_id = tokenizer.default_pad_id
        if pad_token_id is None:
            raise ConfigError(f"the tokenizer {getattr(tokenizer, 'path', '')} defines no pad_token or eos_token; "
                              "pass --pad_token_id")
    if overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"--overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if seq_length < 2:
        raise ConfigError(f"--seq_length must be at least 2, got {seq_length}")
    if not 0 <= pad_token_id < tokenizer.vocab_size:
        raise ConfigError(f"--pad_token_id {pad_token_id} is outside the tokenizer's vocabulary "
                          f"(size {tokenizer.vocab_size})")
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    compact = layout == "compact"
    template = template or TUTORIAL
    report = report if report is not None else SkipReport()
    stats = LengthStats(seq_length, overlong_policy=overlong)
    position_id = np.arange(seq_length, dtype=np.int32)
    pair_ends = []
    pairs = iter(pairs)
    with AtomicMindRecordWriter(dst_file, COMPACT_SCHEMA if compact else RECORD_SCHEMA, overwrite) as writer, \
            ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(desc="converting pairs", unit="pair", disable=not progress) as bar:
        first = next(pairs, None)
        options = ChunkOptions(template, overlong, first is not None and first.margin is not None, str(source),
                               skip_invalid, tuple(sides))
        if options.margin:
            writer.schema = dict(writer.schema, **MARGIN_SCHEMA)
        chunks = _chunks(itertools.chain([first] if first is not None else [], pairs), chunk_size)

        def submit():
            chunk = next(chunks, None)
            if chunk is None:
                return None, None
            return chunk, pool.submit(_prepare_chunk, chunk, tokenizer, seq_length, pad_token_id, position_id,
                                      compact, options)

        chunk, future = submit()
        while future is not None:
            rows, lengths, skipped, truncated, max_id, overlong_pairs = future.result()
            current = chunk
            chunk, future = submit()  # reads and validates the next chunk, then tokenizes it meanwhile
            for reason, line in skipped:
                report.add(reason, line)
            for length in lengths:
                stats.add(*length)
            pair_ends.extend(int(row["end_ind"]) for row in rows)
            stats.truncated += truncated
            stats.overlong += overlong_pairs
            stats.max_token_id = max(stats.max_token_id, max_id)
            writer.write(rows)
            bar.update(len(current))
        if writer.rows == 0:
            raise ConfigError(f"no usable pairs to write to {dst_file}; " +
                              ("; ".join(report.lines()) or "input is empty"))
        writer.commit()
    result = {"dst_file": dst_file, "rows": stats.count, "seq_length": seq_length, "pad_token_id": pad_token_id,
              "max_token_id": stats.max_token_id, "tokenizer": getattr(tokenizer, "path", None), "layout": layout,
              "margin": options.margin, "template": template.record(), "stats": stats.as_dict(),
              "skipped": report.as_dict(), "buckets": suggest_buckets(pair_ends, seq_length, batch_pairs)}
    write_json(os.path.abspath(dst_file) + ".stats.json", result)
    return result


def convert_file(src_file: str, tokenizer, dst_file: str, seq_length: int, pad_token_id: Optional[int] = None,
                 overwrite: bool = False, skip_invalid: bool = False, progress: bool = True,
                 layout: str = "padded", template: Optional[Template] = None, overlong: str = "truncate",
                 batch_pairs: int = 8, fmt: Optional[str] = None) -> dict:
    """fmt: the preference layout (mindrlhf.data.formats.FORMATS), default read from the columns."""
    report = SkipReport()
    fmt = resolve_format(src_file, fmt)
    pairs = read_preference_pairs(src_file, fmt, skip_invalid=skip_invalid, report=report)
    result = convert_pairs(pairs, tokenizer, dst_file, seq_length, pad_token_id, overwrite=overwrite,
                           report=report, progress=progress, layout=layout, template=template, overlong=overlong,
                           source=src_file, skip_invalid=skip_invalid, batch_pairs=batch_pairs,
                           sides=("pos_resp", "neg_resp") if fmt == "cvalues" else ("chosen", "rejected"))
    result["format"] = fmt
    return result
