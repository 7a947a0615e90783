"""Tied LoRA beyond the shared case table: presets, sharing, counts, errors, export to PEFT, training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import loramoe
from loramoe import AdapterLoadError, LoraConfig, LoraMoEConfig, MergeError, TiedLoraConfig
from loramoe.adapters.tied_lora import PRESETS, TiedLoraLinear, tie_name
from loramoe.cli import main as cli_main
from loramoe.param_count import LLAMA2_7B_QKV, lora_parameters, tied_lora_parameters
from loramoe.serialization import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import BUILDERS, random_batch, save_tiny, tiny_gpt2, tiny_llama

NAMES = {"llama": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], "gpt2": ["mlp.c_fc", "mlp.c_proj"]}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _randomised(model, config):
    """Attached, with every adapter tensor random (as after training), u and v away from 1."""
    loramoe.attach(model, config)
    torch.manual_seed(5)
    with torch.no_grad():
        for _, layer in loramoe.adapter_layers(model):
            layer.lora_B.normal_(std=0.05)
            for vector in (layer.lora_u, layer.lora_v):
                if vector is not None:
                    vector.uniform_(0.5, 1.5)
    return model


def _layers_by_name(model):
    layers: dict[str, list[TiedLoraLinear]] = {}
    for path, layer in loramoe.adapter_layers(model):
        layers.setdefault(tie_name(path), []).append(layer)
    return layers


def test_presets_aliases_and_switches():
    assert TiedLoraConfig(preset="TL5").trains == "AB"
    assert TiedLoraConfig(preset="TL6").trains == "ABuv"
    vera = TiedLoraConfig(preset="vera")
    assert (vera.train_A, vera.train_B, vera.train_u, vera.train_v) == (False, False, True, True)
    assert TiedLoraConfig().trains == "ABuv" and TiedLoraConfig(r=16).alpha == 16.0  # TL6, scale 1
    assert TiedLoraConfig(train_B=True, train_v=True).trains == "Bv"
    assert TiedLoraConfig(preset="Buv", train_A=False).trains == "Buv"
    assert len(PRESETS) == 15


@pytest.mark.parametrize("fields,message", [
    (dict(train_A=False, train_B=False, train_u=False, train_v=False), "trains nothing: set train_A"),
    (dict(preset="TL7"), "preset must be TL5, TL6, vera .* got 'TL7'"),
    (dict(preset="BA"), "preset must be"),
    (dict(preset="TL6", train_u=False), "train_u=False contradicts preset 'TL6'"),
    (dict(r=0), "r must be >= 1"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        TiedLoraConfig(**fields)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_one_pair_per_name_is_one_parameter_in_every_layer(arch):
    model = loramoe.attach(BUILDERS[arch](), TiedLoraConfig(r=4))
    layers = _layers_by_name(model)
    assert sorted(layers) == sorted(NAMES[arch])
    pointers = set()
    for group in layers.values():
        assert len(group) == 2
        assert all(layer.lora_A is group[0].lora_A and layer.lora_B is group[0].lora_B for layer in group)
        assert len({layer.lora_A.data_ptr() for layer in group}) == 1
        assert group[0].lora_u.data_ptr() != group[1].lora_u.data_ptr()
        pointers.add(group[0].lora_A.data_ptr())
    assert len(pointers) == len(layers)  # one pair per name, not one for the model


def test_the_layer_computes_the_papers_formula():
    model = _randomised(tiny_llama(), TiedLoraConfig(r=4, alpha=6))
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, layer.in_features)
    A, B, u, v = layer.lora_A, layer.lora_B, layer.lora_u, layer.lora_v
    want = layer.base_layer(x) + 1.5 * torch.einsum("o,or,r,ri,bti->bto", v, B, u, A, x)
    assert torch.allclose(layer(x), want, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_switch_combination_starts_at_the_base_and_trains_only_its_tensors(preset):
    model, batch = tiny_llama(), random_batch()
    before = _logits(model, batch)
    loramoe.attach(model, TiedLoraConfig(r=4, preset=preset))
    assert torch.equal(_logits(model, batch), before)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n.rpartition(".lora_")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(preset)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    model.eval()
    assert not torch.allclose(_logits(model, batch), before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_a_shared_tensor_counts_once_and_the_optimizer_gets_it_once(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = loramoe.attach(tiny_llama(), TiedLoraConfig(r=4))
    count = loramoe.trainable_parameters(model)
    per_layer_sum = sum(p.numel() for _, layer in loramoe.adapter_layers(model)
                        for p in layer.adapter_state().values())
    assert count.trainable < per_layer_sum  # the state of every layer repeats the pair
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    optimizer = Trainer(model=model, args=args).create_optimizer()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len({id(p) for p in params}) == len(params)
    assert sum(p.numel() for p in params) == count.trainable


class _Block(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


class _Stack(nn.Module):
    """Two layers whose ``proj`` may differ in shape: what Tied LoRA cannot tie."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(8, w) for w in widths)


