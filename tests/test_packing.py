"""Packing (issue #25): the planner's invariants and filler share, the packed step checked token by token against
the padded 7-field rows it replaces (tokens, positions, score and comparison indices, visibility), and the packed
dataset over a real MindRecord (every pair once an epoch, shards equal and disjoint)."""
import json
import re
from collections import Counter

import numpy as np
import pytest
from mindspore.mindrecord import FileReader

import mindrlhf.training.registry  # noqa: F401
from mindrlhf.data import packing as pk
from mindrlhf.data.convert import convert_file
from mindrlhf.data.dataset import create_reward_dataset, packing_plan_check, read_pairs
from mindrlhf.data.tokenizer import load_tokenizer
from mindrlhf.errors import ConfigError
from mindrlhf.training.config import load_config, set_packing

from conftest import TEST_JSONL, TINY_CONFIG, TOKENIZER

PAD = 2


def records(path):
    reader = FileReader(str(path), num_consumer=1)
    try:
        return list(reader.get_next())
    finally:
        reader.close()


def long_tailed_mix(n, seed=0, seq_length=4096):
    """Pair lengths like CValues at 4096: each side's end_ind lognormal around 170 tokens (about 70% of pairs
    under 512 tokens for both sides together), a tail up to half a row; a pair takes 2 x end_ind (span loss)."""
    rng = np.random.default_rng(seed)
    return 2 * np.clip(rng.lognormal(np.log(170), 0.9, n), 16, seq_length // 2).astype(np.int64)


# ---------------------------------------------------------------------------------------------------- layout codes

def test_visible_is_the_rule_of_the_design():
    # row: [span 1: prefix a b | chosen c pad | rejected d e] [span 2: plain x y] [filler filler]
    codes = np.array([pk.code(1), pk.code(1), pk.code(1, pk.KIND_CHOSEN), pk.code(1, pk.KIND_CHOSEN | pk.PAD),
                      pk.code(1, pk.KIND_REJECTED), pk.code(1, pk.KIND_REJECTED), pk.code(2), pk.code(2), 0, 0])
    vis = pk.visible(codes)
    expected = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2], 4: [0, 1, 4], 5: [0, 1, 4, 5], 6: [6], 7: [6, 7],
                8: [8], 9: [9]}
    for query, keys in expected.items():
        assert np.flatnonzero(vis[query]).tolist() == keys, query
    assert pk.segment_of(codes).tolist() == [1, 1, 1, 1, 1, 1, 2, 2, 0, 0]
    assert pk.kind_of(codes)[3] == pk.KIND_CHOSEN | pk.PAD


# ---------------------------------------------------------------------------------------------------- planner

