from __future__ import annotations

import pytest
import torch

import loramoe
from loramoe import LoraConfig, LoraMoEConfig
from loramoe.evaluate.router_analysis import gate_shares, group_share, save_gate_shares
from loramoe.forgetting import distribution_shift, knowledge_change, parameter_drift, summarize_drift
from tests.conftest import tiny_llama, tiny_tokenizer

TEXTS = ["w3 w4 w5 w6 w7", "w9 w8", "w20 w21 w22 w23 w24 w25 w26", "w40"]


def _perturb(model, std=0.05):
    torch.manual_seed(0)
    for _, layer in loramoe.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=std)


def test_knowledge_change_lists_lost_and_gained_facts():
    result = knowledge_change({"a": True, "b": True, "c": False, "d": False},
                              {"a": True, "b": False, "c": True, "d": False})
    assert result["lost"] == ["b"] and result["gained"] == ["c"] and result["kept"] == 1
    assert result["base_accuracy"] == 0.5 and result["accuracy_drop"] == 0.0
    with pytest.raises(ValueError, match="different questions"):
        knowledge_change({"a": True}, {"b": True})


def test_untouched_adapter_has_zero_kl_and_a_step_makes_it_positive():
    model, tokenizer = loramoe.attach(tiny_llama(), LoraMoEConfig(num_experts=4, r=2)), tiny_tokenizer()
    before = distribution_shift(model, tokenizer, TEXTS, batch_size=3, progress=False)
    assert before["kl"] == pytest.approx(0.0, abs=1e-6) and before["lm_loss_increase"] == 0.0
    assert before["forgetting_ce"] == pytest.approx(before["base_entropy"], rel=1e-6)
    _perturb(model)
    after = distribution_shift(model, tokenizer, TEXTS, batch_size=3, progress=False)
    assert after["kl"] > 1e-6 and after["tokens"] == before["tokens"] == 4 + 1 + 6 + 0


def test_distribution_shift_matches_a_manual_computation_and_ignores_padding():
    model, tokenizer = loramoe.attach(tiny_llama(), LoraConfig(r=2)), tiny_tokenizer()
    _perturb(model, std=0.2)
    batched = distribution_shift(model, tokenizer, TEXTS, batch_size=4, progress=False)
    alone = distribution_shift(model, tokenizer, TEXTS, batch_size=1, progress=False)
    # kl and lm_loss_increase are differences of fp32 sums of log-probabilities of ~4.6 nats a token;
    # padding changes the matmul shapes and so the last bits of every log-probability (ulp 5e-7), so
    # their error is absolute on that scale, not relative to their own small size (~0.01): 1e-5 of
    # the cross-entropy is ~100 such ulps and under 1 % of the KL (measured: up to 6e-7).
    log_prob_scale = alone["forgetting_ce"]
    for key in ("forgetting_ce", "kl", "top1_ce", "lm_loss_increase"):
        assert batched[key] == pytest.approx(alone[key], rel=1e-4, abs=1e-5 * log_prob_scale), key
    ids = tokenizer(TEXTS[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        pf = torch.log_softmax(model(ids).logits[0, :-1], -1)
        with loramoe.disabled_adapters(model):
            pb = torch.log_softmax(model(ids).logits[0, :-1], -1)
    kl = (pb.exp() * (pb - pf)).sum(-1).mean()
    single = distribution_shift(model, tokenizer, [TEXTS[2]], progress=False)
    assert single["kl"] == pytest.approx(kl.item(), abs=1e-5 * single["forgetting_ce"])  # as above


def test_full_fine_tuning_needs_the_base_model():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    with pytest.raises(ValueError, match="pass base_model"):
        distribution_shift(model, tokenizer, TEXTS, progress=False)
    same = distribution_shift(model, tokenizer, TEXTS, base_model=tiny_llama(), progress=False)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)


def test_drift_is_zero_untouched_and_equals_the_merged_change_for_lora():
    model = loramoe.attach(tiny_llama(), LoraConfig(r=2))
    assert all(row["drift"] == 0.0 for row in parameter_drift(model))
    _perturb(model)
    rows = {row["path"]: row for row in parameter_drift(model)}
    layer = model.model.layers[1].mlp.up_proj
    w0 = layer.base_layer.weight.detach().clone()
    loramoe.merge(model)
    want = ((layer.base_layer.weight - w0).norm() / w0.norm()).item()
    assert rows["model.layers.1.mlp.up_proj"]["drift"] == pytest.approx(want, rel=1e-4)
    assert rows["model.layers.1.mlp.up_proj"]["layer"] == 1
    assert rows["model.layers.1.mlp.up_proj"]["module"] == "mlp.up_proj"
    assert set(summarize_drift(rows.values())) == {"mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "mean"}


def test_drift_for_loramoe_and_full_fine_tuning():
    model = loramoe.attach(tiny_llama(), LoraMoEConfig(num_experts=3, r=2))
    assert all(row["drift"] == 0.0 for row in parameter_drift(model))
    _perturb(model)
    row = parameter_drift(model)[0]
    assert row["drift"] >= row["drift_uniform"] > 0
    base = tiny_llama()
    tuned = tiny_llama()
    assert all(r["drift"] == 0.0 for r in parameter_drift(tuned, base.state_dict()))
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.mul_(1.1)
    rows = {r["path"]: r["drift"] for r in parameter_drift(tuned, base.state_dict())}
    assert rows["model.layers.0.mlp.down_proj"] == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(ValueError, match="base_state"):
        parameter_drift(tuned)


def test_gate_shares_sum_to_one_and_the_heatmap_is_written(tmp_path):
    model, tokenizer = loramoe.attach(tiny_llama(), LoraMoEConfig()), tiny_tokenizer()
    result = gate_shares(model, tokenizer, {"knowledge": TEXTS[:2], "task": TEXTS[2:]}, batch_size=1)
    assert len(result["layers"]) == 6 and result["sets"]["task"]["tokens"] == 8
    for name in ("knowledge", "task"):
        for row in result["sets"][name]["per_layer"]:
            assert sum(row) == pytest.approx(1.0, abs=1e-5)
    assert sum(group_share(result, "knowledge").values()) == pytest.approx(1.0, abs=1e-5)
    json_path, png_path = save_gate_shares(result, tmp_path)
    assert json_path.is_file() and png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="LoRAMoE"):
        gate_shares(loramoe.attach(tiny_llama(), LoraConfig()), tokenizer, {"a": TEXTS})
