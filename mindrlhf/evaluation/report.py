"""The evaluation report a person reads: length bias, calibration and pictures, per checkpoint.

Lengths are response lengths in tokens: a pair's ids after the prefix its chosen and rejected sequences share (the
prompt as the template rendered it), so they are the same for rows, conversations and MindRecord files.

- length bias: accuracy on pairs whose chosen response is longer, and on those where it is shorter (pairs of
  equal length are counted apart); the Spearman correlation between reward and response length over every scored
  response; and the baseline "always pick the longer", right on a longer-chosen pair, wrong on a shorter-chosen
  one, and half right on a pair of equal length.
- calibration: p = sigmoid(r_chosen - r_rejected) is the model's probability that chosen is preferred. The
  Bradley-Terry log-loss is mean(-log p). The expected calibration error bins the confidence max(p, 1 - p) into
  CALIBRATION_BINS equal bins over [0.5, 1] and sums, weighted by the bin's share of pairs, |accuracy - mean
  confidence| per bin, where a pair is right when p > 0.5 (a tie, p = 0.5, is wrong, as in the accuracy).
- pictures (PNG, FIGURE_SIZE pixels, and TensorBoard images with the scalars): chosen vs rejected reward
  histograms, accuracy by length-difference bucket, a reliability diagram (newest checkpoint), and accuracy per
  checkpoint step; report.md links them.
"""
import os
import time
from typing import List, Sequence

import numpy as np

CALIBRATION_BINS = 10
# Buckets of chosen minus rejected response length, in tokens: (low, high], shown by their label
LENGTH_BUCKETS = ((-np.inf, -32, "< -32"), (-32, -8, "-32..-9"), (-8, -1, "-8..-1"), (-1, 0, "0"),
                  (0, 8, "1..8"), (8, 32, "9..32"), (32, np.inf, "> 32"))
FIGURE_SIZE = (640, 480)  # pixels: 6.4 x 4.8 inches at 100 dpi
FIGURES = {"reward_histogram": "chosen vs rejected rewards", "length_buckets": "accuracy by length difference",
           "reliability": "reliability diagram", "accuracy_by_step": "accuracy per checkpoint step"}


def response_lengths(chosen_ids: Sequence[Sequence[int]], rejected_ids: Sequence[Sequence[int]]):
    """Tokens after the prefix each pair's two sequences share (computed once per eval set)."""
    c_len, r_len = np.zeros(len(chosen_ids), np.int64), np.zeros(len(chosen_ids), np.int64)
    for i, (c, r) in enumerate(zip(chosen_ids, rejected_ids)):
        n = min(len(c), len(r))
        differ = np.flatnonzero(np.asarray(c[:n]) != np.asarray(r[:n]))
        shared = int(differ[0]) if differ.size else n
        c_len[i], r_len[i] = len(c) - shared, len(r) - shared
    return c_len, r_len


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks; NaN when either side is constant."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def length_bias(chosen, rejected, c_len, r_len) -> dict:
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    c_len, r_len = np.asarray(c_len), np.asarray(r_len)
    right = chosen > rejected
    longer, shorter, equal = c_len > r_len, c_len < r_len, c_len == r_len

    def acc(mask):
        return float(right[mask].mean()) if mask.any() else None

    baseline = (longer.sum() + 0.5 * equal.sum()) / len(right) if len(right) else None
    return {"accuracy_chosen_longer": acc(longer), "pairs_chosen_longer": int(longer.sum()),
            "accuracy_chosen_shorter": acc(shorter), "pairs_chosen_shorter": int(shorter.sum()),
            "pairs_equal_length": int(equal.sum()),
            "spearman_reward_length": spearman(np.concatenate([chosen, rejected]), np.concatenate([c_len, r_len])),
            "always_longer_accuracy": None if baseline is None else float(baseline)}


def _probabilities(chosen, rejected) -> np.ndarray:
    margin = np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64)
    return 1.0 / (1.0 + np.exp(-margin))


def reliability(chosen, rejected, bins: int = CALIBRATION_BINS) -> List[dict]:
    """Per confidence bin over [0.5, 1]: pairs, mean confidence, accuracy (empty bins left out)."""
    p = _probabilities(chosen, rejected)
    confidence = np.maximum(p, 1 - p)
    right = (p > 0.5).astype(np.float64)
    edges = np.linspace(0.5, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        if mask.any():
            out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "pairs": int(mask.sum()),
                        "confidence": float(confidence[mask].mean()), "accuracy": float(right[mask].mean())})
    return out


