"""Cross-framework check: the exported Hugging Face folder, scored by transformers on PyTorch, gives the rewards
reward_infer.py gives on the same rows (max |difference| <= 1e-4, float32).

    python benchmarks/check_hf_parity.py --distributed_ckpt_path output/checkpoint [--rows 64]
Needs the optional extra `interop` (pip install -e ".[interop]": torch and transformers). Without torch it says so
and exits 0; `make test` never needs it.

Steps: scripts/export_hf.py into a temporary folder (or --hf_dir); reward_infer.py as a subprocess on the first
--rows pairs of --data_file; AutoTokenizer + AutoModelForSequenceClassification on the folder; the rendered texts
tokenized by transformers (ids compared with ours), right-padded with pad_token_id, one forward pass per batch.
transformers reads each reward at the last token that is not pad_token_id (2, also Llama 2's EOS); our rows have
no EOS and never the pad id inside, so that is our last real token: the script counts rows where it is not.
Without --distributed_ckpt_path the tiny config's randomly initialised weights are used.

--lora: a LoRA reward model (default config: the tiny LoRA YAML; without --distributed_ckpt_path random weights
with random non-zero LoRA A and B) exported in both forms, merged and as a PEFT adapter, and both scored by the
Hugging Face stack in the peer interpreter (--peer_python, default .venv-peer/bin/python: torch, transformers,
peft; benchmarks/peer_hf_score.py): the merged folder by transformers, the adapter by peft onto a base folder
exported from the checkpoint's frozen weights (with another score head, so that peft must take the adapter's).
Both must give reward_infer.py's scores of the LoRA checkpoint (max |difference| <= 1e-4).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, TEST_JSONL, TINY_CONFIG, TOKENIZER, save

LORA_CONFIG = ROOT / "model_configs" / "llama2_config" / "run_llama_2_tiny_lora_rm_cpu.yaml"
INFER = ROOT / "examples" / "reward_model_train_tutorial" / "reward_infer.py"
EXPORT = ROOT / "scripts" / "export_hf.py"
TOLERANCE = 1e-4


def run(cmd):
    proc = subprocess.run([sys.executable] + [str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(str(c) for c in cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def random_checkpoint(config: str, directory: Path) -> Path:
    import mindspore as ms

    from mindrlhf.evaluation.scorer import RewardScorer

    ms.set_seed(0)
    path = directory / "random" / "rank_0" / "random.ckpt"
    path.parent.mkdir(parents=True)
    ms.save_checkpoint(RewardScorer(config).network, str(path))
    return path.parent.parent


def random_lora_checkpoint(config: str, directory: Path) -> Path:
    """A LoRA reward model of `config` with random weights and random non-zero LoRA A and B (B starts at zero)."""
    import mindspore as ms

    from mindrlhf.evaluation.scorer import RewardScorer
    from mindrlhf.checkpoints.names import is_lora

    ms.set_seed(0)
    network = RewardScorer(config).network
    rng = np.random.default_rng(0)
    for param in network.get_parameters():
        if is_lora(param.name):
            param.set_data(ms.Tensor(rng.normal(0, 0.5 / param.shape[1] ** 0.5, param.shape).astype(np.float32)))
    path = directory / "lora" / "rank_0" / "lora.ckpt"
    path.parent.mkdir(parents=True)
    ms.save_checkpoint(network, str(path))
    return path.parent.parent


def base_folder(config: str, checkpoint: str, tokenizer: str, work: Path) -> str:
    """The Hugging Face base a PEFT adapter goes onto: the checkpoint's frozen weights exported with the YAML
    minus its pet_config, the score head negated (peft must replace it with the adapter's)."""
    import mindspore as ms
    import yaml

    from mindrlhf.evaluation.scorer import list_checkpoints
    from mindrlhf.checkpoints.reader import load_checkpoint_dict
    from mindrlhf.checkpoints.names import BACKBONE, VALUE_HEAD, VALUE_HEAD_WEIGHT, is_lora

    params = load_checkpoint_dict(list_checkpoints(checkpoint)[-1])
    keep = [{"name": n, "data": -p if n == VALUE_HEAD_WEIGHT else p} for n, p in params.items()
            if n.startswith((BACKBONE, VALUE_HEAD)) and not is_lora(n)]
    base_ckpt = work / "base" / "rank_0" / "base.ckpt"
    base_ckpt.parent.mkdir(parents=True)
    ms.save_checkpoint(keep, str(base_ckpt))
    raw = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    for key in ("pet_config", "reward_lora"):
        raw["model"]["model_config"].pop(key, None)
    plain = work / "plain.yaml"
    plain.write_text(yaml.safe_dump(raw), encoding="utf-8")
    folder = work / "hf_base"
    run([EXPORT, "--config", plain, "--distributed_ckpt_path", base_ckpt, "--tokenizer", tokenizer,
         "--output_dir", folder])
    return str(folder)


def our_scores(args, common, ckpt: str, work: Path):
    """reward_infer.py (the run's flags in `common`) on the first --rows rows: (rows, our scores, the texts as the
    run's template renders them, their token ids, the template)."""
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.evaluation.run import run_template

    lines = Path(args.data_file).read_text(encoding="utf-8").splitlines()[:args.rows]
    rows = work / "rows.jsonl"
    rows.write_text("\n".join(lines) + "\n", encoding="utf-8")
    scores_file = work / "infer_scores.jsonl"
    run([INFER, *common, "--data_file", rows, "--output_file", scores_file])
    items = [json.loads(line) for line in scores_file.read_text(encoding="utf-8").splitlines()]
    ours = np.array([it["score"] for it in items], np.float64)
    tok = load_tokenizer(args.tokenizer)
    template = run_template(ckpt, None, tok)
    texts = [template.render(it["prompt"], it["response"]) for it in items]
    return lines, ours, texts, tok.encode(texts, special_tokens=template.special_tokens), template


def lora_main(args) -> int:
    """Both LoRA export forms against reward_infer.py, scored in the peer interpreter (see the module doc)."""
    if not os.access(args.peer_python, os.X_OK):
        print(f"check_hf_parity --lora: skipped: no peer interpreter at {args.peer_python} (make peer-venv, then "
              f"{args.peer_python} -m pip install peft); nothing was compared")
        return 0
    import mindrlhf.training.registry  # noqa: F401
    from mindrlhf.training.config import load_config

    work = Path(tempfile.mkdtemp(prefix="hf_parity_lora_"))
    config = args.config if args.config != str(TINY_CONFIG) else str(LORA_CONFIG)
    ckpt = args.distributed_ckpt_path or str(random_lora_checkpoint(config, work))
    merged, adapter = work / "hf_merged", work / "hf_peft"
    base = base_folder(config, ckpt, args.tokenizer, work)
    common = ["--config", config, "--distributed_ckpt_path", ckpt, "--tokenizer", args.tokenizer]
    run([EXPORT, *common, "--output_dir", merged])
    run([EXPORT, *common, "--output_dir", adapter, "--peft", "--base_model", base])
    lines, ours, texts, our_ids, template = our_scores(args, common, ckpt, work)
    seq_length = int(load_config(config).model.model_config.seq_length)
    spec, output = work / "peer_spec.json", work / "peer_scores.json"
    spec.write_text(json.dumps({"ids": [x[:seq_length] for x in our_ids], "texts": texts, "special_tokens": template.special_tokens, "seq_length": seq_length,
                                "batch_size": args.batch_size, "merged": str(merged), "base": base,
                                "peft": str(adapter)}), encoding="utf-8")
    proc = subprocess.run([args.peer_python, str(ROOT / "benchmarks" / "peer_hf_score.py"), "--spec", spec,
                           "--output", output], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"peer scoring failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peer = json.loads(output.read_text(encoding="utf-8"))
    mismatch = None if peer["ids"] is None else sum(a != b[:seq_length] for a, b in zip(peer["ids"], our_ids))
    diffs = {form: np.abs(np.array(peer[form]) - ours) for form in ("merged", "peft")}
    moved = float(np.abs(np.array(peer["base"]) - ours).min())  # the base alone must score otherwise
    result = {"rows": len(lines), "texts": len(texts), "checkpoint": ckpt, "config": config, "merged_dir": str(merged),
              "peft_dir": str(adapter), "base_dir": base, "torch": peer["torch"],
              "transformers": peer["transformers"], "peft": peer["peft_version"],
              "tokenizer_class": peer["tokenizer_class"], "token_id_mismatches": mismatch,
              "lora_b_matrices_loaded_by_peft": peer["lora_b_matrices"], "zero_lora_b": peer["zero_lora_b"],
              "min_abs_difference_base_vs_ours": moved, "tolerance": TOLERANCE,
              **{f"max_abs_difference_{f}": float(d.max()) for f, d in diffs.items()},
              **{f"mean_abs_difference_{f}": float(d.mean()) for f, d in diffs.items()}}
    result["passed"] = bool(all(d.max() <= TOLERANCE for d in diffs.values()) and not mismatch
                            and not peer["zero_lora_b"] and moved > 10 * TOLERANCE)
    save("hf_parity_lora" if config == str(LORA_CONFIG) else f"hf_parity_lora_{Path(config).stem}", result)
    print(f"HF parity (LoRA): max |transformers merged - reward_infer.py| = {diffs['merged'].max():.2e}, "
          f"|peft - reward_infer.py| = {diffs['peft'].max():.2e} over {len(texts)} texts "
          f"({'PASS' if result['passed'] else 'FAIL'}, tolerance {TOLERANCE})")
    return 0 if result["passed"] else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY_CONFIG))
    parser.add_argument("--distributed_ckpt_path", default=None, help="default: random weights of --config")
    parser.add_argument("--tokenizer", default=str(TOKENIZER))
    parser.add_argument("--data_file", default=str(TEST_JSONL), help="rows with prompt, pos_resp, neg_resp")
    parser.add_argument("--rows", type=int, default=64, help="pairs to score (two texts each)")
    parser.add_argument("--hf_dir", default=None, help="an exported folder (default: export into a temp folder)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lora", action="store_true",
                        help="a LoRA reward model, merged and as a PEFT adapter, scored in the peer interpreter")
    parser.add_argument("--peer_python", default=str(ROOT / ".venv-peer" / "bin" / "python"),
                        help="with --lora: an interpreter with torch, transformers and peft")
    args = parser.parse_args()
    if args.lora:
        return lora_main(args)
    try:
        import torch
        import transformers
    except ImportError as err:
        print(f"check_hf_parity: skipped, {err.name} is not installed (pip install -e '.[interop]' brings torch "
              "and transformers); nothing was compared")
        return 0
    from torch_batches import padded

    import mindrlhf.training.registry  # noqa: F401

    work = Path(tempfile.mkdtemp(prefix="hf_parity_"))
    ckpt = args.distributed_ckpt_path or str(random_checkpoint(args.config, work))
    hf_dir = args.hf_dir or str(work / "hf")
    if not args.hf_dir:
        run([EXPORT, "--config", args.config, "--distributed_ckpt_path", ckpt, "--tokenizer", args.tokenizer,
             "--output_dir", hf_dir])
    lines, ours, texts, our_ids, template = our_scores(args, ["--config", args.config, "--tokenizer", args.tokenizer,
                                                     "--distributed_ckpt_path", ckpt], ckpt, work)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    seq_length = int(hf_tok.model_max_length)
    pad = int(model.config.pad_token_id)
    hf_ids = [hf_tok(t, add_special_tokens=template.special_tokens)["input_ids"][:seq_length] for t in texts]
    id_mismatch = sum(a != b[:seq_length] for a, b in zip(hf_ids, our_ids))
    pad_inside = sum(pad in x for x in hf_ids)
    theirs = np.zeros(len(texts), np.float64)
    with torch.no_grad():
        for start in range(0, len(texts), args.batch_size):
            batch = hf_ids[start:start + args.batch_size]
            ids, mask = padded(batch, pad)
            theirs[start:start + len(batch)] = model(input_ids=ids, attention_mask=mask).logits[:, 0].double().numpy()
    diff = np.abs(theirs - ours)
    result = {"rows": len(lines), "texts": len(texts), "checkpoint": ckpt, "hf_dir": hf_dir,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "tokenizer_class": type(hf_tok).__name__, "token_id_mismatches": int(id_mismatch),
              "texts_holding_pad_id": int(pad_inside), "max_abs_difference": float(diff.max()),
              "mean_abs_difference": float(diff.mean()), "tolerance": TOLERANCE,
              "passed": bool(diff.max() <= TOLERANCE and id_mismatch == 0)}
    save("hf_parity", result)
    print(f"HF parity: max |transformers - reward_infer.py| = {diff.max():.2e} over {len(texts)} texts "
          f"({'PASS' if result['passed'] else 'FAIL'}, tolerance {TOLERANCE})")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
