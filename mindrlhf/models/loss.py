"""CompareLoss: the tutorial's pairwise span loss, computed stably, with a shard strategy for every primitive.

loss = mean_b [ sum_t mask[b,t] * softplus(-(r_chosen[b,t] - r_rejected[b,t])) / max(sum_t mask[b,t], 1) ]
softplus(-x) == -log(sigmoid(x)) without the log(0) -> inf of the tutorial's form; an empty mask gives 0.

Under semi-auto parallel (dp x mp) the (2B, S) rewards arrive split by dp along the batch. Chosen rows are the
first B and rejected the last B of the *global* batch, and a StridedSlice may not cut a split dimension, so
the two slices gather the rewards whole ((1, 1), as the original MindRLHF loss did; 2B x S floats, a few
hundred KB at 7B); everything after them is element-wise or reduces the sequence, split by dp again. The model
parallel dimension never reaches here: the value head's output has one column. Correct only when every rank
sees the same global batch order (full_batch: True, which mindrlhf.training.config checks).
"""
import mindspore.common.dtype as mstype
from mindspore import nn, ops
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister


@MindFormerRegister.register(MindFormerModuleType.LOSS)
class CompareLoss(nn.Cell):
    """rewards (2B, S): chosen rows then rejected rows; loss_mask (B, S). Returns a float32 scalar.

    config: a LlamaConfig (or None); its parallel_config.data_parallel sets the shard strategies.
    """

    def __init__(self, config=None):
        super().__init__()
        parallel = getattr(config, "parallel_config", None)
        dp = int(getattr(parallel, "data_parallel", 1) or 1)
        row, vec = ((dp, 1),), ((dp,),)
        self.cast = ops.Cast().shard(row)
        self.cast_mask = ops.Cast().shard(row)
        self.slice_chosen = ops.StridedSlice().shard(((1, 1),))
        self.slice_rejected = ops.StridedSlice().shard(((1, 1),))
        self.sub = ops.Sub().shard(((dp, 1), (dp, 1)))
        self.abs = ops.Abs().shard(row)
        self.neg = ops.Neg().shard(row)
        self.exp = ops.Exp().shard(row)
        self.log1p = ops.Log1p().shard(row)
        self.relu = ops.ReLU().shard(row)
        self.add = ops.Add().shard(((dp, 1), (dp, 1)))
        self.mul = ops.Mul().shard(((dp, 1), (dp, 1)))
        self.sum_loss = ops.ReduceSum(keep_dims=False).shard(row)
        self.sum_mask = ops.ReduceSum(keep_dims=False).shard(row)
        self.at_least_one = ops.Maximum().shard(((dp,), ()))
        self.div = ops.RealDiv().shard(((dp,), (dp,)))
        self.mean = ops.ReduceMean(keep_dims=False).shard(vec)

    def construct(self, rewards, loss_mask):
        rewards = self.cast(rewards, mstype.float32)
        mask = self.cast_mask(loss_mask, mstype.float32)
        rows, seq = rewards.shape
        batch = rows // 2
        chosen = self.slice_chosen(rewards, (0, 0), (batch, seq), (1, 1))
        rejected = self.slice_rejected(rewards, (batch, 0), (rows, seq), (1, 1))
        x = self.sub(rejected, chosen)
        per_token = self.add(self.relu(x), self.log1p(self.exp(self.neg(self.abs(x)))))  # softplus, finite for any x
        numerator = self.sum_loss(self.mul(per_token, mask), -1)
        denominator = self.at_least_one(self.sum_mask(mask, -1), 1.0)
        return self.mean(self.div(numerator, denominator), 0)
