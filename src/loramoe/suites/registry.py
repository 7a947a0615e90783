"""The built-in benchmarks by name (``BENCHMARKS``), each entry saying everything the commands read off
a benchmark: its suite, how its examples are made, its metric and main score, and whether the lab's
mix may train on it. A new benchmark is the module that makes its examples plus one entry here.

The suites: ``knowledge`` (world knowledge, closed-book QA), ``tasks`` (downstream tasks) and
``lm-loss`` (general text). Default test shares: 0.5 for knowledge and general text (facts are few,
and the test side is what is measured), 0.2 for tasks (the train side feeds the instruction mix).
``limit`` caps each side of each benchmark (``base.take``: a smaller limit picks a subset of a
larger one); ``seed`` moves the train/test split and the limit's choice, never the held-out text
pool (``wiki.pool_of``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from loramoe.errors import UsageError
from loramoe.suites.base import Benchmark, Example, Metric, PromptStyle, split
from loramoe.suites.fanoutqa import fanoutqa_examples
from loramoe.suites.knowledge import RELATIONS, knowledge_examples
from loramoe.suites.translation import LANGUAGES, translation_examples
from loramoe.suites.wiki import task_examples, text_examples

KNOWLEDGE, TASKS, LM_LOSS = "knowledge", "tasks", "lm-loss"
"""The built-in suites."""

MixRole = Literal["knowledge", "task"]


@dataclass(frozen=True)
class Entry:
    suite: str
    type: str
    """``Benchmark.type``: the sample type of training records made from it."""
    metric: Metric
    prompt_style: PromptStyle
    test_share: float
    """The share of examples on the test side unless a caller gives one."""
    examples: Callable[..., list[Example]]
    """Makes every example, deterministically; ``load_suite``'s options (``min_population``,
    ``templates``) that its signature names are passed on."""
    main: str
    """The score that sums it up: a key of its scores and, for a generative metric, of each item's
    scores (``metrics.per_item``: the lab scores free answers by it)."""
    correct: str | None = None
    """The item score that counts an answer right when above 0, for the facts lost and gained
    against the base model (``loramoe eval --vs-base``); None: answers are not right or wrong."""
    mix: MixRole | None = None
    """What it may feed the lab's mix, where its name after the slash names it: ``knowledge``
    (``mix.knowledge``; the test side is asked as facts with distractors drawn from the same
    benchmark's answers, so each example should be one fact with a subject and a relation) or
    ``task`` (``mix.tasks``; the test side gives the task loss and free answers); None: neither."""


def _relation(relation: str) -> Entry:
    # contains, not exact match: a small model often answers with a sentence (see loramoe.metrics)
    return Entry(KNOWLEDGE, "knowledge", "qa", "chat", 0.5, partial(knowledge_examples, relation),
                 main="contains", correct="contains", mix="knowledge")


def _task(examples: Callable[..., list[Example]], metric: Metric, main: str, correct: str | None) -> Entry:
    return Entry(TASKS, "task", metric, "chat", 0.2, examples, main=main, correct=correct, mix="task")


BENCHMARKS: dict[str, Entry] = {
    **{f"knowledge/{relation}": _relation(relation) for relation in RELATIONS},
    # no relation to draw distractors from, so not for the lab's mix
    "knowledge/fanoutqa": Entry(KNOWLEDGE, "knowledge", "qa", "chat", 0.5, fanoutqa_examples,
                                main="contains", correct="contains"),
    "task/summarization": _task(partial(task_examples, "summarization"), "rouge", "rougeL", None),
    "task/topic": _task(partial(task_examples, "topic"), "accuracy", "accuracy", "accuracy"),
    "task/extraction": _task(partial(task_examples, "extraction"), "qa", "contains", "contains"),
    # right means the exact name: chrF also credits a near miss
    **{f"task/translation-{lang}": _task(partial(translation_examples, lang), "translation", "chrf", "em")
       for lang in LANGUAGES},
    "text/wikipedia": Entry(LM_LOSS, "text", "lm_loss", "completion", 0.5, text_examples, main="cross_entropy"),
}
"""Benchmark name -> its entry; a suite lists its benchmarks in this order."""

ALIASES = {"world-knowledge": KNOWLEDGE, "task": TASKS, "downstream": TASKS, "text": LM_LOSS, "lm_loss": LM_LOSS,
           "general-text": LM_LOSS}
OPTIONS = {"min_population": None, "templates": 1}
"""``load_suite``'s options for the builders that take them, with their defaults."""


def suite_names() -> list[str]:
    return list(dict.fromkeys(entry.suite for entry in BENCHMARKS.values()))


def benchmark_names(suite: str | None = None) -> list[str]:
    """Every built-in benchmark's name, or one suite's; known without building any data."""
    suites = [canonical_suite(suite)] if suite else suite_names()
    return [name for s in suites for name, entry in BENCHMARKS.items() if entry.suite == s]


def canonical_suite(name: str) -> str:
    """A suite name or alias -> the suite name; a clear error for anything else."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in suite_names():
        known = ", ".join([*suite_names(), *ALIASES])
        raise UsageError(f"unknown suite '{name}'; known suites: {known}; or a benchmark name: "
                         f"{', '.join(benchmark_names())}")
    return key


def mix_names(role: MixRole) -> dict[str, str]:
    """The benchmarks the lab's mix may use in ``role``, by the name its settings give them."""
    return {name.split("/", 1)[-1]: name for name, entry in BENCHMARKS.items() if entry.mix == role}


def _takes(entry: Entry) -> set[str]:
    return set(OPTIONS) & set(inspect.signature(entry.examples).parameters)


def _check_options(suite: str, options: dict[str, Any]) -> None:
    """Options are refused where no benchmark of the suite takes them, rather than ignored."""
    takers = [s for s in suite_names() if any(_takes(BENCHMARKS[name]) for name in benchmark_names(s))]
    if any(value != OPTIONS[key] for key, value in options.items()) and suite not in takers:
        raise UsageError(f"{' and '.join(OPTIONS)} apply to the {' and '.join(takers)} suite, not '{suite}'")


def _build(name: str, *, limit: int | None, seed: int, test_share: float | None,
           options: dict[str, Any]) -> Benchmark:
    entry = BENCHMARKS[name]
    examples = entry.examples(**{key: options[key] for key in _takes(entry)})
    share = entry.test_share if test_share is None else test_share
    train, test = split(name, examples, test_share=share, seed=seed, limit=limit)
    return Benchmark(name, entry.type, entry.metric, entry.prompt_style, train, test)


def load_suite(name: str, *, limit: int | None = None, seed: int = 0, test_share: float | None = None,
               min_population: int | None = None, templates: int = 1) -> list[Benchmark]:
    """The benchmarks of a suite (``knowledge``, ``tasks``, ``lm-loss`` or an alias), or the one
    benchmark a benchmark name (``knowledge/capital``) names, built offline.

    ``test_share`` overrides each benchmark's default; ``min_population`` (countries with at least
    that many people) and ``templates`` (phrasings per fact) apply to the country relations of
    the knowledge suite only."""
    if name in BENCHMARKS:
        return [load_benchmark(name, limit=limit, seed=seed, test_share=test_share,
                               min_population=min_population, templates=templates)]
    suite = canonical_suite(name)
    options = {"min_population": min_population, "templates": templates}
    _check_options(suite, options)
    return [_build(n, limit=limit, seed=seed, test_share=test_share, options=options) for n in benchmark_names(suite)]


def load_benchmark(name: str, *, limit: int | None = None, seed: int = 0, test_share: float | None = None,
                   min_population: int | None = None, templates: int = 1) -> Benchmark:
    """One built-in benchmark by name (``benchmark_names()`` lists them)."""
    if name not in BENCHMARKS:
        raise UsageError(f"unknown benchmark '{name}'; known: {', '.join(benchmark_names())}")
    options = {"min_population": min_population, "templates": templates}
    _check_options(BENCHMARKS[name].suite, options)
    return _build(name, limit=limit, seed=seed, test_share=test_share, options=options)


Limit = int | dict[str, int | None] | None


def _limit_for(limit: Limit, name: str) -> int | None:
    """A suite's or benchmark's limit: a mapping names suites or benchmarks (the benchmark wins)."""
    if not isinstance(limit, dict):
        return limit
    if name in limit:
        return limit[name]
    return limit.get(BENCHMARKS[name].suite if name in BENCHMARKS else canonical_suite(name))


def load_benchmarks(suite: str, limit: Limit = None, seed: int = 0) -> list[Benchmark]:
    """The benchmarks a comma-separated list of suites and benchmark names names (``loramoe eval
    --suite``, whose options its errors name), each capped by its limit: an int for all, or a
    mapping from suite or benchmark name to a limit."""
    names = [name.strip() for name in suite.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--suite {suite!r} names nothing: give suites ({', '.join(suite_names())}) or benchmark "
                         "names, comma-separated")
    if isinstance(limit, dict):
        known = {*benchmark_names(), *suite_names()}
        unknown = sorted(key for key in limit if key not in known)
        if unknown:
            raise UsageError(f"--limit names unknown suites or benchmarks: {', '.join(unknown)}")
    return [bench for name in names for bench in load_suite(name, limit=_limit_for(limit, name), seed=seed)]
