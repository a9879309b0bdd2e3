"""Pretrained Llama weights: HF safetensors (single or sharded) -> .ckpt -> the reward model's backbone."""
import json

import numpy as np
import pytest

import mindspore as ms

import mindrlhf.training.registry  # noqa: F401
from mindrlhf.interop.hf_import import hf_to_ms_name
from mindrlhf.tools.tiny_hf import tiny_hf_tensors, write_hf
from mindrlhf.training.config import load_config

from conftest import EXAMPLES, ROOT, TINY_CONFIG, run_cli

CONVERT = ROOT / "scripts" / "convert_weight.py"


def build_model(checkpoint):
    from mindformers import LlamaConfig
    from mindrlhf.model.llama_reward import LlamaRewardModel

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
    cfg.pop("type")
    cfg["checkpoint_name_or_path"] = str(checkpoint)
    return LlamaRewardModel(LlamaConfig(**cfg))


@pytest.fixture(scope="module")
def hf_tensors():
    return tiny_hf_tensors()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_tensors):
    work = tmp_path_factory.mktemp("hf")
    out = work / "llama_tiny.ckpt"
    proc = run_cli(CONVERT, "--input_path", write_hf(work / "single", hf_tensors), "--output_path", out,
                   "--config", TINY_CONFIG)
    return {"work": work, "ckpt": out, "result": json.loads(proc.stdout.strip().splitlines()[-1])}


def test_every_backbone_tensor_equals_its_source(converted, hf_tensors):
    assert converted["result"]["tensors"] == 2 + 2 * 9
    assert converted["result"]["dropped"] == ["lm_head.weight"]
    model = build_model(converted["ckpt"])
    report = model.load_report
    assert report["newly_initialised"] == ["v_head.weight"]
    params = {p.name: p.asnumpy() for p in model.get_parameters()}
    assert set(params) - set(report["loaded"]) == {"v_head.weight"}
    for hf_name, value in hf_tensors.items():
        name = hf_to_ms_name(hf_name)
        if name is None or name == "lm_head.weight":
            continue
        np.testing.assert_array_equal(params[name], value, err_msg=f"{hf_name} -> {name}")
    assert np.abs(params["v_head.weight"]).max() > 0  # initialised, not left at zero


def test_sharded_safetensors_convert_the_same(converted, hf_tensors):
    from conftest import run_main  # in this process: convert_weight.py runs as a process in `converted`

    out = converted["work"] / "sharded.ckpt"
    run_main(CONVERT, "--input_path", write_hf(converted["work"] / "sharded", hf_tensors, shards=3),
            "--output_path", out, "--config", TINY_CONFIG)
    single, sharded = ms.load_checkpoint(str(converted["ckpt"])), ms.load_checkpoint(str(out))
    assert set(single) == set(sharded)
    for name in single:
        np.testing.assert_array_equal(single[name].asnumpy(), sharded[name].asnumpy(), err_msg=name)


def test_mismatched_hidden_size_names_the_tensor(tmp_path):
    from conftest import run_main  # in this process: convert_weight.py's exit 2 runs as a process in test_hf_interop

    src = write_hf(tmp_path / "wide", tiny_hf_tensors(hidden=48, ffn=144), hidden=48)
    out = tmp_path / "bad.ckpt"
    proc = run_main(CONVERT, "--input_path", src, "--output_path", out, "--config", TINY_CONFIG, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert "model.embed_tokens.weight" in err or "self_attn" in err or "model.norm.weight" in err, err
    assert "has shape (" in err and "expects (" in err
    assert not out.exists() and not list(tmp_path.glob("bad.ckpt.tmp-*"))


def test_loading_a_mismatched_checkpoint_is_an_error(tmp_path, converted):
    from mindrlhf.errors import ConfigError

    params = ms.load_checkpoint(str(converted["ckpt"]))
    params["model.norm_out.weight"] = ms.Parameter(ms.Tensor(np.ones(32, np.float32)), name="model.norm_out.weight")
    bad = tmp_path / "bad.ckpt"
    ms.save_checkpoint([{"name": k, "data": v} for k, v in params.items()], str(bad))
    with pytest.raises(ConfigError, match=r"model.norm_out.weight has shape \(32,\), the model expects \(64,\)"):
        build_model(bad)
    with pytest.raises(ConfigError, match="pass a local path"):
        build_model("llama2_7b")


@pytest.mark.slow
def test_training_starts_from_the_converted_weights(converted, test_mindrecord, tmp_path):
    out = tmp_path / "output"
    run_cli(EXAMPLES / "reward_train.py", "--config", TINY_CONFIG, "--train_dataset", test_mindrecord,
            "--output_dir", out, "--load_checkpoint", converted["ckpt"], "--stop_step", 2)
    log = (out / "log" / "rank_0" / "info.log").read_text()
    assert f"loaded 20 parameters from {converted['ckpt']}; newly initialised: ['v_head.weight']" in log
