"""CPU-only replacements for MindSpore kernels that are slow on CPU, swapped into a built model.

The legacy attention core is q·kᵀ, times 1/√d, plus the (B, 1, S, S) mask, softmax, times v. On CPU the
(B, heads, S, S) score tensor dominates the step, and three of its ops take MindSpore's slow paths:
- the mask add broadcasts over heads (2.2 ms for (16, 4, 256, 256); a Tile then a same-shape Add: 0.9 ms);
- the softmax backward dx = y * (dy - sum(y * dy, -1)) is expanded into a ReduceSum over the last axis
  (12 ms; as a MatMul against a column of ones: 2 ms) and a Sub that broadcasts that sum back (3.5 ms;
  tiled first: under 1 ms);
- the 1/√d scale runs on the scores, forward and backward; on the query it touches S/d times fewer values.
The legacy RMSNorm (float32) has the same two slow paths, a mean over the last axis and a per-row factor
broadcast back, forward and backward (28 ms for a (16, 512, 256) input; with MatMul means and tiling: 12 ms).
Same formulas, so gradients agree with the stock path to float32 rounding (sums are added in another order and
the scale lands before the product).
In float32, where a C++ compiler is at hand, the whole attention core is instead one compiled kernel each way
(FusedAttention, kernels/attention.cc): no S x S tensor is stored, keys a row cannot see are skipped, and the
backward recomputes the probabilities from each row's max and sum, as FlashAttention does. At the tiny shape
that is 5 ms for a layer's forward and backward instead of 12.
MINDRLHF_STOCK_KERNELS=1 (or the older MINDRLHF_STOCK_SOFTMAX=1) in the environment keeps the stock layers;
MINDRLHF_COMPILED_KERNELS=0 keeps only the compiled kernel out.
"""
import ctypes
import os

import mindspore.common.dtype as mstype
from mindspore import nn, ops
from mindspore.ops import operations as P

from mindrlhf.models import native


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


class FusedAttention(nn.Cell):
    """softmax(q kᵀ + mask) v by the compiled kernel: q, k, v (B, H, S, D) float32, the mask adder (B, 1, S, S),
    or (B, 1, 1, S) per key with the causal part implied (KeyMask) -> (out (B, S, H·D) with heads merged, each
    row's max score and 1/sum (B, H, S, 2)). The backward recomputes the probabilities from those instead of
    storing them; the mask gets no gradient (it is built from the token ids)."""

    HEAD_SIZES = (16, 32, 64, 128)

    def __init__(self, path):
        super().__init__()
        ctypes.CDLL(path).FusedAttentionSetThreads(native.local_threads())
        self.forward_op = ops.Custom(f"{path}:FusedAttentionForward", out_shape=_forward_shapes,
                                     out_dtype=lambda q, k, v, m: (q, q), func_type="aot")
        self.backward_op = ops.Custom(f"{path}:FusedAttentionBackward",
                                      out_shape=lambda q, k, v, m, o, lse, g: (q, k, v),
                                      out_dtype=lambda q, k, v, m, o, lse, g: (q, k, v), func_type="aot")

    def construct(self, query, key, value, mask):
        return self.forward_op(query, key, value, mask)

    def bprop(self, query, key, value, mask, out, dout):
        dq, dk, dv = self.backward_op(query, key, value, mask, out[0], out[1], dout[0])
        return dq, dk, dv, ops.zeros_like(mask)


class KeyMask(nn.Cell):
    """The legacy causal mask's replacement when every attention layer is fused: (1 - (token != pad)) * -10000
    per key, (B, 1, 1, S), instead of the (B, 1, S, S) product with the lower triangle, which the kernel applies
    itself. The stock one cost 2 ms a step at the tiny shape, half of it slicing a constant."""

    def __init__(self, pad_token_id, dtype):
        super().__init__()
        self.pad_token_id = pad_token_id
        self.dtype = dtype

    def construct(self, tokens=None, masks=None, seq_chunk=None):
        visible = ops.cast(ops.not_equal(tokens, self.pad_token_id), self.dtype)
        return ops.stop_gradient(((1.0 - visible) * -10000.0).reshape((tokens.shape[0], 1, 1, tokens.shape[1])))


def _forward_shapes(q, k, v, mask):
    batch, heads, seq, size = q
    return (batch, seq, heads * size), (batch, heads, seq, 2)


def _fused_attn(self, query, key, value, mask):
    """LLamaAttention._attn by FusedAttention (scale applied to the query, heads merged by the kernel)."""
    out, _ = self.fused_attention(self.mul(query, self.inv_norm_factor), key, value, ops.stop_gradient(mask))
    if self.rmsnorm_compute_2d:
        out = self.reshape(out, (-1, out.shape[-1]))
    return out


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


def _fusable(cell) -> bool:
    """The compiled kernel computes in float32 and is built for these head sizes."""
    return (getattr(cell, "dtype", None) == mstype.float32 and getattr(cell, "softmax_dtype", None) == mstype.float32
            and getattr(cell, "head_dim", None) in FusedAttention.HEAD_SIZES)


def use_cpu_kernels(backbone, config) -> dict:
    """Swap the CPU attention core (compiled where it can be) and RMSNorm into a legacy LlamaModel where
    cpu_speedups_apply(config). Returns how many attention layers and norms were swapped, and how."""
    swapped = {"attention": 0, "fused_attention": 0, "norm": 0}
    if not cpu_speedups_apply(config):
        return swapped
    float32 = str(getattr(config, "compute_dtype", "float32")).lower().endswith("float32")
    for _, cell in list(backbone.cells_and_names()):
        if (isinstance(getattr(cell, "softmax", None), P.Softmax) and hasattr(cell, "inv_norm_factor")
                and hasattr(cell, "_merge_heads") and hasattr(cell, "_attn")):
            kernel = native.library("attention") if _fusable(cell) else None
            if kernel:
                cell.__class__ = _cpu_class(type(cell), "_attn", _fused_attn)
                cell.fused_attention = FusedAttention(kernel)
                swapped["fused_attention"] += 1
                continue
            cell.__class__ = _cpu_class(type(cell), "_attn", _cpu_attn)
            cell.softmax = MatMulSumSoftmax()
            cell.tile_mask = P.Tile()
            swapped["attention"] += 1
        elif (float32 and getattr(cell, "self_define", False) and hasattr(cell, "_self_norm")
              and str(getattr(cell, "compute_type", "")).lower().endswith("float32")
              and getattr(cell, "rms_norm", None) is not None):
            cell.__class__ = _cpu_class(type(cell), "construct", _cpu_norm)
            cell.matmul_norm = MatMulRMSNorm(cell.eps)
            swapped["norm"] += 1
    stock_mask = getattr(backbone, "casual_mask", None)
    if (swapped["fused_attention"] and not swapped["attention"] and hasattr(stock_mask, "pad_token_id")
            and not getattr(backbone, "seq_pipe", False) and not getattr(backbone, "use_ring_attention", False)
            and not getattr(backbone, "use_eod_attn_mask_compression", False)):
        backbone.casual_mask = KeyMask(stock_mask.pad_token_id, stock_mask.dtype)
        swapped["key_mask"] = 1
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
