"""Packing on Ascend: our packed forward calls FlashAttentionScore in its documented variable-length mode.

Every attention layer's FlashAttention is rebuilt with input_layout TND and sparse_mode 3 (the lower triangle of
each block, the (2048, 2048) compressed mask), given actual_seq_qlen = actual_seq_kvlen = the cumulative ends of
the causal blocks over one call's flattened rows (mindrlhf.data.packing.actual_seq_len, computed on the host).
Positions restart per sequence through per-token rotary tables (mindrlhf.model.packed), as on CPU. That is
exact for plain packing without in-span pads, not for shared_prefix or pad keys. MindFormers' own packed path
(use_eod_attn_mask_compression) calls sparse_mode 8, which MindSpore 2.9's docstring calls not implemented; it is
refused here. docs/packing.md cites the docstring for each rule.
"""
import math

import numpy as np

from mindrlhf.config_access import config_getter
from mindrlhf.data.packing import packing_mode
from mindrlhf.errors import ConfigError

TND_SPARSE_MODE = 3  # the lower triangle of each (S1 = S2) block: the docstring's TND takes 2 or 3
COMPRESSED_MASK = 2048  # "In compression scenario, sparse_mode is 2, 3, or 4, attn_mask must be (2048, 2048)"


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
            "model_config.packing: shared_prefix cannot run on Ascend: FlashAttention's variable-length mode "
            "(TND, actual_seq_qlen/actual_seq_kvlen) gives each block plain causal attention, and the rejected "
            "answer must not see the chosen one it follows in the same block; use packing: pairs")
    if training and (get("loss_type", None) or "span") == "span":
        raise ConfigError(
            "model_config.packing on Ascend needs model_config.loss_type: last_token: the span loss extends the "
            "shorter answer with pad tokens that no key may see, and FlashAttention's packed blocks "
            "(actual_seq_qlen/actual_seq_kvlen) are plain causal, so pads would see each other; or set "
            "packing: false")
    if not get("use_flash_attention", False):
        raise ConfigError("model_config.packing on Ascend needs model_config.use_flash_attention: True "
                          "(packed rows go to FlashAttention's TND layout)")
    if get("use_eod_attn_mask_compression", False):
        raise ConfigError("model_config.packing on Ascend needs model_config.use_eod_attn_mask_compression: False: "
                          "it makes MindFormers call FlashAttentionScore with sparse_mode 8, which MindSpore 2.9 "
                          "documents as not implemented; packing calls the op's TND sparse_mode 3 itself")
    if get("use_ring_attention", False):
        raise ConfigError("model_config.packing on Ascend needs model_config.use_ring_attention: False "
                          "(ring attention splits the sequence, TND blocks cannot cross ranks)")
    if get("use_past", False):
        raise ConfigError("model_config.packing on Ascend needs model_config.use_past: False "
                          "(the incremental-inference attention ignores actual_seq_len)")
    cp = int(_parallel(model_config, "context_parallel", 1) or 1)
    if cp > 1:
        raise ConfigError(f"model_config.packing on Ascend needs parallel_config.context_parallel: 1, got {cp} "
                          "(FlashAttention's TND layout splits only the batch, by data_parallel)")
    seq_split = int(_parallel(model_config, "seq_split_num", 1) or 1)
    if seq_split > 1:
        raise ConfigError(f"model_config.packing on Ascend needs parallel_config.seq_split_num: 1, got {seq_split} "
                          "(seq_pipe splits the sequence, TND blocks cannot cross chunks)")


def compressed_causal_mask():
    """The (2048, 2048) uint8 mask sparse_mode 2/3 take: 1 above the diagonal (discarded)."""
    return np.triu(np.ones((COMPRESSED_MASK, COMPRESSED_MASK), np.uint8), 1)


def use_tnd_attention(backbone, parallel_config=None) -> None:
    """Rebuild every layer's FlashAttention of a legacy LlamaModel (built with use_flash_attention) as TND with
    sparse_mode 3 and actual_seq_qlen/kvlen; the layers then take (x, per-token freqs_cis, compressed mask,
    actual_seq_len=...). parallel_config: shard the op as MindFormers shards its TND call (batch by dp, heads by
    mp; the mask whole; the lists by dp); the strategy counts only under (semi-)auto parallel."""
    from mindformers.modules.flash_attention import FlashAttention

    for layer in backbone.layers:
        attention = layer.attention
        if not attention.use_flash_attention:
            raise ConfigError("packing on Ascend: a layer without FlashAttention (use_flash_attention: True)")
        attention.input_layout, attention.sparse_mode = "TND", TND_SPARSE_MODE
        attention.use_eod_attn_mask_compression = True  # the layer passes actual_seq_len to the op
        cell = FlashAttention(head_num=attention.n_head, pre_tokens=2147483647, next_tokens=0, input_layout="TND",
                              keep_prob=1., scale_value=1. / math.sqrt(attention.head_dim),
                              sparse_mode=TND_SPARSE_MODE, use_attention_mask=True, use_actual_seqlen=True)
        if parallel_config is not None:
            dp, mp = parallel_config.data_parallel, parallel_config.model_parallel
            cell.flash_attention.shard(((dp, mp, 1), (dp, mp, 1), (dp, mp, 1), (1, 1), (dp,), (dp,)))
        attention.flash_attention = cell
