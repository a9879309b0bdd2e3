"""A train-one-step cell for YAML `runner_wrapper`: MFTrainOneStepCell on Ascend/GPU, and runnable on CPU.

The stock cell's overflow check falls through to the Ascend-only NPUGetFloatStatusV2 on CPU, so the CPU path
needs its own check for a dynamic loss scale to work. MindSpore's CPU reductions over a whole tensor are slow
(at the tiny CPU shape the 32000 x 64 embedding gradient took 8 ms for the clip's sum of squares and 6 ms for
IsFinite + ReduceAll, a sixth of the step), so on CPU both reduce each gradient with a MatMul against a
column of ones instead (under 1 ms each):
- overflow: the sum of a gradient is inf or NaN when any element is (DeepSpeed's check); a finite sum that
  overflows float32 is reported as an overflow too, and the step is skipped as for a real one;
- clipping: the same global norm as MindFormers' ClipGradNorm, its sum of squares added in another order.
"""
import mindspore.common.dtype as mstype
from mindspore import Tensor, context, ops
import mindrlhf._mindformers  # noqa: F401  (quiet import first)
from mindformers.core.clip_grad import ClipGradNorm
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.wrapper.wrapper import MFTrainOneStepCell


def _rows(x):
    """x as float32 rows of its last axis (a scalar or 1-D tensor is one row)."""
    width = x.shape[-1] if len(x.shape) else 1
    return ops.cast(x, mstype.float32).reshape((-1, width)), width


def matmul_sum(x):
    """The sum of all elements of x: a MatMul of its rows against ones, then a short ReduceSum."""
    rows, width = _rows(x)
    return ops.matmul(rows, ops.ones((width, 1), mstype.float32)).sum()


def matmul_square_sum(x):
    """The sum of squares of all elements of x (squared in float32), as matmul_sum."""
    return matmul_sum(ops.square(ops.cast(x, mstype.float32)))


class CpuClipGradNorm(ClipGradNorm):
    """ClipGradNorm with its per-gradient sum of squares done by matmul_square_sum (CPU, see module doc)."""

    def construct(self, x):
        squares = ()
        for grad in x:
            squares += (matmul_square_sum(grad).reshape((1,)),)
        global_norm = ops.sqrt(ops.addn(squares))
        global_norm_clip = ops.select(self.greater_equal(global_norm, self.clip_norm), global_norm, self.clip_norm)
        coef = ops.clip_by_value(self.clip_norm / (global_norm_clip + 1e-6), clip_value_max=Tensor(1.0, mstype.float32),
                                 clip_value_min=Tensor(float("-inf"), mstype.float32))
        clipped = ()
        for grad in x:
            clipped += (ops.cast(ops.cast(grad, mstype.float32) * coef, grad.dtype),)
        return clipped, global_norm


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class RewardTrainOneStepCell(MFTrainOneStepCell):
    """Same arguments as MFTrainOneStepCell (use_clip_grad, max_grad_norm, scale_sense, ...)."""

    def __init__(self, network, optimizer, *args, **kwargs):
        super().__init__(network, optimizer, *args, **kwargs)
        self.cpu_target = context.get_context("device_target") == "CPU"
        if self.cpu_target:
            self.clip_grad_norm = CpuClipGradNorm(max_norm=float(self.clip_grad_norm.clip_norm.asnumpy()[0]))

    def get_overflow_status(self, status, compute_output):
        if self.cpu_target:
            total = ops.zeros((), mstype.float32)
            for grad in compute_output:
                total = total + matmul_sum(grad)
            flag = ops.cast(ops.logical_not(ops.isfinite(total)), mstype.float32)
            if self.is_distributed:
                flag = self.allreduce(flag)  # SUM, the one AllReduce CPU runs
            return self.less_equal(self.base, flag)
        return super().get_overflow_status(status, compute_output)

