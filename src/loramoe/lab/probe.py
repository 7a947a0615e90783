"""What the lab asks every model: held-out facts as statements to complete, task items with their
reference answers, and two small sets of prompts to answer freely.

- **Facts**: the test-split facts of every relation of the mix (the split is by fact, then
  ``filter_overlap`` drops what the mix gives away; at most ``fact_items`` per relation, a seeded
  choice, where set), each as a completion-style statement
  (``The capital of Peru is``), its accepted answers, and ``choices - 1`` distractors: answers of
  the same relation (canonical spellings of other facts) that match none of its own, picked by a
  hash of the seed and the fact, so every model sees the same ones.
- **Task items**: the task benchmarks' test items whose paragraph fits the mix's
  ``max_context_chars`` (the paragraphs the mix trains on), at most ``task_items`` per task, with
  the reference answer rendered as training renders a record.
- **Chat** (``chat_items`` facts per relation) and **generation** (``generation_items`` items per
  task): the subsets answered greedily at the end of each run, what a user sees.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from loramoe.data import read_records
from loramoe.errors import UsageError
from loramoe.lab.config import LabConfig
from loramoe.suites import filter_overlap, load_benchmark
from loramoe.suites.base import Example, Metric, take
from loramoe.suites.registry import BENCHMARKS, mix_names
from loramoe.suites.text import normalize_answer


@dataclass(frozen=True)
class Fact:
    example: Example
    """The held-out fact (its chat question is ``example.prompt``)."""
    statement: str
    aliases: tuple[str, ...]
    distractors: tuple[str, ...]


@dataclass(frozen=True)
class TaskItem:
    example: Example
    task: str
    metric: Metric
    main: str
    """The item score that sums up a free answer (its benchmark's ``main``)."""


@dataclass
class Probe:
    facts: list[Fact]
    tasks: list[TaskItem]
    chat: list[int]
    """Indices of ``facts`` asked in chat at the end of each run."""
    generation: list[int]
    """Indices of ``tasks`` answered freely at the end of each run."""
    removed_by_overlap: int

    def key(self) -> str:
        """A hash of everything asked, to cache scores by."""
        content = {"facts": [(f.example.id, f.statement, f.aliases, f.distractors) for f in self.facts],
                   "tasks": [(t.example.id, t.example.prompt, t.example.answers[0]) for t in self.tasks],
                   "chat": self.chat, "generation": self.generation}
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()

    @property
    def relations(self) -> list[str]:
        return list(dict.fromkeys(f.example.relation or "" for f in self.facts))

    @property
    def task_names(self) -> list[str]:
        return list(dict.fromkeys(t.task for t in self.tasks))


def _rank(seed: int, *parts: str) -> bytes:
    return hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()


def distractors(example: Example, pool: list[str], count: int, seed: int) -> tuple[str, ...]:
    """``count`` answers from ``pool`` that match none of the example's answers (after answer
    normalisation) nor its subject, by a hash of the seed, the example and the answer."""
    own = {normalize_answer(a) for a in example.answers} | {normalize_answer(example.subject or "")}
    candidates = [a for a in dict.fromkeys(pool) if normalize_answer(a) not in own]
    if len(candidates) < count:
        raise UsageError(f"{example.id}: only {len(candidates)} other answers of its relation to choose "
                         f"{count} distractors from")
    return tuple(sorted(candidates, key=lambda a: _rank(seed, example.id, a))[:count])


def build_probe(*, relations: list[str], tasks: list[str], mix_file: Path, seed: int, choices: int,
                task_items: int | None, chat_items: int, generation_items: int,
                max_context_chars: int, fact_items: int | None = None) -> Probe:
    """The lab's questions (see the module docstring); ``mix_file`` is the training data whose facts
    are kept out."""
    if choices < 2:
        raise UsageError(f"score.choices must be at least 2, got {choices}")
    records, _ = read_records([str(mix_file)])
    facts: list[Fact] = []
    chat: list[int] = []
    removed = 0
    for relation in relations:
        bench = load_benchmark(mix_names("knowledge")[relation], seed=seed)
        pool = [e.answers[0] for e in bench.train + bench.test]
        kept, report = filter_overlap(bench.test, records)
        removed += report.total - report.kept
        kept = take(kept, fact_items, seed)
        first = len(facts)
        for example in kept:
            facts.append(Fact(example, example.completion or example.prompt, example.answers,
                              distractors(example, pool, choices - 1, seed)))
        asked = {e.id for e in take(kept, chat_items, seed)}
        chat += [i for i in range(first, len(facts)) if facts[i].example.id in asked]
    items: list[TaskItem] = []
    generation: list[int] = []
    for task in tasks:
        bench = load_benchmark(mix_names("task")[task], seed=seed)
        short = [e for e in bench.test if e.context is None or len(e.context) <= max_context_chars]
        chosen = take(short, task_items, seed)
        first = len(items)
        items += [TaskItem(e, task, bench.metric, BENCHMARKS[bench.name].main) for e in chosen]
        answered = {e.id for e in take(chosen, generation_items, seed)}
        generation += [i for i in range(first, len(items)) if items[i].example.id in answered]
    if not facts or not items:
        raise UsageError("the probe holds no held-out fact or no task item; check mix.knowledge and mix.tasks")
    return Probe(facts, items, chat, generation, removed)


def lab_probe(settings: LabConfig, mix_file: Path) -> Probe:
    """The probe ``loramoe lab`` asks with ``settings``, given the mix it built (whose facts it keeps out)."""
    s = settings.score
    return build_probe(relations=settings.mix.knowledge, tasks=settings.mix.tasks, mix_file=mix_file,
                       seed=settings.seed, choices=s.choices, task_items=s.task_items, chat_items=s.chat_items,
                       generation_items=s.generation_items, max_context_chars=settings.mix.max_context_chars,
                       fact_items=s.fact_items)
