"""Length buckets: the width a batch is padded to, and boundaries that fit a dataset's lengths.

Each distinct width is one graph compile (seconds for the tiny CPU model, minutes for 7B on Ascend), so a few
boundaries placed where the batches' longest pairs fall beat many evenly spaced ones. Pure numpy: conversion
uses it without MindSpore's dataset engine or MindFormers.
"""
from typing import Dict, List, Optional, Sequence

import numpy as np


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
