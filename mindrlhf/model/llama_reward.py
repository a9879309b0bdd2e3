"""LlamaRewardModel: MindFormers' Llama backbone + a scalar value head.

Backbone parameters are named `model.*` exactly as in LlamaForCausalLM, so a pretrained Llama2 checkpoint
loads into it (its `lm_head.*` is simply not used). In training construct returns the CompareLoss; in
eval mode it returns one reward per sequence, read at end_ind - 1 (the sequence's own last real token).
With model_config.packing (pairs | shared_prefix) the inputs are PACKING.md's packed layout instead, and
construct runs mindrlhf.model.packed's path (several sequences a row, each attending only to itself).

The Llama-architecture families all build from the YAML's LlamaConfig: Llama 2; Llama 3/3.x (n_kv_heads for
GQA, theta 500000, intermediate_size; 3.1+ extend_method LLAMA3); Qwen2/Qwen2.5 (GQA, qkv_has_bias, theta
1000000; tie_word_embeddings only ties an lm_head, which a reward model has none of). See model_configs/.
"""
import mindspore.common.dtype as mstype
from mindspore import ops
from mindspore.common.initializer import Normal
import mindrlhf._mindformers  # noqa: F401  (quiet import first)
from mindformers.models.llama import LlamaConfig
from mindformers.models.llama.llama import LlamaModel, LlamaPreTrainedModel
from mindformers.modules.layers import Linear
from mindformers.tools.logger import logger
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindrlhf.checkpoints.names import VALUE_HEAD
from mindrlhf.checkpoints.reader import load_backbone
from mindrlhf.kernels.cpu_speedups import use_cpu_kernels
from mindrlhf.model.lora import apply_lora, lora_settings
from mindrlhf.model.loss import CompareLoss
from mindrlhf.model.packed import PackedRewards


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class LlamaRewardModel(PackedRewards, LlamaPreTrainedModel):
    """config: a LlamaConfig. Value head: hidden_size -> 1, no bias, N(0, 1/sqrt(hidden+1)) init.

    model_config.checkpoint_name_or_path (a local .ckpt/.safetensors) initialises the backbone; its lm_head is
    ignored and the value head stays freshly initialised (see mindrlhf.checkpoints.reader.load_backbone).
    """

    def __init__(self, config: LlamaConfig = None):
        config = config if config is not None else LlamaConfig()
        super().__init__(config, auto_prefix=True)
        self.config = config
        self.model = LlamaModel(config=config)
        # Let every batch be shorter than seq_length (length bucketing): slice the causal mask like pynative does.
        self.model.casual_mask.is_dynamic = True
        self.v_head = Linear(in_channels=config.hidden_size, out_channels=1, has_bias=False,
                             compute_dtype=config.compute_dtype, param_init_type=config.param_init_type,
                             weight_init=Normal(sigma=1.0 / (config.hidden_size + 1) ** 0.5))
        assert self.v_head.weight.name == VALUE_HEAD + "weight"  # the checkpoints' name for it (auto_prefix)
        # LoRA (pet_config): the target projections get low-rank deltas; only they and the value head train.
        self.lora = lora_settings(config)
        self.lora_counts = apply_lora(self, self.lora, log=logger.info) if self.lora else None
        # On CPU: compiled kernels for attention, RMSNorm and SwiGLU, or MindSpore ops arranged around its slow
        # CPU paths without a compiler (same formulas; see mindrlhf.kernels.cpu_speedups). After LoRA: the SwiGLU
        # swap turns w1's own SiLU off, on the layer that runs.
        use_cpu_kernels(self.model, config, log=logger.info)
        # Parallel layout, as MindFormers' LlamaForCausalLM places its lm_head: the head's input (the final norm's
        # output) has its hidden dimension whole, so ((dp, 1), (1, 1)) needs no communication; the (1, hidden)
        # weight stays replicated and whole in every rank's checkpoint. Head and loss sit on the last stage.
        parallel = config.parallel_config
        dp, stages = parallel.data_parallel, parallel.pipeline_stage
        self.v_head.shard(strategy_matmul=((dp, 1), (1, 1)))
        self.loss = CompareLoss(config)
        if stages > 1:
            self.v_head.pipeline_stage = stages - 1
            self.loss.pipeline_stage = stages - 1
        self.cast = ops.Cast().shard(((dp, 1),))
        self.cast_index = ops.Cast().shard(((dp,),))
        self.last_index = ops.Sub().shard(((dp, 1), ()))
        self.clip_low = ops.Maximum().shard(((dp, 1), ()))
        self.clip_high = ops.Minimum().shard(((dp, 1), ()))
        self.gather = ops.GatherD().shard(((dp, 1), (dp, 1)))  # GatherD: gathered dim unsplit, same strategies
        self.init_packing(config)  # after the CPU swaps: the packed layout depends on which attention runs
        if self.packing and stages > 1:
            self.packed_loss.pipeline_stage = stages - 1
        self.load_report = None
        # The MindFormers Trainer clears checkpoint_name_or_path before building; prepare_config keeps a copy.
        weights = getattr(config, "backbone_checkpoint", None) or config.checkpoint_name_or_path
        if weights:
            self.load_report = load_backbone(self, weights, log=logger.info)

    def token_rewards(self, input_ids):
        """(N, S) int32 -> (N, S) float32 reward at every position."""
        hidden = self.model(input_ids)
        batch, seq = input_ids.shape
        hidden = hidden.reshape((batch * seq, -1))
        values = self.cast(self.v_head(hidden), mstype.float32)
        return values.reshape((batch, seq))

    def last_token_rewards(self, rewards, end_ind):
        """(N, S) rewards -> (N, 1): each row's reward at its own last real token (end_ind - 1)."""
        index = self.last_index(self.cast_index(end_ind, mstype.int32).reshape((-1, 1)), 1)
        index = self.clip_high(self.clip_low(index, 0), rewards.shape[1] - 1)
        return self.gather(rewards, 1, index)

    def construct(self, input_ids, position_id=None, attention_mask=None, loss_mask=None, end_ind=None,
                  margin=None, actual_seq_len=None):
        if self.packing:  # a build-time constant: one branch is compiled
            return self.packed_construct(input_ids, position_id, attention_mask, loss_mask, end_ind, margin,
                                         actual_seq_len)
        rewards = self.token_rewards(input_ids)
        if self.training:
            scores = self.last_token_rewards(rewards, end_ind) if self.loss.needs_scores else None
            return self.loss(rewards, loss_mask, scores, margin)
        return self.last_token_rewards(rewards, end_ind).reshape((-1,))


def model_shapes(config) -> dict:
    """{name: shape} of the config's reward model (LoRA included), to merge model-parallel slices against."""
    model_cfg = dict(config.model.model_config)
    model_cfg.pop("type", None)
    model_cfg["checkpoint_name_or_path"] = ""
    network = LlamaRewardModel(LlamaConfig(**model_cfg))
    return {p.name: tuple(p.shape) for p in network.get_parameters()}
