"""``knowledge/fanoutqa``: FanOutQA's single-answer sub-questions as hard closed-book QA.

FanOutQA (dev set; the test set ships without answers) splits multi-hop questions into sub-questions
that each one Wikipedia article answers ("Who was the director of Gone with the Wind?"). Kept:
the leaves of the decompositions whose answer is one string (not a number, a list or a table,
whose format would make exact scoring unfair), without sub-questions that point back at an
earlier answer ("... in it?"), whose answer changes with the date they are asked ("How old is
...", "... currently ..."), or whose answer is a sentence (more than 8 words, or two parts:
"Born in ...; studied at ..."). A question asked in several decompositions is kept once, with
every answer it was given as an accepted answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from loramoe.suites import sources
from loramoe.suites.base import Example
from loramoe.suites.text import normalize_answer, strip_accents, unique

_REFERS_BACK = re.compile(r"\b(in it|of it|of them|these|those|the above|each of)\b", re.IGNORECASE)
_DATED = re.compile(r"^how old\b|\b(current|currently|now|today)\b", re.IGNORECASE)
MAX_ANSWER_WORDS = 8


def _leaves(question: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for sub in question.get("decomposition") or []:
        if sub.get("decomposition"):
            yield from _leaves(sub)
        else:
            yield sub


def _usable(question: str, answer: str) -> bool:
    if not answer.strip() or not question:
        return False
    sentence = ";" in answer or len(answer.split()) > MAX_ANSWER_WORDS
    return not (sentence or _REFERS_BACK.search(question) or _DATED.search(question))


def fanoutqa_examples() -> list[Example]:
    """One example per distinct sub-question (by ``normalize_answer``), id ``fanoutqa/<its id>``."""
    questions: dict[str, tuple[str, str, list[str]]] = {}  # normalised question -> (id, text, answers)
    for top in sources.fanoutqa_dev():
        for leaf in _leaves(top):
            answer, text = leaf.get("answer"), " ".join(str(leaf.get("question", "")).split())
            if not isinstance(answer, str) or not _usable(text, answer):
                continue
            key = normalize_answer(text)
            entry = questions.setdefault(key, (leaf["id"], text, []))
            entry[2].extend([answer.strip(), strip_accents(answer.strip())])
    return [Example(id=f"fanoutqa/{leaf_id}", prompt=text, answers=unique(found), completion=f"Q: {text}\nA:")
            for leaf_id, text, found in questions.values()]
