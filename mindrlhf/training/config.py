"""Loading a run YAML, applying CLI overrides, and checking it before any compute starts.

Every section the Trainer would silently fill with a default (a cosine LR at 5e-5, the stock wrapper that
fails on CPU, ...) must be written out; the data must match the model (sequence length, vocabulary, pad id).
"""
import glob
import json
import os
from typing import Optional


from mindrlhf.errors import ConfigError

REQUIRED_SECTIONS = ("runner_config", "runner_wrapper", "optimizer", "lr_schedule", "parallel", "parallel_config",
                     "context", "callbacks", "model", "train_dataset", "train_dataset_task")


def load_config(path: str):
    """A MindFormerConfig from a YAML path, with a clear error for a missing or unreadable file. Registers our
    YAML types first, so whatever the config builds resolves."""
    import mindrlhf.training.registry  # noqa: F401
    from mindformers import MindFormerConfig

    if not path or not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    if not path.endswith((".yaml", ".yml")):
        raise ConfigError(f"config file '{path}' must be a .yaml/.yml file")
    try:
        config = MindFormerConfig(os.path.realpath(path))
    except Exception as err:  # yaml errors come in many types
        raise ConfigError(f"{path}: cannot parse YAML ({err})") from None
    config.config_path = os.path.realpath(path)
    return config


