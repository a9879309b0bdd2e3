"""No rank waits forever: a check made on rank 0 only (an output that exists, a resumed run's template) stops
every rank of a 2-rank msrun with the same error, and the launcher returns non-zero at once. Without the shared
verdict rank 1 went on into its next AllGather and was killed by msrun (across nodes it would have waited for
the cluster timeout) without saying why."""
import json
import time

import numpy as np
import pytest

import mindspore as ms

from mindrlhf.data.templates import FORMAT, Template, write_run_template
from mindrlhf.training.config import load_config

from conftest import EXAMPLES, TEST_JSONL, TINY_CONFIG, TOKENIZER, msrun

pytestmark = pytest.mark.slow
HANG_GUARD = 600  # the subprocess timeout only catches a hang; the runs below end in well under a minute


@pytest.fixture(scope="module")
def untrained_root(tmp_path_factory):
    """A real reward checkpoint of the tiny config (fresh weights), laid out as <root>/rank_0/."""
    from mindformers import LlamaConfig

    from mindrlhf.model.llama_reward import LlamaRewardModel

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
    cfg.pop("type")
    cfg["checkpoint_name_or_path"] = ""
    root = tmp_path_factory.mktemp("verdict") / "checkpoint"
    (root / "rank_0").mkdir(parents=True)
    ms.save_checkpoint(LlamaRewardModel(LlamaConfig(**cfg)), str(root / "rank_0" / "rm_rank_0-1_4.ckpt"),
                       append_dict={"global_step": ms.Tensor(np.array([4], np.int32))})
    return root


def worker_logs(log_dir):
    return [(log_dir / f"worker_{rank}.log").read_text(encoding="utf-8", errors="replace") for rank in (0, 1)]


def assert_every_rank_says(proc, log_dir, message, started):
    assert proc.returncode != 0, proc.stderr[-3000:]
    logs = worker_logs(log_dir)
    for rank, log in enumerate(logs):
        errors = [line for line in log.splitlines() if line.startswith("error: ")]
        assert errors and message in errors[-1], f"rank {rank}:\n{log[-3000:]}"
    assert [l for l in logs[0].splitlines() if l.startswith("error: ")][-1] == \
        [l for l in logs[1].splitlines() if l.startswith("error: ")][-1]  # the same error, word for word
    assert time.monotonic() - started < HANG_GUARD


