"""Sharing a trained reward model: the newest checkpoint of a run -> a Hugging Face folder (models/export.py).

Resolves the checkpoint as reward_infer.py does, reads the run YAML's model_config, and takes the checkpoint's
reward statistics (reward_eval.py --save_stats) into config.json when they are there. The run's template record
is copied as mindrlhf_template.json: whoever scores with the folder must render texts with it.
"""
import os
from typing import Optional

TEMPLATE_COPY = "mindrlhf_template.json"


def export_run(config_path: str, ckpt_path: str, tokenizer: str, output_dir: str, dtype: Optional[str] = None,
               src_strategy: Optional[str] = None, overwrite: bool = False, with_stats: bool = True,
               log=print) -> dict:
    from mindrlhf.data.templates import run_template_path
    from mindrlhf.evaluation.normalize import load_stats, stats_path
    from mindrlhf.evaluation.scorer import checkpoint_root, list_checkpoints
    from mindrlhf.models.export import export_checkpoint
    from mindrlhf.training.config import load_config

    config = load_config(config_path)
    checkpoint = list_checkpoints(ckpt_path)[-1]
    root = checkpoint_root(checkpoint)
    stats = load_stats(root, checkpoint) if with_stats and os.path.isfile(stats_path(root)) else None
    template = run_template_path(root)
    extra = {TEMPLATE_COPY: template} if os.path.isfile(template) else {}
    result = export_checkpoint(checkpoint, config.model.model_config, output_dir, tokenizer, stats, dtype,
                               src_strategy, overwrite, log, extra_files=extra)
    if extra:
        result["template_record"] = TEMPLATE_COPY
    return result
