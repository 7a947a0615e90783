"""The lab's format-free measures on a tiny model (its statistics: tests/test_lab_stats.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loramoe.lab.probe import Fact, Probe, TaskItem, distractors
from loramoe.lab.scoring import choose_gold, score_point
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