def test_existing_output_stops_every_inference_rank(untrained_root, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(TEST_JSONL.read_text(encoding="utf-8").splitlines()[:4]) + "\n", encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    out.write_text("the user's earlier scores\n", encoding="utf-8")
    order = " ".join(map(str, [EXAMPLES / "reward_infer.py", "--config", TINY_CONFIG, "--data_file", rows,
                               "--tokenizer", TOKENIZER, "--distributed_ckpt_path", untrained_root,
                               "--output_file", out]))
    started = time.monotonic()
    proc = msrun(order, 2, tmp_path / "logs", timeout=HANG_GUARD)
    assert_every_rank_says(proc, tmp_path / "logs", f"{out} already exists; pass --overwrite", started)
    assert out.read_text(encoding="utf-8") == "the user's earlier scores\n"


def test_existing_stats_file_stops_every_evaluation_rank(untrained_root, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(TEST_JSONL.read_text(encoding="utf-8").splitlines()[:4]) + "\n", encoding="utf-8")
    stats = untrained_root / "reward_stats.json"
    stats.write_text("{}", encoding="utf-8")
    try:
        order = " ".join(map(str, [EXAMPLES / "reward_eval.py", "--config", TINY_CONFIG, "--distributed_ckpt_path",
                                   untrained_root, "--eval_dataset", pairs, "--tokenizer", TOKENIZER,
                                   "--output_file", tmp_path / "eval.json", "--save_stats"]))
        started = time.monotonic()
        proc = msrun(order, 2, tmp_path / "logs", timeout=HANG_GUARD)
    finally:
        stats.unlink()
    assert_every_rank_says(proc, tmp_path / "logs", f"{stats} already exists", started)
    assert not (tmp_path / "eval.json").exists()


def test_template_mismatch_on_resume_stops_every_training_rank(test_mindrecord, tmp_path):
    """Rank 0 alone records the run's template and finds the resumed run's differs; rank 1 would go on to agree
    on the resume step in an AllGather."""
    earlier = tmp_path / "earlier" / "checkpoint"
    for rank in (0, 1):  # a run trained with another template (its files are only listed before the check)
        (earlier / f"rank_{rank}").mkdir(parents=True)
        (earlier / f"rank_{rank}" / f"rm_rank_{rank}-1_4.ckpt").write_bytes(b"")
    write_run_template(str(earlier), Template("qa", FORMAT, "Q: {instruction}\nA: {response}"))
    order = " ".join(map(str, [EXAMPLES / "reward_train.py", "--config", TINY_CONFIG, "--train_dataset",
                               test_mindrecord, "--output_dir", tmp_path / "output", "--use_parallel", "True",
                               "--batch_size", 4, "--resume", "True", "--load_checkpoint", earlier]))
    started = time.monotonic()
    proc = msrun(order, 2, tmp_path / "logs", timeout=HANG_GUARD)
    assert_every_rank_says(proc, tmp_path / "logs", "the checkpoints there were trained with the template 'qa'",
                           started)
    assert json.loads((earlier / "template.json").read_text())["name"] == "qa"


# A script as msrun starts it on every rank: it runs the CLI in this rank's own folder (node_0/ or node_1/), as on
# nodes that each hold a copy of the checkpoint at the same relative path.
PER_NODE = """
import os, runpy, sys
from mindrlhf.distributed import rank_and_size
os.chdir(os.path.join({work!r}, f"node_{{min(rank_and_size()[0], 1)}}"))
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("script", ["reward_eval.py", "reward_infer.py"])
def test_a_crash_loading_weights_on_one_rank_stops_every_rank_alike(untrained_root, tmp_path, script):
    """Rank 1's copy of the checkpoint holds float16 tensors: MindSpore's load_param_into_net raises a
    RuntimeError there, not a ConfigError, while rank 0 loads its copy. Every rank leaves with the same error
    (before: rank 1 crashed alone and rank 0 waited in its AllGather until msrun killed it, saying nothing)."""
    original = next((untrained_root / "rank_0").glob("*.ckpt"))
    for node in (0, 1):
        (tmp_path / f"node_{node}" / "checkpoint" / "rank_0").mkdir(parents=True)
    copy = tmp_path / "node_1" / "checkpoint" / "rank_0" / original.name
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v.asnumpy().astype(np.float16)) if v.dtype == ms.float32
                         else v} for n, v in ms.load_checkpoint(str(original)).items()], str(copy))
    (tmp_path / "node_0" / "checkpoint" / "rank_0" / original.name).write_bytes(original.read_bytes())
    launcher = tmp_path / "per_node.py"
    launcher.write_text(PER_NODE.format(script=str(EXAMPLES / script), work=str(tmp_path)), encoding="utf-8")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(TEST_JSONL.read_text(encoding="utf-8").splitlines()[:4]) + "\n", encoding="utf-8")
    data = ["--eval_dataset", rows] if script == "reward_eval.py" else ["--data_file", rows]
    order = " ".join(map(str, [launcher, "--config", TINY_CONFIG, "--tokenizer", TOKENIZER, "--distributed_ckpt_path",
                               "checkpoint", "--output_file", tmp_path / "out.json", *data]))
    started = time.monotonic()
    proc = msrun(order, 2, tmp_path / "logs", timeout=HANG_GUARD)
    loaded = "cannot be loaded (RuntimeError: " if script == "reward_eval.py" else "RuntimeError: "
    assert_every_rank_says(proc, tmp_path / "logs", loaded + "For 'load_param_into_net'", started)
    assert "Traceback" in worker_logs(tmp_path / "logs")[1]  # the crash's own trace stays in its rank's log
    assert not (tmp_path / "out.json").exists()
