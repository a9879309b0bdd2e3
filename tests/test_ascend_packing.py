"""Packing on Ascend: actual_seq_len from layout codes against FlashAttention's TND semantics (sparse_mode 3),
the config checks, and the TND attention our model builds (no Ascend here: building the cells runs nothing)."""
import numpy as np
import pytest

from mindrlhf.errors import ConfigError
from mindrlhf.data.packing import actual_seq_len, tnd_row_entries, visible
from mindrlhf.model.ascend_packing import check_ascend_packing


def codes_of(row_segments, kinds=None):
    """Per-token segment ids (lists, one per row) -> layout codes segment * 8 + kind."""
    seg = np.array(row_segments, dtype=np.int32)
    return seg * 8 + (0 if kinds is None else np.array(kinds, dtype=np.int32))


def tnd_visible(asl_flat, total):
    """FlashAttention TND, sparse_mode 3 (blocks with S1 = S2): query i sees key j iff j <= i in the same block
    of the cumulative list."""
    block = np.searchsorted(np.asarray(asl_flat), np.arange(total), side="right")
    idx = np.arange(total)
    return (block[:, None] == block[None, :]) & (idx[None, :] <= idx[:, None])


def test_hand_made_rows():
    codes = codes_of([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0],   # two spans, filler in 3 blocks
                      [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],   # one span, filler in 4 blocks
                      [1, 2, 3, 3, 3, 3, 0, 0, 0, 0],   # three spans, filler in 2 blocks
                      [0] * 10])                        # an unused row: filler only, 5 blocks
    got = actual_seq_len(codes, 5)
    assert got.dtype == np.int32 and got.shape == (4, 5)
    np.testing.assert_array_equal(got, [[3, 7, 8, 9, 10],
                                        [16, 17, 18, 19, 20],
                                        [21, 22, 26, 27, 30],
                                        [31, 32, 33, 34, 40]])
    with pytest.raises(ValueError, match="row 0 holds 1 spans and 0 filler tokens.*planner's reserve"):
        actual_seq_len(codes_of([[1] * 10]), 5)


def test_row_groups_restart_offsets_per_flash_attention_call():
    codes = codes_of([[1, 1, 2, 2, 0, 0], [1, 2, 2, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 2, 0, 0, 0, 0]])
    got = actual_seq_len(codes, 3, row_groups=2)  # e.g. data_parallel 2 under full_batch
    np.testing.assert_array_equal(got, [[2, 4, 6], [7, 9, 12], [3, 4, 6], [7, 8, 12]])
    with pytest.raises(ValueError, match="row_groups"):
        actual_seq_len(codes, 3, row_groups=3)


@pytest.mark.parametrize("seed", range(5))
def test_flash_attention_blocks_are_the_packing_layout(seed):
    """Random plain layouts with the planner's reserve: every call's list is increasing with no empty block and
    ends at T, and the attention FlashAttention derives from it is PACKING.md's on every span query; filler
    queries see only filler (never read), and no span sees filler or another span."""
    rng = np.random.default_rng(seed)
    rows, seq, entries = 3, 24, 6
    layout = []
    for _ in range(rows):
        seg, used, k = np.zeros(seq, dtype=np.int32), 0, 0
        while rng.random() < 0.85:
            n = int(rng.integers(1, 8))
            if used + n > seq - (entries - k - 1) or k + 1 >= entries:
                break
            k += 1
            seg[used:used + n] = k
            used += n
        layout.append(seg)
    codes = codes_of(layout)
    asl = actual_seq_len(codes, entries)
    flat = asl.reshape(-1)
    assert (np.diff(np.r_[0, flat]) > 0).all() and flat[-1] == rows * seq
    vis = tnd_visible(flat, rows * seq)
    for r in range(rows):
        block = vis[r * seq:(r + 1) * seq, r * seq:(r + 1) * seq]
        assert not vis[r * seq:(r + 1) * seq].sum() - block.sum(), "a row sees another row"
        want = visible(codes[r])
        span = (codes[r] >> 3) > 0
        np.testing.assert_array_equal(block[span], want[span])
        filler = ~span
        assert not block[np.ix_(filler, span)].any() and not block[np.ix_(span, filler)].any()


@pytest.mark.parametrize("kind, what", [(1, "shared_prefix answer"), (2, "shared_prefix answer"),
                                        (4, "in-span pad")])
