"""The command line's parsing: every boolean flag of every command with ``true``, ``false`` and
bare, the parsed value reaching the command and its bare arguments landing where they belong; and
``--config`` files that cannot be used, refused in one line. The commands are replaced by recorders
with their signatures, so nothing trains or loads a model, except in the end-to-end runs."""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
import typing

import pytest

from loramoe import cli
from loramoe.cli import main as cli_main
from tests.conftest import child_env
from tests.test_model_folder_errors import custom_code_folder

SWITCHES = [(command, name) for command, function in cli.COMMANDS.items()
            for name, kind in typing.get_type_hints(function).items() if kind is bool]


@pytest.fixture
def called(monkeypatch) -> dict[str, dict]:
    """What each command was called with, by command name."""
    seen: dict[str, dict] = {}

    def recorder(name, function):
        @functools.wraps(function)  # jsonargparse builds the flags from the wrapped signature
        def record(**kwargs):
            seen[name] = kwargs
        return record

    for name, function in list(cli.COMMANDS.items()):
        monkeypatch.setitem(cli.COMMANDS, name, recorder(name, function))
    return seen


def _bare_arguments(command: str) -> list[str]:
    return [f"bare{i}" for i, _ in enumerate(cli.POSITIONAL.get(command, []))]


def _required_flags(command: str) -> list[str]:
    """A value for each required parameter that is not filled by a bare argument."""
    required = [name for name, parameter in inspect.signature(cli.COMMANDS[command]).parameters.items()
                if parameter.default is inspect.Parameter.empty and name not in cli.POSITIONAL.get(command, [])]
    return [arg for name in required for arg in (f"--{name}", "x")]


def test_every_command_with_switches_is_covered():
    assert {"trust_remote_code", "show_routing", "chat", "quick", "overwrite"} <= {name for _, name in SWITCHES}


@pytest.mark.parametrize("command,name", SWITCHES)
@pytest.mark.parametrize("given,expected", [(["true"], True), (["false"], False), ([], True)])
def test_switch_value_reaches_the_command(called, command, name, given, expected):
    bare = _bare_arguments(command)
    cli_main([command, f"--{name.replace('_', '-')}", *given, *bare, *_required_flags(command)])
    assert called[command][name] is expected
    for parameter, value in zip(cli.POSITIONAL.get(command, []), bare):
        assert str(called[command][parameter]) == value


@pytest.mark.parametrize("command,name", SWITCHES)
@pytest.mark.parametrize("value,expected", [("true", True), ("false", False)])
def test_switch_with_equals_and_last_on_the_line(called, command, name, value, expected):
    bare = _bare_arguments(command)
    cli_main([command, *bare, *_required_flags(command), f"--{name.replace('_', '-')}={value}"])
    assert called[command][name] is expected
    cli_main([command, *bare, *_required_flags(command), f"--{name.replace('_', '-')}"])
    assert called[command][name] is True


@pytest.mark.parametrize("word,expected", [("True", True), ("FALSE", False), ("yes", True), ("no", False),
                                           ("on", True), ("off", False)])
def test_switch_takes_every_boolean_word_jsonargparse_reads(called, word, expected):
    cli_main(["generate", "--show-routing", word, "Hello"])
    assert called["generate"]["show_routing"] is expected
    assert called["generate"]["prompt"] == "Hello"


def test_switch_before_a_prompt_leaves_the_prompt_alone(called):
    cli_main(["generate", "--chat", "--show_routing", "false", "--trust-remote-code", "Hello", "--seed", "3"])
    assert {key: called["generate"][key] for key in ("chat", "show_routing", "trust_remote_code", "prompt", "seed")} \
        == {"chat": True, "show_routing": False, "trust_remote_code": True, "prompt": "Hello", "seed": 3}


