from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel
from transformers.pytorch_utils import Conv1D

import loramoe
from loramoe import LoraConfig, LoraMoEConfig, TargetError
from loramoe.targets import find_targets
from tests.conftest import tiny_gpt2, tiny_llama


def test_llama_defaults_are_the_mlp_projections():
    paths = find_targets(tiny_llama(), None)
    assert paths == [f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")]


def test_gpt2_defaults_skip_the_attention_c_proj():
    paths = find_targets(tiny_gpt2(), None)
    assert paths == [f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]


def test_names_and_regex_override_the_defaults():
    model = tiny_llama()
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    assert find_targets(model, r"model\.layers\.1\.mlp\.(up|down)_proj") == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_no_match_lists_the_linear_layers():
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32))
    with pytest.raises(TargetError) as err:
        loramoe.attach(model, LoraMoEConfig())
    message = str(err.value)
    assert "model type 'bert'" in message and "self.query" in message and "intermediate.dense" in message
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen


def test_non_linear_target_is_an_error():
    with pytest.raises(TargetError, match="Embedding"):
        loramoe.attach(tiny_llama(), LoraConfig(target_modules=["embed_tokens"]))


def test_conv1d_adapter_matches_a_linear_on_transposed_weights():
    model = tiny_gpt2()
    loramoe.attach(model, LoraMoEConfig(num_experts=3, r=2, dropout=0.0))
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer.base_layer, Conv1D)
    torch.nn.init.normal_(layer.lora_B)
    linear = torch.nn.Linear(layer.in_features, layer.out_features)
    linear.weight.data = layer.base_layer.weight.data.T.clone()
    linear.bias.data = layer.base_layer.bias.data.clone()
    x = torch.randn(2, 4, layer.in_features)
    want = linear(x) + layer.adapter_delta(x)
    assert torch.allclose(layer(x), want, atol=1e-5)
