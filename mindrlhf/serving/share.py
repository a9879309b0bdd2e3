"""Sharing a trained reward model: the newest checkpoint of a run -> a Hugging Face folder (interop/).

Resolves the checkpoint as reward_infer.py does, reads the run YAML's model_config, and takes the checkpoint's
reward statistics (reward_eval.py --save_stats) into config.json when they are there. The run's template record
is copied as mindrlhf_template.json: whoever scores with the folder must render texts with it.
"""
import os
from typing import Optional

TEMPLATE_COPY = "mindrlhf_template.json"


def export_run(config_path: str, ckpt_path: str, tokenizer: str, output_dir: str, dtype: Optional[str] = None,
               src_strategy: Optional[str] = None, overwrite: bool = False, with_stats: bool = True,
               log=print, adapter: Optional[str] = None, form: str = "merged",
               base_model: Optional[str] = None) -> dict:
    """form "merged": a whole Hugging Face model (LoRA merged in); "peft": a PEFT adapter folder for base_model.
    With adapter (a mindrlhf LoRA adapter file) ckpt_path is the base weights it was trained on, and the reward
    statistics and template record are read beside the adapter, as scoring reads them."""
    from mindrlhf.data.templates import run_template_path
    from mindrlhf.errors import ConfigError
    from mindrlhf.evaluation.normalize import load_stats, stats_path
    from mindrlhf.checkpoints.slices import checkpoint_root
    from mindrlhf.evaluation.scorer import list_checkpoints
    from mindrlhf.interop.hf_export import export_checkpoint
    from mindrlhf.interop.peft import export_peft
    from mindrlhf.training.config import load_config

    if form not in ("merged", "peft"):
        raise ConfigError(f"--format {form}: choose merged or peft")
    if base_model and form != "peft":
        raise ConfigError("--base_model names the base of a PEFT adapter: pass --format peft (or --peft) with it")
    config = load_config(config_path)
    checkpoint = list_checkpoints(ckpt_path)[-1]
    weights = adapter or checkpoint  # what the statistics and the template belong to
    root = checkpoint_root(weights)
    stats = None
    if with_stats and form == "merged" and os.path.isfile(stats_path(root)):
        stats = load_stats(root, weights)
    template = run_template_path(root)
    extra = {TEMPLATE_COPY: template} if os.path.isfile(template) else {}
    if form == "peft":
        result = export_peft(checkpoint, config.model.model_config, output_dir, base_model, tokenizer, dtype,
                             src_strategy, overwrite, adapter, log, extra_files=extra)
    else:
        result = export_checkpoint(checkpoint, config.model.model_config, output_dir, tokenizer, stats, dtype,
                                   src_strategy, overwrite, log, extra_files=extra, adapter=adapter)
    if extra:
        result["template_record"] = TEMPLATE_COPY
    return result
