"""Packing on Ascend: actual_seq_len from layout codes, against MindFormers' own pipeline and FlashAttention's
TND semantics; the config checks against what MindFormers' LlamaModel itself builds or refuses (no Ascend here:
building the cells runs nothing)."""
import numpy as np
import pytest

from mindrlhf.errors import ConfigError
from mindrlhf.data.packing import EOD_PAD_LENGTH, actual_seq_len, visible
from mindrlhf.models.ascend_packing import MIN_SEQ_LENGTH, check_ascend_packing


def codes_of(row_segments, kinds=None):
    """Per-token segment ids (lists, one per row) -> layout codes segment * 8 + kind."""
    seg = np.array(row_segments, dtype=np.int32)
    return seg * 8 + (0 if kinds is None else np.array(kinds, dtype=np.int32))


def tnd_visible(asl_flat, total):
    """FlashAttention TND, sparse_mode 8: query i sees key j iff j <= i in the same block of the cumulative
    list (as MindFormers' mask_generate builds the same mask from actual_seq_len)."""
    block = np.searchsorted(np.asarray(asl_flat), np.arange(total), side="right")
    idx = np.arange(total)
    return (block[:, None] == block[None, :]) & (idx[None, :] <= idx[:, None])


def test_hand_made_rows():
    codes = codes_of([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0],   # two spans, filler
                      [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],   # one full span
                      [1, 2, 3, 3, 3, 3, 3, 3, 4, 4],   # four spans, no filler
                      [0] * 10])                        # an unused row: filler only
    got = actual_seq_len(codes, pad_length=5)
    assert got.dtype == np.int32 and got.shape == (4, 5)
    np.testing.assert_array_equal(got, [[3, 7, 10, 10, 10],
                                        [20, 20, 20, 20, 20],
                                        [21, 22, 28, 30, 30],
                                        [40, 40, 40, 40, 40]])


def test_row_groups_restart_offsets_per_flash_attention_call():
    codes = codes_of([[1, 1, 2, 2], [1, 2, 2, 0], [1, 1, 1, 1], [1, 2, 3, 0]])
    got = actual_seq_len(codes, pad_length=4, row_groups=2)  # e.g. data_parallel 2 under full_batch
    np.testing.assert_array_equal(got, [[2, 4, 4, 4], [5, 7, 8, 8], [4, 4, 4, 4], [5, 6, 7, 8]])
    with pytest.raises(ValueError, match="row_groups"):
        actual_seq_len(codes, pad_length=4, row_groups=3)


def test_matches_mindformers_own_pipeline():
    """The same rows told to MindFormers as EOD-terminated documents give the same list (its pretraining
    dataset's _get_eod_attention_mask, then its per-batch offsets asl_batch_wrapper, two micro batches)."""
    from mindformers.dataset.blended_datasets.gpt_dataset import _get_eod_attention_mask
    from mindformers.dataset.causal_language_model_dataset import asl_batch_wrapper

    eod = 99
    rows = [[1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2, 2, 2]]
    codes = codes_of(rows)
    theirs = []
    for seg in np.array(rows):
        tokens = np.full(seg.shape, 7)
        last = np.r_[seg[1:] != seg[:-1], True]  # each span's (and the filler's) last token ends a document
        tokens[last] = eod
        theirs.append(_get_eod_attention_mask(tokens, eod, 6))
    theirs = asl_batch_wrapper(list(theirs), None, micro_batch_num=2)[0]
    np.testing.assert_array_equal(actual_seq_len(codes, pad_length=6, row_groups=2), np.stack(theirs))


@pytest.mark.parametrize("seed", range(5))
def test_flash_attention_blocks_are_the_packing_layout(seed):
    """Random plain layouts: the attention FlashAttention derives from actual_seq_len is PACKING.md's on every
    span query; filler queries see only filler (never read), and no span sees filler or another span."""
    rng = np.random.default_rng(seed)
    rows, seq = 3, 24
    layout = []
    for _ in range(rows):
        lengths = []
        while sum(lengths) < seq and rng.random() < 0.85:
            lengths.append(int(rng.integers(1, 8)))
        used = min(sum(lengths), seq)
        seg = np.zeros(seq, dtype=np.int32)
        pos = 0
        for i, n in enumerate(lengths, 1):
            seg[pos:min(pos + n, used)] = i
            pos += n
        layout.append(seg)
    codes = codes_of(layout)
    asl = actual_seq_len(codes, pad_length=12)
    vis = tnd_visible(asl.reshape(-1), rows * seq)
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
        actual_seq_len(codes_of([[1, 1, 1, 1, 1, 0]], kinds), pad_length=4)


@pytest.mark.parametrize("row, match", [([1, 1, 0, 2], "filler"), ([2, 2, 1, 1], "numbered"),
                                        ([1, 2, 1, 0], "numbered"), ([1, 1, 3, 3], "numbered")])
def test_refuses_malformed_rows(row, match):
    with pytest.raises(ValueError, match=match):
        actual_seq_len(codes_of([row]), pad_length=4)


def test_static_length_limits():
    codes = codes_of([[1, 2, 3, 4, 0, 0]])
    with pytest.raises(ValueError, match="5 causal blocks"):
        actual_seq_len(codes, pad_length=4)
    assert actual_seq_len(codes, pad_length=5).shape == (1, 5)
    with pytest.raises(ValueError, match="1024"):
        actual_seq_len(np.zeros((9, 4), np.int32), pad_length=EOD_PAD_LENGTH)  # 9 x 128 in one call
    assert actual_seq_len(np.zeros((9, 4), np.int32), pad_length=EOD_PAD_LENGTH, row_groups=3).shape == (9, 128)


