"""The lab's runs: one ``loramoe train`` run per arm and seed, scored along its training.

Each run trains for the mix's steps and is scored (:func:`loramoe.lab.scoring.score_point`) at
``score.points`` steps spaced evenly in log-steps by a callback inside the training process, on the
live model:
no checkpoint is written or read to score it, and scoring neither draws random numbers nor
changes the model, so the run trains exactly as it would unscored. The base model is scored once
(step 0 of every path) and chooses each fact's gold alias.

Runs are cached in a folder named by the hash of everything that determines their result (the
``loramoe train`` settings, the data's content, the probe and the scoring settings, the loramoe
version). A run is done when its ``lab_run.json`` (written last, atomically) exists; a run cut off
before that is redone from its start, which on the default lab costs about two minutes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from loramoe import models
from loramoe.fileio import atomic_write_text
from loramoe.lab.config import LabConfig
from loramoe.lab.mix import Mix
from loramoe.lab.probe import Probe
from loramoe.lab.scoring import choose_gold, score_point
from loramoe.train import train

DONE = "lab_run.json"
POINTS = "points.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
ANALYSIS_ONLY = {"levels", "bootstrap"}
"""Score settings that only the statistics read: changing them redoes no run."""


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({**identity, "version": version("loramoe")}, sort_keys=True).encode()).hexdigest()


def records_per_step(config: LabConfig) -> int:
    """Records per optimiser step: the batch size times the accumulation steps."""
    return int(config.train.get("batch_size", 8)) * int(config.train.get("grad_accum", 1))


def total_steps(config: LabConfig, records: int) -> int:
    return max(1, math.ceil(records * float(config.train.get("epochs", 1.0)) / records_per_step(config)))


def score_steps(steps: int, points: int) -> list[int]:
    """``points`` steps spaced evenly in log-steps, ending at ``steps`` (fewer when the run is too
    short to tell them apart): task skill rises fastest at the start, so a path needs points there."""
    return sorted({max(1, round(steps ** (i / points))) for i in range(1, points + 1)})


@dataclass
class Run:
    name: str
    """``<variant>-s<seed>``."""
    variant: str
    seed: int
    records: int
    settings: dict[str, Any]
    """The ``loramoe train`` keyword arguments but ``output``."""
    steps: list[int]
    """The steps it is scored at."""
    scoring: str
    """The hash of the probe and the scoring settings (``scoring_key``)."""
    key: str = field(init=False)

    def __post_init__(self) -> None:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in self.settings.items()}
        settings["data"] = [file_hash(Path(p)) for p in self.settings["data"]]
        self.key = _hash({"settings": settings, "steps": self.steps, "scoring": self.scoring})

    @property
    def method(self) -> str:
        return self.settings["method"]


def scoring_key(config: LabConfig, probe: Probe) -> str:
    """What a score depends on besides the model: the questions and how they are asked."""
    measured = {k: v for k, v in asdict(config.score).items() if k not in ANALYSIS_ONLY}
    return _hash({"probe": probe.key(), "score": measured, "model": config.model})


def plan(config: LabConfig, mix: Mix, scoring: str) -> list[Run]:
    """Every arm with every one of its seeds, in the order of the settings."""
    steps = total_steps(config, mix.counts["total"])
    runs = []
    for variant, own in config.variants.items():
        for seed in config.seeds(variant):
            settings = {**config.train, **{k: v for k, v in own.items() if k != "seeds"}, "data": [str(mix.path)],
                        "model": config.model, "seed": seed, "max_steps": steps, "save_steps": steps + 1}
            runs.append(Run(f"{variant}-s{seed}", variant, seed, mix.counts["total"], settings,
                            score_steps(steps, config.score.points), scoring))
    return runs


def run_folder(lab_dir: Path, run: Run) -> Path:
    return lab_dir / "runs" / f"{run.name}-{run.key[:10]}"


def score_base(config: LabConfig, probe: Probe, lab_dir: Path, key: str) -> tuple[dict[str, Any], bool]:
    """The base model's point (step 0 of every path) and each fact's gold alias, cached under the
    scoring key; returns it and whether it was cached."""
    path = lab_dir / "runs" / f"base-{key[:10]}" / POINTS
    if path.is_file():
        return json.loads(path.read_text()), True
    model, tokenizer = models.load(config.model)
    s = config.score
    gold = choose_gold(model, tokenizer, probe, batch_size=s.batch_size, precision=s.precision)
    point = score_point(model, tokenizer, probe, gold, step=0, final=True, batch_size=s.batch_size,
                        max_new_tokens=s.max_new_tokens, precision=s.precision)
    point["gold"] = gold
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(point) + "\n")
    return point, False


class ScoreAlong(TrainerCallback):
    """Scores the model being trained at the given steps (see the module docstring)."""

    def __init__(self, steps: list[int], tokenizer, probe: Probe, gold: list[str], config: LabConfig,
                 tick: Callable[[str], None]) -> None:
        self.steps, self.tokenizer, self.probe, self.gold, self.config = steps, tokenizer, probe, gold, config
        self.tick = tick
        self.points: list[dict[str, Any]] = []
        self.seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.tick("step")
        if state.global_step in self.steps:
            started = time.time()
            s = self.config.score
            self.points.append(score_point(model, self.tokenizer, self.probe, self.gold, step=state.global_step,
                                           final=state.global_step == self.steps[-1], batch_size=s.batch_size,
                                           max_new_tokens=s.max_new_tokens, precision=s.precision))
            self.seconds += time.time() - started
            self.tick("point")


def execute(run: Run, config: LabConfig, probe: Probe, gold: list[str], lab_dir: Path,
            tick: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Trains and scores one run, or reads it back when done; returns its ``lab_run.json`` content.
    ``tick`` hears of each optimiser step (``"step"``) and scored point (``"point"``) as they end."""
    folder = run_folder(lab_dir, run)
    done = folder / DONE
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)  # a run cut off: start it again
    started = time.time()
    tokenizer = models.load_tokenizer(config.model)
    along = ScoreAlong(run.steps, tokenizer, probe, gold, config, tick)
    summary = train(**run.settings, output=folder, callbacks=[along])
    if run.method == "full" and not config.keep_full_weights:
        drop_weights(folder)
    atomic_write_text(folder / POINTS, json.dumps(along.points) + "\n")
    record = {"name": run.name, "variant": run.variant, "seed": run.seed, "method": run.method,
              "records": run.records, "key": run.key, "folder": folder.name, "train": summary,
              "score_seconds": round(along.seconds, 1), "train_seconds": round(summary["seconds"] - along.seconds, 1),
              "seconds": round(time.time() - started, 1)}
    atomic_write_text(done, json.dumps(record, indent=2) + "\n")
    return record


def read_points(lab_dir: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads((lab_dir / "runs" / record["folder"] / POINTS).read_text())


def drop_weights(folder: Path) -> None:
    """A scored full fine-tuning run keeps its numbers, not its 0.5 GB of weights."""
    for name in WEIGHTS:
        (folder / name).unlink(missing_ok=True)
    for shard in folder.glob("model-*-of-*.safetensors"):
        shard.unlink()
