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
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, TEST_JSONL, TINY_CONFIG, TOKENIZER, save

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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY_CONFIG))
    parser.add_argument("--distributed_ckpt_path", default=None, help="default: random weights of --config")
    parser.add_argument("--tokenizer", default=str(TOKENIZER))
    parser.add_argument("--data_file", default=str(TEST_JSONL), help="rows with prompt, pos_resp, neg_resp")
    parser.add_argument("--rows", type=int, default=64, help="pairs to score (two texts each)")
    parser.add_argument("--hf_dir", default=None, help="an exported folder (default: export into a temp folder)")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    try:
        import torch
        import transformers
    except ImportError as err:
        print(f"check_hf_parity: skipped, {err.name} is not installed (pip install -e '.[interop]' brings torch "
              "and transformers); nothing was compared")
        return 0
    from torch_batches import padded

    import mindrlhf.registry  # noqa: F401
    from mindrlhf.data.tokenizer import load_tokenizer
    from mindrlhf.evaluation.run import run_template

    work = Path(tempfile.mkdtemp(prefix="hf_parity_"))
    ckpt = args.distributed_ckpt_path or str(random_checkpoint(args.config, work))
    hf_dir = args.hf_dir or str(work / "hf")
    if not args.hf_dir:
        run([EXPORT, "--config", args.config, "--distributed_ckpt_path", ckpt, "--tokenizer", args.tokenizer,
             "--output_dir", hf_dir])
    lines = Path(args.data_file).read_text(encoding="utf-8").splitlines()[:args.rows]
    rows = work / "rows.jsonl"
    rows.write_text("\n".join(lines) + "\n", encoding="utf-8")
    scores_file = work / "infer_scores.jsonl"
    run([INFER, "--config", args.config, "--data_file", rows, "--tokenizer", args.tokenizer,
         "--distributed_ckpt_path", ckpt, "--output_file", scores_file])
    items = [json.loads(line) for line in scores_file.read_text(encoding="utf-8").splitlines()]
    ours = np.array([it["score"] for it in items], np.float64)

    tok = load_tokenizer(args.tokenizer)
    template = run_template(ckpt, None, tok)
    texts = [template.render(it["prompt"], it["response"]) for it in items]
    our_ids = tok.encode(texts, special_tokens=template.special_tokens)
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
