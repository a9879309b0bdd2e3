"""RewardModelDataset: the 7-field MindRecord -> (2B, S) batches, chosen rows first, then rejected rows
(plus a (B,) margin when the file has that eighth column); or, with packing, packed steps of pack_rows rows
(mindrlhf.data.packing, issue #25).

Registered with MindFormers so YAML `train_dataset_task.type: RewardModelDataset` resolves. Optional length
bucketing trims each batch to the smallest boundary that holds its longest pair, so padding costs no compute.
"""
import contextvars
import copy
import os
import re
from typing import List, Optional, Sequence

import numpy as np

import mindrlhf._mindformers  # noqa: F401  (quiet import first)
from mindformers.dataset.base_dataset import BaseDataset
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindrlhf.data.buckets import boundaries_for, bucket_length
from mindrlhf.data import packing as pk
from mindrlhf.data.records import MARGIN_COLUMN, MODEL_COLUMNS, RECORD_COLUMNS, check_record_pair
from mindrlhf.distributed import is_writer
from mindrlhf.errors import ConfigError

_MINDRECORD = re.compile(r"\.mindrecord\d*$")


def resolve_mindrecord_files(source) -> List[str]:
    """A .mindrecord file, a list of them, or a directory searched recursively -> sorted file list, each with
    its index from the same write (records.check_record_pair)."""
    if isinstance(source, (list, tuple)):
        files = []
        for item in source:
            files.extend(resolve_mindrecord_files(item))
        return files
    if not source:
        raise ConfigError("no dataset given: set dataset_dir in the YAML or pass --train_dataset/--eval_dataset")
    source = str(source)
    if os.path.isdir(source):
        found = sorted(os.path.join(root, name) for root, dirs, names in os.walk(source)
                       for name in names if _MINDRECORD.search(name) and not root.split(os.sep)[-1].startswith("."))
        if not found:
            raise ConfigError(f"{source}: directory holds no .mindrecord files")
        return [_whole_mindrecord(path) for path in found]
    if not os.path.isfile(source):
        raise ConfigError(f"{source}: dataset file does not exist")
    return [_whole_mindrecord(source)]


def _whole_mindrecord(path: str) -> str:
    if not os.path.isfile(path + ".db"):
        raise ConfigError(f"{path}: MindRecord index {path}.db is missing (incomplete or not a MindRecord)")
    check_record_pair(path)
    return path


def make_batch_map(boundaries: Optional[Sequence[int]] = None):
    """The per-batch transform: stack chosen then rejected, per-row end_ind, optional trimming to a bucket;
    a margin column (B,) passes through as float32."""

    def batch_map(chosen_ids, chosen_mask, rejected_ids, rejected_mask, position_id, loss_mask, end_ind, *margin):
        input_ids = np.concatenate((chosen_ids, rejected_ids)).astype(np.int32)
        attention_mask = np.concatenate((chosen_mask, rejected_mask)).astype(np.float32)
        positions = np.concatenate((position_id, position_id)).astype(np.int32)
        row_end = attention_mask.sum(axis=1).astype(np.int32)
        loss_mask = loss_mask.astype(np.float32)
        if boundaries:
            seq_length = input_ids.shape[1]
            keep = bucket_length(int(np.max(end_ind)), boundaries, seq_length)
            input_ids, attention_mask = input_ids[:, :keep], attention_mask[:, :keep]
            positions, loss_mask = positions[:, :keep], loss_mask[:, :keep]
        if margin:
            return input_ids, positions, attention_mask, loss_mask, row_end, _margins(margin[0])
        return input_ids, positions, attention_mask, loss_mask, row_end

    return batch_map


def _margins(values) -> np.ndarray:
    return np.asarray([float(np.asarray(v)) for v in values], dtype=np.float32)


