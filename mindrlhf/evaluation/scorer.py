"""RewardScorer: a trained checkpoint -> one reward per prompt+response, batched and length-sorted.

The text is formatted with the run's template (recorded beside its checkpoints, see mindrlhf.data.templates;
the tutorial's when none is recorded) and scored at the sequence's own last token (end_ind - 1),
so reward_eval.py and reward_infer.py give the same number for the same response. Causal attention with pad
keys masked makes the score independent of how much padding a batch carries, so batches are trimmed to the
smallest of a few fixed lengths (each compiled once in graph mode).

With model_config.packing (pairs or shared_prefix; scoring always packs plain sequences) the sequences are packed
instead (mindrlhf.data.packing.pack_sequences, PACKING.md's scoring step): several a row of seq_length tokens,
each attending only to itself, rows per pass from a few fixed sizes (pass_sizes), so no token is padding but the
ends of rows and of the last pass.
"""
import copy
import os
from typing import List, Optional, Sequence

import numpy as np

from mindrlhf.data.buckets import bucket_length
from mindrlhf.data.packing import (actual_seq_len, pack_sequences, packing_mode, row_counts, tnd_row_entries,
                                   tnd_rows_per_call)
from mindrlhf.data.templates import TUTORIAL, read_run_template
from mindrlhf.errors import ConfigError, InputError
from mindrlhf.model.ascend_packing import on_flash_attention
from mindrlhf.checkpoints.reader import checkpoint_step
from mindrlhf.checkpoints.names import is_lora
from mindrlhf.model.lora import lora_settings
from mindrlhf.checkpoints.adapters import check_checkpoint_lora, check_lora_tensors, load_adapter, lora_dims
from mindrlhf.checkpoints.slices import checkpoint_root, load_whole
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


def base_file(ckpt_path: str, adapter: str) -> str:
    """With --adapter, --distributed_ckpt_path names the base weights file the adapter goes on."""
    if not os.path.isfile(ckpt_path):
        raise ConfigError(f"--adapter {adapter}: --distributed_ckpt_path must name the base weights file (a .ckpt or "
                          f".safetensors) the adapter was trained on; '{ckpt_path}' is not a file")
    return ckpt_path


def set_scoring_context(config) -> str:
    """Graph/pynative mode and the device of this rank (under a launcher each rank scores on its own device).

    Returns the device target; call before distributed.communicator_ready().
    """
    import mindspore as ms

    target = config.context.get("device_target", "CPU")
    ms.set_context(mode=config.context.get("mode", 0), device_target=target)
    if target != "CPU":
        ms.set_device(target, int(os.environ.get("DEVICE_ID", config.context.get("device_id", 0) or 0)))
    return target


