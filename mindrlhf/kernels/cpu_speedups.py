"""CPU-only replacements for MindSpore kernels that are slow on CPU, swapped into a built model.

Two tiers, both computing the stock formulas in float32 (gradients agree to float32 rounding):
1. Compiled kernels (kernels/cpu_kernels.cc, built on first use by native.py) where a C++ compiler is at hand:
   - the attention layer from its three projections to the merged heads in one kernel each way (RopeAttention):
     rotary embedding, scale, scores, mask, softmax and values, with no S x S tensor stored, keys a row cannot
     see skipped, and the backward recomputing the probabilities from each row's max and sum (FlashAttention's
     trick). Its causal part is implied, so the model's (B, 1, S, S) mask becomes one adder per key (KeyMask);
   - RMSNorm and SwiGLU, one pass each way (FusedRMSNorm, FusedSwiGLU).
   At the tiny shape these took a step from 62 to 40 ms: the stock chain was ~500 small launches.
2. Without a compiler (or MINDRLHF_COMPILED_KERNELS=0), MindSpore ops arranged around its slow CPU paths:
   - attention: the mask tiled over heads before its add (a broadcasting Add took 2.2 ms for (16, 4, 256, 256),
     Tile then Add 0.9 ms), the softmax backward's row sums as a MatMul against ones and tiled back (ReduceSum
     12 ms, MatMul 2 ms; the broadcasting Sub 3.5 ms, tiled under 1 ms), the 1/sqrt(d) scale on the query;
   - RMSNorm: row means as MatMuls and per-row factors tiled, forward and backward (28 -> 12 ms at (16, 512, 256)).
MINDRLHF_STOCK_KERNELS=1 (or the older MINDRLHF_STOCK_SOFTMAX=1) keeps the stock layers.

The swaps rely on private names of MindFormers' layers, listed once in MINDFORMERS_CONTRACT: a layer lacking one
keeps its stock class, and the model's one log line (`mindrlhf CPU kernels (...): swapped ...; ... kept stock:
why`) says which layers were swapped and which were not, and why.
"""
import ctypes
import os

import mindspore.common.dtype as mstype
from mindspore import Tensor, nn, ops
from mindspore.ops import operations as P

from mindrlhf.kernels import native


class MatMulSumSoftmax(nn.Cell):
    """Softmax over the last axis; its backward sums over that axis with a MatMul and tiles the sum back."""

    def __init__(self):
        super().__init__()
        self.softmax = P.Softmax()
        self.matmul = P.MatMul()
        self.tile = P.Tile()

    def construct(self, x):
        return self.softmax(x)

    def bprop(self, x, out, dout):
        shape = out.shape
        width = shape[-1]
        ones = ops.ones((width, 1), out.dtype)
        total = self.matmul((out * dout).reshape((-1, width)), ones)
        total = self.tile(total, (1, width)).reshape(shape)
        return (out * (dout - total),)


def _cpu_attn(self, query, key, value, mask):
    """LLamaAttention._attn with the scale on the query, a tiled mask and MatMulSumSoftmax (see module doc)."""
    score = self.batch_matmul_q_k(self.mul(query, self.inv_norm_factor), key)
    mask = self.cast_attn(self.tile_mask(mask, (1, score.shape[1], 1, 1)), score.dtype)
    score = self.add(mask, score)
    attention_probs = self.softmax(self.cast_attn(score, self.softmax_dtype))
    weighted_values = self.batch_matmul(self.cast(attention_probs, self.dtype), value)
    return self._merge_heads(weighted_values)


def _kernel(library, name, out_shape, out_dtype):
    return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


class RopeAttention(nn.Cell):
    """The attention layer between its projections, by the compiled kernel: q (B, S, H·D), k and v (B, S, G·D)
    (G key heads, shared by H/G query heads each), the rotary tables cos and sin (1, 1, S, D) and the mask: an
    adder (B, 1, 1, S) per key (KeyMask) or (B, 1, S, S), or packed rows (B, 2, 1, S) of per-token positions and
    layout codes as mindrlhf/data/packing.py builds them (several sequences per row, each token rotated by its own
    position, each sequence seeing only itself, keys before a sequence's start not computed) -> (out (B, S, H·D),
    each row's max score and 1/sum (B, H, S, 2)). Works on (B·S, ·) inputs too (the 2-D layout); the mask gives B
    and S. A packed position outside [0, S) or a malformed mask makes the op raise (the kernel returns nonzero)."""

    HEAD_SIZES = (16, 32, 64, 128)

    def __init__(self, library):
        super().__init__()
        self.forward_op = _kernel(library, "RopeAttentionForward", _attention_shapes,
                                  lambda q, k, v, cos, sin, m: (q, q))
        self.backward_op = _kernel(library, "RopeAttentionBackward",
                                   lambda q, k, v, cos, sin, m, o, st, g: (q, k, v),
                                   lambda q, k, v, cos, sin, m, o, st, g: (q, k, v))

    def construct(self, query, key, value, cos, sin, mask):
        return self.forward_op(query, key, value, cos, sin, mask)

    def bprop(self, query, key, value, cos, sin, mask, out, dout):
        dq, dk, dv = self.backward_op(query, key, value, cos, sin, mask, out[0], out[1], dout[0])
        return dq, dk, dv, ops.zeros_like(cos), ops.zeros_like(sin), ops.zeros_like(mask)


