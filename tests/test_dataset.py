"""RewardModelDataset from the YAML registry: (2B, S) batches, chosen rows then rejected, per-rank shards."""
import numpy as np
import pytest
from mindspore.mindrecord import FileReader

import mindrlhf.training.registry  # noqa: F401
from mindrlhf.data.dataset import create_reward_dataset
from mindrlhf.training.config import load_config

from conftest import TINY_CONFIG


def records(path):
    reader = FileReader(str(path), num_consumer=1)
    rows = list(reader.get_next())
    reader.close()
    return rows


def test_registry_built_dataset_shapes_and_order(test_mindrecord):
    from mindformers.dataset import build_dataset

    config = load_config(str(TINY_CONFIG))
    config.train_dataset.data_loader.dataset_dir = str(test_mindrecord)
    config.train_dataset.data_loader.shuffle = False
    config.train_dataset.batch_size = 4
    config.train_dataset_task.dataset_config = config.train_dataset  # what the Trainer does
    dataset = build_dataset(config.train_dataset_task)
    assert dataset.get_col_names() == ["input_ids", "position_id", "attention_mask", "loss_mask", "end_ind"]
    assert dataset.get_dataset_size() == 773 // 4
    batch = next(dataset.create_dict_iterator(output_numpy=True))
    rows = records(test_mindrecord)[:4]
    assert batch["input_ids"].shape == (8, 256) and batch["position_id"].shape == (8, 256)
    assert batch["attention_mask"].shape == (8, 256) and batch["loss_mask"].shape == (4, 256)
    assert batch["end_ind"].shape == (8,)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(batch["input_ids"][i], row["chosen_input_ids"])
        np.testing.assert_array_equal(batch["input_ids"][4 + i], row["rejected_input_ids"])
        np.testing.assert_array_equal(batch["loss_mask"][i], row["loss_mask"])
        assert batch["end_ind"][i] == row["chosen_attention_mask"].sum()
        assert batch["end_ind"][4 + i] == row["rejected_attention_mask"].sum()
        assert max(batch["end_ind"][i], batch["end_ind"][4 + i]) == row["end_ind"]


def test_directory_and_list_sources(test_mindrecord):
    by_dir = create_reward_dataset(str(test_mindrecord.parent), 8, drop_remainder=False)
    by_list = create_reward_dataset([str(test_mindrecord)], 8, drop_remainder=False)
    assert by_dir.get_dataset_size() == by_list.get_dataset_size() == 97  # ceil(773 / 8): no pair dropped


def test_each_rank_reads_its_own_half(test_mindrecord):
    def pair_key(chosen, rejected):
        return tuple(chosen.tolist()), tuple(rejected.tolist())

    seen = []
    for shard in (0, 1):
        ds = create_reward_dataset(str(test_mindrecord), 1, drop_remainder=False, num_shards=2, shard_id=shard)
        seen.append([pair_key(*b["input_ids"]) for b in ds.create_dict_iterator(output_numpy=True)])
    everything = [pair_key(r["chosen_input_ids"], r["rejected_input_ids"]) for r in records(test_mindrecord)]
    # MindSpore's distributed sampler gives both ranks ceil(773 / 2) rows: one row is read twice, none lost.
    assert len(seen[0]) == len(seen[1]) == (len(everything) + 1) // 2
    assert set(seen[0]) | set(seen[1]) == set(everything)
    overlap = len(seen[0]) + len(seen[1]) - len(everything)
    assert overlap == 1


def test_bucketing_trims_each_batch_to_a_boundary(test_mindrecord):
    boundaries = [160, 192, 224]
    ds = create_reward_dataset(str(test_mindrecord), 2, drop_remainder=False, bucket_boundaries=boundaries)
    widths = set()
    for batch in ds.create_dict_iterator(output_numpy=True):
        width = batch["input_ids"].shape[1]
        widths.add(width)
        assert width in boundaries + [256]
        assert batch["end_ind"].max() <= width
        smaller = [b for b in boundaries if b < width]
        assert not smaller or batch["end_ind"].max() > max(smaller)
    assert len(widths) > 1


@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    """The test split converted at seq 256, pad 2 in the compact layout, via the CLI: shared by the tests below,
    which only read it."""
    from conftest import EXAMPLES, TEST_JSONL, TOKENIZER, run_cli

    path = tmp_path_factory.mktemp("compact") / "c.mindrecord"
    run_cli(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", TEST_JSONL, "--dst_file", path,
            "--seq_length", 256, "--pad_token_id", 2, "--layout", "compact")
    return path


def test_compact_layout_gives_identical_batches(test_mindrecord, compact):
    rows = records(compact)
    assert len(rows) == 773 and all(r["seq_length"] == 256 for r in rows)
    assert any(len(r["chosen_input_ids"]) < 256 for r in rows)  # stored unpadded
    for boundaries in (None, [160, 192, 224]):
        padded = create_reward_dataset(str(test_mindrecord), 4, drop_remainder=False, bucket_boundaries=boundaries)
        unpadded = create_reward_dataset(str(compact), 4, drop_remainder=False, bucket_boundaries=boundaries)
        count = 0
        for a, b in zip(padded.create_dict_iterator(output_numpy=True), unpadded.create_dict_iterator(output_numpy=True)):
            for name in a:
                assert a[name].dtype == b[name].dtype, name
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
            count += 1
        assert count == 194


def test_preflight_reads_compact_files(test_mindrecord, compact):
    from mindrlhf.training.config import mindrecord_info

    stats = compact.with_name(compact.name + ".stats.json")
    aside = stats.rename(stats.with_name("aside.json"))  # the layout is read from the file itself
    try:
        info = mindrecord_info([str(compact)])
    finally:
        aside.rename(stats)
    assert info["seq_length"] == 256 and info["rows"] == 773
    assert info == {**mindrecord_info([str(test_mindrecord)]), "pad_token_id": info["pad_token_id"]}


@pytest.mark.slow
def test_training_runs_on_compact_files(compact, tmp_path):
    from mindrlhf.tools.loss_log import parse_log

    from conftest import EXAMPLES, run_cli

    out = tmp_path / "output"
    run_cli(EXAMPLES / "reward_train.py", "--config", TINY_CONFIG, "--train_dataset", compact, "--output_dir", out,
            "--stop_step", 6)
    points = parse_log(out / "log" / "rank_0" / "info.log")
    assert [p.step for p in points] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(p.loss) for p in points)
