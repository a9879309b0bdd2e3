"""Importing this registers RewardModelDataset, LlamaRewardModel, CompareLoss, RewardTrainOneStepCell and
FP32StateAdamWeightDecay with MindFormerRegister, so YAML `type:` names resolve. load_config() does it for
every YAML path; a script of your own that builds MindFormers' Trainer from our YAML imports this module."""
from mindrlhf.data.dataset import RewardModelDataset
from mindrlhf.model.llama_reward import LlamaRewardModel
from mindrlhf.model.loss import CompareLoss
from mindrlhf.training.optimizer import FP32StateAdamWeightDecay
from mindrlhf.training.wrapper import RewardTrainOneStepCell

REGISTERED = (RewardModelDataset, LlamaRewardModel, CompareLoss, FP32StateAdamWeightDecay, RewardTrainOneStepCell)
