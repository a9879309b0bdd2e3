"""Right-padded torch batches for the scripts that score with transformers (peer_trl.py, check_hf_parity.py).
Plain torch, no mindrlhf: peer_trl.py runs in the peer's own interpreter."""
import torch


def padded(rows, pad_id):
    """(input_ids, attention_mask) for token-id lists, each padded on the right to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask
