"""The CPU fast paths compute what the stock ones do: the attention core (the compiled kernel, or without it the
scale on the query, tiled mask and MatMul-sum softmax backward) and the MatMul RMSNorm give the stock loss and
gradients, and the MatMul-based overflow check and grad clipping catch inf/NaN and clip to the same global norm."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from attention_reference import attention
from conftest import TINY_CONFIG

SEQ, PAIRS = 64, 3


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def build(monkeypatch, stock, compiled=True, kv_heads=None):
    import mindrlhf.training.registry  # noqa: F401  (registers the model)
    from mindformers import LlamaConfig

    from mindrlhf.model.llama_reward import LlamaRewardModel
    from mindrlhf.training.config import load_config

    cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
    cfg.pop("type")
    cfg.update(seq_length=SEQ, batch_size=PAIRS)
    if kv_heads:
        cfg.update(n_kv_heads=kv_heads)
    if stock:
        monkeypatch.setenv("MINDRLHF_STOCK_KERNELS", "1")
    else:
        monkeypatch.delenv("MINDRLHF_STOCK_KERNELS", raising=False)
        monkeypatch.delenv("MINDRLHF_STOCK_SOFTMAX", raising=False)
        monkeypatch.setenv("MINDRLHF_COMPILED_KERNELS", "1" if compiled else "0")
    ms.set_seed(0)
    net = LlamaRewardModel(LlamaConfig(**cfg))
    net.set_train(True)
    return net


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 32000, size=(2 * PAIRS, SEQ)).astype(np.int32)
    ends = np.array([64, 40, 17, 50, 64, 9], np.int32)  # chosen rows, then rejected rows; some full length
    mask = (np.arange(SEQ)[None, :] < ends[:, None]).astype(np.float32)
    ids[mask == 0] = 2
    ids[1, 5] = 2  # a pad id inside a sequence: the stock mask hides that key
    # (A row that sees no key is checked against float64 in the kernel test: the stock layer adds -10000 to all
    # of its scores, which rounds them to 1e-3, so two correct kernels differ there by more than float32 noise.)
    positions = np.tile(np.arange(SEQ, dtype=np.int32), (2 * PAIRS, 1))
    loss_mask = np.maximum(mask[:PAIRS], mask[PAIRS:])
    return [Tensor(ids), Tensor(positions), Tensor(mask), Tensor(loss_mask), Tensor(ends)]


def compiled_library():
    """The compiled kernels where a C++ compiler is here (then they must build: g++ 9+ on x86-64 or aarch64);
    None where none is, and the model falls back to MindSpore's kernels (asserted by the callers)."""
    from mindrlhf.kernels import native

    library = native.library("cpu_kernels")
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler):
        assert library, f"{compiler} is here but the kernels did not build: see the mindrlhf warning above"
    else:
        assert library is None
    return library


def loss_and_grads(net):
    weights = net.trainable_params()
    loss, grads = ms.value_and_grad(net, None, weights)(*batch())
    return float(loss.asnumpy()), {w.name: g.asnumpy() for w, g in zip(weights, grads)}


@pytest.mark.parametrize("compiled,kv_heads",
                         [(True, None), (True, 2), pytest.param(False, None, marks=pytest.mark.slow)],
                         ids=["compiled-kernels", "compiled-kernels-shared-kv-heads", "matmul-softmax"])
def test_cpu_layers_give_the_stock_loss_and_gradients(monkeypatch, compiled, kv_heads):
    stock = build(monkeypatch, stock=True, kv_heads=kv_heads)
    fast = build(monkeypatch, stock=False, compiled=compiled, kv_heads=kv_heads)

    def kinds(net):
        return sorted({type(cell).__name__ for _, cell in net.cells_and_names()
                       if any(part in type(cell).__name__
                              for part in ("Attention", "RMSNorm", "Mask", "Softmax", "FeedForward", "SwiGLU"))})

    if compiled and compiled_library():
        assert kinds(fast) == ["CpuLLamaAttention", "CpuLlamaFeedForward", "CpuLlamaRMSNorm", "FusedRMSNorm",
                               "FusedSwiGLU", "KeyMask", "RopeAttention"], kinds(fast)
    else:  # switched off, or no compiler here: the MatMul fallbacks
        assert kinds(fast) == ["CpuLLamaAttention", "CpuLlamaRMSNorm", "LlamaFeedForward",
                               "LowerTriangularMaskWithDynamic", "MatMulRMSNorm", "MatMulSumSoftmax"], kinds(fast)
    assert kinds(stock) == ["LLamaAttention", "LlamaFeedForward", "LlamaRMSNorm",
                            "LowerTriangularMaskWithDynamic"], kinds(stock)
    ms.load_param_into_net(fast, {p.name: Parameter(p.data.copy(), p.name) for p in stock.get_parameters()})

    stock_loss, stock_grads = loss_and_grads(stock)
    fast_loss, fast_grads = loss_and_grads(fast)
    assert fast_loss == pytest.approx(stock_loss, rel=1e-5)
    assert set(fast_grads) == set(stock_grads)
    for name, grad in stock_grads.items():
        scale = float(np.abs(grad).max()) or 1.0
        np.testing.assert_allclose(fast_grads[name], grad, rtol=0, atol=2e-5 * scale, err_msg=name)
    exercised = [g for n, g in stock_grads.items() if ".attention.w" in n or "norm" in n or "feed_forward" in n]
    assert len(exercised) >= 19 and all(np.abs(g).max() > 0 for g in exercised)  # both paths carry gradients


