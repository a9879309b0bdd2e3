"""A Hugging Face reward-model folder, the parts both exports write (hf_export.py: the merged model; peft.py: a
PEFT adapter): tensor names (the exact inverse of hf_import.HF_TO_MS), config.json, tensors in an output dtype,
the tokenizer files, a checkpoint's reward tensors with LoRA checked, and EXPORT_MARKER, which marks the folder as
ours so that --overwrite replaces nothing else.

`config.json`: num_labels 1, the pad id, every field of the run YAML's model_config with the keys transformers
writes for that architecture (RoPE in both layouts: transformers 5's rope_parameters and 4's rope_theta and
rope_scaling; Llama 3.1's extend_method LLAMA3 as rope_type llama3), and (when the checkpoint has reward
statistics) OpenRLHF's `normalize_reward`, `mean`, `std`. The value head is `score.weight` (transformers' head,
and OpenRLHF's value_head_prefix "score").

transformers reads the reward at the last token that is not pad_token_id. Our rows carry no EOS and never the
pad id (2, also Llama 2's EOS) inside the text, so that is the same last real token we read.
"""
import json
import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np

from mindrlhf import __version__
from mindrlhf.checkpoints.adapters import base_digest, check_adapter_fits, check_lora_tensors, check_run_lora, \
    read_adapter
from mindrlhf.checkpoints.names import VALUE_HEAD_WEIGHT, is_lora
from mindrlhf.checkpoints.reader import to_numpy
from mindrlhf.checkpoints.slices import load_whole
from mindrlhf.config_access import config_getter
from mindrlhf.errors import ConfigError, OutputExistsError
from mindrlhf.interop.hf_import import HF_TO_MS, LLAMA3_SCALING, expected_shapes, ffn_hidden_size
from mindrlhf.model.lora import lora_settings

# the dtypes an export writes: name -> (numpy type of the stored words, safetensors dtype); shared with peft.py
DTYPES = {"float32": (np.float32, "F32"), "float16": (np.float16, "F16"), "bfloat16": (np.uint16, "BF16")}


def _ms_to_hf_rules() -> List[Tuple[re.Pattern, str]]:
    """hf_import.HF_TO_MS turned around: MindSpore-name regex -> Hugging Face name template."""
    rules = []
    for hf_pattern, ms_target in HF_TO_MS:
        hf_template = hf_pattern[1:-1].replace(r"(\d+)", r"\1").replace("\\.", ".")
        ms_regex = "^" + re.escape(ms_target.replace(r"\1", "\0")).replace("\0", r"(\d+)") + "$"
        rules.append((re.compile(ms_regex), hf_template))
    return rules


_RULES = _ms_to_hf_rules()


def ms_to_hf_name(name: str) -> Optional[str]:
    for regex, template in _RULES:
        if regex.match(name):
            return regex.sub(template, name)
    return None


def hf_rope(model_config) -> Tuple[float, Optional[dict]]:
    """(theta, rope_scaling) of the YAML: plain RoPE, or Llama 3.1's scaling (MindFormers' extend_method LLAMA3,
    whose scaling_factor holds Hugging Face's llama3 fields). Other extensions have no exact counterpart here."""
    get = config_getter(model_config)
    theta = float(get("theta", 10000.0) or 10000.0)
    method = str(get("extend_method", "None") or "None")
    if method in ("None", "none"):
        return theta, None
    factors = get("scaling_factor")
    if method == "LLAMA3" and hasattr(factors, "get"):
        missing = [k for k in LLAMA3_SCALING if factors.get(k) is None]
        if missing:
            raise ConfigError(f"model_config.scaling_factor lacks {missing} for extend_method LLAMA3")
        scaling = {"rope_type": "llama3", **{k: float(factors.get(k)) for k in LLAMA3_SCALING[:3]},
                   LLAMA3_SCALING[3]: int(factors.get(LLAMA3_SCALING[3]))}
        return theta, scaling
    raise ConfigError(f"model_config.extend_method {method!r}: only Llama 3.1's RoPE scaling (LLAMA3, with "
                      "scaling_factor holding factor, low_freq_factor, high_freq_factor and "
                      "original_max_position_embeddings) is exported; this one has no exact Hugging Face counterpart "
                      "here")


