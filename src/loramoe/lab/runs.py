"""The lab's runs: which ``loramoe train`` runs the settings ask for, each cached in a folder named
by the hash of everything that determines its result, trained, then scored with ``loramoe eval``.

A run is done when its ``lab_run.json`` exists (written last, atomically). A run that was cut off
is taken up again: training resumes from its last complete checkpoint, a finished training is only
scored. Changing a training setting changes the hash, so only the runs it touches are redone;
changing an eval setting rescores every run (``scoring_key``) without training it again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from importlib.metadata import version
from loramoe.evaluate import evaluate
from loramoe.fileio import atomic_write_text
from loramoe.lab.config import LabConfig
from loramoe.lab.mix import Mix
from loramoe.train import train

DONE = "lab_run.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Run:
    name: str
    """``lora-4x``, ``full-16x-sequential``; a first stage ends in ``-stage1``."""
    variant: str
    size: str
    records: int
    settings: dict[str, Any]
    """The ``loramoe train`` keyword arguments but ``output`` (and the parent's output)."""
    parent: Run | None = None
    scored: bool = True
    key: str = field(init=False)

    def __post_init__(self) -> None:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in self.settings.items()}
        settings["data"] = [file_hash(Path(p)) for p in self.settings["data"]]
        identity = {"settings": settings, "parent": self.parent.key if self.parent else None, "version": version("loramoe")}
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @property
    def method(self) -> str:
        return self.settings["method"]

    @property
    def sequential(self) -> bool:
        return self.parent is not None


def plan(config: LabConfig, mix: Mix) -> list[Run]:
    """Every variant at every size, then the sequential runs (first stage before second)."""
    runs = []
    for variant, own in config.variants.items():
        for size, data in mix.sizes.items():
            settings = {**config.train, **own, "data": [str(data)], "model": config.model, "seed": config.seed}
            runs.append(Run(f"{variant}-{size}", variant, size, mix.counts[size]["total"], settings))
    for variant in config.sequential:
        own = config.variants[variant]
        base = {**config.train, **own, "model": config.model, "seed": config.seed}
        counts = mix.counts[mix.largest]
        first = Run(f"{variant}-{mix.largest}-sequential-stage1", variant, mix.largest, counts["task"],
                    {**base, "data": [str(mix.task_part)]}, scored=False)
        second = Run(f"{variant}-{mix.largest}-sequential", variant, mix.largest, counts["knowledge"],
                     {**base, "data": [str(mix.knowledge_part)]}, parent=first)
        runs += [first, second]
    return runs


def run_folder(lab_dir: Path, run: Run) -> Path:
    return lab_dir / "runs" / f"{run.name}-{run.key[:10]}"


def eval_suite(config: LabConfig) -> str:
    names = [f"knowledge/{r}" for r in config.mix.knowledge] + [f"task/{t}" for t in config.mix.tasks]
    return ",".join([*names, "text/wikipedia"])


def _eval_settings(config: LabConfig, mix: Mix) -> dict[str, Any]:
    e = config.eval
    return dict(suite=eval_suite(config), limit=dict(e.limit), max_new_tokens=e.max_new_tokens,
                batch_size=e.batch_size, max_length=e.max_length, prompt_style=e.prompt_style,
                seed=config.seed, train_data=[str(mix.sizes[mix.largest])])


def scoring_key(config: LabConfig, mix: Mix) -> str:
    """The hash of everything a score depends on besides the model: a run scored under another
    key (other test items, limits, generation settings) is scored again."""
    settings = _eval_settings(config, mix)
    identity = {**settings, "train_data": [file_hash(Path(p)) for p in settings["train_data"]],
                "model": config.model, "version": version("loramoe")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def score_base(config: LabConfig, mix: Mix, lab_dir: Path, key: str) -> tuple[Path, dict[str, Any], bool]:
    """The base model's eval.json on the lab's items (cached like a run, under the ``scoring_key``):
    every run's comparison reads it instead of asking the base model again. Returns its path, its
    content and whether it was already there."""
    path = lab_dir / "runs" / f"base-{key[:10]}" / "eval.json"
    cached = path.is_file()
    if not cached:
        evaluate(model=config.model, output=path.parent, **_eval_settings(config, mix))
    return path, json.loads(path.read_text()), cached


def forget_stale_score(run: Run, lab_dir: Path, key: str) -> None:
    """A done run scored under another ``scoring_key`` is made not done: its training is kept and
    it is scored again, but a full fine-tuning run whose weights were dropped is trained again."""
    folder = run_folder(lab_dir, run)
    done = folder / DONE
    if not run.scored or not done.is_file():
        return
    if json.loads(done.read_text()).get("scored_with") == key:
        return
    if run.method == "full" and not any((folder / name).is_file() for name in WEIGHTS):
        shutil.rmtree(folder)
    else:
        done.unlink()


def execute(run: Run, config: LabConfig, mix: Mix, lab_dir: Path, base_eval: Path, key: str) -> dict[str, Any]:
    """Trains (or resumes) and scores one run (``key``: the ``scoring_key``); returns its
    ``lab_run.json`` content."""
    folder = run_folder(lab_dir, run)
    done = folder / DONE
    if done.is_file():
        return json.loads(done.read_text())
    started = time.time()
    settings = dict(run.settings)
    if run.parent is not None:
        parent = run_folder(lab_dir, run.parent)
        if run.method == "full":
            settings["model"] = str(parent)
        else:
            settings["init_adapter"] = parent
    if not (folder / "train_summary.json").is_file():
        train(**settings, output=folder, resume=(folder / "checkpoints").is_dir())
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    summary = json.loads((folder / "train_summary.json").read_text())
    train_seconds = summary["seconds"]
    records = run.records
    if run.parent is not None:  # a sequential run counts both stages
        first = json.loads((run_folder(lab_dir, run.parent) / "train_summary.json").read_text())
        train_seconds, records = train_seconds + first["seconds"], records + run.parent.records
    record: dict[str, Any] = {"name": run.name, "variant": run.variant, "method": run.method, "size": run.size,
                              "records": records, "sequential": run.sequential, "key": run.key,
                              "train": summary, "train_seconds": round(train_seconds, 2), "folder": folder.name}
    if run.scored:
        scoring = dict(model=str(folder), base_model=config.model) if run.method == "full" else \
            dict(model=config.model, adapter=folder)
        evaluate(**scoring, base_eval=base_eval, output=folder / "eval", **_eval_settings(config, mix))
        record["eval"] = "eval/eval.json"
        record["scored_with"] = key
    record["seconds"] = round(time.time() - started, 1)
    atomic_write_text(done, json.dumps(record, indent=2) + "\n")
    if run.method == "full" and run.scored and not config.keep_full_weights:
        drop_weights(folder)
    return record


def drop_weights(folder: Path) -> None:
    """A scored full fine-tuning run keeps its numbers, not its 0.5 GB of weights."""
    for name in WEIGHTS:
        (folder / name).unlink(missing_ok=True)
    for shard in folder.glob("model-*-of-*.safetensors"):
        shard.unlink()


def finish_stage(run: Run, lab_dir: Path, config: LabConfig) -> None:
    """A first stage's full weights go once the second stage is scored."""
    if run.parent is not None and run.method == "full" and not config.keep_full_weights:
        drop_weights(run_folder(lab_dir, run.parent))
