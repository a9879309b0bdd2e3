"""The 7B YAMLs built whole on CPU without allocating weights (MindSpore's no_init_parameters): Llama 2 7B and
Qwen2.5 7B, each plain, with the YAML's own commented pet_config LoRA block and with its packing hints. Every
parameter's name, shape and dtype against the Hugging Face checkpoint the converter maps (hf_to_ms_name), the
trainability of every LoRA matrix and the value head, and the shard strategies docs/configs.md lists."""
import re
import time

import pytest

import mindspore as ms

from conftest import ROOT

LLAMA = ROOT / "model_configs" / "llama2_config" / "run_llama_2_7b_rm.yaml"
QWEN = ROOT / "model_configs" / "qwen2_5_config" / "run_qwen2_5_7b_rm.yaml"
# The Hugging Face checkpoints' config.json (meta-llama/Llama-2-7b-hf, Qwen/Qwen2.5-7B).
HF = {LLAMA: dict(hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32000, bias=False),
      QWEN: dict(hidden=3584, layers=28, heads=28, kv_heads=4, ffn=18944, vocab=152064, bias=True)}
BUILD_SECONDS = {}


def hf_tensors(hf):
    """The HF checkpoint's backbone tensors: name -> shape (lm_head is not part of a reward model)."""
    h, kv, ffn = hf["hidden"], hf["kv_heads"] * hf["hidden"] // hf["heads"], hf["ffn"]
    out = {"model.embed_tokens.weight": (hf["vocab"], h), "model.norm.weight": (h,)}
    for i in range(hf["layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.down_proj.weight": (h, ffn),
                    p + "mlp.up_proj.weight": (ffn, h), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
        if hf["bias"]:
            out.update({p + "self_attn.q_proj.bias": (h,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
    return out


def yaml_text(path, variant):
    """The YAML as written (plain) or with its commented LoRA block / packing hints uncommented as they say."""
    text = path.read_text(encoding="utf-8")
    if variant == "lora":
        text, n = re.subn(r"^(\s*)# (pet_config:|  pet_type:|  lora_rank:|  lora_alpha:|  lora_dropout:|"
                          r"  target_modules:)", r"\1\2", text, flags=re.M)
        assert n == 6
    if variant == "lora_bf16":  # pet_config's dtypes, forwarded to the LoRA layers
        text = yaml_text(path, "lora").replace("target_modules:", "param_init_type: bfloat16\n      compute_dtype: "
                                               "bfloat16\n      target_modules:", 1)
    if variant == "packing":
        text, n = re.subn(r"^(\s*)# (packing|pack_rows):", r"\1\2:", text, flags=re.M)
        assert n == 2
        text = re.sub(r'loss_type: "span"', "loss_type: last_token", text)
        text = re.sub(r"(\n    seq_length:) \d+", r"\1 8192", text)
    return text


def build(path, variant, tmp_path):
    import mindrlhf.training.registry  # noqa: F401
    from mindformers import LlamaConfig
    from mindformers.modules import TransformerOpParallelConfig
    from mindspore.nn.utils import no_init_parameters

    from mindrlhf.model.llama_reward import LlamaRewardModel
    from mindrlhf.training.config import load_config

    yaml = tmp_path / f"{path.stem}_{variant}.yaml"
    yaml.write_text(yaml_text(path, variant), encoding="utf-8")
    config = load_config(str(yaml))
    cfg = dict(config.model.model_config)
    cfg.pop("type")
    parallel = config.parallel_config
    cfg["parallel_config"] = TransformerOpParallelConfig(**{k: parallel[k] for k in (
        "data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num", "vocab_emb_dp")})
    start = time.perf_counter()
    with no_init_parameters():
        net = LlamaRewardModel(LlamaConfig(**cfg))
    BUILD_SECONDS[f"{path.stem} {variant}"] = time.perf_counter() - start
    return config, net


@pytest.fixture(scope="module", autouse=True)
def builds_take_under_a_minute(pynative_mode):
    yield
    total = sum(BUILD_SECONDS.values())
    print(f"\n7B builds: {', '.join(f'{k} {v:.1f}s' for k, v in BUILD_SECONDS.items())}; total {total:.1f}s")
    assert total < 60


@pytest.mark.parametrize("variant", ["plain", "lora", "lora_bf16", "packing"])
@pytest.mark.parametrize("path", [LLAMA, QWEN], ids=["llama2_7b", "qwen2_5_7b"])
def test_7b_yaml_builds_whole(path, variant, tmp_path):
    from mindrlhf.interop.hf_import import hf_to_ms_name
    from mindrlhf.checkpoints.names import LORA_A, LORA_B

    config, net = build(path, variant, tmp_path)
    hf, mc = HF[path], config.model.model_config
    params = {p.name: p for p in net.get_parameters()}
    assert all(p.has_init for p in params.values()), "a weight was allocated"
    backbone = {name: p for name, p in params.items() if not name.endswith((LORA_A, LORA_B))
                and not name.startswith("v_head.")}
    want = {hf_to_ms_name(name): shape for name, shape in hf_tensors(hf).items()}
    assert {n: tuple(p.shape) for n, p in backbone.items()} == want
    assert {p.dtype for p in backbone.values()} == {ms.float32}  # param_init_type: float32 master weights
    head = params["v_head.weight"]
    assert tuple(head.shape) == (1, hf["hidden"]) and head.dtype == ms.float32 and head.requires_grad
    lora = {n: p for n, p in params.items() if n.endswith((LORA_A, LORA_B))}
    if variant.startswith("lora"):
        targets = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
        assert net.lora_counts["layers"] == len(lora) // 2 == hf["layers"] * len(targets)
        rank = int(mc.pet_config.lora_rank)
        dtype = ms.bfloat16 if variant == "lora_bf16" else ms.float32  # forwarded, else the projection's
        for name, weight in want.items():
            if name.endswith(".weight") and name.split(".")[-2] in targets:
                out_dim, in_dim = weight
                a, b = lora[name[:-len("weight")] + LORA_A], lora[name[:-len("weight")] + LORA_B]
                assert (tuple(a.shape), tuple(b.shape)) == ((rank, in_dim), (out_dim, rank)), name
                assert a.dtype == b.dtype == dtype and a.requires_grad and b.requires_grad, name
        compute = ms.bfloat16 if variant == "lora_bf16" else getattr(ms, mc.compute_dtype)  # else the model's
        assert {net.model.layers[i].attention.wq.dtype for i in range(hf["layers"])} == {compute}
        assert not any(p.requires_grad for p in backbone.values())
    else:
        assert not lora and all(p.requires_grad for p in backbone.values())
    # docs/configs.md's table: dp 2 x mp 4; value head ((dp, 1), (1, 1)), score gather and CompareLoss by dp
    dp = int(config.parallel_config.data_parallel)
    assert (dp, int(config.parallel_config.model_parallel)) == (2, 4)
    assert net.v_head.matmul.in_strategy == ((dp, 1), (1, 1))
    assert net.gather.in_strategy == ((dp, 1), (dp, 1))
    assert net.loss.slice_chosen.in_strategy == net.loss.slice_rejected.in_strategy == ((1, 1),)
    assert net.loss.sub.in_strategy == ((dp, 1), (dp, 1))
    attention = net.model.layers[0].attention
    if variant == "packing":
        assert net.packed_layout == "ascend" and (attention.input_layout, attention.sparse_mode) == ("TND", 3)
        # the op's strategy: batch by dp, heads by mp, the compressed mask whole, the block lists by dp
        assert attention.flash_attention.flash_attention.in_strategy == ((dp, 4, 1),) * 3 + ((1, 1), (dp,), (dp,))
    else:
        assert (attention.input_layout, attention.sparse_mode) == ("BNSD", 0)


@pytest.mark.parametrize("key, value", [("lora_a_init", "normal"), ("lora_b_init", "zero"),
                                        ("param_init_type", "float64")])
def test_pet_config_keys_lora_layers_would_ignore_are_refused(key, value):
    from mindrlhf.errors import ConfigError
    from mindrlhf.model.lora import lora_settings

    pet = {"pet_type": "lora", "lora_rank": 8, "target_modules": ".*wq", key: value}
    with pytest.raises(ConfigError, match=f"x.yaml: model.model_config.pet_config.{key}: '{value}'"):
        lora_settings({"pet_config": pet}, "x.yaml: model.model_config.pet_config")
