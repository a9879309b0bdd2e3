"""The CPU fast paths compute what the stock ones do: the attention core (the compiled kernel, or without it the
scale on the query, tiled mask and MatMul-sum softmax backward) and the MatMul RMSNorm give the stock loss and
gradients, and the MatMul-based overflow check and grad clipping catch inf/NaN and clip to the same global norm."""
import os
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from conftest import TINY_CONFIG

SEQ, PAIRS = 64, 3


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def build(monkeypatch, stock, compiled=True):
    import mindrlhf.registry  # noqa: F401  (registers the model)
    from mindformers import LlamaConfig

    from mindrlhf.models.llama_reward import LlamaRewardModel
    from mindrlhf.training.config import load_config

    cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
    cfg.pop("type")
    cfg.update(seq_length=SEQ, batch_size=PAIRS)
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


def loss_and_grads(net):
    weights = net.trainable_params()
    loss, grads = ms.value_and_grad(net, None, weights)(*batch())
    return float(loss.asnumpy()), {w.name: g.asnumpy() for w, g in zip(weights, grads)}


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-kernel", "matmul-softmax"])
def test_cpu_attention_gives_the_stock_loss_and_gradients(monkeypatch, compiled):
    stock = build(monkeypatch, stock=True)
    fast = build(monkeypatch, stock=False, compiled=compiled)

    def kinds(net):
        return sorted({type(cell).__name__ for _, cell in net.cells_and_names()
                       if any(part in type(cell).__name__ for part in ("Attention", "RMSNorm", "Mask", "Softmax"))})

    if compiled:
        assert kinds(fast) == ["CpuLLamaAttention", "CpuLlamaRMSNorm", "FusedAttention", "KeyMask",
                               "MatMulRMSNorm"], kinds(fast)
    else:
        assert kinds(fast) == ["CpuLLamaAttention", "CpuLlamaRMSNorm", "LowerTriangularMaskWithDynamic",
                               "MatMulRMSNorm", "MatMulSumSoftmax"], kinds(fast)
    assert kinds(stock) == ["LLamaAttention", "LlamaRMSNorm", "LowerTriangularMaskWithDynamic"], kinds(stock)
    ms.load_param_into_net(fast, {p.name: Parameter(p.data.copy(), p.name) for p in stock.get_parameters()})

    stock_loss, stock_grads = loss_and_grads(stock)
    fast_loss, fast_grads = loss_and_grads(fast)
    assert fast_loss == pytest.approx(stock_loss, rel=1e-5)
    assert set(fast_grads) == set(stock_grads)
    for name, grad in stock_grads.items():
        scale = float(np.abs(grad).max()) or 1.0
        np.testing.assert_allclose(fast_grads[name], grad, rtol=0, atol=2e-5 * scale, err_msg=name)
    exercised = [g for n, g in stock_grads.items() if ".attention.w" in n or "norm" in n]
    assert len(exercised) >= 13 and all(np.abs(g).max() > 0 for g in exercised)  # both paths carry gradients


def reference_attention(q, k, v, mask):
    """float64 softmax(q kᵀ + mask) v with heads merged, and its gradients for the upstream gradient g."""
    q, k, v, mask = (x.astype(np.float64) for x in (q, k, v, mask))
    if mask.shape[2] == 1:  # per-key form: the causal part as the legacy mask builds it
        seq = q.shape[2]
        mask = np.where(np.tril(np.ones((seq, seq)))[None, None] > 0, mask, -10000.0)
    # The float32 sum with the mask, as every float32 kernel rounds it (-10000 + x keeps 1e-3 of x)
    scores = ((q @ k.swapaxes(-1, -2)).astype(np.float32) + mask.astype(np.float32)).astype(np.float64)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = probs @ v
    batch, heads, seq, size = out.shape

    def grads(g):
        g = g.reshape(batch, seq, heads, size).transpose(0, 2, 1, 3)
        dv = probs.swapaxes(-1, -2) @ g
        dp = g @ v.swapaxes(-1, -2)
        ds = probs * (dp - (dp * probs).sum(-1, keepdims=True))
        return ds @ k, ds.swapaxes(-1, -2) @ q, dv

    return out.transpose(0, 2, 1, 3).reshape(batch, seq, heads * size), grads


