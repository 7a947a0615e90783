"""Removing test items that training data gives away, as the paper evaluates closed-book QA only
on test questions that do not overlap the training set.

``filter_overlap(test, train, ngram=8)`` compares every test item with every training item.
Training items are ``Example``s, or training records in the loramoe data format (dicts of the
``{"instruction", "input"?, "output"}`` or ``{"messages": [...]}`` shapes, or ``loramoe.data.Record``s
from ``read_records``), so a user's training files can be checked as they are. An item has
requests (an example's prompt and its completion text; a record's user messages, and its
``instruction`` and ``input`` fields) and answers (an example's accepted answers, of which a
training example contributes its canonical one; a record's assistant messages). Text is compared
after ``normalize_answer`` (lowercase, punctuation and articles dropped), as runs of whole words.

A test item is removed for the first of these reasons that holds, and counted under it:

``question``
    One of its requests equals a training request.
``fact``
    It asks the same fact, ``(subject, relation)``, as a training example, or as a record with
    ``subject`` and ``relation`` fields (``to_training_records`` writes them).
``ngram``
    Training data holds its answer in the same context. Either
    (a) a training request followed by its answer contains an *answer-bearing n-gram* of the
    test item: one of its accepted answers, whole, preceded by the last words of one of its
    requests, ``ngram`` words in all (fewer when the request is shorter). For a fact, the
    request words reach back to its subject at least ("Turks and Caicos Islands is located on
    the continent of", not "Islands is located on the continent of", which "British Virgin
    Islands" shares); when they are the whole request, the training request must start with
    them ("Samoa is ..." is not "American Samoa is ..."); and at least one of them must not be
    template text: a word in a run of ``TEMPLATE_RUN`` words that more than ``COMMON``
    training requests hold ("first year mentioned in"), since an instruction shared by a whole
    task followed by a frequent answer says nothing about one item. An answer of ``ngram``
    words or more is an answer-bearing n-gram by itself: a training answer holding any
    ``ngram`` consecutive words of it gives it away; or
    (b) the test item is a fact and a training answer holds its subject and one of its accepted
    answers as separate runs fewer than ``ngram`` words apart ("Waterfalls on the border of
    Argentina and Brazil" gives away a country bordering Argentina).

Answers are what training teaches (its loss covers answers only), so a training paragraph that
mentions Paris and France in a request gives nothing away by itself. Not caught: paraphrases that
share no answer-bearing n-gram ("Who directed X?" / "Who was the director of X?" with n = 8); a
smaller ``ngram`` catches more and risks removing different questions that share a phrase and an
answer.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loramoe.data import Record, read_records
from loramoe.errors import UsageError
from loramoe.suites.base import Example
from loramoe.suites.text import normalize_answer

REASONS = ("question", "fact", "ngram")
TEMPLATE_RUN = 4
COMMON = 20
"""A run of ``TEMPLATE_RUN`` words held by more training requests than this is template text."""


@dataclass
class OverlapReport:
    total: int
    """Test items given."""
    kept: int
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    """Items removed per reason (every reason present, 0 when none)."""
    removed_ids: dict[str, str] = field(default_factory=dict)
    """Removed item id -> its reason."""

    def __str__(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.removed.items())
        return f"kept {self.kept} of {self.total} test items (removed: {reasons})"


@dataclass(frozen=True)
class _Item:
    requests: tuple[str, ...]
    answers: tuple[str, ...]
    pairs: tuple[str, ...]
    """Each request followed by its answer."""
    fact: tuple[str, str] | None


def _fact(subject: object, relation: object) -> tuple[str, str] | None:
    if isinstance(subject, str) and isinstance(relation, str) and subject and relation:
        return normalize_answer(subject), relation
    return None


def _requests(example: Example) -> list[str]:
    return [example.prompt] + ([example.completion] if example.completion else [])


def _from_example(example: Example) -> _Item:
    requests = tuple(map(normalize_answer, _requests(example)))
    answers = tuple(normalize_answer(a) for a in example.answers[:1])
    return _Item(requests, answers, tuple(f"{r} {a}" for r in requests for a in answers),
                 _fact(example.subject, example.relation))


def _from_record(record: Record, raw: Mapping[str, Any]) -> _Item:
    messages = record.messages
    turns = [(a["content"], b["content"]) for a, b in itertools.pairwise(messages)
             if (a["role"], b["role"]) == ("user", "assistant")]
    turns += [(raw[key], messages[-1]["content"]) for key in ("instruction", "input") if isinstance(raw.get(key), str)]
    turns = [(normalize_answer(request), normalize_answer(answer)) for request, answer in turns]
    return _Item(tuple(r for r, _ in turns), tuple(a for _, a in turns), tuple(f"{r} {a}" for r, a in turns),
                 _fact(raw.get("subject"), raw.get("relation")))


def _items(train: Sequence[Example | Mapping[str, Any] | Record]) -> list[_Item]:
    raw = [dict(item) for item in train if isinstance(item, Mapping)]
    parsed = iter(read_records([raw])[0]) if raw else iter(())  # validates, and gives messages either shape
    items = []
    for item in train:
        if isinstance(item, Example):
            items.append(_from_example(item))
        elif isinstance(item, Record):
            items.append(_from_record(item, {}))
        elif isinstance(item, Mapping):
            items.append(_from_record(next(parsed), item))
        else:
            raise TypeError(f"training items are Examples, records (dicts) or loramoe.data.Records, "
                            f"not {type(item).__name__}")
    return items


class _Texts:
    """One text per training item (its parts joined by " | ", which ``normalize_answer`` never
    leaves in a part, so no run of words spans two parts) and the items each word occurs in."""

    def __init__(self, parts: list[tuple[str, ...]]):
        self.texts = [f" {' | '.join(p)} " for p in parts]
        self.postings: dict[str, set[int]] = {}
        for i, text in enumerate(self.texts):
            for word in set(text.split()):
                self.postings.setdefault(word, set()).add(i)

    def candidates(self, words: list[str]) -> set[int]:
        """The items holding every one of ``words``, in any order: a superset of those holding
        them as a run."""
        found: set[int] | None = None
        for posting in sorted((self.postings.get(word, set()) for word in set(words)), key=len):
            found = posting if found is None else found & posting
            if not found:
                break
        return found or set()

    def more_than(self, words: list[str], limit: int, *, anchored: bool = False) -> bool:
        """Whether more than ``limit`` items hold this run of words (``anchored``: at the start
        of one of their parts)."""
        candidates = self.candidates(words)
        if len(candidates) <= limit:
            return False
        run, found = " ".join(words), 0
        for i in candidates:
            text = self.texts[i]
            found += (f"| {run} " in text or text.startswith(f" {run} ")) if anchored else f" {run} " in text
            if found > limit:
                return True
        return False


class _Index:
    def __init__(self, items: list[_Item], n: int):
        self.n = n
        self.requests = {request for item in items for request in item.requests}
        self.facts = {item.fact for item in items if item.fact}
        self.request_texts = _Texts([item.requests for item in items])
        self.pair_texts = _Texts([item.pairs for item in items])
        self.answer_texts = _Texts([item.answers for item in items])
        self._common: dict[str, bool] = {}

    def is_common(self, words: list[str]) -> bool:
        key = " ".join(words)
        if key not in self._common:
            self._common[key] = self.request_texts.more_than(words, COMMON)
        return self._common[key]

    def content_mask(self, words: list[str], first: int) -> list[bool]:
        """True for the request words from index ``first`` on that are not template text (the
        words before ``first`` are not looked at: only the end of a request meets the answer)."""
        size = min(TEMPLATE_RUN, len(words))
        content = [True] * len(words)
        for start in range(max(0, first - size + 1), len(words) - size + 1):
            if self.is_common(words[start:start + size]):
                content[start:start + size] = [False] * size
        return content

    def answer_bearing(self, request: str, answer: str, subject: str) -> bool:
        """Rule (a) for one request and one accepted answer."""
        question, reply = request.split(), answer.split()
        if len(reply) >= self.n:
            runs = (reply[i:i + self.n] for i in range(len(reply) - self.n + 1))
            return any(self.answer_texts.more_than(run, 0) for run in runs)
        first = max(0, len(question) - (self.n - len(reply)))
        named = _spans(question, subject.split()) if subject else []
        first = min(first, named[-1][0]) if named else first
        content = self.content_mask(question, first)
        if not any(content[first:]):
            return False
        return self.pair_texts.more_than(question[first:] + reply, 0, anchored=first == 0)

    def told(self, subject: str, answer: str) -> bool:
        """Rule (b): one training answer holds both, as separate runs fewer than n words apart."""
        first, second = subject.split(), answer.split()
        for i in self.answer_texts.candidates(first) & self.answer_texts.candidates(second):
            for part in self.answer_texts.texts[i].split(" | "):
                words = part.split()
                for a in _spans(words, first):
                    for b in _spans(words, second):
                        if 0 <= max(b[0] - a[1], a[0] - b[1]) < self.n:  # the words between; < 0 if they overlap
                            return True
        return False


def _spans(words: list[str], run: list[str]) -> list[tuple[int, int]]:
    return [(i, i + len(run)) for i, word in enumerate(words) if word == run[0] and words[i:i + len(run)] == run]


def _reason(example: Example, index: _Index) -> str | None:
    requests = [normalize_answer(request) for request in _requests(example)]
    if any(request in index.requests for request in requests):
        return "question"
    if _fact(example.subject, example.relation) in index.facts:
        return "fact"
    answers = [a for a in map(normalize_answer, example.answers) if a]
    subject = normalize_answer(example.subject or "")
    if any(index.answer_bearing(request, answer, subject) for request in requests if request for answer in answers):
        return "ngram"
    if subject and any(index.told(subject, answer) for answer in answers):
        return "ngram"
    return None


def filter_overlap(test: Sequence[Example], train: Sequence[Example | Mapping[str, Any] | Record], *,
                   ngram: int = 8) -> tuple[list[Example], OverlapReport]:
    """The test items that no training item gives away (see the module docstring for the three
    rules), in their order, and a report of how many each rule removed. Records are validated as
    ``loramoe.data.read_records`` validates them (a bad one raises ``DataError``)."""
    if ngram < 1:
        raise UsageError(f"ngram must be at least 1, got {ngram}")
    index = _Index(_items(train), ngram)
    kept: list[Example] = []
    report = OverlapReport(total=len(test), kept=0)
    for example in test:
        reason = _reason(example, index)
        if reason is None:
            kept.append(example)
        else:
            report.removed[reason] += 1
            report.removed_ids[example.id] = reason
    report.kept = len(kept)
    return kept, report
