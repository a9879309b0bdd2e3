"""The README's main job: the demo runs the whole pipeline on its own generated sample and summarises it."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    """One demo run, into a workdir that already holds an earlier demo's results: it never overwrites them (it
    writes beside them, in a stamped workdir), and summarises its own run there."""
    earlier = tmp_path / "demo"
    earlier.mkdir()
    (earlier / "summary.json").write_text('{"pairs": 300, "earlier": true}', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "mindrlhf.demo", "--workdir", str(earlier),
                           "--train_pairs", "1200", "--test_pairs", "300"], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # a second run never overwrites the first one's results
    assert json.loads((earlier / "summary.json").read_text()) == {"pairs": 300, "earlier": True}
    (workdir,) = [line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("demo workdir: ")]
    assert workdir.startswith(f"{earlier}-") and os.path.dirname(workdir) == str(tmp_path)
    summary = json.loads(open(os.path.join(workdir, "summary.json"), encoding="utf-8").read())
    assert summary["outputs"]["workdir"] == workdir
    assert summary["pairs"] == 300 and summary["accuracy"] >= 0.9
    # Training does not overfit: the checkpoint the summary reports (the last) is as good as the best one.
    accuracies = [accuracy for _step, accuracy in summary["checkpoints_evaluated"]]
    assert len(accuracies) >= 2 and accuracies[-1] >= max(accuracies) - 0.005, summary["checkpoints_evaluated"]
    assert len(summary["per_type_accuracy"]) == 3
    assert summary["last_loss"] < summary["first_loss"]
    for key in ("train_log", "loss_png", "eval_results", "eval_report", "infer_scores"):
        assert os.path.exists(summary["outputs"][key]), key
        assert summary["outputs"][key].startswith(workdir + os.sep), key
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(summary["outputs"]["tensorboard"]))
    assert "pairwise accuracy on 300 test pairs" in proc.stdout
    assert "length bias: accuracy" in proc.stdout and "calibration: ECE" in proc.stdout
    assert summary["calibration"]["bt_log_loss"] > 0 and summary["length_bias"]["always_longer_accuracy"] is not None
    assert "every checkpoint (step: accuracy; the last one is reported above): 100: " in proc.stdout