def check_sections(path: str, required=REQUIRED_SECTIONS):
    """Sections must be in the YAML itself: MindFormerConfig fills some in while loading."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    missing = [name for name in required if not raw.get(name)]
    if missing:
        raise ConfigError(f"{path}: missing section(s) {', '.join(missing)}; MindFormers would fill them with "
                          "silent defaults (e.g. a cosine LR at 5e-5), so every one must be set explicitly")


def check_parallel(config, path: str):
    """Layouts the reward path cannot run correctly, refused with what to set instead."""
    runner, parallel = config.runner_config, config.parallel
    buckets = config.train_dataset.get("bucket_boundaries")
    if buckets and runner.get("sink_mode") and (int(runner.get("sink_size", 1) or 1) > 1
                                                or int(config.parallel_config.get("pipeline_stage", 1) or 1) > 1):
        raise ConfigError(f"{path}: train_dataset.bucket_boundaries changes the batch shape from step to step, "
                          "which data sink with sink_size > 1 (or pipeline stages) cannot take; set sink_size: 1 "
                          "(one graph per bucket) or bucket_boundaries: []")
    if semi_auto(config, path) and parallel.get("full_batch") is False and not parallel.get("dataset_strategy"):
        raise ConfigError(f"{path}: parallel.full_batch must be True under semi-auto/auto parallel: CompareLoss "
                          "pairs the first half of the global batch (chosen) with the second (rejected)")


def parallel_mode(config, path: str) -> str:
    """parallel.parallel_mode as MindSpore's ParallelMode name, read through MindFormers' own table (the integers
    0-3 and the names DATA_PARALLEL, SEMI_AUTO_PARALLEL, ...; MindFormers' validator stores the result back, so
    that form is taken too); anything else a ConfigError."""
    from mindformers.tools.utils import PARALLEL_MODE

    value = (config.get("parallel") or {}).get("parallel_mode", 0)
    if isinstance(value, str) and value in PARALLEL_MODE.values():
        return value
    if isinstance(value, bool) or value not in PARALLEL_MODE:
        names = ", ".join(str(k) for k in PARALLEL_MODE)
        raise ConfigError(f"{path}: parallel.parallel_mode must be one of {names}, got {value!r}")
    return PARALLEL_MODE[value]


def semi_auto(config, path: str) -> bool:
    """Semi-auto or auto parallel under use_parallel: the layouts where full_batch makes every rank read the
    whole global batch and the Trainer takes batch_size x data_parallel pairs a step."""
    from mindspore.context import ParallelMode

    return bool(config.get("use_parallel")) and parallel_mode(config, path) in (ParallelMode.SEMI_AUTO_PARALLEL,
                                                                                 ParallelMode.AUTO_PARALLEL)


def set_packing(config, path: str):
    """model.model_config.packing, checked (false | pairs | shared_prefix), and copied with what the packed
    dataset needs (loss_type, seq_length; pad_token_id always) into train_dataset, the dataset's config: one source of
    truth. Packing replaces length buckets. Returns the mode (None when off)."""
    from mindrlhf.data.packing import packing_mode
    from mindrlhf.model.ascend_packing import on_flash_attention

    model_cfg, dataset_cfg = config.model.model_config, config.train_dataset
    mode = packing_mode(model_cfg.get("packing"), f"{path}: model.model_config.packing")
    if model_cfg.get("packing") is not None:
        model_cfg.packing = mode or False  # "false"/"off" strings become False for the model
    if model_cfg.get("pad_token_id") is not None:  # the dataset checks the pad-id rule with the model's pad id
        dataset_cfg.pad_token_id = int(model_cfg.pad_token_id)
    if not mode:
        return None
    buckets = dataset_cfg.get("bucket_boundaries")
    if isinstance(buckets, str) and buckets.strip().lower() == "auto":
        dataset_cfg.bucket_boundaries = []  # the tiny YAMLs' default: nothing to choose when every step is one shape
        buckets = None
    if buckets:
        raise ConfigError(f"{path}: model.model_config.packing: {mode} packs every step to one shape, which "
                          f"train_dataset.bucket_boundaries: {buckets} would change; set "
                          "train_dataset.bucket_boundaries: [] (or packing: false)")
    rows = dataset_cfg.get("pack_rows")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ConfigError(f"{path}: train_dataset.pack_rows must be a whole number >= 1, got {rows!r}")
    parallel = config.get("parallel_config") or {}
    for key, value in (("runner_config.gradient_accumulation_steps",
                        (config.get("runner_config") or {}).get("gradient_accumulation_steps")),
                       ("micro_batch_interleave_num", config.get("micro_batch_interleave_num")),
                       ("parallel_config.micro_batch_num (with pipeline stages)",
                        parallel.get("micro_batch_num") if int(parallel.get("pipeline_stage", 1) or 1) > 1 else 1)):
        if int(value or 1) > 1:  # they cut every input along its first axis: the (2, P) / (4, P) loss inputs too
            raise ConfigError(f"{path}: model.model_config.packing: {mode} cannot be split into micro batches "
                              f"({key}: {value}): its loss inputs index the whole step's rows; set it to 1 and "
                              "raise train_dataset.pack_rows instead")
    dataset_cfg.packing = mode
    if on_flash_attention(model_cfg):  # Ascend's FlashAttention: the spans go to it as actual_seq_len
        dataset_cfg.ascend_row_groups = ascend_row_groups(config, path)
    dataset_cfg.loss_type = model_cfg.get("loss_type") or "span"
    dataset_cfg.seq_length = int(model_cfg.seq_length)
    return mode


def cpu_recompute_warning(config, path: str) -> Optional[str]:
    """What to tell a CPU run with MindFormers' recompute on (None otherwise): there it raises the peak instead of
    lowering it and keeps MindSpore's stock layers (docs/lora.md measures it). A warning, not an error: the
    numbers are right, only memory and speed suffer, and the 7B YAMLs carry it on for Ascend."""
    recompute = config.get("recompute_config") or {}
    if config.context.get("device_target", "CPU") != "CPU":
        return None
    on = [key for key in ("recompute", "select_recompute") if recompute.get(key)]
    if not on:
        return None
    return (f"{path}: recompute_config.{on[0]}: {recompute.get(on[0])} on CPU raises the peak memory instead of "
            "lowering it (LoRA at Qwen2.5-0.5B's shape, 2 layers, 8 pairs: 4.39 -> 16.5 GB) and turns mindrlhf's "
            "CPU kernels off; set it to False on CPU (on Ascend it saves memory as intended)")


def ascend_row_groups(config, path: str) -> int:
    """Packing on Ascend: the config checked (mindrlhf.model.ascend_packing) and how many FlashAttention calls
    a step's rows are split into, each restarting actual_seq_len's offsets: data_parallel when every rank reads
    the whole batch (semi-auto full_batch; micro batches are refused with packing, see set_packing). Each call
    takes at most tnd_rows_per_call rows."""
    from mindrlhf.data.packing import check_ascend_pack_rows
    from mindrlhf.model.ascend_packing import check_ascend_packing

    parallel = config.get("parallel_config") or {}
    check_ascend_packing(dict(config.model.model_config, parallel_config=parallel))
    groups = 1
    if semi_auto(config, path) and config.parallel.get("full_batch"):
        groups = int(parallel.get("data_parallel", 1) or 1)
    rows = config.train_dataset.get("pack_rows")
    if rows is not None:  # early, with the file named; the dataset checks the resolved value (default too)
        check_ascend_pack_rows(rows, groups, int(config.model.model_config.seq_length),
                               f"{path}: train_dataset.pack_rows")
    return groups


def checkpoint_files(directory: str):
    """All .ckpt files below a checkpoint directory (rank_N/ layout or flat), oldest first.

    Ordered by modification time: names repeat across resumed runs (prefix_1-1_10.ckpt), mtimes do not.
    """
    files = glob.glob(os.path.join(directory, "**", "*.ckpt"), recursive=True)
    return sorted(files, key=lambda f: (os.path.getmtime(f), f))


def mindrecord_info(files, sample_rows: int = 2000) -> dict:
    """seq_length, row count, pad id and max token id of a converted dataset (sidecar stats or a sample)."""
    from mindspore.mindrecord import FileReader

    info = {"rows": 0, "seq_length": None, "pad_token_id": None, "max_token_id": -1}
    for path in files:
        sidecar = path + ".stats.json"
        if os.path.isfile(sidecar):
            with open(sidecar, encoding="utf-8") as fh:
                meta = json.load(fh)
            info["pad_token_id"] = meta.get("pad_token_id", info["pad_token_id"])
            info["max_token_id"] = max(info["max_token_id"], meta.get("max_token_id", -1))
        from mindrlhf.data.dataset import compact_seq_length

        compact = compact_seq_length([path])
        reader = FileReader(path, num_consumer=1, columns=["chosen_input_ids", "rejected_input_ids",
                                                          "chosen_attention_mask", "end_ind"])
        try:
            for i, row in enumerate(reader.get_next()):
                if i >= sample_rows:
                    break
                ids = row["chosen_input_ids"]
                seq = compact or int(ids.shape[0])
                if info["seq_length"] not in (None, seq):
                    raise ConfigError(f"{path}: rows of length {seq} and {info['seq_length']} mixed")
                info["seq_length"] = seq
                info["max_token_id"] = max(info["max_token_id"], int(ids.max()), int(row["rejected_input_ids"].max()))
                real = int(row["chosen_attention_mask"].sum())
                if info["pad_token_id"] is None and real < len(ids):  # compact rows carry no padding
                    info["pad_token_id"] = int(ids[real])
        finally:
            reader.close()
        info["rows"] += _row_count(path)
    return info


def _row_count(path: str) -> int:
    from mindspore.dataset import MindDataset

    return MindDataset(path, columns_list=["end_ind"], shuffle=False).get_dataset_size()


def check_data_against_model(config, files, role: str = "train", rank_size: int = 1):
    """Raise ConfigError for data the model cannot take; returns the data info."""
    model_cfg = config.model.model_config
    info = mindrecord_info(files)
    dataset_cfg = config[f"{role}_dataset"]
    if info["pad_token_id"] is None:  # compact files are padded per batch with the dataset's pad_token_id
        info["pad_token_id"] = dataset_cfg.get("pad_token_id")
    shown = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)"
    if info["rows"] == 0:
        raise ConfigError(f"{shown}: the {role} dataset is empty")
    packed = bool(dataset_cfg.get("packing")) and info["seq_length"] is not None \
        and info["seq_length"] <= model_cfg.seq_length  # packed rows may be longer than the converted pairs
    if info["seq_length"] != model_cfg.seq_length and not packed:
        raise ConfigError(f"{shown}: the data was converted with --seq_length {info['seq_length']} but the model's "
                          f"seq_length is {model_cfg.seq_length}; convert again or set model.model_config.seq_length")
    if info["max_token_id"] >= model_cfg.vocab_size:
        raise ConfigError(f"{shown}: token id {info['max_token_id']} is >= the model's vocab_size "
                          f"{model_cfg.vocab_size}; was it converted with another tokenizer?")
    if info["pad_token_id"] is not None and model_cfg.pad_token_id is not None \
            and info["pad_token_id"] != model_cfg.pad_token_id:
        raise ConfigError(f"{shown}: the data is padded with {info['pad_token_id']} but the model's pad_token_id is "
                          f"{model_cfg.pad_token_id}; use the same --pad_token_id and model.model_config.pad_token_id")
    if dataset_cfg.get("packing"):  # planned now as the dataset will: a pair that cannot pack fails here, named
        from mindrlhf.data.dataset import packing_plan_check

        info["packing"] = packing_plan_check(files, dataset_cfg)
        return info
    batch = int(config.runner_config.batch_size or dataset_cfg.batch_size or 1)
    readers, per_step = max(rank_size, 1), batch
    if rank_size > 1 and semi_auto(config, config.get("config_path", "config")):
        # semi-auto/auto parallel with full_batch: every rank reads all pairs, B x dp of them a step
        readers, per_step = 1, batch * int(config.parallel_config.get("data_parallel", 1) or 1)
    per_rank = info["rows"] // readers
    if dataset_cfg.get("drop_remainder", True) and per_step > per_rank:
        raise ConfigError(f"{shown}: a step takes {per_step} pair(s) but each of {readers} reader(s) has "
                          f"{per_rank}; no step could run")
    return info


def data_template_and_margin(config, files):
    """The data's one template (from the sidecars; None when unknown) and whether it carries margins; with
    margins the network gets them as a sixth input (construct_args_key), which the loss then applies."""
    from mindrlhf.data.dataset import record_columns
    from mindrlhf.data.packing import ACTUAL_SEQ_LEN
    from mindrlhf.data.records import MARGIN_COLUMN, MODEL_COLUMNS
    from mindrlhf.data.templates import data_template

    template = data_template(files)
    margin = MARGIN_COLUMN in record_columns(files)
    keys = list(MODEL_COLUMNS) + ([MARGIN_COLUMN] if margin else []) \
        + ([ACTUAL_SEQ_LEN] if config.train_dataset.get("ascend_row_groups") else [])
    if keys != list(MODEL_COLUMNS):  # the dataset's columns, in order, as the network's keyword arguments
        config.train_dataset.construct_args_key = keys
    return template, margin


def set_dataset(config, role: str, source: Optional[str]):
    if source:
        config[f"{role}_dataset"].data_loader.dataset_dir = source
        config[f"{role}_dataset"].data_loader.pop("dataset_files", None)


def dataset_source(config, role: str):
    loader = config[f"{role}_dataset"].data_loader
    return loader.get("dataset_dir") or loader.get("dataset_files")

