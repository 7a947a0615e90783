"""The ``loramoe`` command: each subcommand is a typed function; jsonargparse turns its signature
and docstring into flags and help, and reads the same keys from a YAML/JSON ``--config`` file.

Flags and config keys are accepted in both spellings, ``--max-steps`` and ``--max_steps``."""

from __future__ import annotations

import re
import sys
from typing import Any

import yaml
from jsonargparse import auto_cli, set_loader

from loramoe.demo import run_demo
from loramoe.evaluate import evaluate
from loramoe.train import train

_FLAG = re.compile(r"^--([a-z0-9]+(?:-[a-z0-9]+)+)(=.*)?$")


def _underscored(value: Any) -> Any:
    if isinstance(value, dict):
        return {(k.replace("-", "_") if isinstance(k, str) else k): v for k, v in value.items()}
    return value


def _load_config(text: str) -> Any:
    return _underscored(yaml.safe_load(text))


def _normalise_flags(argv: list[str]) -> list[str]:
    return [f"--{m.group(1).replace('-', '_')}{m.group(2) or ''}" if (m := _FLAG.match(a)) else a for a in argv]


def main(argv: list[str] | None = None) -> None:
    set_loader("loramoe_yaml", _load_config)
    args = _normalise_flags(sys.argv[1:] if argv is None else argv)
    auto_cli({"demo": run_demo, "train": train, "eval": evaluate}, args=args, as_positional=False, parser_mode="loramoe_yaml")


if __name__ == "__main__":
    main()
