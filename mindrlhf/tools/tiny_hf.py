"""A tiny random Llama in Hugging Face layout (config.json + safetensors, single or sharded), shaped like the
tiny CPU config: what the tests convert, and what a user converts to try `convert_weight.py` without a download.

    python -m mindrlhf.tools.tiny_hf --output tiny-llama-hf [--shards 3] [--hidden 64]
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np


def tiny_hf_tensors(hidden=64, layers=2, vocab=32000, ffn=192, seed=0) -> dict:
    """HF Llama tensor names -> float32 N(0, 0.02) arrays (norms around 1), with the rotary buffer HF files
    sometimes carry (the converter must ignore it)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": 1 + w(hidden),
               "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(hidden, hidden),
                        p + "self_attn.v_proj.weight": w(hidden, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
                        p + "mlp.gate_proj.weight": w(ffn, hidden), p + "mlp.down_proj.weight": w(hidden, ffn),
                        p + "mlp.up_proj.weight": w(ffn, hidden), p + "input_layernorm.weight": 1 + w(hidden),
                        p + "post_attention_layernorm.weight": 1 + w(hidden),
                        p + "self_attn.rotary_emb.inv_freq": w(hidden // 8)})
    return tensors


def write_hf(directory, tensors: dict, shards: int = 1, hidden: int = 64) -> Path:
    """config.json + model.safetensors, or `shards` files with model.safetensors.index.json as HF writes them."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32000, "intermediate_size": 192,
        "rms_norm_eps": 1e-5, "torch_dtype": "float32"}))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(directory / fname))
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to write (must not exist)")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        parser.exit(2, f"error: {args.output} already exists\n")
    print(write_hf(args.output, tiny_hf_tensors(hidden=args.hidden, ffn=3 * args.hidden), args.shards, args.hidden))


if __name__ == "__main__":
    main()
