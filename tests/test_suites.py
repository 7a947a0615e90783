"""The built-in benchmarks: offline data, deterministic splits and limits, known facts, the held-out
text pool, and text normalisation."""

from __future__ import annotations

import pytest

from loramoe.suites import benchmark_names, load_suite, normalize_answer, suite_names
from loramoe.suites.base import Example, split, take
from loramoe.suites.knowledge import knowledge_examples
from loramoe.suites.registry import KNOWLEDGE, LM_LOSS, TASKS, load_benchmark
from loramoe.suites.sources import MissingDataError, package_dir
from loramoe.suites.translation import translation_examples
from loramoe.suites.wiki import first_year

EXPECTED = {
    "knowledge": ("knowledge", "qa"), "task/summarization": ("task", "rouge"), "task/topic": ("task", "accuracy"),
    "task/extraction": ("task", "qa"), "task/translation": ("task", "translation"), "text": ("text", "lm_loss"),
}


@pytest.fixture(scope="module")
def suites():
    return {name: load_suite(name) for name in suite_names()}


def _expected(name: str) -> tuple[str, str]:
    return next(value for prefix, value in EXPECTED.items() if name.startswith(prefix))


def test_every_benchmark_is_complete_and_well_formed(suites):
    benchmarks = [b for bs in suites.values() for b in bs]
    assert [b.name for b in benchmarks] == benchmark_names()
    for bench in benchmarks:
        assert (bench.type, bench.metric) == _expected(bench.name), bench.name
        assert bench.train and bench.test, bench.name
        ids = [e.id for e in bench.train + bench.test]
        assert len(ids) == len(set(ids)), f"{bench.name}: repeated ids"
        train_groups = {e.group or e.id for e in bench.train}
        assert not train_groups & {e.group or e.id for e in bench.test}, f"{bench.name}: a group on both sides"
        for example in bench.train + bench.test:
            assert example.prompt.strip(), example.id
            if bench.metric == "lm_loss":
                assert example.answers == ()
                continue
            assert example.answers and all(a and a.strip() == a for a in example.answers), example.id
            assert len({normalize_answer(a) for a in example.answers}) == len(example.answers), example.id
            assert example.completion, example.id
            if bench.metric == "accuracy":
                assert example.answers[0] in example.choices
            if bench.type == "knowledge" and bench.name != "knowledge/fanoutqa":
                assert example.subject and example.relation
                assert normalize_answer(example.subject) in normalize_answer(example.prompt)


def test_sizes_match_the_data(suites):
    sizes = {b.name: len(b.train) + len(b.test) for bs in suites.values() for b in bs}
    assert 220 <= sizes["knowledge/capital"] <= 250  # every country and territory with a capital
    assert sizes["knowledge/fanoutqa"] > 1000
    assert sizes["task/summarization"] > 7000 and sizes["task/topic"] > 6500
    assert all(sizes[f"task/translation-{lang}"] > 150 for lang in ("de", "es", "fr"))
    shares = {b.name: len(b.test) / (len(b.train) + len(b.test)) for bs in suites.values() for b in bs}
    assert 0.4 < shares["knowledge/capital"] < 0.6 and 0.15 < shares["task/summarization"] < 0.25


def test_splits_and_limits_are_deterministic():
    first, again = load_suite(KNOWLEDGE), load_suite(KNOWLEDGE)
    assert [(b.train, b.test) for b in first] == [(b.train, b.test) for b in again]
    other_seed = load_benchmark("knowledge/capital", seed=1)
    assert {e.id for e in other_seed.test} != {e.id for e in first[0].test}
    small, large = load_benchmark("knowledge/capital", limit=10), load_benchmark("knowledge/capital", limit=30)
    assert len(small.train) == len(small.test) == 10
    assert {e.id for e in small.test} <= {e.id for e in large.test} <= {e.id for e in first[0].test}
    assert load_benchmark("knowledge/capital", limit=10).test == small.test
    everything = load_benchmark("knowledge/capital", test_share=1.0)
    assert not everything.train and len(everything.test) == len(first[0].train) + len(first[0].test)


def test_split_helpers_refuse_bad_input():
    examples = [Example(id="a", prompt="x"), Example(id="a", prompt="y")]
    with pytest.raises(ValueError, match="'a' is not unique"):
        split("bench", examples, test_share=0.5)
    with pytest.raises(ValueError, match="test_share"):
        split("bench", examples[:1], test_share=1.5)
    assert take(examples[:1], 0) == [] and take(examples[:1], None) == examples[:1]


