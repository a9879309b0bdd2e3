"""RewardBench v1/v2 scores and the report's length-bias and calibration figures against hand computations on fixed
rewards (no model); the report's PNGs, TensorBoard events and report.md are written whole."""
import json
import math
import struct

import numpy as np
import pytest

from mindrlhf.errors import OutputExistsError
from mindrlhf.evaluation import report
from mindrlhf.evaluation.rewardbench import benchmark_scores, rewardbench_v1, rewardbench_v2, ties_score


def test_rewardbench_v1_sections_weight_subsets_by_the_published_counts():
    rows = [  # (subset, chosen reward, rejected reward)
        ("alpacaeval-easy", 1.0, 0.0), ("alpacaeval-easy", 0.0, 1.0),  # 0.5
        ("mt-bench-easy", 2.0, 1.0),  # 1.0
        ("mt-bench-hard", 0.0, 1.0),  # 0.0
        ("llmbar-natural", 3.0, 1.0), ("llmbar-natural", 1.0, 0.5),  # 1.0
        ("refusals-dangerous", 1.0, 1.0),  # a tie is wrong: 0.0
        ("math-prm", 1.0, 0.0),  # 1.0, counted as 984 examples
        ("hep-python", 1.0, 0.0), ("hep-python", 0.0, 2.0),  # 0.5, 164
        ("my-own-subset", 1.0, 0.0),  # reported, in no section
    ]
    result = rewardbench_v1([r[1] for r in rows], [r[2] for r in rows], [r[0] for r in rows])
    assert result["subsets"]["alpacaeval-easy"] == {"accuracy": 0.5, "pairs": 2}
    assert result["subsets"]["refusals-dangerous"]["accuracy"] == 0.0
    chat = (0.5 * 100 + 1.0 * 28) / (100 + 28)
    chat_hard = (0.0 * 37 + 1.0 * 100) / (37 + 100)
    safety = 0.0
    reasoning = (1.0 * 984 + 0.5 * 164) / (984 + 164)
    assert result["sections"] == pytest.approx({"Chat": chat, "Chat Hard": chat_hard, "Safety": safety,
                                                "Reasoning": reasoning})
    assert result["overall"] == pytest.approx((chat + chat_hard + safety + reasoning) / 4)
    assert result["outside_sections"] == ["my-own-subset"]


def test_rewardbench_v2_best_of_n_and_ties():
    groups = [
        {"subset": "Focus", "id": "a", "chosen": [2.0], "rejected": [1.0, 0.5, 3.0]},  # a rejected is higher: 0
        {"subset": "Focus", "id": "b", "chosen": [5.0], "rejected": [1.0, 2.0, 3.0]},  # 1
        {"subset": "Focus", "id": "c", "chosen": [2.0], "rejected": [2.0, 1.0, 0.0]},  # tied with one at the top: 1/2
        {"subset": "Math", "id": "d", "chosen": [1.0], "rejected": [0.0, 0.0, 0.0]},  # 1
        {"subset": "Ties", "id": "ref:1", "chosen": [3.0], "rejected": [1.0, 0.0]},  # right, gap 2
        {"subset": "Ties", "id": "tied:1", "chosen": [3.0, 2.5], "rejected": [1.0, 2.0]},  # right, spread .5, gap .5
        {"subset": "Ties", "id": "ref:2", "chosen": [1.0], "rejected": [2.0]},  # wrong, gap -1
        {"subset": "Ties", "id": "tied:2", "chosen": [4.0, 3.0], "rejected": [0.0]},  # right, spread 1, gap 3
    ]
    result = rewardbench_v2(groups)
    focus, math_ = (0 + 1 + 0.5) / 3, 1.0
    ref_acc, tied_acc = 0.5, 1.0
    preferred = (0 + 1) / 2  # tied gap > spread: prompt 1 (0.5 > 0.5) no, prompt 2 (3 > 1) yes
    preferred_hard = (0 + 0) / 2  # min(ref gap, tied gap) > spread: min(2, .5) > .5 no, min(-1, 3) > 1 no
    margin = (math.tanh(0.5 / 0.5 - 1) + math.tanh(-1 / 1 - 1)) / 2
    ties = 0.3 * tied_acc + 0.3 * ref_acc + 0.2 * preferred + 0.2 * preferred_hard + 0.01 * margin
    assert result["subsets"]["Focus"] == {"score": pytest.approx(focus), "prompts": 3}
    assert result["subsets"]["Math"]["score"] == math_
    assert result["subsets"]["Ties"]["score"] == pytest.approx(ties)
    assert ties == pytest.approx(0.5451798621)
    assert result["overall"] == pytest.approx((focus + math_ + ties) / 3)


def test_v2_pair_rewards_are_put_back_into_their_prompts():
    """load_benchmark scores each prompt as chosen x rejected pairs; benchmark_scores rebuilds the prompt."""
    info = {"name": "rewardbench2", "groups": [{"subset": "Focus", "id": "a", "start": 0, "chosen": 1, "rejected": 3},
                                               {"subset": "Ties", "id": "ref:1", "start": 3, "chosen": 2,
                                                "rejected": 2}]}
    chosen = [2.0, 2.0, 2.0, 3.0, 3.0, 2.5, 2.5]
    rejected = [1.0, 0.5, 3.0, 1.0, 2.0, 1.0, 2.0]
    result = benchmark_scores(info, chosen, rejected)
    assert result["subsets"]["Focus"]["score"] == 0.0
    assert result["subsets"]["Ties"]["score"] == pytest.approx(ties_score(
        [{"id": "ref:1", "correct": [3.0, 2.5], "incorrect": [1.0, 2.0]}]))


