"""What a benchmark is: typed examples with references, a metric and a prompt style.

Every built-in benchmark is built offline from installed packages and split deterministically
into train and test by a hash of the example id (or of its ``group``), so the same example always
lands on the same side whatever else the benchmark holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from loramoe.errors import UsageError

Metric = Literal["qa", "rouge", "translation", "accuracy", "lm_loss"]
"""qa: exact match and token F1 over aliases; rouge: ROUGE-L; translation: chrF and BLEU;
accuracy: exact label match; lm_loss: per-token cross-entropy and perplexity on ``text``."""

PromptStyle = Literal["completion", "chat"]


@dataclass(frozen=True)
class Example:
    id: str
    """Stable and unique within its benchmark, e.g. ``capital/France/0``."""
    prompt: str
    """The request as a user would write it (chat style); for lm_loss, the text itself."""
    answers: tuple[str, ...] = ()
    """Accepted references, canonical first (aliases after it)."""
    completion: str | None = None
    """The same request as a text to continue (``The capital of France is``), for completion style."""
    subject: str | None = None
    """The fact's subject (``France``), for overlap filtering; None for non-fact examples."""
    relation: str | None = None
    """The fact's relation (``capital``); None for non-fact examples."""
    choices: tuple[str, ...] = ()
    """The allowed labels of a classification example."""
    group: str | None = None
    """Examples of one group land on the same side of the split (the phrasings of one fact, the
    tasks over one paragraph), so no test item is a rewording of a training item; None: the id."""
    context: str | None = None
    """The passage a task example asks about (a paragraph), without the request around it, so
    other phrasings of the request can be built (``to_training_records``); None for questions."""


@dataclass
class Benchmark:
    name: str
    """e.g. ``knowledge/capital``, ``task/translation-de``."""
    type: str
    """The sample type training data of this kind carries (``knowledge``, ``task``, ``text``)."""
    metric: Metric
    prompt_style: PromptStyle
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)


def split_of(example_id: str, test_share: float, seed: int = 0) -> str:
    """``"test"`` or ``"train"``, by a hash of the id: deterministic, independent of order."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_share else "train"


def _rank(example: Example, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}:rank:{example.id}".encode()).digest()


def take(examples: Iterable[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """At most ``limit`` examples, chosen by a hash of their ids (so a smaller limit takes a subset
    of a larger one) and returned in their original order; all of them when ``limit`` is None."""
    if limit is not None and limit < 0:
        raise UsageError(f"limit must be at least 0, got {limit}")
    examples = list(examples)
    if limit is None or limit >= len(examples):
        return examples
    chosen = {example.id for example in sorted(examples, key=lambda e: _rank(e, seed))[:limit]}
    return [example for example in examples if example.id in chosen]


def split(name: str, examples: Iterable[Example], *, test_share: float, seed: int = 0,
          limit: int | None = None) -> tuple[list[Example], list[Example]]:
    """``(train, test)`` by ``split_of`` over each example's group (or id), each capped by ``take``.
    Raises on a repeated id: ids name items in reports and in the overlap filter."""
    if not 0.0 <= test_share <= 1.0:
        raise UsageError(f"{name}: test_share must be in [0, 1], got {test_share}")
    train: list[Example] = []
    test: list[Example] = []
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise UsageError(f"{name}: example id '{example.id}' is not unique")
        seen.add(example.id)
        side = split_of(example.group or example.id, test_share, seed)
        (test if side == "test" else train).append(example)
    return take(train, limit, seed), take(test, limit, seed)
