"""Writes the Hugging Face reward-model fixtures of tests/test_hf_interop.py with transformers itself, so that a
mapping wrong both ways (import and export) cannot pass: the folders, their config.json and transformers' own
scores all come from transformers, not from our code.

    .venv-peer/bin/python tests/data/hf_models/make_fixtures.py           # transformers 5.x (+ torch)
        -> <name>/config.json + model.safetensors, scores.json
    .venv/bin/python tests/data/hf_models/make_fixtures.py --legacy       # transformers 4.x config classes
        -> legacy/<name>.json (the same models' config.json in the 4.x layout: rope_theta, rope_scaling)

The peer venv (`make peer-venv`, or python3 -m venv .venv-peer + pip install torch transformers) is only needed to
write them again; `make test` reads the committed files and needs neither torch nor transformers 5.
Every tensor is drawn again after transformers' own init (norms around 1, biases non-zero, weights large enough
for peaked attention): with norms at 1 and biases at 0 a swapped norm or a dropped bias would change nothing.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
# token ids from 8 up: never the pad, bos or eos id of either model; the longest fills seq_length 128
ROW_LENGTHS = (3, 12, 31, 64, 97, 128)
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
MODELS = {
    # Llama 3.1: GQA 4:2 (head size 16, the CPU kernels' smallest), theta 500000, rope_type llama3
    "llama3_1": {"architecture": "LlamaForSequenceClassification", "theta": 500000.0, "scaling": LLAMA3_SCALING,
                 "config": {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                            "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 4, "pad_token_id": 5,
                            "tie_word_embeddings": False}},
    # Qwen2.5 (0.5B-3B style): GQA 4:2, q/k/v biases, theta 1e6, eps 1e-6, tied embeddings
    "qwen2_5": {"architecture": "Qwen2ForSequenceClassification", "theta": 1000000.0, "scaling": None,
                "config": {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                           "max_window_layers": 2, "use_sliding_window": False, "rms_norm_eps": 1e-6,
                           "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": True}},
}
COMMON = {"num_labels": 1, "problem_type": "regression", "use_cache": False}


def rows():
    import numpy as np

    rng = np.random.default_rng(SEED)
    return [rng.integers(8, 256, size=n).tolist() for n in ROW_LENGTHS]


def config_class(name):
    import transformers

    return getattr(transformers, MODELS[name]["architecture"].replace("ForSequenceClassification", "Config"))


def legacy():
    """The 4.x layout (top-level rope_theta and rope_scaling), written by transformers 4.x's own config classes."""
    import transformers

    assert transformers.__version__.startswith("4."), f"--legacy wants transformers 4.x, not {transformers.__version__}"
    os.makedirs(os.path.join(HERE, "legacy"), exist_ok=True)
    for name, spec in MODELS.items():
        scaling = dict(spec["scaling"], rope_type="llama3") if spec["scaling"] else None
        config = config_class(name)(**spec["config"], **COMMON, rope_theta=spec["theta"], rope_scaling=scaling,
                                    architectures=[spec["architecture"]], dtype="float32")
        with open(os.path.join(HERE, "legacy", f"{name}.json"), "w", encoding="utf-8") as fh:
            fh.write(config.to_json_string())
        print(f"wrote legacy/{name}.json (transformers {transformers.__version__})")


def current():
    """The folders as transformers 5 saves them, and transformers' scores of ROW_LENGTHS rows."""
    import torch
    import transformers

    assert transformers.__version__.startswith("5."), f"want transformers 5.x, not {transformers.__version__}"
    token_rows = rows()
    record = {"transformers": transformers.__version__, "torch": torch.__version__, "seed": SEED,
              "rows": token_rows, "scores": {}}
    for name, spec in MODELS.items():
        rope = {"rope_type": "llama3" if spec["scaling"] else "default", "rope_theta": spec["theta"],
                **(spec["scaling"] or {})}
        config = config_class(name)(**spec["config"], **COMMON, rope_parameters=rope)
        torch.manual_seed(SEED)
        model = getattr(transformers, spec["architecture"])(config).to(torch.float32).eval()
        with torch.no_grad():
            for pname, param in sorted(model.named_parameters()):
                if pname.endswith("norm.weight"):
                    param.copy_(1 + 0.2 * torch.randn_like(param))
                elif pname.endswith(".bias"):
                    param.copy_(0.5 * torch.randn_like(param))
                elif pname.endswith("embed_tokens.weight"):
                    param.copy_(torch.randn_like(param))
                else:
                    param.copy_(torch.randn_like(param) * 1.5 / param.shape[1] ** 0.5)
        folder = os.path.join(HERE, name)
        model.save_pretrained(folder)
        os.chmod(os.path.join(folder, "model.safetensors"), 0o644)
        pad = config.pad_token_id
        with torch.no_grad():
            alone = [float(model(input_ids=torch.tensor([r])).logits[0, 0]) for r in token_rows]
            width = max(len(r) for r in token_rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in token_rows])
            mask = (ids != pad).long()
            batched = model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
        worst = max(abs(a - b) for a, b in zip(alone, batched))
        assert worst < 1e-5, f"{name}: batched and single scores differ by {worst}"
        record["scores"][name] = alone
        print(f"wrote {name}/ ({sorted(os.listdir(folder))}); scores {alone}")
    with open(os.path.join(HERE, "scores.json"), "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--legacy", action="store_true", help="write legacy/<name>.json with transformers 4.x")
    sys.exit(legacy() if parser.parse_args().legacy else current())
