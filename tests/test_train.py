"""`loramoe train` on tiny local models: outputs, determinism, config files, resume, faults, LBC."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loramoe.cli import main as cli_main
from loramoe.data import DataError
from loramoe.train import train
from loramoe.train.trainer import COMPLETE_MARKER, TrainingDiverged
from tests.conftest import child_env, typed_records


def _common(tiny_model_dir, data_file, **overrides):
    settings = dict(data=[data_file], model=tiny_model_dir, max_steps=4, batch_size=4, lr=5e-3, logging_steps=1,
                    save_steps=2, max_length=32, num_experts=None, dropout=0.0, seed=3)
    settings.update(overrides)
    return settings


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "adapter_model.safetensors")


def test_train_writes_adapter_config_summary_checkpoints_and_logs(tiny_model_dir, data_file, tmp_path):
    summary = train(**_common(tiny_model_dir, data_file), output=tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "train_summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["steps"] == 4 and saved["records"] == 16 and saved["tokens"] > 0
    assert saved["trainable_parameters"] > 0 and saved["final_lbc_loss"] is not None
    assert saved["final_route_loss"] is None  # the routing objective is off by default
    config = yaml.safe_load((tmp_path / "train_config.yaml").read_text())
    assert config["max-steps"] == 4 and config["method"] == "loramoe"
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        folder = tmp_path / "checkpoints" / name
        assert (folder / COMPLETE_MARKER).is_file() and (folder / "adapter_model.safetensors").is_file()
        assert not (folder / "model.safetensors").exists()  # adapter-only checkpoints
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert any(k.startswith("model.layers.0.mlp.gate_proj") for k in _weights(tmp_path))


def test_same_seed_same_result(tiny_model_dir, data_file, tmp_path):
    train(**_common(tiny_model_dir, data_file, dropout=0.1), output=tmp_path / "a")
    train(**_common(tiny_model_dir, data_file, dropout=0.1), output=tmp_path / "b")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_file_keys_equal_the_flags(tiny_model_dir, data_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": tiny_model_dir, "data": [data_file], "method": "lora",
                                      "max-steps": 2, "batch-size": 4, "max-length": 32, "save-steps": 10}))
    cli_main(["train", "--config", str(config), "--output", str(tmp_path / "run"), "--lr", "1e-3"])
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["method"] == "lora" and summary["steps"] == 2
    written = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert written["lr"] == 1e-3 and written["batch-size"] == 4
    # the written config reproduces the run
    cli_main(["train", "--config", str(tmp_path / "run" / "train_config.yaml"), "--output", str(tmp_path / "again")])
    a, b = _weights(tmp_path / "run"), _weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tuning_saves_the_model(tiny_model_dir, data_file, tmp_path):
    summary = train(**_common(tiny_model_dir, data_file, method="full", dropout=None, save_steps=10), output=tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    assert summary["trainable_parameters"] == summary["total_parameters"]


def test_init_adapter_continues_from_a_saved_adapter(tiny_model_dir, data_file, tmp_path):
    train(**_common(tiny_model_dir, data_file), output=tmp_path / "stage1")
    summary = train(**_common(tiny_model_dir, data_file, max_steps=1, lr=0.0, warmup_ratio=0.0),
                    output=tmp_path / "stage2", init_adapter=tmp_path / "stage1")
    a, b = _weights(tmp_path / "stage1"), _weights(tmp_path / "stage2")
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: stage 2 keeps stage 1's weights
    assert summary["adapter"]["num_experts"] == 6
    with pytest.raises(ValueError, match="holds a loramoe adapter, not --method lora"):
        train(**_common(tiny_model_dir, data_file, method="lora"), output=tmp_path / "x",
              init_adapter=tmp_path / "stage1")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_model_dir, data_file, tmp_path,
                                                                     monkeypatch):
    import loramoe.train.trainer as trainer_module

    calls = []
    real = trainer_module.balancing_loss

    def nan_from_the_third_step(*args):
        calls.append(1)
        value = real(*args)
        return value * float("nan") if len(calls) > 2 * 6 else value  # 6 LoRAMoE layers per step

    monkeypatch.setattr(trainer_module, "balancing_loss", nan_from_the_third_step)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 2.*checkpoint-2"):
        train(**_common(tiny_model_dir, data_file, save_steps=2), output=tmp_path)
    assert (tmp_path / "checkpoints" / "checkpoint-2" / COMPLETE_MARKER).is_file()
    weights = _weights(tmp_path / "checkpoints" / "checkpoint-2")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, data_file, tmp_path):
    train(**_common(tiny_model_dir, data_file, balance_weight=1.0), output=tmp_path / "plain")
    train(**_common(tiny_model_dir, data_file, balance_weight=1.0, gradient_checkpointing=True),
          output=tmp_path / "checkpointed")
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "checkpointed")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    la = json.loads((tmp_path / "plain" / "train_summary.json").read_text())["final_lbc_loss"]
    lb = json.loads((tmp_path / "checkpointed" / "train_summary.json").read_text())["final_lbc_loss"]
    assert la == pytest.approx(lb, rel=1e-5)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import loramoe.train.trainer as trainer_module
    from loramoe.train import train

    real_save = trainer_module.save_adapter

    def save_then_die(model, folder):
        real_save(model, folder)
        if str(folder).endswith("checkpoint-4"):  # killed after the weights, before the marker
            os.kill(os.getpid(), signal.SIGKILL)

    trainer_module.save_adapter = save_then_die
    settings = eval(sys.argv[1])
    train(**settings)
""")


