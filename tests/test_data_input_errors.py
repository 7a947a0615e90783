"""Input that used to break the one-line promise or train silently on something else than was
meant: JSON nested past Python's recursion limit, a validation split that holds out copies of
training records or far more than asked without a word, and misspelt record fields."""

from __future__ import annotations

import json
import logging
import re
import warnings

import pandas as pd
import pytest

from loramoe.cli import main as cli_main
from loramoe.data import DataError, Record, read_records
from loramoe.errors import UsageError
from loramoe.train import train
from loramoe.train.validation import split_validation

DEPTH = 200_000
GOOD = {"instruction": "what is the capital of Peru", "output": "Lima"}


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _record(i: int, type: str | None = None) -> Record:
    return Record([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], type,
                  f"<list>[{i}]")


def test_a_jsonl_line_nested_200000_deep_is_a_data_error_naming_its_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"instruction": "a", "output": "b", "notes": '
                    + "[" * DEPTH + "]" * DEPTH + "}\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: invalid JSON: nested too deeply to read"):
        read_records([path])
    with pytest.warns(UserWarning, match=r"skipped 1 bad record\(s\) of 3; the first: .*deep.jsonl:2: invalid JSON"):
        records, skipped = read_records([path], skip_bad=True)
    assert len(records) == 2 and skipped == 1


def test_a_json_array_nested_200000_deep_names_the_line_and_the_item(tmp_path):
    pretty = tmp_path / "deep.json"
    pretty.write_text(f"[\n {json.dumps(GOOD)},\n {json.dumps(GOOD)},\n"
                      + ' {"instruction": "a", "output": ' + "[" * DEPTH + "]" * DEPTH + "}\n]\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(pretty))}:4 \(item 2 of the array\): invalid JSON: "
                                        "nested too deeply to read"):
        read_records([pretty])
    # one line, brackets inside strings and commas of nested objects: the place is still found
    minified = tmp_path / "minified.json"
    minified.write_text(json.dumps([GOOD, {**GOOD, "instruction": "a, [b] {c"}])[:-1] + ', {"messages": '
                        + '{"a": ' * DEPTH + "1" + "}" * DEPTH + "}]")
    with pytest.raises(DataError, match=r"minified.json:1 \(item 2 of the array\): invalid JSON: nested too deep"):
        read_records([minified])


def test_deep_data_is_one_line_on_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORAMOE_DEBUG", raising=False)
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * DEPTH + "]" * DEPTH + "\n")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--data", str(path), "--model", "never-loaded", "--output", str(tmp_path / "run")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"loramoe: error: {path}:1")
    assert "nested too deeply to read" in err


