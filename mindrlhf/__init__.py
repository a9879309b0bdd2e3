"""mindrlhf: the Llama2 reward-model suite on MindSpore/MindFormers.

`import mindrlhf` is light: conversion, the rank-table tool and the loss plots never import MindFormers.
`import mindrlhf.training.registry` (done by load_config for every YAML path, and on first use of a class named below)
registers RewardModelDataset, LlamaRewardModel, CompareLoss, RewardTrainOneStepCell and
FP32StateAdamWeightDecay with MindFormerRegister, so YAML `type:` names resolve.
"""
import importlib as _importlib
import os as _os

_os.environ.setdefault("GLOG_v", "3")

from mindrlhf.data.prompt import PROMPT_TEMPLATE, format_prompt  # noqa: E402

_REGISTERED = ("RewardModelDataset", "LlamaRewardModel", "CompareLoss", "RewardTrainOneStepCell",
               "FP32StateAdamWeightDecay")


def __getattr__(name):
    """The registered classes, imported (and registered) on first use."""
    if name in _REGISTERED:
        return getattr(_importlib.import_module("mindrlhf.training.registry"), name)
    raise AttributeError(f"module 'mindrlhf' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["PROMPT_TEMPLATE", "format_prompt", *_REGISTERED]
