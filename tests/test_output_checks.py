"""``generate --output`` and ``eval --output``/``--limit`` are checked before any model loads: a
folder given for a file, an earlier result (kept unless ``--overwrite``), a limit of nothing."""

from __future__ import annotations

import json
import re

import pytest

import loramoe.evaluate.main as evaluate_module
import loramoe.generate.main as generate_module
from loramoe.cli import main as cli_main
from loramoe.errors import OutputFolderError, UsageError
from loramoe.evaluate import evaluate
from loramoe.generate import generate
from loramoe.suites.registry import LM_LOSS
from tests.conftest import save_tiny


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model or benchmark load fails the test: the refusal must come first."""
    def never(*_, **__):
        raise AssertionError("loaded before the command's input was checked")

    monkeypatch.setattr(generate_module.models, "load", never)
    monkeypatch.setattr(evaluate_module.models, "load", never)
    monkeypatch.setattr(evaluate_module, "load_benchmarks", never)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    save_tiny(folder)
    return folder


@pytest.fixture
def prompts(tmp_path):
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"prompt": "w5 w6"}) + "\n")
    return file


def test_generate_refuses_a_folder_or_an_existing_file_before_loading(nothing_loads, prompts, tmp_path):
    (tmp_path / "answers").mkdir()
    with pytest.raises(OutputFolderError, match=r"--output .*answers: is a folder; --output names the JSON Lines "
                                                r"file to write, e.g. .*answers/answers.jsonl$"):
        generate(model="never-loaded", prompts=prompts, output=tmp_path / "answers")
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text("kept\n")
    with pytest.raises(OutputFolderError, match=r"--output .*earlier.jsonl: the file exists; give a new file, or "
                                                r"--overwrite to replace it$"):
        generate(model="never-loaded", prompts=prompts, output=earlier)
    assert earlier.read_text() == "kept\n"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputFolderError, match="--output .*a-file: not a folder"):
        generate(model="never-loaded", prompts=prompts, output=tmp_path / "a-file" / "out.jsonl")
    with pytest.raises(UsageError, match="--overwrite replaces the file of --output; give --output too"):
        generate(model="never-loaded", prompts=prompts, overwrite=True)


def test_generate_overwrite_replaces_the_file_atomically(model_dir, prompts, tmp_path):
    out = tmp_path / "out" / "answers.jsonl"
    out.parent.mkdir()
    out.write_text("an earlier run\n")
    generate(model=str(model_dir), prompts=prompts, output=out, max_new_tokens=2, overwrite=True)
    assert [json.loads(line)["messages"][-1]["content"] for line in out.read_text().splitlines()] == ["w5 w6"]
    assert [p.name for p in out.parent.iterdir()] == ["answers.jsonl"]


def test_generate_cli_gives_one_line_for_a_folder_output(nothing_loads, prompts, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["generate", "--model", "never-loaded", "--prompts", str(prompts), "--output", str(tmp_path)])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"loramoe: error: --output {tmp_path}: is a folder") and err.count("\n") == 1


@pytest.mark.parametrize("limit,shown", [(0, "0"), (-3, "-3"), ({"knowledge": 0}, "knowledge: 0"),
                                         ({"text/wikipedia": 2, "tasks": -1}, "tasks: -1")])
def test_eval_refuses_a_limit_of_nothing_before_loading_anything(nothing_loads, tmp_path, limit, shown):
    with pytest.raises(UsageError, match=rf"^--limit {shown}: a benchmark needs at least 1 test item to score; "
                                         r"give 1 or more, or null for all$"):
        evaluate(model="never-loaded", limit=limit, output=tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("earlier", [["eval.json", "eval.md"], ["router.png"]])
def test_eval_refuses_a_folder_holding_an_earlier_evaluation(nothing_loads, tmp_path, earlier):
    for name in earlier:
        (tmp_path / name).write_text("earlier")
    message = (f"--output {tmp_path}: the folder holds an earlier evaluation ({', '.join(earlier)}); give a new "
               "folder, or --overwrite to replace it")
    with pytest.raises(OutputFolderError, match=f"^{re.escape(message)}$"):
        evaluate(model="never-loaded", suite=LM_LOSS, output=tmp_path)
    assert all((tmp_path / name).read_text() == "earlier" for name in earlier)


def test_eval_overwrite_replaces_the_earlier_evaluation_and_its_heatmap(model_dir, tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    for name in ("eval.json", "router.json", "router.png"):
        (tmp_path / name).write_text("earlier")
    results = evaluate(model=str(model_dir), suite=LM_LOSS, limit=1, max_length=8, output=tmp_path, overwrite=True)
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(results))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md", "notes.md"]
    assert (tmp_path / "notes.md").read_text() == "mine"
