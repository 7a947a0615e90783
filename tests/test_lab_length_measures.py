"""The lab's measures that answer length and format cannot move, on numbers worked by hand: the gold
answer's log-probability normalised over the choices, multiple choice normalised as lm-eval's
acc_norm, the length-only baseline, and their place in results.json and the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loramoe.lab.config import load_config
from loramoe.lab.measures import Lengths, candidate_lengths, fact_measures, gold_share, length_only, length_table
from loramoe.lab.probe import Fact, Probe, TaskItem
from loramoe.lab.report import render
from loramoe.lab.results import arm_data, build
from loramoe.lab.stats import Draws, equal_skill
from loramoe.suites.base import Example
from tests.conftest import tiny_tokenizer
from tests.lab_checks import check_report

NEW = ("gold_share", "mc_norm")


def _fact(i: int, relation: str, answer: str, distractors: tuple[str, ...]) -> Fact:
    example = Example(id=f"{relation}/s{i}/0", prompt=f"w{10 + i % 20} w20", answers=(answer,),
                      subject=f"w{10 + i % 20}", relation=relation)
    return Fact(example, f"w5 w{10 + i % 20} w6", (answer,), distractors)


def _probe(facts: list[Fact]) -> Probe:
    tasks = [TaskItem(Example(id=f"topic/t{i}", prompt="w7 w8 w9", answers=("w60",)), "topic", "accuracy",
                      "accuracy") for i in range(4)]
    return Probe(facts, tasks, chat=[0, 1], generation=[0], removed_by_overlap=0)


def test_gold_share_is_the_log_softmax_of_the_choices_at_the_gold():
    choices = np.array([[-1.0, -2.0, -3.0, -4.0], [-5.0, -1.0, -1.0, -1.0]])
    hand = [-math.log(1 + math.exp(-1) + math.exp(-2) + math.exp(-3)),  # -1 - log(e^-1 + ... + e^-4)
            -5.0 - math.log(math.exp(-5) + 3 * math.exp(-1))]
    assert gold_share(choices) == pytest.approx(hand, abs=1e-12)
    assert gold_share(choices + 7.0) == pytest.approx(hand, abs=1e-12)  # probability left outside: no matter
    every = [gold_share(np.roll(choices, -j, axis=1)) for j in range(4)]
    assert np.exp(every).sum(axis=0) == pytest.approx([1.0, 1.0])


def _lm_eval(lls: list[float], choices: tuple[str, ...]) -> tuple[float, float]:
    """lm-eval's process_results for output_type multiple_choice (lm_eval/api/task.py), gold at 0:
    ``acc`` from argmax of the summed log-likelihoods, ``acc_norm`` from argmax of each divided by
    ``len(choice)``, the choice string without the target delimiter scored before it."""
    completion_len = np.array([float(len(c)) for c in choices])
    return float(np.argmax(lls) == 0), float(np.argmax(np.array(lls) / completion_len) == 0)


def test_mc_norm_is_lm_eval_acc_norm_where_it_disagrees_with_acc():
    facts = [_fact(0, "currency", "yen", ("Swiss franc", "Danish krone", "Icelandic krona")),
             _fact(1, "capital", "Buenos Aires", ("Lima", "Quito", "Bogota"))]
    gold = ["yen", "Buenos Aires"]
    lengths = candidate_lengths(tiny_tokenizer(), _probe(facts), gold)
    assert lengths.chars.tolist() == [[3, 11, 12, 15], [12, 4, 5, 6]]  # the answers, without the space before
    assert lengths.tokens.tolist() == [[1, 2, 2, 2], [2, 1, 1, 1]]  # " " + answer, words of the tiny tokenizer
    lls = [[-6.0, -11.0, -30.0, -40.0],  # yen wins the sum, loses per character (-2.0 vs -1.0)
           [-9.0, -8.0, -30.0, -40.0]]  # Buenos Aires loses the sum, wins per character (-0.75 vs -2.0)
    measured = fact_measures({"choices": lls}, lengths)
    for i, fact in enumerate(facts):
        acc, acc_norm = _lm_eval(lls[i], (gold[i], *fact.distractors))
        assert (measured["mc"][i], measured["mc_norm"][i]) == (100 * acc, 100 * acc_norm)
    assert measured["mc"].tolist() == [100.0, 0.0] and measured["mc_norm"].tolist() == [0.0, 100.0]
    assert measured["gold_logprob"].tolist() == [-6.0, -9.0]


def test_length_only_shares_ties_and_sits_next_to_the_base_model_per_relation():
    tokens = np.array([[1, 1, 2, 2], [2, 1, 3, 3], [1, 1, 1, 1], [1, 2, 2, 2], [3, 3, 3, 1]], dtype=float)
    assert length_only(tokens).tolist() == [50.0, 0.0, 25.0, 100.0, 0.0]
    facts = [_fact(i, "capital" if i < 3 else "currency", f"w{30 + i}", (f"w{40 + i}", f"w{50 + i}", f"w{60 + i}"))
             for i in range(5)]
    base = {"choices": [[-1, -2, -3, -4],  # picks the gold, one of 2 shortest
                        [-3, -1, -5, -5],  # picks the only shortest, not the gold
                        [-2, -1, -3, -3],  # picks one of 4 tied
                        [-1, -2, -2, -2],  # picks the gold, the only shortest
                        [-4, -3, -2, -1]]}  # picks the only shortest, not the gold
    table = length_table(_probe(facts), base, Lengths(np.full((5, 4), 5.0), tokens))
    capital, currency = table["per_relation"]["capital"], table["per_relation"]["currency"]
    assert table["chance"] == 25.0 and list(table["per_relation"]) == ["capital", "currency"]
    assert capital["facts"] == 3 and capital["length_only_mc"] == pytest.approx(25.0)
    assert capital["base_mc"] == pytest.approx(100 / 3) == capital["base_mc_norm"]  # equal lengths: no change
    assert capital["base_picks_length_only"] == pytest.approx((50 + 100 + 25) / 3)
    assert (currency["length_only_mc"], currency["base_mc"], currency["base_picks_length_only"]) == (50, 50, 100)
    assert capital["gold_tokens"] == pytest.approx(4 / 3) and capital["distractor_tokens"] == pytest.approx(15 / 9)
    assert table["all"]["facts"] == 5 and table["all"]["length_only_mc"] == pytest.approx(35.0)


CONFIG = """
variants:
  adapter: {method: lora, lr: 1.0e-3, seeds: [0, 1]}
  full: {method: full, lr: 1.0e-3, seeds: [0]}
