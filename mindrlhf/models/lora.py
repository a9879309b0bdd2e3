"""LoRA reward models: low-rank deltas on the backbone's projections, a value head that always trains, and
adapters that name the base weights they belong to.

A YAML turns it on with MindFormers' own section, `model.model_config.pet_config` (pet_type lora, lora_rank,
lora_alpha, lora_dropout, target_modules: a pattern over wq/wk/wv/wo/w1/w2/w3). The layers are replaced by
MindFormers' own code (`recursive_replace_dense_cell`: mindpet's LoRADense, carrying the Linear's weight, bias,
activation and, under semi-auto parallel, its sharding), but applied here rather than by the Trainer, because
MindFormers' PetModel would freeze the value head, rename every parameter and write a non-PEFT
adapter_config.json into the output root. What MindFormers leaves silent is an error here: a pattern that
matches no projection, a fused qkv/ffn projection it cannot reach, a container whose name the pattern matches
(MindFormers then skips everything inside it).

Adapters: the LoRA tensors and the value head in a safetensors file whose metadata names the base weights by a
digest of every frozen tensor; loading one onto other weights is an error. Merging is W + B.A.alpha/r.
"""
import hashlib
import json
import re
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from mindrlhf.config_access import config_getter
from mindrlhf.errors import ConfigError

LORA_A = "mindpet_delta_lora_a"
LORA_B = "mindpet_delta_lora_b"
VALUE_HEAD = "v_head."
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
LORA_DTYPES = ("float32", "float16", "bfloat16")
ADAPTER_FORMAT = "mindrlhf-lora-adapter/1"
_KEYS = {"pet_type", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "param_init_type",
         "compute_dtype", "exclude_layers", "freeze_include", "freeze_exclude", "lora_a_init", "lora_b_init"}


def is_lora(name: str) -> bool:
    """A LoRA matrix of the model (not its optimizer moments, adam_m.<name>)."""
    return name.startswith("model.") and name.endswith((LORA_A, LORA_B))


def trains(name: str) -> bool:
    """What a LoRA reward model trains: the LoRA matrices and the value head; everything else stays frozen."""
    return is_lora(name) or name.startswith(VALUE_HEAD)


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


def scale(settings: dict) -> float:
    return float(settings["alpha"]) / float(settings["rank"])


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


# ---- the base weights' digest -------------------------------------------------------------------------------

def to_numpy(value) -> np.ndarray:
    """A Parameter/Tensor as numpy in its own type, bfloat16 (which numpy lacks) widened exactly to float32; an
    array as it is."""
    import mindspore as ms

    if isinstance(value, np.ndarray):
        return value
    return (value.astype(ms.float32) if value.dtype == ms.bfloat16 else value).asnumpy()


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
        if not name.startswith("model.") or is_lora(name):
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
    from mindrlhf.models.safetensors_io import iter_safetensors, read_metadata

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
    never changes those tensors). `identity` is identity.weights_identity of the checkpoint."""
    lora = sorted(n for n in params if is_lora(n))
    if not lora:
        raise ConfigError("the checkpoint holds no LoRA tensors: it is not from a LoRA run (pet_config)")
    tensors = {n: to_numpy(params[n]) for n in params if trains(n)}
    meta = adapter_metadata(settings, base_digest((n, v) for n, v in params.items()), identity["step"],
                            identity["value_head_sha256"], base_path)
    return tensors, meta


def write_adapter(path: str, tensors: dict, meta: dict):
    from mindrlhf.io import replaced_whole
    from mindrlhf.models.safetensors_io import write_arrays

    with replaced_whole(path, suffix=".safetensors") as tmp:
        write_arrays(tmp, tensors, meta)


def merged_params(params: dict, settings: dict) -> dict:
    """A LoRA checkpoint's parameters ({name: Parameter}) -> a whole model without LoRA ({name: numpy}), the
    optimizer state dropped, global_step kept (so the merged file names the same step as its checkpoint)."""
    arrays = {n: to_numpy(v) for n, v in params.items() if n.startswith(("model.", VALUE_HEAD)) or n == "global_step"}
    return merge_arrays(arrays, settings)


def write_merged(path: str, arrays: dict, like: Optional[dict] = None):
    """A MindSpore .ckpt of merged weights, written whole or not at all; each tensor in the type it has in `like`
    (the checkpoint's parameters): a bfloat16 value head stays bfloat16, so its digest, the weights' identity
    that reward statistics are tied to, is the checkpoint's."""
    import mindspore as ms

    from mindrlhf.io import replaced_whole

    def tensor(name):
        data = ms.Tensor(arrays[name])
        kind = getattr((like or {}).get(name), "dtype", None)
        return data.astype(kind) if kind is not None and kind != data.dtype else data

    with replaced_whole(path, suffix=".ckpt") as tmp:
        ms.save_checkpoint([{"name": n, "data": tensor(n)} for n in sorted(arrays)], tmp)
