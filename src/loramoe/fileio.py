"""Writing files so that a reader never sees half of one: write a temporary file beside the
target, then rename it over the target (atomic on POSIX file systems).

``tempfile`` creates its files 0600 and its folders 0700, whatever the umask, so a file written
this way would stay unreadable to the other users an ordinary ``open`` lets read it (a shared
model cache, a run folder of a team). The temporary is given the mode ``open`` or ``mkdir`` would
have given it under the process's umask before it takes the target's name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from loramoe.errors import OutputFolderError

WRITE_CHECK = ".loramoe-write-check."
"""The name prefix of the file :func:`ensure_writable_folder` creates and deletes."""


def umask_mode(folder: bool = False) -> int:
    """The mode ``open`` (or, with ``folder``, ``mkdir``) gives a new file under the current umask."""
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path``, with the mode the umask gives a new
    file; on failure nothing is left."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def ensure_writable_folder(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be written in it, so
    that a command fails before its work rather than when it saves the result."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{flag} {path}: not a folder (a file of that name exists)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=WRITE_CHECK)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputFolderError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path
