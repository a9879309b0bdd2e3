"""A LoRA run scored downstream (issue #24): its full checkpoint, its base weights + adapter and its merged model
give the same rewards through reward_infer.py, reward_eval.py and the server; reward statistics follow the
weights across the three forms; an adapter on other base weights, or a LoRA checkpoint read without its
pet_config, is an error instead of silently wrong rewards.

One short real LoRA run made through the CLIs (conftest's lora_epoch: 63 steps of 8 pairs on a random tiny base,
the run test_lora_train checks) is shared.
"""
import json
import shutil
import time

import numpy as np
import pytest
import yaml

from conftest import (CONFIGS, EXAMPLES, SCRIPTS, TEST_JSONL, TINY_CONFIG, TOKENIZER, msrun, run_cli,
                      run_main)
from test_server import InProcessServer, ServerProcess

pytestmark = pytest.mark.slow  # trains a (short) LoRA run
LORA_CONFIG = CONFIGS / "run_llama_2_tiny_lora_rm_cpu.yaml"
ADAPTER_TOOL = SCRIPTS / "lora_adapter.py"
TOL = 1e-5
STEP = 63  # the LoRA run's last step: its newest checkpoint, the one every form scores

def make_base(path, seed):
    """A random tiny Llama backbone (model.* only, as a converted base model is)."""
    import mindspore as ms

    from mindrlhf.evaluation.scorer import RewardScorer

    mode = ms.get_context("mode")
    ms.set_seed(seed)
    network = RewardScorer(str(TINY_CONFIG), batch_size=4, log=lambda *_: None).network
    ms.save_checkpoint([{"name": p.name, "data": p} for p in network.get_parameters()
                        if p.name.startswith("model.")], str(path))
    ms.set_context(mode=mode)
    return path


@pytest.fixture(scope="module")
def lora_run(lora_epoch, tmp_path_factory):
    """conftest's lora_epoch (63 LoRA steps from a random base, shared with test_lora_train) and another base
    (seed 1); the merged model via scripts/lora_adapter.py; 30 test pairs as eval set and as rows (both responses
    scored). This module's outputs go to its own folder."""
    work = tmp_path_factory.mktemp("lora_scoring")
    base, other = lora_epoch["base"], make_base(work / "other_base.ckpt", 1)
    out = lora_epoch["out"]
    summary = lora_epoch["summary"]
    checkpoint = out / "checkpoint" / "rank_0" / f"llama2_tiny_lora_rm_rank_0-1_{STEP}.ckpt"
    assert checkpoint.is_file() and summary["checkpoints"][-1].endswith(checkpoint.name), summary["checkpoints"]
    merged = work / "merged" / "merged.ckpt"
    made = run_cli(ADAPTER_TOOL, "--config", LORA_CONFIG, "--checkpoint", out / "checkpoint", "--merge", merged,
                   "--output", work / "cli_adapter" / "adapter.safetensors")
    eval_set = work / "eval.jsonl"
    eval_set.write_text("".join(TEST_JSONL.read_text(encoding="utf-8").splitlines(keepends=True)[:30]),
                        encoding="utf-8")
    return {"work": work, "base": base, "other": other, "output": out, "summary": summary, "checkpoint": checkpoint,
            "root": out / "checkpoint", "adapter": out / "adapter" / f"{checkpoint.stem}.safetensors",
            "merged": merged, "made": json.loads(made.stdout.strip().splitlines()[-1]), "eval": eval_set}


def forms(run, lora_yaml_for_merged=False):
    """(name, --config, --distributed_ckpt_path, extra args) of the three ways to score the run (and the merged
    model with the LoRA YAML: scored as the plain model it is)."""
    return [("full", LORA_CONFIG, run["root"], []),
            ("adapter", LORA_CONFIG, run["base"], ["--adapter", run["adapter"]]),
            ("merged", TINY_CONFIG, run["merged"], [])] + \
        ([("merged_lora_yaml", LORA_CONFIG, run["merged"], [])] if lora_yaml_for_merged else [])


