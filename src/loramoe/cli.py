"""The ``loramoe`` command: each subcommand is a typed function; jsonargparse turns its signature
and docstring into flags and help, and reads the same keys from a YAML/JSON ``--config`` file.

Flags and config keys are accepted in both spellings, ``--max-steps`` and ``--max_steps``, and
list flags take their values one after another (``--data a.jsonl b.csv``)."""

from __future__ import annotations

import json
import os
import re
import sys
import typing
from typing import Any

import yaml
from jsonargparse import auto_cli, set_loader

from loramoe.convert import convert
from loramoe.demo import run_demo
from loramoe.errors import LoramoeError, UsageError
from loramoe.evaluate import evaluate
from loramoe.generate import generate
from loramoe.lab import lab
from loramoe.scaling import scaling
from loramoe.train import train

_FLAG = re.compile(r"^--([a-z0-9]+(?:-[a-z0-9]+)+)(=.*)?$")


def _underscored(value: Any) -> Any:
    if isinstance(value, dict):
        return {(k.replace("-", "_") if isinstance(k, str) else k): v for k, v in value.items()}
    return value


PAPER_ALIASES = {"lora_nums": "num_experts", "blc_alpha": "balance_delta", "blc_weight": "balance_weight"}
"""Config keys of the paper's code (Ablustrund/LoRAMoE), read as ours."""


def _load_config(text: str) -> Any:
    config = _underscored(yaml.safe_load(text))
    if isinstance(config, dict):
        for theirs, ours in PAPER_ALIASES.items():
            if theirs in config:
                if ours in config:
                    raise UsageError(f"config: both '{theirs}' (the paper code's name) and '{ours}' are set; keep one")
                print(f"loramoe: note: config key '{theirs}' is read as '{ours}'", file=sys.stderr)
                config[ours] = config.pop(theirs)
    return config


COMMANDS = {"lab": lab, "demo": run_demo, "train": train, "eval": evaluate, "generate": generate,
            "scaling": scaling, "convert": convert}
LIST_FLAGS = {"--data", "--val_data", "--target_modules", "--train_data", "--columns"}
"""Flags that take several values, written the usual way: ``--data a.jsonl b.csv``."""
BOOL_FLAGS = {f"--{name}" for command in COMMANDS.values()
              for name, kind in typing.get_type_hints(command).items() if kind is bool}
"""Switches: ``--quick`` alone means ``--quick true`` (jsonargparse wants the value)."""

COMMA_LIST_FLAGS = {"scaling": {"--method", "--ranks"}}
"""Per subcommand, list flags that also take comma-separated values (``--ranks 1,2,4``); only
there, since ``--method`` names one method in ``train`` and a regex in ``--target-modules`` may
hold a comma."""


def _normalise_flags(argv: list[str]) -> list[str]:
    """Dashed flags to jsonargparse's underscored ones, ``--data a b`` to ``--data '["a","b"]'`` and a
    bare switch to ``--switch true``."""
    out: list[str] = []
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    comma_flags = COMMA_LIST_FLAGS.get(command, set())
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag = f"--{m.group(1).replace('-', '_')}{m.group(2) or ''}" if (m := _FLAG.match(arg)) else arg
        i += 1
        if flag in LIST_FLAGS or flag in comma_flags:
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            if flag in comma_flags and not (len(values) == 1 and values[0].lstrip().startswith("[")):
                values = [part for value in values for part in value.split(",") if part]
            already_a_list = len(values) == 1 and values[0].lstrip().startswith("[")
            out += [flag, values[0] if already_a_list else json.dumps(values)]
            continue
        out.append(flag)
        if flag in BOOL_FLAGS and (i == len(argv) or argv[i].startswith("--")):
            out.append("true")
    return out


POSITIONAL = {"generate": ["prompt"], "convert": ["src", "dst"]}
"""Per subcommand, the parameters its bare arguments fill, in order: ``loramoe generate "text"``,
``loramoe convert SRC DST``."""


def _positionals(argv: list[str]) -> list[str]:
    """Bare arguments (ones no flag takes as its value) as the flags of ``POSITIONAL``."""
    names = list(POSITIONAL.get(argv[0], [])) if argv else []
    if not names:
        return argv
    out, i = [argv[0]], 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            out.append(arg)
            takes_value = "=" not in arg and f"--{arg[2:].replace('-', '_')}" not in BOOL_FLAGS
            if takes_value and i + 1 < len(argv):
                out.append(argv[i + 1])
                i += 1
        elif names:
            out += [f"--{names.pop(0)}", arg]
        else:
            raise UsageError(f"{argv[0]}: unexpected argument {arg!r} (it takes {', '.join(POSITIONAL[argv[0]])})")
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand. The project's own errors (bad data, adapters, settings, missing or occupied
    folders) print as one line, ``loramoe: error: <message>``, with exit code 1; ``--debug``, anywhere
    on the line, or ``LORAMOE_DEBUG=1`` lets them show their traceback. Other exceptions are bugs,
    and show theirs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LORAMOE_DEBUG", "").lower() not in ("", "0", "false", "no")
    argv = [arg for arg in argv if arg != "--debug"]
    set_loader("loramoe_yaml", _load_config)
    try:
        args = _normalise_flags(_positionals(argv))
        if args[:1] == ["lab"]:  # the lab's settings file is not a file of its flags (jsonargparse's --config)
            args = [re.sub(r"^--config(?==|$)", "--lab_config", arg) for arg in args]
        auto_cli(COMMANDS, args=args, as_positional=False, parser_mode="loramoe_yaml")
    except LoramoeError as error:
        if debug:
            raise
        message = " ".join(str(error).split("\n"))
        print(f"loramoe: error: {message} (--debug shows where)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
