"""FP32StateAdamWeightDecay: AdamWeightDecay whose moments are float32 even for float16/bfloat16 weights.

mindformers 1.9 dropped it; the tutorial's YAML still names it, so it is registered here. Why it matters: with
float16 moments a 1e-4 gradient gives a second moment of (1 - 0.95) * 1e-8 = 5e-10, below float16's smallest
subnormal, so v is exactly 0 and the update explodes to m / eps.
"""
import mindspore.common.dtype as mstype
from mindspore import Parameter, ParameterTuple, nn
from mindspore.common.initializer import initializer
import mindrlhf._mindformers  # noqa: F401  (quiet import first)
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister


def float32_states(params, prefix):
    """Fresh float32 zero Parameters shaped like params, named `<prefix>.<name>` (saved in checkpoints).

    Not param.clone(): a clone keeps the weight's dtype, and set_data() casts float32 data back to it. The
    weight's param_info (parallel layout, optimizer-shard flags) is copied and the state registered as its
    clone, so under semi-auto parallel the moments are sliced like the weight they belong to.
    """
    states = []
    for param in params:
        state = Parameter(initializer("zeros", param.shape, mstype.float32))
        state.param_info = param.param_info.clone()
        clones = getattr(param.param_info, "cloned_obj", None)
        if clones is None:
            param.param_info.cloned_obj = [state]
        else:
            clones.append(state)
        state.is_init = False
        state.set_data(initializer("zeros", param.shape, mstype.float32))
        state.name = f"{prefix}.{param.name}"
        states.append(state)
    return ParameterTuple(states)


@MindFormerRegister.register(MindFormerModuleType.OPTIMIZER)
class FP32StateAdamWeightDecay(nn.AdamWeightDecay):
    """Arguments as nn.AdamWeightDecay (params, learning_rate, beta1, beta2, eps, weight_decay)."""

    def __init__(self, params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, **kwargs):
        super().__init__(params, learning_rate=learning_rate, beta1=beta1, beta2=beta2, eps=eps,
                         weight_decay=weight_decay)
        if any(p.dtype != mstype.float32 for p in self._parameters):
            self.moments1 = float32_states(self._parameters, "adam_m")
            self.moments2 = float32_states(self._parameters, "adam_v")
            self.use_fused_opt = False  # the fused kernel wants moments of the weights' dtype
