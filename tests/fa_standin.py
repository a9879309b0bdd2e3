"""A CPU stand-in for MindSpore 2.9's FlashAttentionScore (Ascend only), for tests.

It computes what the op's docstring (mindspore/ops/auto_generate/gen_ops_prim.py, class FlashAttentionScore)
says for what our models call: BSH/BNSD/BSND/SBH with sparse_mode 0 (an explicit mask, pre/next_tokens band),
1, 2 and 3 (the compressed (2048, 2048) causal mask), and TND with actual_seq_qlen/actual_seq_kvlen (sparse_mode
2/3), and refuses every input the docstring forbids, each refusal naming the rule and quoting its line (DOC).
What the docstring allows but no model of ours calls (dropout, real_shift, sparse_mode 4) is refused as not
computed here, never approximated. Ascend takes float16/bfloat16 only; float32 is taken only when the caller
says so (float32=True), so a comparison with the float32 CPU path is at float32 tolerance.

Selected explicitly: use_stand_in(network) swaps the primitive inside each of MindFormers' FlashAttention
cells and fails when there is none. It checks values (actual_seq_*), so it runs in PyNative mode.
"""
import numpy as np

import mindspore as ms
from mindspore import nn, ops

DOC = "mindspore/ops/auto_generate/gen_ops_prim.py, FlashAttentionScore docstring"
INT_MAX = 2147483647


class ContractError(ValueError):
    """An input FlashAttentionScore's docstring forbids (or one this stand-in does not compute)."""

    def __init__(self, rule, line):
        super().__init__(f"FlashAttentionScore: {rule} ({DOC}: \"{line}\")")


def _require(ok, rule, line):
    if not ok:
        raise ContractError(rule, line)


def _array(x):
    if x is None:
        return None
    if isinstance(x, ms.Tensor):
        return x.asnumpy()
    return np.asarray(x)


