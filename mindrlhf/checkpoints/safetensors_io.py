"""The safetensors format, read and written with numpy alone (no PyTorch): one 8-byte header length, a JSON
header of {name: dtype, shape, offsets} (plus an optional string-to-string `__metadata__`), then the bytes.

Used by the Hugging Face import and export and by LoRA adapters, which keep what they belong to in the metadata.
"""
import json
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from mindrlhf.errors import ConfigError

# safetensors dtype -> (numpy type of the stored words, MindSpore type name); bf16 stays as raw 16-bit words
ST_DTYPES = {"F16": (np.float16, "Float16"), "F32": (np.float32, "Float32"), "BF16": (np.uint16, "BFloat16"),
             "F64": (np.float64, "Float64"), "I64": (np.int64, "Int64"), "I32": (np.int32, "Int32")}


def bf16_to_f32(words: np.ndarray) -> np.ndarray:
    """bfloat16 stored as raw 16-bit words (as iter_safetensors yields them) -> float32, exactly."""
    return (np.asarray(words).astype(np.uint32) << 16).view(np.float32)


def read_header(path: str) -> Tuple[dict, int]:
    """(header dict, offset of the first tensor byte); a ConfigError naming the file if it is not safetensors."""
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, 8 + header_len


def read_metadata(path: str) -> Dict[str, str]:
    return dict(read_header(path)[0].get("__metadata__") or {})


def iter_safetensors(path: str) -> Iterator[Tuple[str, np.ndarray, str]]:
    """(name, memory-mapped array, MindSpore type name) per tensor; bf16 stays as raw 16-bit words."""
    header, base = read_header(path)
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in ST_DTYPES:
            raise ConfigError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        np_type, ms_type = ST_DTYPES[meta["dtype"]]
        start, end = meta["data_offsets"]
        count = int(np.prod(meta["shape"])) if meta["shape"] else 1
        if (end - start) != count * np.dtype(np_type).itemsize:
            raise ConfigError(f"{path}: tensor {name} is truncated")
        array = np.memmap(path, dtype=np_type, mode="r", offset=base + start, shape=(count,))
        yield name, array.reshape(meta["shape"]), ms_type


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


def write_arrays(path: str, arrays: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None):
    """A safetensors file of float32/float16 numpy arrays (in name order)."""
    kinds = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    names = sorted(arrays)
    entries = []
    for name in names:
        kind = kinds.get(arrays[name].dtype)
        if kind is None:
            raise ConfigError(f"{name}: cannot write dtype {arrays[name].dtype} to safetensors here")
        entries.append((name, tuple(arrays[name].shape), kind, arrays[name].nbytes))
    write_safetensors(path, entries, (np.ascontiguousarray(arrays[n]) for n in names), metadata)
