"""The lab's settings: the shipped ``lab.yaml`` (every default, documented), a user's copy on top,
then a profile (``--quick``, ``--full``) on top of both.

Merging: mappings merge key by key, except ``variants``, which a later file replaces whole (so a
profile or a user can drop methods); lists and values are replaced. Every key is checked, and an
unknown or mistyped one is an error naming the file and the key's path.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_args

import yaml

from loramoe.suites.knowledge import RELATIONS
from loramoe.suites.records import AnswerStyle
from loramoe.suites.translation import LANGUAGES
from loramoe.suites.wiki import TEMPLATES as WIKI_TASKS
from loramoe.train import train

DEFAULT_CONFIG = resources.files("loramoe.lab").joinpath("lab.yaml")
PROFILES = ("quick", "full")
TASKS = (*WIKI_TASKS, *(f"translation-{lang}" for lang in LANGUAGES))
LAB_OWNED = {"data", "output", "model", "seed", "resume", "init_adapter", "method"}
"""``loramoe train`` settings the lab sets itself, per run."""
TRAIN_SETTINGS = set(inspect.signature(train).parameters) - LAB_OWNED


class LabConfigError(ValueError):
    pass


@dataclass
class MixConfig:
    unit: int
    sizes: list[float]
    knowledge_share: float
    templates: int
    answer_style: str
    max_context_chars: int
    knowledge: list[str]
    tasks: list[str]


@dataclass
class EvalConfig:
    limit: dict[str, int | None]
    max_new_tokens: int
    batch_size: int
    max_length: int
    prompt_style: str | None


@dataclass
class LabConfig:
    model: str
    seed: int
    mix: MixConfig
    train: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    sequential: list[str]
    eval: EvalConfig
    keep_full_weights: bool
    sources: list[str] = field(default_factory=list)
    """The files (and profile) the settings came from, for the report."""


def _merge(base: dict, update: dict, path: str = "") -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and f"{path}{key}" != "variants":
            merged[key] = _merge(base[key], value, f"{path}{key}.")
        else:
            merged[key] = value
    return merged


def _read(path: Path | Any) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise LabConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise LabConfigError(f"{path}: the lab config must be a mapping of settings")
    return data


def _section(data: dict, key: str, cls: type, where: str) -> Any:
    given = data.get(key)
    if not isinstance(given, dict):
        raise LabConfigError(f"{where}: '{key}' must be a mapping")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - names)
    missing = sorted(names - set(given))
    if unknown or missing:
        raise LabConfigError(f"{where}: '{key}' has unknown keys {unknown} or lacks {missing}")
    return cls(**given)


def _check(config: LabConfig, where: str) -> None:
    mix = config.mix
    if mix.unit < 1 or not mix.sizes or any(s <= 0 for s in mix.sizes) or mix.templates < 1:
        raise LabConfigError(f"{where}: mix.unit and mix.templates must be >= 1 and mix.sizes positive")
    if not 0.0 < mix.knowledge_share < 1.0:
        raise LabConfigError(f"{where}: mix.knowledge_share must be between 0 and 1, got {mix.knowledge_share}")
    if mix.answer_style not in get_args(AnswerStyle):
        raise LabConfigError(f"{where}: mix.answer_style must be one of {', '.join(get_args(AnswerStyle))}, "
                             f"got '{mix.answer_style}'")
    for key, allowed in (("knowledge", RELATIONS), ("tasks", TASKS)):
        bad = [name for name in getattr(mix, key) if name not in allowed]
        if bad or not getattr(mix, key):
            raise LabConfigError(f"{where}: mix.{key} {bad or '[]'}: choose from {', '.join(allowed)}")
    unknown = sorted(set(config.train) - TRAIN_SETTINGS)
    if unknown:
        raise LabConfigError(f"{where}: train.{unknown[0]} is not a `loramoe train` setting the lab lets you set")
    if not config.variants:
        raise LabConfigError(f"{where}: 'variants' names no method to train")
    for name, settings in config.variants.items():
        if not isinstance(settings, dict) or settings.get("method") not in ("full", "lora", "tied-lora", "loramoe"):
            raise LabConfigError(f"{where}: variants.{name}.method must be full, lora, tied-lora or loramoe")
        unknown = sorted(set(settings) - TRAIN_SETTINGS - {"method"})
        if unknown:
            raise LabConfigError(f"{where}: variants.{name}.{unknown[0]} is not a `loramoe train` setting")
    for name in config.sequential:
        if name not in config.variants:
            raise LabConfigError(f"{where}: sequential names '{name}', which is not in variants")
    suites = {"knowledge", "tasks", "lm-loss"}
    if set(config.eval.limit) - suites:
        raise LabConfigError(f"{where}: eval.limit keys must be among {sorted(suites)}")


def load_config(path: Path | None = None, profile: str | None = None) -> LabConfig:
    """The lab's settings: the shipped defaults, ``path``'s values on top, then ``profile``."""
    data = _read(DEFAULT_CONFIG)
    sources = ["lab.yaml (shipped)"]
    where = "lab.yaml"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LabConfigError(f"--config {path}: no such file")
        data = _merge(data, _read(path))
        sources.append(str(path))
        where = str(path)
    profiles = data.pop("profiles", {}) or {}
    if profile is not None:
        if profile not in profiles:
            raise LabConfigError(f"{where}: no profile '{profile}' under 'profiles'")
        data = _merge(data, profiles[profile])
        sources.append(f"profile {profile}")
        where = f"{where} (profile {profile})"
    top = {f.name for f in fields(LabConfig)} - {"sources"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise LabConfigError(f"{where}: unknown key '{unknown[0]}'; the keys are {', '.join(sorted(top))}")
    missing = sorted(top - set(data))
    if missing:
        raise LabConfigError(f"{where}: missing key '{missing[0]}'")
    config = LabConfig(model=str(data["model"]), seed=int(data["seed"]),
                       mix=_section(data, "mix", MixConfig, where), train=dict(data["train"] or {}),
                       variants=dict(data["variants"] or {}), sequential=list(data["sequential"] or []),
                       eval=_section(data, "eval", EvalConfig, where),
                       keep_full_weights=bool(data["keep_full_weights"]), sources=sources)
    _check(config, where)
    return config