def test_refuses_layouts_flash_attention_cannot_express(kind, what):
    kinds = np.zeros((1, 6), dtype=np.int32)
    kinds[0, 4] = kind
    with pytest.raises(ValueError, match=f"row 0, column 4 holds an? {what}"):
        actual_seq_len(codes_of([[1, 1, 1, 1, 1, 0]], kinds), 4)


@pytest.mark.parametrize("row, match", [([1, 1, 0, 2], "filler"), ([2, 2, 1, 1], "numbered"),
                                        ([1, 2, 1, 0], "numbered"), ([1, 1, 3, 3], "numbered")])
def test_refuses_malformed_rows(row, match):
    with pytest.raises(ValueError, match=match):
        actual_seq_len(codes_of([row]), 4)


def test_static_length_limits():
    codes = codes_of([[1, 2, 3, 4, 0, 0]])
    with pytest.raises(ValueError, match="4 spans and 2 filler tokens; its 4 actual_seq_len entries"):
        actual_seq_len(codes, 4)
    np.testing.assert_array_equal(actual_seq_len(codes, 6), [[1, 2, 3, 4, 5, 6]])
    with pytest.raises(ValueError, match="1024"):
        actual_seq_len(np.zeros((9, 256), np.int32), tnd_row_entries(2048))  # 9 x 128 in one call
    assert actual_seq_len(np.zeros((9, 256), np.int32), 128, row_groups=3).shape == (9, 128)


GOOD = dict(packing="pairs", loss_type="last_token", use_flash_attention=True, seq_length=512,
            parallel_config=dict(data_parallel=2, model_parallel=4, context_parallel=1, seq_split_num=1))


def test_accepts_the_supported_config_and_ignores_no_packing():
    check_ascend_packing(GOOD)
    check_ascend_packing({"packing": False})
    check_ascend_packing({})
    check_ascend_packing({**GOOD, "loss_type": "span"}, training=False)  # scoring packs plain spans, no pads
    with pytest.raises(ConfigError, match="shared_prefix"):
        check_ascend_packing({**GOOD, "packing": "shared_prefix"}, training=False)


@pytest.mark.parametrize("change, match", [
    (dict(packing="shared_prefix"), "shared_prefix cannot run on Ascend"),
    (dict(packing="yes"), "packing: expected false, pairs or shared_prefix"),
    (dict(loss_type=None), "loss_type: last_token"),
    (dict(loss_type="span"), "loss_type: last_token"),
    (dict(use_flash_attention=False), "use_flash_attention: True"),
    (dict(use_eod_attn_mask_compression=True), "use_eod_attn_mask_compression: False.*sparse_mode 8"),
    (dict(use_ring_attention=True), "use_ring_attention: False"),
    (dict(use_past=True), "use_past: False"),
    (dict(parallel_config=dict(context_parallel=2)), "context_parallel: 1"),
    (dict(parallel_config=dict(seq_split_num=2)), "seq_split_num: 1"),
])
def test_refuses_configs_that_cannot_pack(change, match):
    with pytest.raises(ConfigError, match=match):
        check_ascend_packing({**GOOD, **change})


def test_accepted_config_builds_tnd_flash_attention():
    """What check_ascend_packing accepts, use_tnd_attention rebuilds on MindFormers' LlamaModel: every layer's
    FlashAttention TND with sparse_mode 3, next_tokens 0, actual_seq_len passed as actual_seq_qlen/kvlen; with a
    parallel config the op is sharded as MindFormers shards its TND call."""
    import mindrlhf._mindformers  # noqa: F401
    from mindformers.models.llama import LlamaConfig
    from mindformers.models.llama.llama import LlamaModel
    from mindformers.modules.transformer.op_parallel_config import default_dpmp_config

    from mindrlhf.model.ascend_packing import compressed_causal_mask, use_tnd_attention

    config = LlamaConfig(batch_size=1, seq_length=64, hidden_size=32, num_layers=2, num_heads=2, vocab_size=64,
                         use_flash_attention=True)
    config.packing, config.loss_type = "pairs", "last_token"
    check_ascend_packing(config)
    model = LlamaModel(config)
    use_tnd_attention(model, default_dpmp_config)
    for layer in model.layers:
        attention = layer.attention
        assert (attention.input_layout, attention.sparse_mode, attention.use_eod_attn_mask_compression) == \
            ("TND", 3, True)
        prim = attention.flash_attention.flash_attention
        assert attention.flash_attention.use_actual_seqlen and prim.sparse_mode == 3 and prim.next_tokens == 0
        assert prim.in_strategy == ((1, 1, 1),) * 3 + ((1, 1), (1,), (1,))
    mask = compressed_causal_mask()
    assert mask.shape == (2048, 2048) and mask.dtype == np.uint8 and mask[0, 1] == 1 and mask[1, 0] == 0


