"""World knowledge as closed-book QA: one benchmark per relation of the country table
(``knowledge/capital``, ``continent``, ``currency``, ``language``, ``demonym``, ``borders``).

Each fact is asked in a chat question and, in the same example, as a text to continue
(``completion``), from a few phrasings per relation. By default every fact is asked once, in the
first phrasing, so scores compare across runs; ``templates=k`` adds the next k - 1 phrasings as
further examples of the same group, which the split keeps on one side (a test question is never a
rewording of a training one). The other phrasings are still used to write training data
(``to_training_records``).

Answers list every accepted value with its aliases (``countries.Value``): any official language,
any bordering country (by any of its names), any of several capitals (South Africa), both
continents of a country two sources place differently (Cyprus). Countries without a value for a
relation are left out of it (islands have no borders, territories no language data).
"""

from __future__ import annotations

from loramoe.errors import UsageError
from loramoe.suites.base import Example
from loramoe.suites.countries import Country, Value, by_code, countries
from loramoe.suites.text import unique

TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "capital": (
        ("What is the capital of {country}?", "The capital of {country} is"),
        ("Which city is the capital of {country}?", "The capital city of {country} is"),
        ("Name the capital city of {country}.", "{Country} has its capital in"),
        ("Which city serves as the capital of {country}?", "The city that serves as the capital of {country} is"),
    ),
    "continent": (
        ("On which continent is {country}?", "{Country} is located on the continent of"),
        ("Which continent is {country} in?", "{Country} lies on the continent of"),
        ("What continent does {country} belong to?", "The continent {country} belongs to is"),
        ("{Country} is part of which continent?", "{Country} is part of the continent of"),
    ),
    "currency": (
        ("What is the currency of {country}?", "The currency of {country} is the"),
        ("Which currency is used in {country}?", "The currency used in {country} is the"),
        ("What is the official currency of {country}?", "The official currency of {country} is the"),
        ("What money do people pay with in {country}?", "In {country}, people pay with the"),
    ),
    "language": (
        ("What is the official language of {country}?", "The official language of {country} is"),
        ("Which language is an official language of {country}?", "One official language of {country} is"),
        ("What language is officially spoken in {country}?", "The language officially spoken in {country} is"),
        ("Name an official language of {country}.", "An official language of {country} is"),
    ),
    "demonym": (
        ("What is the demonym for people from {country}?", "The demonym for people from {country} is"),
        ("What are people from {country} called?", "People from {country} are called"),
        ("What is the nationality adjective for {country}?", "The nationality adjective for {country} is"),
        ("How do you describe a person from {country}?", "A person from {country} is described as"),
    ),
    "borders": (
        ("Name a country that borders {country}.", "One country that borders {country} is"),
        ("Which country shares a land border with {country}?", "{Country} shares a land border with"),
        ("Name one of the neighbouring countries of {country}.", "A neighbouring country of {country} is"),
        ("What is a country next to {country}?", "A country next to {country} is"),
    ),
}
"""Per relation: (chat question, completion text) phrasings; the first is the default."""

RELATIONS = tuple(TEMPLATES)


def _values(country: Country, relation: str, table: dict[str, Country]) -> tuple[Value, ...]:
    if relation == "borders":
        return tuple(table[code].names for code in country.neighbours)
    return {"capital": country.capitals, "continent": country.continents, "currency": country.currencies,
            "language": country.languages, "demonym": country.demonyms}[relation]


def answers(values: tuple[Value, ...]) -> tuple[str, ...]:
    """Every value's canonical spelling first (so ``answers[0]`` is one right answer and the
    next few are the other right answers), then all aliases; no repeats (``text.unique``)."""
    canonical = [value[0] for value in values]
    return unique(canonical + [alias for value in values for alias in value[1:]])


def in_sentence(name: str) -> str:
    """``The Bahamas`` -> ``the Bahamas`` inside a sentence."""
    return "the " + name[4:] if name.startswith("The ") else name


def fill(template: str, name: str) -> str:
    """A phrasing with the country in it, capitalised at the start of the sentence."""
    text = template.format(country=in_sentence(name), Country=name)
    return text[0].upper() + text[1:]


def knowledge_examples(relation: str, *, templates: int = 1, min_population: int | None = None) -> list[Example]:
    """One example per country with a value for ``relation`` (and at least ``min_population``
    people, when given: countries without a population figure are then left out), in the first
    ``templates`` phrasings. Ids ``capital/France/0``; group ``capital/France``."""
    if relation not in TEMPLATES:
        raise UsageError(f"unknown relation '{relation}'; known: {', '.join(RELATIONS)}")
    if not 1 <= templates <= len(TEMPLATES[relation]):
        raise UsageError(f"templates must be between 1 and {len(TEMPLATES[relation])}, got {templates}")
    examples, table = [], by_code()
    for country in countries():
        if min_population is not None and (country.population or 0) < min_population:
            continue
        values = _values(country, relation, table)
        if not values:
            continue
        for index, (question, completion) in enumerate(TEMPLATES[relation][:templates]):
            examples.append(Example(
                id=f"{relation}/{country.name}/{index}", prompt=fill(question, country.name),
                answers=answers(values), completion=fill(completion, country.name), subject=country.name,
                relation=relation, group=f"{relation}/{country.name}"))
    return examples


def phrasings(example: Example) -> list[str]:
    """Every chat phrasing of a knowledge example's question (for training records)."""
    return [fill(question, example.subject or "") for question, _ in TEMPLATES[example.relation or ""]]


def sentence_answers(example: Example) -> list[str]:
    """The answer as the sentence each phrasing's completion text starts (``The capital of
    Cyprus is Nicosia.``), in the order of :func:`phrasings`."""
    return [f"{fill(completion, example.subject or '')} {example.answers[0]}."
            for _, completion in TEMPLATES[example.relation or ""]]
