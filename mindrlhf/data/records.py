"""The MindRecord layout that conversion writes and RewardModelDataset reads: the tutorial's 7 columns, the
5 model inputs the dataset turns them into, and the compact and margin variants. Plain data, no MindSpore, so
conversion imports it without the dataset engine or MindFormers.
"""

RECORD_COLUMNS = (
    "chosen_input_ids",
    "chosen_attention_mask",
    "rejected_input_ids",
    "rejected_attention_mask",
    "position_id",
    "loss_mask",
    "end_ind",
)

MODEL_COLUMNS = ("input_ids", "position_id", "attention_mask", "loss_mask", "end_ind")

RECORD_SCHEMA = {
    "chosen_input_ids": {"type": "int32", "shape": [-1]},
    "chosen_attention_mask": {"type": "int32", "shape": [-1]},
    "rejected_input_ids": {"type": "int32", "shape": [-1]},
    "rejected_attention_mask": {"type": "int32", "shape": [-1]},
    "position_id": {"type": "int32", "shape": [-1]},
    "loss_mask": {"type": "int32", "shape": [-1]},
    "end_ind": {"type": "int64"},
}

# The compact layout stores every array unpadded (own length) plus the target length; RewardModelDataset pads
# per batch. Files shrink by the padding share (about 20x for CValues at 4096) with identical batches.
COMPACT_SCHEMA = dict(RECORD_SCHEMA, seq_length={"type": "int64"})
LAYOUTS = ("padded", "compact")

# Per-pair margin (TRL/OpenRLHF): an eighth column, written only when the source rows carry a `margin`, so
# files without margins keep the tutorial's 7 fields; RewardModelDataset then yields it as a sixth model input.
MARGIN_COLUMN = "margin"
MARGIN_SCHEMA = {MARGIN_COLUMN: {"type": "float32"}}
