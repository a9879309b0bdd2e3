"""Qwen2- and Llama-3-shaped backbones end to end: Hugging Face safetensors written from numpy convert with every
shape checked, load with every backbone tensor equal to its source and compute what the Hugging Face architecture
computes (GQA, q/k/v biases, RoPE theta), then train one epoch on data rendered with the family's own chat template
and rank the test split; evaluation and inference render with the template recorded by training."""
import json

import numpy as np
import pytest

import mindrlhf.training.registry  # noqa: F401
from mindrlhf.errors import ConfigError
from mindrlhf.interop.hf_import import convert_hf_to_ms, hf_to_ms_name
from mindrlhf.training.config import load_config

from conftest import EXAMPLES, ROOT, TEST_JSONL, TRAIN_JSONL, run_cli, run_main
from families import (FAMILIES, build_reward_model, family_tensors, reference_forward, train_tokenizer,
                      write_hf_model)

CONVERT = ROOT / "scripts" / "convert_weight.py"
TRAIN_PAIRS = 800  # the first 800 train pairs: 100 steps of 8 pairs; the accuracy is measured on the test split


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    family = request.param
    work = tmp_path_factory.mktemp(family)
    tensors = family_tensors(family)
    ckpt = work / f"{family}.ckpt"
    # in this process: convert_weight.py's own subprocess runs are test_server's and the docs'
    proc = run_main(CONVERT, "--input_path", write_hf_model(work / "hf", family, tensors), "--output_path", ckpt,
                    "--config", FAMILIES[family]["config"])
    return {"family": family, "work": work, "tensors": tensors, "ckpt": ckpt,
            "result": json.loads(proc.stdout.strip().splitlines()[-1])}


def test_converted_backbone_equals_its_source_and_computes_as_hf(converted):
    import mindspore as ms

    family, tensors = converted["family"], converted["tensors"]
    hf = FAMILIES[family]["hf"]
    per_layer = 9 + (3 if family == "qwen2" else 0)  # q/k/v biases for Qwen2
    assert converted["result"]["tensors"] == 2 + hf["num_hidden_layers"] * per_layer
    assert converted["result"]["tied_embeddings"] == (family == "qwen2")
    assert converted["result"]["dropped"] == ([] if family == "qwen2" else ["lm_head.weight"])  # Qwen2: tied, none
    model = build_reward_model(FAMILIES[family]["config"], converted["ckpt"])
    assert model.load_report["newly_initialised"] == ["v_head.weight"]
    params = {p.name: p.asnumpy() for p in model.get_parameters()}
    assert set(params) - set(model.load_report["loaded"]) == {"v_head.weight"}
    for hf_name, value in tensors.items():
        if hf_name != "lm_head.weight":
            np.testing.assert_array_equal(params[hf_to_ms_name(hf_name)], value, err_msg=hf_name)
    kv = hf["num_key_value_heads"] * hf["hidden_size"] // hf["num_attention_heads"]
    assert params["model.layers.0.attention.wk.weight"].shape == (kv, hf["hidden_size"])  # GQA
    ids = np.random.default_rng(1).integers(8, hf["vocab_size"], size=(2, 40)).astype(np.int32)
    hidden = model.model(ms.Tensor(ids)).asnumpy()
    for row in range(2):
        np.testing.assert_allclose(hidden[row], reference_forward(tensors, ids[row], family), atol=2e-5)
    # the check can tell: the same weights at Llama 2's theta compute something else
    assert np.abs(hidden[0] - reference_forward(tensors, ids[0], family, theta=10000.0)).max() > 1e-3


def test_tied_lm_head_and_what_the_config_cannot_hold(tmp_path):
    qwen = family_tensors("qwen2")
    src = write_hf_model(tmp_path / "qwen", "qwen2", qwen)
    qwen_yaml = load_config(str(FAMILIES["qwen2"]["config"])).model.model_config
    out = tmp_path / "with_head.ckpt"
    convert_hf_to_ms(str(src), str(out), qwen_yaml, keep_lm_head=True, log=lambda *_: None)
    import mindspore as ms

    params = ms.load_checkpoint(str(out))
    np.testing.assert_array_equal(params["lm_head.weight"].asnumpy(), qwen["model.embed_tokens.weight"])
    untied = write_hf_model(tmp_path / "untied", "qwen2", qwen, tie_word_embeddings=False)
    with pytest.raises(ConfigError, match="no lm_head.weight, and the model does not tie it"):
        convert_hf_to_ms(str(untied), str(tmp_path / "x.ckpt"), qwen_yaml, keep_lm_head=True, log=lambda *_: None)
    single = str(src / "model.safetensors")  # no config.json: only the YAML decides
    with pytest.raises(ConfigError, match=r"self_attn.k_proj.(weight|bias) \(-> model.layers.0.attention.wk.\1\) "
                                          r"has shape \(32,( 64)?\), the target config expects \(64,( 64)?\)"):
        convert_hf_to_ms(single, str(tmp_path / "y.ckpt"), dict(qwen_yaml, n_kv_heads=4), log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"self_attn.k_proj.bias \(-> model.layers.0.attention.wk.bias\) has no "
                                          r"place in the target config \(q/k/v biases need model_config.qkv_has_bias"):
        convert_hf_to_ms(single, str(tmp_path / "y.ckpt"), dict(qwen_yaml, qkv_has_bias=False), log=lambda *_: None)
    wrong_theta = write_hf_model(tmp_path / "theta", "qwen2", qwen, rope_theta=10000.0)
    with pytest.raises(ConfigError, match="rope_theta is 10000.0 but the target config's model_config.theta is "
                                          "1000000.0"):
        convert_hf_to_ms(str(wrong_theta), str(tmp_path / "z.ckpt"), qwen_yaml, log=lambda *_: None)
    no_bias = {k: v for k, v in qwen.items() if not k.endswith(".bias")}
    with pytest.raises(ConfigError, match=r"missing tensor\(s\) the target config needs: "
                                          r"\['model.layers.0.attention.wk.bias'"):
        convert_hf_to_ms(str(write_hf_model(tmp_path / "nobias", "qwen2", no_bias)), str(tmp_path / "w.ckpt"),
                         qwen_yaml, log=lambda *_: None)
    assert not list(tmp_path.glob("*.ckpt.tmp-*"))


def test_llama_3_1_rope_scaling_is_checked_and_computed_as_hf(tmp_path):
    """Llama 3.1+ scale RoPE's low frequencies (rope_scaling type llama3): the converter asks for MindFormers'
    extend_method LLAMA3 with the same factors, and with them the backbone computes what Hugging Face's does."""
    import mindspore as ms

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    tensors = family_tensors("llama3")
    src = write_hf_model(tmp_path / "llama31", "llama3", tensors, rope_scaling=dict(scaling, rope_type="llama3"))
    config = FAMILIES["llama3"]["config"]
    yaml_cfg = load_config(str(config)).model.model_config
    with pytest.raises(ConfigError, match=r"rope_scaling is Llama 3.1's .* set model_config.extend_method: \"LLAMA3\""):
        convert_hf_to_ms(str(src), str(tmp_path / "x.ckpt"), yaml_cfg, log=lambda *_: None)
    ckpt = tmp_path / "llama31.ckpt"
    convert_hf_to_ms(str(src), str(ckpt), dict(yaml_cfg, extend_method="LLAMA3", scaling_factor=scaling),
                     log=lambda *_: None)
    model = build_reward_model(config, ckpt, extend_method="LLAMA3", scaling_factor=scaling)
    ids = np.random.default_rng(2).integers(8, 2048, size=(1, 48)).astype(np.int32)
    hidden = model.model(ms.Tensor(ids)).asnumpy()[0]
    np.testing.assert_allclose(hidden, reference_forward(tensors, ids[0], "llama3", rope_scaling=scaling), atol=2e-5)
    assert np.abs(hidden - reference_forward(tensors, ids[0], "llama3")).max() > 1e-3  # the scaling matters


