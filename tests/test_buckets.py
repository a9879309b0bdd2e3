"""Length buckets: the width lookup shared by training and scoring, and boundaries suggested from the data that
are as good as the best choice found by brute force; conversion prints them."""
import itertools
import json

import numpy as np
import pytest

from conftest import EXAMPLES, TEST_JSONL, TOKENIZER, run_cli
from mindrlhf.data.buckets import batch_maxima, boundaries_for, bucket_length, suggest_buckets
from mindrlhf.errors import ConfigError


def test_bucket_length_is_the_smallest_boundary_that_holds_the_batch():
    assert bucket_length(100, [128, 256], 512) == 128
    assert bucket_length(128, [256, 128], 512) == 128
    assert bucket_length(129, [128, 256], 512) == 256
    assert bucket_length(300, [128, 256], 512) == 512  # past every boundary: seq_length
    assert bucket_length(100, [1024], 512) == 512  # a boundary past seq_length is ignored


def padded_tokens(maxima, boundaries, seq):
    return sum(bucket_length(int(m), boundaries, seq) for m in maxima)


def test_suggestion_is_the_brute_force_optimum():
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(40, 120, 300), rng.integers(150, 260, 500), rng.integers(400, 512, 60)])
    seq, batch, most = 512, 2, 3
    got = suggest_buckets(lengths, seq, batch_pairs=batch, max_buckets=most, min_saving=0.0)
    maxima = batch_maxima(lengths, batch)
    candidates = sorted({min(seq, 32 * -(-int(m) // 32)) for m in maxima} | {seq})
    best = min(padded_tokens(maxima, list(c) + [seq], seq)
               for k in range(most) for c in itertools.combinations([c for c in candidates if c < seq], k))
    assert padded_tokens(maxima, got["bucket_boundaries"], seq) == best
    assert got["bucket_boundaries"][-1] == seq and len(got["bucket_boundaries"]) <= most
    assert got["tokens_vs_fixed"] == round(best / (seq * len(maxima)), 3)
    assert 1.0 <= got["tokens_vs_longest"] < 1.3  # three widths for lengths spread over 40..512


def test_two_length_groups_get_a_boundary_each_and_useless_buckets_are_dropped():
    lengths = [100] * 400 + [500] * 400
    alone = suggest_buckets(lengths, 512, batch_pairs=1)
    assert alone["bucket_boundaries"] == [128, 512]
    # 8 pairs a batch: nearly every batch holds a 500-token pair, so buckets would save almost nothing
    mixed = suggest_buckets(lengths, 512, batch_pairs=8)
    assert mixed["bucket_boundaries"] == [] and mixed["tokens_vs_fixed"] > 0.95
    assert suggest_buckets([10, 20], 64, batch_pairs=8) is None  # fewer pairs than a batch


def test_conversion_prints_and_records_a_suggestion(tmp_path):
    dst = tmp_path / "test_1024.mindrecord"
    proc = run_cli(EXAMPLES / "cvalues_comparison.py", "--model", TOKENIZER, "--src_file", TEST_JSONL,
                   "--dst_file", dst, "--seq_length", 1024, "--batch_size", 4)
    recorded = json.loads(dst.with_name(dst.name + ".stats.json").read_text())["buckets"]
    assert recorded["batch_pairs"] == 4
    boundaries = recorded["bucket_boundaries"]
    assert boundaries and boundaries[-1] == 1024 and recorded["tokens_vs_fixed"] < 0.6
    assert f"suggested train_dataset.bucket_boundaries for 4 pairs a batch: {boundaries}" in proc.stdout

    # bucket_boundaries: auto (the tiny CPU YAMLs) trains on exactly that suggestion
    import mindrlhf.training.registry  # noqa: F401
    from mindrlhf.data.dataset import create_reward_dataset

    said = []
    assert boundaries_for("auto", [str(dst)], 4, log=said.append) == boundaries
    assert said == [f"bucket_boundaries: auto -> {boundaries}, as conversion suggested for {dst.name}"]
    widths = set()
    for batch in create_reward_dataset(str(dst), 4, bucket_boundaries="auto").create_dict_iterator(output_numpy=True):
        width = batch["input_ids"].shape[1]
        assert width == bucket_length(int(batch["end_ind"].max()), boundaries, 1024)
        widths.add(width)
    assert widths <= set(boundaries) and len(widths) > 1


def test_auto_boundaries_without_a_usable_suggestion(tmp_path):
    said = []
    assert boundaries_for([256, 128], [], 8) == [128, 256] and boundaries_for(None, [], 8) == []
    missing = str(tmp_path / "old.mindrecord")
    assert boundaries_for("auto", [missing], 8, log=said.append) == []
    assert "old.mindrecord.stats.json holds no suggestion" in said[-1]
    for name, buckets in (("a", [128, 512]), ("b", [256, 512])):
        (tmp_path / f"{name}.mindrecord.stats.json").write_text(
            json.dumps({"buckets": {"batch_pairs": 8, "bucket_boundaries": buckets}}))
    files = [str(tmp_path / "a.mindrecord"), str(tmp_path / "b.mindrecord")]
    assert boundaries_for("AUTO", files, 8, log=said.append) == [] and "suggestions differ" in said[-1]
    assert boundaries_for("auto", files[:1], 4, log=said.append) == [128, 512]
    assert "computed for 8 pairs a batch, this run takes 4" in said[-1]
    with pytest.raises(ConfigError, match="expected a list of lengths"):
        boundaries_for("fixed", files, 8)
