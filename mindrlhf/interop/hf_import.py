"""Hugging Face Llama 2/3 or Qwen2 (safetensors + config.json) -> a MindSpore checkpoint of the reward model's
backbone.

In reading order: the tensor names (HF_TO_MS, which hf_folder.py turns around), the shapes a config gives each
tensor, config.json read in either transformers layout (RoPE theta and scaling, norm epsilon) and checked against
the run YAML, the safetensors files read memory-mapped (no PyTorch), and the conversion itself: tensor by tensor,
every shape checked against the target config, streamed into the checkpoint (checkpoints/stream.py).
"""
import json
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from mindrlhf.config_access import config_getter
from mindrlhf.errors import ConfigError
from mindrlhf.io import replaced_whole
from mindrlhf.checkpoints.names import VALUE_HEAD_WEIGHT
from mindrlhf.checkpoints.safetensors_io import bf16_to_f32, iter_safetensors
from mindrlhf.checkpoints.stream import CheckpointStreamWriter

HF_HEAD = "score"  # the value head in transformers (...ForSequenceClassification) and OpenRLHF (value_head_prefix)
HF_TO_MS = [
    (r"^model\.embed_tokens\.weight$", "model.tok_embeddings.embedding_weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$", r"model.layers.\1.attention.wq.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.weight$", r"model.layers.\1.attention.wk.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.weight$", r"model.layers.\1.attention.wv.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$", r"model.layers.\1.attention.wo.weight"),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.bias$", r"model.layers.\1.attention.wq.bias"),  # Qwen2
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.bias$", r"model.layers.\1.attention.wk.bias"),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.bias$", r"model.layers.\1.attention.wv.bias"),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", r"model.layers.\1.feed_forward.w1.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.weight$", r"model.layers.\1.feed_forward.w2.weight"),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.weight$", r"model.layers.\1.feed_forward.w3.weight"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"model.layers.\1.attention_norm.weight"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"model.layers.\1.ffn_norm.weight"),
    (r"^model\.norm\.weight$", "model.norm_out.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (rf"^{HF_HEAD}\.weight$", VALUE_HEAD_WEIGHT),  # a reward model's head
]
IGNORED_HF = re.compile(r"rotary_emb\.inv_freq$")
_MS_TYPES = {"float16": (np.float16, "Float16"), "float32": (np.float32, "Float32")}


def hf_to_ms_name(name: str) -> Optional[str]:
    for pattern, target in HF_TO_MS:
        if re.match(pattern, name):
            return re.sub(pattern, target, name)
    return None


def ffn_hidden_size(hidden: int, multiple_of: int = 256, ffn_dim_multiplier=None, intermediate_size=None) -> int:
    """Llama's FFN width as MindFormers computes it (11008 for hidden 4096, multiple_of 256)."""
    if intermediate_size:
        return int(intermediate_size)
    width = int(2 * (4 * hidden) / 3)
    if ffn_dim_multiplier:
        width = int(ffn_dim_multiplier * width)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


def expected_shapes(model_config) -> Dict[str, Tuple[int, ...]]:
    """Every backbone tensor's shape for a LlamaConfig-like mapping (the YAML's model_config): GQA k/v widths
    from n_kv_heads, q/k/v biases with qkv_has_bias."""
    get = config_getter(model_config)
    hidden, layers, heads = int(get("hidden_size")), int(get("num_layers")), int(get("num_heads"))
    kv_heads = int(get("n_kv_heads") or heads)
    vocab = int(get("vocab_size"))
    ffn = ffn_hidden_size(hidden, int(get("multiple_of", 256) or 256), get("ffn_dim_multiplier"),
                          get("intermediate_size"))
    kv = kv_heads * (hidden // heads)
    shapes = {"model.tok_embeddings.embedding_weight": (vocab, hidden), "model.norm_out.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "attention.wq.weight": (hidden, hidden), p + "attention.wk.weight": (kv, hidden),
                       p + "attention.wv.weight": (kv, hidden), p + "attention.wo.weight": (hidden, hidden),
                       p + "feed_forward.w1.weight": (ffn, hidden), p + "feed_forward.w2.weight": (hidden, ffn),
                       p + "feed_forward.w3.weight": (ffn, hidden), p + "attention_norm.weight": (hidden,),
                       p + "ffn_norm.weight": (hidden,)})
        if get("qkv_has_bias"):
            shapes.update({p + "attention.wq.bias": (hidden,), p + "attention.wk.bias": (kv,),
                           p + "attention.wv.bias": (kv,)})
    return shapes


LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def hf_rope(hf: dict, where: str = "config.json") -> Tuple[float, Optional[dict]]:
    """(theta, scaling) of a config.json in either layout: transformers 5 writes `rope_parameters: {rope_type,
    rope_theta, ...}` and no top-level keys, transformers 4 `rope_theta` and `rope_scaling` (type or rope_type).
    scaling is None for plain RoPE, else its fields with rope_type (Llama 3.1: llama3, factor, low/high_freq_factor,
    original_max_position_embeddings, also taken from the top level). Both layouts present must agree: transformers
    5 lets the old keys win, transformers 4 reads only them, so a disagreement has no one meaning."""
    params = hf.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):  # one entry per layer type (Gemma 3 style)
        kinds = list(params.values())
        if any(k != kinds[0] for k in kinds):
            raise ConfigError(f"{where}: rope_parameters differ between layer types {sorted(params)}; a "
                              "Llama-architecture model has one RoPE")
        params = kinds[0]
    new_theta = params.get("rope_theta")
    old_theta = hf.get("rope_theta")
    if new_theta is not None and old_theta is not None and float(new_theta) != float(old_theta):
        raise ConfigError(f"{where}: rope_theta {float(old_theta)} and rope_parameters.rope_theta {float(new_theta)} "
                          "disagree; fix config.json so both say the theta the model was trained with")
    theta = float(old_theta if old_theta is not None else new_theta if new_theta is not None else 10000.0)

    def scaling_of(fields):
        fields = dict(fields or {})
        kind = fields.pop("rope_type", None) or fields.pop("type", None)
        fields.pop("type", None)
        fields.pop("rope_theta", None)
        if kind in (None, "default") and not fields:
            return None
        fields["rope_type"] = kind
        if kind == "llama3" and fields.get("original_max_position_embeddings") is None \
                and hf.get("original_max_position_embeddings") is not None:
            fields["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        return fields

    new, old = scaling_of(params), scaling_of(hf.get("rope_scaling"))
    if params and "rope_scaling" in hf and new != old:
        raise ConfigError(f"{where}: rope_scaling {old} and rope_parameters {new} disagree; fix config.json so both "
                          "say the RoPE scaling the model was trained with")
    scaling = new if params else old
    if scaling and scaling["rope_type"] == "llama3":
        absent = [k for k in LLAMA3_SCALING if scaling.get(k) is None]
        if absent:
            raise ConfigError(f"{where}: Llama 3.1 RoPE scaling (rope_type llama3) without {absent}")
    return theta, scaling


def hf_model_config(hf: dict, where: str = "config.json") -> dict:
    """A Hugging Face config.json (Llama 2/3, Qwen2; transformers 4 or 5 layout) as the LlamaConfig fields the
    shapes and RoPE depend on.

    Qwen2's config has no attention_bias: its q/k/v always carry one. Qwen2 ties lm_head to embed_tokens when
    tie_word_embeddings is set (checkpoints may then hold no lm_head.weight)."""
    qwen = hf.get("model_type") == "qwen2"
    theta, scaling = hf_rope(hf, where)
    config = {"hidden_size": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
              "num_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads"),
              "vocab_size": hf["vocab_size"], "intermediate_size": hf.get("intermediate_size"),
              "qkv_has_bias": bool(hf.get("attention_bias", qwen)), "theta": theta,
              "rms_norm_eps": hf.get("rms_norm_eps"), "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False))}
    if scaling and scaling["rope_type"] == "llama3":
        config.update(extend_method="LLAMA3", scaling_factor={k: float(scaling[k]) if k != LLAMA3_SCALING[3]
                                                              else int(scaling[k]) for k in LLAMA3_SCALING})
    return config


def check_hf_config(hf: dict, model_config, where: str):
    """What shapes cannot show: RoPE theta, RoPE scaling (Llama 3.1+) and the norm epsilon of config.json (either
    layout, see hf_rope) must be the YAML's, or the converted weights would run with another RoPE/normalisation
    than they were trained with."""
    get = config_getter(model_config)
    ours = hf_model_config(hf, where)
    for key, default in (("theta", 10000.0), ("rms_norm_eps", None)):
        mine = get(key, default)
        if ours[key] is not None and mine is not None and abs(float(ours[key]) - float(mine)) > 1e-12 * abs(ours[key]):
            raise ConfigError(f"{where}: {'rope_theta' if key == 'theta' else key} is {ours[key]} but the target "
                              f"config's model_config.{key} is {mine}; the converted weights would be used with "
                              "another RoPE/normalisation than they were trained with")
    _, scaling = hf_rope(hf, where)
    kind = scaling["rope_type"] if scaling else None
    method, factors = str(get("extend_method", "None") or "None"), get("scaling_factor", None)
    if kind == "llama3":
        wanted = ours["scaling_factor"]
        same = method == "LLAMA3" and hasattr(factors, "get") and all(
            factors.get(k) is not None and float(factors.get(k)) == float(v) for k, v in wanted.items())
        if not same:
            raise ConfigError(f"{where}: rope_scaling is Llama 3.1's ({wanted}); set model_config.extend_method: "
                              f"\"LLAMA3\" and scaling_factor: {wanted} (the YAML has {method}, {factors})")
    elif kind is not None:
        raise ConfigError(f"{where}: RoPE scaling {scaling} is not supported (of the scalings only Llama 3.1's "
                          "rope_type llama3 is)")
    elif method != "None":
        raise ConfigError(f"{where}: has no rope_scaling but model_config.extend_method is {method}")


def safetensors_files(input_path: str) -> List[str]:
    """One model.safetensors, or the shards named by model.safetensors.index.json, in index order."""
    if os.path.isfile(input_path):
        return [input_path]
    if not os.path.isdir(input_path):
        raise ConfigError(f"{input_path}: not a file or directory")
    index = os.path.join(input_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(input_path, s))]
        if missing:
            raise ConfigError(f"{index}: shard(s) {missing} are missing")
        return [os.path.join(input_path, s) for s in shards]
    files = sorted(f for f in os.listdir(input_path) if f.endswith(".safetensors"))
    if not files:
        raise ConfigError(f"{input_path}: no .safetensors files (and no model.safetensors.index.json)")
    return [os.path.join(input_path, f) for f in files]