contrasts:
  - {name: backbone, a: adapter, b: full, question: "Does the frozen backbone keep more?"}
score: {levels: [0.5, 1.0], verdict_level: 1.0, bootstrap: 200}
"""


def _made_up_lab(tmp_path):
    """A build from made-up points: the adapter keeps its facts, full fine-tuning moves probability
    from the gold answer to the distractors."""
    rng = np.random.default_rng(0)
    facts = [_fact(i, ("capital", "currency")[i % 2], f"w{30 + i % 20}", (f"w{50 + i % 20}", "w70 w71", "w72"))
             for i in range(40)]
    probe = _probe(facts)
    config_path = tmp_path / "lab.yaml"
    config_path.write_text(CONFIG)
    config = load_config(config_path)
    base_choices = rng.normal(-4, 1, size=(40, 4))
    base = {"step": 0, "choices": base_choices.tolist(), "task_loss": [3.0, 3.2, 2.8, 3.1], "chat": ["w30", "no"],
            "generation": ["w60"], "gold": [f.aliases[0] for f in facts]}
    drift = {"adapter": np.array([0.0, 0.0, 0.0, 0.0]), "full": np.array([-1.5, 0.5, 0.5, 0.5])}
    records, points = [], {}
    for variant, seeds in (("adapter", [0, 1]), ("full", [0])):
        for seed in seeds:
            name = f"{variant}-s{seed}"
            records.append({"name": name, "variant": variant, "seed": seed, "train": {"trainable_parameters": 10},
                            "train_seconds": 1.0, "score_seconds": 1.0})
            points[name] = [{"step": step, "choices": (base_choices + share * drift[variant]
                                                       + rng.normal(0, 0.3, size=(40, 4))).tolist(),
                             "task_loss": (np.array(base["task_loss"]) - 2 * share + rng.normal(0, 0.05, 4)).tolist()}
                            for step, share in ((2, 0.5), (4, 1.0))]
            points[name][-1] |= {"chat": ["w30", "w31"], "generation": ["w60"]}
    lengths = candidate_lengths(tiny_tokenizer(), probe, base["gold"])
    return config, probe, base, records, points, lengths


def test_results_hold_the_new_measures_with_intervals_and_the_old_numbers_unmoved(tmp_path):
    config, probe, base, records, points, lengths = _made_up_lab(tmp_path)
    results = json.loads(json.dumps(build(config, probe, base, records, points, lengths)))

    def has_interval(result):
        return result["low"] is not None and result["low"] <= result["estimate"] <= result["high"]

    for measure in NEW:
        for level in results["equal_skill"][measure]:
            assert has_interval(level["contrasts"]["adapter vs full"])
            assert all(has_interval(arm) for arm in level["arms"].values())
        assert all(has_interval(arm["end"][measure]) for arm in results["arms"].values())
        assert has_interval(results["contrasts"][0][measure]) and "verdict" in results["contrasts"][0][measure]
        assert results["detectable"][measure] is not None and measure in results["arms"]["full"]["path"]
    assert results["arms"]["full"]["end"]["gold_share"]["high"] < 0  # the gold answer lost its share
    assert results["contrasts"][0]["gold_share"]["verdict"] == "keeps more"
    assert results["base"]["gold_share"] <= 0 and 0 <= results["base"]["mc_norm"] <= 100
    assert list(results["length_only"]["per_relation"]) == ["capital", "currency"]
    lost = {name: arm["lost"]["gold_share"] for name, arm in results["regime"]["arms"].items()}
    assert lost == {"full": True, "adapter": False}

    by_arm = {"adapter": [points["adapter-s0"], points["adapter-s1"]], "full": [points["full-s0"]]}
    arms = {name: arm_data(base, seeds, lengths, range(len(seeds))) for name, seeds in by_arm.items()}
    draws = Draws.make(len(probe.facts), len(probe.tasks), config.score.bootstrap, config.seed)
    alone = json.loads(json.dumps(equal_skill(arms, {}, [("adapter", "full")], ["gold_logprob", "mc"],
                                              list(config.score.levels), draws)))
    assert {m: results["equal_skill"][m] for m in alone} == alone  # the new measures move no old number

    results |= {"lab": {"model": "made-up", "sources": ["lab.yaml"], "runs": 3, "seconds": 1.0},
                "mix": {"total": 16, "knowledge": 1}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    render(results, tmp_path)
    check_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert text.count("multiple choice, length-normalised (lm-eval acc_norm) (points)") == 4  # equal skill x3, end
    assert text.count("gold log-probability normalised over the choices (nats)") == 4
    assert "## Does length alone predict the choice? (base model)" in text
