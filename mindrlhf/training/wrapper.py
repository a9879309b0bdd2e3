"""A train-one-step cell for YAML `runner_wrapper`: MFTrainOneStepCell on Ascend/GPU, and runnable on CPU.

The stock cell's overflow check falls through to the Ascend-only NPUGetFloatStatusV2 on CPU; here the CPU
path uses the IsFinite-based check (the GPU path's FloatStatus is not on CPU either), so a dynamic loss
scale works everywhere.
"""
from mindspore import context
from mindspore.nn.wrap.loss_scale import _ascend_grad_overflow  # the IsFinite-based per-tensor check
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.wrapper.wrapper import MFTrainOneStepCell


@MindFormerRegister.register(MindFormerModuleType.WRAPPER)
class RewardTrainOneStepCell(MFTrainOneStepCell):
    """Same arguments as MFTrainOneStepCell (use_clip_grad, max_grad_norm, scale_sense, ...)."""

    def __init__(self, network, optimizer, *args, **kwargs):
        super().__init__(network, optimizer, *args, **kwargs)
        self.cpu_target = context.get_context("device_target") == "CPU"

    def get_overflow_status(self, status, compute_output):
        if self.cpu_target:
            return self._get_distributed_overflow_status_on_infnan_mode(_ascend_grad_overflow, compute_output)
        return super().get_overflow_status(status, compute_output)