@pytest.fixture(scope="module")
def trained(converted):
    """One epoch over the first TRAIN_PAIRS pairs, rendered with the family's chat template, starting from the
    converted weights; then the whole test split evaluated from the jsonl with the tokenizer folder."""
    family, work = converted["family"], converted["work"]
    tokenizer = train_tokenizer(work / "tokenizer", family)
    subset = work / "train_subset.jsonl"
    subset.write_text("".join(TRAIN_JSONL.read_text(encoding="utf-8").splitlines(keepends=True)[:TRAIN_PAIRS]),
                      encoding="utf-8")
    data = work / "train_chat.mindrecord"
    run_main(EXAMPLES / "cvalues_comparison.py", "--model", tokenizer, "--template", "chat", "--src_file", subset,
             "--dst_file", data, "--seq_length", 128)  # pad id: the tokenizer's own pad token
    out = work / "output"
    config = FAMILIES[family]["config"]
    run_cli(EXAMPLES / "reward_train.py", "--config", config, "--train_dataset", data, "--output_dir", out,
            "--load_checkpoint", converted["ckpt"], cwd=work)
    run_cli(EXAMPLES / "reward_eval.py", "--config", config, "--distributed_ckpt_path", out / "checkpoint",
            "--eval_dataset", TEST_JSONL, "--tokenizer", tokenizer, "--output_file", work / "eval.json",
            "--scores_file", work / "scores.jsonl")
    return {**converted, "tokenizer": tokenizer, "data": data, "output": out, "config": config,
            "eval": json.loads((work / "eval.json").read_text()),
            "scores": [json.loads(line) for line in (work / "scores.jsonl").read_text().splitlines()],
            "summary": json.loads((out / "train_summary.json").read_text())}


@pytest.mark.slow
def test_one_epoch_ranks_the_test_split(trained):
    summary, results = trained["summary"], trained["eval"]
    assert summary["pairs"] == TRAIN_PAIRS and summary["steps_logged"] == TRAIN_PAIRS // 8
    assert summary["template"] == "chat" and summary["loss_type"] == "span"
    log = (trained["output"] / "log" / "rank_0" / "info.log").read_text()
    hf = FAMILIES[trained["family"]]["hf"]
    loaded = 2 + hf["num_hidden_layers"] * (12 if trained["family"] == "qwen2" else 9)
    assert f"loaded {loaded} parameters from {trained['ckpt']}; newly initialised: ['v_head.weight']" in log
    assert results["template"] == "chat" and results["pairs"] == 773  # rendered with the recorded template
    accuracy = results["checkpoints"][0]["accuracy"]
    print(f"{trained['family']}: test-split accuracy {accuracy:.4f}")
    assert accuracy >= 0.95, results["checkpoints"][0]


@pytest.mark.slow
def test_inference_and_evaluation_render_with_the_recorded_template(trained, tmp_path):
    rows = [json.loads(line) for line in TEST_JSONL.read_text(encoding="utf-8").splitlines()[:3]]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    proc = run_cli(EXAMPLES / "reward_infer.py", "--config", trained["config"], "--data_file", data,
                   "--tokenizer", trained["tokenizer"], "--distributed_ckpt_path", trained["output"] / "checkpoint",
                   "--output_file", out)
    user_turn = {"qwen2": "<|im_start|>user\n", "llama3": "<|start_header_id|>user<|end_header_id|>"}
    assert user_turn[trained["family"]] in proc.stdout and "根据以下问题" not in proc.stdout
    scored = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for i in range(3):
        assert scored[2 * i]["score"] == pytest.approx(trained["scores"][i]["chosen_score"], abs=1e-4)
        assert scored[2 * i + 1]["score"] == pytest.approx(trained["scores"][i]["rejected_score"], abs=1e-4)
    # asking for another template, or evaluating data converted with one, is an error naming both
    # (the three rows above: what is refused is the template, not the size of the set)
    # each refusal a real process for one family, in this process for the other
    refused = run_cli if trained["family"] == sorted(FAMILIES)[0] else run_main
    proc = refused(EXAMPLES / "reward_eval.py", "--config", trained["config"], "--distributed_ckpt_path",
                   trained["output"] / "checkpoint", "--eval_dataset", data, "--tokenizer", trained["tokenizer"],
                   "--template", "tutorial", "--output_file", tmp_path / "x.json", check=False)
    assert proc.returncode == 2 and "renders differently from the template the checkpoints were trained with ('chat'" \
        in proc.stderr, proc.stderr[-2000:]
    tutorial_data = tmp_path / "test_tutorial.mindrecord"
    run_main(EXAMPLES / "cvalues_comparison.py", "--model", trained["tokenizer"], "--src_file", data,
             "--dst_file", tutorial_data, "--seq_length", 128)
    proc = refused(EXAMPLES / "reward_eval.py", "--config", trained["config"], "--distributed_ckpt_path",
                   trained["output"] / "checkpoint", "--eval_dataset", tutorial_data,
                   "--output_file", tmp_path / "y.json", check=False)
    assert proc.returncode == 2 and "was converted with the template 'tutorial' but the checkpoints were trained " \
        "with 'chat'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()
