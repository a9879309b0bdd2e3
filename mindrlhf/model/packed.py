"""Padding-free ("packed") forward and loss of LlamaRewardModel (issue #25; the formats are in PACKING.md).

Several sequences share a row of seq_length tokens; each attends only to its own span, positions restart per
sequence, and rewards are read at flat token indices. The layout arrives as one int32 code per token,
code = segment * 8 + kind (segment 0: filler; kind & 3: 0 plain/prefix, 1 chosen answer, 2 rejected answer;
kind & 4: a pad inside a span, invisible as a key). Key j is visible to query i (same row) when
  filler query: j == i; otherwise j <= i, same segment, j not a pad, and (branch_j == 0 or branch_j == branch_i),
which is what the padded layout computes for every token the loss or a score reads.

Two ways to feed the attention layers, chosen once at build:
- "kernel": every attention layer is the compiled RopeAttention (cpu_speedups): the mask argument is float32
  (B, 2, 1, S) = [positions; codes] and cos/sin the usual (S, D) tables; the kernel finds spans and rotary rows.
- "adder": stock layers or the MatMulSumSoftmax fallback: a (B, 1, S, S) adder (0 visible, -10000 hidden) built
  in-graph from the codes, and cos/sin gathered per token into (B, 1, S, D) (RotaryEmbedding broadcasts them).
- "ascend": FlashAttention (use_flash_attention) rebuilt as TND, sparse_mode 3: the compressed (2048, 2048)
  causal mask, actual_seq_len (the block ends) as actual_seq_qlen/kvlen, and the adder path's per-token cos/sin
  (mindrlhf.model.ascend_packing).
"""
from typing import Optional

import numpy as np

import mindspore.common.dtype as mstype
from mindspore import Tensor, nn, ops

from mindrlhf.config_access import config_getter
from mindrlhf.data import packing as pk
from mindrlhf.errors import ConfigError
from mindrlhf.model.loss import loss_options

HIDDEN = -10000.0  # the legacy mask's adder: exp() of it is exactly 0 in float32


def packing_mode(config) -> Optional[str]:
    """model_config.packing: None when off (false, absent), else 'pairs' or 'shared_prefix'; anything else is
    a ConfigError naming the field (mindrlhf.data.packing parses it, the layout's one home)."""
    return pk.packing_mode(config_getter(config)("packing", None), "model_config.packing")


def uses_packed_kernel(backbone) -> bool:
    """Whether every attention layer of a legacy LlamaModel is the compiled RopeAttention (use_cpu_kernels sets
    `rope_attention` on the layers it swaps): then the kernel takes the (B, 2, 1, S) layout itself."""
    layers = list(backbone.layers)
    return bool(layers) and all(hasattr(layer.attention, "rope_attention") for layer in layers)


class LayoutMask(nn.Cell):
    """codes (B, S) int32 -> the attention adder (B, 1, S, S): 0 where PACKING.md's rule makes key j visible
    to query i, -10000 elsewhere; in `dtype`. max_seq: the longest row (index constants are sliced to S)."""

    def __init__(self, max_seq, dtype=mstype.float32):
        super().__init__()
        self.dtype = dtype
        self.index = Tensor(np.arange(max_seq, dtype=np.int32))
        self.floor_div = ops.FloorDiv()
        self.slice = ops.StridedSlice()

    def construct(self, codes):
        batch, seq = codes.shape
        codes = ops.cast(codes, mstype.int32)
        segment = self.floor_div(codes, pk.SEGMENT)
        kind = codes - segment * pk.SEGMENT
        pad = ops.cast(kind >= pk.PAD, mstype.int32)
        branch = kind - pad * pk.PAD
        index = self.slice(self.index, (0,), (seq,), (1,))
        causal = ops.cast(index.reshape((seq, 1)) >= index.reshape((1, seq)), mstype.float32)  # j <= i
        diagonal = ops.cast(ops.equal(index.reshape((seq, 1)), index.reshape((1, seq))), mstype.float32)
        seg_q, seg_k = segment.reshape((batch, seq, 1)), segment.reshape((batch, 1, seq))
        branch_q, branch_k = branch.reshape((batch, seq, 1)), branch.reshape((batch, 1, seq))
        same = ops.cast(ops.equal(seg_q, seg_k), mstype.float32)
        key_ok = ops.cast(1 - pad, mstype.float32).reshape((batch, 1, seq))
        branch_ok = ops.maximum(ops.cast(ops.equal(branch_k, 0), mstype.float32),
                                ops.cast(ops.equal(branch_q, branch_k), mstype.float32))
        filler = ops.cast(ops.equal(seg_q, 0), mstype.float32)
        visible = filler * diagonal + (1.0 - filler) * (causal * same * key_ok * branch_ok)
        adder = (1.0 - visible) * HIDDEN
        return ops.cast(adder.reshape((batch, 1, seq, seq)), self.dtype)


