"""Reward normalisation: the mean and std of a checkpoint's rewards over an eval set, kept beside the checkpoint.

`reward_eval.py --save_stats` writes `<checkpoint root>/reward_stats.json` (chosen and rejected rewards together,
population std); `reward_infer.py --normalize`, the reward server's `--normalize` and the Hugging Face export
read it, so all of them apply (r - mean) / std with the same two numbers, as OpenRLHF's `normalize_reward` does.
The file records the weights it was computed for (checkpoints/reader.py: the step and a digest of the value head,
read from the checkpoint), not only its name: applying it to other weights (the file under that name trained
again, or copied in from another run) is an error saying what to rerun, not a silently shifted reward. A copy
or rename of the same weights keeps its stats. Every consumer goes through load_stats.
"""
import json
import os
from typing import Optional, Sequence

import numpy as np

from mindrlhf.errors import ConfigError
from mindrlhf.io import check_new_output, write_json
from mindrlhf.checkpoints.reader import same_weights, weights_identity

STATS_FILE = "reward_stats.json"


def stats_path(root: str) -> str:
    """Where the stats of the checkpoints under `root` (the folder holding rank_N/) live."""
    return os.path.join(root, STATS_FILE)


def _checkpoint_key(root: str, checkpoint: str) -> str:
    return os.path.relpath(os.path.abspath(checkpoint), os.path.abspath(root))


def compute_stats(chosen: Sequence[float], rejected: Sequence[float]) -> dict:
    """mean and std (population, float64) over chosen and rejected rewards together."""
    scores = np.concatenate([np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)])
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise ConfigError("cannot compute reward statistics: no scores, or a score that is not finite")
    return {"mean": float(scores.mean()), "std": float(scores.std()), "count": int(scores.size)}


def check_stats_output(root: str, overwrite: bool = False) -> str:
    """Refuse an existing stats file unless overwrite (before any scoring is done)."""
    return check_new_output(stats_path(root), overwrite)


def save_stats(root: str, checkpoint: str, step: Optional[int], chosen, rejected, eval_dataset: str,
               overwrite: bool = False) -> str:
    stats = compute_stats(chosen, rejected)
    if stats["std"] <= 0:
        raise ConfigError(f"{checkpoint}: every reward on {eval_dataset} is the same ({stats['mean']}); "
                          "a std of 0 cannot normalise")
    stats.update(checkpoint=_checkpoint_key(root, checkpoint), step=step, eval_dataset=str(eval_dataset),
                 weights=weights_identity(checkpoint))
    return write_json(check_new_output(stats_path(root), overwrite), stats)


def _rerun(root: str) -> str:
    return f"reward_eval.py --save_stats --overwrite --distributed_ckpt_path {root}"


def load_stats(root: str, checkpoint: str) -> dict:
    """The stats for the weights this checkpoint holds, or a ConfigError saying how to make them."""
    path = stats_path(root)
    if not os.path.isfile(path):
        raise ConfigError(f"no {STATS_FILE} beside {checkpoint} (looked for {path}): run reward_eval.py with "
                          "--save_stats on this checkpoint first")
    try:
        with open(path, encoding="utf-8") as fh:
            stats = json.load(fh)
        mean, std, made_for = float(stats["mean"]), float(stats["std"]), stats["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a reward statistics file ({err})") from None
    recorded = stats.get("weights")
    if not isinstance(recorded, dict):
        raise ConfigError(f"{path} does not record which weights it was computed for (written before stats were "
                          f"tied to weights): regenerate it, {_rerun(root)}")
    actual = weights_identity(checkpoint)
    if not same_weights(recorded, actual):
        raise ConfigError(f"{path} was computed for other weights ({made_for} then held step {recorded.get('step')}, "
                          f"value head {str(recorded.get('value_head_sha256'))[:12]}) than {checkpoint} holds "
                          f"(step {actual['step']}, value head {actual['value_head_sha256'][:12]}): the checkpoint "
                          f"changed since (trained again or copied in); rerun {_rerun(root)}")
    if not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
        raise ConfigError(f"{path}: mean {mean} / std {std} cannot normalise")
    return dict(stats, mean=mean, std=std, path=path)


def normalize(scores, stats: dict) -> np.ndarray:
    """(r - mean) / std in float64, as every consumer computes it."""
    return (np.asarray(scores, np.float64) - stats["mean"]) / stats["std"]
