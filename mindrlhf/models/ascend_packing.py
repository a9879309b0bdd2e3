"""Packing on Ascend: MindFormers' own packed-attention path (FlashAttention, TND layout, actual_seq_len).

MindFormers' legacy Llama runs packed rows only one way in training: use_flash_attention +
use_eod_attn_mask_compression make every layer call FlashAttentionScore with input_layout TND and sparse_mode 8,
given `actual_seq_len`, the cumulative END offsets of the causal blocks over the flattened rows. That is
block-diagonal causal attention with row positions for RoPE: exact for plain packing without in-span pads,
not for shared_prefix or pad tokens. ASCEND_NOTES.md cites the MindFormers/MindSpore code for each rule here.

Pure numpy (no MindSpore import): the dataset computes `actual_seq_len` on the host, like MindFormers'
pipelines do, and the model passes it to LlamaModel as is.
"""
import numpy as np

from mindrlhf.config_access import config_getter
from mindrlhf.errors import ConfigError

# PACKING.md's per-token layout: code = segment * 8 + kind (kept in step with mindrlhf/data/packing.py).
SEGMENT_SHIFT = 3
KIND_MASK = 7

# MindFormers' default static length of one row's actual_seq_len (eod_pad_length / compressed_eod_mask_length).
EOD_PAD_LENGTH = 128
# FlashAttentionScore TND: the list (the op's "batch") holds at most 1024 entries per call (MindSpore's doc).
MAX_FA_ENTRIES = 1024
# LowerTriangularMaskWithDynamic refuses mask compression (eod included) below this seq_length.
MIN_SEQ_LENGTH = 2048

PACKING_MODES = ("pairs", "shared_prefix")


def actual_seq_len(codes, pad_length: int = EOD_PAD_LENGTH, row_groups: int = 1) -> np.ndarray:
    """(R, S) layout codes -> (R, pad_length) int32 actual_seq_len, MindFormers' format.

    Row r lists the END offset of each span (segment 1, 2, ...), then the end of the filler (the row end S, as
    one more causal block: filler outputs are never read and filler and spans never see each other), each plus
    the row's offset in its FlashAttention call, then repeats the row end up to pad_length (MindFormers pads with
    seq_length the same way; a repeated value is an empty block). No leading 0.
    row_groups: how many FlashAttention calls the R rows are split into, as contiguous equal blocks
    (dp * micro_batch_num * micro_batch_interleave_num under full_batch; micro_batch_num * interleave when
    each rank reads its own rows): offsets restart at 0 in each block, as asl_batch_wrapper restarts them per
    micro batch and per rank, because MindSpore splits the flattened list by dp without rebasing it.
    Raises ValueError for a layout the TND path cannot run exactly (shared_prefix answers, in-span pads,
    spans out of order, filler before a span, too many spans for pad_length).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be a 2-D integer array (rows, seq_length), got {codes.dtype} {codes.shape}")
    rows, seq = codes.shape
    if pad_length < 1:
        raise ValueError(f"pad_length must be >= 1, got {pad_length}")
    if row_groups < 1 or rows % row_groups:
        raise ValueError(f"row_groups ({row_groups}) must divide the {rows} rows into equal blocks")
    per_call = rows // row_groups
    if per_call * pad_length > MAX_FA_ENTRIES:
        raise ValueError(f"one FlashAttention call would get {per_call} rows x {pad_length} = "
                         f"{per_call * pad_length} actual_seq_len entries; the TND layout allows {MAX_FA_ENTRIES}: "
                         f"lower pad_length or the rows per call")
    if (codes < 0).any():
        r, c = np.argwhere(codes < 0)[0]
        raise ValueError(f"negative layout code {codes[r, c]} at row {r}, column {c}")
    kinds = codes & KIND_MASK
    if kinds.any():
        r, c = np.argwhere(kinds != 0)[0]
        what = "an in-span pad (kind +4)" if kinds[r, c] & 4 else "a shared_prefix answer (kind 1/2)"
        raise ValueError(f"row {r}, column {c} holds {what}: FlashAttention with actual_seq_len gives each span "
                         "plain causal attention, which cannot hide pad keys or keep two answers apart")
    segments = codes >> SEGMENT_SHIFT
    out = np.empty((rows, pad_length), dtype=np.int64)
    for r in range(rows):
        seg = segments[r]
        used = int(np.count_nonzero(seg))
        if seg[used:].any():
            raise ValueError(f"row {r}: filler (segment 0) must be the row's unused end, but a span follows it")
        steps = np.diff(seg[:used])
        if used and (seg[0] != 1 or ((steps != 0) & (steps != 1)).any()):
            raise ValueError(f"row {r}: spans must be numbered 1, 2, ... in order, each one contiguous run")
        ends = np.append(np.flatnonzero(np.diff(seg)) + 1, seq)
        if len(ends) > pad_length:
            raise ValueError(f"row {r} has {len(ends)} causal blocks (spans + filler) but pad_length is "
                             f"{pad_length}: pack fewer sequences per row or raise pad_length")
        offset = (r % per_call) * seq
        out[r, :len(ends)] = ends + offset
        out[r, len(ends):] = seq + offset
    if out.max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError("actual_seq_len offsets overflow int32")
    return out.astype(np.int32)


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
    packing = get("packing", False)
    if packing in (None, False, "false", "False", ""):
        return
    if packing not in PACKING_MODES:
        raise ConfigError(f"model_config.packing must be false or one of {PACKING_MODES}, got {packing!r}")
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
