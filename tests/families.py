"""Tiny Qwen2- and Llama-3-shaped Hugging Face models for the tests: safetensors written from numpy, a config.json
as transformers writes it, the family's tokenizer folder trained on the train split, and an independent numpy
forward pass of the Hugging Face architecture (Qwen2Model / LlamaModel) to check what the backbone computes."""
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from conftest import ROOT, TRAIN_JSONL

FAMILIES = {
    # Qwen2: GQA 4:2, q/k/v biases, theta 1e6, eps 1e-6, tied embeddings (no lm_head.weight in the files)
    "qwen2": {"config": ROOT / "model_configs" / "qwen2_5_config" / "run_qwen2_5_tiny_rm_cpu.yaml",
              "hf": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": 192, "vocab_size": 2048, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                     "tie_word_embeddings": True, "torch_dtype": "float32"}},
    # Llama 3: GQA 8:2, no biases, theta 500000, eps 1e-5, its own lm_head
    "llama3": {"config": ROOT / "model_configs" / "llama3_config" / "run_llama_3_tiny_rm_cpu.yaml",
               "hf": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                      "intermediate_size": 224, "vocab_size": 2048, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                      "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "float32"}},
}


def family_tensors(family: str, seed: int = 0) -> dict:
    """HF tensor names and shapes of the family's tiny model, N(0, 0.02) (biases larger, so they matter)."""
    hf = FAMILIES[family]["hf"]
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    hidden, ffn, vocab = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    kv = hf["num_key_value_heads"] * hidden // hf["num_attention_heads"]
    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": 1 + w(hidden)}
    if not hf["tie_word_embeddings"]:
        tensors["lm_head.weight"] = w(vocab, hidden)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(kv, hidden),
                        p + "self_attn.v_proj.weight": w(kv, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
                        p + "mlp.gate_proj.weight": w(ffn, hidden), p + "mlp.down_proj.weight": w(hidden, ffn),
                        p + "mlp.up_proj.weight": w(ffn, hidden), p + "input_layernorm.weight": 1 + w(hidden),
                        p + "post_attention_layernorm.weight": 1 + w(hidden)})
        if hf["model_type"] == "qwen2":
            tensors.update({p + "self_attn.q_proj.bias": w(hidden, scale=0.2),
                            p + "self_attn.k_proj.bias": w(kv, scale=0.2),
                            p + "self_attn.v_proj.bias": w(kv, scale=0.2)})
    return tensors


def write_hf_model(directory: Path, family: str, tensors: dict, **config_changes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(FAMILIES[family]["hf"], **config_changes)))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def train_tokenizer(directory: Path, style: str) -> Path:
    from mindrlhf.tools.hf_tokenizer import corpus, train_hf_tokenizer

    return Path(train_hf_tokenizer(corpus(str(TRAIN_JSONL)), str(directory), style))


def llama3_inv_freq(inv_freq, scaling: dict) -> np.ndarray:
    """Hugging Face's _compute_llama3_parameters (Llama 3.1+ RoPE scaling)."""
    factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def reference_forward(tensors: dict, ids, family: str, theta=None, rope_scaling=None) -> np.ndarray:
    """Hugging Face Qwen2Model/LlamaModel in float64 numpy: RMSNorm, q/k/v (+ bias), RoPE with rotate_half at the
    family's theta, grouped-query attention (each kv head serves n_heads / n_kv_heads consecutive query heads),
    causal softmax, SwiGLU MLP, final norm. Returns (T, hidden) for one sequence; theta overrides the family's,
    rope_scaling applies Llama 3.1's frequency scaling."""
    hf = FAMILIES[family]["hf"]
    heads, kv_heads, eps = hf["num_attention_heads"], hf["num_key_value_heads"], hf["rms_norm_eps"]
    x = tensors["model.embed_tokens.weight"][np.asarray(ids)].astype(np.float64)
    length, hidden = x.shape
    dim = hidden // heads

    def rms(v, weight):
        return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + eps) * weight

    inv_freq = 1.0 / (theta or hf["rope_theta"]) ** (np.arange(0, dim, 2) / dim)
    if rope_scaling:
        inv_freq = llama3_inv_freq(inv_freq, rope_scaling)
    freqs = np.outer(np.arange(length), inv_freq)
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]

    def rope(v):
        return v * cos + np.concatenate([-v[..., dim // 2:], v[..., :dim // 2]], -1) * sin

    causal = np.tril(np.ones((length, length), bool))[None]
    for i in range(hf["num_hidden_layers"]):
        def g(name, i=i):
            return tensors[f"model.layers.{i}.{name}"].astype(np.float64)

        def proj(h, name, i=i):
            bias = tensors.get(f"model.layers.{i}.self_attn.{name}.bias")
            return h @ g(f"self_attn.{name}.weight").T + (0 if bias is None else bias)

        h = rms(x, g("input_layernorm.weight"))
        q = rope(proj(h, "q_proj").reshape(length, heads, dim))
        k = np.repeat(rope(proj(h, "k_proj").reshape(length, kv_heads, dim)), heads // kv_heads, axis=1)
        v = np.repeat(proj(h, "v_proj").reshape(length, kv_heads, dim), heads // kv_heads, axis=1)
        scores = np.where(causal, np.einsum("thd,shd->hts", q, k) / np.sqrt(dim), -np.inf)
        attn = np.exp(scores - scores.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", attn, v).reshape(length, hidden) @ g("self_attn.o_proj.weight").T
        h = rms(x, g("post_attention_layernorm.weight"))
        gate = h @ g("mlp.gate_proj.weight").T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ g("mlp.up_proj.weight").T)) @ g("mlp.down_proj.weight").T
    return rms(x, tensors["model.norm.weight"].astype(np.float64))


def build_reward_model(config_path, checkpoint="", **changes):
    """LlamaRewardModel of a YAML's model_config, in pynative mode, optionally initialised from a checkpoint."""
    import mindspore as ms
    from mindformers import LlamaConfig

    from mindrlhf.model.llama_reward import LlamaRewardModel
    from mindrlhf.training.config import load_config

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    cfg = dict(load_config(str(config_path)).model.model_config)
    cfg.pop("type")
    cfg.update(checkpoint_name_or_path=str(checkpoint), **changes)
    return LlamaRewardModel(LlamaConfig(**cfg))
