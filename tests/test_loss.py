"""CompareLoss against the tutorial's formula in numpy, and where the tutorial's form breaks."""
import numpy as np
import pytest

import mindspore as ms

import mindrlhf.training.registry  # noqa: F401
from mindrlhf.model.loss import CompareLoss


def reference(rewards, mask):
    b = rewards.shape[0] // 2
    diff = rewards[:b] - rewards[b:]
    per = np.log1p(np.exp(-diff))  # -log(sigmoid(diff))
    return float(np.mean((per * mask).sum(-1) / np.maximum(mask.sum(-1), 1)))


@pytest.fixture(scope="module")
def loss():
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    return CompareLoss()


def test_matches_formula(loss):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(6, 16)).astype(np.float32)
    mask = (rng.random((3, 16)) > 0.4).astype(np.float32)
    got = float(loss(ms.Tensor(rewards), ms.Tensor(mask)).asnumpy())
    assert got == pytest.approx(reference(rewards.astype(np.float64), mask), rel=1e-5)


def test_empty_mask_is_zero_not_nan(loss):
    rewards = np.ones((4, 8), np.float32)
    mask = np.zeros((2, 8), np.float32)
    mask[0, 3:5] = 1
    got = float(loss(ms.Tensor(rewards), ms.Tensor(mask)).asnumpy())
    assert got == pytest.approx(np.log(2) / 2, rel=1e-6)  # row 0: log 2, row 1 (empty): 0
    assert float(loss(ms.Tensor(rewards), ms.Tensor(np.zeros((2, 8), np.float32))).asnumpy()) == 0.0


def test_large_margins_stay_finite(loss):
    rewards = np.zeros((2, 4), np.float32)
    rewards[0], rewards[1] = -200.0, 200.0  # chosen far below rejected: -log(sigmoid(-400)) = 400
    mask = np.ones((1, 4), np.float32)
    got = float(loss(ms.Tensor(rewards), ms.Tensor(mask)).asnumpy())
    assert np.isfinite(got) and got == pytest.approx(400.0, rel=1e-5)
    rewards[0], rewards[1] = 200.0, -200.0
    assert float(loss(ms.Tensor(rewards), ms.Tensor(mask)).asnumpy()) == pytest.approx(0.0, abs=1e-6)
