"""The float64 reference of the attention layer between its projections, shared by the kernel tests (padded
masks in test_cpu_speedups, packed layouts in test_packed_kernel): heads split, rotary embedding, scaled scores,
softmax, v, heads merged; and its gradients for an upstream gradient."""
import numpy as np


def rope(x, cos, sin):
    """MindFormers' rotate-half rotary embedding on the last axis, and its transpose for gradients."""
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def rope_transposed(g, cos, sin):
    half = g.shape[-1] // 2
    z = g * sin
    return g * cos + np.concatenate([z[..., half:], -z[..., :half]], -1)


def attention(q, k, v, cos, sin, heads, groups, masked):
    """q (B, S, heads * D), k and v (B, S, groups * D); cos/sin float64 broadcasting to (B, heads, S, D);
    masked(scores) -> the scores the softmax takes (the caller's mask applied to the float64 q kᵀ / sqrt(D)).
    Returns the output (B, S, heads * D) and grads(g) -> (dq, dk, dv)."""
    batch, seq, _ = q.shape
    size = cos.shape[-1]
    split = lambda x, n: x.astype(np.float64).reshape(batch, seq, n, size).transpose(0, 2, 1, 3)
    merge = lambda x: x.transpose(0, 2, 1, 3).reshape(batch, seq, -1)
    rep = heads // groups
    qh, kh, vh = split(q, heads), np.repeat(split(k, groups), rep, 1), np.repeat(split(v, groups), rep, 1)
    qr, kr = rope(qh, cos, sin) / np.sqrt(size), rope(kh, cos, sin)
    scores = masked(qr @ kr.swapaxes(-1, -2))
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)

    def grads(g):
        g = split(g, heads)
        dv = probs.swapaxes(-1, -2) @ g
        dp = g @ vh.swapaxes(-1, -2)
        ds = probs * (dp - (dp * probs).sum(-1, keepdims=True))
        dq = rope_transposed(ds @ kr, cos, sin) / np.sqrt(size)
        dk = rope_transposed(ds.swapaxes(-1, -2) @ qr, cos, sin)
        fold = lambda x: x.reshape(batch, groups, rep, seq, size).sum(2)  # heads sharing a key head add up
        return merge(dq), merge(fold(dk)), merge(fold(dv))

    return merge(probs @ vh), grads
