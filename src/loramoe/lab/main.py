"""``loramoe lab``: the paper's central experiment in small, on the embedded model, in one command.

Builds the instruction mix, trains every variant at every data size (plus the sequential runs),
scores each model and the base model with ``loramoe eval``, and writes ``results.json``,
``report.md`` and ``report.html`` into the output folder. Runs are cached by their settings' hash
under ``<output>/runs``, so a second call (or one with more sizes or variants) redoes only what
changed, and an interrupted lab picks up where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from loramoe.fileio import atomic_write_text
from loramoe.lab.config import DEFAULT_CONFIG, load_config
from loramoe.lab.mix import build_mix
from loramoe.lab.report import render
from loramoe.lab.results import base_row, findings, run_row
from loramoe.lab.runs import (DONE, WEIGHTS, Run, execute, finish_stage, forget_stale_score, plan, run_folder,
                              score_base, scoring_key)
from loramoe.models import EMBEDDED, embedded_model_dir

RUN_SECONDS = 3.0
"""Loading the model and data for one run."""
RECORD_SECONDS = {"full": 0.52, "adapter": 0.35}
"""One training record (one epoch), full fine-tuning and adapters."""
EVAL_SECONDS = 28.0
"""Scoring one fine-tuned model (held-out facts, task test sets, text loss, router plot)."""
BASE_EVAL_SECONDS = 19.0
"""Scoring the base model, the first work the time left is drawn from.

Measured on the default lab on a 2-core CPU; the time left uses only their ratios, scaled by the
pace the lab has kept so far."""


def _cost(run: Run) -> float:
    epochs = float(run.settings.get("epochs", 1.0))
    per_record = RECORD_SECONDS["full" if run.method == "full" else "adapter"]
    return RUN_SECONDS + run.records * epochs * per_record + (EVAL_SECONDS if run.scored else 0.0)


def _account(progress: tqdm, cost: float, cached: bool) -> None:
    """Count work done; work found done is taken off the total, so the time left, drawn from the
    pace so far, counts only work still to do."""
    if cached:
        progress.total -= cost
        progress.refresh()
    else:
        progress.update(cost)


def _parent_ready(run: Run, lab_dir: Path) -> None:
    """A sequential second stage needs its first stage's weights; full ones are dropped once used,
    so a redone second stage redoes the first."""
    parent = run.parent
    if parent is None or parent.method != "full" or (run_folder(lab_dir, run) / DONE).is_file():
        return
    folder = run_folder(lab_dir, parent)
    if (folder / DONE).is_file() and not any((folder / name).is_file() for name in WEIGHTS):
        shutil.rmtree(folder)


def _row(record: dict[str, Any], lab_dir: Path, base: dict[str, Any]) -> dict[str, Any]:
    folder = lab_dir / "runs" / record["folder"] / "eval"
    router = folder / "router.json"
    return run_row(record, json.loads((folder / "eval.json").read_text()), base,
                   json.loads(router.read_text()) if router.is_file() else None)


def lab(
    lab_config: Path | None = None,
    quick: bool = False,
    full: bool = False,
    output: Path = Path("runs/lab"),
    init_config: Path | None = None,
) -> dict[str, Any]:
    """Reproduce knowledge forgetting under instruction tuning, and its cure, in small.

    Args:
        lab_config: a lab settings file (YAML), also given as ``--config``; keys it leaves out
            keep the shipped defaults. Start from a copy: ``loramoe lab --init-config my.yaml``.
        quick: the quick profile (about 5 minutes on a 2-core CPU; what CI runs).
        full: the full profile (real sizes; for a GPU).
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
    if quick and full:
        raise ValueError("--quick and --full exclude each other")
    settings = load_config(lab_config, "quick" if quick else "full" if full else None)
    started = time.time()
    output = Path(output)
    mix = build_mix(settings.mix, output / "mix", settings.seed)
    runs = plan(settings, mix)
    if settings.model in EMBEDDED:  # once per machine, and not part of the pace the time left is drawn from
        embedded_model_dir(settings.model)
    # smoothing=0: the time left follows the pace of the whole lab so far, not of its last run
    progress = tqdm(total=sum(_cost(r) for r in runs) + BASE_EVAL_SECONDS, unit="s", desc="lab", smoothing=0,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
    progress.set_postfix_str("scoring the base model")
    key = scoring_key(settings, mix)
    base_eval, base_evaluation, base_cached = score_base(settings, mix, output, key)
    _account(progress, BASE_EVAL_SECONDS, base_cached)
    base = base_row(base_evaluation)
    for run in runs:  # before any run: a first stage to redo comes before its second stage
        forget_stale_score(run, output, key)
        _parent_ready(run, output)
    rows = []
    for i, run in enumerate(runs, 1):
        progress.set_postfix_str(f"run {i}/{len(runs)}: {run.name}")
        cached = (run_folder(output, run) / DONE).is_file()
        record = execute(run, settings, mix, output, base_eval, key)
        finish_stage(run, output, settings)
        _account(progress, _cost(run), cached)
        if run.scored:
            rows.append(_row(record, output, base))
            progress.write(f"{run.name}: knowledge {rows[-1]['knowledge']:.1f}% ({rows[-1]['knowledge_change']:+.1f}), "
                           f"tasks {rows[-1]['task_score']:.1f}% ({rows[-1]['task_change']:+.1f})")
    progress.close()
    p, n = base["knowledge"] / 100, base["knowledge_questions"]
    results = {
        "lab": {"version": version("loramoe"), "model": settings.model, "sources": settings.sources, "runs": len(runs),
                "seconds": round(time.time() - started, 1), "settings": asdict(settings)},
        "mix": mix.counts,
        "base": base,
        "knowledge_stderr": 100 * math.sqrt(p * (1 - p) / max(n, 1)),
        "runs": rows,
        "findings": findings(rows, base),
    }
    atomic_write_text(output / "results.json", json.dumps(results, indent=2) + "\n")
    md, html = render(results, output)
    print(f"report: {md} and {html}")
    return results
