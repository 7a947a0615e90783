"""The errors loramoe raises for a user's input or setup, as opposed to its own bugs.

Each message names what is wrong (the file, line and field, or the flag) and how to fix it, so
the command line prints it as one line (``loramoe: error: ...``, exit code 1) instead of a
traceback; ``--debug`` or ``LORAMOE_DEBUG=1`` shows the traceback too. Every class also derives
from the built-in error a Python caller would expect (``ValueError``, ``FileNotFoundError``...),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class LoramoeError(Exception):
    """Bad input or setup, fully explained by the message."""


class UsageError(LoramoeError, ValueError):
    """A flag, argument or setting has a value the run cannot use."""


class DataError(LoramoeError, ValueError):
    """Bad training data. The message starts with where (``path:line``, 1-based, for JSON Lines and
    CSV; ``path[i]``, 0-based, for JSON arrays, Parquet, datasets and lists) and names the field."""


class MissingFileError(LoramoeError, FileNotFoundError):
    """A file or folder the run needs is not there."""


class OutputFolderError(LoramoeError, FileExistsError):
    """The output folder holds another run, or cannot be written."""


class MissingPackageError(LoramoeError, ImportError):
    """An optional package the run asks for is not installed; the message names the extra to install."""


def debug_requested() -> bool:
    """Whether ``LORAMOE_DEBUG`` asks for tracebacks of the project's own errors."""
    return os.environ.get("LORAMOE_DEBUG", "").lower() not in ("", "0", "false", "no")


@contextmanager
def one_line_errors(debug: bool, how_to_debug: str) -> Iterator[None]:
    """A command's body: the project's own errors print as ``loramoe: error: <message>`` on one line
    and exit 1, unless ``debug`` (then their traceback shows); ``how_to_debug`` ends the line."""
    try:
        yield
    except LoramoeError as error:
        if debug:
            raise
        message = " ".join(str(error).split("\n"))
        print(f"loramoe: error: {message} ({how_to_debug})", file=sys.stderr)
        sys.exit(1)
