"""One process at a time in an output folder: an exclusive OS lock held for a command's whole life.

Two ``loramoe train --output R`` started together would otherwise both find ``R`` empty, both
train, and write the same checkpoint names over each other: both exit 0 and the folder holds one
run's files, the other run's result lost without a word. The lock is ``flock`` on a file in the
folder, which the kernel releases when the process ends however it ends, so a killed run never
leaves a stale lock behind; the holder writes its process id into the file so that the refused
one can name it.

The holder deletes the file when it lets go. A process that opened the file just before could
then lock the deleted file while a third creates a new one and locks that: so a lock counts only
if the file it holds is still the one at the path, and is taken again otherwise.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loramoe.errors import OutputFolderError

LOCK_FILE = ".loramoe.lock"
"""The lock's file in a held folder; a folder's emptiness and ``--overwrite`` ignore it."""


def _holder(path: Path) -> str:
    # the holder writes its id right after it locks: give it a moment before calling it unknown
    for _ in range(20):
        try:
            pid = path.read_text().strip()
        except OSError:
            pid = ""
        if pid:
            return f"process {pid}"
        time.sleep(0.05)
    return "another process"


@contextmanager
def hold(folder: str | os.PathLike, flag: str, command: str) -> Iterator[None]:
    """Hold ``folder`` (which must exist) for the ``with`` block, or raise :class:`OutputFolderError`
    naming the process that holds it. ``flag`` and ``command`` name the folder in that message."""
    path = Path(folder) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputFolderError(f"{flag} {folder}: {_holder(path)} is using this folder (another "
                                    f"'loramoe {command}' into it); wait for it to end or give another "
                                    "folder") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
