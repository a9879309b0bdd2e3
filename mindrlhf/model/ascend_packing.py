"""Packing on Ascend: MindFormers' own packed-attention path (FlashAttention, TND layout, actual_seq_len).

MindFormers' legacy Llama runs packed rows only one way in training: use_flash_attention +
use_eod_attn_mask_compression make every layer call FlashAttentionScore with input_layout TND and sparse_mode 8,
given `actual_seq_len`, the cumulative END offsets of the causal blocks over the flattened rows. That is
block-diagonal causal attention with row positions for RoPE: exact for plain packing without in-span pads,
not for shared_prefix or pad tokens. docs/packing.md cites the MindFormers/MindSpore code for each rule here.

The dataset computes `actual_seq_len` on the host (mindrlhf.data.packing.actual_seq_len), like MindFormers'
pipelines do, and the model passes it to LlamaModel as is; this module holds the checks of the config.
"""
from mindrlhf.config_access import config_getter
from mindrlhf.data.packing import packing_mode
from mindrlhf.errors import ConfigError

# LowerTriangularMaskWithDynamic refuses mask compression (eod included) below this seq_length.
MIN_SEQ_LENGTH = 2048


def on_flash_attention(model_config) -> bool:
    """Whether attention runs through MindFormers' FlashAttention (model_config.use_flash_attention), whose
    FlashAttentionScore kernel exists on Ascend only: the config, not the device, selects the Ascend branches
    (packed actual_seq_len, scoring passes of at most 8 rows), so tests run them on CPU with the kernel replaced
    by tests/fa_standin.py. A CPU run with it on is refused by the trainer and the scorer (check_flash_device)."""
    return bool(config_getter(model_config)("use_flash_attention", False))


def check_flash_device(model_config, device: str, where: str) -> None:
    """ConfigError for use_flash_attention on a device without FlashAttentionScore (CPU)."""
    if device == "CPU" and on_flash_attention(model_config):
        raise ConfigError(f"{where}: model.model_config.use_flash_attention: True needs Ascend (FlashAttentionScore "
                          "has no CPU kernel); set it to False on CPU")


def _parallel(config, key, default):
    parallel = config_getter(config)("parallel_config", None)
    if parallel is None:
        return default
    value = config_getter(parallel)(key, None)
    return default if value is None else value


def check_ascend_packing(model_config, training: bool = True) -> None:
    """Refuse, before anything is built, a model config that cannot train or score packed rows on Ascend.

    Call it only when the run's device is Ascend; no packing: no-op. training=False (scoring: plain spans, no
    pads) lifts the loss_type rule only.
    """
    get = config_getter(model_config)
    packing = packing_mode(get("packing", None), "model_config.packing")
    if not packing:
        return
    if packing == "shared_prefix":
        raise ConfigError(
            "model_config.packing: shared_prefix cannot run on Ascend: MindFormers' Llama feeds packed rows to "
            "FlashAttention as plain causal blocks (actual_seq_len), which cannot keep the chosen and rejected "
            "answers apart, and it rotates every token by its row position (position_ids is read only when "
            "decoding), so the rejected answer would sit after the chosen one; use packing: pairs")
    if training and (get("loss_type", None) or "span") == "span":
        raise ConfigError(
            "model_config.packing on Ascend needs model_config.loss_type: last_token: the span loss extends the "
            "shorter answer with pad tokens that no key may see, and FlashAttention's packed blocks "
            "(actual_seq_len) are plain causal, so pads would see each other; or set packing: false")
    if not get("use_flash_attention", False):
        raise ConfigError("model_config.packing on Ascend needs model_config.use_flash_attention: True "
                          "(MindFormers packs only through FlashAttention's TND layout)")
    if not get("use_eod_attn_mask_compression", False):
        raise ConfigError("model_config.packing on Ascend needs model_config.use_eod_attn_mask_compression: True "
                          "(it selects FlashAttention's TND layout with actual_seq_len)")
    if get("use_ring_attention", False):
        raise ConfigError("model_config.packing on Ascend needs model_config.use_ring_attention: False "
                          "(MindFormers skips the actual_seq_len path under ring attention)")
    if get("use_past", False):
        raise ConfigError("model_config.packing on Ascend needs model_config.use_past: False "
                          "(the incremental-inference attention ignores actual_seq_len)")
    seq_length = int(get("seq_length", 0) or 0)
    if seq_length < MIN_SEQ_LENGTH:
        raise ConfigError(f"model_config.packing on Ascend needs model_config.seq_length >= {MIN_SEQ_LENGTH} "
                          f"(MindFormers' compressed causal mask is 2048 x 2048), got {seq_length}")
    cp = int(_parallel(model_config, "context_parallel", 1) or 1)
    if cp > 1:
        raise ConfigError(f"model_config.packing on Ascend needs parallel_config.context_parallel: 1, got {cp} "
                          "(FlashAttention's TND layout splits only the batch, by data_parallel)")
    seq_split = int(_parallel(model_config, "seq_split_num", 1) or 1)
    if seq_split > 1:
        raise ConfigError(f"model_config.packing on Ascend needs parallel_config.seq_split_num: 1, got {seq_split} "
                          "(MindFormers refuses seq_pipe with use_eod_attn_mask_compression)")