@pytest.mark.parametrize("seq,size,per_key", [(37, 16, False), (37, 16, True), (70, 32, True), (19, 64, False)])
def test_compiled_attention_kernel_matches_float64(seq, size, per_key):
    """Odd lengths (blocks of rows and of 16 keys with tails), several head sizes, both mask forms, a padded
    row, a hidden key in the middle and a row that sees nothing."""
    from mindrlhf.models import native
    from mindrlhf.models.cpu_speedups import FusedAttention

    path = native.library("attention")
    assert path, "g++ is part of the documented setup; without it the kernel falls back (tested below)"
    rng = np.random.default_rng(seq + size)
    batch, heads = 3, 2
    q, k, v = (rng.normal(size=(batch, heads, seq, size)).astype(np.float32) for _ in range(3))
    visible = np.ones((batch, seq), np.float32)
    visible[1, seq // 2:] = 0  # padding
    visible[2, 3] = 0  # a hidden key inside
    visible[2, 0] = 0  # row 0 of batch 2 sees no key
    if per_key:
        mask = ((1 - visible) * -10000.0).reshape(batch, 1, 1, seq)
    else:
        mask = ((1 - visible[:, None, :] * np.tril(np.ones((seq, seq)))) * -10000.0)[:, None]
    mask = mask.astype(np.float32)
    g = rng.normal(size=(batch, seq, heads * size)).astype(np.float32)
    expected, grads = reference_attention(q, k, v, mask)

    net = FusedAttention(path)
    out, _ = net(*(Tensor(x) for x in (q, k, v, mask)))
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=0, atol=2e-5 * np.abs(expected).max())

    class First(nn.Cell):
        def __init__(self):
            super().__init__()
            self.net = net

        def construct(self, *x):
            return self.net(*x)[0]

    got = ops.GradOperation(get_all=True, sens_param=True)(First())(*(Tensor(x) for x in (q, k, v, mask)), Tensor(g))
    for name, want, have in zip("qkv", grads(g.astype(np.float64)), got[:3]):
        np.testing.assert_allclose(have.asnumpy(), want, rtol=0, atol=5e-5 * np.abs(want).max(), err_msg=name)
    assert not np.any(got[3].asnumpy())

    q[0, 1, 4, 2] = np.nan  # NaN still reaches the output (no -ffast-math), so overflow checks see it
    out, _ = net(*(Tensor(x) for x in (q, k, v, mask)))
    assert np.isnan(out.asnumpy()[0, 4]).any() and np.isfinite(out.asnumpy()[0, :4]).all()


def test_kernel_build_is_cached_and_missing_compiler_falls_back(tmp_path):
    """Built once into MINDRLHF_CACHE and reused; with no compiler the model keeps MindSpore's kernels."""
    probe = ("import os; from mindrlhf.models import native; path = native.library('attention'); "
             "print(path, os.path.getmtime(path) if path else '')")
    env = dict(os.environ, MINDRLHF_CACHE=str(tmp_path), MINDRLHF_COMPILED_KERNELS="1")
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    path = first.stdout.split()[0]
    assert path.startswith(str(tmp_path)) and path.endswith(".so") and first.stdout == second.stdout
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [os.path.basename(path)]  # no temp file left

    env = dict(env, CXX=str(tmp_path / "no-such-compiler"), MINDRLHF_CACHE=str(tmp_path / "other"))
    fallback = ("import mindspore as ms; ms.set_context(mode=ms.GRAPH_MODE, device_target='CPU');"
                "import mindrlhf.registry; from mindformers import LlamaConfig;"
                "from mindrlhf.models.llama_reward import LlamaRewardModel; from mindrlhf.training.config import "
                f"load_config; cfg = dict(load_config({str(TINY_CONFIG)!r}).model.model_config); cfg.pop('type');"
                "net = LlamaRewardModel(LlamaConfig(**cfg));"
                "print(sorted({type(c).__name__ for _, c in net.cells_and_names() if 'Softmax' in type(c).__name__"
                " or 'Fused' in type(c).__name__}))")
    done = subprocess.run([sys.executable, "-c", fallback], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['MatMulSumSoftmax']"
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
