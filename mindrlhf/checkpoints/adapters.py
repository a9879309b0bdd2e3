"""LoRA in checkpoint files: a LoRA run's checkpoint -> its adapter and/or the merged whole model, adapters read
and loaded onto base weights, and the checks that keep a LoRA checkpoint from being read with other LoRA settings
(or none: its deltas would be dropped without a word).

An adapter is the LoRA tensors and the value head in a safetensors file whose metadata names the base weights by a
digest of every frozen tensor; loading one onto other weights is an error. Merging is W + B.A.alpha/r.
scripts/lora_adapter.py and the end of a LoRA training run call extract(); the scorer and extract() check a
checkpoint with check_checkpoint_lora (its tensors, then its run's lora.json).
"""
import hashlib
import json
import os
import re
import shutil
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np

from mindrlhf.checkpoints.names import BACKBONE, LORA_A, LORA_B, STEP, VALUE_HEAD, is_lora, trains
from mindrlhf.checkpoints.reader import load_checkpoint_dict, tensor_dims, to_numpy, weights_identity
from mindrlhf.checkpoints.safetensors_io import iter_safetensors, read_metadata, write_arrays
from mindrlhf.checkpoints.slices import checkpoint_root, load_whole
from mindrlhf.data.templates import run_template_path
from mindrlhf.errors import ConfigError
from mindrlhf.io import check_new_output, replaced_whole

ADAPTER_FORMAT = "mindrlhf-lora-adapter/1"
RUN_LORA_FILE = "lora.json"  # a LoRA run's settings, beside template.json


def lora_dims(path: str) -> Dict[str, Tuple[int, ...]]:
    """{name: dims} of the LoRA tensors a .ckpt holds, read without loading it (empty for a plain model)."""
    return {n: d for n, d in tensor_dims(path, is_lora).items() if is_lora(n)}


def check_checkpoint_lora(path: str, dims: Dict[str, Tuple[int, ...]], settings: Optional[dict], where: str):
    """A checkpoint's LoRA tensors ({name: dims}) against the settings it is read with (check_lora_tensors),
    then, when it holds some, against its run's recorded settings (check_run_lora: alpha is in no tensor)."""
    check_lora_tensors(path, dims, settings, where)
    if dims:
        check_run_lora(path, settings, where)


def write_run_lora(root: str, settings: dict, resumed_from: Optional[str] = None, base_path: str = "") -> str:
    """The run's LoRA settings and base weights beside its checkpoints (RUN_LORA_FILE): the checkpoints hold rank
    and targets in their shapes but not alpha (a YAML with another alpha would score and merge them wrongly), nor
    the file their frozen weights came from (a resumed run is given no base file to name in its adapter). Resuming
    a run trained with other settings is an error. Returns the base path recorded: base_path, else the resumed
    run's (resumed_base_path)."""
    if resumed_from:
        earlier = _read_run_lora(resumed_from)
        if earlier is not None and not same_settings(earlier, settings):
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
        if meta.get("format") == ADAPTER_FORMAT and meta.get("base_path"):
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
    root = checkpoint_root(checkpoint)
    recorded = _read_run_lora(root)
    if recorded is not None and not same_settings(recorded, settings):
        raise ConfigError(f"{checkpoint}: its run trained LoRA {_describe(recorded)} "
                          f"({os.path.join(root, RUN_LORA_FILE)}), {where} has {_describe(settings)}: "
                          "its rewards and merge would be wrong; pass the run's own YAML")


