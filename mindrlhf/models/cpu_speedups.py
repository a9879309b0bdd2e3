"""CPU-only replacements for MindSpore kernels that are slow on CPU, swapped into a built model.

Attention softmax backward: MindSpore's CPU backend expands SoftmaxGrad into Mul, ReduceSum(last axis), Sub,
Mul, and its ReduceSum over the (batch, heads, seq, seq) scores is slow: at the tiny CPU shape (seq 256) the
expanded backward took 17% of a profiled training step. The same formula, dx = y * (dy - sum(y * dy, -1)),
with the sum done as a MatMul against a column of ones (oneDNN) runs about 2.5x faster for that op.
Gradients agree with the stock backward to float32 rounding (the sums are added in another order).
MINDRLHF_STOCK_SOFTMAX=1 in the environment keeps the stock backward (for comparisons).
"""
import os

from mindspore import nn, ops
from mindspore.ops import operations as P


class MatMulSumSoftmax(nn.Cell):
    """Softmax over the last axis; its backward sums over that axis with a MatMul instead of ReduceSum."""

    def __init__(self):
        super().__init__()
        self.softmax = P.Softmax()
        self.matmul = P.MatMul()

    def construct(self, x):
        return self.softmax(x)

    def bprop(self, x, out, dout):
        shape = out.shape
        ones = ops.ones((shape[-1], 1), out.dtype)
        total = self.matmul((out * dout).reshape((-1, shape[-1])), ones).reshape(shape[:-1] + (1,))
        return (out * (dout - total),)


def use_cpu_attention_softmax(backbone, config) -> int:
    """Swap MatMulSumSoftmax into each legacy LLamaAttention of `backbone` where that is safe: CPU, one process
    or data parallel (no operator sharding to keep), no flash attention, no recompute. Returns layers swapped."""
    from mindspore import context
    from mindspore.context import ParallelMode

    if os.environ.get("MINDRLHF_STOCK_SOFTMAX") == "1":
        return 0
    if context.get_context("device_target") != "CPU" or getattr(config, "use_flash_attention", False):
        return 0
    if context.get_auto_parallel_context("parallel_mode") not in (ParallelMode.STAND_ALONE, ParallelMode.DATA_PARALLEL):
        return 0
    recompute = getattr(getattr(config, "parallel_config", None), "recompute", None)
    if recompute is not None and (getattr(recompute, "recompute", False) or getattr(recompute, "select_recompute", False)):
        return 0
    swapped = 0
    for layer in getattr(backbone, "layers", []):
        attention = getattr(layer, "attention", None)
        if attention is not None and isinstance(getattr(attention, "softmax", None), P.Softmax):
            attention.softmax = MatMulSumSoftmax()
            swapped += 1
    return swapped