def _softplus(x):
    """log(1 + exp(x)) without overflow: relu(x) + log1p(exp(-|x|))."""
    return ops.relu(x) + ops.log1p(ops.exp(-ops.abs(x)))


class PackedCompareLoss(nn.Cell):
    """The packed step's loss (PACKING.md, r the (R*S,) token rewards):
    span:       sum_c w_c * softplus(r[rej_c] - r[ch_c] + m_c)        (w = loss_mask[0], m = margin[0])
    last_token: sum_p v_p * softplus(s_r - s_c + m_p)                  (v = loss_mask[1], m = margin[1])
    centering:  + c * sum_p v_p * (s_c + s_r)^2                        (s = r at end_ind rows 2, 3)
    The weights already hold 1/n_pairs (and 1/count_p), so these sums are the padded CompareLoss's means.
    Gathers take the rewards whole (replicated strategies): flat indices cross any batch split."""

    def __init__(self, config=None):
        super().__init__()
        self.loss_type, self.center = loss_options(config) if config is not None else ("span", 0.0)
        self.last_token = self.loss_type == "last_token"
        self.gather = ops.Gather().shard(((1,), (1, 1)))
        self.rows = ops.StridedSlice().shard(((1, 1),))
        self.margin_rows = ops.StridedSlice().shard(((1, 1),))
        self.weight_rows = ops.StridedSlice().shard(((1, 1),))

    def _row(self, op, x, i):
        return op(x, (i, 0), (i + 1, x.shape[1]), (1, 1)).reshape((-1,))

    def construct(self, rewards, loss_mask, end_ind, margin=None):
        rewards = ops.cast(rewards, mstype.float32).reshape((-1,))
        weights = ops.cast(loss_mask, mstype.float32)
        picked = self.gather(rewards, ops.cast(end_ind, mstype.int32), 0)  # (4, P)
        if margin is not None:
            margin = ops.cast(margin, mstype.float32)
        if self.last_token:
            chosen, rejected = self._row(self.rows, picked, 2), self._row(self.rows, picked, 3)
            x = rejected - chosen
            if margin is not None:
                x = x + self._row(self.margin_rows, margin, 1)
            loss = ops.reduce_sum(self._row(self.weight_rows, weights, 1) * _softplus(x))
        else:
            chosen, rejected = self._row(self.rows, picked, 0), self._row(self.rows, picked, 1)
            x = rejected - chosen
            if margin is not None:
                x = x + self._row(self.margin_rows, margin, 0)
            loss = ops.reduce_sum(self._row(self.weight_rows, weights, 0) * _softplus(x))
        if self.center > 0:
            total = self._row(self.rows, picked, 2) + self._row(self.rows, picked, 3)
            loss = loss + self.center * ops.reduce_sum(self._row(self.weight_rows, weights, 1) * ops.square(total))
        return loss