def _attention_shapes(q, k, v, cos, sin, mask):
    seq, size = mask[-1], cos[-1]
    heads = q[-1] // size
    packed = mask[1] == 2  # (B, 2, 1, S): one mask row per batch row, even for B == 1
    batch = mask[0] if mask[0] > 1 or packed else (q[0] * q[1] // seq if len(q) == 3 else q[0] // seq)
    return q, (batch, heads, seq, 2)


class KeyMask(nn.Cell):
    """The legacy causal mask's replacement when every attention layer is RopeAttention: (1 - (token != pad))
    * -10000 per key, (B, 1, 1, S), instead of the (B, 1, S, S) product with the lower triangle, which the kernel
    applies itself. The stock one cost 2 ms a step at the tiny shape, half of it slicing a constant."""

    def __init__(self, pad_token_id, dtype):
        super().__init__()
        self.pad_token_id = pad_token_id
        self.dtype = dtype

    def construct(self, tokens=None, masks=None, seq_chunk=None):
        visible = ops.cast(ops.not_equal(tokens, self.pad_token_id), self.dtype)
        return ((1.0 - visible) * -10000.0).reshape((tokens.shape[0], 1, 1, tokens.shape[1]))


def _rope_attention_construct(self, x, freqs_cis, mask=None, batch_valid_length=None, block_tables=None,
                              slot_mapping=None, prefix_keys_values=None, q_seq_lens=None, kv_mask=None,
                              seq_chunk=None, actual_seq_len=None):
    """LLamaAttention.construct for training and scoring without a KV cache (see _rope_unfusable): projections,
    RopeAttention, output projection."""
    ori_dtype = x.dtype
    query = self.cast(self.wq(x), self.dtype)
    key = self.cast(self.wk(x), self.dtype)
    value = self.cast(self.wv(x), self.dtype)
    freqs_cos, freqs_sin, _ = freqs_cis
    context, _ = self.rope_attention(query, key, value, ops.stop_gradient(freqs_cos), ops.stop_gradient(freqs_sin),
                                     ops.stop_gradient(mask))
    return self.cast(self.wo(context), ori_dtype)


class FusedRMSNorm(nn.Cell):
    """x * rsqrt(mean(x², -1) + eps) * weight by the compiled kernel, forward and backward."""

    def __init__(self, library, eps):
        super().__init__()
        self.eps = Tensor([eps], mstype.float32)
        self.forward_op = _kernel(library, "RmsNormForward", lambda x, w, e: x, lambda x, w, e: x)
        self.backward_op = _kernel(library, "RmsNormBackward", lambda x, w, e, g: (x, w), lambda x, w, e, g: (x, w))

    def construct(self, x, weight):
        return self.forward_op(x, weight, self.eps)

    def bprop(self, x, weight, out, dout):
        return self.backward_op(x, weight, self.eps, dout)


class FusedSwiGLU(nn.Cell):
    """silu(gate) * up by the compiled kernel, forward and backward."""

    def __init__(self, library):
        super().__init__()
        self.forward_op = _kernel(library, "SwigluForward", lambda g, u: g, lambda g, u: g)
        self.backward_op = _kernel(library, "SwigluBackward", lambda g, u, d: (g, u), lambda g, u, d: (g, u))

    def construct(self, gate, up):
        return self.forward_op(gate, up)

    def bprop(self, gate, up, out, dout):
        return self.backward_op(gate, up, dout)


def _swiglu_construct(self, x):
    """LlamaFeedForward.construct with w1's SiLU and the product in one kernel (w1's own activation is off)."""
    x = self.cast(x, self.dtype)
    return self.w2(self.swiglu_kernel(self.w1(x), self.w3(x)))


def _fused_norm_construct(self, x):
    """LlamaRMSNorm.construct by FusedRMSNorm."""
    return self.fused_norm(x, self.weight)


_CPU_CLASSES = {}


def _cpu_class(cls, method, function):
    """A subclass of a layer's own class with one method replaced (one per class and replacement, so isinstance
    holds)."""
    key = (cls, method, function)
    if key not in _CPU_CLASSES:
        _CPU_CLASSES[key] = type(f"Cpu{cls.__name__}", (cls,), {method: function, "__module__": __name__})
    return _CPU_CLASSES[key]


def cpu_speedups_apply(config) -> bool:
    """Whether the swaps are safe: CPU, one process or data parallel (no operator sharding to keep), no flash
    attention, no KV cache, no recompute, and not switched off with MINDRLHF_STOCK_KERNELS=1."""
    from mindspore import context
    from mindspore.context import ParallelMode

    if "1" in (os.environ.get("MINDRLHF_STOCK_KERNELS"), os.environ.get("MINDRLHF_STOCK_SOFTMAX")):
        return False
    if context.get_context("device_target") != "CPU" or getattr(config, "use_flash_attention", False):
        return False
    if getattr(config, "use_past", False):
        return False
    if context.get_auto_parallel_context("parallel_mode") not in (ParallelMode.STAND_ALONE, ParallelMode.DATA_PARALLEL):
        return False
    recompute = getattr(getattr(config, "parallel_config", None), "recompute", None)
    return not (recompute is not None and (getattr(recompute, "recompute", False)
                                           or getattr(recompute, "select_recompute", False)))


def _float32(value) -> bool:
    return value == mstype.float32 or str(value).lower().endswith("float32")


# The contract with MindFormers (pinned 1.9.0): the swaps read and replace private parts of its legacy Llama
# layers. Each swap names the layer class it applies to and every attribute or method of it that it relies on;
# a layer lacking one keeps its stock class (one log line says which name is missing), and
# tests/test_mindformers_contract.py fails on the pinned version, so an upgrade that renames one fails a named
# test instead of quietly slowing users down. Replaced methods must keep the stock signature
# (CONTRACT_SIGNATURES), since MindFormers' callers pass their arguments by position.
MINDFORMERS_CONTRACT = {
    "RopeAttention": ("LLamaAttention", (
        "construct", "wq", "wk", "wv", "wo", "cast", "dtype", "softmax_dtype", "apply_rotary_emb", "head_dim",
        "inv_norm_factor", "qkv_concat", "use_past", "context_parallel", "input_layout", "seq_pipe")),
    "MatMulSumSoftmax": ("LLamaAttention", (
        "_attn", "_merge_heads", "softmax", "inv_norm_factor", "mul", "add", "cast", "cast_attn", "batch_matmul",
        "batch_matmul_q_k", "dtype", "softmax_dtype")),
    "FusedRMSNorm": ("LlamaRMSNorm", ("construct", "self_define", "_self_norm", "rms_norm", "compute_type", "eps",
                                      "weight")),
    "MatMulRMSNorm": ("LlamaRMSNorm", ("construct", "self_define", "_self_norm", "rms_norm", "compute_type", "eps",
                                       "weight")),
    "FusedSwiGLU": ("LlamaFeedForward", ("construct", "w1", "w2", "w3", "cast", "dtype", "ffn_concat",
                                         "use_fused_swiglu", "expert_num")),
    "KeyMask": ("LlamaModel", ("casual_mask", "seq_pipe", "use_ring_attention", "use_eod_attn_mask_compression")),
}
# Behaviour relied on beyond names: w1 of LlamaFeedForward is a Linear whose SiLU runs inside it
# (`activation_flag`, `activation` a LlamaSiLU: FusedSwiGLU turns it off and applies SiLU itself), the model's
# casual_mask carries `pad_token_id` and `dtype` (KeyMask rebuilds it from them), and apply_rotary_emb has a
# `dtype`; freqs_cis is (cos, sin, swap).
CONTRACT_SIGNATURES = {
    ("LLamaAttention", "construct"): ("self", "x", "freqs_cis", "mask", "batch_valid_length", "block_tables",
                                      "slot_mapping", "prefix_keys_values", "q_seq_lens", "kv_mask", "seq_chunk",
                                      "actual_seq_len"),
    ("LlamaRMSNorm", "construct"): ("self", "x"),
    ("LlamaFeedForward", "construct"): ("self", "x"),
}


def contract_gaps(cell, swap: str) -> list:
    """The names `swap` relies on that this layer lacks (empty when the contract holds)."""
    return [name for name in MINDFORMERS_CONTRACT[swap][1] if not hasattr(cell, name)]


def _layer_class(cell):
    """Which of the contract's MindFormers classes this cell is (by class name along its bases), or None."""
    classes = {cls for cls, _ in MINDFORMERS_CONTRACT.values()}
    return next((cls.__name__ for cls in type(cell).__mro__ if cls.__name__ in classes), None)


def _first_failing(checks):
    return next((reason for ok, reason in checks if not ok), None)


def _rope_unfusable(cell):
    """Why RopeAttention cannot take this LLamaAttention (None if it can): it covers the plain path of
    LLamaAttention.construct: float32, separate q/k/v projections, no KV cache, no context parallel, the 1/sqrt(d)
    scale and a head size it is built for."""
    size = cell.head_dim
    return _first_failing([
        (_float32(cell.dtype) and _float32(cell.softmax_dtype)
         and _float32(getattr(cell.apply_rotary_emb, "dtype", None)), "compute or softmax dtype is not float32"),
        (size in RopeAttention.HEAD_SIZES, f"head size {size} is not one of {RopeAttention.HEAD_SIZES}"),
        (not cell.qkv_concat, "qkv_concat: one fused q/k/v projection"),
        (not cell.use_past, "use_past: KV cache"),
        (cell.context_parallel <= 1, "context parallel"),
        (cell.input_layout != "TND", "TND input layout"),
        (not cell.seq_pipe, "seq_pipe"),
        (abs(float(cell.inv_norm_factor.asnumpy()) - size ** -0.5) < 1e-7, "a scale other than 1/sqrt(head size)"),
    ])


def _swiglu_unfusable(cell):
    w1 = cell.w1
    return _first_failing([
        (not cell.ffn_concat, "ffn_concat: one fused w1/w3 projection"),
        (not cell.use_fused_swiglu, "use_fused_swiglu: MindFormers' own fused kernel"),
        (getattr(cell, "expert_num", 1) == 1, "mixture of experts"),
        (_float32(cell.dtype), "compute dtype is not float32"),
        (getattr(w1, "activation_flag", False) and type(getattr(w1, "activation", None)).__name__ == "LlamaSiLU",
         "w1 does not apply LlamaSiLU itself"),
    ])


def _norm_unswappable(cell, float32_model):
    return _first_failing([
        (float32_model and _float32(cell.compute_type), "not float32"),
        (cell.self_define and cell.rms_norm is not None, "MindFormers' fused RmsNorm kernel in use"),
    ])


def _summary(library, swapped, fell_back) -> str:
    """One greppable line: `mindrlhf CPU kernels (...): swapped N kind, ...[; N kind kept stock: why]`."""
    source = "compiled" if library else "MindSpore ops: compiled kernels not built or switched off"
    done = ", ".join(f"{count} {kind}" for kind, count in swapped.items() if count) or "nothing"
    kept = "".join(f"; {count} {kind} kept stock: {why}" for (kind, why), count in sorted(fell_back.items()))
    return f"mindrlhf CPU kernels ({source}): swapped {done}{kept}"


def use_cpu_kernels(backbone, config, log=None) -> dict:
    """Swap the compiled kernels (where they build) or the MindSpore rearrangements into a legacy LlamaModel
    where cpu_speedups_apply(config). Returns how many layers got which; `log` gets one line saying which layers
    were swapped and which kept their stock class, and why."""
    swapped = {"rope_attention": 0, "attention": 0, "fused_norm": 0, "norm": 0, "swiglu": 0, "key_mask": 0}
    if not cpu_speedups_apply(config):
        return swapped
    fell_back = {}

    def keep(kind, why):
        fell_back[(kind, why)] = fell_back.get((kind, why), 0) + 1

    float32 = _float32(getattr(config, "compute_dtype", "float32"))
    library = native.library("cpu_kernels")
    if library:
        ctypes.CDLL(library).MindrlhfSetThreads(native.local_threads())
    attention_layers = 0
    for _, cell in list(backbone.cells_and_names()):
        layer = _layer_class(cell)
        if layer == "LLamaAttention":
            attention_layers += 1
            if library:
                gaps = contract_gaps(cell, "RopeAttention")
                why = f"lacks {gaps}" if gaps else _rope_unfusable(cell)
                if not why:
                    cell.__class__ = _cpu_class(type(cell), "construct", _rope_attention_construct)
                    cell.rope_attention = RopeAttention(library)
                    swapped["rope_attention"] += 1
                    continue
                keep("attention layers (RopeAttention)", why)
            gaps = contract_gaps(cell, "MatMulSumSoftmax")
            if gaps or not isinstance(cell.softmax, P.Softmax):
                keep("attention layers (MatMulSumSoftmax)", f"lacks {gaps}" if gaps else "softmax is not P.Softmax")
                continue
            cell.__class__ = _cpu_class(type(cell), "_attn", _cpu_attn)
            cell.softmax = MatMulSumSoftmax()
            cell.tile_mask = P.Tile()
            swapped["attention"] += 1
        elif layer == "LlamaRMSNorm":
            kind = "FusedRMSNorm" if library else "MatMulRMSNorm"
            gaps = contract_gaps(cell, kind)
            why = f"lacks {gaps}" if gaps else _norm_unswappable(cell, float32)
            if why:
                keep(f"RMSNorms ({kind})", why)
            elif library:
                cell.__class__ = _cpu_class(type(cell), "construct", _fused_norm_construct)
                cell.fused_norm = FusedRMSNorm(library, cell.eps)
                swapped["fused_norm"] += 1
            else:
                cell.__class__ = _cpu_class(type(cell), "construct", _cpu_norm)
                cell.matmul_norm = MatMulRMSNorm(cell.eps)
                swapped["norm"] += 1
        elif layer == "LlamaFeedForward" and library:
            gaps = contract_gaps(cell, "FusedSwiGLU")
            why = f"lacks {gaps}" if gaps else _swiglu_unfusable(cell)
            if why:
                keep("feed-forwards (FusedSwiGLU)", why)
                continue
            cell.__class__ = _cpu_class(type(cell), "construct", _swiglu_construct)
            cell.w1.activation_flag = False
            cell.swiglu_kernel = FusedSwiGLU(library)
            swapped["swiglu"] += 1
    stock_mask = getattr(backbone, "casual_mask", None)
    if swapped["rope_attention"]:
        gaps = contract_gaps(backbone, "KeyMask")
        why = _first_failing([
            (not gaps, f"lacks {gaps}"),
            (swapped["rope_attention"] == attention_layers, "some attention layers are not RopeAttention"),
            (hasattr(stock_mask, "pad_token_id") and hasattr(stock_mask, "dtype"),
             "casual_mask has no pad_token_id/dtype"),
            (not gaps and not (backbone.seq_pipe or backbone.use_ring_attention
                               or backbone.use_eod_attn_mask_compression),
             "seq_pipe, ring attention or EOD mask compression"),
        ])
        if why:
            keep("causal mask (KeyMask)", why)
        else:
            backbone.casual_mask = KeyMask(stock_mask.pad_token_id, stock_mask.dtype)
            swapped["key_mask"] = 1
    if log:
        log(_summary(library, swapped, fell_back))
    return swapped


class MatMulRMSNorm(nn.Cell):
    """x * rsqrt(mean(x^2, -1) + eps) * weight in float32, its row means as MatMuls against ones and every
    per-row factor tiled out before use, forward and backward (the broadcasting Mul and ReduceSum are slow)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps
        self.matmul = P.MatMul()
        self.tile = P.Tile()

    def _normed(self, x):
        width = x.shape[-1]
        rows = x.reshape((-1, width))
        mean = self.matmul(ops.square(rows), ops.ones((width, 1), rows.dtype)) / width
        return rows, self.tile(ops.rsqrt(mean + self.eps), (1, width))

    def construct(self, x, weight):
        rows, scale = self._normed(x)
        return (rows * scale * weight).reshape(x.shape)

    def bprop(self, x, weight, out, dout):
        rows, scale = self._normed(x)
        width = rows.shape[-1]
        normed = rows * scale
        grad = dout.reshape((-1, width))
        dweight = self.matmul(ops.ones((1, rows.shape[0]), rows.dtype), grad * normed).reshape(weight.shape)
        grad = grad * weight
        mean = self.matmul(grad * normed, ops.ones((width, 1), rows.dtype)) / width
        dx = scale * (grad - normed * self.tile(mean, (1, width)))
        return dx.reshape(x.shape), dweight


def _cpu_norm(self, x):
    """LlamaRMSNorm.construct through MatMulRMSNorm (float32 models only, see use_cpu_kernels)."""
    return self.matmul_norm(x, self.weight)
