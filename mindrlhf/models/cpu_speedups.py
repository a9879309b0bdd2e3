"""CPU-only replacements for MindSpore kernels that are slow on CPU, swapped into a built model.

The legacy attention core is q·kᵀ, times 1/√d, plus the (B, 1, S, S) mask, softmax, times v. On CPU the
(B, heads, S, S) score tensor dominates the step, and three of its ops take MindSpore's slow paths:
- the mask add broadcasts over heads (2.2 ms for (16, 4, 256, 256); a Tile then a same-shape Add: 0.9 ms);
- the softmax backward dx = y * (dy - sum(y * dy, -1)) is expanded into a ReduceSum over the last axis
  (12 ms; as a MatMul against a column of ones: 2 ms) and a Sub that broadcasts that sum back (3.5 ms;
  tiled first: under 1 ms);
- the 1/√d scale runs on the scores, forward and backward; on the query it touches S/d times fewer values.
Same formulas, so gradients agree with the stock path to float32 rounding (sums are added in another order and
the scale lands before the product). MINDRLHF_STOCK_SOFTMAX=1 in the environment keeps the stock attention.
"""
import os

from mindspore import nn, ops
from mindspore.ops import operations as P


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


_CPU_CLASSES = {}


def _cpu_class(cls):
    """A subclass of the attention's own class whose _attn is _cpu_attn (one per class, so isinstance holds)."""
    if cls not in _CPU_CLASSES:
        _CPU_CLASSES[cls] = type(f"Cpu{cls.__name__}", (cls,), {"_attn": _cpu_attn, "__module__": __name__})
    return _CPU_CLASSES[cls]


def use_cpu_attention(backbone, config) -> int:
    """Swap the CPU attention core into each legacy LLamaAttention of `backbone` where that is safe: CPU, one
    process or data parallel (no operator sharding to keep), no flash attention, no KV cache, no recompute.
    Returns the number of layers swapped."""
    from mindspore import context
    from mindspore.context import ParallelMode

    if os.environ.get("MINDRLHF_STOCK_SOFTMAX") == "1":
        return 0
    if context.get_context("device_target") != "CPU" or getattr(config, "use_flash_attention", False):
        return 0
    if getattr(config, "use_past", False):
        return 0
    if context.get_auto_parallel_context("parallel_mode") not in (ParallelMode.STAND_ALONE, ParallelMode.DATA_PARALLEL):
        return 0
    recompute = getattr(getattr(config, "parallel_config", None), "recompute", None)
    if recompute is not None and (getattr(recompute, "recompute", False) or getattr(recompute, "select_recompute", False)):
        return 0
    swapped = 0
    for layer in getattr(backbone, "layers", []):
        attention = getattr(layer, "attention", None)
        if attention is None or not isinstance(getattr(attention, "softmax", None), P.Softmax):
            continue
        if not hasattr(attention, "inv_norm_factor") or not hasattr(attention, "_merge_heads"):
            continue
        attention.__class__ = _cpu_class(type(attention))
        attention.softmax = MatMulSumSoftmax()
        attention.tile_mask = P.Tile()
        swapped += 1
    return swapped
