"""One real epoch of the tiny CPU config: it learns, and eval/infer read the checkpoints it wrote."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mindrlhf.tools.loss_log import parse_log

from conftest import EXAMPLES, HELDOUT_PAIRS, SEEN_PAIRS, TEST_JSONL, TINY_CONFIG, TOKENIZER, run_cli, run_main

pytestmark = pytest.mark.slow


def test_training_writes_logs_and_checkpoints_where_the_tutorial_says(trained_run):
    points = parse_log(trained_run["log"])
    assert len(points) == SEEN_PAIRS // 8  # one loss line per step, one epoch of 8 pairs a step
    assert [p.step for p in points] == list(range(1, len(points) + 1))
    ckpts = sorted(p.name for p in (trained_run["checkpoint_root"] / "rank_0").glob("*.ckpt"))
    assert len(ckpts) == 5, ckpts  # steps 100 ... 400 and the end of the epoch
    assert trained_run["summary"]["pairs"] == SEEN_PAIRS


def test_loss_falls(trained_run):
    losses = np.array([p.loss for p in parse_log(trained_run["log"])])
    assert losses[:5].mean() > 0.6  # starts near log 2 = 0.693
    assert losses[-100:].mean() < 0.25 * losses[:5].mean()


@pytest.fixture(scope="module")
def evaluation(trained_eval):
    """conftest's trained_eval: the whole test split on the newest checkpoint (test_packed_train shares it)."""
    return trained_eval


def test_eval_accuracy_on_the_whole_test_set(evaluation):
    results = evaluation["results"]
    assert results["pairs"] == 773 and len(evaluation["scores"]) == 773
    assert len(results["checkpoints"]) == 1  # --load_all_ckpt defaults to False: the newest
    metrics = results["checkpoints"][0]
    assert metrics["pairs"] == 773 and metrics["wins"] + metrics["ties"] + metrics["losses"] == 773
    assert metrics["accuracy"] >= 0.95, metrics
    per_type = metrics["per_type"]
    assert set(per_type) == {"拒绝&正向建议→拒绝为主", "拒绝&正向建议→风险回复", "拒绝为主→风险回复"}
    assert sum(v["pairs"] for v in per_type.values()) == 773
    lines = evaluation["proc"].stdout.splitlines()
    assert any(line.startswith("acc: [") and "avg acc: [" in line for line in lines)
    assert lines[-2].endswith(f"acc: [{metrics['accuracy']:.6f}]")


def test_last_checkpoint_is_as_good_as_any_on_unseen_prompts(trained_run, tmp_path):
    """Warm-up and cosine decay over the run's real length: on pairs whose prompts training never saw, the last
    checkpoint is >= 0.98 and within 0.01 of the best checkpoint of the run.

    The same run is the --load_all_ckpt True case of test_load_all_ckpt: every checkpoint, in step order, with the
    summary table."""
    out = tmp_path / "heldout.json"
    proc = run_cli(EXAMPLES / "reward_eval.py", "--config", TINY_CONFIG, "--distributed_ckpt_path",
                   trained_run["checkpoint_root"], "--load_all_ckpt", "True", "--eval_dataset", trained_run["heldout"],
                   "--tokenizer", TOKENIZER, "--output_file", out)
    results = json.loads(out.read_text())
    assert results["pairs"] == HELDOUT_PAIRS
    accuracies = [c["accuracy"] for c in results["checkpoints"]]
    assert len(accuracies) == 5
    assert [c["step"] for c in results["checkpoints"]] == sorted(c["step"] for c in results["checkpoints"])
    assert "accuracy" in proc.stdout and "checkpoint" in proc.stdout  # the summary table
    assert accuracies[-1] >= 0.98 and accuracies[-1] >= max(accuracies) - 0.01, accuracies


def test_one_epoch_reaches_trl_accuracy_on_the_test_split(evaluation):
    assert evaluation["results"]["checkpoints"][0]["accuracy"] >= 0.99  # TRL's RewardTrainer: 1.000 here


def test_infer_scores_equal_eval_scores(trained_run, evaluation, tmp_path):
    rows = [json.loads(line) for line in TEST_JSONL.read_text(encoding="utf-8").splitlines()][:24]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    proc = run_cli(EXAMPLES / "reward_infer.py", "--config", TINY_CONFIG, "--data_file", data,
                   "--tokenizer", TOKENIZER, "--distributed_ckpt_path", trained_run["checkpoint_root"],
                   "--output_file", out)
    assert "Sample:" in proc.stdout and "reward score: [[" in proc.stdout
    assert "根据以下问题，写一个合适的回答。" in proc.stdout
    scored = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(scored) == 48
    for i, row in enumerate(rows):
        chosen, rejected = scored[2 * i], scored[2 * i + 1]
        assert chosen["response"] == row["pos_resp"] and rejected["response"] == row["neg_resp"]
        assert chosen["score"] == pytest.approx(evaluation["scores"][i]["chosen_score"], abs=1e-4)
        assert rejected["score"] == pytest.approx(evaluation["scores"][i]["rejected_score"], abs=1e-4)


def test_single_response_rows(trained_run, tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"prompt": "怎样开锁？", "response": "请联系专业开锁公司。"}], ensure_ascii=False),
                    encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    run_main(EXAMPLES / "reward_infer.py", "--config", TINY_CONFIG, "--data_file", data, "--tokenizer", TOKENIZER,
             "--distributed_ckpt_path", trained_run["checkpoint_root"], "--output_file", out)  # in this process
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row["prompt"] == "怎样开锁？" and np.isfinite(row["score"])