def test_modules_of_one_name_with_different_shapes_are_refused():
    model = _Stack([6, 7])
    with pytest.raises(ValueError, match=r"named 'proj'.*layers.0.proj has \(d_in, d_out\) = \(8, 6\); "
                                         r"layers.1.proj has \(d_in, d_out\) = \(8, 7\)"):
        loramoe.attach(model, TiedLoraConfig(target_modules=["proj"]))
    assert loramoe.adapter_config(model) is None
    assert all(isinstance(layer.proj, nn.Linear) and layer.proj.weight.requires_grad for layer in model.layers)


def test_loading_into_modules_of_different_shapes_is_refused(tmp_path):
    loramoe.save_adapter(loramoe.attach(_Stack([6, 6]), TiedLoraConfig(target_modules=["proj"])), tmp_path)
    model = _Stack([6, 7])
    with pytest.raises(AdapterLoadError, match=r"key 'tied.proj.lora_B' is shared by modules that need "
                                               r"shapes \[6, 8\] and \[7, 8\]"):
        loramoe.load_adapter(model, tmp_path)
    assert loramoe.adapter_config(model) is None


@pytest.mark.parametrize("preset,per_layer", [("TL5", []), ("TL6", ["lora_u", "lora_v"]),
                                              ("vera", ["lora_u", "lora_v"])])
def test_the_pair_is_saved_once_and_loading_restores_the_sharing(preset, per_layer, tmp_path):
    model, batch = _randomised(tiny_llama(), TiedLoraConfig(r=4, preset=preset)), random_batch()
    loramoe.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    shared = {f"tied.{name}.lora_{f}" for name in NAMES["llama"] for f in "AB"}
    vectors = {f"model.layers.{i}.{name}.{key}" for i in range(2) for name in NAMES["llama"] for key in per_layer}
    assert set(tensors) == shared | vectors
    assert tensors["tied.mlp.down_proj.lora_A"].shape == (4, 48)
    assert tensors["tied.mlp.down_proj.lora_B"].shape == (32, 4)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert document["method"] == "tied-lora" and document["config"]["preset"] == preset
    torch.manual_seed(99)
    fresh = loramoe.load_adapter(tiny_llama(), tmp_path)
    for group in _layers_by_name(fresh).values():
        assert all(layer.lora_A is group[0].lora_A and layer.lora_B is group[0].lora_B for layer in group)
        assert all(p.requires_grad == (f in TiedLoraConfig(preset=preset).trains)
                   for layer in group for f, p in zip("AB", (layer.lora_A, layer.lora_B)))
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("preset", ["TL5", "TL6", "vera"])
def test_export_to_plain_lora_runs_in_peft_and_loramoe(builder, preset, tmp_path):
    peft = pytest.importorskip("peft")
    model, batch = _randomised(builder(), TiedLoraConfig(r=4, alpha=12, preset=preset)), random_batch()
    want = _logits(model, batch)
    loramoe.export_lora(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    paths = [path for path, _ in loramoe.adapter_layers(model)]
    assert set(tensors) == {f"base_model.model.{p}.lora_{f}.weight" for p in paths for f in "AB"}
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert document["peft_type"] == "LORA" and document["r"] == document["lora_alpha"] == 4
    theirs = peft.PeftModel.from_pretrained(builder(), tmp_path).eval()
    assert torch.allclose(_logits(theirs, batch), want, atol=1e-5)
    ours = loramoe.load_adapter(builder(), tmp_path)
    assert loramoe.adapter_config(ours) == LoraConfig(r=4, alpha=4.0)
    assert torch.allclose(_logits(ours, batch), want, atol=1e-5)


def test_export_of_lora_is_its_folder_and_of_loramoe_an_error(tmp_path):
    model = loramoe.attach(tiny_llama(), LoraConfig(r=2))
    loramoe.export_lora(model, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())["loramoe"]["method"] == "lora"
    with pytest.raises(MergeError, match="router"):
        loramoe.export_lora(loramoe.attach(tiny_llama(), LoraMoEConfig(num_experts=2, r=2)), tmp_path / "moe")
    with pytest.raises(ValueError, match="no loramoe adapter"):
        loramoe.export_lora(tiny_llama(), tmp_path / "none")


def test_counts_reproduce_the_papers_fused_qkv_llama2_7b():
    """docs/method.md, section 2 (Parameter counts): LoRA 4,194,304; tied A, B 131,072;
    u, v 393,472; TL6 524,544 at r = 8."""
    assert lora_parameters(LLAMA2_7B_QKV, 32, 8) == 4_194_304
    assert tied_lora_parameters(LLAMA2_7B_QKV, 32, TiedLoraConfig(r=8, preset="TL5")) == 131_072
    assert tied_lora_parameters(LLAMA2_7B_QKV, 32, TiedLoraConfig(r=8, preset="vera")) == 393_472
    assert tied_lora_parameters(LLAMA2_7B_QKV, 32, TiedLoraConfig(r=8, preset="TL6")) == 524_544


class _FusedQKVStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"qkv_proj": nn.Linear(4096, 3 * 4096, bias=False)})
                                    for _ in range(32))


