"""The lab's format-free measures on a tiny model, and its statistics on numbers worked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loramoe.lab.probe import Fact, Probe, TaskItem, distractors
from loramoe.lab.scoring import choose_gold, score_point
from loramoe.lab.stats import (
    ArmData,
    Draws,
    at_level,
    end_change,
    equal_skill,
    interval,
    verdict,
)
from loramoe.suites.base import Example
from tests.conftest import tiny_llama, tiny_tokenizer


def _probe() -> Probe:
    facts = [Fact(Example(id=f"capital/c{i}/0", prompt=f"w{10 + i} w20", answers=(f"w{30 + i}", f"w{40 + i}"),
                          subject=f"w{10 + i}", relation="capital"),
                  f"w5 w{10 + i} w6", (f"w{30 + i}", f"w{40 + i}"), tuple(f"w{50 + 3 * i + j}" for j in range(3)))
             for i in range(4)]
    tasks = [TaskItem(Example(id="topic/t0", prompt="w7 w8 w9", answers=("w60",)), "topic", "accuracy", "accuracy")]
    return Probe(facts, tasks, chat=[0], generation=[0], removed_by_overlap=0)


def _train_on(model, tokenizer, texts: list[str], steps: int = 60) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = torch.tensor([tokenizer(t)["input_ids"] for t in texts])
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    model.eval()


def _measures(model, tokenizer, probe, gold):
    point = score_point(model, tokenizer, probe, gold, step=0, final=True, batch_size=4, max_new_tokens=2,
                        precision="fp32")
    return point, [c[0] for c in point["choices"]], [c[0] > max(c[1:]) for c in point["choices"]]


def test_a_planted_fact_gains_log_probability_and_wins_the_multiple_choice():
    model, tokenizer, probe = tiny_llama(), tiny_tokenizer(), _probe()
    gold = choose_gold(model, tokenizer, probe, batch_size=4, precision="fp32")
    assert all(g in f.aliases for g, f in zip(gold, probe.facts))
    _, before, _ = _measures(model, tokenizer, probe, gold)
    _train_on(model, tokenizer, [f"{probe.facts[0].statement} {gold[0]}", f"{probe.facts[1].statement} {gold[1]}"])
    point, after, right = _measures(model, tokenizer, probe, gold)
    assert after[0] > before[0] + 1.0 and after[1] > before[1] + 1.0
    assert right[0] and right[1]
    assert len(point["task_loss"]) == 1 and point["task_loss"][0] > 0
    assert len(point["chat"]) == 1 and len(point["generation"]) == 1


def test_bf16_scoring_agrees_with_fp32_and_leaves_the_model_as_it_was():
    model, tokenizer, probe = tiny_llama(), tiny_tokenizer(), _probe()
    gold = [f.aliases[0] for f in probe.facts]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = score_point(model, tokenizer, probe, gold, step=0, final=False, batch_size=4, max_new_tokens=2,
                       precision="fp32")
    bf16 = score_point(model, tokenizer, probe, gold, step=0, final=False, batch_size=4, max_new_tokens=2,
                       precision="bf16")
    assert np.allclose(fp32["choices"], bf16["choices"], atol=0.1)  # bf16 keeps about 3 significant digits
    assert all(torch.equal(v, model.state_dict()[k]) and v.dtype == torch.float32 for k, v in state.items())


def test_distractors_avoid_every_alias_and_the_subject():
    example = Example(id="capital/France/0", prompt="?", answers=("Paris", "Paname"), subject="France")
    chosen = distractors(example, ["Paris", "paris", "Lima", "France", "Rome", "Oslo", "Lima"], 3, seed=0)
    assert sorted(chosen) == ["Lima", "Oslo", "Rome"]
    with pytest.raises(ValueError, match="only 3 other answers"):
        distractors(example, ["Lima", "Rome", "Oslo"], 4, seed=0)


def test_knowledge_at_a_skill_level_is_read_where_the_path_first_reaches_it():
    skill = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 0.5, 0.4, 0.6]])
    knowledge = np.array([[0.0, -1.0, -3.0, -6.0], [0.0, 1.0, 2.0, 3.0]])
    assert at_level(skill, knowledge, 1.5).tolist()[0] == -2.0
    assert at_level(skill, knowledge, 0.25)[1] == 0.5
    assert np.isnan(at_level(skill, knowledge, 1.0)[1])


def _arm(rng, drop: float, seeds: int, facts: int = 300, tasks: int = 60) -> ArmData:
    """Paths whose knowledge falls by ``drop`` per unit of skill, with item noise."""
    gains = np.array([0.0, 0.5, 1.0, 1.5])
    base_know, base_loss = rng.normal(size=facts), rng.uniform(1, 3, size=tasks)
    know = (base_know + (-drop * gains)[None, :, None]
            + rng.normal(0, 0.3, size=(seeds, 4, facts)) * (gains > 0)[:, None])
    loss = base_loss - gains[None, :, None] + rng.normal(0, 0.1, size=(seeds, 4, tasks)) * (gains > 0)[:, None]
    know[:, 0], loss[:, 0] = base_know, base_loss
    return ArmData([0, 1, 2, 3], {"gold_logprob": know}, loss)


def test_equal_skill_contrasts_find_a_real_difference_and_none_where_there_is_none():
    rng = np.random.default_rng(0)
    arms = {"keeps": _arm(rng, 0.2, 2), "forgets": _arm(rng, 1.0, 1), "same": _arm(rng, 0.2, 2)}
    result = equal_skill(arms, [("keeps", "forgets"), ("keeps", "same")], ["gold_logprob"], [2 / 3],
                         Draws.make(300, 60, 500, seed=0))["gold_logprob"][0]
    assert result["skill"] == pytest.approx(1.0, abs=0.05)  # two thirds of the common 1.5
    real = result["contrasts"]["keeps vs forgets"]
    assert real["estimate"] == pytest.approx(0.8, abs=0.1) and verdict(real) == "higher"
    assert verdict(result["contrasts"]["keeps vs same"]) == "no detectable difference"
    assert result["arms"]["forgets"]["estimate"] == pytest.approx(-1.0, abs=0.1)
    assert result["arms"]["forgets"]["low"] < -1.0 < result["arms"]["forgets"]["high"]


def test_end_change_is_paired_by_item_and_its_interval_covers_the_truth():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 5, size=400)  # large spread between items, small change: only pairing sees it
    values = base[None, :] + 0.3 + rng.normal(0, 0.5, size=(2, 400))
    draws = Draws.make(400, 1, 1000, seed=0)
    result = end_change("arm", values, base, draws.facts, draws)
    assert result["low"] < 0.3 < result["high"] and result["high"] - result["low"] < 0.2
    assert verdict(result) == "higher"
    assert verdict(interval(0.0, np.array([np.nan, np.nan]))) == "not measurable"
