from __future__ import annotations

import pytest
import torch

import loramoe
from loramoe import LoraConfig, LoraMoEConfig, capture_routing
from loramoe.router import router_gates
from tests.conftest import random_batch, tiny_llama


def _model():
    return loramoe.attach(tiny_llama(), LoraMoEConfig(num_experts=4, r=2))


def _manual_gates(model, batch, path):
    """Gates of one layer computed by hand from that layer's input, caught with a plain hook."""
    layer = model.get_submodule(path)
    seen = []
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return router_gates(seen[0], layer.router.weight)  # (batch, seq, E)


def test_per_sample_sums_cover_non_padding_tokens_only():
    model, batch = _model(), random_batch()
    path = "model.layers.1.mlp.down_proj"
    with capture_routing(model) as routing, torch.no_grad():
        model(**batch)
        model(**batch)
    gates = _manual_gates(model, batch, path)
    want = (gates * batch["attention_mask"].unsqueeze(-1)).sum(1)
    assert len(routing.layers) == 6 and len(routing.layers[path]) == 2
    assert torch.allclose(routing.layers[path][0], want, atol=1e-6)
    assert torch.equal(routing.token_counts[0], torch.tensor([5.0, 7.0, 7.0]))
    assert routing.sample_gates()[path].shape == (6, 4)
    assert torch.allclose(routing.sample_gates()[path].sum(-1), torch.cat(routing.token_counts), atol=1e-5)


def test_per_token_capture_and_hooks_removed_afterwards():
    model, batch = _model(), random_batch()
    with capture_routing(model, per_token=True) as routing, torch.no_grad():
        model(**batch)
    gates = routing.layers["model.layers.0.mlp.gate_proj"][0]
    assert gates.shape == (3, 7, 4) and not gates.requires_grad
    assert torch.equal(routing.masks[0], batch["attention_mask"].float())
    assert all(layer.routing_hook is None for _, layer in loramoe.adapter_layers(model))
    with pytest.raises(ValueError, match="per_token=False"):
        routing.sample_gates()


def test_keep_graph_lets_a_loss_flow_into_the_router():
    model, batch = _model(), random_batch()
    with capture_routing(model, keep_graph=True) as routing:
        model(**batch)
    loss = sum(v[0].var() for v in routing.layers.values())
    loss.backward()
    assert model.model.layers[0].mlp.up_proj.router.weight.grad.abs().sum() > 0


def test_generation_with_kv_cache_uses_the_new_tokens_mask():
    model, batch = _model(), random_batch()
    with capture_routing(model) as routing, torch.no_grad():
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(routing.token_counts) == 3
    assert torch.equal(routing.token_counts[0], torch.tensor([5.0, 7.0, 7.0]))
    assert torch.equal(routing.token_counts[1], torch.ones(3))


def test_gradient_checkpointing_recomputation_is_not_counted_twice():
    model, batch = _model(), random_batch()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.config.use_cache = False
    with capture_routing(model) as routing:
        model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(len(v) == 1 for v in routing.gates.values()) and len(routing.gates) == 6
    assert all(len(v) == 1 for v in routing.layers.values())
    assert len(routing.token_counts) == 1


def test_only_layers_run_inside_the_models_forward_are_recorded():
    """The rule that keeps checkpointed recomputation out holds after a forward that raised, too."""
    model, batch = _model(), random_batch()
    layer = model.get_submodule("model.layers.0.mlp.gate_proj")
    with capture_routing(model) as routing, torch.no_grad():
        with pytest.raises(IndexError):
            model(input_ids=batch["input_ids"] + 1000)  # beyond the vocabulary: fails in the embedding
        layer(torch.randn(2, 3, layer.in_features))
        assert routing.gates == {} and routing.masks == []
        model(**batch)
    assert all(len(v) == 1 for v in routing.gates.values()) and len(routing.masks) == 1


def test_capture_needs_loramoe_layers():
    with (pytest.raises(ValueError, match="no LoRAMoE layer"),
          capture_routing(loramoe.attach(tiny_llama(), LoraConfig()))):
        pass