def test_templates_keep_a_fact_on_one_side():
    bench = load_benchmark("knowledge/capital", templates=4)
    sides = {}
    for side, examples in (("train", bench.train), ("test", bench.test)):
        for example in examples:
            assert sides.setdefault(example.group, side) == side
    france = [e for e in bench.train + bench.test if e.subject == "France"]
    assert len(france) == 4 and len({e.prompt for e in france}) == 4


def _fact(relation: str, subject: str, **options) -> Example:
    return next(e for e in knowledge_examples(relation, **options) if e.subject == subject)


def test_known_facts_and_aliases():
    france = _fact("capital", "France")
    assert france.prompt == "What is the capital of France?"
    assert france.completion == "The capital of France is" and france.answers[0] == "Paris"
    assert {"Washington D.C.", "Washington"} <= set(_fact("capital", "United States").answers)
    assert {"Kyiv", "Kiev"} <= set(_fact("capital", "Ukraine").answers)
    assert {"Bogotá", "Bogota"} <= set(_fact("capital", "Colombia").answers)
    assert {"Pretoria", "Cape Town", "Bloemfontein"} <= set(_fact("capital", "South Africa").answers)
    assert "France" in _fact("borders", "Spain").answers and "Spain" in _fact("borders", "France").answers
    assert "USA" in _fact("borders", "Canada").answers  # neighbours by any of their names
    assert not any(len(a) <= 3 and a.isupper() and a != "USA" for a in _fact("borders", "France").answers)
    assert {"French", "German", "Italian"} <= set(_fact("language", "Switzerland").answers)
    assert _fact("continent", "Brazil").answers[0] == "South America"
    assert {"Euro"} <= set(_fact("currency", "France").answers) and "Yen" in _fact("currency", "Japan").answers
    assert _fact("demonym", "France").answers == ("French",)
    assert _fact("capital", "The Bahamas").prompt == "What is the capital of the Bahamas?"
    german = {e.subject: e.answers for e in translation_examples("de")}
    assert german["France"][0] == "Frankreich" and german["Vienna"] == ("Wien",)
    assert "Kabul" not in german  # a pair whose target is its source tests copying, not translation


def test_min_population_keeps_the_large_countries():
    large = knowledge_examples("capital", min_population=5_000_000)
    assert 110 <= len(large) <= 130  # docs/method.md, section 5: 121 countries over 5M people
    assert "France" in {e.subject for e in large} and "Monaco" not in {e.subject for e in large}


def test_text_is_held_out_from_every_task(suites):
    task_paragraphs = {e.context for b in suites[TASKS] if b.name.startswith("task/") for e in b.train + b.test}
    text = suites[LM_LOSS][0]
    assert not task_paragraphs & {e.prompt for e in text.train + text.test}
    other_seed = load_suite(LM_LOSS, seed=3)[0]  # the seed moves the split, not the pool
    assert {e.id for e in other_seed.train + other_seed.test} == {e.id for e in text.train + text.test}


def test_wikipedia_tasks_agree_on_the_side_of_an_article(suites):
    sides = {}
    for bench in suites[TASKS]:
        for side, examples in (("train", bench.train), ("test", bench.test)):
            for example in examples:
                if example.group and example.group.startswith("wiki/"):
                    assert sides.setdefault(example.group, side) == side


def test_first_year_only_takes_plain_years():
    assert first_year("Founded in 1556, it grew; by 1600 it was large.") == "1556"
    assert first_year("It began in the 1960s and lasted until 1975.") is None
    assert first_year("Around 1500 BCE the first farms appeared.") is None
    assert first_year("The range spans 3000 km.") is None and first_year("No years here.") is None


def test_normalize_answer_is_triviaqa_normalisation():
    assert normalize_answer("The Capital_of France!") == "capital of france"
    assert normalize_answer("“Saint-Denis” ‘a’ an Apple") == "saint denis apple"
    assert normalize_answer("Washington, D.C.") == normalize_answer("washington d c")
    assert normalize_answer("Bogotá") != normalize_answer("Bogota")


def test_suite_names_and_errors():
    assert suite_names() == [KNOWLEDGE, TASKS, LM_LOSS] == ["knowledge", "tasks", "lm-loss"]
    assert [b.name for b in load_suite("text")] == ["text/wikipedia"]
    assert [b.name for b in load_suite("knowledge/borders", limit=3)] == ["knowledge/borders"]
    assert benchmark_names(TASKS)[0] == "task/summarization"
    with pytest.raises(ValueError, match="unknown suite 'nope'.*knowledge"):
        load_suite("nope")
    with pytest.raises(ValueError, match="knowledge suite"):
        load_suite(TASKS, min_population=10)
    with pytest.raises(ValueError, match="templates must be between 1 and 4"):
        load_suite(KNOWLEDGE, templates=9)
    with pytest.raises(MissingDataError, match="pip install"):
        package_dir("loramoe_no_such_package")
