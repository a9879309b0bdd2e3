"""FP32StateAdamWeightDecay: AdamWeightDecay whose moments stay float32 even for float16/bfloat16 weights.

mindformers 1.9 dropped it; the tutorial's YAML still names it, so it is registered here.
"""
import mindspore.common.dtype as mstype
from mindspore import ParameterTuple, nn
from mindspore.common.initializer import initializer
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister


def _fp32_clone(params, prefix):
    clones = []
    for param in params:
        clone = param.clone(init="zeros")
        clone.set_data(initializer("zeros", param.shape, mstype.float32))
        clone.name = f"{prefix}.{param.name}"
        clones.append(clone)
    return ParameterTuple(clones)


@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER)
class FP32StateAdamWeightDecay(nn.AdamWeightDecay):
    """Arguments as nn.AdamWeightDecay (params, learning_rate, beta1, beta2, eps, weight_decay)."""

    def __init__(self, params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, **kwargs):
        super().__init__(params, learning_rate=learning_rate, beta1=beta1, beta2=beta2, eps=eps,
                         weight_decay=weight_decay)
        if any(p.dtype != mstype.float32 for p in self._parameters):
            self.moments1 = _fp32_clone(self._parameters, "adam_m")
            self.moments2 = _fp32_clone(self._parameters, "adam_v")
            self.use_fused_opt = False
