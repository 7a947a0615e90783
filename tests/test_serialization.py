"""The on-disk format: PEFT compatibility for LoRA, and a clear error for every bad folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramoe
from loramoe import AdapterLoadError, LoraConfig, LoraMoEConfig, TiedLoraConfig
from loramoe.serialization import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import tiny_gpt2, tiny_llama, random_batch


def _trained(model, config):
    loramoe.attach(model, config)
    torch.manual_seed(3)
    for _, layer in loramoe.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    return model


@pytest.fixture
def saved_loramoe(tmp_path):
    model = _trained(tiny_llama(), LoraMoEConfig(num_experts=4, r=2))
    loramoe.save_adapter(model, tmp_path)
    return tmp_path


def test_loramoe_file_layout(saved_loramoe):
    document = json.loads((saved_loramoe / CONFIG_NAME).read_text())
    assert document["method"] == "loramoe" and document["loramoe_version"]
    assert document["config"] == {"target_modules": None, "dropout": 0.05, "dtype": None,
                                  "num_experts": 4, "groups": None, "r": 2, "alpha": 32.0,
                                  "balance_delta": 0.1, "balance_weight": 0.1, "balance_importance": "mean",
                                  "route_weight": 0.0, "route_target": 0.9}
    assert document["base_model"]["hidden_size"] == 32 and document["base_model"]["model_type"] == "llama"
    tensors = load_file(saved_loramoe / WEIGHTS_NAME)
    assert tensors["model.layers.0.mlp.down_proj.router.weight"].shape == (4, 48)
    assert tensors["model.layers.0.mlp.down_proj.lora_A"].shape == (4, 2, 48)
    assert tensors["model.layers.0.mlp.down_proj.lora_B"].shape == (4, 32, 2)
    assert len(tensors) == 2 * 3 * 3
    assert not list(saved_loramoe.glob("*.tmp"))


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_peft_loads_our_lora_and_gives_the_same_logits(builder, tmp_path):
    peft = pytest.importorskip("peft")
    model = _trained(builder(), LoraConfig(r=4, alpha=8))
    batch = random_batch()
    with torch.no_grad():
        ours = model(**batch).logits
    loramoe.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / WEIGHTS_NAME)
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    peft_model = peft.PeftModel.from_pretrained(builder(), tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_plain_peft_lora_loads(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    batch = random_batch()
    with torch.no_grad():
        want = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)
    ours = loramoe.load_adapter(tiny_llama(), tmp_path)
    assert loramoe.adapter_config(ours).r == 4
    with torch.no_grad():
        assert torch.allclose(ours(**batch).logits, want, atol=1e-5)


def _edit_config(folder, edit):
    file = folder / CONFIG_NAME
    document = json.loads(file.read_text())
    edit(document)
    file.write_text(json.dumps(document))


def _edit_weights(folder, edit):
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)


def _assert_load_fails_and_leaves_the_model_alone(folder, corrupt, message):
    corrupt(folder)
    model = tiny_llama()
    modules_before = [type(m) for m in model.modules()]
    with pytest.raises(AdapterLoadError, match=message):
        loramoe.load_adapter(model, folder)
    assert [type(m) for m in model.modules()] == modules_before
    assert loramoe.adapter_config(model) is None


KEY = "model.layers.0.mlp.up_proj.lora_A"


@pytest.mark.parametrize("corrupt,message", [
    (lambda f: (f / CONFIG_NAME).unlink(), "adapter_config.json: not found"),
    (lambda f: (f / WEIGHTS_NAME).unlink(), "adapter_model.safetensors: not found"),
    (lambda f: ((f / WEIGHTS_NAME).rename(f / "adapter_model.bin")), "pickle files are never read"),
    (lambda f: (f / CONFIG_NAME).write_text('{"method": "loramoe",\n "config": {,}}'), "line 2: invalid JSON"),
    (lambda f: _edit_config(f, lambda d: d.update(method="ia3")), "unknown adapter method 'ia3'"),
    (lambda f: _edit_config(f, lambda d: d.pop("method")), "field 'method': missing"),
    (lambda f: _edit_config(f, lambda d: d["config"].update(experts=3)), r"unknown LoraMoEConfig fields \['experts'\]"),
    (lambda f: _edit_config(f, lambda d: d["config"].update(r=0)), "field 'config': r must be >= 1"),
    (lambda f: _edit_config(f, lambda d: d.update(target_paths=[])), "field 'target_paths'"),
    (lambda f: _edit_config(f, lambda d: d["target_paths"].append("model.layers.9.mlp.up_proj")),
     "target module 'model.layers.9.mlp.up_proj' is not in this model"),
    (lambda f: _edit_config(f, lambda d: d.update(target_paths=["model.embed_tokens"])), "is a Embedding"),
    (lambda f: _edit_weights(f, lambda t: t.pop(KEY)), f"missing key '{KEY}'"),
    (lambda f: _edit_weights(f, lambda t: t.update(extra=torch.zeros(1))), "unexpected key 'extra'"),
    (lambda f: _edit_weights(f, lambda t: t.update({KEY: torch.zeros(4, 3, 32)})),
     rf"key '{KEY}' has shape \[4, 3, 32\], the model expects \[4, 2, 32\]"),
    (lambda f: (f / WEIGHTS_NAME).write_bytes(b"\x10\x00garbage"), "not a readable safetensors file"),
])
def test_load_errors_name_the_problem_and_leave_the_model_alone(saved_loramoe, corrupt, message):
    _assert_load_fails_and_leaves_the_model_alone(saved_loramoe, corrupt, message)


def test_training_fields_round_trip_and_older_files_without_them_load(tmp_path):
    config = LoraMoEConfig(r=2, balance_importance="sum", route_weight=0.5, route_target=0.7)
    loramoe.save_adapter(_trained(tiny_llama(), config), tmp_path / "new")
    assert loramoe.adapter_config(loramoe.load_adapter(tiny_llama(), tmp_path / "new")) == config
    loramoe.save_adapter(_trained(tiny_llama(), LoraMoEConfig(r=2)), tmp_path / "old")
    _edit_config(tmp_path / "old", lambda d: [d["config"].pop(k) for k in
                                              ("balance_importance", "route_weight", "route_target")])
    old = loramoe.adapter_config(loramoe.load_adapter(tiny_llama(), tmp_path / "old"))
    assert (old.balance_importance, old.route_weight, old.route_target) == ("mean", 0.0, 0.9)


@pytest.fixture
def saved_tied(tmp_path):
    model = _trained(tiny_llama(), TiedLoraConfig(r=4, preset="TL6"))
    loramoe.save_adapter(model, tmp_path)
    return tmp_path


SHARED_KEY = "tied.mlp.up_proj.lora_A"


@pytest.mark.parametrize("corrupt,message", [
    (lambda f: _edit_config(f, lambda d: d["config"].update(train_u=False)),
     "field 'config': train_u=False contradicts preset 'TL6'"),
    (lambda f: _edit_config(f, lambda d: d["config"].update(preset=None, train_A=False, train_B=False,
                                                              train_u=False, train_v=False)), "trains nothing"),
    (lambda f: _edit_weights(f, lambda t: t.pop(SHARED_KEY)), f"missing key '{SHARED_KEY}'"),
    (lambda f: _edit_weights(f, lambda t: t.pop("model.layers.1.mlp.up_proj.lora_v")),
     "missing key 'model.layers.1.mlp.up_proj.lora_v'"),
    (lambda f: _edit_weights(f, lambda t: t.update({"model.layers.0.mlp.up_proj.lora_A": torch.zeros(4, 32)})),
     "unexpected key 'model.layers.0.mlp.up_proj.lora_A'"),
    (lambda f: _edit_weights(f, lambda t: t.update({SHARED_KEY: torch.zeros(5, 32)})),
     rf"key '{SHARED_KEY}' has shape \[5, 32\], the model expects \[4, 32\]"),
])
def test_tied_lora_load_errors_name_the_problem_and_leave_the_model_alone(saved_tied, corrupt, message):
    _assert_load_fails_and_leaves_the_model_alone(saved_tied, corrupt, message)


def test_tied_lora_loads_into_the_same_switches_only(saved_tied):
    same = loramoe.attach(tiny_llama(), TiedLoraConfig(r=4, train_A=True, train_B=True, train_u=True,
                                                       train_v=True))
    loramoe.load_adapter(same, saved_tied)  # no preset, the same switches
    saved = load_file(saved_tied / WEIGHTS_NAME)
    assert torch.equal(same.model.layers[1].mlp.up_proj.lora_B, saved["tied.mlp.up_proj.lora_B"])
    other = loramoe.attach(tiny_llama(), TiedLoraConfig(r=4, preset="TL5"))
    with pytest.raises(AdapterLoadError, match=r"config.train_u': saved True, attached adapter has False"):
        loramoe.load_adapter(other, saved_tied)


def test_loading_into_a_different_attached_adapter_is_an_error(saved_loramoe):
    model = loramoe.attach(tiny_llama(), LoraMoEConfig(num_experts=4, r=2, alpha=16))
    with pytest.raises(AdapterLoadError, match=r"config.alpha': saved 32.0, attached adapter has 16"):
        loramoe.load_adapter(model, saved_loramoe)
    other = loramoe.attach(tiny_llama(), LoraConfig())
    with pytest.raises(AdapterLoadError, match="holds a loramoe adapter"):
        loramoe.load_adapter(other, saved_loramoe)


def test_loading_into_the_same_attached_adapter_overwrites_its_weights(saved_loramoe):
    model = loramoe.attach(tiny_llama(), LoraMoEConfig(num_experts=4, r=2))
    loramoe.load_adapter(model, saved_loramoe)
    saved = load_file(saved_loramoe / WEIGHTS_NAME)
    assert torch.equal(model.model.layers[1].mlp.gate_proj.lora_B, saved["model.layers.1.mlp.gate_proj.lora_B"])


def test_save_without_adapter_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no loramoe adapter"):
        loramoe.save_adapter(tiny_llama(), tmp_path)