def record_columns(files: Sequence[str]) -> List[str]:
    """The columns to read: the 7 fields, plus margin when the files have it (all of them, or an error)."""
    from mindspore.mindrecord import FileReader

    with_margin = []
    for path in files:
        reader = FileReader(path, num_consumer=1)
        try:
            with_margin.append(MARGIN_COLUMN in reader.schema())
        finally:
            reader.close()
    if any(with_margin) and not all(with_margin):
        have = [f for f, m in zip(files, with_margin) if m]
        lack = [f for f, m in zip(files, with_margin) if not m]
        raise ConfigError(f"dataset files mix rows with and without a margin column ({have[0]} has one, "
                          f"{lack[0]} has none); convert them all with margins or all without")
    return list(RECORD_COLUMNS) + ([MARGIN_COLUMN] if with_margin and all(with_margin) else [])


def compact_seq_length(files: Sequence[str]) -> Optional[int]:
    """The target length of a compact-layout MindRecord (its schema has seq_length), None for padded files."""
    from mindspore.mindrecord import FileReader

    layouts = set()
    for path in files:
        reader = FileReader(path, num_consumer=1)
        try:
            compact = "seq_length" in reader.schema()
            row = next(reader.get_next(), None) if compact else None
        finally:
            reader.close()
        layouts.add(int(row["seq_length"]) if compact and row is not None else ("compact" if compact else None))
    if len(layouts) > 1:
        raise ConfigError(f"dataset files mix layouts or lengths: {sorted(map(str, layouts))}")
    found = layouts.pop() if layouts else None
    return found if isinstance(found, int) else None


def make_compact_batch_map(seq_length: int, pad_token_id: int, boundaries: Optional[Sequence[int]] = None,
                           margin: bool = False):
    """per_batch_map for unpadded rows: pad to the bucket (or seq_length) here, giving what the padded
    layout gives after trimming. MindSpore matches its signature to the columns, hence two of them."""

    def pad_batch(chosen_ids, chosen_mask, rejected_ids, rejected_mask, position_id, loss_mask, end_ind, _info):
        batch = len(chosen_ids)
        longest = max(int(np.asarray(e)) for e in end_ind)
        width = bucket_length(longest, boundaries, seq_length) if boundaries else seq_length
        input_ids = np.full((2 * batch, width), pad_token_id, dtype=np.int32)
        attention = np.zeros((2 * batch, width), dtype=np.float32)
        losses = np.zeros((batch, width), dtype=np.float32)
        for i in range(batch):
            for row, ids in ((i, chosen_ids[i]), (batch + i, rejected_ids[i])):
                input_ids[row, :len(ids)] = ids
                attention[row, :len(ids)] = 1.0
            losses[i, :len(loss_mask[i])] = loss_mask[i]
        positions = np.tile(np.arange(width, dtype=np.int32), (2 * batch, 1))
        return input_ids, positions, attention, losses, attention.sum(axis=1).astype(np.int32)

    def pad_batch_with_margin(chosen_ids, chosen_mask, rejected_ids, rejected_mask, position_id, loss_mask, end_ind,
                              margins, info):
        return pad_batch(chosen_ids, chosen_mask, rejected_ids, rejected_mask, position_id, loss_mask, end_ind,
                         info) + (_margins(margins),)

    return pad_batch_with_margin if margin else pad_batch


def shard_info():
    """(shard_id, num_shards) for this rank: split under data parallel, whole under full-batch semi-auto."""
    shard_id, num_shards = BaseDataset._generate_shard_info()  # pylint: disable=protected-access
    if num_shards is not None and num_shards <= 1:
        shard_id, num_shards = None, None
    return shard_id, num_shards


def _say_on_rank_0(message: str):
    """Only rank 0 prints: every rank resolves the same files the same way."""
    if is_writer():
        print(f"[mindrlhf] {message}", flush=True)


