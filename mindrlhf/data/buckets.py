"""Length buckets: the width a batch is padded to, and boundaries that fit a dataset's lengths.

Each distinct width is one graph compile (seconds for the tiny CPU model, minutes for 7B on Ascend), so a few
boundaries placed where the batches' longest pairs fall beat many evenly spaced ones. Pure numpy: conversion
uses it without MindSpore's dataset engine or MindFormers.
"""
import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from mindrlhf.errors import ConfigError

AUTO = "auto"


def bucket_length(length: int, boundaries: Sequence[int], seq_length: int) -> int:
    """The smallest boundary >= length (seq_length when none fits)."""
    for boundary in sorted(boundaries):
        if length <= boundary <= seq_length:
            return boundary
    return seq_length


def batch_maxima(pair_lengths: Sequence[int], batch_pairs: int, shuffles: int = 8, seed: int = 0) -> np.ndarray:
    """The longest pair of each batch when the pairs are shuffled and batched as in training (several
    shuffles, drop_remainder)."""
    lengths = np.asarray(pair_lengths, dtype=np.int64)
    batches = len(lengths) // batch_pairs
    if batches == 0:
        return lengths[:0]
    rng = np.random.default_rng(seed)
    maxima = [lengths[rng.permutation(len(lengths))[:batches * batch_pairs]].reshape(batches, batch_pairs).max(1)
              for _ in range(shuffles)]
    return np.concatenate(maxima)


def suggest_buckets(pair_lengths: Sequence[int], seq_length: int, batch_pairs: int = 8, max_buckets: int = 4,
                    granularity: int = 32, min_saving: float = 0.1) -> Optional[Dict]:
    """Boundaries (the last is seq_length) minimising the padded tokens of shuffled batches of `batch_pairs`
    pairs, each padded to its bucket, with at most `max_buckets` widths. Also says how those tokens compare with
    padding every pair to seq_length and with padding each batch to its own longest pair (TRL's way).

    pair_lengths: each pair's longer side (end_ind). None when there are fewer pairs than one batch. No
    boundaries ([]) when they would save less than `min_saving` of fixed padding's tokens: then the compiles
    cost more than they save on short runs.
    """
    maxima = batch_maxima(pair_lengths, batch_pairs)
    if maxima.size == 0:
        return None
    candidates = sorted({min(seq_length, granularity * -(-int(m) // granularity)) for m in maxima} | {seq_length})
    counts = np.array([np.count_nonzero(maxima <= c) for c in candidates])  # maxima covered up to each candidate
    n = len(candidates)
    inf = float("inf")
    # best[t][j]: fewest tokens covering every batch whose longest pair is <= candidates[j] with t boundaries,
    # the last at candidates[j]; back[t][j]: the boundary before it.
    best = [[inf] * n for _ in range(max_buckets + 1)]
    back = [[-1] * n for _ in range(max_buckets + 1)]
    for j in range(n):
        best[1][j] = candidates[j] * counts[j]
    for t in range(2, max_buckets + 1):
        for j in range(n):
            for i in range(j):
                cost = best[t - 1][i] + candidates[j] * (counts[j] - counts[i])
                if cost < best[t][j]:
                    best[t][j], back[t][j] = cost, i
    last = n - 1
    t = min(range(1, max_buckets + 1), key=lambda k: (best[k][last], k))  # fewest widths among the cheapest
    tokens = float(best[t][last])
    boundaries: List[int] = []
    j = last
    while t >= 1 and j >= 0:
        boundaries.append(candidates[j])
        j, t = back[t][j], t - 1
    boundaries = sorted(boundaries)
    vs_fixed = tokens / (seq_length * maxima.size)
    useful = len(boundaries) > 1 and 1.0 - vs_fixed >= min_saving
    return {"batch_pairs": batch_pairs, "bucket_boundaries": boundaries if useful else [],
            "tokens_vs_fixed": round(vs_fixed, 3), "tokens_vs_longest": round(tokens / float(maxima.sum()), 3)}


def boundaries_for(setting, files: Sequence[str], batch_pairs: int, log: Callable[[str], None] = print) -> List[int]:
    """A YAML bucket_boundaries value -> the boundaries to use. A list is used as it is; "auto" takes the ones
    conversion suggested for these files (recorded in each file's .stats.json), and none when a file has no
    suggestion (converted before suggestions existed) or the files disagree."""
    if setting is None or isinstance(setting, (list, tuple)):
        return sorted(int(b) for b in setting or [])
    if str(setting).strip().lower() != AUTO:
        raise ConfigError(f"bucket_boundaries: {setting!r}: expected a list of lengths, [] or {AUTO}")
    found = set()
    for path in files:
        stats = path + ".stats.json"
        try:
            with open(stats, encoding="utf-8") as fh:
                suggestion = json.load(fh)["buckets"]
            suggestion["bucket_boundaries"]  # pylint: disable=pointless-statement  (None: fewer pairs than a batch)
        except (OSError, ValueError, KeyError, TypeError):
            log(f"bucket_boundaries: {AUTO}: {stats} holds no suggestion (convert again to get one); every batch "
                "is padded to seq_length")
            return []
        found.add((tuple(suggestion["bucket_boundaries"]), int(suggestion["batch_pairs"])))
    if len(found) != 1:
        log(f"bucket_boundaries: {AUTO}: the {len(files)} files' suggestions differ; every batch is padded to "
            "seq_length")
        return []
    boundaries, pairs = found.pop()
    note = "" if pairs == batch_pairs else f" (computed for {pairs} pairs a batch, this run takes {batch_pairs})"
    log(f"bucket_boundaries: {AUTO} -> {list(boundaries)}, as conversion suggested for "
        f"{os.path.basename(files[0])}{note}")
    return list(boundaries)