@pytest.mark.parametrize("name", ["llama2_config/run_llama_2_7b_rm.yaml", "qwen2_5_config/run_qwen2_5_7b_rm.yaml"])
def test_the_7b_yaml_hints_pass_the_check(name):
    """The 7B YAMLs' commented packing keys, uncommented as they say, give a config the check accepts."""
    import re

    import yaml

    from conftest import ROOT

    text = (ROOT / "model_configs" / name).read_text()
    text, n = re.subn(r"^(\s*)# (packing|loss_type|pack_rows):", r"\1\2:", text,
                      flags=re.M)
    text = text.replace('loss_type: "span"', "loss_type: last_token")  # the Qwen YAML's hint: set it below
    doc = yaml.safe_load(text)
    model_config = dict(doc["model"]["model_config"], parallel_config=doc["parallel_config"])
    assert model_config["packing"] == "pairs" and doc["train_dataset"]["pack_rows"] == 4 and n >= 2
    check_ascend_packing(model_config)


def test_ascend_run_gets_actual_seq_len_column_and_argument(test_mindrecord, tmp_path):
    """On Ascend the trainer's config checks the packing rules, the packed dataset adds the
    actual_seq_len column (restarting per FlashAttention call: data_parallel under full_batch) and the network
    gets it by name after the five model columns. Runs on CPU: only the device name in the YAML says Ascend."""
    from conftest import ROOT

    from mindrlhf.data.dataset import create_reward_dataset
    from mindrlhf.data.packing import ACTUAL_SEQ_LEN, segment_of
    from mindrlhf.training.config import data_template_and_margin, load_config, set_packing

    config = load_config(str(ROOT / "model_configs" / "llama2_config" / "run_llama_2_tiny_rm_cpu.yaml"))
    config.context.device_target = "Ascend"
    config.model.model_config.update(packing="pairs", loss_type="last_token", seq_length=512,
                                     use_flash_attention=True)
    config.use_parallel, config.parallel.parallel_mode, config.parallel.full_batch = True, 1, True
    config.parallel_config.data_parallel = 2
    config.train_dataset.pack_rows = 3
    with pytest.raises(ConfigError, match=r"pack_rows \(3\) must be a multiple of 2"):
        set_packing(config, "x.yaml")
    config.train_dataset.pack_rows = 2
    set_packing(config, "x.yaml")
    assert config.train_dataset.ascend_row_groups == 2
    data_template_and_margin(config, [str(test_mindrecord)])
    assert config.train_dataset.construct_args_key == ["input_ids", "position_id", "attention_mask", "loss_mask",
                                                       "end_ind", ACTUAL_SEQ_LEN]
    dataset = create_reward_dataset(str(test_mindrecord), 2, packing="pairs", pack_rows=2, loss_type="last_token",
                                    seq_length=512, ascend_row_groups=2)
    assert dataset.get_col_names()[-1] == ACTUAL_SEQ_LEN
    step = next(dataset.create_dict_iterator(output_numpy=True))
    asl, codes = step[ACTUAL_SEQ_LEN], step["attention_mask"]
    entries = tnd_row_entries(512)
    assert asl.shape == (2, entries) and asl.dtype == np.int32
    for row in range(2):  # each row its own call (row_groups 2): its spans' ends, then 1-token filler blocks
        seg = segment_of(codes[row])
        used = int(np.count_nonzero(seg))
        ends = [int(e) for e in np.flatnonzero(np.diff(seg[:used])) + 1] + [used]
        filler = list(range(used + 1, used + entries - len(ends))) + [512]
        assert asl[row].tolist() == ends + filler
    config.model.model_config.packing = "shared_prefix"
    with pytest.raises(ConfigError, match="shared_prefix cannot run on Ascend"):
        set_packing(config, "x.yaml")


