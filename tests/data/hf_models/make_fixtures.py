"""Writes the Hugging Face reward-model fixtures of tests/test_hf_interop.py with transformers itself, so that a
mapping wrong both ways (import and export) cannot pass: the folders, their config.json and transformers' own
scores all come from transformers, not from our code.

    .venv-peer/bin/python tests/data/hf_models/make_fixtures.py           # transformers 5.x (+ torch)
        -> <name>/config.json + model.safetensors, scores.json
    .venv/bin/python tests/data/hf_models/make_fixtures.py --legacy       # transformers 4.x config classes
        -> legacy/<name>.json (the same models' config.json in the 4.x layout: rope_theta, rope_scaling)
    .venv-peer/bin/python tests/data/hf_models/make_fixtures.py --peft    # peft (+ transformers 5.x, torch)
        -> peft/<name>/adapter_config.json + adapter_model.safetensors, peft/scores.json (LoRA adapters on the
           folders above, which it reads and never rewrites)

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
# The LoRA of issue #24 on every projection, the score head trained in full (peft keeps a copy of it)
LORA = {"task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "modules_to_save": ["score"]}


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


def scored(model, token_rows, pad):
    """Each row's score alone, after checking that a right-padded batch of them scores the same."""
    import torch

    with torch.no_grad():
        alone = [float(model(input_ids=torch.tensor([r])).logits[0, 0]) for r in token_rows]
        width = max(len(r) for r in token_rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in token_rows])
        batched = model(input_ids=ids, attention_mask=(ids != pad).long()).logits[:, 0].tolist()
    worst = max(abs(a - b) for a, b in zip(alone, batched))
    assert worst < 1e-5, f"batched and single scores differ by {worst}"
    return alone


def peft_adapters():
    """LoRA adapters written by peft itself on the two folders above, and peft's scores with them (unmerged, merged,
    and the LoRA alone under the base's score head), so that our adapter export (key names, shapes, config keys)
    and our adapter import (scores) answer to peft.

    peft stores target_modules as a set and writes it in set order, which follows str hashing: the script runs
    itself again under PYTHONHASHSEED=0 so that adapter_config.json comes out the same byte for byte."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, PYTHONHASHSEED="0"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask the hub about a base model
    import peft
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open

    assert transformers.__version__.startswith("5."), f"want transformers 5.x, not {transformers.__version__}"
    base_record = json.load(open(os.path.join(HERE, "scores.json"), encoding="utf-8"))
    token_rows = rows()
    assert token_rows == base_record["rows"], "scores.json was written for other rows: write it again first"
    root = os.path.join(HERE, "peft")
    record = {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
              "seed": SEED, "lora": LORA,
              "base_model_name_or_path": "the base folder relative to the adapter folder (../../<name>)",
              "rows": token_rows, "models": {}}
    for index, name in enumerate(MODELS):
        def load_base():
            return transformers.AutoModelForSequenceClassification.from_pretrained(
                os.path.join(HERE, name), dtype=torch.float32).eval()

        torch.manual_seed(SEED)
        # a copy: peft appends to modules_to_save in place
        model = get_peft_model(load_base(), LoraConfig(**json.loads(json.dumps(LORA))))
        # peft's own init leaves lora_B at zero (no change): draw A and B, large enough to move every score,
        # and a new score head (the modules_to_save copy; the base's stays as it was). One seed per model: both
        # have the same shapes, and their adapters must differ
        gen = torch.Generator().manual_seed(SEED + index)
        with torch.no_grad():
            for pname, param in sorted(model.named_parameters()):
                if ".lora_A." in pname:  # (r, in)
                    param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
                elif ".lora_B." in pname:  # (out, r)
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5 / param.shape[1] ** 0.5)
                elif ".modules_to_save." in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 1.5 / param.shape[1] ** 0.5)
        model.peft_config["default"].base_model_name_or_path = f"../../{name}"
        folder = os.path.join(root, name)
        model.save_pretrained(folder)
        readme = os.path.join(folder, "README.md")  # peft's model card template: not a fixture
        if os.path.exists(readme):
            os.remove(readme)
        for fname in os.listdir(folder):
            os.chmod(os.path.join(folder, fname), 0o644)

        # the scores come from what was written: a fresh base plus the adapter read back by peft
        base_model = load_base()
        pad = base_model.config.pad_token_id
        base = scored(base_model, token_rows, pad)
        drift = max(abs(a - b) for a, b in zip(base, base_record["scores"][name]))
        assert drift < 1e-5, f"{name}: this torch scores the base {drift} away from scores.json"
        base_head = base_model.score.weight.detach().clone()
        loaded = PeftModel.from_pretrained(base_model, folder).eval()
        with_adapter = scored(loaded, token_rows, pad)
        merged_model = loaded.merge_and_unload()
        merged = scored(merged_model, token_rows, pad)
        worst = max(abs(a - b) for a, b in zip(with_adapter, merged))
        assert worst < 1e-5, f"{name}: merged and unmerged scores differ by {worst}"
        # the LoRA alone (the base's score head back on the merged model) must move the scores too: an import
        # that took the new head but dropped the LoRA weights could not pass
        with torch.no_grad():
            merged_model.score.weight.copy_(base_head)
        lora_only = scored(merged_model, token_rows, pad)
        moved = min(abs(a - b) for a, b in zip(with_adapter, base))
        moved_lora = min(abs(a - b) for a, b in zip(lora_only, base))
        assert min(moved, moved_lora) > 0.05, f"{name}: a score moves by only {min(moved, moved_lora)}"
        with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as fh:
            tensors = {key: list(fh.get_slice(key).get_shape()) for key in sorted(fh.keys())}
        record["models"][name] = {
            "adapter_config": json.load(open(os.path.join(folder, "adapter_config.json"), encoding="utf-8")),
            "tensors": tensors, "scores": with_adapter, "merged_scores": merged, "base_scores": base,
            "lora_only_scores": lora_only, "max_merged_difference": worst, "min_score_change": moved,
            "min_score_change_lora_only": moved_lora}
        print(f"wrote peft/{name}/ ({sorted(os.listdir(folder))}); scores {with_adapter}; merged differ by "
              f"{worst:.2e}; every score moved by at least {moved:.3f} ({moved_lora:.3f} by the LoRA alone)")
    with open(os.path.join(root, "scores.json"), "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--legacy", action="store_true", help="write legacy/<name>.json with transformers 4.x")
    mode.add_argument("--peft", action="store_true", help="write peft/<name>/ LoRA adapters and peft/scores.json")
    args = parser.parse_args()
    sys.exit(legacy() if args.legacy else peft_adapters() if args.peft else current())
