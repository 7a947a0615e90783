"""The ``loramoe`` command: each subcommand is a typed function; jsonargparse turns its signature
and docstring into flags and help, and reads the same keys from a YAML/JSON ``--config`` file.

Flags and config keys are accepted in both spellings, ``--max-steps`` and ``--max_steps``, and
list flags take their values one after another (``--data a.jsonl b.csv``). A switch alone is true,
and takes a ``true`` or ``false`` after it as its value. A ``--config`` file that is missing, not
YAML or holds a key no flag has is refused in one line, as any other setting is."""

from __future__ import annotations

import difflib
import inspect
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import auto_cli, set_loader

from loramoe.convert import convert
from loramoe.demo import run_demo
from loramoe.errors import MissingFileError, UsageError, debug_requested, one_line_errors
from loramoe.evaluate import evaluate
from loramoe.generate import generate
from loramoe.lab import lab
from loramoe.scaling import scaling
from loramoe.serve import serve
from loramoe.train import train

_FLAG = re.compile(r"^--([a-z0-9]+(?:-[a-z0-9]+)+)(=.*)?$")


def _underscored(value: Any) -> Any:
    if isinstance(value, dict):
        return {(k.replace("-", "_") if isinstance(k, str) else k): v for k, v in value.items()}
    return value


PAPER_ALIASES = {"lora_nums": "num_experts", "blc_alpha": "balance_delta", "blc_weight": "balance_weight"}
"""Config keys of the paper's code (Ablustrund/LoRAMoE), read as ours."""


def _alias_clash(config: dict) -> tuple[str, str] | None:
    """A key of the paper's code and ours for the same setting, both given."""
    return next(((theirs, ours) for theirs, ours in PAPER_ALIASES.items() if theirs in config and ours in config),
                None)


def _clash_message(clash: tuple[str, str]) -> str:
    return f"both '{clash[0]}' (the paper code's name) and '{clash[1]}' are set; keep one"


def _load_config(text: str) -> Any:
    config = _underscored(yaml.safe_load(text))
    if isinstance(config, dict):
        if clash := _alias_clash(config):
            raise UsageError(f"config: {_clash_message(clash)}")
        for theirs, ours in PAPER_ALIASES.items():
            if theirs in config:
                print(f"loramoe: note: config key '{theirs}' is read as '{ours}'", file=sys.stderr)
                config[ours] = config.pop(theirs)
    return config


COMMANDS = {"lab": lab, "demo": run_demo, "train": train, "eval": evaluate, "generate": generate,
            "scaling": scaling, "convert": convert, "serve": serve}
LIST_FLAGS = {"--data", "--val_data", "--target_modules", "--train_data", "--columns", "--harness"}
"""Flags that take several values, written the usual way: ``--data a.jsonl b.csv``."""
BOOL_FLAGS = {f"--{name}" for command in COMMANDS.values()
              for name, kind in typing.get_type_hints(command).items() if kind is bool}
"""Switches: ``--quick`` alone means ``--quick true`` (jsonargparse wants the value); followed by a
word jsonargparse reads as a boolean (``true``, ``False``, ``no``, ``on``...) they take it as theirs."""


def _boolean_word(arg: str) -> bool:
    """Whether jsonargparse, which reads a flag's value as YAML, reads ``arg`` as true or false."""
    return arg.isalpha() and isinstance(yaml.safe_load(arg), bool)


COMMAND_LIST_FLAGS = {"serve": {"--adapter"}}
"""Per subcommand, list flags whose name is a single value's elsewhere (``serve --adapter a=X b=Y``,
and ``--adapter a=X --adapter b=Y`` alike)."""

COMMA_LIST_FLAGS = {"scaling": {"--method", "--ranks"}, "eval": {"--harness"}}
"""Per subcommand, list flags that also take comma-separated values (``--ranks 1,2,4``, ``--harness
arc_easy,hellaswag`` as lm-eval's ``--tasks`` does); only there, since ``--method`` names one method
in ``train`` and a regex in ``--target-modules`` may hold a comma."""