def reference_attention(q, k, v, cos, sin, mask, heads, groups):
    """float64 attention layer between its projections, as the stock layer computes it (attention_reference):
    rotary embedding by row position, q kᵀ / sqrt(d) + mask (rounded as float32 adds it); and its gradients."""
    seq, size = q.shape[1], cos.shape[-1]
    cos, sin = (t.reshape(seq, size).astype(np.float64) for t in (cos, sin))
    if mask.shape[2] == 1:  # per-key form: the causal part as the legacy mask builds it
        mask = np.where(np.tril(np.ones((seq, seq)))[None, None] > 0, mask, -10000.0)
    # The float32 sum with the mask, as every float32 kernel rounds it (-10000 + x keeps 1e-3 of x)
    return attention(q, k, v, cos, sin, heads, groups,
                     lambda scores: (scores.astype(np.float32) + mask.astype(np.float32)).astype(np.float64))


def grads_of(net, inputs, sens, outputs=1):
    """Gradients of net's first output for the upstream gradient sens."""
    class First(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net = net

        def construct(self, *x):
            out = self.net(*x)
            return out[0] if outputs > 1 else out

    return ops.GradOperation(get_all=True, sens_param=True)(First())(*(Tensor(x) for x in inputs), Tensor(sens))


def attention_inputs(rng, batch, seq, size, heads, groups, per_key):
    """q, k, v, the rotary tables and a mask (per key, or the full (B, 1, S, S) one) with a padded row, a hidden
    key inside row 0 and, from 3 rows on, a row that sees no key."""
    q = rng.normal(size=(batch, seq, heads * size)).astype(np.float32)
    k, v = (rng.normal(size=(batch, seq, groups * size)).astype(np.float32) for _ in range(2))
    angles = np.arange(seq)[:, None] * 10000.0 ** (-np.arange(0, size, 2) / size)[None]
    angles = np.concatenate([angles, angles], -1)
    cos, sin = (f(angles).reshape(1, 1, seq, size).astype(np.float32) for f in (np.cos, np.sin))
    visible = np.ones((batch, seq), np.float32)
    visible[1, seq // 2:] = 0  # padding
    visible[0, 3] = 0  # a hidden key inside
    if batch > 2:
        visible[2, 0] = 0  # row 0 of batch 2 sees no key
    if per_key:
        mask = ((1 - visible) * -10000.0).reshape(batch, 1, 1, seq)
    else:
        mask = ((1 - visible[:, None, :] * np.tril(np.ones((seq, seq)))) * -10000.0)[:, None]
    return [q, k, v, cos, sin, mask.astype(np.float32)]


@pytest.mark.parametrize("seq,size,heads,groups,per_key", [(37, 16, 2, 2, False), (37, 16, 4, 2, True),
                                                          (70, 32, 2, 1, True), (19, 64, 2, 2, False)])
def test_compiled_attention_matches_float64(seq, size, heads, groups, per_key):
    """Odd lengths (blocks of rows and of 16 keys with tails), several head sizes, shared key heads, both mask
    forms, a padded row, a hidden key in the middle and a row that sees nothing."""
    from mindrlhf.kernels.cpu_speedups import RopeAttention

    library = compiled_library()
    if library is None:
        pytest.skip("no C++ compiler here: the kernels cannot build, and the model's fallback is asserted in "
                    "test_cpu_layers_give_the_stock_loss_and_gradients")
    rng = np.random.default_rng(seq + size + heads)
    batch = 3
    q, k, v, cos, sin, mask = attention_inputs(rng, batch, seq, size, heads, groups, per_key)
    g = rng.normal(size=q.shape).astype(np.float32)
    expected, grads = reference_attention(q, k, v, cos, sin, mask, heads, groups)

    net = RopeAttention(library)
    inputs = [q, k, v, cos, sin, mask]
    out, stats = net(*(Tensor(x) for x in inputs))
    assert stats.shape == (batch, heads, seq, 2)
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    got = grads_of(net, inputs, g, outputs=2)
    for name, want, have in zip("qkv", grads(g.astype(np.float64)), got[:3]):
        np.testing.assert_allclose(have.asnumpy(), want, rtol=0, atol=5e-5 * np.abs(want).max(), err_msg=name)
    assert not any(np.any(x.asnumpy()) for x in got[3:])

    q[0, 4, 2] = np.nan  # NaN still reaches the output (no -ffast-math), so overflow checks see it
    out, _ = net(*(Tensor(x) for x in [q, k, v, cos, sin, mask]))
    assert np.isnan(out.asnumpy()[0, 4]).any() and np.isfinite(out.asnumpy()[0, :4]).all()


def test_compiled_norm_and_swiglu_match_float64():
    """Row counts that leave a partial block, an odd width; NaN propagates."""
    from mindrlhf.kernels.cpu_speedups import FusedRMSNorm, FusedSwiGLU

    library = compiled_library()
    if library is None:
        pytest.skip("no C++ compiler here: the kernels cannot build, and the model's fallback is asserted in "
                    "test_cpu_layers_give_the_stock_loss_and_gradients")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 47, 37)).astype(np.float32)
    w = rng.normal(size=(37,)).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    rstd = 1 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5)
    normed = x64 * rstd
    norm = FusedRMSNorm(library, 1e-5)
    np.testing.assert_allclose(norm(Tensor(x), Tensor(w)).asnumpy(), normed * w64, rtol=2e-6, atol=2e-6)
    dx, dw = grads_of(norm, [x, w], g)
    gw = g64 * w64
    want_dx = rstd * (gw - normed * (gw * normed).mean(-1, keepdims=True))
    np.testing.assert_allclose(dx.asnumpy(), want_dx, rtol=0, atol=1e-5 * np.abs(want_dx).max())
    want_dw = (g64 * normed).reshape(-1, 37).sum(0)
    np.testing.assert_allclose(dw.asnumpy(), want_dw, rtol=0, atol=1e-5 * np.abs(want_dw).max())

    gate, up = (rng.normal(scale=4.0, size=(5, 3001)).astype(np.float32) for _ in range(2))
    gate[0, :3] = [-100.0, 100.0, 0.0]
    sig = 1 / (1 + np.exp(-gate.astype(np.float64)))
    swiglu = FusedSwiGLU(library)
    np.testing.assert_allclose(swiglu(Tensor(gate), Tensor(up)).asnumpy(), gate * sig * up, rtol=2e-6, atol=1e-6)
    dy = rng.normal(size=gate.shape).astype(np.float32)
    dgate, dup = grads_of(swiglu, [gate, up], dy)
    np.testing.assert_allclose(dup.asnumpy(), dy * gate * sig, rtol=2e-6, atol=1e-5)
    np.testing.assert_allclose(dgate.asnumpy(), dy * up * sig * (1 + gate * (1 - sig)), rtol=2e-6, atol=1e-5)

    x[1, 2, 3] = np.nan
    y = norm(Tensor(x), Tensor(w)).asnumpy()
    assert np.isnan(y[1, 2]).all() and np.isfinite(y[1, 3]).all()


