"""The FlashAttentionScore stand-in (tests/fa_standin.py) against its documented contract: what it computes,
against float64, for the layouts and sparse modes our models call, and one refusal per rule of the docstring."""
import numpy as np
import pytest

import mindspore as ms

from fa_standin import FlashAttentionScoreStandIn as FA, ContractError

COMPRESSED = np.triu(np.ones((2048, 2048), np.uint8), 1)  # what MindFormers passes in sparse_mode 2/3
RNG = np.random.default_rng(0)


pytestmark = pytest.mark.usefixtures("pynative_mode")


def t(x, dtype=ms.float32):
    return ms.Tensor(np.asarray(x), dtype)


def reference(q, k, v, allowed, scale):
    """float64 attention on (B, N1, S1, D) / (B, N2, S2, D) with a boolean (.., S1, S2) mask."""
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, 1).astype(np.float64), np.repeat(v, rep, 1).astype(np.float64)
    s = np.where(allowed, q.astype(np.float64) @ k.swapaxes(-1, -2) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def qkv(b, n1, n2, s, d=16):
    return [RNG.standard_normal(shape).astype(np.float32) for shape in ((b, n1, s, d), (b, n2, s, d), (b, n2, s, d))]


def test_bnsd_explicit_mask_with_gqa_and_band():
    """BNSD, sparse_mode 0: the 7B YAMLs' call (MindFormers' (B, 1, S, S) uint8 mask, 1 = discard, next_tokens 0)."""
    q, k, v = qkv(2, 4, 2, 8)
    pads = np.zeros((2, 1, 8, 8), np.uint8)
    pads[1, :, :, 6:] = 1  # row 1's last two keys are pads
    fa = FA(4, scale_value=0.25, next_tokens=0, input_layout="BNSD", float32=True)
    got = fa(t(q), t(k), t(v), attn_mask=t(pads, ms.uint8))[3].asnumpy()
    allowed = ~pads.astype(bool) & np.tril(np.ones((8, 8), bool))
    np.testing.assert_allclose(got, reference(q, k, v, allowed, 0.25), atol=1e-5)


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND"])
def test_other_layouts_with_compressed_causal_mask(layout):
    q, k, v = qkv(2, 2, 1, 6)
    to = {"BSH": lambda x: x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1),
          "SBH": lambda x: x.transpose(2, 0, 1, 3).reshape(x.shape[2], x.shape[0], -1),
          "BSND": lambda x: x.transpose(0, 2, 1, 3)}[layout]
    fa = FA(2, scale_value=0.25, next_tokens=0, input_layout=layout, sparse_mode=2, float32=True)
    got = fa(t(to(q)), t(to(k)), t(to(v)), attn_mask=t(COMPRESSED, ms.uint8))[3].asnumpy()
    np.testing.assert_allclose(got, to(reference(q, k, v, np.tril(np.ones((6, 6), bool)), 0.25)), atol=1e-5)


@pytest.mark.parametrize("sparse_mode", [2, 3])
def test_tnd_blocks_are_causal_and_separate(sparse_mode):
    ends = [3, 7, 8, 12]
    q, k, v = (x[0].transpose(1, 0, 2) for x in qkv(1, 2, 2, 12))  # (T, N, D)
    fa = FA(2, scale_value=0.25, next_tokens=0, input_layout="TND", sparse_mode=sparse_mode, float32=True)
    got = fa(t(q), t(k), t(v), attn_mask=t(COMPRESSED, ms.uint8), actual_seq_qlen=ends, actual_seq_kvlen=ends)[3]
    block = np.searchsorted(ends, np.arange(12), "right")
    allowed = (block[:, None] == block[None, :]) & np.tril(np.ones((12, 12), bool))
    want = reference(*(x.transpose(1, 0, 2)[None] for x in (q, k, v)), allowed, 0.25)[0].transpose(1, 0, 2)
    np.testing.assert_allclose(got.asnumpy(), want, atol=1e-5)


def test_float16_in_float16_out():
    q, k, v = (t(x, ms.float16) for x in qkv(1, 2, 2, 4))
    out = FA(2, input_layout="BNSD")(q, k, v)[3]
    assert out.dtype == ms.float16 and out.shape == q.shape


def tnd(ends_q, ends_kv=None, sparse_mode=3, total=None, mask=COMPRESSED, **kw):
    total = total or int(ends_q[-1])
    x = t(np.zeros((total, 2, 16), np.float16), ms.float16)
    fa = FA(2, next_tokens=0, input_layout="TND", sparse_mode=sparse_mode, **kw)
    return fa(x, x, x, attn_mask=None if mask is None else t(mask, ms.uint8), actual_seq_qlen=ends_q,
              actual_seq_kvlen=ends_q if ends_kv is None else ends_kv)


def bnsd(sparse_mode=0, n2=2, d=16, dtype=ms.float16, mask=None, **call):
    x, kv = t(np.zeros((1, 2, 4, d)), dtype), t(np.zeros((1, n2, 4, d)), dtype)
    fa = FA(2, input_layout="BNSD", sparse_mode=sparse_mode)
    return fa(x, kv, kv, attn_mask=None if mask is None else t(mask, ms.uint8), **call)


# One test per documented rule: each refusal names the rule and quotes its docstring line.
@pytest.mark.parametrize("mode, quote", [(5, "not implemented yet"), (6, "global scenario, not implemented yet"),
                                         (7, "dilated scenario, not implemented yet"),
                                         (8, "block_local scenario, not implemented yet")])