def infer(run, name, config, ckpt, extra, *more, check=True, runner=run_main):
    """reward_infer.py on the eval rows (in this process unless runner=run_cli): the rows, or the failed run."""
    out = run["work"] / f"infer_{name}_{len(more)}.jsonl"
    proc = runner(EXAMPLES / "reward_infer.py", "--config", config, "--data_file", run["eval"], "--tokenizer",
                   TOKENIZER, "--distributed_ckpt_path", ckpt, "--output_file", out, "--overwrite", *extra, *more,
                   check=check)
    if proc.returncode:
        return proc
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_training_writes_the_adapter_of_its_newest_checkpoint(lora_run):
    lora = lora_run["summary"]["lora"]
    assert lora["adapter"] == str(lora_run["adapter"]) and lora_run["adapter"].is_file()
    assert lora["base_path"] == str(lora_run["base"])
    assert lora["settings"]["rank"] == 8 and lora["settings"]["alpha"] == 16
    assert lora["counts"]["lora"] == 2 * 8 * (4 * (64 + 64) + 3 * (64 + 192))  # 2 layers, rank 8, hidden 64, ffn 192
    assert lora["counts"]["value_head"] == 64 and lora["counts"]["frozen"] > 100 * lora["counts"]["lora"]
    assert (lora_run["adapter"].parent / "template.json").read_text() == \
        (lora_run["root"] / "template.json").read_text()


def test_the_tool_extracts_the_adapter_training_wrote(lora_run):
    from mindrlhf.checkpoints.adapters import read_adapter

    assert lora_run["made"]["adapter"] == str(lora_run["work"] / "cli_adapter" / "adapter.safetensors")
    tensors, meta = read_adapter(lora_run["made"]["adapter"])
    trained, trained_meta = read_adapter(str(lora_run["adapter"]))
    assert sorted(tensors) == sorted(trained) and len(tensors) == 29  # 28 LoRA matrices + the value head
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, trained[name])
    for key in ("base_sha256", "step", "value_head_sha256", "lora"):
        assert meta[key] == trained_meta[key], key
    assert trained_meta["step"] == STEP and trained_meta["base_path"] == str(lora_run["base"])


def test_three_forms_give_the_same_rewards_through_reward_infer(lora_run):
    scores = {}
    for name, *rest in forms(lora_run, True):  # the adapter through a real process, the others in this one
        rows = infer(lora_run, name, *rest, runner=run_cli if name == "adapter" else run_main)
        scores[name] = [r["score"] for r in rows]
    full = np.array(scores["full"])
    assert len(full) == 60 and full.std() > 0.05  # 30 pairs, both responses; rewards that differ
    for name in ("adapter", "merged", "merged_lora_yaml"):
        assert np.abs(np.array(scores[name]) - full).max() <= TOL, name


def test_three_forms_give_the_same_rewards_through_reward_eval(lora_run):
    results = {}
    for name, config, ckpt, extra in forms(lora_run):
        scores = lora_run["work"] / f"eval_scores_{name}.jsonl"
        runner = run_cli if name == "adapter" else run_main
        runner(EXAMPLES / "reward_eval.py", "--config", config, "--distributed_ckpt_path", ckpt, "--eval_dataset",
               lora_run["eval"], "--tokenizer", TOKENIZER, "--output_file", lora_run["work"] / f"eval_{name}.json",
               "--scores_file", scores, "--overwrite", *extra)
        rows = [json.loads(line) for line in scores.read_text(encoding="utf-8").splitlines()]
        results[name] = (np.array([[r["chosen_score"], r["rejected_score"]] for r in rows]),
                         json.loads((lora_run["work"] / f"eval_{name}.json").read_text())["checkpoints"][0])
    full, metrics = results["full"]
    assert full.shape == (30, 2) and metrics["step"] == STEP
    for name in ("adapter", "merged"):
        assert np.abs(results[name][0] - full).max() <= TOL, name
        assert results[name][1]["accuracy"] == metrics["accuracy"] and results[name][1]["step"] == STEP
    assert results["adapter"][1]["adapter"] == str(lora_run["adapter"])


