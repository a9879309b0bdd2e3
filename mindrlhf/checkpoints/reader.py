"""Reading MindSpore checkpoints: one reader for every caller. Whole reads (load_checkpoint_dict, a backbone into
a reward model) and cheap ones that seek past tensor bytes: which weights a .ckpt holds, its step, its tensors' dims.

Loading a backbone takes `model.*`, drops the language-model head, initialises the value head, and says exactly
which parameters came from where; any mismatch is an error naming the tensor.

A .ckpt's identity is the optimizer's global_step plus a digest of the value head. Files derived from a checkpoint
(reward_stats.json) record it, so a file name that now holds other weights (rank_N/ deleted and the run trained
again, checkpoints copied in from another run) is caught. A .ckpt is a run of protobuf `Checkpoint` messages, one
per tensor (or per 1 GiB slice of one): each message is skipped by its length and only `global_step` and the
(1, hidden) value head are read, a few seeks even for a 7B file with its Adam moments. Training moves the value
head every step, so the step and the value head name the weights; a copy or a rename keeps both.
"""
import hashlib
import os
from typing import BinaryIO, Optional

import numpy as np

from mindrlhf.checkpoints.names import STEP, VALUE_HEAD, is_lora
from mindrlhf.checkpoints.safetensors_io import read_metadata
from mindrlhf.errors import ConfigError

_CRC_TRAILER = b"crc_num"  # save_checkpoint(crc_check=True) appends it after the last message
_STEP_TYPES = {"Int32": np.int32, "Int64": np.int64, "Float32": np.float32, "Float16": np.float16}


def _varint(fh: BinaryIO, path: str) -> int:
    value, shift = 0, 0
    while True:
        byte = fh.read(1)
        if not byte:
            raise ConfigError(f"{path}: checkpoint is truncated (ends inside a tensor header)")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7


def weights_identity(path: str) -> dict:
    """{"step": global_step or None, "value_head_sha256": hex digest of every v_head.* tensor (name, type, dims,
    bytes)} of a MindSpore .ckpt; a ConfigError for a file that is not one, is truncated or has no value head.

    Under pipeline parallelism the value head sits on the last stage, so rank 0's file has none: then the head
    comes from the file of the same step in a sibling rank_N/ folder that holds it. A LoRA adapter (.safetensors)
    carries the identity of the checkpoint it was extracted from in its metadata, so stats computed with either
    apply to both."""
    if path.endswith(".safetensors"):
        return adapter_identity(path)
    step, heads, digest = _read(path)
    if heads:
        return {"step": step, "value_head_sha256": digest}
    folder = os.path.dirname(os.path.abspath(path))
    root = os.path.dirname(folder)
    if os.path.basename(folder).startswith("rank_") and step is not None:
        for rank in sorted((d for d in os.listdir(root) if d.startswith("rank_") and d != os.path.basename(folder)),
                           key=lambda d: int(d[5:]) if d[5:].isdigit() else 0):
            for name in sorted(os.listdir(os.path.join(root, rank))):
                if name.endswith(".ckpt"):
                    other = os.path.join(root, rank, name)
                    other_step, other_heads, other_digest = _read(other)
                    if other_heads and other_step == step:
                        return {"step": step, "value_head_sha256": other_digest}
    raise ConfigError(f"{path}: has no value head ({VALUE_HEAD}*), nor has any checkpoint of step {step} in the "
                      f"rank_N folders beside it: not a reward-model checkpoint")


def adapter_identity(path: str) -> dict:
    """The identity a LoRA adapter records (step and value-head digest of the checkpoint it came from)."""
    meta = read_metadata(path)
    if not meta.get("value_head_sha256"):
        raise ConfigError(f"{path}: not a LoRA adapter with a recorded identity (no value_head_sha256 in its "
                          "metadata)")
    return {"step": int(meta["step"]) if meta.get("step") else None, "value_head_sha256": meta["value_head_sha256"]}


def tensor_dims(path: str, wanted=lambda name: False) -> dict:
    """{name: dims} of a .ckpt's tensors by seeking past their bytes; dims are read only for names `wanted`
    (None for the others). Slices of one tensor (1 GiB pieces) repeat a name: listed once."""
    from mindspore.train.checkpoint_pb2 import Checkpoint

    found = {}
    with open(path, "rb") as fh:
        for name, start, end in _values(fh, path):
            if name not in found:
                found[name] = None
                if wanted(name):
                    fh.seek(start)
                    found[name] = tuple(Checkpoint.FromString(fh.read(end - start)).value[0].tensor.dims)
    return found


def file_step(path: str) -> Optional[int]:
    """A .ckpt's global_step (None for a weights-only file), read by seeking past every other tensor; a
    ConfigError naming the file if it is not a plain checkpoint or is truncated."""
    return _read(path)[0]


def _read(path: str):
    """(global_step or None, how many v_head.* tensors, their digest) of one .ckpt, by seeking past the rest."""
    from mindspore.train.checkpoint_pb2 import Checkpoint

    digest, step, heads = hashlib.sha256(), None, 0
    with open(path, "rb") as fh:
        for name, start, end in _values(fh, path):
            if name.startswith(VALUE_HEAD) or name == STEP:
                fh.seek(start)
                tensor = Checkpoint.FromString(fh.read(end - start)).value[0].tensor
                if name == STEP:
                    kind = _STEP_TYPES.get(tensor.tensor_type)
                    step = int(np.frombuffer(tensor.tensor_content, kind)[0]) if kind else None
                else:
                    heads += 1
                    digest.update(f"{name}|{tensor.tensor_type}|{list(tensor.dims)}|".encode())
                    digest.update(tensor.tensor_content)
    return step, heads, digest.hexdigest()


def _values(fh: BinaryIO, path: str):
    """(tensor name, start, end) of each protobuf Value message of an open .ckpt, in file order, skipping their
    bytes: the caller may read start..end (the whole message); the walk seeks on from end either way."""
    size = os.path.getsize(path)
    while fh.tell() < size:
        start = fh.tell()
        if fh.read(1) != b"\x0a":  # field 1 (value), length-delimited
            fh.seek(start)
            if fh.read(len(_CRC_TRAILER)) == _CRC_TRAILER:
                return
            raise ConfigError(f"{path}: not a plain MindSpore checkpoint at byte {start} (encrypted?)")
        length = _varint(fh, path)
        body = fh.tell()
        if body + length > size:
            raise ConfigError(f"{path}: checkpoint is truncated")
        name = _tag(fh, length, path)
        yield name, start, body + length
        fh.seek(body + length)


def _tag(fh: BinaryIO, length: int, path: str) -> str:
    """The tensor name at the start of a Value message (protobuf writes field 1, the tag, first)."""
    if length == 0 or fh.read(1) != b"\x0a":
        return ""
    size = _varint(fh, path)
    return fh.read(min(size, length)).decode("utf-8", "replace")


def same_weights(recorded: Optional[dict], actual: dict) -> bool:
    return bool(recorded) and all(recorded.get(k) == actual[k] for k in ("step", "value_head_sha256"))


# ---- whole reads ---------------------------------------------------------------------------------------------

def to_numpy(value) -> np.ndarray:
    """A Parameter/Tensor as numpy in its own type, bfloat16 (which numpy lacks) widened exactly to float32; an
    array as it is."""
    import mindspore as ms

    if isinstance(value, np.ndarray):
        return value
    return (value.astype(ms.float32) if value.dtype == ms.bfloat16 else value).asnumpy()


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
    step = params.get(STEP)
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
            if name.startswith(VALUE_HEAD) or is_lora(name):
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
