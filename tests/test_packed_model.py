"""Packed (padding-free) LlamaRewardModel against today's padded one (PACKING.md): the same pairs give the same
loss, the same gradients and the same scores, plain packing and shared-prefix spans, both loss types, margin and
centering; a sequence's rewards do not depend on what else shares its row. Float32, tiny Llama 2, graph mode.

Training steps come from the real packer (the padded step's records -> mindrlhf.data.packing.pack_step), so
the model is fed what the dataset feeds it; scoring steps from a local first-fit placement (Rows)."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor

from conftest import TINY_CONFIG
from mindrlhf.data import packing as pk

SEQ, ROWS, PAD = 64, 4, 2
SLOTS = ROWS * SEQ // 2
# (prompt, chosen answer, rejected answer) lengths: chosen longer, shorter, a prefix of rejected (answer 0),
# rejected a prefix of chosen, equal lengths.
SHAPES = [(6, 10, 4), (3, 5, 12), (8, 0, 7), (12, 9, 9), (5, 20, 3), (10, 6, 0)]
MARGINS = np.array([0.5, -1.0, 2.0, 0.0, 1.5, -0.25], np.float32)
LOSSES = {"span": dict(loss_type="span"),
          "span-margin-center": dict(loss_type="span", center_rewards_coefficient=0.3),
          "last_token": dict(loss_type="last_token"),
          "last_token-margin-center": dict(loss_type="last_token", center_rewards_coefficient=0.3)}
# The compiled kernel (what CPU users get) in make test-fast; the other two layers in make test (slow).
VARIANTS = [pytest.param("matmul-softmax", marks=pytest.mark.slow), pytest.param("stock", marks=pytest.mark.slow),
            "kernel"]


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def make_pairs(seed=0):
    """Token lists (chosen, rejected) of the SHAPES, no pad id inside, answers differing at their first token."""
    rng = np.random.default_rng(seed)
    pairs = []
    for prompt, c, r in SHAPES:
        head = [1] + list(rng.integers(3, 32000, prompt - 1))
        chosen, rejected = list(rng.integers(3, 32000, c)), list(rng.integers(3, 32000, r))
        if c and r:
            rejected[0] = chosen[0] + 1 if chosen[0] < 31999 else 3
        pairs.append(([int(t) for t in head + chosen], [int(t) for t in head + rejected]))
    return pairs


def padded_batch(pairs, margin=None):
    """Today's padded step (the converter's and batch_map's arrays): chosen rows then rejected rows."""
    n = len(pairs)
    ids = np.full((2 * n, SEQ), PAD, np.int32)
    for i, (c, r) in enumerate(pairs):
        ids[i, :len(c)], ids[n + i, :len(r)] = c, r
    lens = np.array([len(c) for c, _ in pairs] + [len(r) for _, r in pairs], np.int32)
    differ = ids[:n] != ids[n:]
    divergence, end = differ.argmax(1), np.maximum(lens[:n], lens[n:])
    cols = np.arange(SEQ)
    loss_mask = ((cols >= divergence[:, None]) & (cols < end[:, None])).astype(np.float32)
    attention = (cols < lens[:, None]).astype(np.float32)
    out = [ids, np.tile(cols.astype(np.int32), (2 * n, 1)), attention, loss_mask, lens]
    return out + ([margin] if margin is not None else [])


class Rows:
    """First-fit placement of spans into ROWS rows of SEQ tokens: tokens, positions, codes, flat offsets."""

    def __init__(self):
        self.ids = np.full((ROWS, SEQ), PAD, np.int32)
        self.pos = np.zeros((ROWS, SEQ), np.int32)
        self.codes = np.zeros((ROWS, SEQ), np.int32)
        self.used = [0] * ROWS
        self.segments = [0] * ROWS

    def place(self, tokens, positions, kinds):
        """A span; returns the flat index of its first token."""
        row = next(i for i in range(ROWS) if self.used[i] + len(tokens) <= SEQ)
        start, self.segments[row] = self.used[row], self.segments[row] + 1
        span = slice(start, start + len(tokens))
        self.ids[row, span], self.pos[row, span] = tokens, positions
        self.codes[row, span] = self.segments[row] * 8 + np.asarray(kinds)
        self.used[row] += len(tokens)
        return row * SEQ + start


