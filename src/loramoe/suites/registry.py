"""The built-in suites by name: ``knowledge`` (world knowledge, closed-book QA), ``tasks``
(downstream tasks) and ``lm-loss`` (general text), each a list of benchmarks built offline.

Default test shares: 0.5 for knowledge and general text (facts are few, and the test side is what
is measured), 0.2 for tasks (the train side feeds the instruction mix). ``limit`` caps each side
of each benchmark (``base.take``: a smaller limit picks a subset of a larger one); ``seed`` moves
the train/test split and the limit's choice, never the held-out text pool (``wiki.pool_of``).
"""

from __future__ import annotations

from loramoe.errors import UsageError
from loramoe.suites.base import Benchmark
from loramoe.suites.fanoutqa import fanoutqa_benchmark
from loramoe.suites.knowledge import RELATIONS, knowledge_benchmarks
from loramoe.suites.translation import LANGUAGES, translation_benchmarks
from loramoe.suites.wiki import TEMPLATES as WIKI_TASKS
from loramoe.suites.wiki import text_benchmark, wiki_task_benchmarks

BENCHMARKS: dict[str, tuple[str, ...]] = {
    "knowledge": (*(f"knowledge/{relation}" for relation in RELATIONS), "knowledge/fanoutqa"),
    "tasks": (*(f"task/{task}" for task in WIKI_TASKS), *(f"task/translation-{lang}" for lang in LANGUAGES)),
    "lm-loss": ("text/wikipedia",),
}
"""Suite -> the names of its benchmarks, in the order ``load_suite`` returns them."""

ALIASES = {"world-knowledge": "knowledge", "task": "tasks", "downstream": "tasks", "text": "lm-loss",
           "lm_loss": "lm-loss", "general-text": "lm-loss"}
DEFAULT_TEST_SHARE = {"knowledge": 0.5, "tasks": 0.2, "lm-loss": 0.5}


def suite_names() -> list[str]:
    return list(BENCHMARKS)


def benchmark_names(suite: str | None = None) -> list[str]:
    """Every built-in benchmark's name, or one suite's; known without building any data."""
    suites = [canonical_suite(suite)] if suite else list(BENCHMARKS)
    return [name for s in suites for name in BENCHMARKS[s]]


def canonical_suite(name: str) -> str:
    """A suite name or alias -> the suite name; a clear error for anything else."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in BENCHMARKS:
        known = ", ".join([*BENCHMARKS, *ALIASES])
        raise UsageError(f"unknown suite '{name}'; known suites: {known}; or a benchmark name: "
                         f"{', '.join(benchmark_names())}")
    return key


def load_suite(name: str, *, limit: int | None = None, seed: int = 0, test_share: float | None = None,
               min_population: int | None = None, templates: int = 1) -> list[Benchmark]:
    """The benchmarks of a suite (``knowledge``, ``tasks``, ``lm-loss`` or an alias), or the one
    benchmark a benchmark name (``knowledge/capital``) names, built offline.

    ``test_share`` overrides the suite's default; ``min_population`` (countries with at least
    that many people) and ``templates`` (phrasings per fact) apply to the country relations of
    the knowledge suite only."""
    if name in benchmark_names():
        return [load_benchmark(name, limit=limit, seed=seed, test_share=test_share,
                               min_population=min_population, templates=templates)]
    suite = canonical_suite(name)
    if suite != "knowledge" and (min_population is not None or templates != 1):
        raise UsageError(f"min_population and templates apply to the knowledge suite, not '{suite}'")
    share = DEFAULT_TEST_SHARE[suite] if test_share is None else test_share
    if suite == "knowledge":
        return [*knowledge_benchmarks(test_share=share, seed=seed, limit=limit, min_population=min_population,
                                      templates=templates),
                fanoutqa_benchmark(test_share=share, seed=seed, limit=limit)]
    if suite == "tasks":
        return [*wiki_task_benchmarks(test_share=share, seed=seed, limit=limit),
                *translation_benchmarks(test_share=share, seed=seed, limit=limit)]
    return [text_benchmark(test_share=share, seed=seed, limit=limit)]


def load_benchmark(name: str, *, limit: int | None = None, seed: int = 0, test_share: float | None = None,
                   min_population: int | None = None, templates: int = 1) -> Benchmark:
    """One built-in benchmark by name (``benchmark_names()`` lists them)."""
    for suite, names in BENCHMARKS.items():
        if name in names:
            benchmarks = load_suite(suite, limit=limit, seed=seed, test_share=test_share,
                                    min_population=min_population, templates=templates)
            return next(b for b in benchmarks if b.name == name)
    raise UsageError(f"unknown benchmark '{name}'; known: {', '.join(benchmark_names())}")