def read_pairs(files: Sequence[str], pad_token_id: int, num_samples: Optional[int] = None):
    """Every pair of the files (padded or compact layout) as packing.Pair, in file order (num_samples: the
    first n); also whether they carry margins and the data's seq_length."""
    from mindspore.mindrecord import FileReader

    columns = [c for c in record_columns(files) if c != "position_id"]
    pairs, widths = [], set()
    for path in files:
        reader = FileReader(path, num_consumer=1, columns=columns)
        try:
            for i, row in enumerate(reader.get_next()):
                if num_samples and len(pairs) >= int(num_samples):
                    break
                pairs.append(pk.pair_from_record(row, pad_token_id, where=f"{path}: row {i}"))
                widths.add(len(row["chosen_input_ids"]))
        finally:
            reader.close()
    data_length = compact_seq_length(files) or (max(widths) if widths else None)
    return pairs, MARGIN_COLUMN in columns, data_length


def check_pad_rule(files: Sequence[str], pad_token_id: int, num_samples: Optional[int] = None):
    """packing.check_no_pad_in_text on every row the padded pipeline will read (the packed one checks as it
    reads the pairs): InputError naming the file and row."""
    from mindspore.mindrecord import FileReader

    read = 0
    for path in files:
        reader = FileReader(path, num_consumer=1, columns=["chosen_input_ids", "chosen_attention_mask",
                                                            "rejected_input_ids", "rejected_attention_mask"])
        try:
            for i, row in enumerate(reader.get_next()):
                if num_samples and read >= int(num_samples):
                    return
                read += 1
                pk.check_no_pad_in_text(
                    row["chosen_input_ids"][:int(np.asarray(row["chosen_attention_mask"]).sum())],
                    row["rejected_input_ids"][:int(np.asarray(row["rejected_attention_mask"]).sum())],
                    pad_token_id, f"{path}: row {i}")
        finally:
            reader.close()


class PackedSteps:
    """Random-access source of packed steps for GeneratorDataset: step i -> the model's columns."""

    def __init__(self, pairs, steps, rows: int, seq_length: int, pad_token_id: int, loss_type: str,
                 shared_prefix: bool, margin: bool, ascend_row_groups: Optional[int] = None):
        self.pairs, self.steps, self.rows, self.seq_length = pairs, steps, rows, seq_length
        self.pad_token_id, self.loss_type = pad_token_id, loss_type
        self.shared_prefix, self.margin = shared_prefix, margin
        self.ascend_row_groups = ascend_row_groups  # Ascend: the actual_seq_len column, per FlashAttention call
        self.columns = list(MODEL_COLUMNS) + ([MARGIN_COLUMN] if margin else []) \
            + ([pk.ACTUAL_SEQ_LEN] if ascend_row_groups else [])

    def __len__(self):
        return len(self.steps)

    def __getitem__(self, index):
        arrays = pk.pack_step(self.pairs, self.steps[int(index)], self.rows, self.seq_length, self.pad_token_id,
                              self.loss_type, self.shared_prefix, self.margin)
        if self.ascend_row_groups:
            arrays[pk.ACTUAL_SEQ_LEN] = pk.actual_seq_len(arrays["attention_mask"], pk.tnd_row_entries(self.seq_length),
                                                          row_groups=self.ascend_row_groups)
        return tuple(arrays[name] for name in self.columns)


class PackingPlans:
    """The packed plans of one training run, kept from the trainer's early check (packing_plan_check) to the dataset
    MindFormers builds, so the pairs are read once. A run holds it open (`with PackingPlans():`); outside one, every
    call plans anew. It keeps one plan, the one being trained on; callers only read it."""

    _open = contextvars.ContextVar("mindrlhf_packing_plans", default=None)

    def __init__(self):
        self.key, self.plan, self._token = None, None, None

    def __enter__(self):
        self._token = PackingPlans._open.set(self)
        return self

    def __exit__(self, *exc):
        PackingPlans._open.reset(self._token)
        self.key = self.plan = None

    @classmethod
    def current(cls) -> Optional["PackingPlans"]:
        return cls._open.get()

    def get(self, key) -> Optional[dict]:
        return self.plan if key == self.key else None

    def keep(self, key, plan: dict):
        self.key, self.plan = key, plan

