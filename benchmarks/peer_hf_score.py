"""Peer side of check_hf_parity.py --lora: the exported LoRA reward model scored by the Hugging Face stack itself,
in both forms: the merged folder by transformers (AutoModelForSequenceClassification), the PEFT folder by peft
(PeftModel.from_pretrained onto the base folder it names). Runs in the peer interpreter (.venv-peer: torch,
transformers, peft; `make peer-venv`), never in .venv; plain torch, no mindrlhf.

--spec JSON: {ids, texts, special_tokens, seq_length, batch_size, merged, base, peft}; writes --output JSON: the
token ids transformers' tokenizer gives (from the merged folder; null, with the reason, when this interpreter cannot
load it, e.g. a SentencePiece model without the sentencepiece package), each form's scores of `ids` (ours: the
weights are what is compared here; check_hf_parity.py without --lora compares tokenizers), the LoRA B matrices peft
loaded that are all zero (peft's own init: an adapter tensor not loaded), and the versions.
"""
import argparse
import json

import torch
import transformers

from torch_batches import padded


def scores(model, rows, pad, batch_size):
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, mask = padded(rows[start:start + batch_size], pad)
            out += model(input_ids=ids, attention_mask=mask).logits[:, 0].double().tolist()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    import peft

    with open(args.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    rows, hf_ids, tokenizer = spec["ids"], None, None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(spec["merged"])
        hf_ids = [tok(t, add_special_tokens=spec["special_tokens"])["input_ids"][:spec["seq_length"]]
                  for t in spec["texts"]]
        tokenizer = type(tok).__name__
    except (ImportError, ValueError, OSError) as err:
        tokenizer = f"not loaded: {str(err).splitlines()[0][:200]}"
    auto = transformers.AutoModelForSequenceClassification
    merged = auto.from_pretrained(spec["merged"], dtype=torch.float32).eval()
    pad = int(merged.config.pad_token_id)
    base = auto.from_pretrained(spec["base"], dtype=torch.float32).eval()
    base_scores = scores(base, rows, pad, spec["batch_size"])
    model = peft.PeftModel.from_pretrained(base, spec["peft"]).eval()
    zero_b = [n for n, p in model.named_parameters() if ".lora_B." in n and not p.detach().abs().sum()]
    lora_b = sum(".lora_B." in n for n, _ in model.named_parameters())
    result = {"ids": hf_ids, "merged": scores(merged, rows, pad, spec["batch_size"]),
              "peft": scores(model, rows, pad, spec["batch_size"]), "base": base_scores,
              "lora_b_matrices": lora_b, "zero_lora_b": zero_b, "torch": torch.__version__,
              "transformers": transformers.__version__, "peft_version": peft.__version__,
              "tokenizer_class": tokenizer}
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
