"""reward_stats.json belongs to the weights it was computed for, not to a file name: other weights under the same
name (the run trained again, a checkpoint copied in) and stats files that do not say which weights they belong to
are refused by every consumer, with the command to rerun; a copy of the same weights keeps its stats."""
import json
import shutil

import numpy as np
import pytest

import mindspore as ms

from mindrlhf.errors import ConfigError
from mindrlhf.evaluation.normalize import load_stats, save_stats, stats_path
from mindrlhf.checkpoints.reader import weights_identity

from conftest import EXAMPLES, SCRIPTS, TEST_JSONL, TINY_CONFIG, TOKENIZER, run_cli

NAME = "llama_2_tiny_rm_rank_0-1_10.ckpt"


def write_ckpt(path, step, seed, crc=False, head=True):
    """A real .ckpt as save_checkpoint writes it: a backbone tensor, the value head (not on a pipeline's first
    stage), the optimizer step."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = [{"name": "model.norm_out.weight", "data": ms.Tensor(rng.random(32, dtype=np.float32))},
               {"name": "v_head.weight", "data": ms.Tensor(rng.random((1, 32), dtype=np.float32))},
               {"name": "global_step", "data": ms.Tensor(np.array([step], np.int32))}]
    ms.save_checkpoint(tensors if head else [tensors[0], tensors[2]], str(path), crc_check=crc)
    return path


def test_under_pipeline_parallel_the_head_comes_from_the_last_stages_file_of_the_same_step(tmp_path):
    root = tmp_path / "checkpoint"
    first = write_ckpt(root / "rank_0" / "rm_rank_0-1_20.ckpt", 20, seed=0, head=False)
    write_ckpt(root / "rank_1" / "rm_rank_1-1_10.ckpt", 10, seed=1)  # another step: not this one
    last = write_ckpt(root / "rank_1" / "rm_rank_1-1_20.ckpt", 20, seed=2)
    assert weights_identity(str(first)) == weights_identity(str(last))
    last.unlink()
    with pytest.raises(ConfigError, match="nor has any checkpoint of step 20 in the rank_N folders"):
        weights_identity(str(first))


@pytest.fixture
def run(tmp_path):
    root = tmp_path / "output" / "checkpoint"
    ckpt = write_ckpt(root / "rank_0" / NAME, 10, seed=0)
    save_stats(str(root), str(ckpt), 10, [1.0, 2.0, 3.0], [0.0, 1.0, 0.5], "eval.jsonl")
    return root, ckpt


def test_identity_is_the_step_and_the_value_head_read_from_the_file(tmp_path):
    a = weights_identity(str(write_ckpt(tmp_path / "a.ckpt", 10, seed=0)))
    assert a["step"] == 10 and len(a["value_head_sha256"]) == 64
    assert weights_identity(str(write_ckpt(tmp_path / "crc.ckpt", 10, seed=0, crc=True))) == a  # crc trailer
    assert weights_identity(str(write_ckpt(tmp_path / "b.ckpt", 10, seed=1)))["value_head_sha256"] != \
        a["value_head_sha256"]
    assert weights_identity(str(write_ckpt(tmp_path / "c.ckpt", 20, seed=0)))["step"] == 20
    data = (tmp_path / "a.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:-8])
    with pytest.raises(ConfigError, match="truncated"):
        weights_identity(str(tmp_path / "cut.ckpt"))


def test_stats_follow_a_copy_of_the_same_weights(run, tmp_path):
    root, _ = run
    stats = json.loads(open(stats_path(str(root)), encoding="utf-8").read())
    assert stats["weights"] == weights_identity(str(root / "rank_0" / NAME))
    copy = tmp_path / "elsewhere" / "checkpoint"
    shutil.copytree(root, copy, copy_function=shutil.copyfile)  # new mtimes, new place, same weights
    assert load_stats(str(copy), str(copy / "rank_0" / NAME))["mean"] == pytest.approx(1.25)


@pytest.mark.parametrize("step, seed", [(10, 1), (20, 0)], ids=["trained-again", "other-step"])
def test_other_weights_under_the_same_name_are_refused(run, step, seed):
    root, ckpt = run
    write_ckpt(ckpt, step, seed)  # rank_0/ deleted and trained again, or a checkpoint copied in under this name
    with pytest.raises(ConfigError) as err:
        load_stats(str(root), str(ckpt))
    message = str(err.value)
    assert "computed for other weights" in message and f"step {step}" in message
    assert f"reward_eval.py --save_stats --overwrite --distributed_ckpt_path {root}" in message


def test_stats_without_the_weights_identity_must_be_regenerated(run):
    root, ckpt = run
    path = stats_path(str(root))
    old = json.loads(open(path, encoding="utf-8").read())
    del old["weights"]  # as written before stats were tied to weights
    open(path, "w", encoding="utf-8").write(json.dumps(old))
    with pytest.raises(ConfigError, match="does not record which weights.*regenerate it, reward_eval.py"):
        load_stats(str(root), str(ckpt))


def test_inference_server_and_export_refuse_stale_stats(run, tmp_path):
    """The consumers as users run them: nothing is written, the error says what to rerun."""
    from mindrlhf.serving.app import Limits
    from mindrlhf.serving.server import build_service

    root, ckpt = run
    write_ckpt(ckpt, 10, seed=1)
    with pytest.raises(ConfigError, match="computed for other weights"):  # refused before any weight is loaded
        build_service(str(TINY_CONFIG), str(root), str(TOKENIZER), Limits(), normalize=True)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(TEST_JSONL.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    proc = run_cli(EXAMPLES / "reward_infer.py", "--config", TINY_CONFIG, "--data_file", rows, "--tokenizer",
                   TOKENIZER, "--distributed_ckpt_path", root, "--output_file", out, "--normalize", check=False)
    assert proc.returncode == 2 and "computed for other weights" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()
    hf = tmp_path / "rm-hf"
    proc = run_cli(SCRIPTS / "export_hf.py", "--config", TINY_CONFIG, "--distributed_ckpt_path", root,
                   "--tokenizer", TOKENIZER, "--output_dir", hf, check=False)
    assert proc.returncode == 2 and "computed for other weights" in proc.stderr, proc.stderr[-2000:]
    assert not hf.exists()
