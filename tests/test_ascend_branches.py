"""Our Ascend-only branches executed on CPU: MindFormers' real FlashAttention code (its FlashAttention cell, the
Llama attention and model that call it) with only the FlashAttentionScore kernel replaced by the documented
stand-in (tests/fa_standin.py), against our CPU path on the same weights and inputs. Float32, tiny Llama 2,
PyNative (the stand-in checks the values it is given)."""
import numpy as np
import pytest

import mindspore as ms

from fa_standin import ContractError, use_stand_in
from mindrlhf.data.packing import actual_seq_len
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


def tensors(inputs):
    return [None if x is None else ms.Tensor(x) for x in inputs]


def ascend_step(pairs):
    """The packed last_token step as the Ascend pipeline builds it: the real planner with the TND reserve, the
    real packer, the actual_seq_len column (rows of SEQ, tnd_row_entries(SEQ) entries each, one call)."""
    from mindrlhf.data import packing as pk
    from test_packed_model import PAD, SEQ

    ids, _, attention, loss_mask, lens = padded_batch(pairs)[:5]
    n = len(pairs)
    records = [pk.pair_from_record({"chosen_input_ids": ids[i], "chosen_attention_mask": attention[i],
                                    "rejected_input_ids": ids[n + i], "rejected_attention_mask": attention[n + i],
                                    "end_ind": max(lens[i], lens[n + i]), "loss_mask": loss_mask[i],
                                    "margin": None}, PAD, where=f"pair {i}") for i in range(n)]
    entries = pk.tnd_row_entries(SEQ)
    lengths = pk.pair_row_lengths(records, SEQ, False, pk.LAST_TOKEN)
    rows = 8
    (placement,) = pk.plan_steps(lengths, rows, SEQ, tnd_entries=entries)  # one step: every pair
    step = pk.pack_step(records, placement, rows, SEQ, PAD, pk.LAST_TOKEN)
    asl = pk.actual_seq_len(step["attention_mask"], entries)
    names = ["input_ids", "position_id", "attention_mask", "loss_mask", "end_ind"]
    return [step[k] for k in names] + [None, asl], step["attention_mask"]


def flat_blocks(asl):
    return np.diff(np.r_[0, asl.reshape(-1)])


def test_packed_step_on_tnd_flash_attention_equals_cpu():
    """Packing on Ascend: our packed forward on MindFormers' FlashAttention cells rebuilt as TND, sparse_mode 3,
    actual_seq_qlen = actual_seq_kvlen (the stand-in checks every documented rule on every call), per-sequence
    positions: one training step's loss and every gradient equal the CPU padded step's and the CPU packed
    step's (the adder path)."""
    padded = tiny_model(False, num_layers=1, loss_type="last_token")
    cpu = tiny_model("pairs", num_layers=1, loss_type="last_token")
    fa = tiny_model("pairs", num_layers=1, loss_type="last_token", use_flash_attention=True)
    assert cpu.packed_layout in ("kernel", "adder") and fa.packed_layout == "ascend"
    layer = fa.model.layers[0].attention
    assert (layer.input_layout, layer.sparse_mode, layer.flash_attention.sparse_mode) == ("TND", 3, 3)
    assert use_stand_in(fa, float32=True) == 1
    for net in (cpu, fa):
        same_weights(net, padded)
        net.set_train(True)
    padded.set_train(True)
    pairs = make_pairs()
    want_loss, want = loss_and_grads(padded, padded_batch(pairs))
    inputs, codes = ascend_step(pairs)
    assert (flat_blocks(inputs[-1]) > 0).all() and (pk_segments(codes).max(1) >= 2).sum() >= 2  # spans side by side
    cpu_loss, cpu_grads = loss_and_grads(cpu, inputs[:5])
    weights = fa.trainable_params()
    loss, grads = ms.value_and_grad(fa, None, weights)(*tensors(inputs))
    got_loss = float(loss.asnumpy())
    got = {w.name: g.asnumpy().astype(np.float64) for w, g in zip(weights, grads)}
    norm = worst_errors(got, want)[0]
    print(f"packed TND: loss {got_loss:.7f} vs padded {want_loss:.7f}, CPU packed {cpu_loss:.7f}; gradients "
          f"norm-wise within {norm:.1e} of padded, {worst_errors(got, cpu_grads)[0]:.1e} of CPU packed")
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss) and abs(got_loss - cpu_loss) <= 1e-5 * abs(cpu_loss)
    assert set(got) == set(want) and norm <= 1e-5 and worst_errors(got, cpu_grads)[0] <= 1e-5


