"""A run folder holds one run: a second run into it, or a resume with other settings or data, is
refused before anything in it changes; a saved ``train_config.yaml`` reruns from any folder;
``--overwrite`` removes only what a run wrote; one process at a time holds a run (or lab) folder;
and a checkpoint half deleted by a kill is never taken for a complete one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from loramoe.cli import main as cli_main
from loramoe.errors import OutputFolderError, UsageError
from loramoe.folder_lock import LOCK_FILE, hold
from loramoe.lab import lab
from loramoe.train import train
from loramoe.train.run_folder import MANIFEST
from loramoe.train.trainer import COMPLETE_MARKER, complete_checkpoints
from tests.conftest import child_env, typed_records
from tests.test_train import _common, _weights


@pytest.fixture(scope="module")
def finished(tiny_model_dir, data_file, tmp_path_factory):
    """A LoRAMoE run of 2 steps with a checkpoint at step 1, and its files' bytes."""
    folder = tmp_path_factory.mktemp("finished")
    train(**_common(tiny_model_dir, data_file, max_steps=2, save_steps=1), output=folder)
    return folder, _snapshot(folder)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(finished, tmp_path) -> Path:
    folder = tmp_path / "a"
    for name, content in finished[1].items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(tiny_model_dir, data_file, finished,
                                                                       tmp_path):
    folder = _copy(finished, tmp_path)
    with pytest.raises(OutputFolderError, match=r"the folder is not empty \(adapter_config.json.*--overwrite"):
        train(**_common(tiny_model_dir, data_file, method="lora", max_steps=2), output=folder)
    assert _snapshot(folder) == finished[1]


def test_resume_with_other_data_is_refused_naming_it(tiny_model_dir, data_file, finished, tmp_path):
    folder = _copy(finished, tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in typed_records(12)))
    with pytest.raises(OutputFolderError, match=r"checkpoint-2 was trained with other data"):
        train(**_common(tiny_model_dir, str(other), max_steps=2, save_steps=1), output=folder, resume=True)
    assert _snapshot(folder) == finished[1]


def test_resume_with_another_setting_is_refused_naming_the_first_difference(tiny_model_dir, data_file, finished,
                                                                             tmp_path):
    folder = _copy(finished, tmp_path)
    with pytest.raises(OutputFolderError, match=r"trained with --lr 0.005, this run has 0.001"):
        train(**_common(tiny_model_dir, data_file, max_steps=2, save_steps=1, lr=1e-3), output=folder, resume=True)
    with pytest.raises(OutputFolderError, match=r"trained with --method 'loramoe', this run has 'lora'"):
        train(**_common(tiny_model_dir, data_file, max_steps=2, save_steps=1, method="lora"), output=folder,
              resume=True)
    assert _snapshot(folder) == finished[1]


def test_resume_with_the_same_data_in_another_file_and_other_save_settings_continues(tiny_model_dir, data_file,
                                                                                     finished, tmp_path):
    folder = _copy(finished, tmp_path)
    moved = tmp_path / "moved.jsonl"
    moved.write_text(Path(data_file).read_text())
    summary = train(**_common(tiny_model_dir, str(moved), max_steps=2, save_steps=1, logging_steps=5),
                    output=folder, resume=True)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 2
    assert _snapshot(folder)["adapter_model.safetensors"] == finished[1]["adapter_model.safetensors"]