def length_batches(lengths: Sequence[int], batch_size: int) -> List[np.ndarray]:
    """Indices sorted by length (stable), cut into batches of batch_size: the same batches however many ranks
    score them, so every score is bit-identical to one process."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def pass_sizes(max_rows: int) -> List[int]:
    """Rows per packed pass: the training steps' row counts (packing.row_counts), so a lone short request runs
    a 1-row pass, not max_rows rows, and graph mode compiles one shape each."""
    return row_counts(max_rows)


def packed_passes(sequences: Sequence[Sequence[int]], max_rows: int, width: int,
                  pad_token_id: int, tnd_entries: Optional[int] = None) -> List[dict]:
    """pack_sequences' passes of at most max_rows rows of `width`, each cut to the smallest of pass_sizes(max_rows)
    that holds its used rows and whose P = rows * width // 2 slots hold its sequences. The packing depends only
    on the list (not on rank or pass sizes): split whole passes across ranks and every score is one process's.
    tnd_entries: Ascend: actual_seq_len's entries a row (pack_sequences keeps their reserve of filler tokens)."""
    sizes = pass_sizes(max_rows)
    out = []
    for packed in pack_sequences(sequences, sizes[-1], width, pad_token_id, tnd_entries):
        used = int(np.count_nonzero(packed["attention_mask"][:, 0]))  # rows are filled from row 0
        count = len(packed["index"])
        rows = next(s for s in sizes if s >= used and s * width // 2 >= count)
        packed = dict(packed, input_ids=packed["input_ids"][:rows], position_id=packed["position_id"][:rows],
                      attention_mask=packed["attention_mask"][:rows], end_ind=packed["end_ind"][:rows * width // 2])
        out.append(packed)
    return out


class RewardScorer:
    """score(prompts, responses) -> rewards. Build once per config; load_weights() per checkpoint."""

    def __init__(self, config, checkpoint: Optional[str] = None, batch_size: int = 16,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, src_strategy: Optional[str] = None, log=print,
                 config_name: Optional[str] = None, adapter: Optional[str] = None):
        """config_name: the YAML's path, for error messages when `config` is already loaded. adapter: see
        load_weights."""
        import mindrlhf._mindformers  # noqa: F401  (quiet import first)
        from mindformers import LlamaConfig

        if isinstance(config, str):
            from mindrlhf.training.config import load_config
            config_name = config_name or config
            config = load_config(config)
        self.config_where = config_name or "the config"
        self.config = config
        model_cfg = dict(config.model.model_config)
        model_cfg.pop("type", None)
        model_cfg["checkpoint_name_or_path"] = ""
        model_cfg["batch_size"] = batch_size
        self.packing = packing_mode(model_cfg.get("packing"), f"{self.config_where}: model.model_config.packing")
        model_cfg["packing"] = self.packing or False
        self.model_config = LlamaConfig(**model_cfg)
        self.lora = lora_settings(self.model_config, f"{self.config_where}: model.model_config.pet_config")
        self.seq_length = int(self.model_config.seq_length)
        self.pad_token_id = int(self.model_config.pad_token_id)
        self.batch_size = batch_size
        # packed: every row is seq_length wide, passes of pass_sizes(batch_size) rows
        self.buckets = [self.seq_length] if self.packing else \
            sorted(b for b in buckets if b < self.seq_length) + [self.seq_length]
        self.device = set_scoring_context(config)
        # Ascend: actual_seq_len takes tnd_entries a row (spans, then filler blocks of at least one token) and
        # one FlashAttention call tnd_rows_per_call rows; a row is tnd_entries - 1 tokens wider than seq_length,
        # so a sequence of seq_length tokens still leaves its reserve of filler tokens
        ascend = self.packing and on_flash_attention(self.model_config)
        self.tnd_entries = tnd_row_entries(self.seq_length) if ascend else None
        self.pass_width = self.seq_length + self.tnd_entries - 1 if ascend else self.seq_length
        self.max_pass_rows = min(batch_size, tnd_rows_per_call(self.seq_length)) if ascend else batch_size
        self.pass_sizes = pass_sizes(self.max_pass_rows) if self.packing else None
        if self.packing:
            log(f"scoring packed ({self.config_where}: model.model_config.packing: {self.packing}): rows of "
                f"{self.pass_width} tokens, {self.pass_sizes} rows a pass")
        self._network = None
        self.checkpoint = None
        self.adapter = None
        self.step = None
        self.template = None  # the run's recorded template, read with the checkpoint
        self.log = log
        if checkpoint:
            self.load_weights(checkpoint, src_strategy, adapter)

    @property
    def network(self):
        """The reward model, built on first use (with the config's LoRA layers, if any) or by load_weights, which
        decides from the checkpoint's names first: a model is built once, not with LoRA and then again without."""
        if self._network is None:
            self._use_network(self.lora is not None)
        return self._network

    def _use_network(self, with_lora: bool):
        """Build the network (again) with or without the config's LoRA layers: LoRA-ness follows the weights."""
        from mindrlhf.model.llama_reward import LlamaRewardModel

        if self._network is not None and (self._network.lora is not None) == with_lora:
            return
        config = self.model_config
        if not with_lora and self.lora is not None:
            config = copy.deepcopy(config)
            config.pet_config = None
            config.reward_lora = None
        self._network = LlamaRewardModel(config)
        self._network.set_train(False)

    def load_weights(self, checkpoint: str, src_strategy: Optional[str] = None, adapter: Optional[str] = None):
        """Load every model parameter from a checkpoint (model-parallel slices are merged first, with the run's
        strategy file); a missing or mis-shaped parameter is an error. A checkpoint with LoRA tensors needs the
        config's pet_config (they must agree); one without (a merged model) is scored as a plain model.
        adapter: `checkpoint` is the base weights file and the adapter's LoRA tensors and value head go on it."""
        import mindspore as ms

        if adapter:
            return self._load_adapter(checkpoint, adapter)
        dims = lora_dims(checkpoint) if checkpoint.endswith(".ckpt") and os.path.isfile(checkpoint) else {}
        check_checkpoint_lora(checkpoint, dims, self.lora, self.config_where)
        if self.lora is not None and not dims and (self._network is None or self._network.lora is not None):
            self.log(f"{checkpoint} holds no LoRA tensors (a merged or plain model): scored as a plain model, "
                     f"without the pet_config of {self.config_where}")
        self._use_network(bool(dims))
        own = {p.name: p for p in self.network.get_parameters()}
        params = load_whole(checkpoint, {n: tuple(p.shape) for n, p in own.items()}, src_strategy, log=self.log)
        unused = sorted(n for n in params if is_lora(n) and n not in own)
        if unused:  # a file read without the name index (e.g. .safetensors): the same refusal
            check_lora_tensors(checkpoint, {n: tuple(params[n].shape) for n in unused}, None, self.config_where)
        missing = [name for name in own if name not in params]
        if missing:
            raise ConfigError(f"{checkpoint}: lacks {len(missing)} model parameter(s), e.g. {missing[:3]}; "
                              "is it a reward-model checkpoint for this config?")
        ms.load_param_into_net(self.network, {k: params[k] for k in own}, strict_load=True)
        self.checkpoint = checkpoint
        self.adapter = None
        self.template = read_run_template(checkpoint_root(checkpoint))
        self.step = checkpoint_step(params)
        return self

    def _load_adapter(self, base: str, adapter: str):
        """Base weights (as training loads them: backbone, no LoRA) plus an adapter, checked against the base's
        digest and the config's LoRA settings."""
        from mindrlhf.checkpoints.reader import load_backbone

        if self.lora is None:
            raise ConfigError(f"--adapter {adapter}: {self.config_where} has no model.model_config.pet_config; pass "
                              "the LoRA run's YAML")
        if not os.path.isfile(adapter):
            raise ConfigError(f"--adapter {adapter}: no such file")
        base_file(base, adapter)
        self._use_network(True)
        load_backbone(self.network, base, log=self.log)
        meta = load_adapter(self.network, adapter, self.lora, log=self.log)
        self.checkpoint, self.adapter = base, adapter
        self.template = read_run_template(checkpoint_root(adapter))
        self.step = meta["step"]
        return self

    def bucket(self, length: int) -> int:
        return bucket_length(length, self.buckets, self.seq_length)

    def score_batch(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """One forward pass over these sequences, padded to the smallest bucket that holds the longest."""
        import mindspore as ms

        width = self.bucket(max(len(s) for s in sequences))
        ids = np.full((len(sequences), width), self.pad_token_id, dtype=np.int32)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = seq
        ends = np.array([len(s) for s in sequences], dtype=np.int32)
        return self.network(ms.Tensor(ids), None, None, None, ms.Tensor(ends)).asnumpy().reshape(-1)

    def check_pad_rule(self, sequences: Sequence[Sequence[int]]):
        """The pad-id rule of training (packing.check_no_pad_in_text): a text never holds the pad id, padded or
        packed. InputError naming the sequence."""
        held = next((i for i, s in enumerate(sequences) if self.pad_token_id in s), None)
        if held is not None:
            raise InputError(f"sequence {held}", None, None,
                             f"holds pad_token_id {self.pad_token_id} ({self.config_where}: "
                             "model.model_config.pad_token_id), which the model hides as padding; training refuses "
                             "such texts too: use a pad id that never occurs in the text")

    def packed_passes(self, sequences: Sequence[Sequence[int]], max_rows: Optional[int] = None) -> List[dict]:
        """The packed passes (see packed_passes) of these sequences (1 to seq_length tokens each), at most
        max_rows (default batch_size; on Ascend never more than max_pass_rows) rows each."""
        if self.tnd_entries is not None:  # Ascend
            held = next((i for i, s in enumerate(sequences) if self.pad_token_id in s), None)
            if held is not None:
                raise ConfigError(f"sequence {held} holds pad_token_id {self.pad_token_id} ({self.config_where}: "
                                  "model.model_config.pad_token_id): the padded scorer hides such keys, which "
                                  "packed scoring on Ascend (FlashAttention's TND blocks: plain causal spans) "
                                  "cannot; score with model.model_config.packing: false")
        rows = min(max_rows or self.batch_size, self.max_pass_rows)
        return packed_passes(sequences, rows, self.pass_width, self.pad_token_id, self.tnd_entries)

    def score_pass(self, packed: dict) -> np.ndarray:
        """One packed forward pass: the rewards of packed["index"]'s sequences, in that order."""
        import mindspore as ms

        extra = ()
        if self.tnd_entries is not None:  # Ascend: the TND attention reads the blocks as actual_seq_len
            extra = (None, ms.Tensor(actual_seq_len(packed["attention_mask"], self.tnd_entries)))
        out = self.network(ms.Tensor(packed["input_ids"]), ms.Tensor(packed["position_id"]),
                           ms.Tensor(packed["attention_mask"]), None, ms.Tensor(packed["end_ind"]), *extra)
        return out.asnumpy().reshape(-1)[:len(packed["index"])]

    def score_ids(self, sequences: Sequence[Sequence[int]], rank: int = 0, size: int = 1) -> np.ndarray:
        """Rewards for token id lists (truncated to seq_length), batched by similar length, or packed.

        With size > 1 only every size-th batch (packed: pass) from `rank` on is scored; the others stay NaN (for
        distributed.gather_shares).
        """
        sequences = [list(s)[:self.seq_length] for s in sequences]
        if any(len(s) == 0 for s in sequences):
            raise ConfigError("cannot score an empty sequence")
        self.check_pad_rule(sequences)
        scores = np.full(len(sequences), np.nan, dtype=np.float32)
        if self.packing:
            for packed in self.packed_passes(sequences)[rank::size]:
                scores[packed["index"]] = self.score_pass(packed)
            return scores
        for idx in length_batches([len(s) for s in sequences], self.batch_size)[rank::size]:
            scores[idx] = self.score_batch([sequences[i] for i in idx])
        return scores

    def score(self, prompts: Sequence[str], responses: Sequence[str], tokenizer, template=None) -> List[float]:
        """Rewards for text pairs, rendered with `template`, else the checkpoint's recorded one, else the
        tutorial's."""
        template = template or self.template or TUTORIAL
        return self.score_ids(template.encode(tokenizer, prompts, responses)).tolist()


