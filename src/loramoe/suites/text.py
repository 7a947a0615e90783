"""Text normalisation shared by the overlap filter and the metrics, so "the same answer" means the
same thing when test items are filtered and when predictions are scored.

``normalize_answer`` is TriviaQA's normalisation (the one docs/method.md, section 4 "Related
measures", picks for closed-book QA): ``_`` to space, lowercase, punctuation to spaces, the articles
a/an/the dropped, whitespace collapsed. Punctuation becomes a space rather than vanishing (unlike
SQuAD), so ``Saint-Denis`` and ``Saint Denis`` agree. "Punctuation" is ASCII punctuation, every
Unicode punctuation character (curly quotes, dashes, guillemets) and the acute and grave accents
used as quotes (´ `). Letters keep their accents: ``Bogotá`` and ``Bogota`` differ, so loaders list
both as aliases (``strip_accents``).
"""

from __future__ import annotations

import re
import string
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_QUOTE_MARKS = set(string.punctuation) | {"´", "`"}


class _PunctuationToSpace(dict):
    """A ``str.translate`` table that maps punctuation to a space, filled in as characters are
    first seen (the Unicode categories of every code point would take long to list up front)."""

    def __missing__(self, code: int) -> int:
        char = chr(code)
        self[code] = ord(" ") if char in _QUOTE_MARKS or unicodedata.category(char).startswith("P") else code
        return self[code]


_TO_SPACE = _PunctuationToSpace()


def normalize_answer(text: str) -> str:
    """TriviaQA's normalisation; see the module docstring."""
    text = text.replace("_", " ").lower().translate(_TO_SPACE)
    return " ".join(_ARTICLES.sub(" ", text).split())


def strip_accents(text: str) -> str:
    """``Bogotá`` -> ``Bogota``: letters without their combining marks (NFKD, marks dropped)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(char for char in decomposed if not unicodedata.combining(char))


def is_latin(text: str) -> bool:
    """Whether every letter is a Latin letter: English answers are written in Latin script, so
    names in other scripts (``Κυπριακή Δημοκρατία``) are not useful aliases."""
    return all(not char.isalpha() or "LATIN" in unicodedata.name(char, "") for char in text)


def unique(values: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The values in order without empty ones and without repeats under ``normalize_answer``
    (the first spelling wins): aliases that score the same are listed once."""
    seen: set[str] = set()
    kept = []
    for value in values:
        value = value.strip()
        key = normalize_answer(value)
        if key and key not in seen:
            seen.add(key)
            kept.append(value)
    return tuple(kept)