def _normalise_flags(argv: list[str]) -> list[str]:
    """Dashed flags to jsonargparse's underscored ones, ``--data a b`` to ``--data '["a","b"]'`` and a
    switch without a boolean word after it to ``--switch true``."""
    out: list[str] = []
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    comma_flags = COMMA_LIST_FLAGS.get(command, set())
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag = f"--{m.group(1).replace('-', '_')}{m.group(2) or ''}" if (m := _FLAG.match(arg)) else arg
        i += 1
        if flag in LIST_FLAGS or flag in comma_flags or flag in COMMAND_LIST_FLAGS.get(command, set()):
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            if flag in comma_flags and not (len(values) == 1 and values[0].lstrip().startswith("[")):
                values = [part for value in values for part in value.split(",") if part]
            already_a_list = len(values) == 1 and values[0].lstrip().startswith("[")
            if not already_a_list and flag in out:  # a repeated list flag adds to its values
                at = out.index(flag) + 1
                out[at] = json.dumps([*json.loads(out[at]), *values])
                continue
            out += [flag, values[0] if already_a_list else json.dumps(values)]
            continue
        out.append(flag)
        if flag in BOOL_FLAGS:
            if i < len(argv) and _boolean_word(argv[i]):
                out.append(argv[i])
                i += 1
            else:
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
            switch = f"--{arg[2:].replace('-', '_')}" in BOOL_FLAGS
            if "=" not in arg and i + 1 < len(argv) and (not switch or _boolean_word(argv[i + 1])):
                out.append(argv[i + 1])
                i += 1
        elif names:
            out += [f"--{names.pop(0)}", arg]
        else:
            raise UsageError(f"{argv[0]}: unexpected argument {arg!r} (it takes {', '.join(POSITIONAL[argv[0]])})")
        i += 1
    return out


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error as one clause with 1-based line and column (its own text spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return " ".join(str(error).split())
    problem = f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and start is not None and (start.line, start.column) != (mark.line, mark.column):
        return f"{problem} ({context} at line {start.line + 1}, column {start.column + 1})"
    return f"{problem} ({context})" if context else problem


def _check_config(command: str, given: str) -> None:
    """Refuse a ``--config`` file before jsonargparse reads it: jsonargparse shows a traceback for
    bad YAML and a usage block for a missing file or an unknown key, not one line naming the file."""
    where, path = f"--config {given}", Path(given)
    if path.is_dir():
        raise UsageError(f"{where}: a folder, not a settings file")
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"{where}: cannot be read ({error})") from error
    else:
        try:
            inline = yaml.safe_load(given)  # jsonargparse also takes the settings themselves: --config '{a: 1}'
        except yaml.YAMLError:
            inline = None
        if not isinstance(inline, dict):
            raise MissingFileError(f"{where}: no such file")
        text = given
    try:
        node, settings = yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UsageError(f"{where}: not valid YAML at {_yaml_problem(error)}") from error
    if not isinstance(settings, dict):
        held = "nothing" if settings is None else f"a {type(settings).__name__}"
        raise UsageError(f"{where}: holds {held}, not settings (one 'key: value' line per flag)")
    if command == "lab":  # the lab's own settings file: lab.config knows its keys
        return
    known = set(inspect.signature(COMMANDS[command]).parameters) | set(PAPER_ALIASES)
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}
    unknown = [key for key in settings if str(key).replace("-", "_") not in known]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key).replace("-", "_"), sorted(known), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"loramoe {command} --help lists the settings"
        at = f", line {lines[str(key)]}" if str(key) in lines else ""
        raise UsageError(f"{where}{at}: unknown key '{key}' for loramoe {command}; {hint}")
    if clash := _alias_clash(settings):
        raise UsageError(f"{where}, line {lines.get(clash[0], '?')}: {_clash_message(clash)}")


def _check_configs(args: list[str]) -> None:
    """:func:`_check_config` for each ``--config`` of a subcommand (one given before the subcommand
    is jsonargparse's alone)."""
    if not args or args[0] not in COMMANDS:
        return
    for flag, following in zip(args, [*args[1:], ""]):
        given = flag[len("--config="):] if flag.startswith("--config=") else following if flag == "--config" else ""
        if given:
            _check_config(args[0], given)


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand. The project's own errors (bad data, adapters, settings, missing or occupied
    folders) print as one line, ``loramoe: error: <message>``, with exit code 1; ``--debug``, anywhere
    on the line, or ``LORAMOE_DEBUG=1`` lets them show their traceback. Other exceptions are bugs,
    and show theirs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or debug_requested()
    argv = [arg for arg in argv if arg != "--debug"]
    set_loader("loramoe_yaml", _load_config)
    with one_line_errors(debug, "--debug shows where"):
        args = _normalise_flags(_positionals(argv))
        _check_configs(args)
        if args[:1] == ["lab"]:  # the lab's settings file is not a file of its flags (jsonargparse's --config)
            args = [re.sub(r"^--config(?==|$)", "--lab_config", arg) for arg in args]
        auto_cli(COMMANDS, args=args, as_positional=False, parser_mode="loramoe_yaml")

if __name__ == "__main__":
    main()