def test_trust_remote_code_false_runs_no_code_end_to_end(tmp_path, capsys):
    marker = tmp_path / "marker"
    model = custom_code_folder(tmp_path / "custom", marker)
    env = child_env(HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "loramoe.cli", "generate", "--prompt", "Hello", "--model", str(model),
                          "--trust-remote-code", "false"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert not marker.exists()
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"loramoe: error: --model {model}: "), run.stderr
    assert "--trust-remote-code" in lines[0]
    # without the flag, in this process: a child costs seconds of imports
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["generate", "--prompt", "Hello", "--model", str(model)])
    assert exit_.value.code == 1 and not marker.exists()
    assert capsys.readouterr().err.strip() == lines[0]
    # the folder's code does run once trusted, so the refusals above are real ones
    trusted = f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(model)!r}, trust_remote_code=True)"
    subprocess.run([sys.executable, "-c", trusted], env=env, capture_output=True, timeout=300, check=True)
    assert marker.exists()


@pytest.fixture
def bad_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "syntax.yaml").write_text("max_steps: 3\nmodel: [a, b\n")
    (tmp_path / "unknown.yaml").write_text("max_steps: 3\nbogus_key: 1\n")
    return tmp_path


def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err, err
    return err.strip()


@pytest.mark.parametrize("command", ["train", "lab"])
def test_config_with_a_syntax_error(bad_configs, capsys, command):
    err = _one_line_error(capsys, [command, "--config", "syntax.yaml", *_required_flags(command)])
    assert err.startswith("loramoe: error: --config syntax.yaml: not valid YAML at line 3, column 1: expected ',' or "
                          "']'"), err
    assert "line 2, column 8" in err


@pytest.mark.parametrize("command", ["train", "lab"])
def test_missing_config_file(bad_configs, capsys, command):
    err = _one_line_error(capsys, [command, "--config=nothere.yaml", *_required_flags(command)])
    assert err.startswith("loramoe: error: --config nothere.yaml: no such file"), err


def test_config_with_an_unknown_key(bad_configs, capsys):
    err = _one_line_error(capsys, ["train", "--config", "unknown.yaml"])
    assert err.startswith("loramoe: error: --config unknown.yaml, line 2: unknown key 'bogus_key' for loramoe train")
    (bad_configs / "typo.yaml").write_text("max-new-token: 3\n")
    assert "did you mean 'max_new_tokens'?" in _one_line_error(capsys, ["generate", "Hello", "--config", "typo.yaml"])


def test_lab_config_with_an_unknown_key(bad_configs, capsys):
    assert "unknown key 'bogus_key'" in _one_line_error(capsys, ["lab", "--config", "unknown.yaml"])


def test_config_with_the_paper_name_and_ours_names_the_file(bad_configs, capsys):
    (bad_configs / "both.yaml").write_text("num_experts: 4\nlora_nums: 2\n")
    assert _one_line_error(capsys, ["train", "--config", "both.yaml"]).startswith(
        "loramoe: error: --config both.yaml, line 2: both 'lora_nums' (the paper code's name) and 'num_experts'")


def test_config_that_holds_no_settings(bad_configs, capsys):
    (bad_configs / "list.yaml").write_text("- max_steps\n")
    assert "holds a list, not settings" in _one_line_error(capsys, ["train", "--config", "list.yaml"])


def test_good_config_still_reaches_the_command(bad_configs, called):
    (bad_configs / "good.yaml").write_text("data: [a.jsonl]\nmax-steps: 3\nlora_nums: 2\n")
    cli_main(["train", "--config", "good.yaml", "--overwrite", "false"])
    assert {key: called["train"][key] for key in ("data", "max_steps", "num_experts", "overwrite")} \
        == {"data": ["a.jsonl"], "max_steps": 3, "num_experts": 2, "overwrite": False}
    cli_main(["train", "--config", "{data: [b.jsonl], max_steps: 4}"])
    assert called["train"]["data"] == ["b.jsonl"] and called["train"]["max_steps"] == 4