def calibration(chosen, rejected) -> dict:
    margin = np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64)
    total = len(margin)
    bins = reliability(chosen, rejected)
    ece = sum(b["pairs"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins) if total else None
    log_loss = float(np.mean(np.logaddexp(0.0, -margin))) if total else None  # -log sigmoid(margin), stable
    return {"ece": None if ece is None else float(ece), "bt_log_loss": log_loss, "bins": bins}


def length_buckets(chosen, rejected, c_len, r_len) -> List[dict]:
    right = np.asarray(chosen, np.float64) > np.asarray(rejected, np.float64)
    diff = np.asarray(c_len) - np.asarray(r_len)
    out = []
    for low, high, label in LENGTH_BUCKETS:
        mask = (diff > low) & (diff <= high)
        out.append({"bucket": label, "pairs": int(mask.sum()),
                    "accuracy": float(right[mask].mean()) if mask.any() else None})
    return out


def pair_figures(chosen, rejected, lengths) -> dict:
    """The report's numbers for one checkpoint: {'length_bias': .., 'calibration': .., 'length_buckets': ..};
    lengths: response_lengths of the eval set."""
    c_len, r_len = lengths
    return {"length_bias": length_bias(chosen, rejected, c_len, r_len),
            "calibration": calibration(chosen, rejected),
            "length_buckets": length_buckets(chosen, rejected, c_len, r_len)}


def _f(value, digits=4) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def format_figures(metrics: dict) -> str:
    lb, cal = metrics["length_bias"], metrics["calibration"]
    return (f"length bias: acc chosen longer {_f(lb['accuracy_chosen_longer'])} ({lb['pairs_chosen_longer']}), "
            f"chosen shorter {_f(lb['accuracy_chosen_shorter'])} ({lb['pairs_chosen_shorter']}), always-longer "
            f"{_f(lb['always_longer_accuracy'])}, spearman(reward, length) {_f(lb['spearman_reward_length'])}; "
            f"calibration: ECE {_f(cal['ece'])}, Bradley-Terry log-loss {_f(cal['bt_log_loss'])}")


# -- pictures ---------------------------------------------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(FIGURE_SIZE[0] / 100, FIGURE_SIZE[1] / 100), dpi=100)
    return plt, fig, ax


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_histogram(chosen, rejected, path: str, title: str) -> str:
    plt, fig, ax = _figure()
    both = np.concatenate([np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)])
    edges = np.histogram_bin_edges(both, bins=30) if both.size and np.ptp(both) > 0 else 10
    ax.hist(chosen, bins=edges, alpha=0.6, color="#2b8cbe", label="chosen")
    ax.hist(rejected, bins=edges, alpha=0.6, color="#e34a33", label="rejected")
    ax.set_xlabel("reward")
    ax.set_ylabel("responses")
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)


