"""The CPU swaps' contract with MindFormers (mindrlhf.kernels.cpu_speedups.MINDFORMERS_CONTRACT): the pinned
MindFormers' legacy Llama layers still carry every private name and signature the swaps rely on, so an upgrade
that renames one fails here, by name; and a layer that lacks one keeps its stock class, the model still computes
the stock loss, and the one log line says which name was missing."""
import inspect

import mindspore as ms
import pytest
from mindspore import Parameter

# graph_mode: that module's autouse fixture, active here too
from test_cpu_speedups import batch, build, compiled_library, graph_mode  # noqa: F401


def stock_model(monkeypatch):
    """The reward model with every MindFormers layer as MindFormers builds it (no swap made); the environment
    then allows the swaps, for use_cpu_kernels called by the test."""
    net = build(monkeypatch, stock=True)
    monkeypatch.delenv("MINDRLHF_STOCK_KERNELS")
    monkeypatch.setenv("MINDRLHF_COMPILED_KERNELS", "1")
    return net


def layers(net, class_name):
    return [cell for _, cell in net.cells_and_names()
            if class_name in [cls.__name__ for cls in type(cell).__mro__]]


def test_the_pinned_mindformers_layers_carry_every_name_the_swaps_rely_on(monkeypatch):
    from mindrlhf.kernels.cpu_speedups import CONTRACT_SIGNATURES, MINDFORMERS_CONTRACT, contract_gaps

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


def loss(net):
    return float(net(*batch()).asnumpy())


def test_a_layer_missing_a_name_stays_stock_and_the_log_says_which(monkeypatch):
    from mindrlhf.kernels.cpu_speedups import use_cpu_kernels

    if compiled_library() is None:
        pytest.skip("no C++ compiler here: nothing is swapped to RopeAttention (the fallback is tested in "
                    "test_cpu_speedups.py)")
    reference = stock_model(monkeypatch)
    stock_loss = loss(reference)

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
    assert loss(net) == pytest.approx(stock_loss, rel=1e-5)