def _cast(array: np.ndarray, src_type: str, dtype: Optional[str]) -> Tuple[np.ndarray, str]:
    if src_type == "BFloat16":
        array = bf16_to_f32(np.asarray(array))
        src_type = "Float32"
    if dtype is None:
        return np.ascontiguousarray(array), src_type
    np_type, ms_type = _MS_TYPES[dtype]
    return np.ascontiguousarray(array, dtype=np_type), ms_type


def convert_hf_to_ms(input_path: str, output_path: str, model_config=None, dtype: Optional[str] = None,
                     keep_lm_head: bool = False, log=print) -> dict:
    """Hugging Face Llama 2/3 or Qwen2 safetensors (one file or sharded with an index) -> a MindSpore checkpoint.

    Tied embeddings (Qwen2): with keep_lm_head and no lm_head.weight in the files, embed_tokens is written as
    lm_head.weight, as transformers ties them.
    """
    hf_config = os.path.join(input_path, "config.json") if os.path.isdir(input_path) else None
    hf = None
    if hf_config and os.path.isfile(hf_config):
        with open(hf_config, encoding="utf-8") as fh:
            hf = json.load(fh)
    if model_config is None:
        if hf is None:
            raise ConfigError(f"{input_path}: pass --config (a run YAML) or keep config.json beside the weights")
        model_config = hf_model_config(hf, hf_config)
    elif hf is not None:
        check_hf_config(hf, model_config, hf_config)
    get = config_getter(model_config)
    tied = bool(hf.get("tie_word_embeddings", False) if hf is not None else get("tie_word_embeddings", False))
    expected = expected_shapes(model_config)
    seen, unmapped, dropped = set(), [], []
    embed_source = None
    with replaced_whole(output_path) as tmp, CheckpointStreamWriter(tmp) as writer:
        for shard in safetensors_files(input_path):
            log(f"reading {shard}")
            for hf_name, array, src_type in iter_safetensors(shard):
                name = hf_to_ms_name(hf_name)
                if name is None:
                    if not IGNORED_HF.search(hf_name):
                        unmapped.append(hf_name)
                    continue
                if name == "lm_head.weight" and not keep_lm_head:
                    dropped.append(hf_name)
                    continue
                if name == VALUE_HEAD_WEIGHT and tuple(array.shape) != (1, int(get("hidden_size"))):
                    raise ConfigError(f"{shard}: tensor {hf_name} (-> {name}) has shape {tuple(array.shape)}, a "
                                      f"reward model's one-label head is (1, {get('hidden_size')})")
                if name not in ("lm_head.weight", VALUE_HEAD_WEIGHT) and name not in expected:
                    raise ConfigError(f"{shard}: tensor {hf_name} (-> {name}) has no place in the target config "
                                      "(q/k/v biases need model_config.qkv_has_bias: True; layers beyond num_layers "
                                      "are not read)")
                if name in expected and tuple(array.shape) != expected[name]:
                    raise ConfigError(f"{shard}: tensor {hf_name} (-> {name}) has shape {tuple(array.shape)}, "
                                      f"the target config expects {expected[name]}")
                if name in seen:
                    raise ConfigError(f"{shard}: tensor {hf_name} appears twice")
                seen.add(name)
                if hf_name == "model.embed_tokens.weight":
                    embed_source = shard
                data, ms_type = _cast(array, src_type, dtype)
                writer.write(name, data, ms_type)
        missing = sorted(set(expected) - seen)
        if unmapped:
            raise ConfigError(f"{input_path}: tensor(s) with no place in the reward model: {unmapped[:10]}")
        if missing:
            raise ConfigError(f"{input_path}: missing tensor(s) the target config needs: {missing[:10]}"
                              f"{' ...' if len(missing) > 10 else ''}")
        if keep_lm_head and "lm_head.weight" not in seen:
            if not tied:
                raise ConfigError(f"{input_path}: no lm_head.weight, and the model does not tie it to embed_tokens "
                                  "(tie_word_embeddings is false)")
            array, src_type = next((a, t) for n, a, t in iter_safetensors(embed_source)
                                   if n == "model.embed_tokens.weight")
            writer.write("lm_head.weight", *_cast(array, src_type, dtype))
            seen.add("lm_head.weight")
    return {"output_path": output_path, "tensors": len(seen), "dropped": dropped, "tied_embeddings": tied}