def _copy_template(checkpoint: str, out_dir: str, log: Callable, overwrite: bool = False):
    """The run's template.json beside the outputs (scoring reads it beside the weights). Another template already
    there (another run's) is an error unless overwrite: scoring would render with it."""
    src, dst = run_template_path(checkpoint_root(checkpoint)), run_template_path(out_dir)
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
    check_lora_tensors(checkpoint, {n: tuple(v.shape) for n, v in params.items() if is_lora(n)}, settings,
                            where)
    identity = weights_identity(checkpoint)
    counts = {"lora": 0, "value_head": 0, "frozen": 0}
    for name, value in params.items():
        kind = ("lora" if is_lora(name) else "value_head" if name.startswith(VALUE_HEAD)
                else "frozen" if name.startswith(BACKBONE) else None)
        if kind:
            counts[kind] += int(np.prod(value.shape))
    result = {"checkpoint": checkpoint, "step": identity["step"], "lora": settings, "counts": counts}
    if adapter:
        tensors, meta = adapter_arrays(params, settings, identity, base_path)
        if base_path and os.path.isfile(base_path):
            actual = base_digest(load_checkpoint_dict(base_path).items())
            if actual != meta["base_sha256"]:
                raise ConfigError(f"--base_path {base_path}: not the base {checkpoint} was trained on (base sha256 "
                                  f"{actual[:16]}…, the checkpoint's frozen weights {meta['base_sha256'][:16]}…)")
        write_adapter(adapter, tensors, meta)
        _copy_template(checkpoint, os.path.dirname(os.path.abspath(adapter)), log, overwrite)
        result.update(adapter=adapter, base_sha256=meta["base_sha256"], tensors=len(tensors))
        log(f"adapter of {checkpoint} (step {identity['step']}): {adapter} ({len(tensors)} tensors, base "
            f"{meta['base_sha256'][:16]}…)")
    if merged:
        write_merged(merged, merged_params(params, settings), like=params)
        _copy_template(checkpoint, os.path.dirname(os.path.abspath(merged)), log, overwrite)
        result["merged"] = merged
        log(f"merged model of {checkpoint} (W + B.A x {scale(settings):g}): {merged}")
    return result


def scale(settings: dict) -> float:
    return float(settings["alpha"]) / float(settings["rank"])


# ---- the base weights' digest -------------------------------------------------------------------------------

def _canonical(value) -> np.ndarray:
    """A Parameter/Tensor/array as hashed: every float widened to float32 (exact from float16 and bfloat16), so a
    float16 or bfloat16 base file and the float32 network it loads into (param_init_type) hash alike."""
    value = to_numpy(value)
    if np.issubdtype(value.dtype, np.floating):
        value = value.astype(np.float32)
    return np.ascontiguousarray(value)


def base_digest(tensors: Iterable[Tuple[str, object]]) -> str:
    """sha256 over every backbone tensor that LoRA training leaves frozen (model.*, not LoRA, not the value
    head), by name, shape and values (floats as float32): the same for a base file as stored, for the network it
    loads into, and for the frozen tensors of a LoRA checkpoint."""
    digest = hashlib.sha256()
    count = 0
    for name, value in sorted(tensors, key=lambda item: item[0]):
        if not name.startswith(BACKBONE) or is_lora(name):
            continue
        array = _canonical(value)
        kind = "float" if array.dtype == np.float32 else str(array.dtype)
        digest.update(f"{name}|{kind}|{list(array.shape)}|".encode())
        digest.update(array.tobytes())
        count += 1
    if not count:
        raise ConfigError("no backbone tensors (model.*) to identify the base weights by")
    return digest.hexdigest()


def network_base_digest(network) -> str:
    return base_digest((p.name, p) for p in network.get_parameters())


# ---- merging ------------------------------------------------------------------------------------------------

def lora_pairs(names: Iterable[str]) -> Dict[str, Tuple[str, str]]:
    """{weight name: (A name, B name)} for every projection with LoRA tensors among `names`."""
    names = set(names)
    pairs = {}
    for name in sorted(names):
        if name.endswith(LORA_A):
            stem = name[:-len(LORA_A)]
            if stem + LORA_B not in names:
                raise ConfigError(f"{name} has no {LORA_B} beside it")
            pairs[stem + "weight"] = (name, stem + LORA_B)
    return pairs


# ---- checking a checkpoint's LoRA tensors ------------------------------------------------------------------

def target_of(name: str) -> str:
    """The projection (wq, ..., w3) a LoRA tensor's name adapts; the name itself for anything else."""
    match = re.search(r"\.(\w+)\.(?:%s|%s)$" % (LORA_A, LORA_B), name)
    return match.group(1) if match else name