class PackedRewards:
    """The packed path of LlamaRewardModel: init_packing at build, packed_construct in construct when
    model_config.packing is set. A mixin, so that it runs the host's own cells and no parameter is registered twice;
    its host (an nn.Cell) must set HOST_CELLS before init_packing: `model` (MindFormers' LlamaModel, after the CPU
    kernel swaps), `v_head` (hidden -> 1) and `cast` (to float32, sharded as the head's output)."""

    HOST_CELLS = ("model", "v_head", "cast")
    model: nn.Cell
    v_head: nn.Cell
    cast: ops.Primitive

    def init_packing(self, config):
        """Choose the layout ("kernel" or "adder"), refuse what cannot run, build the loss and mask cells."""
        missing = [name for name in self.HOST_CELLS if getattr(self, name, None) is None]
        if missing:
            raise TypeError(f"{type(self).__name__}: PackedRewards needs its host's {', '.join(missing)} set before "
                            "init_packing")
        self.packing = packing_mode(config)
        self.packed_layout = None
        if not self.packing:
            return
        from mindrlhf.model.ascend_packing import on_flash_attention

        if on_flash_attention(config):
            self.packed_layout = self._accelerator_layout(config)
        elif uses_packed_kernel(self.model):  # the library is built from the tree's source (its cache key)
            self.packed_layout = "kernel"
        else:
            self.packed_layout = "adder"
        self.packed_loss = PackedCompareLoss(config)
        self.layout_mask = LayoutMask(max(int(config.seq_length), 1), config.compute_dtype)
        self.freqs_cos = self.model.freqs_mgr.freqs_cos
        self.freqs_sin = self.model.freqs_mgr.freqs_sin
        self.swap_mask = self.model.freqs_mgr.swap_mask
        self.gather_freqs = ops.Gather()
        self.gather_rewards = ops.Gather().shard(((1,), (1,)))

    def _accelerator_layout(self, config):
        """Packing on FlashAttention (Ascend): every layer's FlashAttention rebuilt as TND, sparse_mode 3
        (mindrlhf.model.ascend_packing checks the config: plain packing, last_token to train). Returns the
        layout name packed_backbone branches on."""
        from mindrlhf.model.ascend_packing import check_ascend_packing, compressed_causal_mask, use_tnd_attention

        check_ascend_packing(config, training=False)  # the loss-type rule is checked when training starts
        use_tnd_attention(self.model, config.parallel_config)  # a strategy counts only under (semi-)auto parallel
        self.tnd_mask = Tensor(compressed_causal_mask())
        return "ascend"

    def packed_backbone(self, input_ids, positions, codes, actual_seq_len=None):
        """LlamaModel.construct with per-token positions and the layout mask: (B, S) -> (B, S, hidden).
        Ascend: the layout is actual_seq_len (the TND block ends), the mask the compressed causal one."""
        model = self.model
        batch, seq = input_ids.shape
        if self.packed_layout == "kernel":
            freqs_cis = model.freqs_mgr(seq)
            mask = ops.stack((ops.cast(positions, mstype.float32), ops.cast(codes, mstype.float32)), 1)
            mask = mask.reshape((batch, 2, 1, seq))
        else:
            positions = ops.cast(positions, mstype.int32)
            head_dim = self.freqs_cos.shape[1]
            cos = self.gather_freqs(self.freqs_cos, positions, 0).reshape((batch, 1, seq, head_dim))
            sin = self.gather_freqs(self.freqs_sin, positions, 0).reshape((batch, 1, seq, head_dim))
            freqs_cis = (cos, sin, self.swap_mask)
            mask = self.tnd_mask if self.packed_layout == "ascend" else self.layout_mask(codes)
        compute_2d = self.training and model.rmsnorm_compute_2d
        h = ops.cast(model.tok_embeddings(input_ids), model.dtype)
        if not compute_2d:
            h = h.reshape((batch, seq, model.hidden_size))
        for i in range(model.num_layers):
            if self.packed_layout == "ascend":  # one FlashAttention call's list: the rows' entries flattened
                h = model.layers[i](h, freqs_cis, mask, actual_seq_len=actual_seq_len.reshape((-1,)))
            else:
                h = model.layers[i](h, freqs_cis, mask)
        if compute_2d:
            h = h.reshape((batch * seq, -1))
        return model.norm_out(h)

    def packed_construct(self, input_ids, positions, codes, loss_mask, end_ind, margin=None, actual_seq_len=None):
        """Training: the packed loss; eval: (P,) rewards at the flat indices end_ind."""
        batch, seq = input_ids.shape
        hidden = self.packed_backbone(input_ids, positions, codes, actual_seq_len).reshape((batch * seq, -1))
        rewards = self.cast(self.v_head(hidden), mstype.float32).reshape((-1,))
        if self.training:
            return self.packed_loss(rewards, loss_mask, end_ind, margin)
        return self.gather_rewards(rewards, ops.cast(end_ind, mstype.int32).reshape((-1,)), 0)
