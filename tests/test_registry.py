"""A new benchmark is the function that makes its examples plus one entry in ``registry.BENCHMARKS``:
loading, limits, ``loramoe eval`` and the lab's mix and probe all find it there, with no other
module edited (the tests below only add the entry)."""

from __future__ import annotations

import pytest

from loramoe.evaluate.main import evaluate
from loramoe.lab.config import LabConfigError, load_config
from loramoe.lab.mix import build_mix
from loramoe.lab.probe import build_probe
from loramoe.lab.results import _generation_scores
from loramoe.suites import registry
from loramoe.suites.base import Example
from loramoe.suites.registry import (
    Entry,
    benchmark_names,
    load_benchmark,
    load_benchmarks,
    load_suite,
    mix_names,
    suite_names,
)
from tests.conftest import save_tiny


def echo_examples() -> list[Example]:
    """Say a word back: words the tiny test tokenizer knows (w0 ... w95)."""
    return [Example(id=f"echo/{i}", prompt=f"w{i} w{i}", answers=(f"w{i}",), completion=f"w{i} w{i}")
            for i in range(2, 62)]


ECHO = Entry("echoes", "task", "qa", "chat", 0.5, echo_examples, main="contains", correct="contains", mix="task")


@pytest.fixture
def echo(monkeypatch):
    monkeypatch.setitem(registry.BENCHMARKS, "task/echo", ECHO)


def test_a_new_benchmark_loads_by_name_and_by_its_suite_with_its_limit(echo):
    assert suite_names()[-1] == "echoes" and benchmark_names("echoes") == ["task/echo"] == benchmark_names()[-1:]
    bench = load_benchmark("task/echo")
    assert (bench.name, bench.type, bench.metric, bench.prompt_style) == ("task/echo", "task", "qa", "chat")
    assert len(bench.train) + len(bench.test) == 60 and bench.train and bench.test
    assert [b.name for b in load_suite("echoes")] == [b.name for b in load_suite("task/echo")] == ["task/echo"]
    assert [len(b.test) for b in load_benchmarks("echoes", {"echoes": 3})] == [3]
    both = load_benchmarks("task/echo,lm-loss", {"echoes": 4, "task/echo": 2, "lm-loss": 1})
    assert [(b.name, len(b.test)) for b in both] == [("task/echo", 2), ("text/wikipedia", 1)]
    with pytest.raises(ValueError, match="apply to the knowledge suite, not 'echoes'"):
        load_suite("echoes", templates=2)


def test_eval_scores_a_new_benchmark_by_its_main_score_and_counts_its_right_answers(echo, tmp_path):
    save_tiny(tmp_path / "model")
    model = str(tmp_path / "model")
    results = evaluate(model=model, base_model=model, vs_base=True, suite="echoes", limit={"echoes": 3},
                       output=tmp_path / "eval", max_new_tokens=2, batch_size=4)
    entry = results["benchmarks"]["task/echo"]
    assert entry["metric"] == "qa" and entry["test_items"] == len(entry["items"]) == 3
    assert ECHO.main in entry["scores"] and all(ECHO.correct in item for item in entry["items"])
    assert entry["change"]["questions"] == 3 and entry["change"]["lost"] == entry["change"]["gained"] == []


def test_a_new_benchmark_marked_for_the_mix_is_offered_to_the_lab(echo, tmp_path):
    assert mix_names("task")["echo"] == "task/echo" and "fanoutqa" not in mix_names("knowledge")
    path = tmp_path / "lab.yaml"
    path.write_text("mix: {records: 20, knowledge_share: 0.1, knowledge: [capital], tasks: [echo]}\n")
    config = load_config(path)
    mix = build_mix(config.mix, tmp_path / "mix", seed=0)
    assert mix.counts == {"knowledge": 2, "task": 18, "total": 20}
    answers = {e.answers[0] for e in echo_examples()}
    task_records = [r for r in mix.path.read_text().splitlines() if '"type": "task"' in r]
    assert len(task_records) == 18 and all(any(f'"output": "{a}"' in r for a in answers) for r in task_records)

    probe = build_probe(relations=["capital"], tasks=["echo"], mix_file=mix.path, seed=0, choices=4, task_items=5,
                        chat_items=2, generation_items=3, max_context_chars=240)
    assert probe.task_names == ["echo"] and len(probe.tasks) == 5 and {t.main for t in probe.tasks} == {"contains"}
    right = [probe.tasks[i].example.answers[0] for i in probe.generation]
    assert _generation_scores(probe, right).tolist() == [100.0] * 3

    path.write_text("mix: {knowledge: [fanoutqa]}\n")  # an entry without mix is not offered
    with pytest.raises(LabConfigError, match="mix.knowledge \\['fanoutqa'\\]"):
        load_config(path)
