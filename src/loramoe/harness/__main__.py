"""``python -m loramoe.harness [lm-eval's flags]``: lm-eval's own command line with the model
``loramoe`` registered. The ``lm_eval`` command cannot find it: it imports only its own models,
and ``--include_path`` reads task files, never Python. loramoe's own errors (a missing adapter
folder, a bad option) print as one line, as the ``loramoe`` command prints them; ``LORAMOE_DEBUG=1``
shows their traceback."""

from __future__ import annotations

import os
import sys

import loramoe.harness  # noqa: F401  (registers the model `loramoe`)
from loramoe.errors import LoramoeError


def main() -> None:
    # imported after loramoe.harness, which names the extra to install where lm-eval is missing
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except LoramoeError as error:
        if os.environ.get("LORAMOE_DEBUG", "").lower() not in ("", "0", "false", "no"):
            raise
        message = " ".join(str(error).split("\n"))
        print(f"loramoe: error: {message} (LORAMOE_DEBUG=1 shows where)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
