"""Training records from benchmark examples, with the paper's augmentation by instruction
templates: each example can be asked in several phrasings, chosen per example by a hash.

Phrasings come from the loader that made the example: the relation's questions for knowledge
facts, the task's requests around the same paragraph for Wikipedia tasks, the translation
requests for translation pairs. Any other example (FanOutQA, a user's file) is asked through
``WRAPPERS`` around its own prompt. A built-in example's benchmark prompt is always one of its
phrasings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal, get_args

from loramoe.errors import UsageError
from loramoe.suites import knowledge, translation, wiki
from loramoe.suites.base import Example

WRAPPERS = (
    "{question}",
    "Answer the following question.\n\n{question}",
    "Question: {question}\nGive a short answer.",
    "{question} Answer briefly.",
)
"""Phrasings of an example no loader knows: its prompt, as is and inside three instructions."""


def phrasings(example: Example) -> list[str]:
    """Every instruction an example can be asked with, its own prompt's phrasing first for
    built-in examples."""
    family = example.id.split("/", 1)[0]
    if example.subject and example.relation in knowledge.TEMPLATES:
        return knowledge.phrasings(example)
    if example.subject and (example.relation or "").startswith("translation-"):
        return translation.phrasings(example)
    if example.context is not None and family in wiki.TEMPLATES:
        return wiki.phrasings(example)
    return [wrapper.format(question=example.prompt) for wrapper in WRAPPERS]


def _order(example: Example, count: int, seed: int) -> list[int]:
    def rank(index: int) -> bytes:
        return hashlib.sha256(f"{seed}:template:{example.id}:{index}".encode()).digest()
    return sorted(range(count), key=rank)


AnswerStyle = Literal["short", "sentence"]


def to_training_records(examples: Iterable[Example], *, type: str, templates_per_example: int = 1,
                        seed: int = 0, answer_style: AnswerStyle = "short") -> list[dict[str, str]]:
    """``{"instruction", "output", "type"}`` records (plus ``subject`` and ``relation`` for facts,
    which ``filter_overlap`` reads and training ignores): per example, ``templates_per_example``
    different phrasings (at most as many as it has), picked by a hash of the id and ``seed``. The
    output is the canonical answer; with ``answer_style="sentence"`` a fact's answer is the
    sentence its phrasing's completion text starts (``The capital of Cyprus is Nicosia.``), the
    form a small base model retrieves facts in (other examples keep their answer). Meant for
    train-split examples; text examples (no answer) cannot become records."""
    if templates_per_example < 1:
        raise UsageError(f"templates_per_example must be at least 1, got {templates_per_example}")
    if answer_style not in get_args(AnswerStyle):
        raise UsageError(f"answer_style must be 'short' or 'sentence', got '{answer_style}'")
    records = []
    for example in examples:
        if not example.answers:
            raise UsageError(f"example '{example.id}' has no answer to train on (text for the language-model "
                             f"loss is not instruction data)")
        options = phrasings(example)
        is_fact = example.subject and example.relation in knowledge.TEMPLATES
        outputs = (knowledge.sentence_answers(example) if answer_style == "sentence" and is_fact
                   else [example.answers[0]] * len(options))
        for index in _order(example, len(options), seed)[:templates_per_example]:
            record = {"instruction": options[index], "output": outputs[index], "type": type}
            if example.subject and example.relation:
                record.update(subject=example.subject, relation=example.relation)
            records.append(record)
    return records