@pytest.mark.parametrize("rows,multiple_of", [(1, 1), (3, 1), (4, 2), (2, 3)])
def test_plan_places_every_pair_once_within_rows(rows, multiple_of):
    rng = np.random.default_rng(rows)
    lengths = rng.integers(2, 65, size=300)
    steps = pk.plan_steps(lengths, rows, 64, seed=7, multiple_of=multiple_of)
    assert len(steps) % multiple_of == 0
    placed = [i for step in steps for _, i in step]
    assert sorted(placed) == list(range(300))
    for step in steps:
        assert step, "no empty step"
        fill = Counter()
        for row, i in step:
            assert 0 <= row < rows
            fill[row] += lengths[i]
        assert max(fill.values()) <= 64
        assert [r for r, _ in step] == sorted(r for r, _ in step)  # row order
    assert steps == pk.plan_steps(lengths, rows, 64, seed=7, multiple_of=multiple_of)
    assert steps != pk.plan_steps(lengths, rows, 64, seed=8, multiple_of=multiple_of)
    assert len(steps) >= -(-int(lengths.sum()) // (64 * rows))


def test_plan_keeps_the_order_shuffled():
    """The long pairs are not all at the start or the end of the epoch (as a global sort would put them)."""
    lengths = long_tailed_mix(2000)
    steps = pk.plan_steps(lengths, 2, 4096, seed=0)
    mean_len = np.array([np.mean([lengths[i] for _, i in step]) for step in steps])
    half = len(steps) // 2
    assert abs(mean_len[:half].mean() - mean_len[half:].mean()) < 0.25 * mean_len.mean()
    first_index = np.array([min(i for _, i in step) for step in steps])
    assert abs(np.corrcoef(np.arange(len(steps)), first_index)[0, 1]) < 0.3  # not in file order either


def test_filler_share_on_a_long_tailed_mix():
    lengths = long_tailed_mix(2000)
    assert np.mean(lengths < 512) > 0.6 and lengths.max() == 4096
    shares = {}
    for rows in (2, 4, 16):
        steps = pk.plan_steps(lengths, rows, 4096, seed=0)
        n_rows = sum(len({r for r, _ in step}) for step in steps)
        shares[rows] = (pk.filler_share(lengths, len(steps), rows, 4096), 1.0 - lengths.sum() / (n_rows * 4096))
        print(f"rows {rows}: {len(steps)} steps, filler share {shares[rows][0]:.2%} of all computed tokens, "
              f"{shares[rows][1]:.2%} inside the used rows")
        assert shares[rows][1] < 0.02  # the rows themselves are packed tight
    assert shares[2][0] < 0.05  # pack_rows 2: 7B's default (batch_size 1) at seq 4096
    # rows 16 x 4096 takes ~190 of these pairs a step: 2000 pairs need 15.06 steps' worth of rows, so the 16th
    # step is mostly empty rows; the share inside the rows stays tight (checked above)


def test_a_pair_longer_than_a_row_is_refused_by_name():
    short = pk.Pair(np.arange(3, 13, dtype=np.int32), np.arange(3, 11, dtype=np.int32), 8, 10)
    long = pk.Pair(np.arange(3, 43, dtype=np.int32), np.arange(3, 39, dtype=np.int32) + 1, 0, 40)
    prefixed = pk.Pair(np.arange(3, 43, dtype=np.int32), np.r_[np.arange(3, 38), 99].astype(np.int32), 35, 40)
    with pytest.raises(ConfigError, match=r"pair 1 \(chosen 40 tokens, rejected 36, end_ind 40, divergence 0\) "
                                          r"needs 80 tokens in one row, more than seq_length 64"):
        pk.pair_row_lengths([short, long], 64, shared_prefix=False)
    with pytest.raises(ConfigError, match="seq_length >= 80.*or model.model_config.packing: shared_prefix"):
        pk.pair_row_lengths([short, prefixed], 64, shared_prefix=False)
    assert pk.pair_row_lengths([short, prefixed], 64, shared_prefix=True).tolist() == [12, 45]
    assert pk.pair_row_lengths([short, long], 128, False, pk.LAST_TOKEN).tolist() == [18, 76]
    with pytest.raises(ConfigError, match="pair 1 needs 80 tokens in one row, more than seq_length 64"):
        pk.plan_steps([20, 80], 2, 64)


def test_errors_name_the_pairs_file_and_row():
    long = pk.Pair(np.arange(3, 43, dtype=np.int32), np.arange(3, 39, dtype=np.int32) + 1, 0, 40,
                   where="data/train.mindrecord: row 7")
    with pytest.raises(ConfigError, match=r"^data/train.mindrecord: row 7 \(chosen 40 tokens"):
        pk.pair_row_lengths([long], 64, shared_prefix=False)
    with pytest.raises(ConfigError, match=r"^b.mindrecord: row 1 needs 80 tokens in one row"):
        pk.plan_steps([20, 80], 2, 64, names=["a.mindrecord: row 0", "b.mindrecord: row 1"])


def assert_tnd_lists(asl, rows_per_call, seq_length):
    """FlashAttentionScore's TND rules on each call's flattened list: increasing (no empty block), last entry T,
    at most 1024 entries."""
    for call in asl.reshape(-1, rows_per_call * asl.shape[1]):
        assert len(call) <= 1024 and (np.diff(np.r_[0, call]) > 0).all() and call[-1] == rows_per_call * seq_length


def test_planner_reserve_keeps_every_row_listable():
    """Ascend: actual_seq_len lists tnd_row_entries(S) = 128 blocks a row at S = 4096, the filler split so that
    no block is empty, so a row of k spans needs 128 - k filler tokens. Pairs of 1000 + 990 tokens fill a row
    to 3980 (two pairs, 4 spans, 116 filler tokens: too few) and pairs of 20 + 20 to 204 spans: without the
    reserve neither lists; with it (tnd_entries) every step does, every pair placed once."""
    entries = pk.tnd_row_entries(4096)
    assert entries == 128 and pk.tnd_rows_per_call(4096) == 8 and pk.tnd_row_entries(512) == 32
    for chosen, rejected, match in ((1000, 990, "4 spans and 116 filler tokens.*at least 124"),
                                    (20, 20, "204 spans")):
        pairs = [pk.Pair(np.full(chosen, 5, np.int32), np.full(rejected, 6, np.int32), 0, max(chosen, rejected))
                 for _ in range(300)]
        lengths = pk.pair_row_lengths(pairs, 4096, False, pk.LAST_TOKEN)
        unlimited = pk.plan_steps(lengths, 2, 4096)
        step = pk.pack_step(pairs, unlimited[0], 2, 4096, PAD, pk.LAST_TOKEN)
        with pytest.raises(ValueError, match=match):
            pk.actual_seq_len(step["attention_mask"], entries)
        steps = pk.plan_steps(lengths, 2, 4096, tnd_entries=entries, spans_per_pair=pk.pair_spans(False))
        assert sorted(i for s in steps for _, i in s) == list(range(300))
        for placement in steps:
            codes = pk.pack_step(pairs, placement, 2, 4096, PAD, pk.LAST_TOKEN)["attention_mask"]
            seg = pk.segment_of(codes)
            assert ((seg == 0).sum(1) >= entries - seg.max(1)).all()  # the reserve
            asl = pk.actual_seq_len(codes, entries)
            assert asl.shape == (2, entries)
            assert_tnd_lists(asl, 2, 4096)
    shared = pk.plan_steps(lengths, 2, 4096, tnd_entries=entries, spans_per_pair=pk.pair_spans(True))
    assert max(Counter(r for r, _ in s).most_common(1)[0][1] for s in shared) < entries
    with pytest.raises(ConfigError, match="2 TND entries a row cannot hold one pair"):
        pk.plan_steps(lengths, 2, 4096, tnd_entries=2, spans_per_pair=2)
    with pytest.raises(ConfigError, match=r"pair 1 needs 4000 tokens; on Ascend a row of 4096 holds at most 3970"):
        pk.plan_steps([20, 4000], 2, 4096, tnd_entries=entries)


def test_pack_sequences_keeps_the_reserve():
    entries = pk.tnd_row_entries(4096)
    for seqs in ([np.full(20, 5, np.int32)] * 300, [np.full(2000, 5, np.int32)] * 9 + [np.full(4000, 5, np.int32)]):
        passes = pk.pack_sequences(seqs, 2, 4096 + entries - 1, PAD, tnd_entries=entries)
        assert sorted(i for p in passes for i in p["index"]) == list(range(len(seqs)))
        for p in passes:
            asl = pk.actual_seq_len(p["attention_mask"], entries)
            assert_tnd_lists(asl, 2, 4096 + entries - 1)
    with pytest.raises(ConfigError, match="sequence 0 has 4000 tokens; packing takes 1 to 3969 .*127 filler"):
        pk.pack_sequences([np.full(4000, 5, np.int32)], 2, 4096, PAD, tnd_entries=entries)


def test_pack_sequences_hides_pad_tokens_inside_a_text():
    """A token equal to pad_token_id inside a text gets the pad kind: the padded scorer's mask hides every key
    equal to pad_token_id, so the packed layout hides it too (as a key; as a query it sees its span)."""
    text = np.array([5, PAD, 7, 8, PAD], np.int32)
    (p,) = pk.pack_sequences([np.array([9, 9], np.int32), text], 1, 16, PAD)
    start = int(p["start"][list(p["index"]).index(1)])
    codes = p["attention_mask"][0]
    assert (pk.kind_of(codes[start:start + 5]) == [0, pk.PAD, 0, 0, pk.PAD]).all()
    vis = pk.visible(codes)[start:start + 5, start:start + 5]
    np.testing.assert_array_equal(vis, np.tril(np.ones((5, 5), bool)) & (text != PAD)[None, :])


# ---------------------------------------------------------------------------------------------------- packed steps

def padded_view(row):
    """What the padded path sees of a record: rows, masks, loss span, as stored."""
    c_mask = np.asarray(row["chosen_attention_mask"])
    r_mask = np.asarray(row["rejected_attention_mask"])
    loss = np.flatnonzero(np.asarray(row["loss_mask"]))
    return {"chosen": np.asarray(row["chosen_input_ids"]), "rejected": np.asarray(row["rejected_input_ids"]),
            "c_mask": c_mask, "r_mask": r_mask, "c_len": int(c_mask.sum()), "r_len": int(r_mask.sum()),
            "d": int(loss[0]), "end": int(row["end_ind"])}


def side_maps(view, step, slot, size, shared_prefix, span):
    """Flat index of each padded position t of the chosen and the rejected row, as PACKING.md lays them out,
    found from the pair slot's score indices."""
    c_len, r_len, d, end = view["c_len"], view["r_len"], view["d"], view["end"]
    lc, lr = (end, end) if span else (c_len, r_len)
    score_c, score_r = int(step["end_ind"][2, slot]), int(step["end_ind"][3, slot])
    if shared_prefix:
        start = score_c - (c_len - 1)
        r_answer = start + (end if span else c_len)
        chosen = start + np.arange(lc)
        rejected = np.array([start + t if t < d else r_answer + t - d for t in range(lr)])
    else:
        chosen = score_c - (c_len - 1) + np.arange(lc)
        rejected = score_r - (r_len - 1) + np.arange(lr)
    return chosen, rejected


def check_step_against_padded(step, views, rows, size, shared_prefix, span, margins=None):
    """Every pair of a packed step against its padded rows: tokens and positions at each side's indices, score
    and comparison indices and weights, visibility; every non-filler token is some pair's."""
    ids, pos, codes = step["input_ids"].reshape(-1), step["position_id"].reshape(-1), step["attention_mask"]
    n = len(views)
    vis = [pk.visible(codes[r]) for r in range(rows)]
    covered = np.zeros(rows * size, dtype=bool)
    comparison = 0
    for slot, view in enumerate(views):
        c_len, r_len, d, end = view["c_len"], view["r_len"], view["d"], view["end"]
        maps = side_maps(view, step, slot, size, shared_prefix, span)
        sides = zip(maps, (view["chosen"], view["rejected"]), (view["c_mask"], view["r_mask"]), (c_len, r_len))
        for flat, tokens, mask, length in sides:
            row = int(flat[0]) // size
            assert (flat // size == row).all(), "a pair crosses a row"
            np.testing.assert_array_equal(ids[flat], tokens[:len(flat)])
            np.testing.assert_array_equal(pos[flat], np.arange(len(flat)))
            covered[flat] = True
            cols = flat - row * size
            for t in range(len(flat)):  # the padded row's causal + pad-key visibility, mapped through the packing
                expected = set(cols[:t + 1][mask[:t + 1] == 1].tolist())
                assert set(np.flatnonzero(vis[row][cols[t]]).tolist()) == expected, (slot, t)
            assert pos[flat[length - 1]] == length - 1
        assert step["end_ind"][2, slot] == maps[0][c_len - 1] and step["end_ind"][3, slot] == maps[1][r_len - 1]
        assert step["loss_mask"][1, slot] == pytest.approx(1.0 / n)
        if span:
            cut = slice(comparison, comparison + end - d)
            np.testing.assert_array_equal(step["end_ind"][0, cut], maps[0][d:end])
            np.testing.assert_array_equal(step["end_ind"][1, cut], maps[1][d:end])
            np.testing.assert_allclose(step["loss_mask"][0, cut], 1.0 / ((end - d) * n), rtol=1e-6)
            if margins is not None:
                np.testing.assert_array_equal(step["margin"][0, cut], np.float32(margins[slot]))
            comparison += end - d
        if margins is not None:
            assert step["margin"][1, slot] == np.float32(margins[slot])
    slots = rows * size // 2
    assert step["loss_mask"].shape == (2, slots) and step["end_ind"].shape == (4, slots)
    assert not step["loss_mask"][1, n:].any() and not step["end_ind"][2:, n:].any()
    assert not step["end_ind"][:2, (comparison if span else 0):].any()
    assert not step["loss_mask"][0, comparison:].any()
    assert step["loss_mask"][0].sum() == pytest.approx(1.0 if span else 0.0, rel=1e-5)
    filler = ~covered
    assert (codes.reshape(-1)[filler] == 0).all() and (ids[filler] == PAD).all() and (pos[filler] == 0).all()
    assert (codes.reshape(-1)[covered] > 0).all()


@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("loss_type", [pk.SPAN, pk.LAST_TOKEN])
def test_packed_steps_equal_the_padded_rows(test_mindrecord, shared_prefix, loss_type):
    rows_of_file = records(test_mindrecord)[:60]
    pairs = [pk.pair_from_record(r, PAD) for r in rows_of_file]
    rows, size = 3, 1024  # rows may be longer than the data's 256
    lengths = pk.pair_row_lengths(pairs, size, shared_prefix, loss_type)
    steps = pk.plan_steps(lengths, rows, size, seed=1)
    assert sum(len(s) for s in steps) == 60
    assert max(len(s) for s in steps) > rows  # several pairs share rows
    for placement in steps[:4]:
        step = pk.pack_step(pairs, placement, rows, size, PAD, loss_type, shared_prefix)
        assert set(step) == {"input_ids", "position_id", "attention_mask", "loss_mask", "end_ind"}
        assert all(step[k].shape == (rows, size) and step[k].dtype == np.int32
                   for k in ("input_ids", "position_id", "attention_mask"))
        assert step["loss_mask"].dtype == np.float32 and step["end_ind"].dtype == np.int32
        views = [padded_view(rows_of_file[i]) for _, i in placement]
        check_step_against_padded(step, views, rows, size, shared_prefix, loss_type == pk.SPAN)


def test_shared_prefix_shares_the_prefix(test_mindrecord):
    rows_of_file = records(test_mindrecord)[:20]
    pairs = [pk.pair_from_record(r, PAD) for r in rows_of_file]
    step = pk.pack_step(pairs, [(0, 0)], 1, 512, PAD, pk.SPAN, shared_prefix=True)
    pair = pairs[0]
    d, end = pair.divergence, pair.end
    codes = step["attention_mask"][0]
    assert (pk.segment_of(codes[:2 * end - d]) == 1).all() and not codes[2 * end - d:].any()
    assert (pk.kind_of(codes[:d]) == 0).all()
    assert (pk.kind_of(codes[d:end]) & 3 == pk.KIND_CHOSEN).all()
    assert (pk.kind_of(codes[end:2 * end - d]) & 3 == pk.KIND_REJECTED).all()
    np.testing.assert_array_equal(step["position_id"][0, end:2 * end - d], np.arange(d, end))


@pytest.mark.parametrize("layout", ["padded", "compact"])
def test_margins_and_layouts(tmp_path, layout, test_mindrecord):
    """Pairs read from a compact file equal those of the padded one; margins stay with their pairs."""
    lines = TEST_JSONL.read_text(encoding="utf-8").splitlines()[:24]
    margins = [round(0.25 * i - 2, 2) for i in range(24)]
    src = tmp_path / "m.jsonl"
    src.write_text("".join(json.dumps(dict(json.loads(l), margin=m), ensure_ascii=False) + "\n"
                           for l, m in zip(lines, margins)), encoding="utf-8")
    dst = tmp_path / "m.mindrecord"
    convert_file(str(src), load_tokenizer(str(TOKENIZER)), str(dst), 256, 2, progress=False, layout=layout)
    pairs, with_margin, width = read_pairs([str(dst)], PAD)
    assert with_margin and width == 256 and [p.margin for p in pairs] == pytest.approx(margins)
    reference = [pk.pair_from_record(r, PAD) for r in records(test_mindrecord)[:24]]
    for got, want in zip(pairs, reference):
        np.testing.assert_array_equal(got.chosen, want.chosen)
        np.testing.assert_array_equal(got.rejected, want.rejected)
        assert (got.divergence, got.end) == (want.divergence, want.end)
    placement = pk.plan_steps(pk.pair_row_lengths(pairs, 512, False), 4, 512, seed=0)[0]
    step = pk.pack_step(pairs, placement, 4, 512, PAD, pk.SPAN, False, margin=True)
    views = [padded_view(records(test_mindrecord)[i]) for _, i in placement]
    check_step_against_padded(step, views, 4, 512, False, True, margins=[margins[i] for _, i in placement])
    dataset = create_reward_dataset(str(dst), 2, packing="pairs", seq_length=512)
    batch = next(dataset.create_dict_iterator(output_numpy=True))
    assert list(batch) == ["input_ids", "position_id", "attention_mask", "loss_mask", "end_ind", "margin"]
    assert batch["margin"].shape == (2, 2 * 512 // 2)  # default rows: the padded step's 2 x 2 x 256 tokens


def test_record_checks_name_the_row():
    row = {"chosen_input_ids": np.array([5, 6, 7, 2]), "chosen_attention_mask": np.array([1, 1, 1, 0]),
           "rejected_input_ids": np.array([5, 6, 8, 9]), "rejected_attention_mask": np.array([1, 1, 1, 1]),
           "loss_mask": np.array([0, 0, 1, 1]), "end_ind": 4}
    pair = pk.pair_from_record(row, PAD)
    assert (pair.divergence, pair.end, pair.margin) == (2, 4, None)
    with pytest.raises(Exception, match=r"f.mindrecord: row 3: field 'loss_mask'.*\[2, 4\).*pad_token_id 0"):
        pk.pair_from_record(dict(row, loss_mask=np.array([0, 1, 1, 1])), 0, where="f.mindrecord: row 3")
    with pytest.raises(Exception, match="field 'end_ind': 3, but the attention masks give 4"):
        pk.pair_from_record(dict(row, end_ind=3), PAD)


# ---------------------------------------------------------------------------------------------------- scoring

def test_pack_sequences_for_scoring():
    rng = np.random.default_rng(3)
    seqs = [rng.integers(3, 100, size=int(n)).astype(np.int32) for n in rng.integers(1, 33, size=40)]
    passes = pk.pack_sequences(seqs, 2, 32, pad_token_id=PAD)
    assert sorted(i for p in passes for i in p["index"]) == list(range(40))
    assert len(passes) <= -(-sum(map(len, seqs)) // 64) + 2
    for p in passes:
        assert p["input_ids"].shape == p["position_id"].shape == p["attention_mask"].shape == (2, 32)
        assert p["end_ind"].shape == (32,)
        flat_ids, flat_pos = p["input_ids"].reshape(-1), p["position_id"].reshape(-1)
        for k, (i, start) in enumerate(zip(p["index"], p["start"])):
            n = len(seqs[i])
            assert p["end_ind"][k] == start + n - 1 and start // 32 == (start + n - 1) // 32
            np.testing.assert_array_equal(flat_ids[start:start + n], seqs[i])
            np.testing.assert_array_equal(flat_pos[start:start + n], np.arange(n))
            row, col = divmod(int(start), 32)
            vis = pk.visible(p["attention_mask"][row])[col:col + n]
            expected = np.zeros((n, 32), bool)
            expected[:, col:col + n] = np.tril(np.ones((n, n), bool))
            np.testing.assert_array_equal(vis, expected)
        assert not p["end_ind"][len(p["index"]):].any()
    layout_only = pk.pack_sequences([len(s) for s in seqs], 2, 32)
    assert [p["index"].tolist() for p in layout_only] == [p["index"].tolist() for p in passes]
    with pytest.raises(ConfigError, match="sequence 1 has 33 tokens"):
        pk.pack_sequences([3, 33], 2, 32)


# ---------------------------------------------------------------------------------------------------- dataset

def pair_keys(batch, size):
    """(chosen tokens, rejected tokens) of every pair of a packed pairs-mode step, read from its layout."""
    ids, codes = batch["input_ids"].reshape(-1), batch["attention_mask"].reshape(-1)
    keys = []
    for slot in np.flatnonzero(batch["loss_mask"][1]):
        sides = []
        for end in batch["end_ind"][2:, slot]:
            row = int(end) // size
            same = (np.arange(ids.size) // size == row) & (codes == codes[end])  # its segment's real tokens
            sides.append(tuple(ids[same].tolist()))
        keys.append(tuple(sides))
    return keys


def test_packed_dataset_serves_every_pair_once(test_mindrecord):
    everything = Counter((tuple(p.chosen.tolist()), tuple(p.rejected.tolist()))
                         for p in read_pairs([str(test_mindrecord)], PAD)[0])
    dataset = create_reward_dataset(str(test_mindrecord), 2, shuffle=True, packing="pairs", seq_length=512, seed=5)
    assert dataset.get_col_names() == ["input_ids", "position_id", "attention_mask", "loss_mask", "end_ind"]
    seen, steps = Counter(), 0
    for batch in dataset.create_dict_iterator(output_numpy=True, num_epochs=1):
        assert batch["input_ids"].shape == (2, 512) and batch["loss_mask"].shape == (2, 512)
        assert batch["end_ind"].shape == (4, 512) and batch["attention_mask"].dtype == np.int32
        seen.update(pair_keys(batch, 512))
        steps += 1
    assert steps == dataset.get_dataset_size() == len(everything) // 2  # 2 pairs a step, the odd one dropped
    assert max(seen.values()) == 1 and sum(seen.values()) == 2 * steps and not set(seen) - set(everything)

    def epochs(seed, count):
        data = create_reward_dataset(str(test_mindrecord), 2, shuffle=True, packing="pairs", seq_length=512, seed=seed)
        iterator = data.create_dict_iterator(output_numpy=True, num_epochs=count)
        return [[int(b["input_ids"].astype(np.int64).sum()) for b in iterator] for _ in range(count)]

    first, second = epochs(5, 2)
    assert first != second  # reshuffled each epoch, as a padded run
    assert epochs(5, 1)[0] == first  # by the seed
    shards = []
    for shard in (0, 1):
        part = create_reward_dataset(str(test_mindrecord), 2, shuffle=True, packing="pairs", seq_length=512, seed=5,
                                     num_shards=2, shard_id=shard)
        keys = Counter()
        for batch in part.create_dict_iterator(output_numpy=True, num_epochs=1):
            keys.update(pair_keys(batch, 512))
        shards.append((part.get_dataset_size(), keys))
    assert shards[0][0] == shards[1][0] == len(everything) // 4
    assert not set(shards[0][1]) & set(shards[1][1])
    both = shards[0][1] + shards[1][1]
    assert max(both.values()) == 1 and sum(both.values()) == 4 * shards[0][0] and not set(both) - set(everything)


def test_too_long_pairs_and_bad_settings_are_refused(test_mindrecord):
    where = re.escape(f"{test_mindrecord}: row 0 ")
    with pytest.raises(ConfigError, match=where + r"\(chosen \d+ tokens, rejected \d+, end_ind \d+, divergence \d+\) "
                                          r"needs \d+ tokens in one row, more than seq_length 256 .*"
                                          r"model.model_config.seq_length >= 512"):
        create_reward_dataset(str(test_mindrecord), 2, packing="pairs")
    with pytest.raises(ConfigError, match="packing: expected false, pairs or shared_prefix, got 'yes'"):
        create_reward_dataset(str(test_mindrecord), 2, packing="yes")
    with pytest.raises(ConfigError, match="bucket_boundaries"):
        create_reward_dataset(str(test_mindrecord), 2, packing="pairs", bucket_boundaries=[128])


def test_packing_plan_check_plans_as_the_dataset_and_names_the_row(test_mindrecord):
    cfg = {"packing": "pairs", "seq_length": 512, "batch_size": 2, "pad_token_id": PAD, "seed": 0}
    plan = packing_plan_check(str(test_mindrecord), cfg, num_shards=1)
    dataset = create_reward_dataset(str(test_mindrecord), 2, packing="pairs", seq_length=512, pad_token_id=PAD,
                                    seed=0)
    assert plan["steps"] == dataset.get_dataset_size() and plan["pairs"] == len(read_pairs(
        [str(test_mindrecord)], PAD)[0]) and plan["row_counts"] == [1, 2] and plan["pack_rows"] == 2
    fill = packing_plan_check(str(test_mindrecord), dict(cfg, pack_steps="fill"), num_shards=1)
    assert 0 < fill["filler_share"] < 1 and fill["steps"] == create_reward_dataset(
        str(test_mindrecord), 2, packing="pairs", seq_length=512, seed=0, pack_steps="fill").get_dataset_size()
    with pytest.raises(ConfigError, match=re.escape(f"{test_mindrecord}: row 0 (chosen")):
        packing_plan_check(str(test_mindrecord), dict(cfg, seq_length=256), num_shards=1)
    ascend = packing_plan_check(str(test_mindrecord), dict(cfg, seq_length=1024, ascend_row_groups=1), num_shards=1)
    assert ascend["pairs"] == plan["pairs"]
    with pytest.raises(ConfigError, match=re.escape(f"{test_mindrecord}: row 2 needs 512 tokens; on Ascend a row of "
                                                    "512 holds at most 482 with one pair")):  # the TND reserve
        packing_plan_check(str(test_mindrecord), dict(cfg, ascend_row_groups=1), num_shards=1)


def test_trainer_config_copies_packing_to_the_dataset(test_mindrecord):
    from mindformers.dataset import build_dataset

    config = load_config(str(TINY_CONFIG))
    assert set_packing(config, "x.yaml") is None and "packing" not in config.train_dataset
    config.model.model_config.packing = "sideways"
    with pytest.raises(ConfigError, match="x.yaml: model.model_config.packing: expected false, pairs or "
                                          "shared_prefix, got 'sideways'"):
        set_packing(config, "x.yaml")
    config.model.model_config.packing = "shared_prefix"
    config.train_dataset.bucket_boundaries = [64, 128]
    with pytest.raises(ConfigError, match=r"packing: shared_prefix .*train_dataset.bucket_boundaries: \[64, 128\]"):
        set_packing(config, "x.yaml")
    config.train_dataset.bucket_boundaries = "auto"  # the tiny YAMLs' default: nothing to choose, so dropped
    config.model.model_config.loss_type = "last_token"
    config.model.model_config.seq_length = 512
    assert set_packing(config, "x.yaml") == "shared_prefix"
    ds_cfg = config.train_dataset
    assert (ds_cfg.packing, ds_cfg.loss_type, ds_cfg.seq_length, ds_cfg.pad_token_id) == ("shared_prefix",
                                                                                         "last_token", 512, 2)
    assert ds_cfg.bucket_boundaries == []
    ds_cfg.data_loader.dataset_dir = str(test_mindrecord)
    ds_cfg.pack_rows = 3
    config.train_dataset_task.dataset_config = ds_cfg  # what the Trainer does
    with pytest.raises(ConfigError, match="pack_rows 3 may not hold a step's batch_size 8 pairs"):
        build_dataset(config.train_dataset_task)
    ds_cfg.pack_steps = "fill"  # rows filled by fit: pack_rows rows a step
    batch = next(build_dataset(config.train_dataset_task).create_dict_iterator(output_numpy=True))
    assert batch["input_ids"].shape == (3, 512) and batch["end_ind"].shape == (4, 768)
    assert not batch["loss_mask"][0].any()  # last_token: no comparisons
    assert set(pk.kind_of(batch["attention_mask"]).reshape(-1)) <= {0, 1, 2}  # shared_prefix, no pads
    config.model.model_config.packing = False
    assert set_packing(config, "x.yaml") is None


def test_prepare_config_checks_and_copies_packing(test_mindrecord, tmp_path):
    from mindrlhf.training.config import check_data_against_model
    from mindrlhf.training.trainer import prepare_config

    text = TINY_CONFIG.read_text(encoding="utf-8")

    def yaml_with(packing, buckets="[]"):
        path = tmp_path / f"packing_{packing}_{len(buckets)}.yaml"
        path.write_text(text.replace("    seq_length: 256\n", f"    seq_length: 512\n    packing: {packing}\n")
                        .replace("bucket_boundaries: auto ", f"bucket_boundaries: {buckets} "), encoding="utf-8")
        return str(path)

    config = prepare_config(yaml_with("pairs"), str(test_mindrecord), output_dir=str(tmp_path / "out"))
    ds_cfg = config.train_dataset
    assert (ds_cfg.packing, ds_cfg.loss_type, ds_cfg.seq_length, ds_cfg.pad_token_id) == ("pairs", "span", 512, 2)
    info = check_data_against_model(config, [str(test_mindrecord)])  # packed rows may be longer than the data
    assert info["seq_length"] == 256
    plain = prepare_config(yaml_with("false"), str(test_mindrecord), output_dir=str(tmp_path / "out"))
    assert plain.model.model_config.packing is False and not plain.train_dataset.get("packing")
    with pytest.raises(ConfigError, match="converted with --seq_length 256 but the model's seq_length is 512"):
        check_data_against_model(plain, [str(test_mindrecord)])
    bad = yaml_with("everything")
    with pytest.raises(ConfigError, match=f"{bad}: model.model_config.packing: expected false, pairs or "
                                          "shared_prefix, got 'everything'"):
        prepare_config(bad, str(test_mindrecord), output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"model.model_config.packing: pairs .*train_dataset.bucket_boundaries: "
                                          r"\[128, 256\]"):
        prepare_config(yaml_with("pairs", "[128, 256]"), str(test_mindrecord), output_dir=str(tmp_path / "out"))


@pytest.mark.parametrize("where, value", [("runner_config.gradient_accumulation_steps", 2),
                                          ("micro_batch_interleave_num", 2),
                                          ("parallel_config.micro_batch_num", 4)])
def test_packing_refuses_micro_batches(where, value):
    """Micro batches cut every input along its first axis: the packed loss inputs ((2, P), (4, P)) index the
    whole step's rows, so a cut would pair the wrong rewards silently. Refused, naming the key."""
    config = load_config(str(TINY_CONFIG))
    config.model.model_config.packing = "pairs"
    section, _, key = where.rpartition(".")
    (config[section] if section else config)[key] = value
    if key == "micro_batch_num":
        config.parallel_config.pipeline_stage = 2
    with pytest.raises(ConfigError, match=rf"x.yaml: model.model_config.packing: pairs cannot be split into micro "
                                          rf"batches \({where}"):
        set_packing(config, "x.yaml")
    if key == "micro_batch_num":  # without pipeline stages MindFormers does not cut micro batches
        config.parallel_config.pipeline_stage = 1
        assert set_packing(config, "x.yaml") == "pairs"


def test_the_trainers_check_and_the_dataset_read_the_pairs_once(test_mindrecord, monkeypatch):
    """The trainer plans early (packing_plan_check), then MindFormers builds the dataset with the same settings:
    within the run the pairs are read once and both see one plan; another setting plans again; after it, nothing
    is kept."""
    import mindrlhf.data.dataset as dataset_module

    reads = []
    real = dataset_module.read_pairs
    monkeypatch.setattr(dataset_module, "read_pairs", lambda *a, **k: reads.append(a) or real(*a, **k))
    cfg = {"packing": "pairs", "seq_length": 512, "seed": 5, "batch_size": 2, "pad_token_id": 2, "loss_type": "span"}
    with dataset_module.PackingPlans():  # what trainer.train holds open for its run
        checked = dataset_module.packing_plan_check(str(test_mindrecord), cfg)
        dataset = create_reward_dataset(str(test_mindrecord), 2, shuffle=True, packing="pairs", seq_length=512, seed=5)
        assert len(reads) == 1 and dataset.get_dataset_size() == checked["steps"]
        dataset_module.packing_plan_check(str(test_mindrecord), dict(cfg, seed=6))
        assert len(reads) == 2
    dataset_module.packing_plan_check(str(test_mindrecord), dict(cfg, seed=6))  # the run is over: nothing kept
    assert len(reads) == 3
