"""A LoRA run's checkpoint -> its adapter file and/or the merged whole model, and the checks that keep a LoRA
checkpoint from being read with other LoRA settings (or none: its deltas would be dropped without a word).

scripts/lora_adapter.py and the end of a LoRA training run call extract(); the scorer and extract() check a
checkpoint with check_checkpoint_lora (its tensors, then its run's lora.json).
"""
import json
import os
import shutil
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from mindrlhf.errors import ConfigError
from mindrlhf.io import check_new_output, replaced_whole
from mindrlhf.model import lora
from mindrlhf.checkpoints.reader import tensor_dims, weights_identity
from mindrlhf.checkpoints.safetensors_io import read_metadata

RUN_TEMPLATE_FILE = "template.json"  # mindrlhf.data.templates.RUN_TEMPLATE_FILE (data sits above models)
RUN_LORA_FILE = "lora.json"  # a LoRA run's settings, beside template.json


def lora_dims(path: str) -> Dict[str, Tuple[int, ...]]:
    """{name: dims} of the LoRA tensors a .ckpt holds, read without loading it (empty for a plain model)."""
    return {n: d for n, d in tensor_dims(path, lora.is_lora).items() if lora.is_lora(n)}


def check_checkpoint_lora(path: str, dims: Dict[str, Tuple[int, ...]], settings: Optional[dict], where: str):
    """A checkpoint's LoRA tensors ({name: dims}) against the settings it is read with (lora.check_lora_tensors),
    then, when it holds some, against its run's recorded settings (check_run_lora: alpha is in no tensor)."""
    lora.check_lora_tensors(path, dims, settings, where)
    if dims:
        check_run_lora(path, settings, where)


def _run_root(checkpoint: str) -> str:
    """The folder holding a run's rank_N/ (and its template.json, lora.json) for one of its checkpoint files."""
    from mindrlhf.checkpoints.slices import rank_of_checkpoint

    try:
        return rank_of_checkpoint(checkpoint)[0]
    except ConfigError:
        return os.path.dirname(os.path.abspath(checkpoint))


def write_run_lora(root: str, settings: dict, resumed_from: Optional[str] = None, base_path: str = "") -> str:
    """The run's LoRA settings and base weights beside its checkpoints (RUN_LORA_FILE): the checkpoints hold rank
    and targets in their shapes but not alpha (a YAML with another alpha would score and merge them wrongly), nor
    the file their frozen weights came from (a resumed run is given no base file to name in its adapter). Resuming
    a run trained with other settings is an error. Returns the base path recorded: base_path, else the resumed
    run's (resumed_base_path)."""
    if resumed_from:
        earlier = _read_run_lora(resumed_from)
        if earlier is not None and not lora.same_settings(earlier, settings):
            raise ConfigError(f"{os.path.join(resumed_from, RUN_LORA_FILE)}: the checkpoints there were trained "
                              f"with LoRA {_describe(earlier)}, the YAML has {_describe(settings)}")
        base_path = base_path or resumed_base_path(resumed_from, earlier)
    os.makedirs(root, exist_ok=True)
    record = {k: settings[k] for k in ("rank", "alpha", "dropout", "target_modules", "targets")}
    with replaced_whole(os.path.join(root, RUN_LORA_FILE)) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(dict(record, base_path=base_path or ""), fh, indent=2)
    return base_path or ""


def resumed_base_path(resumed_from: str, recorded: Optional[dict] = None) -> str:
    """The base weights' path of the run whose checkpoint root a run resumes from: its RUN_LORA_FILE's (`recorded`),
    else (a run from before lora.json named it) the newest of its adapters (<output_dir>/adapter) that names one;
    "" when none does (e.g. a run from random weights)."""
    if recorded and recorded.get("base_path"):
        return recorded["base_path"]
    folder = os.path.join(os.path.dirname(os.path.abspath(resumed_from)), "adapter")
    names = [n for n in os.listdir(folder) if n.endswith(".safetensors")] if os.path.isdir(folder) else []
    for name in sorted(names, key=lambda n: os.path.getmtime(os.path.join(folder, n)), reverse=True):
        try:
            meta = read_metadata(os.path.join(folder, name))
        except ConfigError:
            continue
        if meta.get("format") == lora.ADAPTER_FORMAT and meta.get("base_path"):
            return meta["base_path"]
    return ""


def _read_run_lora(root: str) -> Optional[dict]:
    path = os.path.join(root, RUN_LORA_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); it records the run's LoRA settings") from None


def _describe(settings: dict) -> str:
    return f"rank {settings['rank']} alpha {float(settings['alpha']):g} on {','.join(settings['targets'])}"


def check_run_lora(checkpoint: str, settings: dict, where: str):
    """The YAML's LoRA settings against those the run recorded beside its checkpoints (when it did)."""
    recorded = _read_run_lora(_run_root(checkpoint))
    if recorded is not None and not lora.same_settings(recorded, settings):
        raise ConfigError(f"{checkpoint}: its run trained LoRA {_describe(recorded)} "
                          f"({os.path.join(_run_root(checkpoint), RUN_LORA_FILE)}), {where} has {_describe(settings)}: "
                          "its rewards and merge would be wrong; pass the run's own YAML")