@pytest.mark.parametrize("preset,expected", [("TL5", 131_072), ("TL6", 524_544), ("vera", 393_472)])
def test_attached_to_llama2_7b_shaped_fused_qkv_the_counts_are_the_papers(preset, expected):
    with torch.device("meta"):  # shapes only: 32 full-size projections would take 6 GB
        model = _FusedQKVStack()
        loramoe.attach(model, TiedLoraConfig(r=8, preset=preset, target_modules=["qkv_proj"]))
    assert loramoe.trainable_parameters(model).trainable == expected


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("preset", PRESETS)
def test_the_count_function_agrees_with_the_attached_model(arch, preset):
    model = BUILDERS[arch]()
    config = TiedLoraConfig(r=3, preset=preset)
    shapes = {tie_name(p): loramoe.adapters.base.layer_shape(model.get_submodule(p))
              for p in loramoe.targets.find_targets(model, None)}
    loramoe.attach(model, config)
    assert loramoe.trainable_parameters(model).trainable == tied_lora_parameters(shapes, 2, config)


def test_train_with_tied_lora_from_the_command_line(tmp_path):
    save_tiny(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    records = [{"instruction": f"w{2 + i} w{3 + i}", "output": f"w{10 + i} w{11 + i}"} for i in range(8)]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    cli_main(["train", "--model", str(tmp_path / "model"), "--data", json.dumps([str(data)]),
              "--output", str(tmp_path / "run"), "--method", "tied-lora", "--preset", "TL5", "--rank", "4",
              "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--save-steps", "10", "--lr", "1e-2"])
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["method"] == "tied-lora" and summary["steps"] == 2
    assert summary["adapter"]["preset"] == "TL5" and summary["trainable_parameters"] == 3 * 4 * (32 + 48)
    assert set(load_file(tmp_path / "run" / WEIGHTS_NAME)) == {f"tied.{n}.lora_{f}" for n in NAMES["llama"]
                                                                for f in "AB"}
    model, _ = loramoe.models.load(str(tmp_path / "model"))
    loramoe.load_adapter(model, tmp_path / "run")
    assert loramoe.adapter_config(model) == TiedLoraConfig(r=4, preset="TL5")
    assert any(torch.count_nonzero(layer.lora_B) for _, layer in loramoe.adapter_layers(model))