def test_reward_eval_builds_the_network_once_for_merged_weights_and_the_lora_yaml(lora_run, monkeypatch, tmp_path):
    """reward_eval.py with the LoRA YAML: the merged model's network is built once, without LoRA (before: with
    LoRA, then again without once the checkpoint was found to hold none), the run's checkpoint's once, with."""
    from mindrlhf.model.llama_reward import LlamaRewardModel

    builds, build = [], LlamaRewardModel.__init__

    def counted(self, *args, **kwargs):
        build(self, *args, **kwargs)
        builds.append("lora" if self.lora else "plain")

    monkeypatch.setattr(LlamaRewardModel, "__init__", counted)
    for name, ckpt, expected in (("merged", lora_run["merged"], ["plain"]), ("full", lora_run["root"], ["lora"])):
        builds.clear()
        proc = run_main(EXAMPLES / "reward_eval.py", "--config", LORA_CONFIG, "--distributed_ckpt_path", ckpt,
                        "--eval_dataset", lora_run["eval"], "--tokenizer", TOKENIZER, "--output_file",
                        tmp_path / f"eval_{name}.json")
        assert builds == expected, (name, builds)
        assert ("holds no LoRA tensors" in proc.stdout + proc.stderr) == (name == "merged")


def test_three_forms_give_the_same_rewards_through_the_server(lora_run):
    pairs = [json.loads(line) for line in lora_run["eval"].read_text(encoding="utf-8").splitlines()][:8]
    items = [{"prompt": p["prompt"], "response": p["pos_resp"]} for p in pairs]
    expected = [r["score"] for r in infer(lora_run, "server_ref", *forms(lora_run)[0][1:])][0:16:2]
    import mindspore as ms

    from mindrlhf.serving.app import Limits
    from mindrlhf.serving.server import build_service

    mode = ms.get_context("mode")
    for name, config, ckpt, extra in forms(lora_run):  # the adapter through reward_server.py, the others in-process
        if name == "adapter":
            server = ServerProcess(lora_run["work"] / f"server_{name}.log", ckpt, *extra, config=config)
        else:
            server = InProcessServer(build_service(str(config), str(ckpt), str(TOKENIZER), Limits()))
        try:
            status, body, _ = server.post("/score", {"items": items})
            health = server.get("/health")[1]
        finally:
            server.stop()
            ms.set_context(mode=mode)
        assert status == 200, body
        assert np.abs(np.array(body["rewards"]) - expected).max() <= TOL, name
        assert health["step"] == STEP
        assert (health.get("adapter") == str(lora_run["adapter"])) == (name == "adapter")


def test_adapter_on_other_base_weights_is_refused(lora_run):
    proc = infer(lora_run, "wrong", LORA_CONFIG, lora_run["other"], ["--adapter", lora_run["adapter"]],
                 check=False, runner=run_cli)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(lora_run["adapter"]) in proc.stderr and "belongs to other base weights" in proc.stderr
    assert lora_run["made"]["checkpoint"].endswith(f"_{STEP}.ckpt")
    tool = run_main(ADAPTER_TOOL, "--config", LORA_CONFIG, "--checkpoint", lora_run["checkpoint"], "--output",
                   lora_run["work"] / "x.safetensors", "--base_path", lora_run["other"], check=False)
    assert tool.returncode == 2 and "not the base" in tool.stderr
    assert not (lora_run["work"] / "x.safetensors").exists()