def _copy_template(checkpoint: str, out_dir: str, log: Callable, overwrite: bool = False):
    """The run's template.json beside the outputs (scoring reads it beside the weights). Another template already
    there (another run's) is an error unless overwrite: scoring would render with it."""
    src, dst = os.path.join(_run_root(checkpoint), RUN_TEMPLATE_FILE), os.path.join(out_dir, RUN_TEMPLATE_FILE)
    if not os.path.isfile(src) or os.path.abspath(src) == os.path.abspath(dst):
        return
    if os.path.exists(dst) and not overwrite:
        with open(src, "rb") as a, open(dst, "rb") as b:
            if a.read() == b.read():
                return
        raise ConfigError(f"{dst}: another template than the run's ({src}) is there, and scoring the outputs beside "
                          "it would render with it; choose another output folder or pass --overwrite")
    with replaced_whole(dst) as tmp:
        shutil.copyfile(src, tmp)
    log(f"copied the run's template {src} to {dst}")


def extract(checkpoint: str, settings: dict, where: str, adapter: Optional[str] = None,
            merged: Optional[str] = None, base_path: str = "", overwrite: bool = False,
            expected: Optional[dict] = None, src_strategy: Optional[str] = None, log: Callable = print) -> dict:
    """Write the adapter (LoRA tensors + value head, the base's digest) and/or the merged whole model of a LoRA
    checkpoint. expected: the model's {name: shape}, to merge model-parallel slices first (None: read as is).
    base_path, when it exists, must hold the base the checkpoint was trained on."""
    from mindrlhf.checkpoints.loading import load_checkpoint_dict
    from mindrlhf.checkpoints.slices import load_whole

    if not adapter and not merged:
        raise ConfigError("nothing to write: pass --output (the adapter) and/or --merge (the whole model)")
    for path in (adapter, merged):
        check_new_output(path, overwrite)
    if adapter and not adapter.endswith(".safetensors"):
        raise ConfigError(f"--output {adapter}: an adapter is a .safetensors file")
    if merged and not merged.endswith(".ckpt"):
        raise ConfigError(f"--merge {merged}: the merged model is a MindSpore .ckpt file")
    check_checkpoint_lora(checkpoint, lora_dims(checkpoint), settings, where)
    params = (load_whole(checkpoint, expected, src_strategy, log=log) if expected is not None
              else load_checkpoint_dict(checkpoint))
    lora.check_lora_tensors(checkpoint, {n: tuple(v.shape) for n, v in params.items() if lora.is_lora(n)}, settings,
                            where)
    identity = weights_identity(checkpoint)
    counts = {"lora": 0, "value_head": 0, "frozen": 0}
    for name, value in params.items():
        kind = ("lora" if lora.is_lora(name) else "value_head" if name.startswith(lora.VALUE_HEAD)
                else "frozen" if name.startswith("model.") else None)
        if kind:
            counts[kind] += int(np.prod(value.shape))
    result = {"checkpoint": checkpoint, "step": identity["step"], "lora": settings, "counts": counts}
    if adapter:
        tensors, meta = lora.adapter_arrays(params, settings, identity, base_path)
        if base_path and os.path.isfile(base_path):
            actual = lora.base_digest(load_checkpoint_dict(base_path).items())
            if actual != meta["base_sha256"]:
                raise ConfigError(f"--base_path {base_path}: not the base {checkpoint} was trained on (base sha256 "
                                  f"{actual[:16]}…, the checkpoint's frozen weights {meta['base_sha256'][:16]}…)")
        lora.write_adapter(adapter, tensors, meta)
        _copy_template(checkpoint, os.path.dirname(os.path.abspath(adapter)), log, overwrite)
        result.update(adapter=adapter, base_sha256=meta["base_sha256"], tensors=len(tensors))
        log(f"adapter of {checkpoint} (step {identity['step']}): {adapter} ({len(tensors)} tensors, base "
            f"{meta['base_sha256'][:16]}…)")
    if merged:
        lora.write_merged(merged, lora.merged_params(params, settings), like=params)
        _copy_template(checkpoint, os.path.dirname(os.path.abspath(merged)), log, overwrite)
        result["merged"] = merged
        log(f"merged model of {checkpoint} (W + B.A x {lora.scale(settings):g}): {merged}")
    return result


def model_shapes(config) -> dict:
    """{name: shape} of the config's reward model (LoRA included), to merge model-parallel slices against."""
    import mindrlhf._mindformers  # noqa: F401  (quiet import first)
    from mindformers import LlamaConfig

    from mindrlhf.model.llama_reward import LlamaRewardModel

    model_cfg = dict(config.model.model_config)
    model_cfg.pop("type", None)
    model_cfg["checkpoint_name_or_path"] = ""
    network = LlamaRewardModel(LlamaConfig(**model_cfg))
    return {p.name: tuple(p.shape) for p in network.get_parameters()}
