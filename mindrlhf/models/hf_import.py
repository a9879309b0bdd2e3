"""Checkpoint I/O: Hugging Face safetensors -> MindSpore .ckpt, one checkpoint reader, backbone loading, and
model-parallel slices merged into whole tensors.

Conversion streams tensor by tensor (memory-mapped, no PyTorch) and checks every shape against the target
config. Loading takes the backbone (`model.*`), drops the language-model head, initialises the value head,
and says exactly which parameters came from where; any mismatch is an error naming the tensor. Slices saved
with integrated_save: False under model parallel are merged with the run's strategy file through MindSpore's
own transform_checkpoint_by_rank (host-side only: no device, no communication).
"""
import json
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from mindrlhf.errors import ConfigError

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
    (r"^score\.weight$", "v_head.weight"),  # a reward model's head (LlamaForSequenceClassification, OpenRLHF)
]
IGNORED_HF = re.compile(r"rotary_emb\.inv_freq$")
_ST_DTYPES = {"F16": (np.float16, "Float16"), "F32": (np.float32, "Float32"), "BF16": (np.uint16, "BFloat16"),
              "F64": (np.float64, "Float64")}
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
    get = model_config.get if hasattr(model_config, "get") else lambda k, d=None: getattr(model_config, k, d)
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
    get = model_config.get if hasattr(model_config, "get") else lambda k, d=None: getattr(model_config, k, d)
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


