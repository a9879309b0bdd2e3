"""A reward checkpoint -> a Hugging Face folder that transformers loads as LlamaForSequenceClassification.

`config.json`: num_labels 1, the pad id, every Llama field from the run YAML's model_config, and (when the
checkpoint has reward statistics) OpenRLHF's `normalize_reward`, `mean`, `std`. `model.safetensors`: written
tensor by tensor (header first, then each tensor's bytes; no second copy of the model), the value head as
`score.weight` (transformers' head, and OpenRLHF's value_head_prefix "score"). The tokenizer files are copied.
Tensor names are the exact inverse of weights.HF_TO_MS, so HF -> convert_hf_to_ms -> export gives back
identical tensors.

transformers reads the reward at the last token that is not pad_token_id. Our rows carry no EOS and never the
pad id (2, also Llama 2's EOS) inside the text, so that is the same last real token we read.
"""
import json
import os
import re
import shutil
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from mindrlhf.errors import ConfigError, OutputExistsError
from mindrlhf.models.weights import HF_TO_MS, expected_shapes, ffn_hidden_size, load_whole

VALUE_HEAD = ("v_head.weight", "score.weight")
_DTYPES = {"float32": (np.float32, "F32"), "float16": (np.float16, "F16"), "bfloat16": (np.uint16, "BF16")}


def _ms_to_hf_rules() -> List[Tuple[re.Pattern, str]]:
    """weights.HF_TO_MS turned around: MindSpore-name regex -> Hugging Face name template."""
    rules = []
    for hf_pattern, ms_target in HF_TO_MS:
        hf_template = hf_pattern[1:-1].replace(r"(\d+)", r"\1").replace("\\.", ".")
        ms_regex = "^" + re.escape(ms_target.replace(r"\1", "\0")).replace("\0", r"(\d+)") + "$"
        rules.append((re.compile(ms_regex), hf_template))
    return rules


_RULES = _ms_to_hf_rules()


def ms_to_hf_name(name: str) -> Optional[str]:
    if name == VALUE_HEAD[0]:
        return VALUE_HEAD[1]
    for regex, template in _RULES:
        if regex.match(name):
            return regex.sub(template, name)
    return None


def _get(model_config):
    return model_config.get if hasattr(model_config, "get") else lambda k, d=None: getattr(model_config, k, d)


def hf_config(model_config, dtype: str = "float32", stats: Optional[dict] = None) -> dict:
    """config.json for LlamaForSequenceClassification from the YAML's model_config."""
    get = _get(model_config)
    if get("qkv_has_bias"):
        raise ConfigError("export writes Llama (LlamaForSequenceClassification); this model_config has q/k/v biases "
                          "(Qwen2 style), which Llama's config cannot express")
    if str(get("extend_method", "None")) not in ("None", "", "none"):
        raise ConfigError(f"model_config.extend_method {get('extend_method')!r}: RoPE extensions are not "
                          "translated to Hugging Face's rope_scaling by the export")
    hidden, heads = int(get("hidden_size")), int(get("num_heads"))
    pad = int(get("pad_token_id"))
    config = {
        "architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
        "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
        "problem_type": "regression",
        "vocab_size": int(get("vocab_size")), "hidden_size": hidden,
        "intermediate_size": ffn_hidden_size(hidden, int(get("multiple_of", 256) or 256),
                                             get("ffn_dim_multiplier"), get("intermediate_size")),
        "num_hidden_layers": int(get("num_layers")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("n_kv_heads") or heads), "head_dim": hidden // heads,
        "hidden_act": "silu", "rms_norm_eps": float(get("rms_norm_eps", 1e-5)),
        "rope_theta": float(get("theta", 10000.0) or 10000.0), "rope_scaling": None,
        "max_position_embeddings": int(get("max_position_embedding") or get("seq_length")),
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
        "tie_word_embeddings": False, "use_cache": False, "initializer_range": 0.02,
        "bos_token_id": int(get("bos_token_id", 1)), "eos_token_id": int(get("eos_token_id", 2)),
        "pad_token_id": pad, "torch_dtype": dtype,
    }
    if stats is not None:  # OpenRLHF's get_llm_for_sequence_regression reads these
        config.update(normalize_reward=True, mean=float(stats["mean"]), std=float(stats["std"]))
    return config