def pack(pairs, mode, loss_type, margin=None):
    """PACKING.md's training step for these pairs, by the real packer: the padded step's records ->
    mindrlhf.data.packing.pair_from_record -> pack_step, pairs placed first-fit into ROWS rows of SEQ.
    Returns the model's inputs (input_ids, position_id, attention_mask = codes, loss_mask (2, P),
    end_ind (4, P)[, margin (2, P)]) and the spans of each row."""
    ids, _, attention, loss_mask, lens = padded_batch(pairs)[:5]
    n = len(pairs)
    records = [pk.pair_from_record({"chosen_input_ids": ids[i], "chosen_attention_mask": attention[i],
                                    "rejected_input_ids": ids[n + i], "rejected_attention_mask": attention[n + i],
                                    "end_ind": max(lens[i], lens[n + i]), "loss_mask": loss_mask[i],
                                    "margin": None if margin is None else margin[i]}, PAD, where=f"pair {i}")
               for i in range(n)]
    shared_prefix = mode == "shared_prefix"
    used, placement = [0] * ROWS, []
    for i, pair in enumerate(records):
        need = pair.row_length(shared_prefix, loss_type)
        row = next(r for r in range(ROWS) if used[r] + need <= SEQ)
        used[row] += need
        placement.append((row, i))
    step = pk.pack_step(records, placement, ROWS, SEQ, PAD, loss_type, shared_prefix, margin is not None)
    names = ["input_ids", "position_id", "attention_mask", "loss_mask", "end_ind"] + \
        (["margin"] if margin is not None else [])
    return [step[name] for name in names], pk.segment_of(step["attention_mask"]).max(1)


def pack_scoring(sequences):
    """PACKING.md's scoring step: plain packing, each sequence at its own length; end_ind (P,) flat indices of
    each sequence's last token. Returns the inputs and each sequence's flat start."""
    rows = Rows()
    starts = [rows.place(np.array(s, np.int32), np.arange(len(s)), [0] * len(s)) for s in sequences]
    ends = np.zeros(SLOTS, np.int32)
    ends[:len(sequences)] = [start + len(s) - 1 for start, s in zip(starts, sequences)]
    return [rows.ids, rows.pos, rows.codes, np.zeros((2, SLOTS), np.float32), ends], starts


def kernel_skip_reason():
    """None when the compiled attention kernel is here (it always takes the (B, 2, 1, S) packed mask), else why
    the kernel variant is skipped."""
    from mindrlhf.kernels import native

    if native.library("cpu_kernels") is None:
        return "no compiled kernels here (no C++ compiler, or switched off)"
    return None


def tiny_model(packing, **options):
    """The tiny Llama 2 reward model at SEQ, float32, seed 0 (the env chooses its CPU layers)."""
    import mindrlhf.training.registry  # noqa: F401  (registers the model)
    from mindformers import LlamaConfig

    from mindrlhf.model.llama_reward import LlamaRewardModel
    from mindrlhf.training.config import load_config

    cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
    cfg.pop("type")
    cfg.update(seq_length=SEQ, batch_size=len(SHAPES), packing=packing, **options)
    ms.set_seed(0)
    return LlamaRewardModel(LlamaConfig(**cfg))


