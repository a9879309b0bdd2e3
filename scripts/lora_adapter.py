"""A LoRA run's checkpoint -> its adapter (LoRA tensors + value head, tied to the base weights by digest) and/or
the merged whole model (W + B.A.alpha/r, no LoRA tensors: scored and exported as a plain model).

    python scripts/lora_adapter.py --config run_llama_2_tiny_lora_rm_cpu.yaml \
        --checkpoint output/checkpoint [--output adapter.safetensors] [--merge merged.ckpt] \
        [--base_path base.ckpt] [--src_strategy output/strategy] [--overwrite]
--checkpoint is a .ckpt, a rank_N folder or the root holding rank_N/ (its newest checkpoint is used); the YAML's
model.model_config.pet_config gives rank and alpha, and a checkpoint whose LoRA tensors disagree is refused.
--base_path is recorded in the adapter (and checked against the checkpoint's frozen weights when it exists).
Prints one JSON line with what was written.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from mindrlhf.cli import main_guard  # noqa: E402


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the LoRA run's YAML (its pet_config)")
    parser.add_argument("--checkpoint", required=True, help="a .ckpt, a rank_N folder or the checkpoint root")
    parser.add_argument("--output", default=None, help="the adapter .safetensors to write")
    parser.add_argument("--merge", default=None, help="the merged whole-model .ckpt to write")
    parser.add_argument("--base_path", default="", help="the base weights file, recorded in the adapter")
    parser.add_argument("--src_strategy", default=None, help="strategy file or folder of a model-parallel run")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    import mindrlhf._mindformers  # noqa: F401  (quiet import first)
    from mindrlhf.errors import ConfigError
    from mindrlhf.evaluation.scorer import list_checkpoints
    from mindrlhf.model.lora import lora_settings
    from mindrlhf.checkpoints.adapters import extract
    from mindrlhf.model.llama_reward import model_shapes
    from mindrlhf.training.config import load_config

    config = load_config(args.config)
    where = f"{args.config}: model.model_config.pet_config"
    settings = lora_settings(config.model.model_config, where)
    if settings is None:
        raise ConfigError(f"{args.config}: has no model.model_config.pet_config; pass the LoRA run's YAML")
    checkpoint = list_checkpoints(args.checkpoint)[-1]
    result = extract(checkpoint, settings, args.config, args.output, args.merge, args.base_path, args.overwrite,
                     expected=model_shapes(config), src_strategy=args.src_strategy,
                     log=lambda msg: print(msg, file=sys.stderr))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