def pk_segments(codes):
    from mindrlhf.data.packing import segment_of
    return segment_of(codes)


def test_packed_scores_on_tnd_flash_attention_equal_padded():
    """Scoring packed on Ascend as the scorer packs it (rows tnd_row_entries - 1 tokens wider than seq_length,
    the reserve kept): the rewards equal the padded scores."""
    from mindrlhf.data.packing import tnd_row_entries
    from mindrlhf.evaluation.scorer import packed_passes
    from test_packed_model import PAD, SEQ

    padded = tiny_model(False, num_layers=1)
    fa = tiny_model("pairs", num_layers=1, use_flash_attention=True)
    use_stand_in(fa, float32=True)
    same_weights(fa, padded)
    padded.set_train(False)
    fa.set_train(False)
    pairs = make_pairs(seed=1)
    want = padded(*tensors(padded_batch(pairs)[:5])).asnumpy()
    sequences = [c for c, _ in pairs] + [r for _, r in pairs] + [list(range(3, 3 + SEQ))]  # one of seq_length
    entries = tnd_row_entries(SEQ)
    got = np.full(len(sequences), np.nan)
    passes = packed_passes(sequences, 4, SEQ + entries - 1, PAD, entries)
    assert max(len(p["index"]) for p in passes) >= 3
    for p in passes:
        asl = actual_seq_len(p["attention_mask"], entries)
        out = fa(*tensors([p["input_ids"], p["position_id"], p["attention_mask"], None, p["end_ind"], None, asl]))
        got[p["index"]] = out.asnumpy()[:len(p["index"])]
    np.testing.assert_allclose(got[:len(want)], want, rtol=1e-5, atol=1e-6)
    full = padded(*tensors([np.array([sequences[-1]], np.int32), None, None, None, np.array([SEQ], np.int32)]))
    np.testing.assert_allclose(got[-1], full.asnumpy()[0], rtol=1e-5, atol=1e-6)


def test_eod_compression_is_refused_with_packing_on_flash_attention():
    """MindFormers' own packed path (use_eod_attn_mask_compression) builds every layer's FlashAttentionScore
    with TND and sparse_mode 8, which MindSpore 2.9's docstring calls not implemented (the stand-in refuses to
    build it); packing refuses that config, naming why."""
    import mindrlhf._mindformers  # noqa: F401
    from mindformers.models.llama import LlamaConfig
    from mindformers.models.llama.llama import LlamaModel

    from mindrlhf.errors import ConfigError
    from mindrlhf.model.ascend_packing import check_ascend_packing

    config = LlamaConfig(batch_size=1, seq_length=2048, hidden_size=32, num_layers=1, num_heads=2, vocab_size=64,
                         use_flash_attention=True, use_eod_attn_mask_compression=True)
    model = LlamaModel(config)
    assert (model.layers[0].attention.input_layout, model.layers[0].attention.sparse_mode) == ("TND", 8)
    with pytest.raises(ContractError, match="sparse_mode 8 is not implemented.*block_local scenario"):
        use_stand_in(model, float32=True)
    config.packing, config.loss_type = "pairs", "last_token"
    with pytest.raises(ConfigError, match="use_eod_attn_mask_compression: False.*sparse_mode 8.*not implemented"):
        check_ascend_packing(config)


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
