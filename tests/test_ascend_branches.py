"""Our Ascend-only branches executed on CPU: MindFormers' real FlashAttention code (its FlashAttention cell, the
Llama attention and model that call it) with only the FlashAttentionScore kernel replaced by the documented
stand-in (tests/fa_standin.py), against our CPU path on the same weights and inputs. Float32, tiny Llama 2,
PyNative (the stand-in checks the values it is given)."""
import numpy as np
import pytest

import mindspore as ms

from fa_standin import ContractError, use_stand_in
from test_packed_model import padded_batch, make_pairs, loss_and_grads, same_weights, worst_errors, tiny_model


pytestmark = pytest.mark.usefixtures("pynative_mode")


def pair_of_models(packing=False, train=True, **flash):
    """(our CPU model, the same weights on MindFormers' FlashAttention with the stand-in kernel)."""
    cpu = tiny_model(packing, num_layers=1, **{k: v for k, v in flash.items() if k in ("loss_type",)})
    fa = tiny_model(packing, num_layers=1, use_flash_attention=True, **flash)
    assert use_stand_in(fa, float32=True) == fa.config.num_layers
    same_weights(fa, cpu)
    cpu.set_train(train)
    fa.set_train(train)
    return cpu, fa


@pytest.mark.parametrize("loss_type", ["span", "last_token"])
def test_padded_step_on_flash_attention_equals_cpu(loss_type):
    """The 7B YAMLs' attention (use_flash_attention: BNSD, sparse_mode 0, MindFormers' uint8 causal+pad mask,
    next_tokens 0): one training step's loss and every gradient equal the CPU path's."""
    cpu, fa = pair_of_models(loss_type=loss_type)
    layer = fa.model.layers[0].attention
    assert (layer.input_layout, layer.sparse_mode) == ("BNSD", 0)
    batch = padded_batch(make_pairs())
    want_loss, want = loss_and_grads(cpu, batch)
    got_loss, got = loss_and_grads(fa, batch)
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss)
    norm = worst_errors(got, want)[0]
    print(f"padded {loss_type}: loss {got_loss:.7f} vs {want_loss:.7f}, gradients norm-wise within {norm:.1e}")
    assert norm <= 1e-5


def test_padded_scores_on_flash_attention_equal_cpu():
    cpu, fa = pair_of_models(train=False)
    ids, _, _, _, lens = padded_batch(make_pairs())[:5]
    args = (ms.Tensor(ids), None, None, None, ms.Tensor(lens))
    np.testing.assert_allclose(fa(*args).asnumpy(), cpu(*args).asnumpy(), rtol=1e-5, atol=1e-6)


def packed_flash_model():
    """The tiny model as check_ascend_packing accepts it: MindFormers' eod-compressed FlashAttention path."""
    import mindrlhf.registry  # noqa: F401
    from mindformers import LlamaConfig

    from conftest import TINY_CONFIG
    from mindrlhf.model.llama_reward import LlamaRewardModel
    from mindrlhf.training.config import load_config

    cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
    cfg.pop("type")
    cfg.update(seq_length=2048, batch_size=1, packing="pairs", loss_type="last_token", use_flash_attention=True,
               use_eod_attn_mask_compression=True, num_layers=1)
    return LlamaRewardModel(LlamaConfig(**cfg))


def test_packed_branch_calls_a_sparse_mode_the_docstring_calls_unimplemented():
    """Our Ascend packed branch is MindFormers' use_eod_attn_mask_compression: every layer's FlashAttentionScore
    gets TND with sparse_mode 8, which MindSpore 2.9 documents as "not implemented yet"; the stand-in refuses
    to build it, so the packed step cannot run through the documented contract."""
    net = packed_flash_model()
    assert net.packed_layout == "ascend"
    assert (net.model.layers[0].attention.input_layout, net.model.layers[0].attention.sparse_mode) == ("TND", 8)
    with pytest.raises(ContractError, match="sparse_mode 8 is not implemented.*block_local scenario"):
        use_stand_in(net, float32=True)


def test_packed_pipeline_lists_break_the_tnd_rules(test_mindrecord):
    """The actual_seq_len our Ascend pipeline feeds (MindFormers' format: each row's ends, padded to 128 by
    repeating the row end) given to a TND call in the documented mode (sparse_mode 3): refused for its
    zero-length blocks. The default pack_rows of a large batch is capped at 8 rows a call (bug fixed in this
    branch: 10 rows here raised in the pipeline)."""
    from fa_standin import FlashAttentionScoreStandIn
    from mindrlhf.data.dataset import create_reward_dataset
    from mindrlhf.data.packing import ACTUAL_SEQ_LEN

    dataset = create_reward_dataset(str(test_mindrecord), 40, packing="pairs", loss_type="last_token",
                                    seq_length=2048, ascend_row_groups=1)
    step = next(dataset.create_dict_iterator(output_numpy=True))
    asl = step[ACTUAL_SEQ_LEN]
    assert step["input_ids"].shape[0] == 8 and asl.reshape(-1)[-1] == 8 * 2048
    asl = asl[0]  # one row's call (T = 2048) keeps the dense stand-in small
    x = ms.Tensor(np.zeros((2048, 1, 16), np.float16))
    mask = ms.Tensor(np.triu(np.ones((2048, 2048), np.uint8), 1))
    fa = FlashAttentionScoreStandIn(1, next_tokens=0, input_layout="TND", sparse_mode=3)
    with pytest.raises(ContractError, match="zero-length block.*0 should not exist in list_seq_k"):
        fa(x, x, x, attn_mask=mask, actual_seq_qlen=asl, actual_seq_kvlen=asl)
    ends = np.unique(asl)  # the same blocks without the padding entries: the documented call takes them
    out = fa(x, x, x, attn_mask=mask, actual_seq_qlen=ends, actual_seq_kvlen=ends)[3]
    assert out.shape == x.shape


def test_trainer_refuses_flash_attention_on_cpu(test_mindrecord, tmp_path):
    """The config selects the FlashAttention branches (so the tests above run them on CPU with the stand-in);
    a real CPU run with it would reach a kernel CPU does not have, and is refused before anything is built."""
    from conftest import TINY_CONFIG
    from mindrlhf.errors import ConfigError
    from mindrlhf.training.trainer import prepare_config

    path = tmp_path / "flash.yaml"
    path.write_text(TINY_CONFIG.read_text(encoding="utf-8").replace("use_flash_attention: False",
                                                                    "use_flash_attention: True"), encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{path}: model.model_config.use_flash_attention: True needs Ascend"):
        prepare_config(str(path), str(test_mindrecord), output_dir=str(tmp_path / "out"))