def check_lora_tensors(path: str, dims: Dict[str, Tuple[int, ...]], settings: Optional[dict], where: str,
                       shapes: Optional[Dict[str, Tuple[int, ...]]] = None):
    """A checkpoint's LoRA tensors ({name: dims}) against the settings they are read with (None: `where` has no
    pet_config) and, given the model's {name: shape}, the weights they adapt; a ConfigError names the file and the
    tensor. The one check for scoring, adapters and export: other settings would apply the wrong alpha/r, none
    would drop the tensors."""
    if not dims:
        return
    if settings is None:
        raise ConfigError(f"{path}: holds {len(dims)} LoRA tensors ({sorted(dims)[0]}, ...) but {where} has no "
                          "model.model_config.pet_config: without them the model would score as the base model "
                          "with the trained value head (wrong rewards). Pass the LoRA run's YAML, or merge the "
                          "checkpoint first (scripts/lora_adapter.py --merge)")
    targets = sorted({target_of(n) for n in dims})
    if targets != sorted(settings["targets"]):
        raise ConfigError(f"{path}: has LoRA on {targets}, {where} pet_config.target_modules "
                          f"'{settings['target_modules']}' names {sorted(settings['targets'])}")
    try:
        pairs = lora_pairs(dims)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    unpaired = sorted(set(dims) - {n for pair in pairs.values() for n in pair})
    if unpaired:
        raise ConfigError(f"{path}: {unpaired[0]} has no {LORA_A} beside it")
    if shapes is not None:
        wanted = {n for n in shapes if n.endswith(".weight") and n.split(".")[-2] in settings["targets"]}
        if set(pairs) != wanted:
            odd = sorted(set(pairs) ^ wanted)
            raise ConfigError(f"{path}: LoRA tensors on {len(pairs)} projections, {where} pet_config's targets "
                              f"{settings['targets']} name {len(wanted)} in the model (e.g. {odd[:2]}); is the YAML "
                              "the LoRA run's own?")
    rank = int(settings["rank"])
    for weight, (a_name, b_name) in pairs.items():
        a_dims, b_dims = tuple(dims[a_name]), tuple(dims[b_name])
        a_rank, b_rank = (a_dims or (None,))[0], (b_dims or (None,))[-1]
        if a_rank != rank or b_rank != rank:
            found = a_rank if a_rank != rank else b_rank
            raise ConfigError(f"{path}: {a_name} {a_dims} and {b_name} {b_dims} have rank {found}, {where} "
                              f"pet_config.lora_rank is {rank}; is the YAML's lora_rank the run's?")
        if shapes is not None:
            out_dim, in_dim = shapes[weight]
            if a_dims != (rank, in_dim) or b_dims != (out_dim, rank):
                raise ConfigError(f"{path}: {a_name} {a_dims} and {b_name} {b_dims} do not fit {weight} "
                                  f"{(out_dim, in_dim)} (LoRA A is (r, in), B (out, r))")


def merged_weight(weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, factor: float) -> np.ndarray:
    """W + B.A.alpha/r for an (out, in) weight, computed in float64 and returned in W's type."""
    delta = (lora_b.astype(np.float64) @ lora_a.astype(np.float64)) * factor
    if delta.shape != weight.shape:
        raise ConfigError(f"LoRA B.A has shape {delta.shape}, the weight {weight.shape}")
    return (weight.astype(np.float64) + delta).astype(weight.dtype)


def merge_arrays(arrays: Dict[str, np.ndarray], settings: dict) -> Dict[str, np.ndarray]:
    """A LoRA model's tensors (numpy) -> the same model without LoRA: each adapted weight merged, LoRA dropped."""
    pairs = lora_pairs(arrays)
    if not pairs:
        raise ConfigError("no LoRA tensors to merge")
    merged = {name: value for name, value in arrays.items() if not is_lora(name)}
    for weight, (a_name, b_name) in pairs.items():
        if weight not in merged:
            raise ConfigError(f"{a_name}: its weight {weight} is missing")
        merged[weight] = merged_weight(merged[weight], arrays[a_name], arrays[b_name], scale(settings))
    return merged


# ---- adapters -----------------------------------------------------------------------------------------------

def adapter_metadata(settings: dict, base_sha256: str, step: Optional[int], value_head_sha256: str,
                     base_path: str = "") -> Dict[str, str]:
    return {"format": ADAPTER_FORMAT, "base_sha256": base_sha256, "base_path": base_path or "",
            "lora": json.dumps({k: settings[k] for k in ("rank", "alpha", "dropout", "target_modules", "targets")}),
            "step": "" if step is None else str(step), "value_head_sha256": value_head_sha256}


def read_adapter(path: str) -> Tuple[Dict[str, np.ndarray], dict]:
    """(tensors, metadata with `lora` decoded) of an adapter file; a ConfigError for anything else."""
    meta = read_metadata(path)
    if meta.get("format") != ADAPTER_FORMAT:
        raise ConfigError(f"{path}: not a mindrlhf LoRA adapter (its metadata has no format '{ADAPTER_FORMAT}')")
    meta = dict(meta, lora=json.loads(meta["lora"]), step=int(meta["step"]) if meta.get("step") else None)
    tensors = {name: np.array(array) for name, array, _ in iter_safetensors(path)}
    return tensors, meta


