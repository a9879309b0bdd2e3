"""The MindRecord layout that conversion writes and RewardModelDataset reads: the tutorial's 7 columns, the
5 model inputs the dataset turns them into, the compact and margin variants, and the write id that ties a file to
its index. No MindSpore, so conversion imports it without the dataset engine or MindFormers.
"""
import json
import re
import sqlite3
from contextlib import closing
from typing import Optional
from urllib.request import pathname2url

from mindrlhf.errors import ConfigError

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

# A MindRecord is two files, the data and its index (.db). Conversion records one write id in both: in the schema's
# description in the data file's header, and in a table of its own in the index (an SQLite file). A reader then
# refuses a pair that an interrupted replacement left mixed from two writes. Files of other writers carry none.
WRITE_TABLE = "MINDRLHF_WRITE"
_WRITE_DESC = re.compile(r"mindrlhf write ([0-9a-f]+)")


def schema_description(write_id: str) -> str:
    return f"reward_model_pairs; mindrlhf write {write_id}"


def stamp_index(path: str, write_id: str):
    """Record write_id in the index of the committed MindRecord `path`."""
    with closing(sqlite3.connect(path + ".db")) as db, db:
        db.execute(f"CREATE TABLE {WRITE_TABLE}(WRITE_ID TEXT NOT NULL)")
        db.execute(f"INSERT INTO {WRITE_TABLE} VALUES (?)", (write_id,))


def _data_write_id(path: str) -> Optional[str]:
    """The write id in the data file's header: a MindRecord starts with its header's length (8 bytes, little
    endian), then the header as JSON, which holds each schema's description."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        text = fh.read(size) if 0 < size < 1 << 30 else b""
    try:
        header = json.loads(text)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: not a MindRecord data file (no whole header at its start)")
    for schema in header.get("schema") or []:
        found = _WRITE_DESC.search(str(schema.get("desc", ""))) if isinstance(schema, dict) else None
        if found:
            return found.group(1)
    return None


def _index_write_id(path: str) -> Optional[str]:
    index = path + ".db"
    try:
        with closing(sqlite3.connect(f"file:{pathname2url(index)}?mode=ro", uri=True)) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (WRITE_TABLE,)).fetchone():
                return None
            row = db.execute(f"SELECT WRITE_ID FROM {WRITE_TABLE}").fetchone()
    except sqlite3.Error as err:
        raise ConfigError(f"{index}: not a MindRecord index ({err})") from None
    return str(row[0]) if row else ""


def check_record_pair(path: str) -> Optional[str]:
    """ConfigError naming the file unless the MindRecord `path` and its index come from one write (both carry the
    same write id, or neither does); returns the write id."""
    data_id, index_id = _data_write_id(path), _index_write_id(path)
    if data_id != index_id:
        raise ConfigError(f"{path}: its index {path}.db comes from another write (write id {data_id or 'none'} in "
                          f"the data file, {index_id or 'none'} in the index), as an interrupted replacement leaves "
                          "them; convert the data again")
    return data_id