def build(monkeypatch, variant, packing, train=True, **options):
    for name in ("MINDRLHF_STOCK_KERNELS", "MINDRLHF_STOCK_SOFTMAX", "MINDRLHF_COMPILED_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    if variant == "stock":
        monkeypatch.setenv("MINDRLHF_STOCK_KERNELS", "1")
    elif variant == "matmul-softmax":
        monkeypatch.setenv("MINDRLHF_COMPILED_KERNELS", "0")
    else:
        reason = kernel_skip_reason()
        if reason:
            pytest.skip(reason)
    net = tiny_model(packing, **options)
    net.set_train(train)
    expected = {"kernel": "kernel", "stock": "adder", "matmul-softmax": "adder"}[variant]
    assert net.packed_layout == (expected if packing else None)
    return net


def same_weights(target, source):
    ms.load_param_into_net(target, {p.name: Parameter(p.data.copy(), p.name) for p in source.get_parameters()})


def loss_and_grads(net, inputs):
    weights = net.trainable_params()
    loss, grads = ms.value_and_grad(net, None, weights)(*(Tensor(x) for x in inputs))
    return float(loss.asnumpy()), {w.name: g.asnumpy().astype(np.float64) for w, g in zip(weights, grads)}


def worst_errors(got, want):
    """Worst over tensors of: the norm-wise relative error; the element-wise relative error with a 1e-7 floor
    (large where a gradient element nearly cancels); the largest element error over the tensor's largest."""
    norm = max(np.linalg.norm(got[k] - want[k]) / max(np.linalg.norm(want[k]), 1e-30) for k in want)
    element = max(float(np.max(np.abs(got[k] - want[k]) / np.maximum(np.abs(want[k]), 1e-7))) for k in want)
    scaled = max(float(np.max(np.abs(got[k] - want[k])) / max(np.max(np.abs(want[k])), 1e-30)) for k in want)
    # |got - want| <= 1e-5 |want| + 1e-7 holds where this is <= 1
    allclose = max(float(np.max(np.abs(got[k] - want[k]) / (1e-5 * np.abs(want[k]) + 1e-7))) for k in want)
    return norm, element, scaled, allclose


# Every loss on the compiled kernel (what CPU users get); the other layers share the packed loss and mask code,
# so they run the plain and the fullest case each (each case compiles two gradient graphs: ~10 s), in make test
# (slow), not in make test-fast.
CASES = [("kernel", loss) for loss in LOSSES] + [
    pytest.param(*case, marks=pytest.mark.slow)
    for case in (("matmul-softmax", "span"), ("matmul-softmax", "last_token-margin-center"),
                 ("stock", "span-margin-center"))]


@pytest.mark.parametrize("variant, loss", CASES)
def test_packed_loss_and_gradients_equal_padded(monkeypatch, variant, loss):
    """(a) plain packing and (b) shared-prefix spans against the padded step on the same pairs."""
    options = LOSSES[loss]
    margin = MARGINS if "margin" in loss else None
    pairs = make_pairs()
    padded = build(monkeypatch, variant, False, **options)
    packed = build(monkeypatch, variant, "pairs", **options)
    same_weights(packed, padded)
    want_loss, want = loss_and_grads(padded, padded_batch(pairs, margin))
    assert np.isfinite(want_loss) and want_loss > 0
    exercised = [g for n, g in want.items() if ".attention.w" in n or "norm" in n or "feed_forward" in n]
    assert len(exercised) >= 19 and all(np.abs(g).max() > 0 for g in exercised)
    for mode in ("pairs", "shared_prefix"):
        inputs, spans = pack(pairs, mode, options["loss_type"], margin)
        assert spans.max() >= 2  # several spans a row
        got_loss, got = loss_and_grads(packed, inputs)
        norm, element, scaled, allclose = worst_errors(got, want)
        print(f"\nPACKED-ERRORS {variant} {loss} {mode}: loss {got_loss:.9g} vs {want_loss:.9g} "
              f"(rel {abs(got_loss - want_loss) / want_loss:.2e}); gradients: worst norm-wise {norm:.2e}, "
              f"element-wise (1e-7 floor) {element:.2e}, element over tensor max {scaled:.2e}, "
              f"allclose(1e-5, 1e-7) ratio {allclose:.2f}")
        assert got_loss == pytest.approx(want_loss, rel=1e-5, abs=0), mode
        assert set(got) == set(want)
        assert norm <= 1e-5 and scaled <= 1e-5, mode


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_scores_equal_padded(monkeypatch, variant):
    """(c) eval: the packed step's (P,) rewards at end_ind equal the padded scores (at end_ind - 1)."""
    pairs = make_pairs(seed=1)
    sequences = [c for c, _ in pairs] + [r for _, r in pairs]
    padded = build(monkeypatch, variant, False, train=False)
    packed = build(monkeypatch, variant, "pairs", train=False)
    same_weights(packed, padded)
    batch = padded_batch(pairs)
    want = padded(*(Tensor(x) for x in batch)).asnumpy()
    inputs, _ = pack_scoring(sequences)
    got = packed(*(Tensor(x) for x in inputs)).asnumpy()
    assert got.shape == (SLOTS,) and want.shape == (len(sequences),)
    error = float(np.max(np.abs(got[:len(sequences)] - want) / np.abs(want)))
    print(f"\nPACKED-ERRORS {variant} scores: worst relative error {error:.2e}")
    np.testing.assert_allclose(got[:len(sequences)], want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sequences_do_not_see_their_row_neighbours(monkeypatch, variant):
    """(d) new tokens in one sequence leave every other sequence's rewards, at all of its tokens, bit-identical
    (and change the changed one's)."""
    pairs = make_pairs(seed=2)
    sequences = [c for c, _ in pairs] + [r for _, r in pairs]
    net = build(monkeypatch, variant, "pairs", train=False)
    inputs, starts = pack_scoring(sequences)
    row_of = [s // SEQ for s in starts]
    victim = next(i for i in range(1, len(sequences)) if row_of[i] == row_of[i - 1] and i + 1 < len(sequences)
                  and row_of[i + 1] == row_of[i])  # one with neighbours before and after it in its row

    def all_token_rewards(ids):
        out = []
        for half in range(ROWS * SEQ // SLOTS):
            step = list(inputs)
            step[0], step[4] = ids, np.arange(half * SLOTS, (half + 1) * SLOTS, dtype=np.int32)
            out.append(net(*(Tensor(x) for x in step)).asnumpy())
        return np.concatenate(out)

    before = all_token_rewards(inputs[0])
    ids = inputs[0].copy().reshape(-1)
    span = slice(starts[victim], starts[victim] + len(sequences[victim]))
    ids[span] = np.random.default_rng(3).integers(3, 32000, len(sequences[victim]))
    after = all_token_rewards(ids.reshape(ROWS, SEQ))
    others = np.ones(ROWS * SEQ, bool)
    others[span] = False
    for i, (start, seq) in enumerate(zip(starts, sequences)):
        if i != victim:
            assert np.array_equal(after[start:start + len(seq)], before[start:start + len(seq)]), i
    assert not np.array_equal(after[span], before[span])
    assert sum(len(s) for i, s in enumerate(sequences) if i != victim and row_of[i] == row_of[victim]) >= 2


def test_layout_mask_follows_the_rule():
    """Every kind: plain, prefix + both answers with in-span pads, two spans, filler; rows shorter than max_seq."""
    from mindrlhf.model.packed import LayoutMask

    rows = np.array([[8, 8, 8, 9, 9, 13, 10, 10, 14, 14, 16, 16, 20, 0, 0, 0],
                     [8, 8, 12, 12, 16, 16, 16, 24, 25, 26, 25, 30, 0, 0, 0, 0]], np.int32)
    adder = LayoutMask(32)(Tensor(rows)).asnumpy()
    assert adder.shape == (2, 1, 16, 16) and adder.dtype == np.float32
    for row, got in zip(rows, adder[:, 0]):
        want = pk.visible(row)
        np.testing.assert_array_equal(got, np.where(want, 0.0, -10000.0))
        assert want.any(1).all()  # every query sees at least itself or its span's start


@pytest.mark.parametrize("value", ["yes", "pair", 1, "shared-prefix"])
def test_bad_packing_value_is_a_config_error(value):
    from mindrlhf.errors import ConfigError
    from mindrlhf.model.packed import packing_mode

    with pytest.raises(ConfigError, match=r"model_config\.packing: expected false, pairs or shared_prefix"):
        packing_mode({"packing": value})
    assert packing_mode({"packing": False}) is None and packing_mode({}) is None
    assert packing_mode({"packing": "shared_prefix"}) == "shared_prefix"


def test_compiled_kernel_runs_the_packed_layout(monkeypatch):
    """With the compiled attention kernel swapped in, the packed model runs the kernel's packed layout (the
    (B, 2, 1, S) mask), not the adder fallback."""
    for name in ("MINDRLHF_STOCK_KERNELS", "MINDRLHF_STOCK_SOFTMAX", "MINDRLHF_COMPILED_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)
    assert tiny_model("pairs").packed_layout == "kernel"


def test_the_packed_path_names_the_host_cells_it_lacks():
    """PackedRewards runs its host's cells: a host without them is refused at build, by name."""
    from mindspore import nn

    from mindrlhf.model.packed import PackedRewards

    class Host(PackedRewards, nn.Cell):
        def __init__(self):
            super().__init__()
            self.model = nn.Dense(2, 2)

    with pytest.raises(TypeError, match="v_head, cast"):
        Host().init_packing(None)
