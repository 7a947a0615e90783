"""``python -m loramoe.harness [lm-eval's flags]``: lm-eval's own command line with the model
``loramoe`` registered. The ``lm_eval`` command cannot find it: it imports only its own models,
and ``--include_path`` reads task files, never Python. loramoe's own errors (a missing adapter
folder, a bad option) print as one line, as the ``loramoe`` command prints them; ``LORAMOE_DEBUG=1``
shows their traceback."""

from __future__ import annotations

import loramoe.harness  # noqa: F401  (registers the model `loramoe`)
from loramoe.errors import debug_requested, one_line_errors


def main() -> None:
    # imported after loramoe.harness, which names the extra to install where lm-eval is missing
    from lm_eval.__main__ import cli_evaluate

    with one_line_errors(debug_requested(), "LORAMOE_DEBUG=1 shows where"):
        cli_evaluate()


if __name__ == "__main__":
    main()
