"""A trained reward model -> a Hugging Face folder (LlamaForSequenceClassification), e.g. for OpenRLHF.

    python scripts/export_hf.py --config model_configs/llama2_config/run_llama_2_7b_rm.yaml \
        --distributed_ckpt_path output/checkpoint --tokenizer /path/to/tokenizer.model --output_dir rm-hf
config.json (num_labels 1, pad_token_id, the YAML's Llama fields; normalize_reward/mean/std when
reward_eval.py --save_stats wrote reward_stats.json), model.safetensors (value head as score.weight), tokenizer.

LoRA reward models: a LoRA run's checkpoint (with the run's LoRA YAML), or base weights as --distributed_ckpt_path
plus --adapter FILE, export merged (W + B.A.alpha/r) by default, or with --peft as a PEFT adapter folder
(adapter_config.json + adapter_model.safetensors) for the Hugging Face base named by --base_model:
    python scripts/export_hf.py --config run_llama_2_tiny_lora_rm_cpu.yaml --distributed_ckpt_path output/checkpoint \
        --tokenizer tokenizer.model --output_dir rm-peft --peft --base_model meta-llama/Llama-2-7b-hf
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
    parser.add_argument("--adapter", default=None,
                        help="a mindrlhf LoRA adapter file; --distributed_ckpt_path is then the base weights")
    parser.add_argument("--format", default="merged", choices=["merged", "peft"],
                        help="merged: a whole model (LoRA merged in); peft: a PEFT adapter folder (LoRA models)")
    parser.add_argument("--peft", action="store_const", const="peft", dest="format", help="same as --format peft")
    parser.add_argument("--base_model", default=None,
                        help="with --peft (required): the Hugging Face id or path of the base model, written as "
                             "base_model_name_or_path")
    args = parser.parse_args(argv)
    from mindrlhf.serving.share import export_run

    result = export_run(args.config, args.distributed_ckpt_path, args.tokenizer, args.output_dir, args.dtype,
                        args.src_strategy, args.overwrite, not args.no_stats, adapter=args.adapter,
                        form=args.format, base_model=args.base_model)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
