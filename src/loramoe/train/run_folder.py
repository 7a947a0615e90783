"""A training run's folder holds one run: what may go into it, and when a run may continue in it.

``loramoe train --output DIR`` refuses a folder that holds anything, unless ``--overwrite`` (it is
cleared first, if it is a run folder) or ``--resume`` (the run continues from its last complete
checkpoint, if that checkpoint was written by a run with the same settings and the same data).
Without this, a second run into the same folder would mix its files with the first one's, and a
resume with other data or settings would report "resumed" and hand back the first run's weights.

A run's *identity* is what decides its result: every setting but the ones that only say where and
how often to write, plus a hash of the records read. The trainer writes it into each checkpoint's
completion marker; ``--resume`` compares it with the new run's and names the first difference.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loramoe.data import Record, record_content
from loramoe.errors import OutputFolderError, UsageError
from loramoe.fileio import WRITE_CHECK, ensure_writable_folder

RUN_FILES = ("train_config.yaml", "train_summary.json", "adapter_config.json", "adapter_model.safetensors",
             "model.safetensors", "config.json", "checkpoints", "logs")
"""Names that only a run folder holds: ``--overwrite`` clears a folder that has one of them."""

NOT_IDENTITY = {"data", "val_data", "columns", "output", "resume", "overwrite", "logging_steps", "save_steps",
                "save_total_limit",
                "trust_remote_code", "gradient_checkpointing", "skip_bad_records", "require_types", "callbacks"}
"""Settings that do not change what a run computes: where it reads and writes (the data enter
through their hash), how often it logs and saves, what it checks, and how it trades memory for
time (gradient checkpointing gives the same training). The data, as read and mapped into records,
enter through their hash."""


def data_hash(records: Sequence[Record]) -> str:
    """SHA-256 of the records' conversations and types, in order: equal for the same data in
    another file, path or format."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record_content(record))
        digest.update(b"\n")
    return digest.hexdigest()


def run_identity(settings: Mapping[str, Any], records: Sequence[Record],
                 val_records: Sequence[Record] = ()) -> dict[str, Any]:
    """The settings that decide a run's result, and the hashes of its data and validation data."""
    identity = {key: value for key, value in settings.items() if key not in NOT_IDENTITY}
    identity["data_sha256"] = data_hash(records)
    if val_records:
        identity["val_data_sha256"] = data_hash(val_records)
    return identity


def prepare_output(output: Path, *, resume: bool, overwrite: bool) -> bool:
    """Check ``output`` before any work: a writable folder, empty unless ``resume`` or ``overwrite``
    allows what it holds. Returns whether it holds files (to clear with ``overwrite``, or a run
    to continue with ``resume``)."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in "
                         "--output, --overwrite deletes it")
    # another process of the same run may be probing the folder (ensure_writable_folder's file)
    held = sorted(p.name for p in output.iterdir() if not p.name.startswith(WRITE_CHECK)) if output.is_dir() else []
    if held and not (resume or overwrite):
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise OutputFolderError(f"--output {output}: the folder is not empty ({shown}); a run folder holds "
                                "one run: give a new folder, --resume to continue the run in it, or "
                                "--overwrite to delete it and start again")
    if held and overwrite and not any(name in RUN_FILES for name in held):
        raise OutputFolderError(f"--output {output}: --overwrite deletes only a run folder, and this one holds "
                                f"no run ({', '.join(held[:4])}); give a new folder")
    ensure_writable_folder(output, "--output")
    return bool(held)


def clear(output: Path) -> None:
    """Delete what ``output`` holds (``--overwrite``, once the new run's input has been checked)."""
    for entry in output.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_resume(checkpoint: Path, saved: Mapping[str, Any] | None, identity: Mapping[str, Any]) -> None:
    """Refuse to continue from ``checkpoint`` (whose marker recorded ``saved``) a run whose identity
    differs, naming the first difference."""
    if saved is None:
        raise OutputFolderError(f"--resume: {checkpoint} records no settings (an older loramoe wrote it), so "
                                "it cannot be checked against this run; train into a new folder or --overwrite")
    for key in dict.fromkeys([*identity, *saved]):
        # a setting added since the checkpoint was written is absent from it: its default, None, matches
        if saved.get(key) != identity.get(key):
            if key in ("data_sha256", "val_data_sha256"):
                what = f"other {'validation ' if key.startswith('val') else ''}data (the records' hash differs)"
            else:
                flag = "--" + key.replace("_", "-")
                what = f"{flag} {saved.get(key, '(not set)')!r}, this run has {identity.get(key, '(not set)')!r}"
            raise OutputFolderError(f"--resume: {checkpoint} was trained with {what}; resume with the same "
                                    "settings and data, or train into a new folder")