def iter_safetensors(path: str) -> Iterator[Tuple[str, np.ndarray, str]]:
    """(name, memory-mapped array, MindSpore type name) per tensor; bf16 stays as raw 16-bit words."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    base = 8 + header_len
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _ST_DTYPES:
            raise ConfigError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        np_type, ms_type = _ST_DTYPES[meta["dtype"]]
        start, end = meta["data_offsets"]
        count = int(np.prod(meta["shape"])) if meta["shape"] else 1
        array = np.memmap(path, dtype=np_type, mode="r", offset=base + start, shape=(count,))
        if (end - start) != array.nbytes:
            raise ConfigError(f"{path}: tensor {name} is truncated")
        yield name, array.reshape(meta["shape"]), ms_type


def _bf16_to_f32(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)


def _cast(array: np.ndarray, src_type: str, dtype: Optional[str]) -> Tuple[np.ndarray, str]:
    if src_type == "BFloat16":
        array = _bf16_to_f32(np.asarray(array))
        src_type = "Float32"
    if dtype is None:
        return np.ascontiguousarray(array), src_type
    np_type, ms_type = _MS_TYPES[dtype]
    return np.ascontiguousarray(array, dtype=np_type), ms_type


class CheckpointStreamWriter:
    """Appends one MindSpore Checkpoint protobuf message per tensor slice, as mindspore.save_checkpoint does,
    so a 7B model never sits in memory whole; written to a temporary name and renamed when complete."""

    SLICE_BYTES = 1 << 30

    def __init__(self, path: str):
        from mindspore.train.checkpoint_pb2 import Checkpoint

        self.Checkpoint = Checkpoint  # pylint: disable=invalid-name
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self.fh = open(self.tmp, "wb")  # pylint: disable=consider-using-with

    def write(self, name: str, array: np.ndarray, ms_type: str):
        slices = max(1, int(np.ceil(array.nbytes / self.SLICE_BYTES)))
        flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1)
        for part in np.array_split(flat, slices) if slices > 1 else [array]:
            message = self.Checkpoint()
            value = message.value.add()
            value.tag = name
            value.tensor.dims.extend(list(array.shape))
            value.tensor.tensor_type = ms_type
            value.tensor.tensor_content = np.ascontiguousarray(part).tobytes()
            self.fh.write(message.SerializeToString())

    def commit(self):
        self.fh.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.fh.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


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
    get = model_config.get if hasattr(model_config, "get") else lambda k, d=None: getattr(model_config, k, d)
    tied = bool(hf.get("tie_word_embeddings", False) if hf is not None else get("tie_word_embeddings", False))
    expected = expected_shapes(model_config)
    seen, unmapped, dropped = set(), [], []
    embed_source = None
    writer = CheckpointStreamWriter(output_path)
    try:
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
                if name == "v_head.weight" and tuple(array.shape) != (1, int(get("hidden_size"))):
                    raise ConfigError(f"{shard}: tensor {hf_name} (-> {name}) has shape {tuple(array.shape)}, a "
                                      f"reward model's one-label head is (1, {get('hidden_size')})")
                if name not in ("lm_head.weight", "v_head.weight") and name not in expected:
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
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return {"output_path": output_path, "tensors": len(seen), "dropped": dropped, "tied_embeddings": tied}


def load_checkpoint_dict(path: str, choice_func=None) -> dict:
    """A checkpoint's parameters, or ConfigError for a truncated/corrupt file (never half-loaded).

    choice_func limits which tensors are materialised; the whole file is still parsed, so it still validates.
    """
    import mindspore as ms

    fmt = "safetensors" if path.endswith(".safetensors") else "ckpt"
    try:
        return ms.load_checkpoint(path, format=fmt, choice_func=choice_func)
    except Exception as err:  # pylint: disable=broad-except  (MindSpore raises several types for bad files)
        raise ConfigError(f"{path}: checkpoint is corrupt or truncated ({str(err).splitlines()[0]})") from None


def checkpoint_step(params: dict) -> Optional[int]:
    """The optimizer's global_step saved in a checkpoint's parameters (None for weights-only files)."""
    step = params.get("global_step")
    if step is None:
        return None
    return int(np.asarray(step.asnumpy()).reshape(-1)[0])


def load_backbone(network, path: str, log=print) -> dict:
    """Initialise a LlamaRewardModel from a Llama (or reward-model) checkpoint; returns what went where."""
    import mindspore as ms

    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint_name_or_path '{path}' is not a local file. mindrlhf never downloads "
                          "weights: pass a local path to a .ckpt or .safetensors file")
    params = load_checkpoint_dict(path)
    own = {p.name: p for p in network.get_parameters()}
    loaded, fresh = {}, []
    for name, param in own.items():
        if name not in params:
            if name.startswith("v_head."):
                fresh.append(name)
                continue
            raise ConfigError(f"{path}: has no tensor {name} for the backbone")
        if tuple(params[name].shape) != tuple(param.shape):
            raise ConfigError(f"{path}: tensor {name} has shape {tuple(params[name].shape)}, "
                              f"the model expects {tuple(param.shape)}")
        loaded[name] = params[name]
    ignored = sorted(n for n in params if n not in own and not n.startswith(("adam_", "accu_grads")))
    not_loaded, _ = ms.load_param_into_net(network, loaded, strict_load=False)
    if not_loaded and set(not_loaded) - set(fresh):
        raise ConfigError(f"{path}: could not load {sorted(set(not_loaded) - set(fresh))[:5]}")
    report = {"checkpoint": path, "loaded": sorted(loaded), "newly_initialised": fresh, "ignored": ignored}
    log(f"loaded {len(loaded)} parameters from {path}; newly initialised: {fresh or 'none'}; "
        f"ignored from the checkpoint: {ignored or 'none'}")
    return report


VALUE_HEAD = "v_head."  # whole (replicated) in every rank's slice
STRATEGY_HINT = ("pass --src_strategy with the training run's strategy file (MindFormers writes it to "
                 "<output_dir>/strategy/ckpt_strategy_rank_0.ckpt)")


def rank_of_checkpoint(path: str) -> Tuple[str, int]:
    """(checkpoint root holding rank_N/, N) for <root>/rank_N/<file>.ckpt."""
    rank_dir = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(rank_dir)
    if not re.fullmatch(r"rank_\d+", name):
        raise ConfigError(f"{path}: model-parallel slices live in <checkpoint root>/rank_N/; this file is not in a "
                          "rank_N folder")
    return os.path.dirname(rank_dir), int(name[len("rank_"):])


def find_strategy(checkpoint: str, src_strategy: Optional[str] = None) -> Optional[str]:
    """The strategy file (or folder of them) for a sliced checkpoint: the one given, else the run's own
    <output_dir>/strategy/ beside <output_dir>/checkpoint/rank_N/; None when there is none."""
    if src_strategy:
        if not os.path.exists(src_strategy):
            raise ConfigError(f"--src_strategy {src_strategy} does not exist")
        return src_strategy
    root, _ = rank_of_checkpoint(checkpoint)
    candidate = os.path.join(os.path.dirname(root), "strategy")
    return candidate if os.path.isdir(candidate) and os.listdir(candidate) else None


def strategy_file(path: str, workdir: str) -> str:
    """One strategy file: the file itself, the only one in a folder, or (pipeline stages write one file per
    stage) the folder's files merged by MindSpore's merge_pipeline_strategys."""
    import mindspore as ms

    if os.path.isfile(path):
        return path
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".ckpt"))
    if not files:
        raise ConfigError(f"{path}: no strategy .ckpt files")
    stages = {open(f, "rb").read() for f in files}  # pylint: disable=consider-using-with
    if len(stages) == 1:  # every rank of one stage writes the same layout
        return files[0]
    merged = os.path.join(workdir, "merged_strategy.ckpt")
    ms.merge_pipeline_strategys(path, merged)
    return merged


def merge_slices(checkpoint: str, strategy: str, output_path: str) -> str:
    """<root>/rank_0/<file>.ckpt and its sibling slices (same file name with rank_N) -> one whole checkpoint.

    Every tensor the strategy lays out is reassembled; the others (global_step, loss scale) come from rank 0.
    Slices are picked by name, so their global_step must agree: a mix of steps is refused, naming the files.
    Written to a temporary name and renamed when complete.
    """
    import tempfile

    import mindspore as ms

    root, _ = rank_of_checkpoint(checkpoint)
    name = os.path.basename(checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output_path))) as work:
        layout = strategy_file(strategy, work)
        try:
            ranks = ms.rank_list_for_transform(0, layout, None)
        except Exception as err:  # pylint: disable=broad-except  (protobuf and MindSpore raise several types)
            raise ConfigError(f"{strategy}: not a MindSpore strategy file ({str(err).splitlines()[0]})") from None
        files, steps = {}, {}
        for rank in ranks:
            path = os.path.join(root, f"rank_{rank}", re.sub(r"_rank_\d+", f"_rank_{rank}", name))
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: slice of rank {rank} is missing (the strategy {strategy} spreads "
                                  f"the model over ranks {sorted(ranks)})")
            # a truncated slice fails here, by name (the whole file is parsed, two small tensors materialised)
            steps[path] = checkpoint_step(load_checkpoint_dict(
                path, choice_func=lambda n: n.startswith(VALUE_HEAD) or n == "global_step"))
            files[rank] = path
        if os.path.abspath(checkpoint) not in map(os.path.abspath, steps):
            steps[checkpoint] = checkpoint_step(load_checkpoint_dict(checkpoint, lambda n: n == "global_step"))
        if len(set(steps.values())) > 1:  # names repeat across resumed runs: a stale rank's file matches the pattern
            shown = "; ".join(f"{path}: step {step}" for path, step in steps.items())
            raise ConfigError(f"{checkpoint}: the model-parallel slices of this name come from different steps "
                              f"({shown}); merging them would mix weights. Keep the slices of one step (move the "
                              "stale rank_N files away, e.g. left by a resumed or re-trained run) and rerun")
        tmp = os.path.join(work, "merged.ckpt")
        ms.transform_checkpoint_by_rank(0, files, tmp, layout, None)
        os.replace(tmp, output_path)
    return output_path


def load_whole(checkpoint: str, expected: Dict[str, Tuple[int, ...]], src_strategy: Optional[str] = None,
               log=print) -> dict:
    """A checkpoint's parameters with whole tensors: read as is, or merged from model-parallel slices when
    its shapes are those of slices. A shape that still differs is an error naming the tensor and what to pass."""
    import tempfile

    params = load_checkpoint_dict(checkpoint)
    wrong = [(n, tuple(params[n].shape), shape) for n, shape in expected.items()
             if n in params and tuple(params[n].shape) != tuple(shape)]
    if not wrong:
        return params
    name, got, want = wrong[0]
    strategy = find_strategy(checkpoint, src_strategy)
    if strategy is None:
        raise ConfigError(f"{checkpoint}: parameter {name} has shape {got}, the model expects {want}: the file "
                          f"holds model-parallel slices; {STRATEGY_HINT}")
    with tempfile.TemporaryDirectory() as work:
        merged = merge_slices(checkpoint, strategy, os.path.join(work, "whole.ckpt"))
        params = load_checkpoint_dict(merged)
    log(f"merged the model-parallel slices of {checkpoint} with strategy {strategy}")
    for name, shape in expected.items():
        if name in params and tuple(params[name].shape) != tuple(shape):
            raise ConfigError(f"{checkpoint}: merged with {strategy}, parameter {name} has shape "
                              f"{tuple(params[name].shape)} but the model expects {tuple(shape)}: the strategy file "
                              f"is not the one of this run; {STRATEGY_HINT}")
    return params
