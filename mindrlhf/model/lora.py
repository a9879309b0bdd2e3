"""LoRA layers of a reward model: low-rank deltas on the backbone's projections, a value head that always trains.

A YAML turns it on with MindFormers' own section, `model.model_config.pet_config` (pet_type lora, lora_rank,
lora_alpha, lora_dropout, target_modules: a pattern over wq/wk/wv/wo/w1/w2/w3). The layers are replaced by
MindFormers' own code (`recursive_replace_dense_cell`: mindpet's LoRADense, carrying the Linear's weight, bias,
activation and, under semi-auto parallel, its sharding), but applied here rather than by the Trainer, because
MindFormers' PetModel would freeze the value head, rename every parameter and write a non-PEFT
adapter_config.json into the output root. What MindFormers leaves silent is an error here: a pattern that
matches no projection, a fused qkv/ffn projection it cannot reach, a container whose name the pattern matches
(MindFormers then skips everything inside it).

Their files (adapters, merges, the checks of a checkpoint's LoRA tensors) are mindrlhf.checkpoints.adapters.
"""
import re
from typing import Optional

import numpy as np

from mindrlhf.checkpoints.names import VALUE_HEAD, is_lora, trains
from mindrlhf.config_access import config_getter
from mindrlhf.errors import ConfigError

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
LORA_DTYPES = ("float32", "float16", "bfloat16")
_KEYS = {"pet_type", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "param_init_type",
         "compute_dtype", "exclude_layers", "freeze_include", "freeze_exclude", "lora_a_init", "lora_b_init"}


def lora_settings(model_config, where: str = "model.model_config.pet_config") -> Optional[dict]:
    """The run's LoRA settings checked ({rank, alpha, dropout, target_modules, targets}), or None without LoRA.

    Training moves the YAML's pet_config to `reward_lora` (so that MindFormers' build_network does not wrap the
    model in its PetModel); both spellings are read."""
    get = config_getter(model_config)
    raw = get("reward_lora") or get("pet_config")
    if not raw:
        return None
    raw = dict(raw)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a LoRA reward model takes lora_rank, lora_alpha, "
                          "lora_dropout and target_modules")
    if str(raw.get("pet_type", "lora")).lower() != "lora":
        raise ConfigError(f"{where}.pet_type: '{raw.get('pet_type')}': reward models support 'lora' only")
    for key in ("freeze_include", "freeze_exclude", "exclude_layers"):
        if raw.get(key):
            raise ConfigError(f"{where}.{key}: not supported: a LoRA reward model trains exactly its LoRA matrices "
                              "and its value head")
    try:
        rank = int(raw.get("lora_rank", 8))
        alpha = float(raw.get("lora_alpha", 16))
        dropout = float(raw.get("lora_dropout", 0.0))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: lora_rank, lora_alpha and lora_dropout must be numbers ({err})") from None
    if rank < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{where}: need lora_rank >= 1 (got {rank}), lora_alpha > 0 (got {alpha}) and "
                          f"0 <= lora_dropout < 1 (got {dropout})")
    pattern = raw.get("target_modules")
    if not pattern or not isinstance(pattern, str):
        raise ConfigError(f"{where}.target_modules: a pattern over {', '.join(TARGETS)} is required, e.g. "
                          "'.*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3'")
    try:
        targets = [name for name in TARGETS if re.match(pattern, name)]
    except re.error as err:
        raise ConfigError(f"{where}.target_modules: '{pattern}' is not a regular expression ({err})") from None
    if not targets:
        raise ConfigError(f"{where}.target_modules: '{pattern}' matches none of the projections "
                          f"{', '.join(TARGETS)}; no layer would get LoRA")
    fused = [(flag, names) for flag, names in (("qkv_concat", {"wq", "wk", "wv"}), ("ffn_concat", {"w1", "w3"}))
             if get(flag) and names & set(targets)]
    if fused:
        flag, names = fused[0]
        raise ConfigError(f"{where}.target_modules: '{pattern}' names {sorted(names & set(targets))}, which "
                          f"model_config.{flag}: True fuses into one projection that LoRA cannot reach; set "
                          f"{flag}: False")
    for key in ("lora_a_init", "lora_b_init"):  # MindFormers' recursive_replace_dense_cell never passes them on
        if raw.get(key) is not None:
            raise ConfigError(f"{where}.{key}: {raw[key]!r} would be ignored: MindFormers' LoRA layer replacement "
                              "builds mindpet's LoRADense with its own initialisers (A: HeUniform(sqrt(5)), B: zeros, "
                              "so the model starts as the base model); remove the key")
    dtypes = {}
    for key in ("param_init_type", "compute_dtype"):  # LoRADense's, forwarded through MindFormers' LoraConfig
        value = raw.get(key)
        if value is not None and str(value) not in LORA_DTYPES:
            raise ConfigError(f"{where}.{key}: {value!r}; expected one of {', '.join(LORA_DTYPES)} (or leave it out: "
                              "the adapted projection's own)")
        dtypes[key] = None if value is None else str(value)
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": pattern, "targets": targets, **dtypes}