def _float_to_bf16(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (as torch rounds)."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _target(param, dtype: Optional[str]) -> str:
    """The output dtype of one tensor: the one asked for, else as stored (bfloat16, float16, else float32)."""
    import mindspore as ms

    if dtype:
        return dtype
    return {ms.bfloat16: "bfloat16", ms.float16: "float16"}.get(param.dtype, "float32")


def _as_numpy(param, dtype: str) -> np.ndarray:
    import mindspore as ms

    array = (param.astype(ms.float32) if param.dtype == ms.bfloat16 else param).asnumpy()
    if dtype == "bfloat16":
        return _float_to_bf16(array)
    return np.ascontiguousarray(array, _DTYPES[dtype][0])


def write_safetensors(path: str, tensors: List[Tuple[str, Tuple[int, ...], str, int]],
                      arrays: Iterator[np.ndarray], metadata: Optional[Dict[str, str]] = None):
    """Stream a safetensors file: the header from (name, shape, dtype, nbytes), then each array as it comes."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, shape, st_type, nbytes in tensors:
        header[name] = {"dtype": st_type, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for (name, _, _, nbytes), array in zip(tensors, arrays):
            data = array.tobytes()
            if len(data) != nbytes:
                raise ConfigError(f"{name}: {len(data)} bytes, the header says {nbytes}")
            fh.write(data)


def tokenizer_files(tokenizer_path: str, seq_length: int, pad_id: int) -> Dict[str, object]:
    """{file name: source path or JSON object}: the tokenizer as transformers' AutoTokenizer reads it.

    A SentencePiece tokenizer.model gets a LlamaTokenizer tokenizer_config.json without BOS/EOS (our data has
    none) and the pad token of the run; a Hugging Face folder is copied as it is."""
    from mindrlhf.data.tokenizer import resolve_tokenizer_path

    path = resolve_tokenizer_path(tokenizer_path)
    if path.endswith(".json"):
        folder = os.path.dirname(os.path.abspath(path))
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
        return {n: os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))}
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    piece = sp.id_to_piece
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
              "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
              "pad_token": piece(pad_id), "model_max_length": seq_length, "padding_side": "right",
              "legacy": True, "clean_up_tokenization_spaces": False}
    return {"tokenizer.model": path, "tokenizer_config.json": config}


def export_checkpoint(checkpoint: str, model_config, output_dir: str, tokenizer: str,
                      stats: Optional[dict] = None, dtype: Optional[str] = None, src_strategy: Optional[str] = None,
                      overwrite: bool = False, log=print) -> dict:
    """One reward checkpoint (whole, or model-parallel slices merged with the run's strategy) -> output_dir.

    Written into a temporary folder beside output_dir and renamed when complete."""
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)) and not overwrite:
        raise OutputExistsError(f"{output_dir} already exists; pass --overwrite to replace it or choose another path")
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {sorted(_DTYPES)}")
    config = hf_config(model_config, dtype or "float32", stats)
    shapes = dict(expected_shapes(model_config))
    shapes[VALUE_HEAD[0]] = (1, config["hidden_size"])
    params = load_whole(checkpoint, shapes, src_strategy, log=log)
    missing = [n for n in shapes if n not in params]
    if missing:
        raise ConfigError(f"{checkpoint}: lacks {len(missing)} tensor(s) of the reward model, e.g. {missing[:3]}; "
                          "is it a reward-model checkpoint of this config?")
    wrong = [(n, tuple(params[n].shape), s) for n, s in shapes.items() if tuple(params[n].shape) != tuple(s)]
    if wrong:
        raise ConfigError(f"{checkpoint}: tensor {wrong[0][0]} has shape {wrong[0][1]}, the config expects "
                          f"{wrong[0][2]}")
    names = sorted(shapes, key=lambda n: ms_to_hf_name(n))
    types = {name: _target(params[name], dtype) for name in names}
    entries = [(ms_to_hf_name(n), tuple(shapes[n]), _DTYPES[types[n]][1],
                int(np.prod(shapes[n])) * np.dtype(_DTYPES[types[n]][0]).itemsize) for n in names]
    config["torch_dtype"] = types[names[0]]

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(output_dir))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), entries,
                          (_as_numpy(params[n], types[n]) for n in names), {"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
        copied = []
        for file_name, source in tokenizer_files(tokenizer, int(_get(model_config)("seq_length")),
                                                 config["pad_token_id"]).items():
            target = os.path.join(tmp, file_name)
            if isinstance(source, dict):
                with open(target, "w", encoding="utf-8") as fh:
                    json.dump(source, fh, indent=2, ensure_ascii=False)
            else:
                shutil.copyfile(source, target)
            copied.append(file_name)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        elif os.path.exists(output_dir):
            os.remove(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {len(entries)} tensors of {checkpoint} to {output_dir}")
    return {"output_dir": output_dir, "checkpoint": checkpoint, "tensors": len(entries),
            "tokenizer_files": copied, "normalize_reward": stats is not None, "dtype": config["torch_dtype"]}