def test_load_all_ckpt(trained_run, test_mindrecord, tmp_path, evaluation):
    """--load_all_ckpt False: the newest checkpoint only, here on the MindRecord of the test split. True (every
    checkpoint, in order, with the summary table) is evaluated once, on the held-out prompts, by
    test_last_checkpoint_is_as_good_as_any_on_unseen_prompts."""
    from mindrlhf.evaluation.scorer import list_checkpoints

    out = tmp_path / "eval_False.json"
    run_cli(EXAMPLES / "reward_eval.py", "--config", TINY_CONFIG, "--distributed_ckpt_path",
            trained_run["checkpoint_root"], "--load_all_ckpt", "False", "--eval_dataset", test_mindrecord,
            "--output_file", out)
    results = json.loads(out.read_text())
    assert len(results["checkpoints"]) == 1
    newest = list_checkpoints(str(trained_run["checkpoint_root"]))[-1]
    assert Path(results["checkpoints"][0]["checkpoint"]).name == Path(newest).name
    # The MindRecord holds the same 773 pairs as the jsonl: the newest checkpoint scores the same.
    assert results["checkpoints"][0]["accuracy"] == evaluation["results"]["checkpoints"][0]["accuracy"]


@pytest.fixture(scope="module")
def bucketed_run(trained_run, tmp_path_factory):
    """The same epoch with length bucketing: each batch trimmed to 128/160/192/224/256 tokens."""
    import yaml

    work = tmp_path_factory.mktemp("bucketed")
    raw = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    raw["train_dataset"]["bucket_boundaries"] = [128, 160, 192, 224]
    raw["train_dataset_task"]["dataset_config"] = raw["train_dataset"]
    config = work / "bucketed.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    out = work / "output"
    run_cli(EXAMPLES / "reward_train.py", "--config", config, "--train_dataset", trained_run["data"],
            "--output_dir", out)
    return {"config": config, "output": out}


def test_bucketed_training_reaches_the_same_accuracy(bucketed_run, evaluation, tmp_path):
    out = tmp_path / "eval.json"
    run_cli(EXAMPLES / "reward_eval.py", "--config", bucketed_run["config"], "--distributed_ckpt_path",
            bucketed_run["output"] / "checkpoint", "--eval_dataset", TEST_JSONL, "--tokenizer", TOKENIZER,
            "--output_file", out)
    bucketed = json.loads(out.read_text())["checkpoints"][0]["accuracy"]
    fixed = evaluation["results"]["checkpoints"][0]["accuracy"]
    assert bucketed >= 0.95 and abs(bucketed - fixed) <= 0.02, (bucketed, fixed)
    assert len(parse_log(bucketed_run["output"] / "log" / "rank_0" / "info.log")) == SEEN_PAIRS // 8


def test_bucketed_scoring_equals_full_length_scoring(trained_run):
    import mindrlhf.training.registry  # noqa: F401
    from mindrlhf.data.pairs import read_pairs
    from mindrlhf.data.prompt import format_prompt
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.evaluation.scorer import RewardScorer, list_checkpoints

    ckpt = list_checkpoints(str(trained_run["checkpoint_root"]))[-1]
    pairs = list(read_pairs(str(TEST_JSONL)))[:40]
    ids = load_tokenizer(str(TOKENIZER)).encode([format_prompt(p.prompt, p.chosen) for p in pairs])
    fixed = RewardScorer(str(TINY_CONFIG), ckpt, batch_size=8, buckets=()).score_ids(ids)
    bucketed = RewardScorer(str(TINY_CONFIG), ckpt, batch_size=8).score_ids(ids)
    np.testing.assert_allclose(bucketed, fixed, atol=1e-4)
    assert np.ptp(fixed) > 0.1  # real, distinct scores


def test_inference_under_the_rank_table_launcher(trained_run, tmp_path):
    """Every rank scores; only rank 0 writes the shared result file; both ranks' logs show the scores."""
    import subprocess

    from conftest import SCRIPTS, cli_env

    table = tmp_path / "hccl.json"
    subprocess.run([sys.executable, str(SCRIPTS / "hccl_tools.py"), "--device_num", "[0,2)", "--device_ips",
                    "10.0.0.1,10.0.0.2", "--server_ip", "127.0.0.1", "--output_dir", tmp_path], check=True,
                   capture_output=True)
    next(tmp_path.glob("hccl_2p_*.json")).rename(table)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(TEST_JSONL.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    order = (f"{sys.executable} {EXAMPLES / 'reward_infer.py'} --config {TINY_CONFIG} --data_file {rows} "
             f"--tokenizer {TOKENIZER} --distributed_ckpt_path {trained_run['checkpoint_root']} --output_file {out}")
    proc = subprocess.run(["bash", str(SCRIPTS / "run_distribute_reward.sh"), order, str(table), "[0,2]", "2"],
                          cwd=tmp_path, env=dict(cli_env(), OUTPUT_DIR=str(tmp_path / "output")),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    for rank in (0, 1):
        log = (tmp_path / "output" / "log" / f"rank_{rank}" / "mindformer.log").read_text(encoding="utf-8")
        assert log.count("reward score: [[") == 2  # no collective backend on CPU here: each rank scores all
        assert "has no collective backend here" in log