def apply_lora(network, settings: dict, log=print) -> dict:
    """Replace the target projections of network.model with LoRA layers, freeze everything else but the value
    head, and return {trainable, frozen, lora, layers}. Call before the CPU kernel swaps (they turn w1's own
    SiLU off, which must happen on the layer that runs)."""
    import mindrlhf._mindformers  # noqa: F401  (quiet import first)
    from mindformers.pet.pet_config import LoraConfig
    from mindformers.pet.tuners.lora_adapter import recursive_replace_dense_cell

    exact = "|".join(f"{name}$" for name in settings["targets"])  # short names only: no container matches
    config = LoraConfig(lora_rank=settings["rank"], lora_alpha=settings["alpha"],
                        lora_dropout=settings["dropout"], target_modules=exact,
                        param_init_type=settings.get("param_init_type"), compute_dtype=settings.get("compute_dtype"))
    layers = list(network.model.layers)
    for layer in layers:
        for block in (layer.attention, layer.feed_forward):
            for name in settings["targets"]:
                cell = getattr(block, name, None)
                if cell is not None and not getattr(cell, "transpose_b", True):
                    raise ConfigError(f"{name}: LoRA merging assumes (out, in) weights (transpose_b), this layer "
                                      "stores (in, out)")
            recursive_replace_dense_cell(block, config)
    network.update_parameters_name()
    replaced = sum(1 for layer in layers for block in (layer.attention, layer.feed_forward)
                   for name in settings["targets"] if type(getattr(block, name, None)).__name__ == "LoRADense")
    if replaced != len(layers) * len(settings["targets"]):
        raise ConfigError(f"LoRA reached {replaced} of {len(layers) * len(settings['targets'])} projections "
                          f"({', '.join(settings['targets'])} in {len(layers)} layers): the backbone's layers are "
                          "not the Llama layers this was written for")
    counts = freeze_all_but_lora(network)
    counts["layers"] = replaced
    log(f"LoRA rank {settings['rank']} alpha {settings['alpha']:g} dropout {settings['dropout']:g} on "
        f"{','.join(settings['targets'])} ({replaced} projections): {counts['trainable']:,} parameters train "
        f"({counts['lora']:,} LoRA + {counts['value_head']:,} value head), {counts['frozen']:,} frozen")
    return counts


def freeze_all_but_lora(network) -> dict:
    counts = {"trainable": 0, "frozen": 0, "lora": 0, "value_head": 0}
    for param in network.get_parameters():
        size = int(np.prod(param.shape))
        param.requires_grad = trains(param.name)
        counts["trainable" if param.requires_grad else "frozen"] += size
        if is_lora(param.name):
            counts["lora"] += size
        elif param.name.startswith(VALUE_HEAD):
            counts["value_head"] += size
    return counts
