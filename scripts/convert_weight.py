"""Hugging Face Llama (config.json + *.safetensors, sharded or not) -> a MindSpore checkpoint for the backbone.

    python scripts/convert_weight.py --input_path Llama-2-7b-hf --output_path llama2_7b.ckpt \
        [--config model_configs/llama2_config/run_llama_2_7b_rm.yaml] [--dtype float16]
Then set model.model_config.checkpoint_name_or_path: llama2_7b.ckpt (or reward_train.py --load_checkpoint).
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
    parser.add_argument("--input_path", required=True, help="HF model directory or one .safetensors file")
    parser.add_argument("--output_path", required=True, help="output .ckpt")
    parser.add_argument("--config", default=None, help="run YAML whose model_config the shapes must match")
    parser.add_argument("--dtype", default=None, choices=["float16", "float32"], help="default: as stored")
    parser.add_argument("--keep_lm_head", action="store_true", help="also write lm_head.weight")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    from mindrlhf.errors import OutputExistsError
    from mindrlhf.interop.hf_import import convert_hf_to_ms

    if os.path.exists(args.output_path) and not args.overwrite:
        raise OutputExistsError(f"{args.output_path} already exists; pass --overwrite to replace it")
    model_config = None
    if args.config:
        from mindrlhf.training.config import load_config
        model_config = load_config(args.config).model.model_config
    result = convert_hf_to_ms(args.input_path, args.output_path, model_config, args.dtype, args.keep_lm_head)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
