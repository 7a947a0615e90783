"""Data in the forms people have: the paper's records, ``save_to_disk`` folders with a column
mapping, hub ids (offline: one clear line, fast), and the paper code's config keys."""

from __future__ import annotations

import json
import time

import datasets
import pytest
import yaml

from loramoe.cli import main as cli_main
from loramoe.data import read_records
from loramoe.data_sources import SourceError, parse_columns, parse_hub
from loramoe.errors import DataError
from loramoe.train import train


def _settings(model, **overrides):
    return dict(dict(model=model, max_steps=2, batch_size=4, max_length=32, save_steps=10, logging_steps=1, seed=0),
                **overrides)


def test_the_papers_records_train_as_they_are(tiny_model_dir, tmp_path):
    rows = [{"instruction": f"w{3 + i % 5} w{4 + i % 3}", "input": "" if i % 3 else f"w{20 + i}",
             "output": f"w{40 + i % 9}", "task_type": i % 2} for i in range(8)]
    file = tmp_path / "train.json"
    file.write_text(json.dumps(rows, indent=1))  # the paper's code keeps its data as one JSON list
    records, _ = read_records([file])
    assert [r.type for r in records] == ["task", "knowledge"] * 4
    summary = train(data=[str(file)], output=tmp_path / "run", require_types=True, **_settings(tiny_model_dir))
    assert summary["steps"] == 2 and summary["records"] == 8
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b", "task_type": 2}]))
    with pytest.raises(DataError, match=r"bad.json\[0\]: field 'task_type' is 2; the paper's format has 1"):
        read_records([bad])


def _folder(tmp_path, splits=False):
    rows = {"question": [f"w{3 + i} w{5 + i % 4}" for i in range(8)],
            "answer": [{"value": f"w{30 + i}", "aliases": [f"w{30 + i}"]} for i in range(8)],
            "messages": [["unrelated"] for _ in range(8)]}  # a column the mapping leaves out
    dataset = datasets.Dataset.from_dict(rows)
    folder = tmp_path / ("dict" if splits else "flat")
    (datasets.DatasetDict({"train": dataset, "validation": dataset.select(range(4))}) if splits
     else dataset).save_to_disk(str(folder))
    return folder


COLUMNS = ["instruction=question,output=answer.value", "type=@knowledge"]


def test_a_save_to_disk_folder_with_a_column_mapping_trains(tiny_model_dir, tmp_path):
    folder = _folder(tmp_path)
    records, _ = read_records([folder], columns=COLUMNS)
    assert records[1].messages == [{"role": "user", "content": "w4 w6"}, {"role": "assistant", "content": "w31"}]
    assert {r.type for r in records} == {"knowledge"} and records[1].source.endswith("flat[1]")
    cli_main(["train", "--data", str(folder), "--columns", *COLUMNS, "--model", tiny_model_dir, "--output",
              str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--max-length", "32"])
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["records"] == 8 and summary["steps"] == 2
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["columns"] == COLUMNS and saved["data"] == [str(folder.resolve())]


def test_a_split_of_a_dataset_dict_folder(tmp_path):
    folder = _folder(tmp_path, splits=True)
    assert len(read_records([folder], columns=COLUMNS)[0]) == 8  # train by default
    assert len(read_records([f"{folder}:validation"], columns=COLUMNS)[0]) == 4
    with pytest.raises(SourceError, match="no split 'test'; it has train, validation"):
        read_records([f"{folder}:test"], columns=COLUMNS)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain: a folder, but not one datasets' save_to_disk wrote"):
        read_records([tmp_path / "plain"])


def test_a_missing_column_is_one_line_naming_it(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORAMOE_DEBUG", raising=False)
    folder = _folder(tmp_path)
    capsys.readouterr()  # save_to_disk's progress bar
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--data", str(folder), "--columns", "instruction=question,output=answer.text",
                  "--model", tiny_model_dir, "--output", str(tmp_path / "run")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"loramoe: error: {folder}[0]: column 'answer.text' (from "
                                                   "--columns) is missing; the row has: value, aliases")
    with pytest.raises(SourceError, match="--columns: answer is not a record field"):
        parse_columns(["answer=question"])
    with pytest.raises(SourceError, match="expected field=column"):
        parse_columns(["instruction"])


def test_hub_ids_name_config_and_split():
    assert parse_hub("hub:trivia_qa:rc.nocontext:train") == ("trivia_qa", "rc.nocontext", "train")
    assert parse_hub("hub:squad:validation") == ("squad", None, "validation")
    assert parse_hub("hub:org/data") == ("org/data", None, "train")
    with pytest.raises(SourceError, match="expected hub:NAME"):
        parse_hub("hub:a:b:c:d")


def test_an_unreachable_hub_is_one_clear_line_without_a_wait(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"hub:trivia_qa:rc.nocontext:train: the Hugging Face hub is not "
                                          r"reachable \(127.0.0.1:9"):
        read_records(["hub:trivia_qa:rc.nocontext:train"])
    assert time.monotonic() - started < 10


def test_offline_a_hub_id_reads_only_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(SourceError, match="hub:no-such-org/no-such-data: cannot load it"):
        read_records(["hub:no-such-org/no-such-data"])


def test_the_paper_codes_config_keys_are_read_as_ours(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"w{3 + i}", "output": f"w{9 + i}", "task_type": i % 2}) + "\n"
                            for i in range(8)))
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump({"data": [str(data)], "model": tiny_model_dir, "lora_nums": 4,
                                      "groups": {"knowledge": 2, "task": 2}, "blc_alpha": 0.2, "blc_weight": 0.05,
                                      "max_steps": 1, "batch_size": 4, "max_length": 32}))
    cli_main(["train", "--config", str(config), "--output", str(tmp_path / "run")])
    adapter = json.loads((tmp_path / "run" / "train_summary.json").read_text())["adapter"]
    assert (adapter["num_experts"], adapter["balance_delta"], adapter["balance_weight"]) == (4, 0.2, 0.05)
    err = capsys.readouterr().err
    assert "config key 'lora_nums' is read as 'num_experts'" in err and "'blc_alpha' is read as 'balance_delta'" in err
