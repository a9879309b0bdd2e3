"""A trained reward model -> a Hugging Face folder (LlamaForSequenceClassification), e.g. for OpenRLHF.

    python scripts/export_hf.py --config model_configs/llama2_config/run_llama_2_7b_rm.yaml \
        --distributed_ckpt_path output/checkpoint --tokenizer /path/to/tokenizer.model --output_dir rm-hf
config.json (num_labels 1, pad_token_id, the YAML's Llama fields; normalize_reward/mean/std when
reward_eval.py --save_stats wrote reward_stats.json), model.safetensors (value head as score.weight), tokenizer.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from mindrlhf.cli import add_run_args, main_guard  # noqa: E402


@main_guard
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser)
    parser.add_argument("--output_dir", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: as stored in the checkpoint")
    parser.add_argument("--src_strategy", default=None,
                        help="strategy file (or folder) of a model-parallel run whose checkpoints are slices")
    parser.add_argument("--no_stats", action="store_true", help="leave reward statistics out of config.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    from mindrlhf.serving.share import export_run

    result = export_run(args.config, args.distributed_ckpt_path, args.tokenizer, args.output_dir, args.dtype,
                        args.src_strategy, args.overwrite, not args.no_stats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