def test_refuses_unimplemented_sparse_modes(mode, quote):
    with pytest.raises(ContractError, match=f"sparse_mode {mode} is not implemented .*{quote}"):
        FA(2, input_layout="TND", sparse_mode=mode, next_tokens=0)


@pytest.mark.parametrize("mode", [0, 1])
def test_refuses_tnd_with_a_mask_other_than_lower_triangular(mode):
    with pytest.raises(ContractError, match=f"TND with sparse_mode {mode}.*so sparse_mode should be 2 or 3"):
        FA(2, input_layout="TND", sparse_mode=mode, next_tokens=0)


def test_refuses_tnd_with_next_tokens():
    with pytest.raises(ContractError, match="Next_tokens is 0"):
        FA(2, input_layout="TND", sparse_mode=3)  # the default next_tokens, INT_MAX


def test_refuses_tnd_without_lists():
    with pytest.raises(ContractError, match="must be not none"):
        tnd(None, None, total=8)


def test_refuses_lists_on_other_layouts():
    with pytest.raises(ContractError, match="Otherwise, they are none"):
        bnsd(actual_seq_qlen=[4], actual_seq_kvlen=[4])


def test_refuses_lists_of_different_lengths():
    with pytest.raises(ContractError, match="The lengths of two lists are the same"):
        tnd([4, 8], [8])


def test_refuses_zero_length_blocks():
    """MindFormers' pipeline pads actual_seq_len by repeating the row end: a zero-length block here."""
    with pytest.raises(ContractError, match="zero-length block .*0 should not exist in list_seq_k"):
        tnd([4, 8, 8])


def test_refuses_non_increasing_lists():
    with pytest.raises(ContractError, match="actual_seq_qlen is not increasing.*increasing values"):
        tnd([5, 4, 8], [4, 5, 8])


def test_refuses_last_entry_other_than_t():
    with pytest.raises(ContractError, match="last entry is 6, not T = 8.*last value equal to T1"):
        tnd([2, 6], total=8)


def test_refuses_more_than_1024_entries():
    ends = np.arange(1, 1026)
    with pytest.raises(ContractError, match="1025 entries.*less than or equal to 1024"):
        tnd(ends)


def test_refuses_pre_tokens_below_the_longest_block():
    with pytest.raises(ContractError, match="pre_tokens 3 < max_seqlen_q 5.*not less than max_seqlen_q"):
        tnd([5, 8], pre_tokens=3)


def test_refuses_right_down_causal_with_longer_query_block():
    with pytest.raises(ContractError, match="S1 of each batch should be less than or equal to S2"):
        tnd([5, 8], [3, 8])


def test_refuses_a_compressed_mask_not_2048():
    """Below the compressed mask's 2048: a mask sliced to S (as MindFormers slices its uncompressed one)."""
    with pytest.raises(ContractError, match=r"shape \(8, 8\).*attn_mask must be `\(2048, 2048\)`"):
        tnd([8], mask=np.triu(np.ones((8, 8), np.uint8), 1))
    with pytest.raises(ContractError, match="without the compressed mask"):
        bnsd(sparse_mode=2)


def test_refuses_a_compressed_mask_that_is_not_lower_triangular():
    with pytest.raises(ContractError, match="not the lower triangle.*lower trianglar matrix"):
        tnd([8], mask=1 - COMPRESSED)


def test_refuses_explicit_mask_of_wrong_shape():
    with pytest.raises(ContractError, match=r"attn_mask should be `\(B, N1, S1, S2\)`"):
        bnsd(mask=np.zeros((1, 1, 4, 5), np.uint8))


def test_refuses_all_mask_without_mask():
    with pytest.raises(ContractError, match="passing in the complete attn_mask matrix"):
        bnsd(sparse_mode=1)


def test_refuses_float32_unless_asked():
    with pytest.raises(ContractError, match=r"query of dtype Float32.*Tensor\[float16, bfloat16\]"):
        bnsd(dtype=ms.float32)


def test_refuses_head_size_not_a_multiple_of_16():
    with pytest.raises(ContractError, match="head size D = 8.*multiple of 16"):
        bnsd(d=8)


def test_refuses_kv_heads_not_dividing_query_heads():
    x, kv = t(np.zeros((1, 3, 4, 16)), ms.float16), t(np.zeros((1, 2, 4, 16)), ms.float16)
    with pytest.raises(ContractError, match="N2 must be a factor of N1"):
        FA(3, input_layout="BNSD")(x, kv, kv)


@pytest.mark.parametrize("arg, quote", [("drop_mask", "drop_mask should be none"),
                                        ("padding_mask", "Reserved parameter"),
                                        ("prefix", "only when `sparse_mode` is 5"),
                                        ("real_shift", "Also known as pse")])
def test_refuses_reserved_or_uncomputed_inputs(arg, quote):
    with pytest.raises(ContractError, match=quote):
        bnsd(**{arg: t(np.zeros((1,)), ms.uint8)})


@pytest.mark.parametrize("kw, quote", [(dict(keep_prob=0.9), "keep_prob is 1.0"),
                                       (dict(sparse_mode=4), "band scenario"),
                                       (dict(pre_tokens=-1, next_tokens=-1), "pre_tokens < 0 and next_tokens < 0"),
                                       (dict(inner_precise=1), "reserved and not implemented")])
def test_refuses_arguments(kw, quote):
    with pytest.raises(ContractError, match=quote):
        FA(2, input_layout="BNSD", **kw)
