"""RewardScorer: a trained checkpoint -> one reward per prompt+response, batched and length-sorted.

The text is formatted with the training template and scored at the sequence's own last token (end_ind - 1),
so reward_eval.py and reward_infer.py give the same number for the same response. Causal attention with pad
keys masked makes the score independent of how much padding a batch carries, so batches are trimmed to the
smallest of a few fixed lengths (each compiled once in graph mode).
"""
import os
from typing import List, Optional, Sequence

import numpy as np

from mindrlhf.data.prompt import format_prompt
from mindrlhf.errors import ConfigError
from mindrlhf.models.weights import load_checkpoint_dict
from mindrlhf.training.config import checkpoint_files

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


def list_checkpoints(path: str) -> List[str]:
    """Checkpoint files for --distributed_ckpt_path: a .ckpt, a rank_N directory, or the root holding rank_N/.

    Ordered oldest first by modification time (names repeat across resumed runs, mtimes do not).
    """
    if not path:
        raise ConfigError("no checkpoint given: pass --distributed_ckpt_path")
    if os.path.isfile(path):
        if not path.endswith(".ckpt"):
            raise ConfigError(f"{path}: not a .ckpt file")
        return [path]
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: checkpoint path does not exist")
    directory = path
    if os.path.isdir(os.path.join(path, "rank_0")):
        directory = os.path.join(path, "rank_0")
    files = checkpoint_files(directory)
    if not files:
        raise ConfigError(f"{path}: no .ckpt files (looked in {directory})")
    return files


def checkpoint_step(params: dict) -> Optional[int]:
    step = params.get("global_step")
    if step is None:
        return None
    return int(np.asarray(step.asnumpy()).reshape(-1)[0])


class RewardScorer:
    """score(prompts, responses) -> rewards. Build once per config; load_weights() per checkpoint."""

    def __init__(self, config, checkpoint: Optional[str] = None, batch_size: int = 16,
                 buckets: Sequence[int] = DEFAULT_BUCKETS):
        import mindspore as ms
        from mindformers import LlamaConfig

        from mindrlhf.models.llama_reward import LlamaRewardModel

        if isinstance(config, str):
            from mindrlhf.training.config import load_config
            config = load_config(config)
        self.config = config
        model_cfg = dict(config.model.model_config)
        model_cfg.pop("type", None)
        model_cfg["checkpoint_name_or_path"] = ""
        model_cfg["batch_size"] = batch_size
        self.model_config = LlamaConfig(**model_cfg)
        self.seq_length = int(self.model_config.seq_length)
        self.pad_token_id = int(self.model_config.pad_token_id)
        self.batch_size = batch_size
        self.buckets = sorted(b for b in buckets if b < self.seq_length) + [self.seq_length]
        target = config.context.get("device_target", "CPU")
        ms.set_context(mode=config.context.get("mode", 0), device_target=target)
        if target != "CPU":  # under a launcher each rank scores on its own device
            ms.set_device(target, int(os.environ.get("DEVICE_ID", config.context.get("device_id", 0) or 0)))
        self.network = LlamaRewardModel(self.model_config)
        self.network.set_train(False)
        self.checkpoint = None
        self.step = None
        if checkpoint:
            self.load_weights(checkpoint)

    def load_weights(self, checkpoint: str):
        """Load every model parameter from a checkpoint; a missing or mis-shaped one is an error."""
        import mindspore as ms

        params = load_checkpoint_dict(checkpoint)
        own = {p.name: p for p in self.network.get_parameters()}
        missing = [name for name in own if name not in params]
        if missing:
            raise ConfigError(f"{checkpoint}: lacks {len(missing)} model parameter(s), e.g. {missing[:3]}; "
                              "is it a reward-model checkpoint for this config?")
        for name, param in own.items():
            if tuple(params[name].shape) != tuple(param.shape):
                raise ConfigError(f"{checkpoint}: parameter {name} has shape {tuple(params[name].shape)}, "
                                  f"the model expects {tuple(param.shape)}")
        ms.load_param_into_net(self.network, {k: params[k] for k in own}, strict_load=True)
        self.checkpoint = checkpoint
        self.step = checkpoint_step(params)
        return self

    def bucket(self, length: int) -> int:
        for boundary in self.buckets:
            if length <= boundary:
                return boundary
        return self.seq_length

    def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Rewards for token id lists (truncated to seq_length), batched by similar length."""
        import mindspore as ms

        sequences = [list(s)[:self.seq_length] for s in sequences]
        if any(len(s) == 0 for s in sequences):
            raise ConfigError("cannot score an empty sequence")
        order = np.argsort([len(s) for s in sequences], kind="stable")
        scores = np.zeros(len(sequences), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = self.bucket(max(len(sequences[i]) for i in idx))
            ids = np.full((len(idx), width), self.pad_token_id, dtype=np.int32)
            ends = np.zeros(len(idx), dtype=np.int32)
            for row, i in enumerate(idx):
                ids[row, :len(sequences[i])] = sequences[i]
                ends[row] = len(sequences[i])
            out = self.network(ms.Tensor(ids), None, None, None, ms.Tensor(ends))
            scores[idx] = out.asnumpy().reshape(-1)
        return scores

    def score(self, prompts: Sequence[str], responses: Sequence[str], tokenizer) -> List[float]:
        texts = [format_prompt(p, r) for p, r in zip(prompts, responses)]
        return self.score_ids(tokenizer.encode(texts)).tolist()