def test_overwrite_clears_the_folder_first(tiny_model_dir, data_file, finished, tmp_path):
    folder = _copy(finished, tmp_path)
    summary = train(**_common(tiny_model_dir, data_file, method="lora", max_steps=2, save_steps=10), output=folder,
                    overwrite=True)
    assert summary["method"] == "lora"
    left = sorted((folder / "checkpoints").iterdir())  # the first run's checkpoint-1 is gone with it
    assert [p.name for p in left] == ["checkpoint-2"]
    assert json.loads((left[0] / COMPLETE_MARKER).read_text())["run"]["method"] == "lora"
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_overwrite_refused_by_the_new_runs_checks_keeps_the_old_run(tiny_model_dir, data_file, finished, tmp_path):
    folder = _copy(finished, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "w3"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        train(**_common(tiny_model_dir, str(bad)), output=folder, overwrite=True)
    assert _snapshot(folder) == finished[1]


def test_overwrite_deletes_only_a_run_folder(tiny_model_dir, data_file, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="deletes only what a run wrote"):
        train(**_common(tiny_model_dir, data_file), output=tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_together_are_refused(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(UsageError, match="--resume and --overwrite contradict"):
        train(**_common(tiny_model_dir, data_file), output=tmp_path, resume=True, overwrite=True)


def test_resume_without_a_checkpoint_into_a_finished_run_is_refused(tiny_model_dir, data_file, tmp_path):
    train(**_common(tiny_model_dir, data_file, max_steps=1, save_steps=10), output=tmp_path / "a")
    shutil.rmtree(tmp_path / "a" / "checkpoints")  # deleted to save space once the run was done
    before = _snapshot(tmp_path / "a")
    with pytest.raises(OutputFolderError, match="no complete checkpoint to continue from"):
        train(**_common(tiny_model_dir, data_file, max_steps=1, save_steps=10), output=tmp_path / "a", resume=True)
    assert _snapshot(tmp_path / "a") == before


def test_a_checkpoint_that_records_no_settings_is_not_resumed(tiny_model_dir, data_file, finished, tmp_path):
    folder = _copy(finished, tmp_path)
    (folder / "checkpoints" / "checkpoint-2" / COMPLETE_MARKER).write_text(json.dumps({"global_step": 2}))
    with pytest.raises(OutputFolderError, match="records no settings"):
        train(**_common(tiny_model_dir, data_file, max_steps=2, save_steps=1), output=folder, resume=True)


def test_the_saved_config_reruns_from_any_folder_into_a_new_one_and_never_into_its_own(
        tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(data_file).parent)
    cli_main(["train", "--data", Path(data_file).name, "--model", tiny_model_dir, "--output", str(tmp_path / "run"),
              "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--save-steps", "10", "--seed", "3"])
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["data"] == [str(Path(data_file).resolve())]
    assert not {"output", "resume", "overwrite"} & set(saved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cli_main(["train", "--config", str(tmp_path / "run" / "train_config.yaml")])  # the default --output, here
    a, b = _weights(tmp_path / "run"), _weights(elsewhere / "runs" / "train")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(OutputFolderError, match="not empty"):
        train(**{k.replace("-", "_"): v for k, v in saved.items()}, output=tmp_path / "run")


def test_the_command_line_says_it_in_one_line(tiny_model_dir, data_file, finished, tmp_path, capsys):
    folder = _copy(finished, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--data", data_file, "--model", tiny_model_dir, "--output", str(folder)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"loramoe: error: --output {folder}: the folder is not empty") and "\n" not in err


def _user_folder(folder: Path, tiny_model_dir: str, data_file: str) -> dict[str, bytes]:
    """A user's project folder: sources, notes, the training data and a config of their own."""
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "app.py").write_text("print('mine')\n")
    (folder / "notes.md").write_text("# my notes\n")
    shutil.copy(data_file, folder / "data.jsonl")
    (folder / "train_config.yaml").write_text(yaml.safe_dump(
        {"data": ["data.jsonl"], "model": tiny_model_dir, "max_steps": 1, "batch_size": 4, "max_length": 32}))
    return _snapshot(folder)


def test_overwrite_into_a_users_folder_deletes_nothing(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "project"
    before = _user_folder(folder, tiny_model_dir, data_file)
    monkeypatch.chdir(folder)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "--config", "train_config.yaml", "--output", ".", "--overwrite"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "--overwrite deletes only what a run wrote" in err and "data.jsonl" in err and "\n" not in err
    assert _snapshot(folder) == before


def test_overwrite_of_a_run_folder_that_also_holds_a_users_file_is_refused_naming_it(tiny_model_dir, data_file,
                                                                                     finished, tmp_path):
    folder = _copy(finished, tmp_path)
    (folder / "my_eval_notes.md").write_text("keep me")
    before = _snapshot(folder)
    with pytest.raises(OutputFolderError, match=r"also holds my_eval_notes.md, which no run wrote"):
        train(**_common(tiny_model_dir, data_file, method="lora", max_steps=1), output=folder, overwrite=True)
    assert _snapshot(folder) == before


def test_overwrite_of_a_folder_no_run_listed_is_refused(tiny_model_dir, data_file, finished, tmp_path):
    folder = _copy(finished, tmp_path)
    (folder / MANIFEST).unlink()  # as an older loramoe, or a user, left it
    before = _snapshot(folder)
    with pytest.raises(OutputFolderError, match=r"listed in its run_manifest.json, and this folder has none"):
        train(**_common(tiny_model_dir, data_file, max_steps=1), output=folder, overwrite=True)
    assert _snapshot(folder) == before


def test_the_manifest_lists_every_name_the_run_wrote(finished):
    folder, files = finished
    listed = set(json.loads(files[MANIFEST])["files"])
    assert {p.name for p in folder.iterdir()} <= listed
    assert {"adapter_config.json", "adapter_model.safetensors", "checkpoints", MANIFEST} <= listed


def test_a_held_folder_is_refused_naming_the_holder(tiny_model_dir, data_file, tmp_path):
    with hold(tmp_path, "--output", "train"):
        with pytest.raises(OutputFolderError, match=rf"process {os.getpid()} is using this folder"):
            train(**_common(tiny_model_dir, data_file, max_steps=1), output=tmp_path)
        with pytest.raises(OutputFolderError, match=rf"process {os.getpid()} is using this folder"):
            lab(output=tmp_path, quick=True)
    assert list(tmp_path.iterdir()) == []  # nothing written, and the lock's file gone with the lock


def test_a_killed_holder_leaves_no_lock(tiny_model_dir, data_file, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", (f"import time\nfrom loramoe.folder_lock import hold\nwith hold({str(tmp_path)!r}, "
                                "'--output', 'train'):\n    print('held', flush=True)\n    time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env=child_env())
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)  # left behind, but no longer held
    summary = train(**_common(tiny_model_dir, data_file, max_steps=1), output=tmp_path)
    assert summary["steps"] == 1 and not (tmp_path / LOCK_FILE).exists()


def test_two_runs_started_together_into_one_folder_exactly_one_trains(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "R"
    common = ["--data", data_file, "--model", tiny_model_dir, "--output", str(out), "--max-steps", "30",
              "--batch-size", "4", "--max-length", "32", "--save-steps", "5"]
    runs = [subprocess.Popen([sys.executable, "-m", "loramoe.cli", "train", "--method", method, *common],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=child_env(OMP_NUM_THREADS="1"))
            for method in ("lora", "loramoe")]
    outcomes = [(run.wait(timeout=600), run.communicate()[1]) for run in runs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 1], outcomes
    winner = ("lora", "loramoe")[[code for code, _ in outcomes].index(0)]
    refusal = next(err for code, err in outcomes if code == 1).strip().splitlines()[-1]
    assert refusal.startswith("loramoe: error: --output") and (
        "is using this folder" in refusal or "the folder is not empty" in refusal), refusal
    assert json.loads((out / "train_summary.json").read_text())["method"] == winner
    for checkpoint in complete_checkpoints(out / "checkpoints"):
        assert json.loads((checkpoint / COMPLETE_MARKER).read_text())["run"]["method"] == winner


def test_rotation_deletes_a_checkpoints_marker_before_its_files(tiny_model_dir, data_file, tmp_path, monkeypatch):
    seen = []
    rmtree = shutil.rmtree

    def watching(path, *args, **kwargs):
        if Path(path).name.startswith("checkpoint-"):
            seen.append((Path(path).name, (Path(path) / COMPLETE_MARKER).exists()))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", watching)
    train(**_common(tiny_model_dir, data_file, max_steps=3, save_steps=1, save_total_limit=1), output=tmp_path)
    assert seen == [("checkpoint-1", False), ("checkpoint-2", False)]


def test_resume_skips_and_clears_a_checkpoint_whose_files_a_kill_deleted(tiny_model_dir, data_file, finished,
                                                                        tmp_path):
    folder = _copy(finished, tmp_path)
    # a kill while rotation deleted checkpoint-2 (old marker order): its marker outlived its adapter
    (folder / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").unlink()
    summary = train(**_common(tiny_model_dir, data_file, max_steps=2, save_steps=1), output=folder, resume=True)
    assert summary["resumed_from"].endswith("checkpoint-1") and summary["steps"] == 2
    assert (folder / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert _snapshot(folder)["adapter_model.safetensors"] == finished[1]["adapter_model.safetensors"]


def test_resume_of_a_split_run_checks_which_records_the_split_held_out(tiny_model_dir, data_file, tmp_path):
    settings = _common(tiny_model_dir, data_file, max_steps=2, save_steps=1, val_split=0.25)
    train(**settings, output=tmp_path)
    marker = tmp_path / "checkpoints" / "checkpoint-2" / COMPLETE_MARKER
    saved = json.loads(marker.read_text())
    assert train(**settings, output=tmp_path, resume=True)["resumed_from"].endswith("checkpoint-2")
    del saved["run"]["held_out_sha256"]  # as a loramoe that split the records otherwise wrote it
    marker.write_text(json.dumps(saved))
    with pytest.raises(OutputFolderError, match="other records held out by --val-split"):
        train(**settings, output=tmp_path, resume=True)
