"""The compiled attention kernel on packed rows (several sequences per row, issue #25): mask (B, 2, 1, S) of
per-token positions and layout codes (segment * 8 + kind). It computes the visibility rule and the rotary
embedding by position that a float64 reference computes; each sequence of a packed row gives what it gives run
alone in a padded row; a sequence's tokens cannot change another's outputs or gradients; a bad position or mask
shape is refused. The packed row's cost is benchmarks/bench_packed_attention.py's."""
import ctypes

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from attention_reference import attention
from mindrlhf.data import packing as pk
from test_cpu_speedups import compiled_library

PAD, PLAIN, CHOSEN, REJECTED = 4, 0, 1, 2  # layout kinds (issue #25: code = segment * 8 + kind)


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def library():
    path = compiled_library()
    if path is None:
        pytest.skip("no C++ compiler here: the kernels cannot build (the fallback is tested in test_cpu_speedups)")
    return path


# ---- layouts ----

def plain(length, pads=0):
    """A plain sequence of `length` real tokens and `pads` in-span pad tokens after them."""
    return ("plain", length, pads)


def shared(prefix, chosen, chosen_pads, rejected, rejected_pads):
    """A shared_prefix span: prefix (kind 0), chosen answer (kind 1) and rejected answer (kind 2), each answer's
    positions continuing from the prefix end, pads (kind + 4) after each answer's real tokens."""
    return ("shared", prefix, chosen, chosen_pads, rejected, rejected_pads)


def span_length(spec):
    return spec[1] + spec[2] if spec[0] == "plain" else sum(spec[1:])


def pack_row(seq, specs):
    """positions and codes (S,) of one row, and its sequences: for each, the packed columns of the sequence run
    alone (a padded row's columns 0, 1, ...) and which of them are pads."""
    positions, codes = np.zeros(seq, np.int64), np.zeros(seq, np.int64)  # the rest: filler (code 0, position 0)
    sequences, col = [], 0
    for segment, spec in enumerate(specs, 1):
        parts = []  # (kind, count, first position)
        if spec[0] == "plain":
            _, length, pads = spec
            parts = [(PLAIN, length, 0), (PLAIN + PAD, pads, length)]
        else:
            _, d, c, cp, r, rp = spec
            parts = [(PLAIN, d, 0), (CHOSEN, c, d), (CHOSEN + PAD, cp, d + c), (REJECTED, r, d),
                     (REJECTED + PAD, rp, d + r)]
        start, cols = col, {}
        for kind, count, first in parts:
            positions[col:col + count] = first + np.arange(count)
            codes[col:col + count] = segment * 8 + kind
            cols[kind] = list(range(col, col + count))
            col += count
        if spec[0] == "plain":
            sequences.append((cols[PLAIN] + cols[PLAIN + PAD], [False] * len(cols[PLAIN]) + [True] * spec[2]))
        else:
            for branch in (CHOSEN, REJECTED):
                real, pads = cols[branch], cols[branch + PAD]
                reals = len(cols[PLAIN]) + len(real)
                sequences.append((cols[PLAIN] + real + pads, [False] * reals + [True] * len(pads)))
        assert col - start == span_length(spec)
    assert col < seq, "leave filler at the row end"
    return positions, codes, sequences


def random_specs(rng, seq):
    """Spans of different lengths, alternating shared_prefix and plain ones, some with in-span pads, until the
    row is nearly full (a filler tail of at least 1)."""
    specs, used = [], 0
    while True:
        if len(specs) % 2 == 0:
            spec = shared(int(rng.integers(1, 8)), int(rng.integers(1, 9)), int(rng.integers(0, 3)),
                          int(rng.integers(1, 9)), int(rng.integers(0, 3)))
        else:
            spec = plain(int(rng.integers(1, 24)), int(rng.integers(0, 4)))
        if used + span_length(spec) >= seq:
            return specs
        specs.append(spec)
        used += span_length(spec)


def packed_mask(positions, codes):
    """The kernel's packed mask (B, 2, 1, S) float32: positions, then codes."""
    return np.stack([positions, codes], 1)[:, :, None, :].astype(np.float32)


def tables(seq, size):
    angles = np.arange(seq)[:, None] * 10000.0 ** (-np.arange(0, size, 2) / size)[None]
    angles = np.concatenate([angles, angles], -1)
    return [f(angles).reshape(1, 1, seq, size).astype(np.float32) for f in (np.cos, np.sin)]


def reference(q, k, v, cos, sin, positions, visible, heads, groups):
    """float64 (attention_reference): each token rotated by its position (rotate-half), softmax over the visible
    keys only; and the gradients for an upstream gradient."""
    seq, size = q.shape[1], cos.shape[-1]
    cos = cos.reshape(seq, size).astype(np.float64)[positions][:, None]  # (B, 1, S, D)
    sin = sin.reshape(seq, size).astype(np.float64)[positions][:, None]
    return attention(q, k, v, cos, sin, heads, groups, lambda scores: np.where(visible[:, None], scores, -np.inf))


class Weighted(nn.Cell):
    """sum(attention * w): its gradients are the kernel's backward for the upstream gradient w."""

    def __init__(self, library, weight):
        super().__init__()
        from mindrlhf.kernels.cpu_speedups import RopeAttention

        self.attention = RopeAttention(library)
        self.weight = Tensor(weight)

    def construct(self, q, k, v, cos, sin, mask):
        out, _ = self.attention(q, k, v, cos, sin, mask)
        return (out * self.weight).sum()


def run(library, inputs, weight):
    """The kernel's output and dq, dk, dv (through RopeAttention's bprop) as numpy."""
    from mindrlhf.kernels.cpu_speedups import RopeAttention

    tensors = [Tensor(x) for x in inputs]
    out, stats = RopeAttention(library)(*tensors)
    assert stats.shape == (inputs[0].shape[0], inputs[0].shape[-1] // inputs[3].shape[-1], inputs[0].shape[1], 2)
    grads = ms.grad(Weighted(library, weight), grad_position=(0, 1, 2))(*tensors)
    return out.asnumpy(), [g.asnumpy() for g in grads]


def packed_case(seed, seq, size, heads, groups, batch=2):
    rng = np.random.default_rng(seed)
    rows = [pack_row(seq, random_specs(rng, seq)) for _ in range(batch)]
    positions = np.stack([r[0] for r in rows])
    codes = np.stack([r[1] for r in rows])
    q = rng.normal(size=(batch, seq, heads * size)).astype(np.float32)
    k, v = (rng.normal(size=(batch, seq, groups * size)).astype(np.float32) for _ in range(2))
    cos, sin = tables(seq, size)
    weight = rng.normal(size=q.shape).astype(np.float32)
    return rng, [q, k, v, cos, sin, packed_mask(positions, codes)], weight, positions, codes, [r[2] for r in rows]


CASES = [(16, 4, 2), (16, 2, 2), (32, 4, 2), (32, 2, 2)]
CASE_IDS = ["d16-gqa", "d16-mha", "d32-gqa", "d32-mha"]


@pytest.mark.parametrize("size,heads,groups", CASES, ids=CASE_IDS)
def test_packed_rows_match_float64(library, size, heads, groups):
    """Several spans per row of different lengths (plain and shared_prefix, in-span pads, filler at the end),
    S = 83 (blocks of rows and of 16 keys with tails, spans crossing both)."""
    seq = 83
    _, inputs, weight, positions, codes, _ = packed_case(size + heads, seq, size, heads, groups)
    kinds = set((codes % 8).ravel())
    assert {0, 1, 2, 5, 6}.issubset(kinds) and (codes // 8 == 0).any() and (codes % 8 == 4).any(), kinds
    out, grads = run(library, inputs, weight)
    visible = np.stack([pk.visible(c) for c in codes])
    want, want_grads = reference(*inputs[:5], positions, visible, heads, groups)
    # 1e-5 relative, and 1e-6 of the tensor's largest value absolute (float32 keeps 6e-8 of it per rounding;
    # results are sums of a few dozen products, where elements near 0 cancel larger terms)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    for name, have, expected in zip("qkv", grads, want_grads(weight.astype(np.float64))):
        np.testing.assert_allclose(have, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(), err_msg=f"d{name}")
        assert np.abs(have).max() > 0


def padded_rows(inputs, weight, sequences):
    """Every sequence of the packed batch alone in a row of its own, at columns 0.. (positions 0..), with the
    per-key mask (1 - visible) * -10000 (B, 1, 1, S); the upstream gradient of a shared prefix goes to its chosen
    row only, so that summing the rows' gradients per packed column gives the packed gradients."""
    q, k, v, cos, sin, _ = inputs
    seq = q.shape[1]
    rows = [(b, cols, pads) for b, row in enumerate(sequences) for cols, pads in row]
    pq, pw = np.zeros((len(rows), seq, q.shape[2]), np.float32), np.zeros((len(rows), seq, q.shape[2]), np.float32)
    pk, pv = (np.zeros((len(rows), seq, k.shape[2]), np.float32) for _ in range(2))
    visible = np.zeros((len(rows), seq), np.float32)
    counted = set()
    for n, (b, cols, pads) in enumerate(rows):
        width = len(cols)
        pq[n, :width], pk[n, :width], pv[n, :width] = q[b, cols], k[b, cols], v[b, cols]
        visible[n, :width] = ~np.array(pads)
        for i, col in enumerate(cols):
            if (b, col) not in counted:  # a prefix: its queries' upstream gradient once
                counted.add((b, col))
                pw[n, i] = weight[b, col]
    mask = ((1 - visible) * -10000.0).reshape(len(rows), 1, 1, seq).astype(np.float32)
    return [pq, pk, pv, cos, sin, mask], pw, rows


@pytest.mark.parametrize("size,heads,groups", CASES, ids=CASE_IDS)
def test_each_span_equals_its_sequence_run_alone_padded(library, size, heads, groups):
    """Kernel-level packed-vs-padded: each sequence's outputs in the packed row equal those of the same sequence
    alone in a padded row (existing mask form, positions 0..), and the packed gradients are the padded rows'
    summed per token (a shared prefix serves both rows of its pair)."""
    seq = 83
    _, inputs, weight, _, codes, sequences = packed_case(100 + size + heads, seq, size, heads, groups)
    out, grads = run(library, inputs, weight)
    padded, padded_weight, rows = padded_rows(inputs, weight, sequences)
    pout, pgrads = run(library, padded, padded_weight)
    summed = [np.zeros_like(g) for g in grads]
    compared = np.zeros(codes.shape, bool)
    for n, (b, cols, _) in enumerate(rows):
        np.testing.assert_allclose(out[b, cols], pout[n, :len(cols)], rtol=0, atol=1e-6)
        compared[b, cols] = True
        for total, grad in zip(summed, pgrads):
            np.add.at(total[b], cols, grad[n, :len(cols)])
    assert (compared == (codes // 8 > 0)).all()  # every span token compared, filler is not a sequence
    for name, have, want in zip("qkv", grads, summed):
        spans = codes // 8 > 0
        np.testing.assert_allclose(have[spans], want[spans], rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("size,heads,groups", [(16, 4, 2), (32, 2, 2)], ids=["d16-gqa", "d32-mha"])
def test_a_span_cannot_change_another(library, size, heads, groups):
    """New q, k, v rows for the tokens of one span: every other token's output and gradients stay bit-identical
    (keys of other spans are exactly 0 in the softmax and skipped or multiplied by that 0)."""
    seq = 83
    rng, inputs, weight, _, codes, _ = packed_case(200 + size, seq, size, heads, groups)
    out, grads = run(library, inputs, weight)
    for b, segment in ((0, 2), (1, 1), (0, int(codes[0].max()) // 8)):  # a middle, a first and a last span
        changed = [x.copy() for x in inputs]
        span = codes[b] // 8 == segment
        for x in changed[:3]:
            x[b, span] = rng.normal(size=x[b, span].shape).astype(np.float32)
        out2, grads2 = run(library, changed, weight)
        others = np.ones(codes.shape, bool)
        others[b, span] = False
        assert not np.array_equal(out2[b, span], out[b, span])  # the change reached its own span
        assert np.array_equal(out2[others], out[others])
        for name, before, after in zip("qkv", grads, grads2):
            assert np.array_equal(after[others], before[others]), f"d{name} of another span changed"


@pytest.mark.parametrize("size", [16, 32])
def test_keys_before_a_span_are_not_computed(library, size):
    """The skipping, checked without a clock: a NaN in the first span's values reaches that span's later rows
    (NaN propagates: no -ffast-math) but no row of the second span whose block of query rows (at most 16) lies
    inside it; had the kernel computed their keys from 0, probability 0 times NaN would be NaN there."""
    seq, heads = 120, 2
    positions, codes, _ = pack_row(seq, [plain(40), plain(70)])
    rng = np.random.default_rng(size)
    q, k, v = (rng.normal(size=(1, seq, heads * size)).astype(np.float32) for _ in range(3))
    v[0, 5, 1] = np.nan
    from mindrlhf.kernels.cpu_speedups import RopeAttention

    out, _ = RopeAttention(library)(*(Tensor(x) for x in [q, k, v, *tables(seq, size),
                                                            packed_mask(positions[None], codes[None])]))
    out = out.asnumpy()[0]
    assert np.isnan(out[5:40]).any(axis=1).all()  # (rows 0-4 too: their block computes key 5, 0 * NaN)
    assert np.isfinite(out[56:]).all()  # rows 56.. : blocks of 16 (D 16) or 8 (D 32) rows, all in span 2


def test_results_do_not_depend_on_the_thread_count_or_the_2d_layout(library):
    """1 or 2 threads, and q, k, v as (B·S, ·) (the model's 2-D layout; the packed mask gives B): bit-identical."""
    from mindrlhf.kernels.cpu_speedups import RopeAttention

    _, inputs, weight, *_ = packed_case(7, 83, 16, 4, 2, batch=3)
    kernels = ctypes.CDLL(library)  # the library the Custom ops loaded: one threads setting
    try:
        kernels.MindrlhfSetThreads(1)
        one = run(library, inputs, weight)
        kernels.MindrlhfSetThreads(2)
        two = run(library, inputs, weight)
    finally:
        kernels.MindrlhfSetThreads(1)
    assert np.array_equal(one[0], two[0]) and all(np.array_equal(a, b) for a, b in zip(one[1], two[1]))
    flat = [x.reshape(-1, x.shape[-1]) for x in inputs[:3]] + inputs[3:]
    out, stats = RopeAttention(library)(*(Tensor(x) for x in flat))
    assert stats.shape == (3, 4, 83, 2) and np.array_equal(out.asnumpy().reshape(one[0].shape), one[0])


def test_bad_positions_codes_and_mask_shapes_are_refused(library):
    """The kernel returns 2 for a position outside [0, S) or a code that is no segment and kind, 1 for a mask that
    fits no form; MindSpore's AOT launcher raises a RuntimeError naming the function and that value. (A graph
    that failed refuses to run again, "An error occurred in the previous step", and takes 3 s to unwind: one case
    runs as a graph, the others op by op, each with its own cell.)"""
    from mindrlhf.kernels.cpu_speedups import RopeAttention

    seq = 40
    _, inputs, _, positions, codes, _ = packed_case(3, seq, 16, 2, 2)
    out, _ = RopeAttention(library)(*(Tensor(x) for x in inputs))
    assert np.isfinite(out.asnumpy()).all()  # the unaltered inputs run

    def refused(mask, code):
        with pytest.raises(RuntimeError, match=rf"function\(RopeAttentionForward\) is {code}\b"):
            RopeAttention(library)(*(Tensor(x) for x in inputs[:5]), Tensor(mask))[0].asnumpy()

    def changed(plane, col, value):
        mask = packed_mask(positions, codes)
        mask[1, plane, 0, col] = value
        return mask

    refused(changed(0, 3, seq), 2)  # a position == S
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        refused(changed(0, 3, seq), 2)
        refused(changed(0, 3, -1), 2)
        refused(changed(0, 5, 1.5), 2)  # not an integer
        refused(changed(1, 5, -8), 2)  # a negative code
        refused(changed(1, 5, 8 * (seq + 1)), 2)  # segment > S
        mask = packed_mask(positions, codes)
        refused(np.concatenate([mask, mask], 2), 1)  # (B, 2, 2, S)
        refused(np.concatenate([mask, mask[:, :1]], 1), 1)  # (B, 3, 1, S)
        refused(mask[:1], 1)  # packed masks are per batch row: (1, 2, 1, S) for B = 2
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


def test_one_span_computes_what_the_per_key_mask_does(library):
    """One span of a whole row (packed mask) against the padded path's per-key mask: the same outputs. The cost of
    packed rows is measured by benchmarks/bench_packed_attention.py."""
    from mindrlhf.kernels.cpu_speedups import RopeAttention

    seq, size, heads = 256, 64, 2
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, seq, heads * size)).astype(np.float32) for _ in range(3))
    cos, sin = tables(seq, size)
    one = packed_mask(np.arange(seq)[None], np.full((1, seq), 8))
    per_key = np.zeros((1, 1, 1, seq), np.float32)
    net = RopeAttention(library)
    outputs = [net(*(Tensor(x) for x in (q, k, v, cos, sin, mask)))[0].asnumpy() for mask in (one, per_key)]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-6)