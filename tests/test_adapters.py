"""One case table drives every adapter kind through the same invariants on tiny Llama and GPT-2."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import loramoe
from loramoe import LoraConfig, LoraMoEConfig, MergeError, TiedLoraConfig
from loramoe.adapters import LoraMoELinear
from loramoe.reference import loramoe_delta_loop
from tests.conftest import BUILDERS, random_batch

CASES = {
    "lora": LoraConfig(r=4, alpha=8, dropout=0.0),
    "loramoe": LoraMoEConfig(num_experts=4, r=2, alpha=4, dropout=0.0),
    "tied-lora-TL5": TiedLoraConfig(r=4, preset="TL5"),
    "tied-lora-TL6": TiedLoraConfig(r=4, alpha=8, preset="TL6"),
    "tied-lora-vera": TiedLoraConfig(r=4, preset="vera"),
}
MERGEABLE = {"lora", "tied-lora-TL5", "tied-lora-TL6", "tied-lora-vera"}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _train_step(model, batch, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    opt.step()
    model.eval()


def _expected_count(model, config) -> tuple[int, int]:
    """(trainable, all) parameters the adapter adds. Tied LoRA: A and B once per module name
    (``mlp.up_proj``), trained or frozen; u and v in every layer, only when trained."""
    trainable = frozen = 0
    tied_names = set()
    for path in loramoe.targets.find_targets(model, config.target_modules):
        d_in, d_out = loramoe.adapters.base.layer_shape(model.get_submodule(path))
        if config.method == "lora":
            trainable += config.r * (d_in + d_out)
        elif config.method == "loramoe":
            trainable += config.num_experts * (config.r * (d_in + d_out) + d_in)
        else:
            name = ".".join(path.split(".")[-2:])
            if name not in tied_names:
                tied_names.add(name)
                for on, size in ((config.train_A, config.r * d_in), (config.train_B, config.r * d_out)):
                    trainable, frozen = (trainable + size, frozen) if on else (trainable, frozen + size)
            trainable += config.train_u * config.r + config.train_v * d_out
    return trainable, trainable + frozen


@pytest.fixture(params=sorted(BUILDERS))
def arch(request):
    return request.param


@pytest.fixture(params=sorted(CASES))
def kind(request):
    return request.param


def test_identity_at_init(arch, kind):
    model, batch = BUILDERS[arch](), random_batch()
    before = _logits(model, batch)
    loramoe.attach(model, CASES[kind])
    assert torch.equal(_logits(model, batch), before)


def test_attach_keeps_the_training_mode(kind):
    model = BUILDERS["llama"]()  # built in eval mode
    loramoe.attach(model, CASES[kind])
    assert not any(m.training for m in model.modules())
    model.train()
    loramoe.detach(model)
    loramoe.attach(model, CASES[kind])
    assert all(m.training for m in model.modules())


def test_only_adapter_parameters_change_after_a_step(arch, kind):
    model, batch = BUILDERS[arch](), random_batch()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _logits(model, batch)
    loramoe.attach(model, CASES[kind])
    attached = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_step(model, batch)
    assert not torch.allclose(_logits(model, batch), before)
    for name, param in model.named_parameters():
        base_name = name.replace(".base_layer", "")
        if param.requires_grad:
            assert base_name not in base_before, f"{name} is a base parameter but trainable"
        else:  # base weights, and frozen adapter tensors (Tied LoRA's random A, B)
            assert torch.equal(param, attached[name]), name
            assert base_name not in base_before or torch.equal(param, base_before[base_name]), name


def test_exact_trainable_parameter_count(arch, kind):
    model = BUILDERS[arch]()
    total = sum(p.numel() for p in model.parameters())
    config = CASES[kind]
    expected, added = _expected_count(model, config)
    loramoe.attach(model, config)
    count = loramoe.trainable_parameters(model)
    assert count.trainable == expected
    assert count.total == total + added
    assert f"trainable params: {expected:,d} || all params: {total + added:,d}" in str(count)


def test_save_load_round_trip_is_bit_exact(arch, kind, tmp_path):
    model, batch = BUILDERS[arch](), random_batch()
    loramoe.attach(model, CASES[kind])
    _train_step(model, batch)
    loramoe.save_adapter(model, tmp_path)
    expected = _logits(model, batch)
    torch.manual_seed(1234)  # a different seed: the loaded values must come from the file, not the init
    fresh = loramoe.load_adapter(BUILDERS[arch](), tmp_path)
    assert loramoe.adapter_config(fresh) == CASES[kind]
    for (p1, l1), (p2, l2) in zip(loramoe.adapter_layers(model), loramoe.adapter_layers(fresh)):
        assert p1 == p2
        for key, value in l1.adapter_state().items():
            assert torch.equal(value, l2.adapter_state()[key]), (p1, key)
    assert torch.equal(_logits(fresh, batch), expected)


def test_merge_unmerge(arch, kind):
    model, batch = BUILDERS[arch](), random_batch()
    loramoe.attach(model, CASES[kind])
    _train_step(model, batch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    adapted = _logits(model, batch)
    if kind not in MERGEABLE:
        with pytest.raises(MergeError, match="router"):
            loramoe.merge(model)
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
        return
    loramoe.merge(model)
    loramoe.merge(model)  # idempotent
    assert torch.allclose(_logits(model, batch), adapted, atol=1e-5)
    loramoe.unmerge(model)
    loramoe.unmerge(model)
    for name, param in model.named_parameters():
        if name in weights:
            assert torch.equal(param, weights[name]), name
    assert torch.equal(_logits(model, batch), adapted)


def test_detach_restores_the_base_model(arch, kind):
    model, batch = BUILDERS[arch](), random_batch()
    module_types = {n: type(m) for n, m in model.named_modules()}
    before = _logits(model, batch)
    loramoe.attach(model, CASES[kind])
    _train_step(model, batch)
    loramoe.detach(model)
    assert {n: type(m) for n, m in model.named_modules()} == module_types
    assert all(p.requires_grad for p in model.parameters())
    assert loramoe.adapter_config(model) is None
    assert torch.equal(_logits(model, batch), before)


def test_detach_merged_keeps_the_update():
    model, batch = BUILDERS["llama"](), random_batch()
    loramoe.attach(model, CASES["lora"])
    _train_step(model, batch)
    adapted = _logits(model, batch)
    loramoe.detach(model, merged=True)
    assert not any(isinstance(m, loramoe.adapters.AdapterLayer) for m in model.modules())
    assert torch.allclose(_logits(model, batch), adapted, atol=1e-5)


def test_disabled_adapters_give_the_base_output(arch, kind):
    model, batch = BUILDERS[arch](), random_batch()
    before = _logits(model, batch)
    loramoe.attach(model, CASES[kind])
    _train_step(model, batch)
    with loramoe.disabled_adapters(model):
        assert torch.equal(_logits(model, batch), before)
    assert not torch.equal(_logits(model, batch), before)


def test_loramoe_layer_equals_loop_reference_in_a_model():
    model = BUILDERS["llama"]()
    loramoe.attach(model, CASES["loramoe"])
    for _, layer in loramoe.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, layer.in_features)
    want = layer.base_layer(x) + loramoe_delta_loop(x, layer.router.weight, layer.lora_A, layer.lora_B,
                                                    layer.scale)
    assert (layer(x) - want).abs().max() <= 1e-5


def test_loramoe_default_config_is_the_papers():
    config = LoraMoEConfig()
    assert (config.num_experts, config.r, config.alpha, config.dropout) == (6, 4, 32.0, 0.05)
    assert config.groups == {"knowledge": 3, "task": 3} and config.expert_groups() == [0, 0, 0, 1, 1, 1]
    assert (config.balance_delta, config.balance_weight) == (0.1, 0.1)
    assert (config.balance_importance, config.route_weight, config.route_target) == ("mean", 0.0, 0.9)


def test_loramoe_groups_set_the_expert_count():
    assert LoraMoEConfig(groups={"knowledge": 1, "task": 3, "code": 2}).num_experts == 6
    assert LoraMoEConfig(num_experts=4).expert_groups() == [-1] * 4
    with pytest.raises(ValueError, match="num_experts is 4 but groups"):
        LoraMoEConfig(num_experts=4, groups={"a": 3, "b": 3})
    with pytest.raises(ValueError, match="positive expert count"):
        LoraMoEConfig(groups={"a": 0})


def test_loramoe_reference_initialisation():
    model = BUILDERS["llama"]()
    loramoe.attach(model, LoraMoEConfig())
    layer = model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, LoraMoELinear)
    bound = 1 / layer.in_features**0.5  # kaiming-uniform with a = sqrt(5) on fan_in d_in
    assert layer.router.weight.dtype == torch.float32
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    assert layer.router.weight.abs().max() <= bound
    assert torch.count_nonzero(layer.lora_B) == 0


def test_adapter_dtype_follows_base_unless_set():
    model = BUILDERS["llama"]().to(torch.bfloat16)
    loramoe.attach(model, LoraMoEConfig(num_experts=2, r=2))
    layer = model.model.layers[0].mlp.down_proj
    assert layer.lora_A.dtype == torch.bfloat16 and layer.router.weight.dtype == torch.float32
    loramoe.detach(model)
    loramoe.attach(model, dataclasses.replace(CASES["lora"], dtype="float32"))
    assert model.model.layers[0].mlp.down_proj.lora_A.dtype == torch.float32
    out = model(**random_batch()).logits
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [dict(r=0), dict(dropout=1.0), dict(dtype="float33"),
                                 dict(target_modules=[])])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        LoraConfig(**bad)
    with pytest.raises(ValueError, match="num_experts"):
        LoraMoEConfig(num_experts=0)


@pytest.mark.parametrize("bad,message", [
    ({"balance_importance": "median"}, "balance_importance must be one of mean, sum, got 'median'"),
    ({"route_weight": -0.1}, "route_weight must be >= 0"),
    ({"route_target": 1.0}, r"route_target must be in \(0, 1\), got 1.0"),
    ({"route_target": 0.0}, r"route_target must be in \(0, 1\)"),
    ({"route_weight": 0.5, "num_experts": 4}, "needs groups with at least 2 sample types, got groups=None"),
    ({"route_weight": 0.5, "groups": {"task": 4}}, "needs groups with at least 2 sample types"),
])
def test_loramoe_training_fields_are_validated(bad, message):
    with pytest.raises(ValueError, match=message):
        LoraMoEConfig(**bad)


def test_attach_twice_is_an_error():
    model = BUILDERS["llama"]()
    loramoe.attach(model, CASES["lora"])
    with pytest.raises(ValueError, match="detach"):
        loramoe.attach(model, CASES["loramoe"])