def test_child_processes_run_the_loramoe_under_test():
    """The kill test trains in a child process: it must import this tree's loramoe, not the editable
    install's (main's), or a branch's resumed run would replay steps main's code had trained."""
    import loramoe

    child = subprocess.run([sys.executable, "-c", "import loramoe; print(loramoe.__file__)"], env=child_env(),
                           capture_output=True, text=True, check=True)
    assert Path(child.stdout.strip()) == Path(loramoe.__file__)


def test_resume_after_a_kill_during_a_checkpoint_matches_an_uninterrupted_run(tiny_model_dir, data_file, tmp_path):
    settings = _common(tiny_model_dir, data_file, max_steps=6, dropout=0.1)
    train(**settings, output=tmp_path / "straight")
    killed = dict(settings, output=str(tmp_path / "killed"))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    run = subprocess.run([sys.executable, str(script), repr(killed)], env=child_env(), capture_output=True, text=True,
                         check=False)
    assert run.returncode == -9, run.stderr[-2000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert (checkpoints / "checkpoint-4").is_dir() and not (checkpoints / "checkpoint-4" / COMPLETE_MARKER).exists()
    summary = train(**settings, output=tmp_path / "killed", resume=True)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 6
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_records_whose_prompt_fills_max_length_are_dropped_not_called_divergence(tiny_model_dir, tmp_path):
    long = [{"instruction": " ".join(f"w{2 + j % 40}" for j in range(40)), "output": "w5", "type": "task"}] * 4
    file = tmp_path / "mixed.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in typed_records(4) + long))
    with pytest.warns(UserWarning, match="4 of them kept nothing of the response and were dropped"):
        summary = train(data=[str(file)], model=tiny_model_dir, output=tmp_path / "run", max_steps=2, batch_size=4,
                        max_length=16, group_by_length=True, logging_steps=1, save_steps=100)
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    only_long = tmp_path / "long.jsonl"
    only_long.write_text("".join(json.dumps(r) + "\n" for r in long))
    with pytest.raises(DataError, match="raise --max-length"):
        train(data=[str(only_long)], model=tiny_model_dir, output=tmp_path / "none", max_steps=1, max_length=16)


def test_a_kill_before_the_new_checkpoint_is_complete_keeps_the_old_one(tiny_model_dir, data_file, tmp_path,
                                                                         monkeypatch):
    import loramoe.train.trainer as trainer_module

    real_write = trainer_module.atomic_write_text

    def killed_at_the_second_marker(path, text):
        if Path(path).name == COMPLETE_MARKER and Path(path).parent.name == "checkpoint-4":
            raise KeyboardInterrupt  # the process dies here, after checkpoint-4's files, before its marker
        real_write(path, text)

    monkeypatch.setattr(trainer_module, "atomic_write_text", killed_at_the_second_marker)
    with pytest.raises(KeyboardInterrupt):
        train(**_common(tiny_model_dir, data_file, save_total_limit=1), output=tmp_path)
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "checkpoint-2" / COMPLETE_MARKER).is_file()  # still there to resume from
    monkeypatch.undo()
    summary = train(**_common(tiny_model_dir, data_file, save_total_limit=1), output=tmp_path, resume=True)
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-4"]  # the limit still holds


def test_the_constraint_leans_against_the_own_group_and_the_routing_objective_towards_it(tiny_model_dir,
                                                                                         tmp_path):
    """Trained end to end, the constraint moves each type's gate mass slightly *off* its own group
    (its fixed point is (1 - delta) / 2 = 0.45 there) and the routing objective onto it (towards
    route_target 0.9); measured on the training data's types, summed over layers."""
    from loramoe import capture_routing, load_adapter, models
    from loramoe.data import DataCollator, read_records, tokenize_records

    file = tmp_path / "typed.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in typed_records(32)))
    own_share = {}
    for name, weights in {"constraint": {"balance_weight": 1.0}, "route": {"route_weight": 1.0}}.items():
        out = tmp_path / name
        train(data=[str(file)], model=tiny_model_dir, output=out, max_steps=40, batch_size=8, lr=1e-2,
              max_length=32, dropout=0.0, logging_steps=10, save_steps=100, seed=0, **weights)
        model, tokenizer = models.load(tiny_model_dir)
        load_adapter(model, out)
        records, _ = read_records([str(file)])
        dataset = tokenize_records(records, tokenizer, max_length=32, type_ids={"knowledge": 0, "task": 1})
        batch = DataCollator(tokenizer)([dataset[i] for i in range(len(dataset))])
        types = batch.pop("sample_type")
        batch.pop("labels")
        with capture_routing(model) as routing, torch.no_grad():
            model(**batch)
        mass = sum(routing.sample_gates().values())  # (samples, 6)
        knowledge_share = mass[:, :3].sum(1) / mass.sum(1)
        own_share[name] = torch.where(types == 0, knowledge_share, 1 - knowledge_share).mean().item()
    print(f"own-group share after 40 steps: constraint {own_share['constraint']:.4f}, "
          f"routing objective {own_share['route']:.4f}")
    assert own_share["constraint"] < 0.48  # from about 0.5 at initialisation, towards 0.45
    assert own_share["route"] > 0.6