def hf_config(model_config, dtype: str = "float32", stats: Optional[dict] = None) -> dict:
    """config.json from the YAML's model_config: Qwen2ForSequenceClassification for q/k/v biases (Qwen2/2.5),
    else LlamaForSequenceClassification, with the keys the transformers version writes: RoPE both as transformers 5
    reads it (rope_parameters) and as transformers 4 reads it (rope_theta, rope_scaling), which 5 also accepts;
    the dtype as dtype and torch_dtype likewise."""
    get = config_getter(model_config)
    hidden, heads, layers = int(get("hidden_size")), int(get("num_heads")), int(get("num_layers"))
    theta, scaling = hf_rope(model_config)
    qwen = bool(get("qkv_has_bias"))
    config = {
        "architectures": ["Qwen2ForSequenceClassification" if qwen else "LlamaForSequenceClassification"],
        "model_type": "qwen2" if qwen else "llama",
        "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
        "problem_type": "regression",
        "vocab_size": int(get("vocab_size")), "hidden_size": hidden,
        "intermediate_size": ffn_hidden_size(hidden, int(get("multiple_of", 256) or 256),
                                             get("ffn_dim_multiplier"), get("intermediate_size")),
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": int(get("n_kv_heads") or heads),
        "hidden_act": "silu", "rms_norm_eps": float(get("rms_norm_eps", 1e-5)),
        "rope_parameters": {"rope_type": "default", "rope_theta": theta} if scaling is None
        else dict(scaling, rope_theta=theta),
        "rope_theta": theta, "rope_scaling": scaling,
        "max_position_embeddings": int(get("max_position_embedding") or get("seq_length")),
        "attention_dropout": 0.0, "tie_word_embeddings": bool(get("tie_word_embeddings", False)),
        "use_cache": False, "initializer_range": 0.02,
        "bos_token_id": int(get("bos_token_id", 1)), "eos_token_id": int(get("eos_token_id", 2)),
        "pad_token_id": int(get("pad_token_id")), "dtype": dtype, "torch_dtype": dtype,
    }
    if qwen:  # Qwen2's own keys; its q/k/v always carry biases, o_proj and the MLP none (as ours)
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers,
                      layer_types=["full_attention"] * layers)
    else:
        config.update(head_dim=hidden // heads, attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if stats is not None:  # OpenRLHF's get_llm_for_sequence_regression reads these
        config.update(normalize_reward=True, mean=float(stats["mean"]), std=float(stats["std"]))
    return config


def _float_to_bf16(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (as torch rounds)."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def output_dtype(param, dtype: Optional[str]) -> str:
    """The output dtype of one tensor: the one asked for, else as stored (bfloat16, float16, else float32)."""
    import mindspore as ms

    if dtype:
        return dtype
    if isinstance(param, np.ndarray):
        return "float16" if param.dtype == np.float16 else "float32"
    return {ms.bfloat16: "bfloat16", ms.float16: "float16"}.get(param.dtype, "float32")


def output_array(param, dtype: str) -> np.ndarray:
    """One tensor as written in `dtype` (output_dtype): bfloat16 as its 16-bit words."""
    array = to_numpy(param)
    if dtype == "bfloat16":
        return _float_to_bf16(array)
    return np.ascontiguousarray(array, DTYPES[dtype][0])


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


EXPORT_MARKER = "mindrlhf_export.json"


def _stamp(path: str) -> dict:
    """What tells a file the export wrote from one rewritten since: size and modification time (cheap at 7B)."""
    info = os.stat(path)
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def check_output_dir(output_dir: str, overwrite: bool):
    """An export goes to a new or empty folder, or (with overwrite) replaces an earlier export: a folder holding
    our EXPORT_MARKER and only the files it lists, each with the size and modification time it had when written
    (a file the user rewrote since, e.g. save_pretrained of a model fine-tuned from the export, is theirs now).
    Anything else is refused, touching nothing: --overwrite never deletes what the export did not write."""
    if not os.path.lexists(output_dir):
        return
    if os.path.islink(output_dir) or not os.path.isdir(output_dir):
        raise OutputExistsError(f"{output_dir} exists and is not a folder an export wrote; choose another "
                                "--output_dir (--overwrite replaces only an earlier export)")
    entries = sorted(os.listdir(output_dir))
    if not entries:
        return
    marker = os.path.join(output_dir, EXPORT_MARKER)
    try:
        with open(marker, encoding="utf-8") as fh:
            record = json.load(fh)
        ours = record.get("written_by") == "mindrlhf" and isinstance(record.get("files"), dict)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise OutputExistsError(f"{output_dir} has no {EXPORT_MARKER} of an earlier mindrlhf export: refusing to "
                                "delete it even with --overwrite; choose another --output_dir (or empty it yourself)")
    foreign = [e for e in entries if e != EXPORT_MARKER and e not in record["files"]]
    changed = [e for e in entries if e in record["files"] and _stamp(os.path.join(output_dir, e)) != record["files"][e]]
    if changed:
        raise OutputExistsError(f"{output_dir}: {changed[:5]} changed since the earlier export wrote them ({marker}): "
                                "refusing to delete them even with --overwrite; move them away or choose another "
                                "--output_dir")
    if foreign:
        raise OutputExistsError(f"{output_dir} holds {foreign[:5]}, which the earlier export ({marker}) did not "
                                "write: refusing to delete them even with --overwrite; move them away or choose "
                                "another --output_dir")
    if not overwrite:
        raise OutputExistsError(f"{output_dir} already holds an export (of {record.get('checkpoint')}); pass "
                                "--overwrite to replace it or choose another path")


def reward_params(checkpoint: str, model_config, src_strategy: Optional[str] = None, adapter: Optional[str] = None,
                  log=print) -> Tuple[dict, Dict[str, Tuple[int, ...]], Optional[dict]]:
    """(tensors {name: Parameter or numpy}, {name: shape} of the reward model, LoRA settings or None) of one
    checkpoint, or of base weights plus a mindrlhf LoRA adapter (`adapter`: its base digest must be the weights'
    own). LoRA tensors never pass unnoticed: present, they come with the settings that merge them (the YAML's
    pet_config, or the adapter's), and a checkpoint holding some without a pet_config to give lora_alpha is refused
    (exporting its frozen base alone would silently drop what training learnt)."""
    shapes = dict(expected_shapes(model_config))
    shapes[VALUE_HEAD_WEIGHT] = (1, int(config_getter(model_config)("hidden_size")))
    if adapter:
        backbone = {n: s for n, s in shapes.items() if n != VALUE_HEAD_WEIGHT}
        params = load_whole(checkpoint, backbone, src_strategy, log=log)
        if any(is_lora(n) for n in params):
            raise ConfigError(f"{checkpoint}: holds LoRA tensors itself; --adapter goes with the base weights the "
                              "adapter was trained on (a LoRA run's own checkpoint needs no --adapter)")
        tensors, meta = read_adapter(adapter)
        check_adapter_fits(adapter, meta, base_digest(params.items()), lora_settings(model_config))
        settings = meta["lora"]
        params = {n: v for n, v in params.items() if n != VALUE_HEAD_WEIGHT}
        params.update(tensors)  # the LoRA tensors and the value head trained with them
        source, where = f"{checkpoint} + {adapter}", "the adapter's metadata"
    else:
        params = load_whole(checkpoint, shapes, src_strategy, log=log)
        settings, source, where = None, checkpoint, "the YAML's model_config"
        found = sorted(n for n in params if is_lora(n))
        if found:
            settings = lora_settings(model_config)
            if settings is None:
                raise ConfigError(f"{checkpoint}: holds {len(found)} LoRA tensors ({found[0]}, ...) but the YAML's "
                                  "model_config has no pet_config to give their lora_alpha; pass the LoRA run's own "
                                  "YAML (exporting without them would drop what training learnt)")
            check_run_lora(checkpoint, settings, "the YAML's pet_config")
    missing = [n for n in shapes if n not in params]
    if missing:
        raise ConfigError(f"{source}: lacks {len(missing)} tensor(s) of the reward model, e.g. {missing[:3]}; "
                          "is it a reward-model checkpoint of this config?")
    wrong = [(n, tuple(params[n].shape), s) for n, s in shapes.items() if tuple(params[n].shape) != tuple(s)]
    if wrong:
        raise ConfigError(f"{source}: tensor {wrong[0][0]} has shape {wrong[0][1]}, the config expects "
                          f"{wrong[0][2]}")
    if settings:
        check_lora_tensors(source, {n: tuple(v.shape) for n, v in params.items() if is_lora(n)}, settings,
                                where, shapes)
    return params, shapes, settings


def write_tokenizer(folder: str, tokenizer: str, model_config) -> List[str]:
    """The tokenizer files (tokenizer_files) written into folder; returns their names."""
    get = config_getter(model_config)
    copied = []
    for file_name, source in tokenizer_files(tokenizer, int(get("seq_length")), int(get("pad_token_id"))).items():
        target = os.path.join(folder, file_name)
        if isinstance(source, dict):
            with open(target, "w", encoding="utf-8") as fh:
                json.dump(source, fh, indent=2, ensure_ascii=False)
        else:
            shutil.copyfile(source, target)
        copied.append(file_name)
    return copied


def finish_export(tmp: str, output_dir: str, overwrite: bool, source: dict,
                  extra_files: Optional[Dict[str, str]] = None):
    """Inside replaced_folder(output_dir, replace=overwrite): copy extra_files, write EXPORT_MARKER (mindrlhf, its
    version, `source` and every file written) and check output_dir again (it may have changed while we wrote):
    replaced_folder then swaps an earlier export for the new one, deleting it only once the new one is in place."""
    for file_name, src in (extra_files or {}).items():
        shutil.copyfile(src, os.path.join(tmp, file_name))
    written = {name: _stamp(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, EXPORT_MARKER), "w", encoding="utf-8") as fh:
        json.dump({"written_by": "mindrlhf", "mindrlhf_version": __version__, **source, "files": written}, fh,
                  indent=2)
    check_output_dir(output_dir, overwrite)
