"""A bitsandbytes 4-bit (NF4) or 8-bit base under every adapter kind, on the CPU: loading, training,
the fused LoRAMoE op's gradients through the quantized base, saving and reloading, refused merges.

The tiny Llama here has widths of 64 and 128, multiples of bitsandbytes' 4-bit block of 64 values.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

import loramoe.adapters.loramoe as loramoe_layer
from loramoe import models, quantized
from loramoe.adapters import LoraConfig, LoraMoEConfig, MergeError, TiedLoraConfig
from loramoe.attach import adapter_config, adapter_layers, attach, detach, merge
from loramoe.cli import main as cli_main
from loramoe.errors import MissingPackageError, UsageError
from loramoe.forgetting import parameter_drift
from loramoe.serialization import load_adapter
from loramoe.train import train
from tests.conftest import tiny_tokenizer

CONFIGS = {"loramoe": LoraMoEConfig(dropout=0.0), "lora": LoraConfig(), "tied-lora": TiedLoraConfig()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_64")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def _randomize_adapters(*models_: nn.Module, seed: int = 5) -> None:
    """The same random adapter tensors in each model: B starts at zero, which would leave A's and
    the routers' gradients at zero too."""
    layers = [list(adapter_layers(m)) for m in models_]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for same in zip(*layers):
            tensors = [layer.adapter_state() for _, layer in same]
            for key, first in tensors[0].items():
                first.copy_(torch.randn(first.shape, generator=g) * 0.1)
                for other in tensors[1:]:
                    other[key].copy_(first)


def _dequantized_twin(model_dir: str, model: nn.Module) -> nn.Module:
    """The float model whose linear weights are ``model``'s quantized ones, dequantized."""
    twin, _ = models.load(model_dir)
    with torch.no_grad():
        for path, module in model.named_modules():
            if quantized.is_quantized(module):
                twin.get_submodule(path).weight.copy_(quantized.dense_weight(module))
    return twin


