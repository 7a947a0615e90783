"""The ``loramoe`` command: each subcommand is a typed function; jsonargparse turns its signature
into flags and also reads the same keys from a YAML/JSON file given with ``--config``."""

from __future__ import annotations

from jsonargparse import auto_cli

from loramoe.demo import run_demo


def main(argv: list[str] | None = None) -> None:
    auto_cli({"demo": run_demo}, args=argv, as_positional=False)


if __name__ == "__main__":
    main()
