"""The on-disk format: PEFT compatibility for LoRA, and a clear error for every bad folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import loramoe
from loramoe import AdapterLoadError, LoraConfig, LoraMoEConfig, TiedLoraConfig
from loramoe.serialization import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import random_batch, tiny_gpt2, tiny_llama


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


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("corrupt,message", [
    (lambda f: _edit_weights(f, lambda t: t[KEY].view(-1)[5:7].fill_(NAN)),
     rf"adapter_model.safetensors: key '{KEY}' holds 2 NaN or Inf values"),
    (lambda f: _edit_weights(f, lambda t: t["model.layers.1.mlp.down_proj.router.weight"].view(-1)[0:1].fill_(-INF)),
     "key 'model.layers.1.mlp.down_proj.router.weight' holds 1 NaN or Inf values"),
    (lambda f: _edit_weights(f, lambda t: t.update({KEY: t[KEY].fill_(NAN).to(torch.float8_e4m3fn)})),
     rf"key '{KEY}' holds 256 NaN or Inf values \(of 256\)"),
    (lambda f: _edit_config(f, lambda d: d["config"].update(r="2")),
     r"json: field 'config.r': must be of type int, got '2'"),
    (lambda f: _edit_config(f, lambda d: d["config"].update(r=True)),
     "field 'config.r': must be of type int, got True"),
    (lambda f: _edit_config(f, lambda d: d["config"].update(r=2.0)), "field 'config.r': must be of type int, got 2.0"),
    (lambda f: _edit_config(f, lambda d: d["config"].update(alpha=NAN)),
     "field 'config.alpha': must be finite, got nan"),
    (lambda f: _edit_config(f, lambda d: d["config"].update(balance_weight=INF)),
     "field 'config.balance_weight': must be finite, got inf"),
    (lambda f: _edit_config(f, lambda d: d["config"].update(num_experts=None, groups={"knowledge": True, "task": 3})),
     r"field 'config.groups': must be of type dict\[str, int\] \| None"),
    (lambda f: _edit_config(f, lambda d: d["config"].update(dtype=5)), "field 'config.dtype': must be of type str"),
    (lambda f: _edit_config(f, lambda d: d["config"].update(target_modules=[1])), "field 'config.target_modules'"),
    (lambda f: (f / CONFIG_NAME).write_text("[1, 2]"), "adapter_config.json: expected a JSON object, found an array"),
    (lambda f: (f / CONFIG_NAME).write_text('"x"'), "adapter_config.json: expected a JSON object, found a string"),
    (lambda f: (f / CONFIG_NAME).write_bytes(b'\xff\xfe{\x00}\x00'), "adapter_config.json: not UTF-8 text"),
    (lambda f: _edit_config(f, lambda d: d.update(config=None)), "field 'config': expected a JSON object, found null"),
    (lambda f: _edit_config(f, lambda d: d.update(config=["r"])),
     "field 'config': expected a JSON object, found an array"),
    (lambda f: _edit_config(f, lambda d: d.update(loramoe=5)),
     "field 'loramoe': expected a JSON object, found a number"),
    (lambda f: _edit_config(f, lambda d: d.update(target_paths="model.layers.0.mlp.up_proj")), "field 'target_paths'"),
    (lambda f: _edit_config(f, lambda d: d.update(base_model=5)),
     "field 'base_model': expected a JSON object, found a number"),
    (lambda f: _edit_config(f, lambda d: d["base_model"].update(hidden_size="32")),
     "field 'base_model.hidden_size': must be an integer, got '32'"),
    (lambda f: _edit_config(f, lambda d: d["base_model"].update(vocab_size=100)),
     "field 'base_model.vocab_size': the adapter was trained on a model with vocab_size=100, this model has 97"),
])
def test_bad_values_are_load_errors_that_name_the_file_and_field(saved_loramoe, corrupt, message):
    _assert_load_fails_and_leaves_the_model_alone(saved_loramoe, corrupt, message)


def test_tied_lora_switches_must_be_booleans(saved_tied):
    _assert_load_fails_and_leaves_the_model_alone(
        saved_tied, lambda f: _edit_config(f, lambda d: d["config"].update(preset=None, train_A="yes")),
        r"field 'config.train_A': must be of type bool \| None, got 'yes'")


def test_a_plain_peft_file_with_bad_values_names_its_own_fields(tmp_path):
    loramoe.save_adapter(_trained(tiny_llama(), LoraConfig(r=4, alpha=8)), tmp_path)
    _edit_config(tmp_path, lambda d: d.pop("loramoe"))  # what PEFT itself writes
    assert loramoe.adapter_config(loramoe.load_adapter(tiny_llama(), tmp_path)).alpha == 8
    for field, value, message in [("r", "4", "must be of type int"), ("lora_alpha", NAN, "must be finite"),
                                  ("lora_dropout", None, "must be of type float"),
                                  ("target_modules", "q_proj", "expected a non-empty list"),
                                  ("use_rslora", True, "rank-stabilised scaling is a PEFT LoRA variant"),
                                  ("use_dora", True, "DoRA is a PEFT LoRA variant"),
                                  ("rank_pattern", {"up_proj": 8}, "per-module ranks is a PEFT LoRA variant")]:
        edited = tmp_path / field
        edited.mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            (edited / name).write_bytes((tmp_path / name).read_bytes())
        _edit_config(edited, lambda d, field=field, value=value: d.update({field: value}))
        with pytest.raises(AdapterLoadError, match=f"field '{field}': {message}"):
            loramoe.load_adapter(tiny_llama(), edited)


def test_integer_tensors_are_refused(tmp_path):
    loramoe.save_adapter(_trained(tiny_llama(), LoraConfig(r=4, alpha=8)), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = min(tensors)
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(AdapterLoadError, match=f"key '{key}' holds torch.int32 values, not floating point"):
        loramoe.load_adapter(tiny_llama(), tmp_path)


def _llama_like(**changes) -> LlamaForCausalLM:
    config = tiny_llama().config
    for name, value in changes.items():
        setattr(config, name, value)
    return LlamaForCausalLM(config).eval()


def test_an_adapter_is_refused_by_a_model_of_other_sizes(saved_loramoe):
    with pytest.raises(AdapterLoadError, match="field 'base_model.num_hidden_layers': the adapter was trained on "
                                               "a model with num_hidden_layers=2, this model has 3"):
        loramoe.load_adapter(_llama_like(num_hidden_layers=3), saved_loramoe)
    attached = loramoe.attach(_llama_like(vocab_size=101), LoraMoEConfig(num_experts=4, r=2))
    with pytest.raises(AdapterLoadError, match="vocab_size=97, this model has 101"):
        loramoe.load_adapter(attached, saved_loramoe)


def test_the_recorded_base_model_does_not_refuse_another_path_or_a_missing_record(saved_loramoe):
    _edit_config(saved_loramoe, lambda d: d["base_model"].update(name_or_path="/elsewhere/a-local-copy"))
    loramoe.load_adapter(tiny_llama(), saved_loramoe)
    _edit_config(saved_loramoe, lambda d: d["base_model"].pop("intermediate_size"))
    loramoe.load_adapter(tiny_llama(), saved_loramoe)
    _edit_config(saved_loramoe, lambda d: d.pop("base_model"))
    loramoe.load_adapter(tiny_llama(), saved_loramoe)
    model = tiny_llama()
    del model.config.vocab_size  # a config without the field: nothing to compare with
    loramoe.load_adapter(model, saved_loramoe)


def test_configs_built_in_python_check_their_types():
    with pytest.raises(ValueError, match="r must be of type int, got '4'"):
        LoraConfig(r="4")
    with pytest.raises(ValueError, match="alpha must be finite, got nan"):
        TiedLoraConfig(alpha=NAN)
    with pytest.raises(ValueError, match=r"num_experts must be of type int \| None, got False"):
        LoraMoEConfig(num_experts=False)
    # an int for a float, a tuple for a list
    assert LoraConfig(alpha=16, target_modules=("q_proj", "v_proj")).scale == 2.0


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