def _loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The LM loss, and its gradients to the input embeddings (through every base layer) and to every
    adapter tensor."""
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    return loss.detach(), [embeds.grad, *(p.grad for p in model.parameters() if p.requires_grad)]


def test_load_quantizes_the_linear_layers_but_not_the_lm_head(model_dir):
    for kind, layer_type, weight_dtype in (("4bit", bnb.nn.Linear4bit, torch.uint8),
                                           ("8bit", bnb.nn.Linear8bitLt, torch.int8)):
        model, _ = models.load(model_dir, quantize=kind)
        mlp = model.model.layers[0].mlp
        assert type(mlp.up_proj) is layer_type and mlp.up_proj.weight.dtype == weight_dtype
        assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
        assert model.model.embed_tokens.weight.dtype == torch.float32
    model, _ = models.load(model_dir, quantize="4bit", dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    attach(model, LoraConfig())  # the adapter takes the dtype the base computes in
    assert model.model.layers[0].mlp.up_proj.lora_A.dtype == torch.bfloat16


def test_quantize_without_bitsandbytes_or_with_an_unknown_kind_is_a_clear_error(model_dir, monkeypatch):
    with pytest.raises(UsageError, match="quantize must be one of 4bit, 8bit or None, got '3bit'"):
        models.load(model_dir, quantize="3bit")
    monkeypatch.setattr(quantized.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match=r"needs bitsandbytes.*pip install 'loramoe\[quant\]'"):
        models.load(model_dir, quantize="4bit")


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_gradients_through_a_4bit_base_equal_those_through_its_dequantized_weights(model_dir, method, monkeypatch,
                                                                                   one_thread):
    model, _ = models.load(model_dir, quantize="4bit")
    twin = _dequantized_twin(model_dir, model)
    original, _ = models.load(model_dir)
    for m in (model, twin, original):
        attach(m, CONFIGS[method])
    _randomize_adapters(model, twin, original)
    fused_calls, fused = [], loramoe_layer.loramoe_group
    monkeypatch.setattr(loramoe_layer, "loramoe_group", lambda *a, **k: fused_calls.append(1) or fused(*a, **k))
    ids = torch.randint(1, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    # first generation's path, the op without autograd beside the base's own forward: on a CPU with
    # AVX512-BF16 this is the call after which bitsandbytes would cut the gradients (see
    # loramoe.quantized.keep_gradients_on_cpu), so the gradients below also check that it does not
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, twin(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    loss, grads = _loss_and_grads(model, ids)
    twin_loss, twin_grads = _loss_and_grads(twin, ids)
    # Tolerance: bitsandbytes' CPU 4-bit matmul dequantizes the weight to float32 and multiplies, the
    # same product as the twin's (the forwards agree to float32 rounding; here bit for bit). The
    # gradients differ only in rounding: the fused LoRAMoE op adds the base's input gradient into its
    # own buffer where autograd adds the two branches, a few float32 ulps (measured: 4.5e-7 of the
    # largest entry; LoRA and Tied LoRA 0). 1e-5 of the largest entry is 20x that, and far below what
    # a wrong base gives: NF4 moves a weight by up to 15 % of its block's largest (9 % in norm), so
    # the gradients through the unquantized weights differ by 15 to 36 % of the largest entry
    # (checked below: over 1e-2), and ones that skipped the base by more still.
    torch.testing.assert_close(loss, twin_loss)
    for got, want in zip(grads, twin_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0.0, atol=1e-5 * want.abs().max().item())
    _, original_grads = _loss_and_grads(original, ids)
    embeds_error = (grads[0] - original_grads[0]).abs().max() / original_grads[0].abs().max()
    assert embeds_error > 1e-2
    assert bool(fused_calls) == (method == "loramoe")  # LoRAMoE ran its fused op over the quantized base


def test_gradients_through_an_8bit_base_equal_those_through_its_dequantized_weights(model_dir, one_thread):
    """LLM.int8() also quantizes each input row to int8 in the forward, so the outputs differ from the
    dequantized product by that rounding; given the gradients of the outputs, the backward uses the
    dequantized weight only, and every gradient, to x and to the experts, routers, matches."""
    model, _ = models.load(model_dir, quantize="8bit")
    twin = _dequantized_twin(model_dir, model)
    for m in (model, twin):
        attach(m, CONFIGS["loramoe"])
    _randomize_adapters(model, twin)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=g)
    grads = []
    for m in (model, twin):
        mlp = m.model.layers[0].mlp
        x_m = x.clone().requires_grad_()
        gate, up = mlp.gate_proj(x_m), mlp.up_proj(x_m)  # one fused group
        out_grads = torch.randn(gate.shape, generator=torch.Generator().manual_seed(4))
        torch.autograd.backward([gate, up], [out_grads, 2 * out_grads])
        grads.append([x_m.grad, *(p.grad for p in mlp.parameters() if p.grad is not None)])
    # float32 rounding only: the dequantization's multiply order and the fused op's accumulation
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0.0, atol=1e-5 * want.abs().max().item())


class _Losses(TrainerCallback):
    def __init__(self) -> None:
        self.losses, self.model = [], None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


@pytest.mark.parametrize(("method", "kind"), [("loramoe", "4bit"), ("lora", "4bit"), ("tied-lora", "4bit"),
                                              ("loramoe", "8bit")])
def test_each_kind_trains_on_a_quantized_base_and_reloads_onto_a_fresh_one(model_dir, data_file, tmp_path, method,
                                                                           kind, one_thread):
    record = _Losses()
    train(data=[data_file], model=model_dir, method=method, quantize=kind, output=tmp_path, max_steps=8,
          batch_size=4, lr=1e-2, logging_steps=1, save_steps=100, max_length=32, seed=0, callbacks=[record])
    losses = record.losses
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    trained = record.model.eval()
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    fresh, _ = models.load(model_dir, quantize=kind)
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained(input_ids=ids).logits)
    # the same adapter file serves the unquantized base
    full, _ = models.load(model_dir)
    load_adapter(full, tmp_path)
    for (_, on_full), (_, on_quantized) in zip(adapter_layers(full), adapter_layers(trained), strict=True):
        for key, tensor in on_full.adapter_state().items():
            assert torch.equal(tensor, on_quantized.adapter_state()[key])
    with torch.no_grad():
        assert torch.isfinite(full(input_ids=ids).logits).all()


@pytest.mark.parametrize("method", ["lora", "tied-lora"])
def test_merge_into_a_quantized_base_is_refused_and_changes_nothing(model_dir, method):
    model, _ = models.load(model_dir, quantize="4bit")
    attach(model, CONFIGS[method])
    packed = model.model.layers[0].mlp.up_proj.base_layer.weight.clone()
    for refused in (lambda: merge(model), lambda: detach(model, merged=True)):
        with pytest.raises(MergeError, match="cannot merge into the quantized base layer Linear4bit.*load the base "
                                             "unquantized, load the adapter onto it, and merge there"):
            refused()
    assert adapter_config(model) is not None and not any(layer.merged for _, layer in adapter_layers(model))
    assert torch.equal(model.model.layers[0].mlp.up_proj.base_layer.weight, packed)
    detach(model)
    assert not getattr(model, "_hf_peft_config_loaded", False)


def test_parameter_drift_measures_against_the_dequantized_weight(model_dir):
    model, _ = models.load(model_dir, quantize="4bit")
    attach(model, CONFIGS["lora"])
    _randomize_adapters(model)
    row = parameter_drift(model)[0]
    layer = model.get_submodule(row["path"])
    want = layer.delta_weight().norm() / quantized.dense_weight(layer.base_layer).norm()
    assert row["drift"] == pytest.approx(want.item(), rel=1e-6)


def test_full_fine_tuning_of_a_quantized_base_is_refused(data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORAMOE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--data", data_file, "--method", "full", "--quantize", "4bit", "--output", str(tmp_path)])
    assert exit_.value.code == 1
    assert "--quantize 4bit: --method full trains the base model's weights" in capsys.readouterr().err
