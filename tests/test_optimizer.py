"""FP32StateAdamWeightDecay keeps float32 moments for float16/bfloat16 weights, and updates like float64 math."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor

import mindrlhf.training.registry  # noqa: F401
from mindrlhf.training.optimizer import FP32StateAdamWeightDecay

LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.95, 1e-8


@pytest.fixture(scope="module", autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")


def weights(dtype):
    rng = np.random.default_rng(0)
    return [Parameter(Tensor(rng.normal(size=(4, 3)).astype(np.float32), dtype), name="w"),
            Parameter(Tensor(np.ones(3, np.float32), dtype), name="b")]


@pytest.mark.parametrize("dtype", [ms.float16, ms.bfloat16, ms.float32])
def test_moments_are_float32_and_named_for_checkpoints(dtype):
    params = weights(dtype)
    opt = FP32StateAdamWeightDecay(params, learning_rate=LR, beta1=BETA1, beta2=BETA2, eps=EPS)
    assert [p.dtype for p in params] == [dtype, dtype]  # the weights keep their own dtype
    for states, prefix in ((opt.moments1, "adam_m"), (opt.moments2, "adam_v")):
        assert [s.dtype for s in states] == [ms.float32, ms.float32]
        assert [s.name for s in states] == [f"{prefix}.w", f"{prefix}.b"]
        assert all(not s.asnumpy().any() for s in states)


def test_a_tiny_float16_gradient_keeps_its_second_moment_and_matches_float64():
    params = weights(ms.float16)
    start = params[0].asnumpy().astype(np.float64)
    opt = FP32StateAdamWeightDecay(params, learning_rate=LR, beta1=BETA1, beta2=BETA2, eps=EPS)
    grad = np.full((4, 3), 1e-4, np.float64)
    opt((Tensor(grad.astype(np.float16)), Tensor(np.zeros(3, np.float16))))
    v = opt.moments2[0].asnumpy()
    g16 = grad.astype(np.float16).astype(np.float64)  # the gradient as the float16 model produced it
    m_ref, v_ref = (1 - BETA1) * g16, (1 - BETA2) * g16 ** 2
    assert (v > 0).all()  # float16 moments would hold exactly 0 here (5e-10 < float16's smallest subnormal)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    np.testing.assert_allclose(opt.moments1[0].asnumpy(), m_ref, rtol=1e-6)
    expected = (start - LR * m_ref / (np.sqrt(v_ref) + EPS)).astype(np.float16)
    np.testing.assert_array_equal(params[0].asnumpy(), expected)
    assert not np.array_equal(params[0].asnumpy(), start.astype(np.float16))  # the step really moved it
