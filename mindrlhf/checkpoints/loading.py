"""Reading MindSpore checkpoints: one reader for every caller, the optimizer step a checkpoint was saved at, and
a backbone checkpoint loaded into a reward model.

Loading takes the backbone (`model.*`), drops the language-model head, initialises the value head, and says
exactly which parameters came from where; any mismatch is an error naming the tensor.
"""
import os
from typing import Optional

import numpy as np

from mindrlhf.errors import ConfigError
from mindrlhf.model.lora import is_lora


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
            if name.startswith("v_head.") or is_lora(name):
                fresh.append(name)
                continue
            raise ConfigError(f"{path}: has no tensor {name} for the backbone")
        if tuple(params[name].shape) != tuple(param.shape):
            raise ConfigError(f"{path}: tensor {name} has shape {tuple(params[name].shape)}, "
                              f"the model expects {tuple(param.shape)}")
        loaded[name] = params[name]
    unmerged = sorted(n for n in params if is_lora(n) and n not in own)
    if unmerged:
        raise ConfigError(f"{path}: holds LoRA tensors ({unmerged[0]}, ...) that this model has none of: its adapted "
                          "weights are not the whole model; merge them first (scripts/lora_adapter.py --merge) or "
                          "build the model with the run's pet_config")
    ignored = sorted(n for n in params if n not in own and not n.startswith(("adam_", "accu_grads")))
    not_loaded, _ = ms.load_param_into_net(network, loaded, strict_load=False)
    if not_loaded and set(not_loaded) - set(fresh):
        raise ConfigError(f"{path}: could not load {sorted(set(not_loaded) - set(fresh))[:5]}")
    report = {"checkpoint": path, "loaded": sorted(loaded), "newly_initialised": fresh, "ignored": ignored}
    lora_fresh = [n for n in fresh if is_lora(n)]
    shown = [n for n in fresh if not is_lora(n)] + ([f"{len(lora_fresh)} LoRA tensors"] if lora_fresh else [])
    log(f"loaded {len(loaded)} parameters from {path}; newly initialised: {shown or 'none'}; "
        f"ignored from the checkpoint: {ignored or 'none'}")
    return report