class FlashAttentionScoreStandIn(nn.Cell):
    """Same constructor and call as ops.operations.nn_ops.FlashAttentionScore; returns
    (softmax_max, softmax_sum, softmax_out, attention_out)."""

    def __init__(self, head_num, keep_prob=1.0, scale_value=1.0, pre_tokens=INT_MAX, next_tokens=INT_MAX,
                 inner_precise=0, input_layout="BSH", sparse_mode=0, float32=False):
        super().__init__()
        _require(sparse_mode not in (5, 6, 7, 8), f"sparse_mode {sparse_mode} is not implemented",
                 {5: "each Batch axis is different, not implemented yet", 6: "the global scenario, not implemented yet",
                  7: "the dilated scenario, not implemented yet",
                  8: "Represents the block_local scenario, not implemented yet."}.get(sparse_mode, ""))
        _require(sparse_mode in (0, 1, 2, 3), f"sparse_mode {sparse_mode} (band) is not computed by this stand-in "
                 "(no model of ours calls it)", "4: Represents the band scenario")
        _require(input_layout in ("BSH", "BNSD", "SBH", "BSND", "TND"), f"input_layout {input_layout!r} unknown "
                 "(TH is not computed here)", 'The value can be "BSH", "BNSD", "SBH", "BSND", "TH" or "TND"')
        _require(keep_prob == 1.0, "dropout (keep_prob < 1) is not computed by this stand-in",
                 "When keep_prob is 1.0, drop_mask should be none.")
        _require(inner_precise == 0, "inner_precise must be 0", "The parameter is reserved and not implemented yet")
        _require(not (pre_tokens < 0 and next_tokens < 0), "pre_tokens and next_tokens both negative",
                 "pre_tokens < 0 and next_tokens < 0.")
        if input_layout == "TND":
            _require(sparse_mode in (2, 3), f"TND with sparse_mode {sparse_mode}: the mask must be lower-triangular",
                     "Attn mask must be a lower trianglar matrix, so sparse_mode should be 2 or 3.")
            _require(next_tokens == 0, f"TND with next_tokens {next_tokens}",
                     "Next_tokens is 0, and pre_tokens is not less than max_seqlen_q.")
        self.head_num, self.scale_value = int(head_num), float(scale_value)
        self.pre_tokens, self.next_tokens = int(pre_tokens), int(next_tokens)
        self.input_layout, self.sparse_mode, self.float32 = input_layout, int(sparse_mode), bool(float32)

    # MindFormers' FlashAttention cell calls these on the primitive when it shards or enables ring attention.
    def shard(self, *args, **kwargs):
        return self

    def add_prim_attr(self, *args):
        return self

    def _to_bnsd(self, x, heads):
        layout = self.input_layout
        if layout == "BSH":
            b, s, h = x.shape
            return x.reshape(b, s, heads, h // heads).transpose(0, 2, 1, 3)
        if layout == "SBH":
            s, b, h = x.shape
            return x.reshape(s, b, heads, h // heads).transpose(1, 2, 0, 3)
        if layout == "BSND":
            return x.transpose(0, 2, 1, 3)
        if layout == "TND":
            return x.transpose(1, 0, 2).expand_dims(0)
        return x

    def _from_bnsd(self, y, like):
        layout = self.input_layout
        if layout == "BSH":
            return y.transpose(0, 2, 1, 3).reshape(like.shape)
        if layout == "SBH":
            return y.transpose(2, 0, 1, 3).reshape(like.shape)
        if layout == "BSND":
            return y.transpose(0, 2, 1, 3)
        if layout == "TND":
            return y[0].transpose(1, 0, 2)
        return y

    def _heads(self, query, key):
        """(N1, N2, D) from the shapes; N2 must divide N1 and D be a multiple of 16 up to 512."""
        layout, n1 = self.input_layout, self.head_num
        if layout in ("BSH", "SBH"):
            d = query.shape[-1] // n1
            n2 = key.shape[-1] // d
        elif layout == "BNSD":
            d, n2 = query.shape[-1], key.shape[1]
            _require(query.shape[1] == n1, f"query has {query.shape[1]} heads, head_num is {n1}",
                     "head_num (int): The head num of query, equal to N1.")
        else:  # BSND, TND
            d, n2 = query.shape[-1], key.shape[-2]
            _require(query.shape[-2] == n1, f"query has {query.shape[-2]} heads, head_num is {n1}",
                     "head_num (int): The head num of query, equal to N1.")
        _require(d % 16 == 0 and 0 < d <= 512, f"head size D = {d}",
                 "D -- Head size.  The value ranges is a multiple of 16, with the max value of 512.")
        _require(n2 >= 1 and n1 % n2 == 0, f"N2 = {n2} key/value heads do not divide N1 = {n1}",
                 "N2 -- Num heads of key and value, and N2 must be a factor of N1.")
        return n1, n2, d

    def _tnd_blocks(self, actual_seq_qlen, actual_seq_kvlen, t1, t2):
        """The cumulative lists checked against the docstring; returns (q ends, kv ends)."""
        line_none = "When input_layout is \"TND\", actual_seq_qlen and actual_seq_kvlen must be not none."
        _require(actual_seq_qlen is not None and actual_seq_kvlen is not None,
                 "TND without actual_seq_qlen/actual_seq_kvlen", line_none)
        q, kv = _array(actual_seq_qlen).reshape(-1).astype(np.int64), _array(actual_seq_kvlen).reshape(-1).astype(np.int64)
        _require(len(q) == len(kv), f"actual_seq_qlen has {len(q)} entries, actual_seq_kvlen {len(kv)}",
                 "The lengths of two lists are the same, and size of list is batch.")
        _require(len(q) <= 1024, f"{len(q)} entries in actual_seq_qlen/actual_seq_kvlen, more than 1024",
                 "batch is less than or equal to 1024.")
        kv_lengths = np.diff(np.r_[0, kv])
        _require((kv_lengths != 0).all(), f"actual_seq_kvlen holds a zero-length block (entry "
                 f"{int(np.argmin(kv_lengths != 0))})", "0 should not exist in list_seq_k.")
        for name, ends, total in (("actual_seq_qlen", q, t1), ("actual_seq_kvlen", kv, t2)):
            lengths = np.diff(np.r_[0, ends])
            _require((lengths > 0).all(), f"{name} is not increasing (entry {int(np.argmin(lengths > 0))}: "
                     f"{ends.tolist()[:8]}...)", "array with increasing values and the last value equal to T1")
            _require(ends[-1] == total, f"{name}'s last entry is {int(ends[-1])}, not T = {total}",
                     "array with increasing values and the last value equal to T1")
        lq, lk = np.diff(np.r_[0, q]), np.diff(np.r_[0, kv])
        _require(self.pre_tokens >= lq.max(), f"TND with pre_tokens {self.pre_tokens} < max_seqlen_q {lq.max()}",
                 "Next_tokens is 0, and pre_tokens is not less than max_seqlen_q.")
        if self.sparse_mode == 3:
            _require((lq <= lk).all(), "sparse_mode 3 with a query block longer than its key block",
                     "When sparse_mode is 3, S1 of each batch should be less than or equal to S2.")
        return q, kv

    def _compressed_mask(self, attn_mask):
        line = "In compression scenario, sparse_mode is 2, 3, or 4, attn_mask must be `(2048, 2048)`."
        _require(attn_mask is not None, f"sparse_mode {self.sparse_mode} without the compressed mask", line)
        mask = _array(attn_mask)
        _require(mask.shape == (2048, 2048), f"sparse_mode {self.sparse_mode} with an attn_mask of shape "
                 f"{mask.shape}", line)
        _require(np.array_equal(mask.astype(bool), np.triu(np.ones((2048, 2048), bool), 1)),
                 "the compressed mask is not the lower triangle (1 above the diagonal = discard)",
                 "Attn mask must be a lower trianglar matrix")

    def _allowed(self, b, s1, s2, attn_mask, actual_seq_qlen, actual_seq_kvlen):
        """Boolean (B or 1, 1 or N1, S1, S2): which keys each query attends to."""
        i, j = np.arange(s1)[:, None], np.arange(s2)[None, :]
        if self.input_layout == "TND":
            self._compressed_mask(attn_mask)
            q, kv = self._tnd_blocks(actual_seq_qlen, actual_seq_kvlen, s1, s2)
            bq, bk = np.searchsorted(q, np.arange(s1), "right"), np.searchsorted(kv, np.arange(s2), "right")
            starts_q, starts_k = np.r_[0, q[:-1]][bq], np.r_[0, kv[:-1]][bk]
            ri, rj = i - starts_q[:, None], j - starts_k[None, :]  # positions within the blocks
            lq, lk = (q - np.r_[0, q[:-1]])[bq][:, None], (kv - np.r_[0, kv[:-1]])[bk][None, :]
            shift = (lk - lq) if self.sparse_mode == 3 else 0  # right-down vs left-up causal, per block
            return ((bq[:, None] == bk[None, :]) & (rj <= ri + shift))[None, None]
        _require(actual_seq_qlen is None and actual_seq_kvlen is None,
                 f"actual_seq_qlen/kvlen given with input_layout {self.input_layout}",
                 "When input_layout is \"TND\", actual_seq_qlen and actual_seq_kvlen must be not none. Otherwise, "
                 "they are none.")
        if self.sparse_mode in (2, 3):
            self._compressed_mask(attn_mask)
            return (j <= i + ((s2 - s1) if self.sparse_mode == 3 else 0))[None, None]
        if attn_mask is None:
            _require(self.sparse_mode == 0, "sparse_mode 1 without attn_mask",
                     "1: Represents allMask, that is, passing in the complete attn_mask matrix.")
            return np.ones((1, 1, s1, s2), bool)
        mask = _array(attn_mask)
        line = "When sparse_mode is 0 and 1, attn_mask should be `(B, N1, S1, S2)`, `(B, 1, S1, S2)`, `(S1, S2)`."
        _require(mask.shape in ((b, self.head_num, s1, s2), (b, 1, s1, s2), (s1, s2)),
                 f"attn_mask of shape {mask.shape} for B={b}, N1={self.head_num}, S1={s1}, S2={s2}", line)
        _require(mask.dtype in (np.uint8, np.bool_), f"attn_mask of dtype {mask.dtype}",
                 "attn_mask (Union[Tensor[uint8], Tensor[bool], None])")
        keep = ~mask.astype(bool)
        keep = keep.reshape((1, 1) + keep.shape) if keep.ndim == 2 else keep
        if self.sparse_mode == 0:  # the band between pre_tokens and next_tokens is computed
            keep = keep & ((j >= i - self.pre_tokens) & (j <= i + self.next_tokens))[None, None]
        return keep

    def construct(self, query, key, value, real_shift=None, drop_mask=None, padding_mask=None, attn_mask=None,
                  prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None):
        _require(real_shift is None, "real_shift (pse) is not computed by this stand-in",
                 "real_shift (Union[Tensor[float16, bfloat16], None]) - Also known as pse.")
        _require(drop_mask is None, "drop_mask with keep_prob 1.0",
                 "When keep_prob is 1.0, drop_mask should be none.")
        _require(padding_mask is None, "padding_mask given", "padding_mask (None) - Reserved parameter. "
                 "Not implemented yet.")
        _require(prefix is None, "prefix given (sparse_mode 5 is not implemented)",
                 "This parameter takes effect only when `sparse_mode` is 5.")
        dtypes = (ms.float16, ms.bfloat16) + ((ms.float32,) if self.float32 else ())
        for name, x in (("query", query), ("key", key), ("value", value)):
            _require(x.dtype in dtypes, f"{name} of dtype {x.dtype}" + ("" if self.float32 else
                     " (float32 only when the test says float32=True)"), f"**{name}** (Tensor[float16, bfloat16])")
        _require(key.shape == value.shape, f"key {key.shape} and value {value.shape} differ",
                 "The key and value have the same shape.")
        n1, n2, _ = self._heads(query, key)
        q, k, v = (self._to_bnsd(x.astype(ms.float32), n) for x, n in ((query, n1), (key, n2), (value, n2)))
        if n2 != n1:
            k, v = (ops.repeat_interleave(x, n1 // n2, 1) for x in (k, v))
        b, _, s1, _ = q.shape
        s2 = k.shape[2]
        allowed = ms.Tensor(self._allowed(b, s1, s2, attn_mask, actual_seq_qlen, actual_seq_kvlen))
        scores = ops.matmul(q, k.swapaxes(-1, -2)) * self.scale_value
        scores = ops.where(allowed, scores, ms.Tensor(-1e30, ms.float32))
        row_max = scores.max(-1, keepdims=True)
        probs = ops.exp(scores - row_max)
        row_sum = probs.sum(-1, keepdims=True)
        out = ops.matmul(probs / row_sum, v)
        out = self._from_bnsd(out, query).astype(query.dtype)
        stats = (ops.broadcast_to(row_max, row_max.shape[:-1] + (8,)), ops.broadcast_to(row_sum, row_sum.shape[:-1] + (8,)))
        return stats[0], stats[1], ops.zeros((), query.dtype), out


def use_stand_in(network, float32=False):
    """Swap the FlashAttentionScore primitive inside every MindFormers FlashAttention cell of network for the
    stand-in (same arguments); returns how many. Fails when there is none: the stand-in is never silent."""
    from mindformers.modules.flash_attention import FlashAttention

    count = 0
    for _, cell in network.cells_and_names():
        if isinstance(cell, FlashAttention):
            prim = cell.flash_attention
            args = {name: prim.attrs[name] for name in ("head_num", "keep_prob", "scale_value", "pre_tokens",
                                                        "next_tokens", "inner_precise")}
            args.update(input_layout=cell.input_layout, sparse_mode=cell.sparse_mode)
            cell.flash_attention = FlashAttentionScoreStandIn(**args, float32=float32)
            count += 1
    if not count:
        raise AssertionError("use_stand_in: the network holds no MindFormers FlashAttention cell")
    return count