def test_default_pack_rows_is_capped_per_flash_attention_call(test_mindrecord):
    """pack_steps fill: without pack_rows the padded step's tokens decide the rows (batch 64 of 256-token pairs in
    2048-token rows: 16); on Ascend a FlashAttention call takes at most 1024 entries, 128 a row of 2048: 8 rows,
    so the default is capped there and the first step's actual_seq_len is built (it raised in the pipeline when
    only an explicit pack_rows was checked). pack_steps batch_size: the rows a step's 64 pairs may need (20) are
    more than a call takes (22 with the TND reserve), refused before training."""
    from mindrlhf.data.dataset import create_reward_dataset, plan_packed
    from mindrlhf.data.packing import ACTUAL_SEQ_LEN, tnd_rows_per_call

    files = [str(test_mindrecord)]
    most = tnd_rows_per_call(2048)
    assert most == 8
    fill = {"pack_steps": "fill"}
    assert plan_packed(files, "pairs", None, 2048, "last_token", batch_size=64, **fill)["pack_rows"] == 16  # CPU
    for groups in (1, 2):
        plan = plan_packed(files, "pairs", None, 2048, "last_token", batch_size=64, ascend_row_groups=groups, **fill)
        assert plan["pack_rows"] == min(16, most * groups)
    dataset = create_reward_dataset(files, 64, packing="pairs", loss_type="last_token", seq_length=2048,
                                    ascend_row_groups=1, **fill)
    step = next(dataset.create_dict_iterator(output_numpy=True))
    assert step[ACTUAL_SEQ_LEN].shape == (most, tnd_row_entries(2048))
    with pytest.raises(ConfigError, match=r"pack_rows \(16\) gives 16 rows a FlashAttention call"):
        plan_packed(files, "pairs", 16, 2048, "last_token", ascend_row_groups=1, **fill)
    assert plan_packed(files, "pairs", None, 2048, "last_token", batch_size=64)["pack_rows"] == 20  # CPU
    with pytest.raises(ConfigError, match=r"batch_size 64: a step's pairs may need 22 rows of 2048 tokens, and "
                                          r"FlashAttention takes at most 8 a step"):
        plan_packed(files, "pairs", None, 2048, "last_token", batch_size=64, ascend_row_groups=1)


@pytest.mark.parametrize("mode", [1, "SEMI_AUTO_PARALLEL", "semi_auto_parallel", 2, "AUTO_PARALLEL"])
def test_parallel_mode_read_through_mindformers_table(mode, test_mindrecord):
    """Every spelling MindFormers takes for semi-auto/auto parallel gives one row group per data-parallel shard
    under full_batch (otherwise actual_seq_len's offsets run on across shards), the full_batch check, and the
    Trainer's batch x dp pairs a step; 0 and DATA_PARALLEL give none of them; an unknown one is refused."""
    from conftest import ROOT

    from mindrlhf.training.config import check_data_against_model, check_parallel, load_config, set_packing

    def config_with(value, full_batch=True):
        config = load_config(str(ROOT / "model_configs" / "llama2_config" / "run_llama_2_tiny_rm_cpu.yaml"))
        config.context.device_target = "Ascend"
        config.model.model_config.update(packing="pairs", loss_type="last_token", seq_length=512,
                                         use_flash_attention=True)
        config.use_parallel, config.parallel.parallel_mode, config.parallel.full_batch = True, value, full_batch
        config.parallel_config.data_parallel = 2
        config.train_dataset.pack_rows = 2
        return config

    config = config_with(mode)
    set_packing(config, "x.yaml")
    assert config.train_dataset.ascend_row_groups == 2
    with pytest.raises(ConfigError, match="full_batch must be True"):
        check_parallel(config_with(mode, full_batch=False), "x.yaml")
    padded = config_with(mode)
    padded.model.model_config.update(packing=False, seq_length=256)
    padded.runner_config.batch_size = 1000  # x dp 2 from one reader: more than the file holds
    with pytest.raises(ConfigError, match="a step takes 2000 pair"):
        check_data_against_model(padded, [str(test_mindrecord)], rank_size=2)
    for plain in (0, "DATA_PARALLEL"):
        config = config_with(plain)
        set_packing(config, "x.yaml")
        assert config.train_dataset.ascend_row_groups == 1
    with pytest.raises(ConfigError, match=r"x.yaml: parallel.parallel_mode must be one of .*got 'SEMI'"):
        set_packing(config_with("SEMI"), "x.yaml")