# fixed rewards and response lengths for the report's figures
CHOSEN, REJECTED = [2.0, 1.0, 0.0, 3.0], [1.0, 1.0, 1.0, 0.0]
C_LEN, R_LEN = [5, 3, 2, 4], [3, 3, 4, 6]


def test_length_bias_by_hand():
    lb = report.length_bias(CHOSEN, REJECTED, C_LEN, R_LEN)
    assert lb["accuracy_chosen_longer"] == 1.0 and lb["pairs_chosen_longer"] == 1  # pair 0
    assert lb["accuracy_chosen_shorter"] == 0.5 and lb["pairs_chosen_shorter"] == 2  # pairs 2 (wrong), 3 (right)
    assert lb["pairs_equal_length"] == 1
    assert lb["always_longer_accuracy"] == pytest.approx((1 + 0.5) / 4)  # right on pair 0, half on the equal pair
    # average ranks of rewards [2,1,0,3,1,1,1,0] and lengths [5,3,2,4,3,3,4,6], worked out by hand
    rx = np.array([7, 4.5, 1.5, 8, 4.5, 4.5, 4.5, 1.5])
    ry = np.array([7, 3, 1, 5.5, 3, 3, 5.5, 8])
    rho = ((rx - rx.mean()) * (ry - ry.mean())).sum() / math.sqrt(((rx - rx.mean()) ** 2).sum() *
                                                                   ((ry - ry.mean()) ** 2).sum())
    assert lb["spearman_reward_length"] == pytest.approx(rho)


def test_calibration_by_hand():
    cal = report.calibration(CHOSEN, REJECTED)
    sig = [1 / (1 + math.exp(-m)) for m in (1, 0, -1, 3)]  # p = sigmoid(margin)
    # confidences .731 (pairs 0 and 2: one right), .5 (the tie: wrong), .953 (right): bins [.70,.75), [.5,.55), [.95,1]
    ece = 2 / 4 * abs(0.5 - sig[0]) + 1 / 4 * abs(0 - 0.5) + 1 / 4 * abs(1 - sig[3])
    assert cal["ece"] == pytest.approx(ece) and cal["ece"] == pytest.approx(0.2523858, abs=1e-6)
    assert cal["bt_log_loss"] == pytest.approx(-sum(math.log(p) for p in sig) / 4)
    assert [(b["low"], b["pairs"], b["accuracy"]) for b in cal["bins"]] == \
        [(0.5, 1, 0.0), (pytest.approx(0.7), 2, 0.5), (pytest.approx(0.95), 1, 1.0)]


def test_length_buckets_and_response_lengths_by_hand():
    buckets = {b["bucket"]: (b["pairs"], b["accuracy"]) for b in report.length_buckets(CHOSEN, REJECTED, C_LEN, R_LEN)}
    assert buckets["1..8"] == (1, 1.0) and buckets["0"] == (1, 0.0) and buckets["-8..-1"] == (2, 0.5)
    assert buckets["> 32"] == (0, None)
    c, r = report.response_lengths([[1, 2, 3, 4, 5], [7, 8]], [[1, 2, 9], [7, 8, 9, 9]])
    assert c.tolist() == [3, 0] and r.tolist() == [1, 2]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24]), len(data)


def test_report_writes_pngs_events_and_markdown(tmp_path):
    rng = np.random.default_rng(0)
    chosen_ids = [[1, 2] + list(range(10, 10 + n)) for n in rng.integers(1, 40, 50)]
    rejected_ids = [[1, 2] + list(range(60, 60 + n)) for n in rng.integers(1, 40, 50)]
    scores, checkpoints = [], []
    for step in (10, 20):
        c, r = rng.normal(1, 1, 50), rng.normal(0, 1, 50)
        metrics = {"checkpoint": f"/x/rank_0/rm_{step}.ckpt", "step": step, "accuracy": float((c > r).mean()),
                   **report.pair_figures(c, r, report.response_lengths(chosen_ids, rejected_ids))}
        checkpoints.append(metrics)
        scores.append((step, c, r))
    summary = {"eval_dataset": "test.jsonl", "pairs": 50, "template": "tutorial", "checkpoints": checkpoints}
    folder = tmp_path / "eval_report"
    path = report.write_report(str(folder), summary, scores)
    text = (folder / "report.md").read_text(encoding="utf-8")
    assert path == str(folder / "report.md")
    for name in report.FIGURES:
        (width, height), size = png_size(folder / f"{name}.png")
        assert (width, height) == report.FIGURE_SIZE and size > 5000, name
        assert f"]({name}.png)" in text
    assert "| 20 |" in text and "| 10 |" in text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("eval/accuracy")] == \
        [(c["step"], round(c["accuracy"], 6)) for c in checkpoints]
    assert events.Scalars("eval/ece")[-1].value == pytest.approx(checkpoints[-1]["calibration"]["ece"], abs=1e-6)
    assert {f"eval/{name}" for name in report.FIGURES} <= set(events.Tags()["images"])
    with pytest.raises(OutputExistsError):
        report.write_report(str(folder), summary, scores)
    report.write_report(str(folder), summary, scores, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_report"]  # no staging folder left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not a report"):
        report.write_report(str(tmp_path / "mine"), summary, scores, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    json.dumps(checkpoints)  # the figures go into eval_results.json as they are
