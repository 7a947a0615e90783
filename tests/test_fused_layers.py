"""LoRAMoE layers in a model: projections that share their input run as one fused group, fall back
to plain autograd where the op can't fold the base in, and generate through the no-autograd path,
all computing the same as the loop-over-experts reference; under bf16 autocast, close to fp32."""

from __future__ import annotations

import copy

import torch

import loramoe
from loramoe import LoraMoEConfig
from loramoe.adapters.loramoe import shared_input_groups
from loramoe.reference import loramoe_delta_loop
from tests.conftest import random_batch, tiny_gpt2, tiny_llama


def _adapted(builder=tiny_llama, dropout=0.0):
    model = loramoe.attach(builder(), LoraMoEConfig(num_experts=4, r=2, dropout=dropout))
    torch.manual_seed(3)
    for _, layer in loramoe.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


def _unfused(model):
    """The same model with every layer forced onto the plain autograd path: a hook on a base
    layer is something the fused op would skip, so the layer must not fuse."""
    for _, layer in loramoe.adapter_layers(model):
        layer.base_layer.register_forward_hook(lambda *args: None)
    return model


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    with loramoe.capture_routing(model, keep_graph=True) as routing:
        logits = model(**batch).logits
    loss = logits.square().mean() + sum(v[0].var() for v in routing.layers.values())  # gates carry a loss too
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gate_and_up_proj_form_one_group():
    model = _adapted()
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.input_siblings == (mlp.up_proj,) and mlp.up_proj.input_siblings == (mlp.gate_proj,)
    assert mlp.down_proj.input_siblings == ()
    assert shared_input_groups(["a.q_proj", "a.k_proj", "b.q_proj", "a.down_proj", "a.v_proj"]) == [
        ["a.q_proj", "a.k_proj", "a.v_proj"]]


def test_fused_groups_equal_plain_autograd_in_outputs_and_gradients():
    batch = random_batch()
    for builder in (tiny_llama, tiny_gpt2):  # GPT-2: Conv1D bases with biases, no groups
        fused_logits, fused_grads = _loss_and_grads(_adapted(builder).train(), batch)
        plain_logits, plain_grads = _loss_and_grads(_unfused(_adapted(builder)).train(), batch)
        assert (fused_logits - plain_logits).abs().max() <= 1e-5
        assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 0
        for name, grad in fused_grads.items():
            assert (grad - plain_grads[name]).abs().max() <= 1e-5, name


def test_sibling_called_with_another_input_computes_its_own():
    model = _adapted()
    mlp = model.model.layers[0].mlp
    x, other = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    layer = mlp.up_proj
    mlp.gate_proj(x)  # hands up_proj its result for x
    assert layer._handed is not None and layer._handed[0] is x
    want = layer.base_layer(other) + loramoe_delta_loop(other, layer.router.weight, layer.lora_A, layer.lora_B,
                                                        layer.scale)
    assert (layer(other) - want).abs().max() <= 1e-5
    mlp.gate_proj(x)
    x.add_(1.0)  # changed in place after gate_proj saw it: the handed result is stale
    want = layer.base_layer(x) + loramoe_delta_loop(x, layer.router.weight, layer.lora_A, layer.lora_B, layer.scale)
    assert (layer(x) - want).abs().max() <= 1e-5


def test_inference_path_equals_training_path_and_follows_weight_changes():
    model, batch = _adapted(), random_batch()
    with torch.no_grad():
        fast = model(**batch).logits
    assert torch.allclose(fast, model(**batch).logits, atol=1e-5)
    layer = model.model.layers[1].mlp.gate_proj
    with torch.no_grad():
        layer.lora_B.mul_(3.0)  # an optimizer step would change it in place the same way
        changed = model(**batch).logits
    assert not torch.allclose(changed, fast, atol=1e-4)
    assert torch.allclose(changed, model(**batch).logits, atol=1e-5)


def test_generation_with_kv_cache_matches_the_unfused_model():
    ids = random_batch()["input_ids"][:1]
    with torch.no_grad():
        fused = _adapted().generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        plain = _unfused(_adapted()).generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fused, plain)


def test_dropout_trains_through_the_fused_group():
    model, batch = _adapted(dropout=0.5).train(), random_batch()
    torch.manual_seed(0)
    first, grads = _loss_and_grads(model, batch)
    torch.manual_seed(0)
    again, _ = _loss_and_grads(model, batch)
    assert torch.equal(first, again)  # the mask comes from torch's generator
    assert not torch.allclose(first, model.eval()(**batch).logits.detach(), atol=1e-4)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


def test_training_with_dropout_replays_exactly_from_a_saved_rng_state():
    """Resuming from a checkpoint restores torch's CPU generator state (the Trainer's rng_state.pth):
    every dropout draw must come from that state alone, the count of draws included, and the fused
    backward must be deterministic, so the resumed steps equal the uninterrupted ones bit for bit."""
    def fresh():
        model = _adapted(dropout=0.1).train()
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def steps(model, optimizer, count):
        for _ in range(count):
            optimizer.zero_grad()
            model(**batch, labels=batch["input_ids"]).loss.backward()
            optimizer.step()
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    batch = random_batch(4, 16)
    model, optimizer = fresh()
    torch.manual_seed(5)
    steps(model, optimizer, 2)
    rng, weights, moments = (torch.get_rng_state(), copy.deepcopy(model.state_dict()),
                             copy.deepcopy(optimizer.state_dict()))
    straight = steps(model, optimizer, 2)
    model, optimizer = fresh()
    model.load_state_dict(weights)
    optimizer.load_state_dict(moments)
    torch.rand(1000)  # whatever else ran in between
    torch.set_rng_state(rng)
    resumed = steps(model, optimizer, 2)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_autocast_bf16_training_and_no_grad_forwards_stay_close_to_fp32(monkeypatch):
    """Under CPU autocast the fused op runs in bf16 (a down_proj fed bf16 takes the plain path).
    Tolerances, from bf16's 2^-8 relative precision through two layers: logits within 0.03 of fp32
    (the experts move them by 0.66, measured 0.009), each parameter's gradient within 10 % of
    fp32's in norm (measured at most 4 %)."""
    import loramoe.adapters.loramoe as loramoe_module

    fused_dtypes = []

    def spy(x, *args, **kwargs):
        fused_dtypes.append(x.dtype)
        return real(x, *args, **kwargs)

    real = loramoe_module.loramoe_group
    monkeypatch.setattr(loramoe_module, "loramoe_group", spy)
    model, batch = _adapted().train(), random_batch()
    want_logits, want_grads = _loss_and_grads(model, batch)
    fused_dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads = _loss_and_grads(model, batch)
    assert fused_dtypes and set(fused_dtypes) == {torch.bfloat16}
    assert logits.dtype == torch.bfloat16 and (logits.float() - want_logits).abs().max() <= 0.03
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert (grad - want_grads[name]).norm() <= 0.1 * want_grads[name].norm(), name

    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first, again = model(**batch).logits, model(**batch).logits
    assert torch.equal(first, again) and (first.float() - want).abs().max() <= 0.03
