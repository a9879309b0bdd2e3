"""CompareLoss: the tutorial's pairwise span loss, computed stably, with a shard strategy for every primitive.

loss = mean_b [ sum_t mask[b,t] * softplus(-(r_chosen[b,t] - r_rejected[b,t] - m_b)) / max(sum_t mask[b,t], 1) ]
softplus(-x) == -log(sigmoid(x)) without the log(0) -> inf of the tutorial's form; an empty mask gives 0.

Options (model_config, all off by default, so the tutorial's loss is unchanged):
- loss_type: span (the tutorial's, default) or last_token: Bradley-Terry on each sequence's own last real token,
  mean_b softplus(-(s_chosen - s_rejected - m_b)), as TRL's RewardTrainer and OpenRLHF.
- a per-pair margin m_b (a margin column in the data; TRL/OpenRLHF: -log sigmoid(r_c - r_r - m)), in both forms.
- center_rewards_coefficient c: + c * mean_b (s_chosen + s_rejected)^2 (TRL), on the scores evaluation reads.

Under semi-auto parallel (dp x mp) the (2B, S) rewards arrive split by dp along the batch. Chosen rows are the
first B and rejected the last B of the *global* batch, and a StridedSlice may not cut a split dimension, so
the two slices gather the rewards whole ((1, 1), as the original MindRLHF loss did; 2B x S floats, a few
hundred KB at 7B); everything after them is element-wise or reduces the sequence, split by dp again. The model
parallel dimension never reaches here: the value head's output has one column. Correct only when every rank
sees the same global batch order (full_batch: True, which mindrlhf.training.config checks).
"""
import mindspore.common.dtype as mstype
from mindspore import nn, ops
import mindrlhf._mindformers  # noqa: F401  (quiet import first)
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindrlhf.config_access import config_getter
from mindrlhf.errors import ConfigError

LOSS_TYPES = ("span", "last_token")


def loss_options(config) -> tuple:
    """(loss_type, center_rewards_coefficient) from a model config (LlamaConfig or the YAML's mapping), checked."""
    get = config_getter(config)
    loss_type = get("loss_type", None) or "span"
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"model_config.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    center = get("center_rewards_coefficient", None)
    try:
        center = float(center or 0.0)
    except (TypeError, ValueError):
        raise ConfigError(f"model_config.center_rewards_coefficient must be a number, got {center!r}") from None
    if not center >= 0.0 or center == float("inf"):
        raise ConfigError(f"model_config.center_rewards_coefficient must be finite and >= 0, got {center}")
    return loss_type, center


@MindFormerRegister.register(MindFormerModuleType.LOSS)
class CompareLoss(nn.Cell):
    """rewards (2B, S): chosen rows then rejected rows; loss_mask (B, S); scores (2B, 1): each row's reward at
    its own last real token (needed for last_token and centering, see needs_scores); margin (B,) or None.
    Returns a float32 scalar.

    config: a LlamaConfig (or None); its parallel_config.data_parallel sets the shard strategies, its loss_type
    and center_rewards_coefficient the options.
    """

    def __init__(self, config=None):
        super().__init__()
        parallel = getattr(config, "parallel_config", None)
        dp = int(getattr(parallel, "data_parallel", 1) or 1)
        self.loss_type, self.center = loss_options(config) if config is not None else ("span", 0.0)
        self.last_token = self.loss_type == "last_token"
        self.needs_scores = self.last_token or self.center > 0
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
        # margin (B,) -> (B, 1), added to every (rejected - chosen) difference of its pair
        self.cast_margin = ops.Cast().shard(vec)
        self.expand_margin = ops.ExpandDims().shard(vec)
        self.add_margin = ops.Add().shard(((dp, 1), (dp, 1)))
        # scores (2B, 1): chosen/rejected halves gathered whole like the rewards, then split by dp again
        self.cast_score = ops.Cast().shard(row)
        self.slice_chosen_score = ops.StridedSlice().shard(((1, 1),))
        self.slice_rejected_score = ops.StridedSlice().shard(((1, 1),))
        self.sub_score = ops.Sub().shard(((dp, 1), (dp, 1)))
        self.add_score_margin = ops.Add().shard(((dp, 1), (dp, 1)))
        self.abs_score = ops.Abs().shard(row)
        self.neg_score = ops.Neg().shard(row)
        self.exp_score = ops.Exp().shard(row)
        self.log1p_score = ops.Log1p().shard(row)
        self.relu_score = ops.ReLU().shard(row)
        self.add_score = ops.Add().shard(((dp, 1), (dp, 1)))
        self.mean_score = ops.ReduceMean(keep_dims=False).shard(row)
        # centering: c * mean((s_chosen + s_rejected)^2)
        self.add_center = ops.Add().shard(((dp, 1), (dp, 1)))
        self.square_center = ops.Square().shard(row)
        self.mean_center = ops.ReduceMean(keep_dims=False).shard(row)
        self.scale_center = ops.Mul().shard(((), ()))
        self.add_terms = ops.Add().shard(((), ()))

    def softplus_scores(self, x):
        return self.add_score(self.relu_score(x), self.log1p_score(self.exp_score(self.neg_score(self.abs_score(x)))))

    def construct(self, rewards, loss_mask, scores=None, margin=None):
        rows, seq = rewards.shape
        batch = rows // 2
        if margin is not None:
            margin = self.expand_margin(self.cast_margin(margin, mstype.float32), 1)
        if self.needs_scores:
            scores = self.cast_score(scores, mstype.float32)
            chosen_score = self.slice_chosen_score(scores, (0, 0), (batch, 1), (1, 1))
            rejected_score = self.slice_rejected_score(scores, (batch, 0), (rows, 1), (1, 1))
        if self.last_token:
            x = self.sub_score(rejected_score, chosen_score)
            if margin is not None:
                x = self.add_score_margin(x, margin)
            loss = self.mean_score(self.softplus_scores(x), (0, 1))
        else:
            rewards = self.cast(rewards, mstype.float32)
            mask = self.cast_mask(loss_mask, mstype.float32)
            chosen = self.slice_chosen(rewards, (0, 0), (batch, seq), (1, 1))
            rejected = self.slice_rejected(rewards, (batch, 0), (rows, seq), (1, 1))
            x = self.sub(rejected, chosen)
            if margin is not None:
                x = self.add_margin(x, margin)
            per_token = self.add(self.relu(x), self.log1p(self.exp(self.neg(self.abs(x)))))  # softplus, finite
            numerator = self.sum_loss(self.mul(per_token, mask), -1)
            denominator = self.at_least_one(self.sum_mask(mask, -1), 1.0)
            loss = self.mean(self.div(numerator, denominator), 0)
        if self.center > 0:
            total = self.square_center(self.add_center(chosen_score, rejected_score))
            loss = self.add_terms(loss, self.scale_center(self.mean_center(total, (0, 1)), self.center))
        return loss