def plot_length_buckets(buckets: List[dict], path: str, title: str) -> str:
    plt, fig, ax = _figure()
    labels = [b["bucket"] for b in buckets]
    values = [b["accuracy"] if b["accuracy"] is not None else 0.0 for b in buckets]
    bars = ax.bar(labels, values, color="#3182bd")
    for bar, b in zip(bars, buckets):
        ax.annotate(f"n={b['pairs']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("chosen minus rejected response length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    return _save(plt, fig, path)


def plot_reliability(bins: List[dict], path: str, title: str) -> str:
    plt, fig, ax = _figure()
    ax.plot([0.5, 1.0], [0.5, 1.0], "--", color="gray", label="perfectly calibrated")
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    ax.bar(centres, [b["accuracy"] for b in bins], width=0.045, color="#31a354", alpha=0.7, label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="#006d2c")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence max(p, 1 - p), p = sigmoid(r_chosen - r_rejected)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    return _save(plt, fig, path)


def plot_accuracy_by_step(points: List[tuple], path: str, title: str) -> str:
    plt, fig, ax = _figure()
    steps = [s for s, _ in points]
    ax.plot(steps, [a for _, a in points], "o-", color="#08519c")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


# -- the report -------------------------------------------------------------------------------------------------
SCALARS = (("accuracy", ("accuracy",)), ("ece", ("calibration", "ece")), ("bt_log_loss", ("calibration", "bt_log_loss")),
           ("spearman_reward_length", ("length_bias", "spearman_reward_length")),
           ("accuracy_chosen_longer", ("length_bias", "accuracy_chosen_longer")),
           ("accuracy_chosen_shorter", ("length_bias", "accuracy_chosen_shorter")))


def _get(metrics: dict, keys):
    for key in keys:
        metrics = metrics.get(key) if isinstance(metrics, dict) else None
    return metrics


def _write_events(folder: str, results: List[dict], pngs: dict, step) -> str:
    """Scalars per checkpoint step and the newest checkpoint's figures as TensorBoard images."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    from mindrlhf.tools.loss_plot import ScalarWriter

    writer = ScalarWriter(folder)
    for i, r in enumerate(results):
        at = r["step"] if r.get("step") is not None else i
        for tag, keys in SCALARS:
            value = _get(r, keys)
            if value is not None and np.isfinite(value):
                writer.add(f"eval/{tag}", value, at)
    for name, path in pngs.items():
        with open(path, "rb") as fh:
            image = summary_pb2.Summary.Image(encoded_image_string=fh.read(), height=FIGURE_SIZE[1],
                                              width=FIGURE_SIZE[0], colorspace=4)
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=f"eval/{name}", image=image)])
        writer.writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step or 0), summary=summary))
    writer.close()
    return writer.path


def check_report_dir(folder: str, overwrite: bool = False) -> str:
    """Refuse an existing folder unless overwrite, and always one that is not an earlier report."""
    from mindrlhf.errors import OutputExistsError
    from mindrlhf.io import check_new_output

    check_new_output(folder, overwrite)
    if os.path.exists(folder) and not os.path.isfile(os.path.join(folder, "report.md")):
        raise OutputExistsError(f"{folder} exists and is not a report (no report.md): --overwrite replaces only an "
                                "earlier report; choose another --report_dir")
    return folder


def write_report(folder: str, summary: dict, scores: List[tuple], overwrite: bool = False) -> str:
    """report.md, the PNGs and a TensorBoard event file in `folder`, written whole (a staging folder renamed
    into place; with overwrite an earlier report is swapped out only once the new one is whole); returns
    report.md's path. scores: (step, chosen rewards, rejected rewards) per checkpoint."""
    from mindrlhf.io import replaced_folder

    check_report_dir(folder, overwrite)
    good = [r for r in summary["checkpoints"] if "error" not in r]
    newest = good[-1]
    step, chosen, rejected = scores[-1]
    title = f"step {step}" if step is not None else os.path.basename(str(newest["checkpoint"]))
    with replaced_folder(folder, replace=overwrite) as tmp:
        pngs = {
            "reward_histogram": plot_histogram(chosen, rejected, os.path.join(tmp, "reward_histogram.png"),
                                               f"rewards, {title}"),
            "length_buckets": plot_length_buckets(newest["length_buckets"], os.path.join(tmp, "length_buckets.png"),
                                                  f"accuracy by length difference, {title}"),
            "reliability": plot_reliability(newest["calibration"]["bins"], os.path.join(tmp, "reliability.png"),
                                            f"reliability, {title}"),
            "accuracy_by_step": plot_accuracy_by_step(
                [(r["step"] if r.get("step") is not None else i, r["accuracy"]) for i, r in enumerate(good)],
                os.path.join(tmp, "accuracy_by_step.png"), "accuracy per checkpoint"),
        }
        _write_events(tmp, good, pngs, step)
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as fh:
            fh.write(render_markdown(summary, good))
    return os.path.join(folder, "report.md")


def render_markdown(summary: dict, good: List[dict]) -> str:
    lines = ["# Reward model evaluation", "",
             f"Eval set: `{summary['eval_dataset']}` ({summary['pairs']} pairs), template `{summary['template']}`.",
             "", "| step | accuracy | chosen longer | chosen shorter | always longer | Spearman(reward, length) | ECE | "
             "BT log-loss | checkpoint |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in good:
        lb, cal = r["length_bias"], r["calibration"]
        lines.append(f"| {r.get('step', '-')} | {_f(r['accuracy'])} | {_f(lb['accuracy_chosen_longer'])} "
                     f"({lb['pairs_chosen_longer']}) | {_f(lb['accuracy_chosen_shorter'])} "
                     f"({lb['pairs_chosen_shorter']}) | {_f(lb['always_longer_accuracy'])} | "
                     f"{_f(lb['spearman_reward_length'])} | {_f(cal['ece'])} | {_f(cal['bt_log_loss'])} | "
                     f"`{os.path.basename(str(r['checkpoint']))}` |")
    for name in ("rewardbench", "rewardbench2"):
        if name in good[-1]:
            from mindrlhf.evaluation.rewardbench import format_benchmark

            lines += ["", f"## {name} (newest checkpoint)", "", "```", *format_benchmark(name, good[-1][name]), "```"]
    lines += ["", "## Figures (newest checkpoint; accuracy per step: every checkpoint)", ""]
    for name, caption in FIGURES.items():
        lines.append(f"![{caption}]({name}.png)")
        lines.append("")
    lines += ["The same scalars and figures are in this folder's TensorBoard event file "
              "(`tensorboard --logdir <this folder>`).", ""]
    return "\n".join(lines)