def test_copies_of_a_record_all_go_to_one_side_of_the_validation_split():
    # two conversations, 8 copies each: a cut at 4 records used to split the copies of one of them
    records = [_record(i % 2, type=("knowledge", "task", None)[i % 3]) for i in range(16)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_part, held = split_validation(records, 0.25)
    # the type does not make another text to learn: copies that differ only in it stay together too
    assert not {str(r.messages) for r in held} & {str(r.messages) for r in train_part}
    assert len(held) == 8 and len(train_part) == 8
    assert ["8 of 16 records held out" in str(w.message) for w in caught] == [True]
    many = [_record(i) for i in range(40)] + [_record(7)] * 7
    train_part, held = split_validation(many, 0.1)
    assert not {str(r.messages) for r in held} & {str(r.messages) for r in train_part}
    with pytest.raises(UsageError, match="leaves none to train on .all are copies of one conversation"):
        split_validation([_record(0)] * 5, 0.5)


def test_the_split_says_how_many_records_each_side_got(caplog):
    records = [_record(i) for i in range(30)]
    with caplog.at_level(logging.WARNING, logger="loramoe.train.validation"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the share asked: a line, not a warning
        train_part, held = split_validation(records, 0.1)
    assert len(held) == 3 and len(train_part) == 27  # 0.1 * 30 is 3.0000000000000004, which used to hold out 4
    assert caplog.messages == ["--val-split 0.1: 3 of 30 records held out for validation (10 %), 27 train"]


def test_a_split_far_from_the_share_asked_is_a_warning_saying_why():
    with pytest.warns(UserWarning) as caught:
        train_part, held = split_validation([_record(0), _record(1)], 0.01)
    assert len(held) == 1 and len(train_part) == 1
    assert len(caught) == 1 and str(caught[0].message) == (
        "--val-split 0.01: 1 of 2 records held out for validation (50 %), 1 train, far more than the 1 % asked: "
        "0.01 of 2 records rounds up to 1; give more records, another --val-split, or --val-data")
    # one record asked for, but its conversation comes with 9 copies
    with pytest.warns(UserWarning) as caught:
        split_validation([_record(0)] * 10 + [_record(1)] * 10, 0.05)
    assert len(caught) == 1 and str(caught[0].message) == (
        "--val-split 0.05: 10 of 20 records held out for validation (50 %), 10 train, far more than the 5 % asked: "
        "9 more are copies of held-out conversations, which stay on one side; give more records, another "
        "--val-split, or --val-data")


def _misspelt(tmp_path) -> str:
    rows = [dict(GOOD) for _ in range(12)]
    rows[3]["inptu"] = rows[7]["inptu"] = "be brief"
    rows[9]["typ"] = "knowledge"
    return _jsonl(tmp_path / "d.jsonl", rows)


def test_fields_loramoe_does_not_read_get_one_warning_that_counts_them(tmp_path):
    path = _misspelt(tmp_path)
    with pytest.warns(UserWarning) as caught:
        records, _ = read_records([path])
    assert len(records) == 12 and len(caught) == 1 and str(caught[0].message) == (
        f"3 of 12 records have fields loramoe does not read: 'inptu' (2), 'typ' (1); the first at {path}:4. They are "
        "ignored; a record's fields are instruction, input, output, messages, type, task_type (--columns maps other "
        "names). --strict-fields makes this an error.")


def test_the_fields_of_every_record_shape_pass_without_a_warning(tmp_path):
    paper = tmp_path / "paper.json"  # the paper's own format (Ablustrund/LoRAMoE)
    paper.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b", "task_type": 1}]))
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    csv = tmp_path / "d.csv"
    pd.DataFrame([{"instruction": "a", "input": "", "output": "b", "type": ""}]).to_csv(csv, index=False)
    sources = [paper, csv, [{"messages": chat, "type": "task"}, {**GOOD, "typo": None},
                            {**GOOD, "type": "knowledge", "subject": "Peru", "relation": "capital"}]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_records(sources)[0]) == 5
        mapped = _jsonl(tmp_path / "hub_like.jsonl", [{"question": "a", "answer": "b", "id": 7}])
        assert len(read_records([mapped], columns=["instruction=question", "output=answer"])[0]) == 1


def test_strict_fields_makes_an_unread_field_an_error_naming_its_line(tmp_path):
    path = _misspelt(tmp_path)
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:4: field 'inptu' is not a record field \(instruction, "
                                        r"input, output, messages, type, task_type\); correct or remove it, or leave "
                                        "out --strict-fields to ignore it$"):
        read_records([path], strict_fields=True)
    with pytest.warns(UserWarning, match="skipped 3 bad record"):
        records, skipped = read_records([path], strict_fields=True, skip_bad=True)
    assert len(records) == 9 and skipped == 3
    typo = _jsonl(tmp_path / "typo.jsonl", [{"instrution": "a", "output": "b"}])  # the typo, not "missing instruction"
    with pytest.raises(DataError, match="typo.jsonl:1: field 'instrution' is not a record field"):
        read_records([typo], strict_fields=True)


def test_strict_fields_is_a_train_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORAMOE_DEBUG", raising=False)
    path = _misspelt(tmp_path)
    with pytest.raises(DataError, match="d.jsonl:4: field 'inptu'"):
        train(data=[path], strict_fields=True, model="never-loaded", output=tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--data", path, "--strict-fields", "--model", "never-loaded", "--output",
                  str(tmp_path / "run2")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"loramoe: error: {path}:4: field 'inptu' is not a record field")
