"""Padding-free packing (issue #25, design notes PACKING.md): several pairs per row of seq_length tokens, one
static shape per step. The single source of the per-token layout codes; the planner that places pairs into rows and
steps; the packer that turns one planned step into the model's training inputs; a packer of single sequences
for scoring. Pure numpy: conversion and the tests use it without MindSpore.

Layout code of a token = segment * 8 + kind. segment >= 1 numbers the spans of a row, 0 is filler; kind bits:
0 plain sequence or shared prefix, 1 chosen answer, 2 rejected answer (shared_prefix), +4 pad inside a span.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mindrlhf.errors import ConfigError, InputError

KIND_PLAIN = 0
KIND_CHOSEN = 1
KIND_REJECTED = 2
PAD = 4
SEGMENT = 8  # code = segment * SEGMENT + kind

PACKING_MODES = ("pairs", "shared_prefix")
SPAN, LAST_TOKEN = "span", "last_token"


def code(segment, kind=KIND_PLAIN):
    """The layout code of a token (works on ints and arrays)."""
    return segment * SEGMENT + kind


def segment_of(codes):
    return np.asarray(codes) // SEGMENT


def kind_of(codes):
    return np.asarray(codes) % SEGMENT


def visible(codes_row) -> np.ndarray:
    """(S, S) bool, [i, j] = query i sees key j: the reference of the visibility rule (PACKING.md).

    Filler (segment 0) sees only itself; otherwise causal, same segment, pad keys hidden, and an answer never
    sees the other answer (the shared prefix, branch 0, is seen by both)."""
    codes = np.asarray(codes_row, dtype=np.int64)
    seg, kind = codes // SEGMENT, codes % SEGMENT
    pad, branch = (kind & PAD) != 0, kind & 3
    size = codes.shape[0]
    causal = np.tril(np.ones((size, size), dtype=bool))
    vis = causal & (seg[None, :] == seg[:, None]) & ~pad[None, :] \
        & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None]))
    filler = seg == 0
    vis[filler, :] = False
    vis[filler, filler] = True  # the diagonal of filler queries
    return vis


def packing_mode(value, where: str = "model.model_config.packing") -> Optional[str]:
    """A YAML packing value -> None (off), "pairs" or "shared_prefix"; anything else is a ConfigError."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false",
                                                                                                  "none", "off")):
        return None
    if isinstance(value, str) and value.strip() in PACKING_MODES:
        return value.strip()
    raise ConfigError(f"{where}: expected false, pairs or shared_prefix, got {value!r}")


@dataclass
class Pair:
    """One preference pair, unpadded: the loss-mask span is [divergence, end) as conversion stored it."""

    chosen: np.ndarray
    rejected: np.ndarray
    divergence: int
    end: int
    margin: Optional[float] = None
    where: Optional[str] = None  # "file: row i", for error messages

    def label(self, index: int) -> str:
        """How errors name this pair: its file and row when known, else its index."""
        return self.where or f"pair {index}"

    def row_length(self, shared_prefix: bool, loss_type: str = SPAN) -> int:
        """Tokens this pair takes in its row (it never crosses one)."""
        c, r, d, e = len(self.chosen), len(self.rejected), self.divergence, self.end
        span = loss_type == SPAN
        if shared_prefix:
            return 2 * e - d if span else c + r - d
        return 2 * e if span else c + r


def check_no_pad_in_text(chosen, rejected, pad_token_id: int, where: str = "record"):
    """The pad-id rule, one for padded training, packed training and scoring: a text never holds the pad id.
    The padded model hides every key equal to it (MindFormers builds the mask from ids != pad), so such a token
    would silently vanish; conversion refuses it, and so does every reader of records made elsewhere."""
    for field, ids in (("chosen_input_ids", chosen), ("rejected_input_ids", rejected)):
        at = np.flatnonzero(np.asarray(ids) == pad_token_id)
        if at.size:
            raise InputError(where, None, field, f"token {int(at[0])} of the text is {pad_token_id}, the pad id, "
                                                 "which the model hides as padding; convert again with a "
                                                 "--pad_token_id that never occurs in the text")


