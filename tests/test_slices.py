"""Model-parallel checkpoints (integrated_save: False): slices are merged on load with the run's strategy file.

A trained whole checkpoint is cut into 2 model-parallel slices as MindFormers lays Llama out (q/k/v, w1/w3 and
the embedding split by rows, wo/w2 by columns, norms and the value head replicated; Adam moments like their
weights), with a strategy file written in MindSpore's own protobuf format.
"""
import json
import re
import shutil

import numpy as np
import pytest

import mindspore as ms
from mindspore.train.node_strategy_pb2 import ParallelStrategyMap

from conftest import EXAMPLES, SCRIPTS, TEST_JSONL, TINY_CONFIG, TOKENIZER, run_cli, run_main

pytestmark = pytest.mark.slow
ROWS = re.compile(r"(attention\.w[qkv]|feed_forward\.w[13])\.weight$|tok_embeddings\.embedding_weight$")
COLUMNS = re.compile(r"(attention\.wo|feed_forward\.w2)\.weight$")
MP = 2


def split_dim(name):
    base = re.sub(r"^adam_[mv]\.", "", name)
    if ROWS.search(base):
        return 0
    if COLUMNS.search(base):
        return 1
    return None


def write_strategy(path, whole, dims):
    """What strategy_ckpt_save_file holds for these tensors over MP devices (dev_matrix [MP])."""
    layout_map = ParallelStrategyMap()
    layout_map.current_stage = 0
    for name, array in whole.items():
        if not name.startswith(("model.", "v_head.", "adam_m.", "adam_v.")):
            continue  # step counters and loss scale are not laid out; rank 0's copy is taken
        item = layout_map.parallel_layout_item.add()
        item.param_name = name
        layout = item.parallel_layouts
        layout.dev_matrix.add().dim.extend([MP])
        layout.tensor_map.add().dim.extend([0 if d == dims(name) else -1 for d in range(array.ndim)])
        layout.param_split_shape.add()
        layout.indices_offset.add()
        layout.field = 0
        layout.opt_weight_shard_step = 0
        layout.opt_weight_shard_size = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(layout_map.SerializeToString())


def write_slices(run, whole, name, ranks=range(MP)):
    """<run>/checkpoint/rank_N/<name with N> holding rank N's slices of `whole`, and the run's strategy files."""
    for rank in ranks:
        tensors = []
        for tensor, array in whole.items():
            dim = split_dim(tensor)
            part = np.split(array, MP, axis=dim)[rank] if dim is not None else array
            tensors.append({"name": tensor, "data": ms.Tensor(np.ascontiguousarray(part))})
        folder = run / "checkpoint" / f"rank_{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        ms.save_checkpoint(tensors, str(folder / name.format(rank=rank)))
        write_strategy(run / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt", whole, split_dim)


@pytest.fixture(scope="module")
def sliced(trained_run, tmp_path_factory):
    whole_file = sorted((trained_run["checkpoint_root"] / "rank_0").glob("*.ckpt"),
                        key=lambda p: p.stat().st_mtime)[-1]
    whole = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(whole_file)).items()}
    run = tmp_path_factory.mktemp("mp_run")  # laid out as a model-parallel run's output_dir
    write_slices(run, whole, "llama_2_tiny_rm_rank_{rank}-1_506.ckpt")
    assert ms.load_checkpoint(str(run / "checkpoint" / "rank_1" / "llama_2_tiny_rm_rank_1-1_506.ckpt"))[
        "model.layers.0.attention.wo.weight"].shape == (64, 32)  # really a slice
    return {"run": run, "whole_file": whole_file, "whole": whole}


def evaluate(tmp_path, name, checkpoint, *extra, check=True, runner=run_cli):
    """reward_eval.py on 100 test pairs (runner run_main: in this process, for a path run_cli runs too)."""
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.exists():
        pairs.write_text("\n".join(TEST_JSONL.read_text(encoding="utf-8").splitlines()[:100]) + "\n",
                         encoding="utf-8")
    proc = runner(EXAMPLES / "reward_eval.py", "--config", TINY_CONFIG, "--distributed_ckpt_path", checkpoint,
                  "--eval_dataset", pairs, "--tokenizer", TOKENIZER, "--output_file", tmp_path / f"{name}.json",
                  "--scores_file", tmp_path / f"{name}.jsonl", *extra, check=check)
    if not check:
        return proc
    return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()], proc


def test_evaluation_reads_slices_with_the_runs_own_strategy(sliced, tmp_path):
    whole, _ = evaluate(tmp_path, "whole", sliced["whole_file"], runner=run_main)  # the reference
    merged, proc = evaluate(tmp_path, "slices", sliced["run"] / "checkpoint")  # the tutorial's command
    assert "merged the model-parallel slices" in proc.stdout
    assert len(merged) == len(whole) == 100
    for a, b in zip(merged, whole):
        assert a["chosen_score"] == pytest.approx(b["chosen_score"], abs=1e-6)
        assert a["rejected_score"] == pytest.approx(b["rejected_score"], abs=1e-6)


