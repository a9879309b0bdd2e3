"""Where the reward is read: the value head at the sequence's own last real token (index len - 1).

Upstream read both sequences of a pair at the pair's longer end, so a shorter response was scored on padding.
"""
import numpy as np
import pytest

import mindspore as ms

from conftest import TINY_CONFIG

PAD = 2


@pytest.fixture(scope="module")
def model():
    import mindrlhf.training.registry  # noqa: F401  (registers the model)
    from mindformers import LlamaConfig

    from mindrlhf.model.llama_reward import LlamaRewardModel
    from mindrlhf.training.config import load_config

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(0)
    cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
    cfg.pop("type")
    net = LlamaRewardModel(LlamaConfig(**cfg))
    net.set_train(False)
    return net


def score(model, rows, ends, width):
    ids = np.full((len(rows), width), PAD, np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    out = model(ms.Tensor(ids), None, None, None, ms.Tensor(np.array(ends, np.int32)))
    return out.asnumpy(), model.token_rewards(ms.Tensor(ids)).asnumpy()


def test_reward_is_the_value_at_the_last_real_token(model):
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 32000, size=n).tolist() for n in (5, 17, 40)]
    scores, per_token = score(model, rows, [len(r) for r in rows], 64)
    for i, row in enumerate(rows):
        assert scores[i] == pytest.approx(per_token[i, len(row) - 1], abs=1e-6)
        assert scores[i] != pytest.approx(per_token[i, -1], abs=1e-4)  # not the padded end

    longer, _ = score(model, rows, [len(r) for r in rows], 128)  # more padding after the end
    np.testing.assert_allclose(longer, scores, atol=1e-5)

    changed = [row[:-1] + [(row[-1] + 7) % 32000] for row in rows]  # another last token
    moved, _ = score(model, changed, [len(r) for r in rows], 64)
    assert np.all(np.abs(moved - scores) > 1e-6)

    past_end = [row + [1234, 999] for row in rows]  # tokens after the end do not count (causal attention)
    same, _ = score(model, past_end, [len(r) for r in rows], 64)
    np.testing.assert_allclose(same, scores, atol=1e-5)
