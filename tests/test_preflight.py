"""Mismatches between data and model are caught before training starts, with a clear message.

reward_train.py runs as a real subprocess for one data check (the sequence length) and one config check (the
missing section): exit code 2, one line, no traceback, no checkpoint. The other cases take the same path in this
process, without a MindSpore start-up each: config checks through the same main() (they fail in prepare_config,
before any context is built), data checks through the functions train() calls on that config."""

import pytest
import yaml
from mindspore.mindrecord import FileWriter

from mindrlhf.data.records import RECORD_SCHEMA

from conftest import EXAMPLES, TEST_JSONL, TINY_CONFIG, TOKENIZER, run_cli, run_main

TRAIN = EXAMPLES / "reward_train.py"


def convert(tmp_path, name, *args, src=TEST_JSONL):
    dst = tmp_path / f"{name}.mindrecord"
    run_main(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", src, "--dst_file", dst, *args)
    return dst


def refused(tmp_path, data, config=TINY_CONFIG, *extra, real=False):
    out = tmp_path / "output"
    run = run_cli if real else run_main
    proc = run(TRAIN, "--config", config, "--train_dataset", data, "--output_dir", out, *extra, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "checkpoint").exists() or not list((out / "checkpoint").rglob("*.ckpt"))
    return proc.stderr.strip().splitlines()[-1]


def refused_by_data_check(tmp_path, data, config=TINY_CONFIG):
    """What train() checks the data with, on the config prepare_config gives it, in this process (train() would
    build a MindSpore context here first): the message the CLI prints after 'error: '."""
    from mindrlhf.data.dataset import resolve_mindrecord_files
    from mindrlhf.errors import ConfigError
    from mindrlhf.training import config as cfg
    from mindrlhf.training.trainer import prepare_config

    config = prepare_config(str(config), str(data), output_dir=str(tmp_path / "output"))
    files = resolve_mindrecord_files(cfg.dataset_source(config, "train"))
    cfg.data_template_and_margin(config, files)
    with pytest.raises(ConfigError) as err:
        cfg.check_data_against_model(config, files, "train", 1)
    message = f"error: {err.value}"
    assert "\n" not in message and str(data) in message
    return message


def test_sequence_length_mismatch(tmp_path):
    data = convert(tmp_path, "s128", "--seq_length", 128, "--pad_token_id", 2)
    assert "--seq_length 128 but the model's seq_length is 256" in refused(tmp_path, data, real=True)


def test_pad_mismatch(tmp_path):
    data = convert(tmp_path, "pad0", "--seq_length", 256, "--pad_token_id", 0)
    assert "padded with 0 but the model's pad_token_id is 2" in refused_by_data_check(tmp_path, data)


def test_token_ids_beyond_vocabulary(tmp_path):
    data = convert(tmp_path, "ok", "--seq_length", 256, "--pad_token_id", 2)
    raw = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    raw["model"]["model_config"]["vocab_size"] = 1000
    config = tmp_path / "small_vocab.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    assert ">= the model's vocab_size 1000" in refused_by_data_check(tmp_path, data, config)


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.mindrecord"
    writer = FileWriter(str(path), shard_num=1)
    writer.add_schema(RECORD_SCHEMA, "empty")
    writer.commit()
    assert "dataset is empty" in refused_by_data_check(tmp_path, path)


def test_batch_larger_than_data(tmp_path):
    rows = TEST_JSONL.read_text(encoding="utf-8").splitlines()[:3]
    src = tmp_path / "three.jsonl"
    src.write_text("\n".join(rows), encoding="utf-8")
    data = convert(tmp_path, "three", "--seq_length", 256, "--pad_token_id", 2, src=src)
    assert "a step takes 8 pair(s) but each of 1 reader(s) has 3" in refused_by_data_check(tmp_path, data)


def test_missing_sections_are_refused(tmp_path):
    raw = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
    del raw["lr_schedule"]
    config = tmp_path / "no_lr.yaml"
    config.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    data = tmp_path / "unused.mindrecord"
    message = refused(tmp_path, data, config, real=True)
    assert "missing section(s) lr_schedule" in message


@pytest.mark.parametrize("bad", ["missing.yaml", "notyaml.txt"])
def test_bad_config_path(tmp_path, bad):
    message = refused(tmp_path, tmp_path / "x.mindrecord", tmp_path / bad)
    assert "config file" in message


def edited_7b(tmp_path, name, edit):
    from conftest import CONFIG_7B

    raw = yaml.safe_load(CONFIG_7B.read_text(encoding="utf-8"))
    edit(raw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize("name, edit, message", [
    ("buckets_sink", lambda raw: raw["train_dataset"].update(bucket_boundaries=[1024, 2048, 4096]),
     "set sink_size: 1 (one graph per bucket) or bucket_boundaries: []"),
    ("split_batch", lambda raw: raw["parallel"].update(full_batch=False),
     "parallel.full_batch must be True under semi-auto/auto parallel"),
])
def test_parallel_layouts_that_cannot_work_are_refused(tmp_path, name, edit, message):
    """Checked from the 8-NPU YAML itself, before any device is touched (so also on CPU)."""
    config = edited_7b(tmp_path, name, edit)
    assert message in refused(tmp_path, tmp_path / "unused.mindrecord", config)


def test_recompute_on_cpu_is_warned_about():
    """MindFormers' recompute on CPU raises the peak and keeps the stock layers (docs/lora.md): one warning, naming
    the file and key; off, or on Ascend, nothing."""
    from mindrlhf.training.config import cpu_recompute_warning, load_config

    config = load_config(str(TINY_CONFIG))
    assert cpu_recompute_warning(config, "tiny.yaml") is None
    config.recompute_config.recompute = True
    message = cpu_recompute_warning(config, "tiny.yaml")
    assert message.startswith("tiny.yaml: recompute_config.recompute: True on CPU") and "set it to False" in message
    config.context.device_target = "Ascend"
    assert cpu_recompute_warning(config, "tiny.yaml") is None
