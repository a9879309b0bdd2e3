"""PEFT's LoRA adapter folders (adapter_config.json + adapter_model.safetensors), written from a LoRA reward model
and read back as its LoRA tensors and value head; no torch or peft needed.

peft's layout for a LlamaForSequenceClassification / Qwen2ForSequenceClassification base: keys
`base_model.model.<the base's own weight name minus .weight>.lora_A.weight` (r, in) and `...lora_B.weight`
(out, r), the head trained in full (modules_to_save ["score"]) as `base_model.model.score.weight`, scale
lora_alpha / r. The projection names come from hf_import.HF_TO_MS (wq -> q_proj, w1 -> gate_proj,
w2 -> down_proj, w3 -> up_proj); tests/data/hf_models/peft holds adapters peft itself wrote, with its scores.
"""
import json
import os
import re
from typing import Dict, Optional, Tuple

import numpy as np

from mindrlhf.errors import ConfigError
from mindrlhf.io import replaced_folder
from mindrlhf.checkpoints.adapters import lora_pairs
from mindrlhf.checkpoints.names import BACKBONE, LORA_A, LORA_B, VALUE_HEAD_WEIGHT, is_lora, trains
from mindrlhf.model import lora
from mindrlhf.interop.hf_folder import (DTYPES, check_output_dir, finish_export, ms_to_hf_name, output_array,
                                    output_dtype, reward_params, write_tokenizer)
from mindrlhf.interop.hf_import import HF_HEAD, HF_TO_MS, hf_to_ms_name
from mindrlhf.checkpoints.safetensors_io import bf16_to_f32, iter_safetensors, write_safetensors

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^(.+)\.lora_([AB])\.weight$")
# what this module writes and reads: plain LoRA, alpha/r scaling, (out, in) weights, one rank and alpha for all
REFUSED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
           "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None}


def _modules() -> Dict[str, str]:
    """{wq: q_proj, ..., w1: gate_proj, w2: down_proj, w3: up_proj} from HF_TO_MS."""
    modules = {}
    for hf_pattern, ms_target in HF_TO_MS:
        parts = ms_target.split(".")
        if parts[-1] == "weight" and parts[-2] in lora.TARGETS:
            modules[parts[-2]] = hf_pattern.replace("\\", "").split(".")[-2]
    assert sorted(modules) == sorted(lora.TARGETS), modules
    return modules


HF_MODULES = _modules()
MS_MODULES = {hf: ms for ms, hf in HF_MODULES.items()}


def peft_key(name: str) -> str:
    """Our LoRA tensor or value head name -> peft's key."""
    if name == VALUE_HEAD_WEIGHT:
        return f"{PREFIX}{HF_HEAD}.weight"
    for suffix, part in ((LORA_A, "A"), (LORA_B, "B")):
        if name.endswith(suffix):
            hf = ms_to_hf_name(name[:-len(suffix)] + "weight")
            if hf:
                return f"{PREFIX}{hf[:-len('weight')]}lora_{part}.weight"
    raise ConfigError(f"{name}: no PEFT counterpart (only LoRA tensors of the seven projections and the value head)")


