"""Settings that would do nothing, or something other than they say, are errors (or one warning),
and the command line prints the project's own errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loramoe import cli
from loramoe.cli import main as cli_main
from loramoe.errors import MissingFileError, OutputFolderError, UsageError
from loramoe.train import train
from tests.conftest import child_env, typed_records
from tests.test_train import _common


@pytest.mark.parametrize(("setting", "message"), [
    ({"max_steps": 0}, "--max-steps must be at least 1, got 0"),
    ({"max_steps": -1}, "--max-steps must be at least 1, got -1 (leave it out"),
    ({"max_steps": None, "epochs": 0}, "--epochs must be above 0, got 0"),
    ({"grad_accum": 0}, "--grad-accum must be at least 1, got 0"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"save_total_limit": 0}, "--save-total-limit must be at least 1"),
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"method": "lora", "num_experts": 4}, "--num-experts: not a setting of --method lora"),
    ({"method": "full", "rank": 8}, "--rank: not a setting of --method full"),
    ({"method": "lora", "preset": "TL5"}, "--preset: not a setting of --method lora"),
])
def test_settings_that_train_nothing_or_are_ignored_are_refused_before_any_work(tmp_path, setting, message):
    settings = dict(_common("no-model-is-loaded", "no-data-is-read", dropout=None), **setting)
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        train(**settings, output=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_types_no_group_claims_are_counted_in_one_warning(tiny_model_dir, tmp_path):
    rows = typed_records(8) + [{"instruction": "w3", "output": "w4", "type": "chat"}] * 3 + [
        {"instruction": "w5", "output": "w6", "type": "qa"}]
    file = tmp_path / "typed.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=r"4 of 12 records have a type that no expert group claims \('chat': 3, "
                                         r"'qa': 1\); they train untyped\. Groups: knowledge, task"):
        train(**_common(tiny_model_dir, str(file), max_steps=1), output=tmp_path / "run")
    with pytest.raises(ValueError, match="field 'type' is 'chat', which no expert group claims"):
        train(**_common(tiny_model_dir, str(file), max_steps=1), output=tmp_path / "strict", require_types=True)


def test_num_experts_without_groups_says_it_drops_the_default_groups(tiny_model_dir, data_file, tmp_path):
    with pytest.warns(UserWarning) as caught:
        train(**_common(tiny_model_dir, data_file, max_steps=1, num_experts=4), output=tmp_path / "run")
    messages = [str(w.message) for w in caught]
    assert any("--num-experts 4 without --groups makes one pool" in m for m in messages)
    assert any("16 of 16 records have a type that no expert group claims" in m and "one pool" in m
               for m in messages)


def test_a_missing_model_path_is_no_such_folder(data_file, tmp_path):
    for given in ("./not-here", str(tmp_path / "not-here"), "a/b/c"):
        with pytest.raises(MissingFileError, match=f"--model {given}: no such folder"):
            train(**_common(given, data_file), output=tmp_path / "run")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(MissingFileError, match="a file, not a model folder"):
        train(**_common(str(tmp_path / "weights.bin"), data_file), output=tmp_path / "run2")


def test_init_adapter_refuses_flags_its_config_would_override(tiny_model_dir, data_file, tmp_path):
    train(**_common(tiny_model_dir, data_file, max_steps=1), output=tmp_path / "stage1")
    with pytest.raises(UsageError, match=r"--rank 8 \(the adapter has 4\); --balance-delta 0.2 \(the adapter has "
                                         r"0.1\) would be ignored"):
        train(**_common(tiny_model_dir, data_file, max_steps=1, rank=8, balance_delta=0.2), output=tmp_path / "s2",
              init_adapter=tmp_path / "stage1")
    summary = train(**_common(tiny_model_dir, data_file, max_steps=1, rank=4, dropout=0.2, balance_delta=0.1),
                    output=tmp_path / "s3", init_adapter=tmp_path / "stage1")  # the same values, and dropout
    assert summary["adapter"]["r"] == 4


def test_the_command_line_prints_a_project_error_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORAMOE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--data", "x.jsonl", "--max-steps", "0", "--output", str(tmp_path)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err == "loramoe: error: --max-steps must be at least 1, got 0 (leave it out to train --epochs epochs) " \
                  "(--debug shows where)\n"


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAMOE_DEBUG", raising=False)
    with pytest.raises(UsageError, match="--max-steps"):
        cli_main(["train", "--debug", "--data", "x.jsonl", "--max-steps", "0", "--output", str(tmp_path)])
    monkeypatch.setenv("LORAMOE_DEBUG", "1")
    with pytest.raises(UsageError, match="--max-steps"):
        cli_main(["train", "--data", "x.jsonl", "--max-steps", "0", "--output", str(tmp_path)])


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(**_):
        raise KeyError("a bug")

    monkeypatch.delenv("LORAMOE_DEBUG", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "scaling", broken)
    monkeypatch.setattr(cli, "auto_cli", lambda commands, **_: commands["scaling"]())
    with pytest.raises(KeyError, match="a bug"):
        cli_main(["scaling"])


def test_the_installed_command_exits_1_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "loramoe.cli", "train", "--data", "x.jsonl", "--epochs", "0",
                          "--output", str(tmp_path)], env=child_env(), capture_output=True, text=True, check=False)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith(
        "loramoe: error: --epochs must be above 0, got 0.0")
    assert "Traceback" not in run.stderr


def test_the_lab_and_the_scaling_study_check_their_output_before_any_work(tmp_path, monkeypatch):
    import loramoe.lab.main as lab_main
    import loramoe.scaling.main as scaling_module

    def never(*_, **__):
        raise AssertionError("work began before --output was checked")

    monkeypatch.setattr(lab_main, "build_mix", never)
    monkeypatch.setattr(scaling_module.models, "load", never)
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(OutputFolderError, match="--output .*taken: not a folder"):
        lab_main.lab(output=tmp_path / "taken")
    with pytest.raises(OutputFolderError, match="--output .*taken: not a folder"):
        scaling_module.scaling(output=tmp_path / "taken", quick=True)
