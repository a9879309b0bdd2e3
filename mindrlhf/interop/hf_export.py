"""A reward checkpoint -> a Hugging Face folder that transformers loads as LlamaForSequenceClassification (Llama
2/3/3.1) or Qwen2ForSequenceClassification (q/k/v biases: Qwen2/2.5).

`model.safetensors` is written tensor by tensor (header first, then each tensor's bytes; no second copy of the
model); the folder's other parts are hf_folder.py's. LoRA reward models export merged here (W + B.A.alpha/r: LoRA
tensors are never dropped) or as a PEFT adapter folder (peft.py), under the same marker rules.
tests/test_hf_interop.py checks both directions against folders and scores written by transformers itself.
"""
import json
import os
from typing import Dict, Optional

import numpy as np

from mindrlhf.checkpoints.adapters import merged_params
from mindrlhf.checkpoints.safetensors_io import write_safetensors
from mindrlhf.errors import ConfigError
from mindrlhf.interop.hf_folder import (DTYPES, check_output_dir, finish_export, hf_config, ms_to_hf_name,
                                        output_array, output_dtype, reward_params, write_tokenizer)
from mindrlhf.io import replaced_folder


def export_checkpoint(checkpoint: str, model_config, output_dir: str, tokenizer: str,
                      stats: Optional[dict] = None, dtype: Optional[str] = None, src_strategy: Optional[str] = None,
                      overwrite: bool = False, log=print, extra_files: Optional[Dict[str, str]] = None,
                      adapter: Optional[str] = None) -> dict:
    """One reward checkpoint (whole, or model-parallel slices merged with the run's strategy) -> output_dir.
    A LoRA model (a LoRA run's checkpoint with its YAML, or base weights + `adapter`) is written merged:
    W + B.A.alpha/r, computed in float64, each weight in its stored type, the value head the LoRA run's.

    Written into a temporary folder beside output_dir and renamed when complete; extra_files ({name: source})
    are copied in too. EXPORT_MARKER names mindrlhf, its version, the checkpoint and every file written, so that
    --overwrite can tell an earlier export from a folder of the user's (check_output_dir)."""
    check_output_dir(output_dir, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {sorted(DTYPES)}")
    config = hf_config(model_config, dtype or "float32", stats)
    params, shapes, settings = reward_params(checkpoint, model_config, src_strategy, adapter, log)
    names = sorted(shapes, key=lambda n: ms_to_hf_name(n))
    types = {name: output_dtype(params[name], dtype) for name in names}
    if settings:
        params = merged_params(params, settings)
    entries = [(ms_to_hf_name(n), tuple(shapes[n]), DTYPES[types[n]][1],
                int(np.prod(shapes[n])) * np.dtype(DTYPES[types[n]][0]).itemsize) for n in names]
    config["torch_dtype"] = config["dtype"] = types[names[0]]

    with replaced_folder(output_dir, replace=overwrite) as tmp:
        write_safetensors(os.path.join(tmp, "model.safetensors"), entries,
                          (output_array(params[n], types[n]) for n in names), {"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
        copied = write_tokenizer(tmp, tokenizer, model_config)
        source = {"checkpoint": os.path.abspath(checkpoint)}
        if adapter:
            source["adapter"] = os.path.abspath(adapter)
        if settings:
            source["lora_merged"] = {k: settings[k] for k in ("rank", "alpha", "targets")}
        finish_export(tmp, output_dir, overwrite, source, extra_files)
    log(f"exported {len(entries)} tensors of {checkpoint}{' + ' + adapter if adapter else ''} to {output_dir}"
        f"{' (LoRA merged)' if settings else ''}")
    return {"output_dir": output_dir, "checkpoint": checkpoint, "tensors": len(entries),
            "tokenizer_files": copied, "normalize_reward": stats is not None, "dtype": config["torch_dtype"],
            "lora_merged": bool(settings), "format": "merged"}