PACK_STEPS = ("batch_size", "fill")  # train_dataset.pack_steps: batch_size pairs a step (default), or fill rows


def pack_steps_mode(value) -> str:
    """train_dataset.pack_steps: batch_size (default: every step holds batch_size pairs a rank, as a padded
    step) or fill (rows filled by fit: more pairs a step, fewer steps, docs/packing.md)."""
    value = "batch_size" if value is None else str(value).strip()
    if value not in PACK_STEPS:
        raise ConfigError(f"train_dataset.pack_steps must be one of {PACK_STEPS}, got {value!r}")
    return value


def plan_packed(files, packing: str, pack_rows: Optional[int], seq_length: Optional[int] = None,
                loss_type: str = pk.SPAN, num_samples: Optional[int] = None, num_shards=None,
                seed: Optional[int] = None, pad_token_id: int = 2, batch_size: int = 8,
                ascend_row_groups: Optional[int] = None, pack_steps: Optional[str] = None) -> dict:
    """Read the pairs and plan the packed steps as create_packed_dataset serves them: ConfigError/InputError
    naming the file and row of a bad or too long pair. Returns the pairs, the step count, the resolved
    pack_rows and seq_length, shared_prefix, margin; pack_steps "batch_size": the row counts a step may take
    (row_counts); "fill": the steps and the filler share. On Ascend (ascend_row_groups) each row keeps the
    planner's reserve of filler tokens for its actual_seq_len entries (packing.fits_row)."""
    mode = pk.packing_mode(packing, "packing")
    how = pack_steps_mode(pack_steps)
    if loss_type not in (pk.SPAN, pk.LAST_TOKEN):
        raise ConfigError(f"loss_type must be {pk.SPAN} or {pk.LAST_TOKEN}, got {loss_type!r}")
    if pack_rows is not None and int(pack_rows) < 1:
        raise ConfigError(f"train_dataset.pack_rows must be >= 1, got {pack_rows}")
    files = resolve_mindrecord_files(files)
    key = (tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files), mode, pack_rows, seq_length,
           loss_type, num_samples, num_shards, seed, pad_token_id, batch_size, ascend_row_groups, how)
    plans = PackingPlans.current()
    if plans is not None and plans.get(key) is not None:  # the trainer's check, then the dataset it trains on
        return plans.get(key)
    pairs, margin, data_length = read_pairs(files, pad_token_id, num_samples)
    if not pairs:
        raise ConfigError(f"{files[0]}: no pairs to pack")
    seq_length = int(seq_length or data_length)
    shared_prefix = mode == "shared_prefix"
    lengths = pk.pair_row_lengths(pairs, seq_length, shared_prefix, loss_type)
    tnd = pk.tnd_row_entries(seq_length) if ascend_row_groups else None
    spans = pk.pair_spans(shared_prefix)
    groups = int(ascend_row_groups or 1)
    names = [p.label(i) for i, p in enumerate(pairs)]
    pk.check_tnd_room(lengths, seq_length, tnd, spans, lambda i: names[i])
    plan = {"mode": mode, "pack_steps": how, "pairs": pairs, "seq_length": seq_length,
            "shared_prefix": shared_prefix, "margin": margin}
    if how == "batch_size":
        per_step = int(batch_size) * int(num_shards or 1)
        if len(pairs) < per_step:
            raise ConfigError(f"{files[0]}: {len(pairs)} pair(s), fewer than the {per_step} a step takes "
                              f"(batch_size {batch_size} x {int(num_shards or 1)} data-parallel rank(s))")
        worst = pk.worst_rows(batch_size, int(lengths.max()), seq_length, tnd, spans)
        worst = -(-worst // groups) * groups
        if pack_rows is not None and int(pack_rows) < worst:
            raise ConfigError(f"train_dataset.pack_rows {pack_rows} may not hold a step's batch_size {batch_size} "
                              f"pairs (the longest takes {int(lengths.max())} of a row's {seq_length} tokens): up to "
                              f"{worst} rows; raise pack_rows or leave it unset, or lower batch_size")
        pack_rows = worst if pack_rows is None else pack_rows  # enough rows for any batch_size pairs of this data
    elif pack_rows is None:
        pack_rows = max(1, 2 * int(batch_size) * int(data_length) // seq_length)
        if ascend_row_groups:  # whole FlashAttention calls, each of at most tnd_rows_per_call rows
            pack_rows = min(-(-pack_rows // groups), pk.tnd_rows_per_call(seq_length)) * groups
    if ascend_row_groups:  # the resolved value, default or explicit, is what the pipeline feeds FlashAttention
        most = pk.tnd_rows_per_call(seq_length) * groups
        if how == "batch_size" and int(pack_rows) > most:
            raise ConfigError(f"train_dataset.batch_size {batch_size}: a step's pairs may need {int(pack_rows)} rows "
                              f"of {seq_length} tokens, and FlashAttention takes at most {most} a step "
                              f"({pk.tnd_rows_per_call(seq_length)} a call: {pk.MAX_FA_ENTRIES} actual_seq_len "
                              f"entries, {tnd} a row); lower batch_size or raise seq_length")
        pk.check_ascend_pack_rows(int(pack_rows), groups, seq_length)
    if how == "batch_size":
        plan.update(pack_rows=int(pack_rows), n_steps=len(pairs) // per_step,
                    row_counts=pk.row_counts(int(pack_rows), groups), lengths=lengths)
    else:
        steps = pk.plan_steps(lengths, int(pack_rows), seq_length, 0 if seed is None else int(seed),
                              multiple_of=int(num_shards or 1), tnd_entries=tnd, spans_per_pair=spans, names=names)
        plan.update(pack_rows=int(pack_rows), steps=steps, n_steps=len(steps),
                    filler_share=pk.filler_share(lengths, len(steps), int(pack_rows), seq_length))
    if plans is not None:
        plans.keep(key, plan)
    return plan


def packing_plan_check(files, dataset_cfg, num_shards=None) -> dict:
    """The trainer's early check of a packed dataset: reads and plans exactly as the dataset will (same
    fields of the train_dataset config as RewardModelDataset reads), so a bad or too long pair fails before
    training, naming its file and row. Returns {pairs, steps, pack_rows, seq_length, pack_steps} and the
    row_counts a step may take (batch_size) or the filler_share (fill).
    num_shards None: this rank's data-parallel shard count (shard_info)."""
    cfg = dataset_cfg or {}
    loader = cfg.get("data_loader") or {}
    if num_shards is None:
        num_shards = shard_info()[1]
    plan = plan_packed(files, cfg.get("packing"), cfg.get("pack_rows"), cfg.get("seq_length"),
                       cfg.get("loss_type") or pk.SPAN, loader.get("num_samples"), num_shards,
                       cfg.get("seed", 0), int(cfg.get("pad_token_id", 2)), int(cfg.get("batch_size") or 8),
                       cfg.get("ascend_row_groups"), cfg.get("pack_steps"))
    out = {"pairs": len(plan["pairs"]), "steps": plan["n_steps"], "pack_rows": plan["pack_rows"],
           "seq_length": plan["seq_length"], "pack_steps": plan["pack_steps"]}
    if "filler_share" in plan:
        out["filler_share"] = round(float(plan["filler_share"]), 6)
    else:
        out["row_counts"] = plan["row_counts"]
    return out


class PackedBatches:
    """per_batch_map of pack_steps batch_size: the batch_size x ranks pairs MindDataset drew (the padded run's
    shuffled order) -> this rank's batch_size pairs packed into the fewest rows of the plan's row counts that
    hold every rank's pairs (one shape a step on every rank). Logs each row count the first time it is used:
    each is one compiled graph."""

    def __init__(self, plan, loss_type: str, pad_token_id: int, groups: int, group: int,
                 ascend_row_groups: Optional[int] = None):
        self.plan, self.loss_type, self.pad_token_id = plan, loss_type, pad_token_id
        self.groups, self.group, self.ascend_row_groups = groups, group, ascend_row_groups
        self.tnd_entries = pk.tnd_row_entries(plan["seq_length"]) if ascend_row_groups else None
        self.seen = set()
        self.columns = list(MODEL_COLUMNS) + ([MARGIN_COLUMN] if plan["margin"] else []) \
            + ([pk.ACTUAL_SEQ_LEN] if ascend_row_groups else [])

    def pack(self, records, batch_index: int):
        plan, shared = self.plan, self.plan["shared_prefix"]
        pairs = [pk.pair_from_record(record, self.pad_token_id, f"batch {batch_index}: pair {i}")
                 for i, record in enumerate(records)]
        per_rank = len(pairs) // self.groups
        mine = pairs[self.group * per_rank:(self.group + 1) * per_rank]
        lengths = [[p.row_length(shared, self.loss_type) for p in pairs[g * per_rank:(g + 1) * per_rank]]
                   for g in range(self.groups)]
        rows, placements = pk.plan_batch(lengths, plan["seq_length"], plan["row_counts"], self.tnd_entries,
                                         pk.pair_spans(shared))
        if rows not in self.seen:
            self.seen.add(rows)
            _say_on_rank_0(f"packing: a step of {rows} row(s) x {plan['seq_length']} tokens (one compiled shape; "
                           f"first used by batch {batch_index + 1})")
        arrays = pk.pack_step(mine, placements[self.group], rows, plan["seq_length"], self.pad_token_id,
                              self.loss_type, shared, plan["margin"])
        if self.ascend_row_groups:
            arrays[pk.ACTUAL_SEQ_LEN] = pk.actual_seq_len(arrays["attention_mask"], self.tnd_entries,
                                                          row_groups=self.ascend_row_groups)
        return tuple(arrays[name] for name in self.columns)

    def batch_map(self, columns: Sequence[str]):
        """MindSpore matches a per_batch_map's signature to the columns: one for each column count."""
        def records(values):
            return [dict(zip(columns, row)) for row in zip(*values)]

        if MARGIN_COLUMN in columns:
            def with_margin(c_ids, c_mask, r_ids, r_mask, position_id, loss_mask, end_ind, margin, info):
                return self.pack(records((c_ids, c_mask, r_ids, r_mask, position_id, loss_mask, end_ind, margin)),
                                 info.get_batch_num())
            return with_margin

        def plain(c_ids, c_mask, r_ids, r_mask, position_id, loss_mask, end_ind, info):
            return self.pack(records((c_ids, c_mask, r_ids, r_mask, position_id, loss_mask, end_ind)),
                             info.get_batch_num())
        return plain


def create_packed_dataset(files, packing: str, pack_rows: Optional[int], seq_length: Optional[int] = None,
                          loss_type: str = pk.SPAN, shuffle: bool = False, repeat: int = 1,
                          num_samples: Optional[int] = None, shard_id=None, num_shards=None,
                          seed: Optional[int] = None, pad_token_id: int = 2, batch_size: int = 8,
                          ascend_row_groups: Optional[int] = None, pack_steps: Optional[str] = None):
    """Packed steps (docs/packing.md), all pairs read and checked once (plan_packed).
    pack_steps batch_size: MindDataset draws batch_size pairs a rank a step in the padded run's shuffled order
    (every rank reads the global order, batch_size x num_shards a step, and keeps its own batch_size), packed
    into rows of seq_length; pack_rows (default: enough for any batch of this data) caps the rows.
    pack_steps fill: the plan fills pack_rows rows a step by fit; data-parallel ranks split the steps."""
    import mindspore.dataset as ds

    plan = plan_packed(files, packing, pack_rows, seq_length, loss_type, num_samples, num_shards, seed,
                       pad_token_id, batch_size, ascend_row_groups, pack_steps)
    pairs, pack_rows, seq_length = plan["pairs"], plan["pack_rows"], plan["seq_length"]
    ranks = int(num_shards or 1)
    if plan["pack_steps"] == "batch_size":
        _say_on_rank_0(f"packing {plan['mode']} ({loss_type}): {len(pairs)} pairs -> {plan['n_steps']} steps of "
                       f"{batch_size} pairs a rank x {ranks} rank(s), rows of {seq_length} tokens, "
                       f"{plan['row_counts']} rows a step (one compiled shape each)")
        files = resolve_mindrecord_files(files)
        if seed is not None:
            ds.config.set_seed(int(seed))
        columns = record_columns(files)
        source = PackedBatches(plan, loss_type, pad_token_id, ranks, int(shard_id or 0), ascend_row_groups)
        kwargs = {"num_samples": int(num_samples)} if num_samples else {}
        dataset = ds.MindDataset(files, columns_list=columns, shuffle=shuffle, num_parallel_workers=1, **kwargs)
        dataset = dataset.batch(int(batch_size) * ranks, drop_remainder=True, input_columns=columns,
                                output_columns=source.columns, per_batch_map=source.batch_map(columns))
        dataset = dataset.project(source.columns)
    else:
        steps = plan["steps"]
        _say_on_rank_0(f"packing {plan['mode']} ({loss_type}, pack_steps fill): {len(pairs)} pairs -> {len(steps)} "
                       f"steps of {pack_rows} rows x {seq_length} tokens ({len(steps) // ranks} per rank), filler "
                       f"share {plan['filler_share']:.1%}")
        if seed is not None:
            ds.config.set_seed(int(seed))
        source = PackedSteps(pairs, steps, pack_rows, seq_length, pad_token_id, loss_type, plan["shared_prefix"],
                             plan["margin"], ascend_row_groups)
        kwargs = {"num_shards": int(num_shards), "shard_id": int(shard_id)} if num_shards else {}
        dataset = ds.GeneratorDataset(source, column_names=source.columns, shuffle=bool(shuffle),
                                      python_multiprocessing=False, num_parallel_workers=1, **kwargs)
    if repeat and repeat > 1:
        dataset = dataset.repeat(repeat)
    return dataset


def create_reward_dataset(files, batch_size: int, shuffle: bool = False, drop_remainder: bool = True,
                          repeat: int = 1, num_samples: Optional[int] = None, bucket_boundaries=None,
                          num_parallel_workers: int = 1, shard_id=None, num_shards=None, seed: Optional[int] = None,
                          pad_token_id: int = 2, packing=None, pack_rows: Optional[int] = None,
                          loss_type: Optional[str] = None, seq_length: Optional[int] = None,
                          ascend_row_groups: Optional[int] = None, pack_steps: Optional[str] = None):
    """The dataset pipeline without the registry: what both training and evaluation use.

    Padded files are batched then trimmed; compact files (see mindrlhf.data.records.COMPACT_SCHEMA) are padded
    per batch. Both give the same batches. With packing (pairs | shared_prefix) the steps are packed instead:
    pack_rows rows of seq_length (default the data's) tokens (default: the padded step's token count).
    """
    import mindspore.dataset as ds

    if pk.packing_mode(packing, "packing"):
        if bucket_boundaries:
            raise ConfigError(f"packing ({packing}) and bucket_boundaries ({bucket_boundaries}) do not go together: "
                              "packed steps have one shape; set bucket_boundaries: []")
        return create_packed_dataset(files, packing, pack_rows, seq_length, loss_type or pk.SPAN, shuffle, repeat,
                                     num_samples, shard_id, num_shards, seed, pad_token_id, batch_size,
                                     ascend_row_groups, pack_steps)
    files = resolve_mindrecord_files(files)
    check_pad_rule(files, pad_token_id, num_samples)
    bucket_boundaries = boundaries_for(bucket_boundaries, files, batch_size, log=_say_on_rank_0) or None
    if seed is not None:
        ds.config.set_seed(seed)
    kwargs = {}
    if num_shards:
        kwargs.update(num_shards=num_shards, shard_id=shard_id)
    if num_samples:
        kwargs["num_samples"] = int(num_samples)
    columns = record_columns(files)
    model_columns = list(MODEL_COLUMNS) + ([MARGIN_COLUMN] if MARGIN_COLUMN in columns else [])
    dataset = ds.MindDataset(files, columns_list=columns, shuffle=shuffle,
                             num_parallel_workers=num_parallel_workers, **kwargs)
    compact_length = compact_seq_length(files)
    if compact_length:
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, input_columns=columns,
                                output_columns=model_columns, num_parallel_workers=num_parallel_workers,
                                per_batch_map=make_compact_batch_map(compact_length, pad_token_id,
                                                                     bucket_boundaries, MARGIN_COLUMN in columns))
    else:
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
        dataset = dataset.map(make_batch_map(bucket_boundaries), input_columns=columns,
                              output_columns=model_columns, num_parallel_workers=num_parallel_workers)
    dataset = dataset.project(model_columns)
    if repeat and repeat > 1:
        dataset = dataset.repeat(repeat)
    return dataset


@MindFormerRegister.register(MindFormerModuleType.DATASET)
class RewardModelDataset(BaseDataset):
    """YAML entry point. dataset_config fields (all optional but data_loader.dataset_dir/dataset_files):

    data_loader.{dataset_dir|dataset_files, shuffle, num_samples}, batch_size, drop_remainder, repeat,
    num_parallel_workers, seed, bucket_boundaries (list of lengths; empty = fixed length; "auto" = the ones
    conversion suggested for these files); packing (false | pairs | shared_prefix), pack_rows, pack_steps
    (batch_size | fill), loss_type and seq_length (the trainer copies packing, loss_type, seq_length and
    pad_token_id from model_config).
    """

    def __new__(cls, dataset_config: Optional[dict] = None, data_loader=None, batch_size: int = 8,
                drop_remainder: bool = True, repeat: int = 1, pad_token_id: int = 2, seed: int = 0,
                num_parallel_workers: int = 1, bucket_boundaries=None, **kwargs):
        dataset_config = copy.deepcopy(cls.check_dataset_config(dataset_config, locals()))
        loader = dataset_config.data_loader or {}
        source = loader.get("dataset_dir") or loader.get("dataset_files")
        shard_id, num_shards = shard_info()
        return create_reward_dataset(
            source, batch_size=int(dataset_config.batch_size or batch_size),
            shuffle=bool(loader.get("shuffle", False)),
            drop_remainder=bool(dataset_config.get("drop_remainder", True)),
            repeat=int(dataset_config.get("repeat", 1) or 1),
            num_samples=loader.get("num_samples"),
            bucket_boundaries=dataset_config.get("bucket_boundaries"),
            num_parallel_workers=int(dataset_config.get("num_parallel_workers", 1) or 1),
            shard_id=shard_id, num_shards=num_shards, seed=dataset_config.get("seed", seed),
            pad_token_id=int(dataset_config.get("pad_token_id", pad_token_id)),
            packing=dataset_config.get("packing"), pack_rows=dataset_config.get("pack_rows"),
            loss_type=dataset_config.get("loss_type"), seq_length=dataset_config.get("seq_length"),
            ascend_row_groups=dataset_config.get("ascend_row_groups"),
            pack_steps=dataset_config.get("pack_steps"))
