"""Pairwise metrics: accuracy (ties are reported, never counted as wins), rewards, margins, per-type accuracy."""
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np


def pairwise_metrics(chosen: Sequence[float], rejected: Sequence[float],
                     pos_types: Optional[Sequence[Optional[str]]] = None,
                     neg_types: Optional[Sequence[Optional[str]]] = None) -> dict:
    chosen = np.asarray(chosen, dtype=np.float64)
    rejected = np.asarray(rejected, dtype=np.float64)
    if chosen.shape != rejected.shape:
        raise ValueError(f"{chosen.shape[0]} chosen scores but {rejected.shape[0]} rejected scores")
    margin = chosen - rejected
    total = int(margin.size)
    wins = int((margin > 0).sum())
    ties = int((margin == 0).sum())
    out = {
        "pairs": total,
        "accuracy": wins / total if total else 0.0,
        "wins": wins,
        "ties": ties,
        "losses": total - wins - ties,
        "mean_chosen_reward": float(chosen.mean()) if total else 0.0,
        "mean_rejected_reward": float(rejected.mean()) if total else 0.0,
        "margin_mean": float(margin.mean()) if total else 0.0,
        "margin_std": float(margin.std()) if total else 0.0,
    }
    if pos_types is not None and neg_types is not None and any(t for t in pos_types):
        groups = defaultdict(list)
        for i, (pos, neg) in enumerate(zip(pos_types, neg_types)):
            groups[f"{pos}→{neg}"].append(i)
        out["per_type"] = {
            key: {"pairs": len(idx), "accuracy": float((margin[idx] > 0).mean()),
                  "ties": int((margin[idx] == 0).sum()), "margin_mean": float(margin[idx].mean())}
            for key, idx in sorted(groups.items())}
    return out
