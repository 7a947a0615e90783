"""``loramoe lab``: does a method keep world knowledge at equal task skill? One command, on the
embedded model, with intervals.

Builds the instruction mix and the probe, scores the base model, trains every arm with each of its
seeds (scored along the way), then computes the paired statistics and writes ``results.json``,
``report.md`` and ``report.html`` into the output folder. Runs are cached by their settings' hash
under ``<output>/runs``, so a second call (or one with more arms or seeds) redoes only what changed,
and an interrupted lab picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from loramoe.errors import UsageError
from loramoe.fileio import atomic_write_text, ensure_writable_folder
from loramoe.folder_lock import hold
from loramoe.lab.config import DEFAULT_CONFIG, load_config
from loramoe.lab.measures import candidate_lengths
from loramoe.lab.mix import build_mix
from loramoe.lab.pace import Pace, Stopwatch, resolve_precision
from loramoe.lab.probe import lab_probe
from loramoe.lab.report import render
from loramoe.lab.results import build
from loramoe.lab.runs import (
    DONE,
    execute,
    plan,
    read_points,
    run_folder,
    score_base,
    scoring_key,
)
from loramoe.models import EMBEDDED, embedded_model_dir, load_tokenizer


def _advance(progress: tqdm, cost: float) -> None:
    # the total and the work done sum the same costs in another order: their last bits may differ
    progress.total = max(progress.total, progress.n + cost)
    progress.update(cost)


def _account(progress: tqdm, cost: float, cached: bool) -> None:
    """Count work done; work found done is taken off the total, so the time left, drawn from the
    pace so far, counts only work still to do."""
    if cached:
        progress.total = max(progress.total - cost, progress.n)
        progress.refresh()
    else:
        _advance(progress, cost)


def lab(
    lab_config: Path | None = None,
    quick: bool = False,
    full: bool = False,
    frontier: bool = False,
    output: Path = Path("runs/lab"),
    init_config: Path | None = None,
) -> dict[str, Any]:
    """Reproduce knowledge forgetting under instruction tuning, and its cure, in small.

    Args:
        lab_config: a lab settings file (YAML), also given as ``--config``; keys it leaves out
            keep the shipped defaults. Start from a copy: ``loramoe lab --init-config my.yaml``.
        quick: the quick profile (a first look in a few minutes on a 2-core CPU; what CI runs).
        full: the full profile (real sizes; for a GPU).
        frontier: the frontier profile: every method at two learning rates, three seeds, longer
            runs; compares methods by the best knowledge any of their rates keeps at each skill
            (about 2 hours on a 2-core CPU).
        output: the report folder (runs are cached in ``<output>/runs``).
        init_config: write a copy of the default settings file there and stop.
    """
    if init_config is not None:
        init_config = Path(init_config)
        if init_config.exists():
            raise FileExistsError(f"--init-config {init_config}: the file exists; not overwriting it")
        atomic_write_text(init_config, DEFAULT_CONFIG.read_text())
        print(f"wrote {init_config}; edit it, then run: loramoe lab --config {init_config}")
        return {}
    chosen = [name for name, on in (("quick", quick), ("full", full), ("frontier", frontier)) if on]
    if len(chosen) > 1:
        raise UsageError(f"--{chosen[0]} and --{chosen[1]} exclude each other: choose one profile")
    settings = load_config(lab_config, chosen[0] if chosen else None)
    started = time.time()
    output = ensure_writable_folder(output, "--output")  # before hours of work, not after
    with hold(output, "--output", "lab"):  # two labs in one folder would train the same runs over each other
        settings, precision = resolve_precision(settings)  # before the plan: runs are cached by their settings
        mix = build_mix(settings.mix, output / "mix", settings.seed)
        probe = lab_probe(settings, mix.path)
        key = scoring_key(settings, probe)
        runs = plan(settings, mix, key)
        if settings.model in EMBEDDED:  # once per machine, and not part of the pace the time left is drawn from
            embedded_model_dir(settings.model)
        pace = Pace(key)
        estimates = [pace.estimate(r) for r in runs]
        # the costs are this machine's seconds once a lab has run on it; smoothing=0: the time left
        # follows the pace of the whole lab so far, not of its last run
        base_cost = pace.base()
        progress = tqdm(total=sum(e["total"] for e in estimates) + base_cost, unit="s", desc="lab", smoothing=0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        progress.set_postfix_str("scoring the base model")
        started_base = time.monotonic()
        base, cached = score_base(settings, probe, output, key)
        _account(progress, base_cost, cached)
        if not cached:
            pace.observe_base(time.monotonic() - started_base)
        records, points = [], {}
        for i, (run, estimate) in enumerate(zip(runs, estimates), 1):
            progress.set_postfix_str(f"run {i}/{len(runs)}: {run.name}")
            cached = (run_folder(output, run) / DONE).is_file()
            watch, done = Stopwatch(run, estimate), [0.0]

            def tick(kind: str, watch: Stopwatch = watch, done: list[float] = done) -> None:
                cost = watch.tick(kind)
                _advance(progress, cost)
                done[0] += cost

            record = execute(run, settings, probe, base["gold"], output, tick)
            watch.stop()
            _account(progress, estimate["total"] - done[0], cached)
            if not cached:
                pace.observe(run, watch)
            records.append(record)
            points[run.name] = read_points(output, record)
            last = points[run.name][-1]
            progress.write(f"{run.name}: step {last['step']}, "
                           f"task loss {sum(last['task_loss']) / len(last['task_loss']):.3f} "
                           f"(base {sum(base['task_loss']) / len(base['task_loss']):.3f})")
        progress.close()
        # measured here, not stored in the points: runs cached before the length measures need no rescoring
        lengths = candidate_lengths(load_tokenizer(settings.model), probe, base["gold"])
        results: dict[str, Any] = {
            "lab": {"version": version("loramoe"), "model": settings.model, "sources": settings.sources,
                    "runs": len(runs), "precision": precision,
                    "seconds": round(time.time() - started, 1), "settings": asdict(settings),
                    "run_seconds": {r["name"]: r["seconds"] for r in records}},
            "mix": mix.counts,
            **build(settings, probe, base, records, points, lengths),
        }
        atomic_write_text(output / "results.json", json.dumps(results, indent=2) + "\n")
        md, html = render(results, output)
        print(f"report: {md} and {html}")
        return results