def ms_key(key: str) -> Optional[str]:
    """peft's key -> ours, or None for a key of no LoRA reward model."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX):]
    if rest == f"{HF_HEAD}.weight":
        return VALUE_HEAD_WEIGHT
    match = _LORA_KEY.match(rest)
    name = hf_to_ms_name(match.group(1) + ".weight") if match else None
    if not name or name.split(".")[-2] not in lora.TARGETS:
        return None
    return name[:-len("weight")] + (LORA_A if match.group(2) == "A" else LORA_B)


def _alpha(value: float):
    return int(value) if float(value).is_integer() else float(value)


def peft_config(settings: dict, base_model: str) -> dict:
    """adapter_config.json for our LoRA settings: keys peft itself writes, with the values it reads as our model."""
    return {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base_model,
            "r": int(settings["rank"]), "lora_alpha": _alpha(settings["alpha"]),
            "lora_dropout": float(settings["dropout"]),
            "target_modules": [HF_MODULES[t] for t in settings["targets"]], "modules_to_save": [HF_HEAD],
            "inference_mode": True, "init_lora_weights": True, "revision": None, **REFUSED}


def peft_settings(config: dict, where: str) -> dict:
    """adapter_config.json -> our LoRA settings ({rank, alpha, dropout, target_modules, targets}); anything beyond
    plain LoRA on the seven projections with the score head saved whole is refused, naming the field."""
    if config.get("peft_type") != "LORA" or config.get("task_type") != "SEQ_CLS":
        raise ConfigError(f"{where}: peft_type {config.get('peft_type')!r}, task_type {config.get('task_type')!r}: "
                          "a LoRA reward model's adapter is peft_type LORA, task_type SEQ_CLS")
    for key, plain in REFUSED.items():
        if config.get(key) not in (plain, None, {}):
            raise ConfigError(f"{where}: {key} is {config[key]!r}; only plain LoRA ({key}: {plain!r}) is read here")
    modules = config.get("target_modules")
    if not isinstance(modules, list) or not modules:
        raise ConfigError(f"{where}: target_modules {modules!r}: a list of {sorted(MS_MODULES)} is read here")
    unknown = sorted(set(modules) - set(MS_MODULES))
    if unknown:
        raise ConfigError(f"{where}: target_modules {unknown} are not among {sorted(MS_MODULES)}")
    if HF_HEAD not in (config.get("modules_to_save") or []):
        raise ConfigError(f"{where}: modules_to_save {config.get('modules_to_save')} lacks '{HF_HEAD}': the adapter "
                          "holds no reward head")
    targets = [t for t in lora.TARGETS if HF_MODULES[t] in modules]
    return {"rank": int(config["r"]), "alpha": float(config["lora_alpha"]),
            "dropout": float(config.get("lora_dropout") or 0.0),
            "target_modules": "|".join(f".*{t}" for t in targets), "targets": targets}


def read_peft_adapter(folder: str) -> Tuple[Dict[str, np.ndarray], dict, dict]:
    """(our tensors {LoRA names + v_head.weight: float32/float16 numpy}, LoRA settings, adapter_config.json) of a
    PEFT adapter folder; load them onto the base converted by hf_import (convert_weight.py) to score with it."""
    config_path, weights = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{config_path}: not a readable PEFT adapter config ({err})") from None
    settings = peft_settings(config, config_path)
    if not os.path.isfile(weights):
        raise ConfigError(f"{weights}: missing (PEFT's adapter_model.bin is not read: it needs torch)")
    tensors = {}
    for key, array, ms_type in iter_safetensors(weights):
        name = ms_key(key)
        if name is None:
            raise ConfigError(f"{weights}: tensor {key} has no place in a LoRA reward model")
        value = np.asarray(array)
        tensors[name] = bf16_to_f32(value) if ms_type == "BFloat16" else np.array(value)
    if VALUE_HEAD_WEIGHT not in tensors:
        raise ConfigError(f"{weights}: has no {PREFIX}{HF_HEAD}.weight (the reward head)")
    pairs = lora_pairs(n for n in tensors if is_lora(n))
    present = {w.split(".")[-2] for w in pairs}
    if present != set(settings["targets"]):
        raise ConfigError(f"{weights}: LoRA tensors on {sorted(HF_MODULES[t] for t in present)}, {config_path} "
                          f"names {sorted(config['target_modules'])}")
    for weight, (a_name, b_name) in pairs.items():
        rank_a, rank_b = tensors[a_name].shape[0], tensors[b_name].shape[1]
        if rank_a != settings["rank"] or rank_b != settings["rank"] or tensors[b_name].ndim != 2:
            raise ConfigError(f"{weights}: {peft_key(a_name)} {tensors[a_name].shape} and {peft_key(b_name)} "
                              f"{tensors[b_name].shape} are not rank r={settings['rank']} ({config_path})")
    return tensors, settings, config


def peft_onto_base(folder: str, base_checkpoint: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """(a whole LoRA reward model's tensors {name: numpy}, LoRA settings): a PEFT adapter folder read onto a base
    checkpoint (a Hugging Face base converted by convert_weight.py); its score head replaces the base's, as
    modules_to_save does, and every LoRA pair must fit the base weight it adapts. Saved as a .ckpt, it loads into a
    reward model built with the same pet_config (e.g. reward_infer.py with a LoRA YAML)."""
    from mindrlhf.checkpoints.reader import load_checkpoint_dict

    tensors, settings, _ = read_peft_adapter(folder)
    params = {n: p.asnumpy() for n, p in load_checkpoint_dict(base_checkpoint).items()
              if n.startswith(BACKBONE) and not is_lora(n)}
    for weight, (a_name, b_name) in lora_pairs(n for n in tensors if is_lora(n)).items():
        if weight not in params:
            raise ConfigError(f"{folder}: {peft_key(a_name)} adapts a weight {base_checkpoint} does not hold")
        out_dim, in_dim = params[weight].shape
        if tensors[a_name].shape[1] != in_dim or tensors[b_name].shape[0] != out_dim:
            raise ConfigError(f"{folder}: {peft_key(a_name)} {tensors[a_name].shape} and {peft_key(b_name)} "
                              f"{tensors[b_name].shape} do not fit {weight} {params[weight].shape} of "
                              f"{base_checkpoint}: another base model's adapter")
    hidden = params["model.norm_out.weight"].shape[0] if "model.norm_out.weight" in params else None
    if tensors[VALUE_HEAD_WEIGHT].shape != (1, hidden):
        raise ConfigError(f"{folder}: {PREFIX}{HF_HEAD}.weight has shape {tensors[VALUE_HEAD_WEIGHT].shape}, a reward "
                          f"head on {base_checkpoint} is (1, {hidden})")
    params.update(tensors)
    return params, settings


def export_peft(checkpoint: str, model_config, output_dir: str, base_model: str, tokenizer: Optional[str] = None,
                dtype: Optional[str] = None, src_strategy: Optional[str] = None, overwrite: bool = False,
                adapter: Optional[str] = None, log=print, extra_files: Optional[Dict[str, str]] = None) -> dict:
    """A LoRA reward model (a LoRA run's checkpoint with its YAML, or base weights + a mindrlhf adapter) -> a PEFT
    adapter folder for `base_model` (the Hugging Face id or path of the base it goes onto, written as
    base_model_name_or_path), with the tokenizer, the same EXPORT_MARKER and --overwrite rules as the merged
    export."""
    if not base_model:
        raise ConfigError("--base_model is required for a PEFT adapter: the Hugging Face id or path of the base "
                          "model it is loaded onto (written as base_model_name_or_path)")
    check_output_dir(output_dir, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {sorted(DTYPES)}")
    params, _, settings = reward_params(checkpoint, model_config, src_strategy, adapter, log)
    if settings is None:
        raise ConfigError(f"{checkpoint}: holds no LoRA tensors: not a LoRA run's checkpoint (nor given --adapter); "
                          "export it whole, without --peft")
    names = sorted((n for n in params if trains(n)), key=peft_key)
    types = {n: output_dtype(params[n], dtype) for n in names}
    entries = [(peft_key(n), tuple(params[n].shape), DTYPES[types[n]][1],
                int(np.prod(params[n].shape)) * np.dtype(DTYPES[types[n]][0]).itemsize) for n in names]
    with replaced_folder(output_dir, replace=overwrite) as tmp:
        write_safetensors(os.path.join(tmp, WEIGHTS_FILE), entries, (output_array(params[n], types[n]) for n in names),
                          {"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as fh:
            json.dump(peft_config(settings, base_model), fh, indent=2)
        copied = write_tokenizer(tmp, tokenizer, model_config) if tokenizer else []
        source = {"checkpoint": os.path.abspath(checkpoint), "base_model": base_model}
        if adapter:
            source["adapter"] = os.path.abspath(adapter)
        finish_export(tmp, output_dir, overwrite, source, extra_files)
    log(f"exported a PEFT LoRA adapter ({len(entries)} tensors, r {settings['rank']}, alpha {settings['alpha']:g}) "
        f"for {base_model} to {output_dir}")
    return {"output_dir": output_dir, "checkpoint": checkpoint, "tensors": len(entries), "format": "peft",
            "base_model": base_model, "tokenizer_files": copied, "dtype": types[names[0]]}