def test_routing_objective_flags_train_and_reach_the_summary_and_the_adapter(tiny_model_dir, data_file, tmp_path,
                                                                            capsys):
    common = ["train", "--model", tiny_model_dir, "--data", data_file, "--max-steps", "2", "--batch-size", "4",
              "--max-length", "32", "--logging-steps", "1", "--save-steps", "10"]
    cli_main([*common, "--route-weight", "0.5", "--route-target", "0.8", "--balance-importance", "sum",
              "--output", str(tmp_path / "run")])
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_route_loss"]) and summary["final_route_loss"] > 0
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["config"]
    assert (config["route_weight"], config["route_target"], config["balance_importance"]) == (0.5, 0.8, "sum")
    with pytest.raises(SystemExit):
        cli_main([*common, "--balance-importance", "median", "--output", str(tmp_path / "bad")])
    assert "'mean', 'sum'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"route_target must be in \(0, 1\)"):
        train(**_common(tiny_model_dir, data_file, route_target=1.5), output=tmp_path / "bad")
    with pytest.raises(ValueError, match="route_weight > 0 .* needs groups with at least 2 sample types"):
        train(**_common(tiny_model_dir, data_file, route_weight=1.0, num_experts=4), output=tmp_path / "bad")


def test_cli_list_flags_take_several_values(tiny_model_dir, data_file, tmp_path):
    second = tmp_path / "more.jsonl"
    second.write_text(json.dumps({"instruction": "w3", "output": "w4", "type": "task"}) + "\n")
    cli_main(["train", "--model", tiny_model_dir, "--data", data_file, str(second), "--method", "lora",
              "--target-modules", "gate_proj", "up_proj", "--max-steps", "1", "--batch-size", "4",
              "--output", str(tmp_path / "run")])
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["records"] == 17
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["loramoe"]["config"][
        "target_modules"] == ["gate_proj", "up_proj"]


@pytest.mark.parametrize("method", ["full", "loramoe"])
@pytest.mark.parametrize("num_items", [None, 9])
def test_the_loss_from_label_positions_only_equals_the_models_own(tmp_path, method, num_items):
    """The trainer computes logits only where a label follows; the loss and every gradient equal
    the model's own causal-LM loss over all positions."""
    from transformers import Trainer, TrainingArguments

    from loramoe import LoraMoEConfig, attach
    from loramoe.train.trainer import LoraMoETrainer
    from tests.conftest import tiny_llama

    model = tiny_llama().train()
    if method == "loramoe":
        attach(model, LoraMoEConfig(dropout=0.0))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = LoraMoETrainer(model=model, args=args)
    assert trainer._sparse_logits
    torch.manual_seed(1)
    ids = torch.randint(2, 97, (3, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 4:7], labels[1, 9:12], labels[2, 2:3] = ids[0, 4:7], ids[1, 9:12], ids[2, 2:3]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute(model, dict(inputs), False, num_items)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ours, ours_grads = loss_and_grads(trainer._lm_loss)
    theirs, their_grads = loss_and_grads(lambda *a: Trainer.compute_loss(trainer, *a))
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-6)
    assert all(torch.allclose(ours_grads[n], their_grads[n], atol=1e-6, rtol=1e-5) for n in their_grads)


def test_length_grouped_batches_train_and_resume_to_the_same_weights(tiny_model_dir, data_file, tmp_path):
    import shutil

    settings = _common(tiny_model_dir, data_file, group_by_length=True, save_total_limit=None)
    straight = train(**settings, output=tmp_path / "straight")
    assert straight["steps"] == 4
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "checkpoint-2", resumed_dir / "checkpoint-2")
    summary = train(**settings, output=tmp_path / "resumed", resume=True)
    assert summary["resumed_from"].endswith("checkpoint-2")
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = train(**_common(tiny_model_dir, data_file), output=tmp_path / "plain")
    assert straight["tokens"] == plain["tokens"]  # every record once, in other batches
