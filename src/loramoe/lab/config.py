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

from loramoe.errors import LoramoeError
from loramoe.suites.records import AnswerStyle
from loramoe.suites.registry import mix_names
from loramoe.train import train
from loramoe.train.main import Method

DEFAULT_CONFIG = resources.files("loramoe.lab").joinpath("lab.yaml")
LAB_OWNED = {"data", "output", "model", "seed", "resume", "overwrite", "init_adapter", "method", "max_steps",
             "callbacks"}
"""``loramoe train`` settings the lab sets itself, per run."""
TRAIN_SETTINGS = set(inspect.signature(train).parameters) - LAB_OWNED
METHODS = get_args(Method)  # `loramoe train`'s, from the adapter table
WHOLE = {"variants"}
"""Mappings a later file replaces whole instead of merging key by key (so a profile can drop arms)."""


class LabConfigError(LoramoeError, ValueError):
    pass


@dataclass
class MixConfig:
    records: int
    knowledge_share: float
    templates: int
    answer_style: str
    max_context_chars: int
    knowledge: list[str]
    tasks: list[str]


@dataclass
class ScoreConfig:
    points: int
    choices: int
    fact_items: int | None
    task_items: int | None
    chat_items: int
    generation_items: int
    max_new_tokens: int
    batch_size: int
    precision: str
    levels: list[float]
    verdict_level: float
    bootstrap: int


@dataclass
class Contrast:
    name: str
    a: str
    b: str
    question: str


@dataclass
class LabConfig:
    model: str
    seed: int
    mix: MixConfig
    train: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    contrasts: list[Contrast]
    score: ScoreConfig
    keep_full_weights: bool
    frontiers: dict[str, list[str]] = field(default_factory=dict)
    """Named sets of arms (one method at several learning rates) compared by their upper envelope."""
    sources: list[str] = field(default_factory=list)
    """The files (and profile) the settings came from, for the report."""

    def seeds(self, variant: str) -> list[int]:
        return self.variants[variant].get("seeds", [self.seed])


def _merge(base: dict, update: dict, path: str = "") -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and f"{path}{key}" not in WHOLE:
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
    mix, score = config.mix, config.score
    if mix.records < 1 or mix.templates < 1:
        raise LabConfigError(f"{where}: mix.records and mix.templates must be >= 1")
    if not 0.0 <= mix.knowledge_share < 1.0:
        raise LabConfigError(f"{where}: mix.knowledge_share must be in [0, 1), got {mix.knowledge_share}")
    if mix.answer_style not in get_args(AnswerStyle):
        raise LabConfigError(f"{where}: mix.answer_style must be one of {', '.join(get_args(AnswerStyle))}, "
                             f"got '{mix.answer_style}'")
    for key, role in (("knowledge", "knowledge"), ("tasks", "task")):
        allowed = mix_names(role)
        bad = [name for name in getattr(mix, key) if name not in allowed]
        if bad or not getattr(mix, key):
            raise LabConfigError(f"{where}: mix.{key} {bad or '[]'}: choose from {', '.join(allowed)}")
    unknown = sorted(set(config.train) - TRAIN_SETTINGS)
    if unknown:
        raise LabConfigError(f"{where}: train.{unknown[0]} is not a `loramoe train` setting the lab lets you set")
    if not config.variants:
        raise LabConfigError(f"{where}: 'variants' names no method to train")
    for name, settings in config.variants.items():
        if not isinstance(settings, dict) or settings.get("method") not in METHODS:
            raise LabConfigError(f"{where}: variants.{name}.method must be one of {', '.join(METHODS)}")
        unknown = sorted(set(settings) - TRAIN_SETTINGS - {"method", "seeds"})
        if unknown:
            raise LabConfigError(f"{where}: variants.{name}.{unknown[0]} is not a `loramoe train` setting")
        seeds = config.seeds(name)
        if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) or \
                not all(isinstance(s, int) for s in seeds):
            raise LabConfigError(f"{where}: variants.{name}.seeds must be a list of distinct integers")
    _check_frontiers(config, where)
    for contrast in config.contrasts:
        for arm in (contrast.a, contrast.b):
            if arm not in config.variants and arm not in config.frontiers:
                raise LabConfigError(f"{where}: contrast '{contrast.name}' names '{arm}', which is neither in "
                                     "variants nor in frontiers")
    if score.points < 1 or score.choices < 2 or score.bootstrap < 100 or score.batch_size < 1:
        raise LabConfigError(f"{where}: score.points >= 1, score.choices >= 2, score.bootstrap >= 100 "
                             "and score.batch_size >= 1 are needed")
    if score.precision not in ("bf16", "fp32", "auto"):
        raise LabConfigError(f"{where}: score.precision must be bf16, fp32 or auto, got '{score.precision}'")
    if not score.levels or any(not 0.0 < level <= 1.0 for level in score.levels):
        raise LabConfigError(f"{where}: score.levels must be shares of the common skill in (0, 1]")
    if score.verdict_level not in score.levels:
        raise LabConfigError(f"{where}: score.verdict_level {score.verdict_level} must be one of score.levels "
                             f"{score.levels}")


def _check_frontiers(config: LabConfig, where: str) -> None:
    """A frontier is one method at several rates: its arms exist, differ from each other and from
    every arm's name, share a method and their seeds (the envelope is taken per seed too)."""
    if not isinstance(config.frontiers, dict):
        raise LabConfigError(f"{where}: 'frontiers' must map a name to a list of variants")
    for name, members in config.frontiers.items():
        at = f"{where}: frontiers.{name}"
        if name in config.variants:
            raise LabConfigError(f"{at}: the name is also a variant's; give the frontier its own name")
        if not isinstance(members, list) or not members or len(set(members)) != len(members):
            raise LabConfigError(f"{at}: must be a list of distinct variant names")
        unknown = [m for m in members if m not in config.variants]
        if unknown:
            raise LabConfigError(f"{at}: '{unknown[0]}' is not in variants")
        if len({config.variants[m]["method"] for m in members}) > 1:
            raise LabConfigError(f"{at}: its variants train different methods; a frontier is one method's")
        if len({tuple(config.seeds(m)) for m in members}) > 1:
            raise LabConfigError(f"{at}: its variants must run the same seeds")


def _contrasts(data: Any, where: str) -> list[Contrast]:
    if not isinstance(data, list):
        raise LabConfigError(f"{where}: 'contrasts' must be a list of {{name, a, b, question}}")
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or set(entry) != {"name", "a", "b", "question"}:
            raise LabConfigError(f"{where}: contrasts[{i}] must have exactly the keys name, a, b, question")
        out.append(Contrast(**{k: str(v) for k, v in entry.items()}))
    return out


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
                       variants=dict(data["variants"] or {}), contrasts=_contrasts(data["contrasts"], where),
                       score=_section(data, "score", ScoreConfig, where),
                       keep_full_weights=bool(data["keep_full_weights"]),
                       frontiers={str(k): v for k, v in (data["frontiers"] or {}).items()}
                       if isinstance(data["frontiers"], dict) else data["frontiers"], sources=sources)
    _check(config, where)
    return config