def test_lora_checkpoint_without_its_pet_config_is_refused(lora_run, tmp_path):
    """Before: the plain YAML built a model without LoRA and the LoRA tensors were dropped on load: the base
    model's rewards with the trained value head, without a word."""
    proc = infer(lora_run, "plain", TINY_CONFIG, lora_run["root"], [], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds 28 LoRA tensors" in proc.stderr and "pet_config" in proc.stderr
    proc = infer(lora_run, "plain_adapter", TINY_CONFIG, lora_run["base"], ["--adapter", lora_run["adapter"]],
                 check=False)
    assert proc.returncode == 2 and "pet_config" in proc.stderr
    other_rank = yaml.safe_load(LORA_CONFIG.read_text())
    other_rank["model"]["model_config"]["pet_config"]["lora_rank"] = 4
    config = tmp_path / "rank4.yaml"
    config.write_text(yaml.safe_dump(other_rank))
    proc = infer(lora_run, "rank4", config, lora_run["root"], [], check=False)
    assert proc.returncode == 2 and "rank 8" in proc.stderr and "lora_rank is 4" in proc.stderr
    tool = run_main(ADAPTER_TOOL, "--config", config, "--checkpoint", lora_run["root"], "--output",
                   tmp_path / "a.safetensors", check=False)
    assert tool.returncode == 2 and "lora_rank is 4" in tool.stderr


def test_outputs_are_not_overwritten_without_overwrite(lora_run):
    proc = run_main(ADAPTER_TOOL, "--config", LORA_CONFIG, "--checkpoint", lora_run["root"], "--merge",
                   lora_run["merged"], check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_reward_stats_follow_the_weights_across_the_three_forms(lora_run, tmp_path):
    """Stats saved from any form normalise the other two; stats of other weights are refused."""
    ckpt_root = tmp_path / "checkpoint"
    shutil.copytree(lora_run["root"], ckpt_root)
    adapter = tmp_path / "adapter" / lora_run["adapter"].name
    shutil.copytree(lora_run["adapter"].parent, adapter.parent)
    merged = tmp_path / "merged" / "merged.ckpt"
    shutil.copytree(lora_run["merged"].parent, merged.parent)
    places = {"full": ckpt_root, "adapter": adapter.parent, "merged": merged.parent}
    paths = {"full": ckpt_root, "adapter": lora_run["base"], "merged": merged}
    run = dict(lora_run, root=ckpt_root, adapter=adapter, merged=merged)
    raw = [r["score"] for r in infer(run, "raw", *forms(run)[0][1:])]
    for source in ("adapter", "full"):
        _, config, ckpt, extra = next(f for f in forms(run) if f[0] == source)
        run_main(EXAMPLES / "reward_eval.py", "--config", config, "--distributed_ckpt_path", ckpt, "--eval_dataset",
                 run["eval"], "--tokenizer", TOKENIZER, "--output_file", tmp_path / f"eval_{source}.json",
                 "--save_stats", "--overwrite", *extra)
        stats = places[source] / "reward_stats.json"
        for name, place in places.items():
            if place != places[source]:
                shutil.copy2(stats, place / "reward_stats.json")
        normalised = {}
        for name, config, ckpt, extra in forms(run):
            assert ckpt == paths[name]
            rows = infer(run, f"norm_{source}_{name}", config, ckpt, extra, "--normalize")
            normalised[name] = np.array([r["score"] for r in rows])
            assert np.abs(np.array([r["raw_score"] for r in rows]) - raw).max() <= TOL
        saved = json.loads(stats.read_text())
        assert np.abs(normalised["full"] - (np.array(raw) - saved["mean"]) / saved["std"]).max() <= TOL
        assert np.abs(normalised["full"] - raw).max() > 0.01  # normalisation changed the scores
        for name in ("adapter", "merged"):
            assert np.abs(normalised[name] - normalised["full"]).max() <= TOL, (source, name)
    recorded = json.loads((adapter.parent / "reward_stats.json").read_text())
    recorded["weights"]["step"] = STEP - 1
    (merged.parent / "reward_stats.json").write_text(json.dumps(recorded))
    proc = infer(run, "stale", TINY_CONFIG, merged, [], "--normalize", check=False)
    assert proc.returncode == 2 and "computed for other weights" in proc.stderr


def test_merged_weights_are_w_plus_ba_alpha_over_r(lora_run):
    import mindspore as ms

    pet = yaml.safe_load(LORA_CONFIG.read_text())["model"]["model_config"]["pet_config"]
    factor = pet["lora_alpha"] / pet["lora_rank"]
    full = {n: p.asnumpy() for n, p in ms.load_checkpoint(str(lora_run["checkpoint"])).items()}
    merged = {n: p.asnumpy() for n, p in ms.load_checkpoint(str(lora_run["merged"])).items()}
    base = {n: p.asnumpy() for n, p in ms.load_checkpoint(str(lora_run["base"])).items()}
    adapted = [n[:-len("mindpet_delta_lora_a")] for n in full
               if n.startswith("model.") and n.endswith("mindpet_delta_lora_a")]
    assert len(adapted) == 14 and not [n for n in merged if "mindpet" in n or n.startswith("adam_")]
    for stem in adapted:
        a, b = full[stem + "mindpet_delta_lora_a"], full[stem + "mindpet_delta_lora_b"]
        expected = base[stem + "weight"].astype(np.float64) + (b.astype(np.float64) @ a) * factor
        assert np.abs(b).max() > 1e-4  # training moved B off its zero init
        np.testing.assert_allclose(merged[stem + "weight"], expected, rtol=0, atol=1e-6)
    for name, value in base.items():
        if not any(name == stem + "weight" for stem in adapted):
            np.testing.assert_array_equal(merged[name], value)
    np.testing.assert_array_equal(merged["v_head.weight"], full["v_head.weight"])
    assert int(merged["global_step"].reshape(-1)[0]) == STEP


def test_under_msrun_every_rank_scores_the_adapter_or_refuses_it_alike(lora_run, tmp_path):
    """2 ranks share the eval batches of base + adapter and give one process's scores; on the wrong base every
    rank stops with the same error (none waits in an AllGather for a rank that has stopped)."""
    from test_rank_verdict import HANG_GUARD, assert_every_rank_says

    scores = tmp_path / "scores.jsonl"
    good = " ".join(map(str, [EXAMPLES / "reward_eval.py", "--config", LORA_CONFIG, "--distributed_ckpt_path",
                              lora_run["base"], "--adapter", lora_run["adapter"], "--eval_dataset", lora_run["eval"],
                              "--tokenizer", TOKENIZER, "--output_file", tmp_path / "eval.json",
                              "--scores_file", scores]))
    proc = msrun(good, 2, tmp_path / "logs_good", timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_ranks = np.array([[r["chosen_score"], r["rejected_score"]]
                          for r in map(json.loads, scores.read_text(encoding="utf-8").splitlines())])
    one = run_main(EXAMPLES / "reward_eval.py", "--config", LORA_CONFIG, "--distributed_ckpt_path", lora_run["root"],
                   "--eval_dataset", lora_run["eval"], "--tokenizer", TOKENIZER, "--output_file",
                   tmp_path / "eval1.json", "--scores_file", tmp_path / "scores1.jsonl")
    assert one.returncode == 0
    one_rank = np.array([[r["chosen_score"], r["rejected_score"]] for r in
                         map(json.loads, (tmp_path / "scores1.jsonl").read_text(encoding="utf-8").splitlines())])
    assert two_ranks.shape == (30, 2) and np.abs(two_ranks - one_rank).max() <= TOL
    wrong = (good.replace(str(lora_run["base"]), str(lora_run["other"]))
             .replace(str(tmp_path / "eval.json"), str(tmp_path / "wrong.json"))
             .replace(str(scores), str(tmp_path / "wrong_scores.jsonl")))
    started = time.monotonic()
    proc = msrun(wrong, 2, tmp_path / "logs_wrong", timeout=HANG_GUARD)
    assert_every_rank_says(proc, tmp_path / "logs_wrong", "belongs to other base weights", started)
    assert not (tmp_path / "wrong.json").exists()


def test_merged_bfloat16_keeps_types_and_identity(tmp_path):
    """A bfloat16 run's merged file keeps each tensor's type, so the value head's digest (the identity reward
    statistics are tied to) is the checkpoint's; written as float32 it was not."""
    import mindspore as ms

    from mindrlhf.checkpoints import adapters, names
    from mindrlhf.checkpoints.reader import weights_identity

    def param(name, array, kind=ms.float32):
        return ms.Parameter(ms.Tensor(np.asarray(array, np.float32)).astype(kind), name=name)

    stem = "model.layers.0.attention.wq."
    params = {stem + "weight": param(stem + "weight", np.ones((4, 4)), ms.bfloat16),
              stem + names.LORA_A: param(stem + names.LORA_A, np.ones((2, 4))),
              stem + names.LORA_B: param(stem + names.LORA_B, np.ones((4, 2))),
              "v_head.weight": param("v_head.weight", np.arange(4).reshape(1, 4), ms.bfloat16),
              "global_step": ms.Parameter(ms.Tensor(np.array([7], np.int32)), name="global_step")}
    source, merged = str(tmp_path / "run.ckpt"), str(tmp_path / "merged.ckpt")
    ms.save_checkpoint([{"name": n, "data": v} for n, v in params.items()], source)
    settings = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ".*wq", "targets": ["wq"]}
    adapters.write_merged(merged, adapters.merged_params(params, settings), like=params)
    assert weights_identity(merged) == weights_identity(source)
    back = ms.load_checkpoint(merged)
    assert back[stem + "weight"].dtype == ms.bfloat16 and back["v_head.weight"].dtype == ms.bfloat16
    assert np.array_equal(back[stem + "weight"].astype(ms.float32).asnumpy(), np.full((4, 4), 5.0))  # 1 + 2.(B.A)


def test_a_yaml_with_another_alpha_is_refused(lora_run, tmp_path):
    """The checkpoint's shapes give rank and targets, not alpha: before, alpha 32 for a run trained with 16 scored
    (and merged) with twice the LoRA delta, exit 0. The run records its settings in lora.json."""
    assert json.loads((lora_run["root"] / "lora.json").read_text())["alpha"] == 16
    other = yaml.safe_load(LORA_CONFIG.read_text())
    other["model"]["model_config"]["pet_config"]["lora_alpha"] = 32
    config = tmp_path / "alpha32.yaml"
    config.write_text(yaml.safe_dump(other))
    proc = infer(lora_run, "alpha32", config, lora_run["root"], [], check=False)
    assert proc.returncode == 2 and "alpha 16" in proc.stderr and "alpha 32" in proc.stderr, proc.stderr[-2000:]
    tool = run_main(ADAPTER_TOOL, "--config", config, "--checkpoint", lora_run["root"], "--merge",
                    tmp_path / "m.ckpt", check=False)
    assert tool.returncode == 2 and "alpha 16" in tool.stderr and not (tmp_path / "m.ckpt").exists()
    export = run_main(SCRIPTS / "export_hf.py", "--config", config, "--distributed_ckpt_path", lora_run["root"],
                      "--tokenizer", TOKENIZER, "--output_dir", tmp_path / "hf", check=False)
    assert export.returncode == 2 and "alpha 16" in export.stderr and not (tmp_path / "hf").exists()


def test_another_runs_template_beside_the_outputs_is_refused(lora_run, tmp_path):
    """An adapter written into a folder holding another run's template.json would be scored with that template."""
    (tmp_path / "template.json").write_text(json.dumps({"name": "someone else's"}))
    proc = run_main(ADAPTER_TOOL, "--config", LORA_CONFIG, "--checkpoint", lora_run["root"], "--output",
                    tmp_path / "a.safetensors", check=False)
    assert proc.returncode == 2 and "another template" in proc.stderr, proc.stderr[-2000:]
    assert json.loads((tmp_path / "template.json").read_text()) == {"name": "someone else's"}


def test_base_digest_reads_float16_and_bfloat16_bases_as_the_float32_network_does():
    """convert_weight.py keeps Hugging Face's float16/bfloat16; the network (param_init_type float32) holds them
    widened: one base, one digest. Before, the file hashed as stored and the right base was refused."""
    import mindspore as ms

    from mindrlhf.checkpoints.adapters import base_digest

    rng = np.random.default_rng(0)
    values = {f"model.layers.0.attention.w{k}.weight": rng.standard_normal((8, 8)).astype(np.float32) for k in "qkv"}
    for kind in (ms.float16, ms.bfloat16):
        stored = {n: ms.Parameter(ms.Tensor(v).astype(kind), name=n) for n, v in values.items()}
        widened = {n: ms.Parameter(p.astype(ms.float32), name=n) for n, p in stored.items()}
        assert base_digest(stored.items()) == base_digest(widened.items())
        changed = dict(widened, **{"model.layers.0.attention.wq.weight": ms.Parameter(
            ms.Tensor(values["model.layers.0.attention.wq.weight"] + 1), name="x")})
        assert base_digest(changed.items()) != base_digest(widened.items())
