"""Validation during training: a held-out set (a file, or a deterministic share of the data), its
loss every ``eval_steps``, early stopping after ``early_stopping`` evaluations without improvement
(the Tied LoRA paper stops after 10), and the best checkpoint as the final adapter.

The Trainer does the evaluating, the stopping (``EarlyStoppingCallback``) and the choosing
(``load_best_model_at_end`` on ``eval_loss``); this module splits the data, checks the settings
against each other and reads the outcome back for ``train_summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback, TrainerState

from loramoe.data import Record
from loramoe.errors import UsageError

logger = logging.getLogger(__name__)


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
    """``(train, validation)``: at least ``ceil(share * n)`` records, those whose conversation hashes
    lowest, each with every copy of its conversation (whatever their type), so that no validation
    record is also trained on. The choice depends on each record alone, so it is the same in every
    run, in any order of the data, and a record added later does not move the others between the
    sets. One line gives the counts; a warning says why when far more than ``share`` is held out."""
    keys = [hashlib.sha256(json.dumps(record.messages, sort_keys=True).encode()).hexdigest() for record in records]
    copies = Counter(keys)
    wanted = math.ceil(round(share * len(records), 9))  # 0.1 * 30 is 3.0000000000000004, not a reason for 4
    held, chosen = 0, set()
    for digest in sorted(copies):
        if held >= wanted:
            break
        chosen.add(digest)
        held += copies[digest]
    if held >= len(records):
        copied = " (all are copies of one conversation, which stay on one side)" if len(copies) == 1 else ""
        raise UsageError(f"--val-split {share} of {len(records)} records leaves none to train on{copied}")
    _report(share, held, len(records), wanted)
    split: tuple[list[Record], list[Record]] = ([], [])
    for record, digest in zip(records, keys):
        split[digest in chosen].append(record)
    return split


def _report(share: float, held: int, total: int, wanted: int) -> None:
    line = (f"--val-split {share:g}: {held} of {total} records held out for validation "
            f"({100 * held / total:.3g} %), {total - held} train")
    if held < 2 * share * total:
        logger.warning("%s", line)
        return
    why = [f"{share:g} of {total} records rounds up to {wanted}"] if wanted >= 2 * share * total else []
    if held > wanted:
        why.append(f"{held - wanted} more are copies of held-out conversations, which stay on one side")
    warnings.warn(f"{line}, far more than the {100 * share:.3g} % asked: {' and '.join(why)}; give more records, "
                  "another --val-split, or --val-data", stacklevel=3)


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
