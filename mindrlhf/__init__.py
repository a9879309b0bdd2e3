"""mindrlhf: the Llama2 reward-model suite on MindSpore/MindFormers.

Importing it registers RewardModelDataset, LlamaRewardModel, CompareLoss, RewardTrainOneStepCell and
FP32StateAdamWeightDecay with MindFormerRegister, so YAML `type:` names resolve.
"""
import contextlib as _contextlib
import os as _os
import sys as _sys

_os.environ.setdefault("GLOG_v", "3")

# MindFormers logs import-time warnings to stdout; keep stdout for results (JSON, tables) and logs on stderr.
with _contextlib.redirect_stdout(_sys.stderr):
    import mindformers as _mindformers  # noqa: F401

from mindrlhf.data.prompt import PROMPT_TEMPLATE, format_prompt  # noqa: E402
from mindrlhf.data.dataset import RewardModelDataset  # noqa: E402
from mindrlhf.models.loss import CompareLoss  # noqa: E402
from mindrlhf.models.llama_reward import LlamaRewardModel  # noqa: E402
from mindrlhf.training.wrapper import RewardTrainOneStepCell  # noqa: E402
from mindrlhf.training.optimizer import FP32StateAdamWeightDecay  # noqa: E402

__version__ = "0.1.0"
__all__ = ["PROMPT_TEMPLATE", "format_prompt", "RewardModelDataset", "CompareLoss", "LlamaRewardModel",
           "RewardTrainOneStepCell", "FP32StateAdamWeightDecay"]
