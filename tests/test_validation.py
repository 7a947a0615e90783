"""Validation during training: the loss on held-out data, early stopping, the best checkpoint as
the final adapter, and a deterministic split."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from loramoe.data import Record
from loramoe.errors import UsageError
from loramoe.train import train
from loramoe.train.validation import split_validation
from tests.conftest import typed_records


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_early_stopping_stops_a_run_whose_validation_loss_rises_and_keeps_the_best(tiny_model_dir, tmp_path):
    # training teaches each prompt one answer, validation asks for another: past the first steps
    # (which learn the shape every answer shares) each step raises the validation loss
    prompts = [f"w{3 + i} w{4 + i}" for i in range(8)]
    train_file = _write(tmp_path / "train.jsonl", [{"instruction": p, "output": f"w{40 + i}"}
                                                   for i, p in enumerate(prompts)])
    val_file = _write(tmp_path / "val.jsonl", [{"instruction": p, "output": f"w{80 + i}"}
                                               for i, p in enumerate(prompts)])
    summary = train(data=[train_file], val_data=[val_file], model=tiny_model_dir, method="lora", lr=3e-2,
                    max_steps=40, batch_size=8, max_length=32, save_steps=1, eval_steps=1, early_stopping=2,
                    save_total_limit=1, logging_steps=1, warmup_ratio=0.0, scheduler="constant",
                    output=tmp_path / "run")
    validation = summary["validation"]
    losses = {step: loss for step, loss in validation["losses"]}
    best = validation["best_step"]
    assert validation["stopped_early"] and summary["steps"] < 40
    assert summary["steps"] == best + 2  # two validations without a lower loss, then the stop
    assert validation["best_loss"] == min(losses.values()) == losses[best]
    assert all(losses[step] >= losses[best] for step in losses if step > best)
    final = load_file(tmp_path / "run" / "adapter_model.safetensors")
    kept = load_file(tmp_path / "run" / "checkpoints" / f"checkpoint-{best}" / "adapter_model.safetensors")
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    assert validation["final_adapter"] == f"the best checkpoint, step {best}"


def test_a_validation_split_is_the_same_in_any_order_and_the_loss_is_logged(tiny_model_dir, tmp_path):
    records = [Record([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], None,
                      f"<list>[{i}]") for i in range(40)]
    train_part, held = split_validation(records, 0.1)
    assert len(held) == 4 and len(train_part) == 36
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert {r.source for r in split_validation(shuffled, 0.1)[1]} == {r.source for r in held}
    data = _write(tmp_path / "train.jsonl", typed_records(16))
    summary = train(data=[data], val_split=0.25, model=tiny_model_dir, max_steps=4, batch_size=4, max_length=32,
                    save_steps=2, logging_steps=1, output=tmp_path / "run")
    assert summary["records"] == 12 and summary["validation"]["records"] == 4
    assert [step for step, _ in summary["validation"]["losses"]] == [2, 4]
    assert not summary["validation"]["stopped_early"]
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize(("setting", "message"), [
    ({"val_data": ["v.jsonl"], "val_split": 0.1}, "--val-data and --val-split both give a validation set"),
    ({"early_stopping": 3}, "--early-stopping needs a validation set"),
    ({"val_split": 1.5}, r"--val-split must be in \(0, 1\)"),
    ({"val_split": 0.1, "save_steps": 10, "eval_steps": 4}, "--save-steps 10 must be a multiple of --eval-steps 4"),
])
def test_validation_settings_that_contradict_each_other_are_refused(tmp_path, setting, message):
    with pytest.raises(UsageError, match=message):
        train(data=["never-read.jsonl"], model="never-loaded", output=tmp_path / "run", **setting)


def test_each_validation_of_loramoe_sees_the_weights_of_its_step(tiny_model_dir, tmp_path):
    # the fused AdamW the Trainer uses writes parameters without bumping their version counters,
    # which keyed LoRAMoE's inference plan: every validation after the first saw the first's weights
    data = _write(tmp_path / "train.jsonl", typed_records(16))
    summary = train(data=[data], val_split=0.25, model=tiny_model_dir, max_steps=3, batch_size=4, max_length=32,
                    lr=5e-2, save_steps=1, logging_steps=1, dropout=0.0, output=tmp_path / "run")
    losses = [loss for _, loss in summary["validation"]["losses"]]
    assert len(losses) == 3 and len(set(losses)) == 3