def pair_from_record(record: dict, pad_token_id: int, where: str = "record") -> Pair:
    """The stored fields of one MindRecord row (padded or compact layout; margin when present) -> Pair.

    divergence/end are derived as convert.build_samples does (first index where the pad-padded rows differ;
    max of the two lengths) and checked against the stored end_ind and loss_mask, which the padded loss uses."""
    c_len = int(np.asarray(record["chosen_attention_mask"]).sum())
    r_len = int(np.asarray(record["rejected_attention_mask"]).sum())
    chosen = np.asarray(record["chosen_input_ids"], dtype=np.int32)[:c_len].copy()
    rejected = np.asarray(record["rejected_input_ids"], dtype=np.int32)[:r_len].copy()
    check_no_pad_in_text(chosen, rejected, pad_token_id, where)
    end = max(c_len, r_len)
    padded_c, padded_r = np.full(end, pad_token_id, np.int32), np.full(end, pad_token_id, np.int32)
    padded_c[:c_len], padded_r[:r_len] = chosen, rejected
    differ = padded_c != padded_r
    if not differ.any():
        raise InputError(where, None, "rejected_input_ids", "chosen and rejected are identical (no loss-mask token)")
    divergence = int(differ.argmax())
    stored_end = int(np.asarray(record["end_ind"]))
    if stored_end != end:
        raise InputError(where, None, "end_ind", f"{stored_end}, but the attention masks give {end}")
    mask = np.asarray(record["loss_mask"]).reshape(-1)
    expected = np.zeros(max(len(mask), end), dtype=bool)
    expected[divergence:end] = True
    if len(mask) < end or not np.array_equal(mask.astype(bool), expected[:len(mask)]):
        raise InputError(where, None, "loss_mask", f"not the span [{divergence}, {end}) the token ids give with "
                                                   f"pad_token_id {pad_token_id} (data padded with another pad id?)")
    margin = float(np.asarray(record["margin"])) if record.get("margin") is not None else None
    return Pair(chosen, rejected, divergence, end, margin, where)


def pair_spans(shared_prefix: bool) -> int:
    """Spans (segments) one pair takes in its row: chosen and rejected, or one shared_prefix span."""
    return 1 if shared_prefix else 2


def pair_row_lengths(pairs: Sequence[Pair], seq_length: int, shared_prefix: bool, loss_type: str = SPAN) -> np.ndarray:
    """Each pair's tokens in its row; a pair longer than one row is a ConfigError naming it and what to do."""
    lengths = np.array([p.row_length(shared_prefix, loss_type) for p in pairs], dtype=np.int64)
    over = np.flatnonzero(lengths > seq_length)
    if over.size:
        i = int(over[0])
        pair = pairs[i]
        hint = (f"set model.model_config.seq_length >= {int(lengths.max())} (twice the longest pair; the rows may be "
                "longer than the converted data's seq_length)")
        if not shared_prefix and pair.row_length(True, loss_type) <= seq_length:
            hint += " or model.model_config.packing: shared_prefix"
        raise ConfigError(f"{pair.label(i)} (chosen {len(pair.chosen)} tokens, rejected {len(pair.rejected)}, "
                          f"end_ind {pair.end}, divergence {pair.divergence}) needs {int(lengths[i])} tokens in one "
                          f"row, more than seq_length {seq_length} ({over.size} such pair(s)); a pair never crosses "
                          f"a row: {hint}")
    return lengths


