"""The Qwen2.5-7B (8 NPUs) and the tiny Qwen2/Llama 3 YAMLs (and each family's tiny LoRA YAML): every section
explicit, every type resolves, and the 7B shapes are Qwen2.5-7B's (published config.json) as the converter checks
them and as the model builds them."""
import pytest

import mindrlhf.training.registry  # noqa: F401
from mindrlhf.interop.hf_import import expected_shapes, hf_model_config
from mindrlhf.training.config import check_sections, load_config

from conftest import ROOT
from families import FAMILIES, build_reward_model
from test_registry import _types

QWEN_7B = ROOT / "model_configs" / "qwen2_5_config" / "run_qwen2_5_7b_rm.yaml"
# Qwen/Qwen2.5-7B-Instruct config.json (the fields the shapes and RoPE depend on)
QWEN2_5_7B_HF = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                 "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False}


LORA_YAMLS = sorted(ROOT.glob("model_configs/*/run_*_tiny_lora_rm_cpu.yaml"))  # each family's LoRA twin


@pytest.mark.parametrize("path", [QWEN_7B] + [f["config"] for f in FAMILIES.values()] + LORA_YAMLS,
                         ids=lambda p: p.name)
def test_every_section_explicit_and_every_type_resolves(path):
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    check_sections(str(path))
    for kind, name in _types(path):
        if not (kind == "DATASET_LOADER" and name == "MindDataset"):
            assert MindFormerRegister.get_cls(getattr(MindFormerModuleType, kind), name), (kind, name)


def test_qwen_7b_yaml_is_qwen2_5_7b():
    config = load_config(str(QWEN_7B))
    mc = config.model.model_config
    assert expected_shapes(mc) == expected_shapes(hf_model_config(QWEN2_5_7B_HF))
    shapes = expected_shapes(mc)
    assert shapes["model.layers.0.attention.wk.weight"] == (512, 3584)  # 4 kv heads x 128
    assert shapes["model.layers.0.attention.wq.bias"] == (3584,)
    assert shapes["model.layers.0.attention.wv.bias"] == (512,)
    assert (mc.theta, mc.rms_norm_eps, mc.compute_dtype, mc.param_init_type) == (1e6, 1e-6, "bfloat16", "float32")
    parallel = config.parallel_config
    assert (parallel.data_parallel, parallel.model_parallel) == (2, 4) and config.parallel.full_batch
    assert mc.n_kv_heads % parallel.model_parallel == 0 and mc.num_heads % parallel.model_parallel == 0
    assert config.runner_config.batch_size * parallel.data_parallel == 4  # the tutorial's 4 pairs a step


@pytest.mark.slow
def test_qwen_7b_width_builds_as_the_converter_expects():
    """One layer at full width (vocabulary cut to keep memory small): every parameter the model builds has the
    shape the converter checks Qwen2.5-7B's tensors against."""
    model = build_reward_model(QWEN_7B, num_layers=1, vocab_size=1024, seq_length=64, compute_dtype="float32",
                               use_flash_attention=False, fused_rms_norm=False, use_rope_slice=True)
    built = {p.name: tuple(p.shape) for p in model.get_parameters()}
    mc = dict(load_config(str(QWEN_7B)).model.model_config, num_layers=1, vocab_size=1024)
    assert {n: s for n, s in built.items() if n != "v_head.weight"} == expected_shapes(mc)
    assert built["v_head.weight"] == (1, 3584)