def test_kernel_build_is_cached_and_missing_compiler_falls_back(tmp_path):
    """Built once into MINDRLHF_CACHE and reused; with no compiler the model keeps MindSpore's kernels."""
    probe = ("import os; from mindrlhf.kernels import native; path = native.library('cpu_kernels'); "
             "print(path, os.path.getmtime(path) if path else '')")
    env = dict(os.environ, MINDRLHF_CACHE=str(tmp_path), MINDRLHF_COMPILED_KERNELS="1")
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    path = first.stdout.split()[0]
    assert path.startswith(str(tmp_path)) and path.endswith(".so") and first.stdout == second.stdout
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [".build.lock", os.path.basename(path)]  # no temp file left

    env = dict(env, CXX=str(tmp_path / "no-such-compiler"), MINDRLHF_CACHE=str(tmp_path / "other"))
    fallback = ("import mindspore as ms; ms.set_context(mode=ms.GRAPH_MODE, device_target='CPU');"
                "import mindrlhf.training.registry; from mindformers import LlamaConfig;"
                "from mindrlhf.model.llama_reward import LlamaRewardModel; from mindrlhf.training.config import "
                f"load_config; cfg = dict(load_config({str(TINY_CONFIG)!r}).model.model_config); cfg.pop('type');"
                "net = LlamaRewardModel(LlamaConfig(**cfg));"
                "print(sorted({type(c).__name__ for _, c in net.cells_and_names() if 'Softmax' in type(c).__name__"
                " or 'Fused' in type(c).__name__ or 'Rope' in type(c).__name__ or 'MatMul' in type(c).__name__}))")
    done = subprocess.run([sys.executable, "-c", fallback], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['MatMulRMSNorm', 'MatMulSumSoftmax']"
    assert "building" in done.stderr and "no-such-compiler" in done.stderr


def test_matmul_sums_match_numpy_and_flag_inf_and_nan():
    from mindrlhf.training.wrapper import matmul_square_sum, matmul_sum

    rng = np.random.default_rng(1)
    for shape in [(), (7,), (32000, 64), (3, 5, 11)]:
        x = rng.normal(size=shape).astype(np.float32)
        rounding = 1e-6 * float(np.abs(x).sum()) + 1e-6  # float32 accumulation of that many terms
        assert float(matmul_sum(Tensor(x)).asnumpy()) == pytest.approx(float(x.astype(np.float64).sum()), abs=rounding)
        assert float(matmul_square_sum(Tensor(x)).asnumpy()) == pytest.approx(
            float((x.astype(np.float64) ** 2).sum()), rel=1e-5)
    for bad in (np.inf, -np.inf, np.nan):
        x = rng.normal(size=(50, 8)).astype(np.float32)
        x[17, 3] = bad
        assert not np.isfinite(float(matmul_sum(Tensor(x)).asnumpy()))


class Quadratic(nn.Cell):
    """loss = sum((w * x)^2): gradients 2 w x^2, inf when x is huge."""

    def __init__(self):
        super().__init__()
        self.w = Parameter(Tensor(np.linspace(0.5, 2.0, 12, dtype=np.float32).reshape(3, 4)), name="w")
        self.b = Parameter(Tensor(np.array([1.0, -3.0, 2.0], np.float32)), name="b")

    def construct(self, x):
        return ops.reduce_sum(ops.square(self.w * x)) + ops.reduce_sum(ops.square(self.b))


def step_cell(max_norm):
    from mindrlhf.training.wrapper import CpuClipGradNorm, RewardTrainOneStepCell

    net = Quadratic()
    opt = nn.SGD(net.trainable_params(), learning_rate=1.0)
    scale = nn.DynamicLossScaleUpdateCell(loss_scale_value=1024.0, scale_factor=2, scale_window=1000)
    cell = RewardTrainOneStepCell(net, opt, use_clip_grad=True, max_grad_norm=max_norm, scale_sense=scale)
    assert isinstance(cell.clip_grad_norm, CpuClipGradNorm)
    return net, cell


def test_overflow_skips_the_step_and_lowers_the_scale():
    net, cell = step_cell(max_norm=1.0)
    before = net.w.asnumpy().copy()
    x = np.ones((3, 4), np.float32)
    x[1, 2] = 1e30  # (w x)^2 overflows float32: inf loss, inf/NaN gradients
    _, overflow, scale, _, _ = cell(Tensor(x))
    assert bool(overflow.asnumpy()) is True
    assert float(scale.asnumpy()) == 512.0
    np.testing.assert_array_equal(net.w.asnumpy(), before)

    _, overflow, scale, _, _ = cell(Tensor(np.ones((3, 4), np.float32)))
    assert bool(overflow.asnumpy()) is False
    assert float(scale.asnumpy()) == 512.0
    assert not np.array_equal(net.w.asnumpy(), before)


@pytest.mark.parametrize("max_norm", [1.0, 1e6])
def test_clipping_matches_the_global_norm(max_norm):
    net, cell = step_cell(max_norm=max_norm)
    w, b = net.w.asnumpy().astype(np.float64), net.b.asnumpy().astype(np.float64)
    x = np.arange(1, 13, dtype=np.float64).reshape(3, 4) / 4
    gw, gb = 2 * w * x ** 2, 2 * b
    norm = np.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    coef = min(1.0, max_norm / (norm + 1e-6))
    _, overflow, _, _, global_norm = cell(Tensor(x.astype(np.float32)))
    assert bool(overflow.asnumpy()) is False
    assert float(np.asarray(global_norm.asnumpy()).reshape(-1)[0]) == pytest.approx(norm, rel=1e-5)
    np.testing.assert_allclose(net.w.asnumpy(), w - coef * gw, rtol=1e-5)  # SGD, lr 1: w - clipped gradient
    np.testing.assert_allclose(net.b.asnumpy(), b - coef * gb, rtol=1e-5)