def check_tnd_room(lengths, seq_length: int, entries: Optional[int], spans_per_pair: int, name) -> None:
    """Ascend (entries: actual_seq_len's entries a row, None elsewhere): a row holding one pair keeps entries -
    spans_per_pair filler tokens as one-token FlashAttention blocks, so a pair longer than the rest is refused,
    named by name(i)."""
    if entries is None:
        return
    room = seq_length - (entries - spans_per_pair)
    over = np.flatnonzero(np.asarray(lengths) > room)
    if over.size:
        i = int(over[0])
        raise ConfigError(f"{name(i)} needs {int(lengths[i])} tokens; on Ascend a row of {seq_length} holds at "
                          f"most {room} with one pair: it keeps {entries - spans_per_pair} filler tokens as "
                          f"FlashAttention blocks (actual_seq_len: {entries} entries a row, none empty); use "
                          f"seq_length >= {int(np.max(lengths)) + entries - spans_per_pair}")


def fits_row(left: int, held: int, need: int, entries: Optional[int], spans_per_pair: int) -> bool:
    """Whether a pair of `need` tokens fits a row with `left` tokens free that holds `held` pairs. On Ascend
    (entries) the row keeps its reserve after it: fewer spans than entries, and entries - spans filler tokens."""
    if left < need:
        return False
    if entries is None:
        return True
    spans = (held + 1) * spans_per_pair
    return spans < entries and left - need >= entries - spans


