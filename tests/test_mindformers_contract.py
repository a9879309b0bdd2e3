"""The CPU swaps' contract with MindFormers (mindrlhf.models.cpu_speedups.MINDFORMERS_CONTRACT): the pinned
MindFormers' legacy Llama layers still carry every private name and signature the swaps rely on, so an upgrade
that renames one fails here, by name; and a layer that lacks one keeps its stock class, the model still computes
the stock loss, and the one log line says which name was missing."""
import inspect

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor

from conftest import TINY_CONFIG

SEQ, PAIRS = 32, 2


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def tiny_config():
    import mindrlhf.registry  # noqa: F401  (registers the model)
    from mindformers import LlamaConfig

    from mindrlhf.training.config import load_config

    cfg = dict(load_config(str(TINY_CONFIG)).model.model_config)
    cfg.pop("type")
    cfg.update(seq_length=SEQ, batch_size=PAIRS)
    return LlamaConfig(**cfg)


def stock_model(monkeypatch):
    """The reward model with every MindFormers layer as MindFormers builds it (no swap made)."""
    from mindrlhf.models.llama_reward import LlamaRewardModel

    monkeypatch.setenv("MINDRLHF_STOCK_KERNELS", "1")
    ms.set_seed(0)
    net = LlamaRewardModel(tiny_config())
    monkeypatch.delenv("MINDRLHF_STOCK_KERNELS")
    monkeypatch.delenv("MINDRLHF_STOCK_SOFTMAX", raising=False)
    monkeypatch.setenv("MINDRLHF_COMPILED_KERNELS", "1")
    return net


def layers(net, class_name):
    return [cell for _, cell in net.cells_and_names()
            if class_name in [cls.__name__ for cls in type(cell).__mro__]]


def test_the_pinned_mindformers_layers_carry_every_name_the_swaps_rely_on(monkeypatch):
    from mindrlhf.models.cpu_speedups import CONTRACT_SIGNATURES, MINDFORMERS_CONTRACT, contract_gaps

    net = stock_model(monkeypatch)
    for swap, (class_name, _) in MINDFORMERS_CONTRACT.items():
        found = layers(net, class_name)
        assert found, f"{swap}: no {class_name} in the pinned MindFormers' Llama"
        for cell in found:
            assert contract_gaps(cell, swap) == [], f"{swap}: {class_name} lacks {contract_gaps(cell, swap)}"
    for (class_name, method), params in CONTRACT_SIGNATURES.items():
        cls = next(cls for cls in type(layers(net, class_name)[0]).__mro__ if cls.__name__ == class_name)
        assert tuple(inspect.signature(getattr(cls, method)).parameters) == params, f"{class_name}.{method}"
    # The behaviour named beside the contract.
    for ffn in layers(net, "LlamaFeedForward"):
        assert ffn.w1.activation_flag and type(ffn.w1.activation).__name__ == "LlamaSiLU"
    assert hasattr(net.model.casual_mask, "pad_token_id") and hasattr(net.model.casual_mask, "dtype")
    for attention in layers(net, "LLamaAttention"):
        assert hasattr(attention.apply_rotary_emb, "dtype")


def loss(net, batch):
    return float(net(*batch).asnumpy())


def tiny_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 32000, size=(2 * PAIRS, SEQ)).astype(np.int32)
    ends = np.array([SEQ, 20, 11, 27], np.int32)
    mask = (np.arange(SEQ)[None, :] < ends[:, None]).astype(np.float32)
    ids[mask == 0] = 2
    positions = np.tile(np.arange(SEQ, dtype=np.int32), (2 * PAIRS, 1))
    return [Tensor(ids), Tensor(positions), Tensor(mask), Tensor(np.maximum(mask[:PAIRS], mask[PAIRS:])),
            Tensor(ends)]


def test_a_layer_missing_a_name_stays_stock_and_the_log_says_which(monkeypatch):
    from mindrlhf.models.cpu_speedups import use_cpu_kernels

    reference = stock_model(monkeypatch)
    reference.set_train(True)
    stock_loss = loss(reference, tiny_batch())

    # Every layer carries its names: everything is swapped, and the one line says so.
    lines = []
    whole = stock_model(monkeypatch)
    swapped = use_cpu_kernels(whole.model, whole.config, log=lines.append)
    assert swapped == {"rope_attention": 2, "attention": 0, "fused_norm": 5, "norm": 0, "swiglu": 2,
                       "key_mask": 1}, swapped
    assert lines == ["mindrlhf CPU kernels (compiled): swapped 2 rope_attention, 5 fused_norm, 2 swiglu, "
                     "1 key_mask"], lines

    # MindFormers renames a private attribute of one attention layer: that layer keeps its stock class, and with
    # it the stock (B, 1, S, S) causal mask for every layer; the loss is still the stock loss.
    lines = []
    net = stock_model(monkeypatch)
    first = layers(net, "LLamaAttention")[0]
    del first.inv_norm_factor
    first.renamed_norm_factor = reference.model.layers[0].attention.inv_norm_factor
    swapped = use_cpu_kernels(net.model, net.config, log=lines.append)
    assert swapped["rope_attention"] == 1 and swapped["attention"] == 0 and swapped["key_mask"] == 0, swapped
    assert type(first).__name__ == "LLamaAttention"
    assert type(net.model.casual_mask).__name__ == "LowerTriangularMaskWithDynamic"
    assert len(lines) == 1 and "1 attention layers (RopeAttention) kept stock: lacks ['inv_norm_factor']" in lines[0]
    assert "causal mask (KeyMask) kept stock: some attention layers are not RopeAttention" in lines[0], lines

    # The stock layer's own _attn reads inv_norm_factor: give it back under its name so that the model runs.
    first.inv_norm_factor = first.renamed_norm_factor
    ms.load_param_into_net(net, {p.name: Parameter(p.data.copy(), p.name) for p in reference.get_parameters()})
    net.set_train(True)
    assert loss(net, tiny_batch()) == pytest.approx(stock_loss, rel=1e-5)
