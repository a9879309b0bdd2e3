"""CompareLoss: the tutorial's pairwise span loss, computed stably.

loss = mean_b [ sum_t mask[b,t] * softplus(-(r_chosen[b,t] - r_rejected[b,t])) / max(sum_t mask[b,t], 1) ]
softplus(-x) == -log(sigmoid(x)) without the log(0) -> inf of the tutorial's form; an empty mask gives 0.
"""
import mindspore.common.dtype as mstype
from mindspore import nn, ops
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister


def stable_softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), finite for any float32 x (CPU has no fused op for all)."""
    return ops.relu(x) + ops.log1p(ops.exp(-ops.abs(x)))


@MindFormerRegister.register(MindFormerModuleType.LOSS)
class CompareLoss(nn.Cell):
    """rewards (2B, S): chosen rows then rejected rows; loss_mask (B, S). Returns a float32 scalar."""

    def __init__(self, config=None):
        super().__init__()
        self.cast = ops.Cast()

    def construct(self, rewards, loss_mask):
        rewards = self.cast(rewards, mstype.float32)
        mask = self.cast(loss_mask, mstype.float32)
        batch = rewards.shape[0] // 2
        chosen = rewards[:batch]
        rejected = rewards[batch:]
        per_token = stable_softplus(rejected - chosen)
        numerator = (per_token * mask).sum(-1)
        denominator = ops.maximum(mask.sum(-1), 1.0)
        return (numerator / denominator).mean()