GOOD = dict(packing="pairs", loss_type="last_token", use_flash_attention=True,
            use_eod_attn_mask_compression=True, seq_length=MIN_SEQ_LENGTH,
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
    (dict(use_eod_attn_mask_compression=False), "use_eod_attn_mask_compression: True"),
    (dict(use_ring_attention=True), "use_ring_attention: False"),
    (dict(use_past=True), "use_past: False"),
    (dict(seq_length=1024), "seq_length >= 2048"),
    (dict(parallel_config=dict(context_parallel=2)), "context_parallel: 1"),
    (dict(parallel_config=dict(seq_split_num=2)), "seq_split_num: 1"),
])
def test_refuses_configs_that_cannot_pack(change, match):
    with pytest.raises(ConfigError, match=match):
        check_ascend_packing({**GOOD, **change})


def tiny_llama(**overrides):
    import mindrlhf._mindformers  # noqa: F401
    from mindformers.models.llama import LlamaConfig
    from mindformers.models.llama.llama import LlamaModel

    cfg = dict(batch_size=1, seq_length=MIN_SEQ_LENGTH, hidden_size=32, num_layers=1, num_heads=2,
               vocab_size=64, compute_dtype="float16", use_flash_attention=True,
               use_eod_attn_mask_compression=True)
    cfg.update(overrides)
    config = LlamaConfig(**cfg)
    return config, LlamaModel(config)


def test_accepted_config_builds_mindformers_tnd_flash_attention():
    """What check_ascend_packing accepts, MindFormers builds as the packed path: TND, sparse_mode 8,
    actual_seq_len fed to FlashAttention, the 2048 x 2048 compressed causal mask."""
    config, model = tiny_llama()
    config.packing, config.loss_type = "pairs", "last_token"
    check_ascend_packing(config)
    attention = model.layers[0].attention
    assert (attention.input_layout, attention.sparse_mode) == ("TND", 8)
    assert attention.flash_attention.use_actual_seqlen
    assert model.casual_mask.lower_triangle_mask.shape == (2048, 2048)


@pytest.mark.parametrize("overrides, ours", [
    (dict(use_flash_attention=False), "use_flash_attention"),
    (dict(seq_length=1024), "seq_length"),
])
def test_refused_where_mindformers_refuses(overrides, ours):
    """Configs LlamaModel itself refuses are refused first by the check, with the YAML key named."""
    with pytest.raises(ValueError):
        tiny_llama(**overrides)
    with pytest.raises(ConfigError, match=ours):
        check_ascend_packing({**GOOD, **overrides})


@pytest.mark.parametrize("name", ["llama2_config/run_llama_2_7b_rm.yaml", "qwen2_5_config/run_qwen2_5_7b_rm.yaml"])
def test_the_7b_yaml_hints_pass_the_check(name):
    """The 7B YAMLs' commented packing keys, uncommented as they say, give a config the check accepts."""
    import re

    import yaml

    from conftest import ROOT

    text = (ROOT / "model_configs" / name).read_text()
    text, n = re.subn(r"^(\s*)# (packing|use_eod_attn_mask_compression|loss_type|pack_rows):", r"\1\2:", text,
                      flags=re.M)
    text = text.replace('loss_type: "span"', "loss_type: last_token")  # the Qwen YAML's hint: set it below
    doc = yaml.safe_load(text)
    model_config = dict(doc["model"]["model_config"], parallel_config=doc["parallel_config"])
    assert model_config["packing"] == "pairs" and doc["train_dataset"]["pack_rows"] == 4 and n >= 3
    check_ascend_packing(model_config)


def test_ascend_run_gets_actual_seq_len_column_and_argument(test_mindrecord, tmp_path):
    """On Ascend the trainer's config checks the packing rules, the packed dataset adds MindFormers'
    actual_seq_len column (restarting per FlashAttention call: data_parallel under full_batch) and the network
    gets it by name after the five model columns. Runs on CPU: only the device name in the YAML says Ascend."""
    from conftest import ROOT

    from mindrlhf.data.dataset import create_reward_dataset
    from mindrlhf.data.packing import ACTUAL_SEQ_LEN, segment_of
    from mindrlhf.training.config import data_template_and_margin, load_config, set_packing

    config = load_config(str(ROOT / "model_configs" / "llama2_config" / "run_llama_2_tiny_rm_cpu.yaml"))
    config.context.device_target = "Ascend"
    config.model.model_config.update(packing="pairs", loss_type="last_token", seq_length=MIN_SEQ_LENGTH,
                                     use_flash_attention=True, use_eod_attn_mask_compression=True)
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
    assert asl.shape == (2, EOD_PAD_LENGTH) and asl.dtype == np.int32
    for row in range(2):  # each row its own call (row_groups 2): its spans' ends, then the row end, repeated
        seg = segment_of(codes[row])
        ends = [int(e) for e in np.flatnonzero(np.diff(seg)) + 1] + [512]
        assert asl[row, :len(ends)].tolist() == ends and (asl[row, len(ends):] == 512).all()
    config.model.model_config.packing = "shared_prefix"
    with pytest.raises(ConfigError, match="shared_prefix cannot run on Ascend"):
        set_packing(config, "x.yaml")