def test_inference_reads_slices_with_an_explicit_strategy(sliced, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(TEST_JSONL.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    outs = {}
    for name, ckpt, extra, runner in (("whole", sliced["whole_file"], [], run_main),  # the reference
                                      ("slices", sliced["run"] / "checkpoint",
                                       ["--src_strategy", sliced["run"] / "strategy" / "ckpt_strategy_rank_0.ckpt"],
                                       run_cli)):
        outs[name] = tmp_path / f"{name}.jsonl"
        runner(EXAMPLES / "reward_infer.py", "--config", TINY_CONFIG, "--data_file", rows, "--tokenizer", TOKENIZER,
                "--distributed_ckpt_path", ckpt, "--output_file", outs[name], *extra)
    scores = {n: [json.loads(line)["score"] for line in p.read_text().splitlines()] for n, p in outs.items()}
    assert scores["slices"] == pytest.approx(scores["whole"], abs=1e-6)


def test_merge_script_writes_the_whole_checkpoint(sliced, tmp_path):
    out = tmp_path / "whole.ckpt"
    run_cli(SCRIPTS / "merge_checkpoint.py", "--src_checkpoint", sliced["run"] / "checkpoint", "--output_path", out)
    merged = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(out)).items()}
    assert set(merged) == set(sliced["whole"])
    for name, array in sliced["whole"].items():
        np.testing.assert_array_equal(merged[name], array, err_msg=name)
    again = run_main(SCRIPTS / "merge_checkpoint.py", "--src_checkpoint", sliced["run"] / "checkpoint",
                     "--output_path", out, check=False)  # its exit 2 runs as a process below
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_missing_or_wrong_strategy_is_a_clear_error(sliced, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(sliced["run"] / "checkpoint", bare / "checkpoint")  # no strategy/ beside it
    proc = evaluate(tmp_path, "bare", bare / "checkpoint", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds model-parallel slices" in proc.stderr and "--src_strategy" in proc.stderr
    assert "skipping" in proc.stdout  # the error is named per checkpoint before giving up

    wrong = tmp_path / "wrong_strategy.ckpt"  # a run that split wo/w2 by rows instead
    write_strategy(wrong, sliced["whole"], lambda n: 0 if split_dim(n) is not None else None)
    proc = evaluate(tmp_path, "wrong", bare / "checkpoint", "--src_strategy", wrong, check=False, runner=run_main)
    assert proc.returncode == 2 and "is not the one of this run" in proc.stdout + proc.stderr


def fresh_weights(step):
    """A tiny reward model's parameters (freshly initialised) as training saves them at `step`."""
    from mindformers import LlamaConfig

    from mindrlhf.model.llama_reward import LlamaRewardModel
    from mindrlhf.training.config import load_config

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
    cfg.pop("type")
    cfg["checkpoint_name_or_path"] = ""
    whole = {p.name: p.asnumpy() for p in LlamaRewardModel(LlamaConfig(**cfg)).get_parameters()}
    whole["global_step"] = np.array([step], np.int32)
    return whole


def test_slices_of_different_steps_are_refused_by_name(tmp_path):
    """A resumed run re-saved rank 0's file under an old name while rank 1's kept an earlier step: merging by
    name would mix weights of two steps. The merge script, evaluation and inference refuse, naming the files."""
    run = tmp_path / "run"
    name = "llama_2_tiny_rm_rank_{rank}-1_4.ckpt"
    write_slices(run, fresh_weights(8), name, ranks=[0])
    write_slices(run, fresh_weights(4), name, ranks=[1])
    files = [run / "checkpoint" / f"rank_{r}" / name.format(rank=r) for r in range(MP)]
    out = tmp_path / "whole.ckpt"
    proc = run_cli(SCRIPTS / "merge_checkpoint.py", "--src_checkpoint", run / "checkpoint", "--output_path", out,
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "come from different steps" in proc.stderr
    assert f"{files[0]}: step 8" in proc.stderr and f"{files[1]}: step 4" in proc.stderr
    assert not out.exists()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(TEST_JSONL.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    proc = run_cli(EXAMPLES / "reward_infer.py", "--config", TINY_CONFIG, "--data_file", rows, "--tokenizer",
                   TOKENIZER, "--distributed_ckpt_path", run / "checkpoint", "--output_file", tmp_path / "s.jsonl",
                   check=False)
    assert proc.returncode == 2 and f"{files[1]}: step 4" in proc.stderr, proc.stderr[-3000:]

    write_slices(run, fresh_weights(8), name, ranks=[1])  # the slices of one step merge
    run_main(SCRIPTS / "merge_checkpoint.py", "--src_checkpoint", run / "checkpoint", "--output_path", out)
    assert int(ms.load_checkpoint(str(out))["global_step"].asnumpy()[0]) == 8