def plan_steps(pair_lengths: Sequence[int], rows: int, seq_length: int, seed: int = 0,
               open_rows: Optional[int] = None, multiple_of: int = 1, tnd_entries: Optional[int] = None,
               spans_per_pair: int = 2, names: Optional[Sequence[str]] = None) -> List[List[Tuple[int, int]]]:
    """Place every pair once into rows of seq_length tokens, R = `rows` rows a step: list of steps, each a list
    of (row, pair index) in row order, then order within the row.

    Shuffled (seed) then online best fit into at most `open_rows` open rows (the fullest is closed when a new
    one is needed): the order stays random, the long tail fills with short pairs. Rows are then spread evenly
    over ceil(rows needed / R) steps, rounded up to `multiple_of` (data-parallel shards: every rank gets the
    same number of steps, no pair dropped). Deterministic for a seed.
    tnd_entries: Ascend (None: no limit): actual_seq_len's entries a row (tnd_row_entries), so a row of k spans
    keeps the planner reserve, at least tnd_entries - k filler tokens, one TND block each (k < tnd_entries),
    each pair taking spans_per_pair spans (pair_spans). names: how errors name pair i (default "pair i"; the
    dataset passes "file: row i").
    """
    lengths = np.asarray(pair_lengths, dtype=np.int64).reshape(-1)

    def name(i):
        return names[i] if names is not None else f"pair {i}"

    entries = None if tnd_entries is None else int(tnd_entries)
    if entries is not None and entries <= spans_per_pair:
        raise ConfigError(f"packing: {entries} TND entries a row cannot hold one pair ({spans_per_pair} spans) "
                          "and a filler block")
    if rows < 1 or seq_length < 1:
        raise ConfigError(f"packing needs rows >= 1 and seq_length >= 1, got rows {rows}, seq_length {seq_length}")
    if lengths.size == 0:
        raise ConfigError("packing: no pairs to plan")
    over = np.flatnonzero(lengths > seq_length)
    if over.size:
        i = int(over[0])
        raise ConfigError(f"{name(i)} needs {int(lengths[i])} tokens in one row, more than seq_length {seq_length}; "
                          f"a pair never crosses a row: use seq_length >= {int(lengths.max())} or shared_prefix")
    check_tnd_room(lengths, seq_length, entries, spans_per_pair, name)
    if (lengths < 1).any():
        raise ConfigError(f"{name(int(np.flatnonzero(lengths < 1)[0]))} has no tokens")
    width = int(open_rows or max(16, 2 * rows))
    rng = np.random.default_rng(0 if seed is None else int(seed))
    remaining = np.full(width, -1, dtype=np.int64)  # -1: slot not in use
    content: List[List[int]] = [[] for _ in range(width)]
    closed: List[List[int]] = []
    big = np.int64(seq_length + 1)
    for index in rng.permutation(lengths.size):
        need = lengths[index]
        fits = remaining >= need
        if entries is not None:  # the reserve: entries - (spans after this pair) filler tokens stay free
            spans = np.array([len(c) + 1 for c in content]) * spans_per_pair
            fits &= remaining - need >= entries - spans
        if fits.any():
            slot = int(np.argmin(np.where(fits, remaining, big)))
        else:
            free = np.flatnonzero(remaining < 0)
            if free.size:
                slot = int(free[0])
            else:
                slot = int(np.argmin(remaining))  # the fullest open row is done
                closed.append(content[slot])
            content[slot], remaining[slot] = [], seq_length
        content[slot].append(int(index))
        remaining[slot] -= need
        if entries is not None and (len(content[slot]) + 1) * spans_per_pair >= entries:
            closed.append(content[slot])  # no entry left for another pair's spans: done
            content[slot], remaining[slot] = [], -1
    used = np.flatnonzero(remaining >= 0)
    closed.extend(content[s] for s in used[np.argsort(remaining[used], kind="stable")])
    n_rows = len(closed)
    n_steps = -(-n_rows // rows)
    n_steps = -(-n_steps // multiple_of) * multiple_of
    if n_steps > n_rows:
        raise ConfigError(f"{lengths.size} pair(s) fill {n_rows} row(s), fewer than the {n_steps} steps that "
                          f"{multiple_of} data-parallel ranks need (one step each at least)")
    base, extra = divmod(n_rows, n_steps)
    steps, start = [], 0
    for k in range(n_steps):
        count = base + (1 if k < extra else 0)
        steps.append([(r, i) for r, row in enumerate(closed[start:start + count]) for i in row])
        start += count
    return steps


def row_counts(max_rows: int, multiple_of: int = 1) -> List[int]:
    """The row counts a packed step or scoring pass may have: multiple_of x (1, 2, 4, ... below max_rows /
    multiple_of, and that bound itself). Graph mode compiles one shape for each, once."""
    group = max(1, int(multiple_of))
    top = max(1, int(max_rows) // group)
    sizes, size = {top}, 1
    while size < top:
        sizes.add(size)
        size *= 2
    return sorted(group * s for s in sizes)


def rows_for(lengths: Sequence[int], seq_length: int, tnd_entries: Optional[int] = None,
             spans_per_pair: int = 2) -> List[List[int]]:
    """First-fit decreasing of these pairs (their row lengths, each <= seq_length) into rows: the rows, each the
    pairs' indices in this list. Few rows, and depends only on the lengths (not on rank or step). On Ascend
    (tnd_entries) every row keeps plan_steps' reserve (fits_row)."""
    remaining: List[int] = []
    content: List[List[int]] = []
    for index in np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable"):
        need = int(lengths[index])
        row = next((r for r, left in enumerate(remaining)
                    if fits_row(left, len(content[r]), need, tnd_entries, spans_per_pair)), None)
        if row is None:
            remaining.append(int(seq_length))
            content.append([])
            row = len(content) - 1
        remaining[row] -= need
        content[row].append(int(index))
    return content


def worst_rows(batch_size: int, longest: int, seq_length: int, tnd_entries: Optional[int] = None,
               spans_per_pair: int = 2) -> int:
    """An upper bound on the rows rows_for needs for batch_size pairs of at most `longest` tokens: every row
    but the last is filled past capacity - longest (first fit). On Ascend (tnd_entries) the capacity is
    seq_length - tnd_entries (the reserve never takes more) and a row holds at most (tnd_entries - 1) //
    spans_per_pair pairs."""
    batch_size, longest = int(batch_size), int(longest)
    capacity = int(seq_length) - (int(tnd_entries) if tnd_entries is not None else 0)
    by_tokens = batch_size if longest * 2 > capacity else -(-batch_size * longest // (capacity - longest + 1)) + 1
    bound = min(batch_size, by_tokens)
    if tnd_entries is not None:
        bound = max(bound, -(-batch_size // max(1, (int(tnd_entries) - 1) // spans_per_pair)))
    return max(1, bound)


def plan_batch(group_lengths: Sequence[Sequence[int]], seq_length: int, sizes: Sequence[int],
               tnd_entries: Optional[int] = None, spans_per_pair: int = 2,
               names: Optional[Sequence[str]] = None) -> Tuple[int, List[List[Tuple[int, int]]]]:
    """One step of `batch_size` pairs per data-parallel rank, drawn in the run's order (never chosen by fit):
    group_lengths[g] = the row lengths of rank g's pairs. Returns (rows, placements): the smallest of `sizes`
    that holds every rank's rows (one shape for all ranks of a step), and per rank its (row, pair index)
    placement, pair indices into that rank's list, in the order pack_step takes. ConfigError when the largest
    of `sizes` cannot hold them."""
    laid = [rows_for(lengths, seq_length, tnd_entries, spans_per_pair) for lengths in group_lengths]
    need = max(len(rows) for rows in laid)
    pairs = max(len(lengths) for lengths in group_lengths)
    rows = next((s for s in sizes if s >= need and s * seq_length // 2 >= pairs), None)
    if rows is None:
        where = f" ({', '.join(names)})" if names else ""
        raise ConfigError(f"a step's {pairs} pair(s){where} need {need} rows of {seq_length} tokens, more than "
                          f"train_dataset.pack_rows {max(sizes)}: raise pack_rows or seq_length, or lower batch_size")
    return rows, [[(r, i) for r, row in enumerate(group) for i in row] for group in laid]


def filler_share(pair_lengths: Sequence[int], n_steps: int, rows: int, seq_length: int) -> float:
    """The share of all computed tokens (steps x rows x seq_length) that carry no pair."""
    return 1.0 - float(np.sum(pair_lengths)) / float(n_steps * rows * seq_length)


def pack_step(pairs: Sequence[Pair], placement: Sequence[Tuple[int, int]], rows: int, seq_length: int,
              pad_token_id: int, loss_type: str = SPAN, shared_prefix: bool = False,
              margin: bool = False) -> Dict[str, np.ndarray]:
    """One planned step -> the training inputs of PACKING.md: input_ids, position_id, attention_mask (layout
    codes) (R, S); loss_mask (2, P); end_ind (4, P); margin (2, P) when `margin`.

    pairs: indexable by the pair indices of `placement` (a plan_steps step). Pair slot p is placement[p];
    comparisons follow in the same order, t ascending (span loss only; last_token has none and no pads).
    """
    size, span = seq_length, loss_type == SPAN
    slots = rows * size // 2
    input_ids = np.full((rows, size), pad_token_id, dtype=np.int32)
    position_id = np.zeros((rows, size), dtype=np.int32)
    codes = np.zeros((rows, size), dtype=np.int32)
    loss_mask = np.zeros((2, slots), dtype=np.float32)
    end_ind = np.zeros((4, slots), dtype=np.int32)
    margins = np.zeros((2, slots), dtype=np.float32)
    fill, segments = [0] * rows, [0] * rows
    n_pairs, comparisons = len(placement), 0

    def put(row, start, tokens, positions, kinds):
        stop = start + len(tokens)
        if stop > size:
            raise ValueError(f"placement overflows row {row}: {stop} > seq_length {size}")
        input_ids[row, start:stop] = tokens
        position_id[row, start:stop] = positions
        codes[row, start:stop] = segments[row] * SEGMENT + kinds
        return stop

    for slot, (row, index) in enumerate(placement):
        pair = pairs[index]
        c_len, r_len, d, e = len(pair.chosen), len(pair.rejected), pair.divergence, pair.end
        padded_c, padded_r = np.full(e, pad_token_id, np.int32), np.full(e, pad_token_id, np.int32)
        padded_c[:c_len], padded_r[:r_len] = pair.chosen, pair.rejected
        pad_c = np.where(np.arange(e) >= c_len, PAD, 0)
        pad_r = np.where(np.arange(e) >= r_len, PAD, 0)
        start = fill[row]
        c_stop, r_stop = (e, e) if span else (c_len, r_len)  # the span loss reads both sides up to the pair's end
        if shared_prefix:
            segments[row] += 1
            at = put(row, start, padded_c[:d], np.arange(d), KIND_PLAIN)
            at = put(row, at, padded_c[d:c_stop], np.arange(d, c_stop), KIND_CHOSEN + pad_c[d:c_stop])
            r_start = at
            fill[row] = put(row, at, padded_r[d:r_stop], np.arange(d, r_stop), KIND_REJECTED + pad_r[d:r_stop])
            chosen_at = start + np.arange(e)  # prefix and chosen answer are contiguous
            rejected_at = np.where(np.arange(e) < d, start + np.arange(e), r_start + np.arange(e) - d)
        else:
            segments[row] += 1
            r_start = put(row, start, padded_c[:c_stop], np.arange(c_stop), pad_c[:c_stop])
            segments[row] += 1
            fill[row] = put(row, r_start, padded_r[:r_stop], np.arange(r_stop), pad_r[:r_stop])
            chosen_at, rejected_at = start + np.arange(e), r_start + np.arange(e)
        base = row * size
        end_ind[2, slot] = base + chosen_at[c_len - 1]
        end_ind[3, slot] = base + rejected_at[r_len - 1]
        loss_mask[1, slot] = 1.0 / n_pairs
        value = float(pair.margin) if margin and pair.margin is not None else 0.0
        margins[1, slot] = value
        if span:
            count = e - d
            if comparisons + count > slots:
                raise ValueError(f"{comparisons + count} comparisons exceed the {slots} slots of a step")
            cut = slice(comparisons, comparisons + count)
            end_ind[0, cut] = base + chosen_at[d:e]
            end_ind[1, cut] = base + rejected_at[d:e]
            loss_mask[0, cut] = 1.0 / (count * n_pairs)
            margins[0, cut] = value
            comparisons += count
    out = {"input_ids": input_ids, "position_id": position_id, "attention_mask": codes, "loss_mask": loss_mask,
           "end_ind": end_ind}
    if margin:
        out["margin"] = margins
    return out


def pack_sequences(sequences, rows: int, width: int, pad_token_id: int = 0,
                   tnd_entries: Optional[int] = None) -> List[Dict[str, np.ndarray]]:
    """Scoring: first-fit-decreasing of sequences (token arrays, or bare lengths for the layout only) into
    passes of `rows` rows of `width`. Per pass: input_ids, position_id, attention_mask (codes) (R, width);
    end_ind (P,) the flat index of each packed sequence's last token (P = R * width // 2, unused 0); index (n,)
    the sequences' indices in end_ind order; start (n,) each one's flat start.
    A token equal to pad_token_id inside a sequence gets the pad kind (+4): hidden as a key, as the padded
    scorer's mask hides every key equal to pad_token_id. tnd_entries: Ascend (None: no limit): actual_seq_len's
    entries a row, so a row of k sequences keeps at least tnd_entries - k filler tokens (plan_steps' reserve)."""
    items = list(sequences)
    tokens = None if all(np.ndim(s) == 0 for s in items) else [np.asarray(s, dtype=np.int32) for s in items]
    lengths = np.array([int(s) for s in items] if tokens is None else [len(t) for t in tokens], dtype=np.int64)
    entries = None if tnd_entries is None else int(tnd_entries)
    if entries is not None and entries < 2:
        raise ConfigError(f"packing: {entries} TND entries a row cannot hold a sequence and a filler block")
    longest = width if entries is None else width - (entries - 1)
    bad = np.flatnonzero((lengths > longest) | (lengths < 1))
    if bad.size:
        i = int(bad[0])
        reserve = "" if entries is None else f" less {entries - 1} filler tokens kept as FlashAttention blocks"
        raise ConfigError(f"sequence {i} has {int(lengths[i])} tokens; packing takes 1 to {longest} (the row "
                          f"width {width}{reserve})")
    slots = rows * width // 2
    reserve = 0 if entries is None else entries
    remaining: List[int] = []
    content: List[List[int]] = []
    for index in np.argsort(-lengths, kind="stable"):
        need = int(lengths[index])
        # a row never holds more sequences than a pass has slots (binds only for rows=1: many 1-token sequences),
        # and on Ascend keeps the reserve
        row = next((r for r, left in enumerate(remaining)
                    if left - need >= (reserve - len(content[r]) - 1 if entries else 0)
                    and len(content[r]) < (slots if entries is None else min(slots, entries - 1))),
                   None)
        if row is None:
            remaining.append(width)
            content.append([])
            row = len(remaining) - 1
        remaining[row] -= need
        content[row].append(int(index))
    passes, current = [], []
    for row in content:
        if current and (len(current) == rows or sum(map(len, current)) + len(row) > slots):
            passes.append(current)
            current = []
        current.append(row)
    if current:
        passes.append(current)
    out = []
    for pass_rows in passes:
        input_ids = np.full((rows, width), pad_token_id, dtype=np.int32)
        position_id = np.zeros((rows, width), dtype=np.int32)
        codes = np.zeros((rows, width), dtype=np.int32)
        end_ind = np.zeros(slots, dtype=np.int32)
        index, starts = [], []
        for r, row in enumerate(pass_rows):
            at = 0
            for segment, i in enumerate(row, start=1):
                n = int(lengths[i])
                if tokens is not None:
                    input_ids[r, at:at + n] = tokens[i]
                position_id[r, at:at + n] = np.arange(n)
                codes[r, at:at + n] = code(segment)
                if tokens is not None:
                    codes[r, at:at + n] += np.where(tokens[i] == pad_token_id, PAD, 0).astype(np.int32)
                end_ind[len(index)] = r * width + at + n - 1
                index.append(i)
                starts.append(r * width + at)
                at += n
        out.append({"input_ids": input_ids, "position_id": position_id, "attention_mask": codes, "end_ind": end_ind,
                    "index": np.array(index, dtype=np.int64), "start": np.array(starts, dtype=np.int64)})
    return out


# ---- Ascend: our packed attention calls FlashAttentionScore in its documented variable-length mode (TND,
# sparse_mode 3) with actual_seq_qlen = actual_seq_kvlen = the cumulative block ends of one call's flattened rows.
# MindSpore 2.9's docstring: no zero-length block, increasing ends, the last one T, at most MAX_FA_ENTRIES entries.
# A static shape needs a fixed count: each row lists exactly tnd_row_entries(S) blocks, its spans then its filler
# split into blocks (one token each, the last one the rest), so a row of k spans keeps that many minus k filler
# tokens (the planner's reserve). docs/packing.md cites the docstring.
TND_ROW_ENTRIES = 128  # a row's entries at seq_length >= 16 * 128; shorter rows list seq_length // 16
MAX_FA_ENTRIES = 1024
ACTUAL_SEQ_LEN = "actual_seq_len"  # the dataset column and the model's construct argument


def tnd_row_entries(seq_length: int) -> int:
    """actual_seq_len's entries a row of seq_length: the reserve costs at most a sixteenth of a row (3% at
    4096), and a row holds up to that many spans less one."""
    return min(TND_ROW_ENTRIES, max(3, int(seq_length) // 16))


def tnd_rows_per_call(seq_length: int) -> int:
    """The most rows one FlashAttention call takes: MAX_FA_ENTRIES entries, tnd_row_entries a row."""
    return MAX_FA_ENTRIES // tnd_row_entries(seq_length)


def check_ascend_pack_rows(pack_rows: int, row_groups: int, seq_length: int,
                           where: str = "train_dataset.pack_rows") -> None:
    """ConfigError unless pack_rows splits into row_groups whole FlashAttention calls of at most
    tnd_rows_per_call rows each."""
    rows, groups, most = int(pack_rows), int(row_groups), tnd_rows_per_call(seq_length)
    if rows % groups:
        raise ConfigError(f"{where} ({rows}) must be a multiple of {groups}, the FlashAttention calls a step is "
                          "split into (data_parallel under full_batch)")
    if rows // groups > most:
        raise ConfigError(f"{where} ({rows}) gives {rows // groups} rows a FlashAttention call; its actual_seq_len "
                          f"takes at most {most} ({MAX_FA_ENTRIES} entries, {tnd_row_entries(seq_length)} a row "
                          f"of {seq_length})")


def actual_seq_len(codes, entries: int, row_groups: int = 1) -> np.ndarray:
    """(R, S) layout codes -> (R, entries) int32: the cumulative block ends FlashAttentionScore takes as
    actual_seq_qlen and actual_seq_kvlen (TND, sparse_mode 3), one call's rows flattened.

    Row r lists the END offset of each span (segment 1, 2, ...), then its filler (the unused end) as
    entries - spans blocks: one token each, the last one the rest (filler outputs are never read, and filler and
    spans never see each other), each plus the row's offset in its call. No leading 0, no empty block, the last
    entry of a call its T.
    row_groups: how many FlashAttention calls the R rows are split into, as contiguous equal blocks (data_parallel
    under full_batch; 1 when each rank reads its own rows; packing refuses micro batches): offsets restart at 0
    in each block, because MindSpore splits the flattened list by dp without rebasing it.
    Raises ValueError for a layout the TND path cannot run exactly (shared_prefix answers, in-span pads,
    spans out of order, filler before a span, a row without its reserve of filler tokens).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be a 2-D integer array (rows, seq_length), got {codes.dtype} {codes.shape}")
    rows, seq = codes.shape
    entries = int(entries)
    if entries < 1:
        raise ValueError(f"entries must be >= 1, got {entries}")
    if row_groups < 1 or rows % row_groups:
        raise ValueError(f"row_groups ({row_groups}) must divide the {rows} rows into equal blocks")
    per_call = rows // row_groups
    if per_call * entries > MAX_FA_ENTRIES:
        raise ValueError(f"one FlashAttention call would get {per_call} rows x {entries} = "
                         f"{per_call * entries} actual_seq_len entries; the TND layout allows {MAX_FA_ENTRIES}: "
                         f"fewer rows per call")
    if (codes < 0).any():
        r, c = np.argwhere(codes < 0)[0]
        raise ValueError(f"negative layout code {codes[r, c]} at row {r}, column {c}")
    kinds = codes % SEGMENT
    if kinds.any():
        r, c = np.argwhere(kinds != 0)[0]
        what = "an in-span pad (kind +4)" if kinds[r, c] & 4 else "a shared_prefix answer (kind 1/2)"
        raise ValueError(f"row {r}, column {c} holds {what}: FlashAttention with actual_seq_len gives each span "
                         "plain causal attention, which cannot hide pad keys or keep two answers apart")
    segments = codes // SEGMENT
    out = np.empty((rows, entries), dtype=np.int64)
    for r in range(rows):
        seg = segments[r]
        used = int(np.count_nonzero(seg))
        if seg[used:].any():
            raise ValueError(f"row {r}: filler (segment 0) must be the row's unused end, but a span follows it")
        steps = np.diff(seg[:used])
        if used and (seg[0] != 1 or ((steps != 0) & (steps != 1)).any()):
            raise ValueError(f"row {r}: spans must be numbered 1, 2, ... in order, each one contiguous run")
        spans = np.append(np.flatnonzero(np.diff(seg[:used])) + 1, used) if used else np.zeros(0, np.int64)
        blocks = entries - len(spans)
        if blocks < 1 or seq - used < blocks:
            raise ValueError(f"row {r} holds {len(spans)} spans and {seq - used} filler tokens; its {entries} "
                             f"actual_seq_len entries need at least {max(blocks, 1)} filler tokens and fewer than "
                             f"{entries} spans (the planner's reserve: no block may be empty)")
        filler = np.append(used + np.arange(1, blocks), seq)
        offset = (r % per_call) * seq
        out[r] = np.concatenate([spans, filler]) + offset
    if out.max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError("actual_seq_len offsets overflow int32")
    return out.astype(np.int32)
