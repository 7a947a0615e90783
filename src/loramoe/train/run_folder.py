"""A training run's folder holds one run: what may go into it, and when a run may continue in it.

``loramoe train --output DIR`` refuses a folder that holds anything, unless ``--overwrite`` (what
an earlier run wrote there is deleted first) or ``--resume`` (the run continues from its last
complete checkpoint, if that checkpoint was written by a run with the same settings and the same
data). Without this, a second run into the same folder would mix its files with the first one's,
and a resume with other data or settings would report "resumed" and hand back the first run's weights.

A run lists every name it writes at the top of its folder in ``run_manifest.json`` *before* the
name appears, so the list holds whatever a kill at any moment leaves. ``--overwrite`` deletes
those names and nothing else, and refuses a folder that holds any other (a user's sources, notes
or the training data itself), naming them: a folder is a run's only if the run says so.

A run's *identity* is what decides its result: every setting but the ones that only say where and
how often to write, plus a hash of the records read. The trainer writes it into each checkpoint's
completion marker; ``--resume`` compares it with the new run's and names the first difference.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loramoe.data import Record, record_content
from loramoe.errors import OutputFolderError, UsageError
from loramoe.fileio import WRITE_CHECK, atomic_write_text
from loramoe.folder_lock import LOCK_FILE

MANIFEST = "run_manifest.json"
"""The list of names a run wrote (or was about to write) at the top of its folder."""
FINAL_STAGING = ".final"
"""Where the final adapter or model is written before its files take their names in the run folder."""
RUN_NAMES = ("train_config.yaml", "train_summary.json", "checkpoints", "logs", FINAL_STAGING)
"""What every run writes besides its final adapter or model, whose names it records as it saves them."""

NOT_IDENTITY = {"data", "val_data", "columns", "output", "resume", "overwrite", "logging_steps", "save_steps",
                "save_total_limit",
                "trust_remote_code", "gradient_checkpointing", "skip_bad_records", "require_types", "strict_fields",
                "callbacks"}
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


def held_names(output: Path) -> list[str]:
    """What ``output`` holds, but for the files of this process's own checks: its lock, and a probe
    that another process of the same run may be writing (``ensure_writable_folder``)."""
    if not output.is_dir():
        return []
    return sorted(p.name for p in output.iterdir() if not p.name.startswith(WRITE_CHECK) and p.name != LOCK_FILE)


def read_manifest(output: Path) -> list[str] | None:
    """The names a run recorded in ``output``, or None where no run did."""
    path = output / MANIFEST
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise OutputFolderError(f"{path}: not a run manifest loramoe wrote (unreadable); delete the folder's "
                                "content yourself or give a new folder") from None
    if not (isinstance(names, list) and all(isinstance(n, str) and n and "/" not in n and n not in (".", "..")
                                            for n in names)):
        raise OutputFolderError(f"{path}: field 'files' must be a list of plain file names; delete the folder's "
                                "content yourself or give a new folder")
    return names


def record_names(output: Path, names: Sequence[str]) -> None:
    """Add ``names`` to ``output``'s manifest, before they are written (see the module's docstring)."""
    known = read_manifest(output) or []
    added = [n for n in names if n not in known]
    if added or not known:
        manifest = {"written_by": "loramoe train", "files": sorted({*known, *added, MANIFEST})}
        atomic_write_text(output / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def publish(staging: Path, output: Path) -> None:
    """Move what ``staging`` holds into ``output``, each name recorded in the manifest before it
    appears there."""
    names = sorted(p.name for p in staging.iterdir())
    record_names(output, names)
    for name in names:
        target = output / name
        if target.is_dir() and not target.is_symlink():  # a file is replaced in one step by os.replace
            _remove(target)
        os.replace(staging / name, target)
    staging.rmdir()


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def prepare_output(output: Path, *, resume: bool, overwrite: bool) -> bool:
    """Check ``output`` (a writable folder, held by this process) before any work: empty unless
    ``resume`` or ``overwrite`` allows what it holds. Returns whether it holds files (to clear with
    ``overwrite``, or a run to continue with ``resume``)."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: --resume continues the run in "
                         "--output, --overwrite deletes it")
    held = held_names(output)
    if held and not (resume or overwrite):
        raise OutputFolderError(f"--output {output}: the folder is not empty ({_shown(held)}); a run folder holds "
                                "one run: give a new folder, --resume to continue the run in it, or "
                                "--overwrite to delete it and start again")
    if held and overwrite:
        manifest = read_manifest(output)
        if manifest is None:
            raise OutputFolderError(f"--output {output}: --overwrite deletes only what a run wrote, listed in its "
                                    f"{MANIFEST}, and this folder has none ({_shown(held)}); give a new folder")
        others = [name for name in held if name not in manifest]
        if others:
            raise OutputFolderError(f"--output {output}: --overwrite deletes only what a run wrote, and this folder "
                                    f"also holds {_shown(others)}, which no run wrote; move them out or give a "
                                    "new folder")
    return bool(held)


def clear(output: Path) -> None:
    """Delete what the run in ``output`` wrote (``--overwrite``, once the new run's input has been
    checked), its manifest last so that a kill half-way leaves the rest listed."""
    for name in read_manifest(output) or []:
        if name != MANIFEST:
            _remove(output / name)
    (output / MANIFEST).unlink(missing_ok=True)


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
            elif key == "held_out_sha256":
                what = ("other records held out by --val-split (an older loramoe chose them, or the data "
                        "differ)")
            else:
                flag = "--" + key.replace("_", "-")
                what = f"{flag} {saved.get(key, '(not set)')!r}, this run has {identity.get(key, '(not set)')!r}"
            raise OutputFolderError(f"--resume: {checkpoint} was trained with {what}; resume with the same "
                                    "settings and data, or train into a new folder")
