"""Validation during training: a held-out set (a file, or a deterministic share of the data), its
loss every ``eval_steps``, early stopping after ``early_stopping`` evaluations without improvement
(the Tied LoRA paper stops after 10), and the best checkpoint as the final adapter.

The Trainer does the evaluating, the stopping (``EarlyStoppingCallback``) and the choosing
(``load_best_model_at_end`` on ``eval_loss``); this module splits the data, checks the settings
against each other and reads the outcome back for ``train_summary.json``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback, TrainerState

from loramoe.data import Record, record_content
from loramoe.errors import UsageError


def check_validation(s: Mapping[str, Any]) -> None:
    """Refuse validation settings that contradict each other, naming the flags."""
    if s["val_data"] and s["val_split"] is not None:
        raise UsageError("--val-data and --val-split both give a validation set; choose one")
    if s["val_split"] is not None and not 0 < s["val_split"] < 1:
        raise UsageError(f"--val-split must be in (0, 1), a share of the records, got {s['val_split']}")
    validating = bool(s["val_data"]) or s["val_split"] is not None
    for flag in ("eval_steps", "early_stopping"):
        if s[flag] is not None and not validating:
            raise UsageError(f"--{flag.replace('_', '-')} needs a validation set: give --val-data or --val-split")
        if s[flag] is not None and s[flag] < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {s[flag]}")
    if validating and s["save_steps"] % eval_steps(s) != 0:
        raise UsageError(f"--save-steps {s['save_steps']} must be a multiple of --eval-steps {eval_steps(s)}: the "
                         "best checkpoint is chosen among the saved ones, each of which needs its validation loss")


def eval_steps(s: Mapping[str, Any]) -> int:
    """Validation every ``--eval-steps``, by default at every checkpoint."""
    return s["eval_steps"] if s["eval_steps"] is not None else s["save_steps"]


def split_validation(records: Sequence[Record], share: float) -> tuple[list[Record], list[Record]]:
    """``(train, validation)``: the ``ceil(share * n)`` records whose content hashes lowest. The
    choice depends on each record alone, so it is the same in every run, in any order of the data,
    and a record added later does not move the others between the sets."""
    def key(record: Record) -> str:
        return hashlib.sha256(record_content(record)).hexdigest()

    count = math.ceil(share * len(records))
    if count >= len(records):
        raise UsageError(f"--val-split {share} of {len(records)} records leaves none to train on")
    held = set(sorted(range(len(records)), key=lambda i: key(records[i]))[:count])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def training_arguments(s: Mapping[str, Any], validating: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` that evaluate, and keep and restore the best checkpoint."""
    if not validating:
        return {}
    return {"eval_strategy": "steps", "eval_steps": eval_steps(s), "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss", "greater_is_better": False, "prediction_loss_only": True,
            "per_device_eval_batch_size": s["batch_size"]}


def callbacks(s: Mapping[str, Any]) -> list[TrainerCallback]:
    if s["early_stopping"] is None:
        return []
    return [EarlyStoppingCallback(early_stopping_patience=s["early_stopping"])]


def outcome(state: TrainerState, records: int) -> dict[str, Any]:
    """What validation decided, for ``train_summary.json``."""
    losses = [[entry["step"], entry["eval_loss"]] for entry in state.log_history if "eval_loss" in entry]
    best = state.best_model_checkpoint
    best_step = int(best.rsplit("-", 1)[1]) if best else None
    return {"records": records, "losses": losses, "best_step": best_step, "best_loss": state.best_metric,
            "final_adapter": f"the best checkpoint, step {best_step}" if best else "the last step",
            "stopped_early": state.max_steps > 0 and state.global_step < state.max_steps}