def same_settings(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("rank", "alpha", "targets"))


def check_adapter_fits(path: str, meta: dict, base_sha256: str, settings: Optional[dict]):
    """An adapter (read_adapter's metadata) against the base weights it is put on (their base_digest) and the
    config's LoRA settings (None: the config has none to compare)."""
    lora = meta["lora"]
    if settings is not None and not same_settings(lora, settings):
        raise ConfigError(f"{path}: adapter of LoRA rank {lora['rank']} alpha {lora['alpha']} on {lora['targets']}, "
                          f"the config has rank {settings['rank']} alpha {settings['alpha']} on {settings['targets']}")
    if base_sha256 != meta["base_sha256"]:
        raise ConfigError(f"{path}: this adapter belongs to other base weights (base sha256 "
                          f"{meta['base_sha256'][:16]}…{' from ' + meta['base_path'] if meta['base_path'] else ''}), "
                          f"the weights given have {base_sha256[:16]}…; use it with the weights it was trained on")


def load_adapter(network, path: str, settings: dict, log=print) -> dict:
    """Load an adapter onto a network whose base weights are loaded: its base digest must be the network's, its
    LoRA settings the config's, and it must hold every LoRA tensor and the value head, no more."""
    import mindspore as ms

    tensors, meta = read_adapter(path)
    actual = network_base_digest(network)
    check_adapter_fits(path, meta, actual, settings)
    own = {p.name: p for p in network.get_parameters() if trains(p.name)}
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise ConfigError(f"{path}: adapter tensors do not fit the model: missing {missing[:3]}, unexpected "
                          f"{extra[:3]}")
    for name, param in own.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ConfigError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, the model expects "
                              f"{tuple(param.shape)}")
    ms.load_param_into_net(network, {n: ms.Parameter(ms.Tensor(tensors[n]).astype(own[n].dtype), name=n)
                                     for n in own}, strict_load=True)
    log(f"loaded LoRA adapter {path} (step {meta['step']}, {len(own)} tensors) onto base {actual[:16]}…")
    return meta




def adapter_arrays(params: dict, settings: dict, identity: dict, base_path: str = "") -> Tuple[dict, dict]:
    """(tensors, metadata) of the adapter of a LoRA checkpoint's parameters ({name: Parameter or array}): its
    LoRA tensors and value head, and the digest of its frozen backbone (the base it was trained on: training
    never changes those tensors). `identity` is reader.weights_identity of the checkpoint."""
    lora = sorted(n for n in params if is_lora(n))
    if not lora:
        raise ConfigError("the checkpoint holds no LoRA tensors: it is not from a LoRA run (pet_config)")
    tensors = {n: to_numpy(params[n]) for n in params if trains(n)}
    meta = adapter_metadata(settings, base_digest((n, v) for n, v in params.items()), identity["step"],
                            identity["value_head_sha256"], base_path)
    return tensors, meta


def write_adapter(path: str, tensors: dict, meta: dict):
    with replaced_whole(path, suffix=".safetensors") as tmp:
        write_arrays(tmp, tensors, meta)


def merged_params(params: dict, settings: dict) -> dict:
    """A LoRA checkpoint's parameters ({name: Parameter}) -> a whole model without LoRA ({name: numpy}), the
    optimizer state dropped, global_step kept (so the merged file names the same step as its checkpoint)."""
    arrays = {n: to_numpy(v) for n, v in params.items() if n.startswith((BACKBONE, VALUE_HEAD)) or n == STEP}
    return merge_arrays(arrays, settings)


def write_merged(path: str, arrays: dict, like: Optional[dict] = None):
    """A MindSpore .ckpt of merged weights, written whole or not at all; each tensor in the type it has in `like`
    (the checkpoint's parameters): a bfloat16 value head stays bfloat16, so its digest, the weights' identity
    that reward statistics are tied to, is the checkpoint's."""
    import mindspore as ms

    def tensor(name):
        data = ms.Tensor(arrays[name])
        kind = getattr((like or {}).get(name), "dtype", None)
        return data.astype(kind) if kind is not None and kind != data.dtype else data

    with replaced_whole(path, suffix=".ckpt") as tmp:
        ms.save_checkpoint([{"name": n, "data": tensor(n)} for n in sorted(arrays)], tmp)
