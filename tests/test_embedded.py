"""End to end on the real embedded SmolLM2-135M (converted from its GGUF once per cache dir).
CI runs these; `pytest -m "not realmodel"` skips them."""

from __future__ import annotations

import pytest
import torch

import loramoe
from loramoe import LoraMoEConfig, models
from loramoe.demo import run_demo

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def smollm():
    return models.load("smollm2-135m")


def _greedy(model, tokenizer, text, n=4):
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:])


def test_converted_model_knows_a_fact(smollm):
    model, tokenizer = smollm
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert _greedy(model, tokenizer, "The capital of France is").startswith(" Paris")


def test_attach_step_save_load_generate(smollm, tmp_path):
    model, tokenizer = smollm
    loramoe.attach(model, LoraMoEConfig())
    try:
        assert _greedy(model, tokenizer, "The capital of France is").startswith(" Paris")  # identity at init
        batch = tokenizer(["The capital of France is Paris."], return_tensors="pt")
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        model.eval()
        assert any(layer.lora_B.abs().sum() > 0 for _, layer in loramoe.adapter_layers(model))
        loramoe.save_adapter(model, tmp_path)
        fresh, _ = models.load("smollm2-135m")
        loramoe.load_adapter(fresh, tmp_path)
        with torch.no_grad():
            assert torch.equal(fresh(**batch).logits, model(**batch).logits)
        assert (_greedy(fresh, tokenizer, "The capital of Italy is", 6)
                == _greedy(model, tokenizer, "The capital of Italy is", 6))
    finally:
        loramoe.detach(model)


def test_demo_runs_and_checks_its_round_trip(tmp_path):
    result = run_demo(steps=3, output=tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert len(result["adapted"]) == 2 and abs(sum(result["expert_share"]) - 1) < 1e-6


def test_train_on_the_embedded_model_with_the_builtin_typed_data(tmp_path):
    from loramoe.demo import EXAMPLES
    from loramoe.train import train

    summary = train(data=[str(EXAMPLES)], model="smollm2-135m", output=tmp_path, max_steps=2, batch_size=4,
                    max_length=128, lr=1e-3, logging_steps=1, save_steps=2, require_types=True)
    assert summary["steps"] == 2 and summary["records"] == 24
    assert summary["final_lbc_loss"] is not None and summary["trainable_parameters"] == 5_045_760
    model, _ = models.load("smollm2-135m")
    loramoe.load_adapter(model, tmp_path)
    assert loramoe.adapter_config(model).groups == {"knowledge": 3, "task": 3}


def test_quick_lab_end_to_end(tmp_path):
    """What CI runs of the README's main job: `loramoe lab --quick` on the real model, every number of
    its report from results.json."""
    from loramoe.cli import main as cli_main
    from loramoe.lab.config import load_config
    from loramoe.lab.verdicts import VERDICTS
    from tests.lab_checks import check_report

    cli_main(["lab", "--quick", "--output", str(tmp_path)])
    results = check_report(tmp_path)
    quick = load_config(profile="quick")
    assert results["lab"]["runs"] == sum(len(quick.seeds(v)) for v in quick.variants)
    assert results["probe"]["facts"] == quick.score.fact_items * len(quick.mix.knowledge)
    assert 50 < results["base"]["mc"] < 100
    for arm in results["arms"].values():
        assert len(arm["path"]["steps"]) == quick.score.points + 1 and arm["train_seconds"] > 0
        assert arm["end"]["skill"]["estimate"] > 0  # every arm learns the tasks
    for contrast in results["contrasts"]:
        for measure in ("gold_logprob", "mc", "gold_share", "mc_norm"):
            assert contrast[measure]["low"] <= contrast[measure]["estimate"] <= contrast[measure]["high"]
            assert contrast[measure]["verdict"] in VERDICTS
            assert len(contrast["by_level"][measure]) == len(quick.score.levels)
    for arm in results["arms"].values():
        for measure in ("gold_share", "mc_norm"):
            assert arm["end"][measure]["low"] <= arm["end"][measure]["estimate"] <= arm["end"][measure]["high"]
    assert results["base"]["gold_share"] < 0 and 50 < results["base"]["mc_norm"] < 100
    length = results["length_only"]
    assert list(length["per_relation"]) == list(results["probe"]["facts_per_relation"])
    for relation, row in length["per_relation"].items():
        assert 0 <= row["length_only_mc"] <= 100 and row["gold_tokens"] >= 1
        assert row["base_mc"] == pytest.approx(results["base"]["per_relation_mc"][relation])
    assert length["all"]["base_mc"] == pytest.approx(results["base"]["mc"])
    assert "router" in results["arms"]["loramoe-lbc"]
    route = results["arms"]["loramoe-route"]["router"]
    assert route["claims_routing"] and isinstance(route["routed"], bool)
    assert set(route["end_share"]) == {"knowledge", "task", "questions"}
    assert (tmp_path / "frontiers.png").is_file()
