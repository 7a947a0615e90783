"""``loramoe scaling`` on tiny local models: the measuring callback, the data it writes, the
outputs of a whole sweep, reuse of finished runs and the command line's list flags."""

from __future__ import annotations

import json

import pytest
import torch

import loramoe.scaling.main
from loramoe.adapters import LoraConfig
from loramoe.attach import attach
from loramoe.cli import _normalise_flags
from loramoe.cli import main as cli_main
from loramoe.data import DataCollator, read_records, tokenize_records
from loramoe.scaling.main import ForgettingProbe, fine_tuning_data, general_texts, heldout_loss
from tests.conftest import save_tiny, tiny_llama, tiny_tokenizer, typed_records

TEXT = "\n\n".join(" ".join(f"w{(7 * i + j) % 90 + 2}" for j in range(16)) for i in range(6))


def _held(tokenizer, n: int = 6):
    records, _ = read_records([typed_records(n)])
    return tokenize_records(records, tokenizer, max_length=32)


def test_probe_measures_zero_kl_untouched_and_positive_kl_after_a_step(one_thread):
    model, tokenizer = attach(tiny_llama(), LoraConfig(r=2)), tiny_tokenizer()
    probe = ForgettingProbe(tokenizer, TEXT.split("\n\n"), _held(tokenizer), eval_every=1, text_max_length=16)
    before = probe.measure(model, 0)
    assert before["kl"] == pytest.approx(0.0, abs=1e-7)
    assert before["forgetting_ce"] == pytest.approx(before["base_entropy"], abs=1e-6)
    batch = DataCollator(tokenizer)([_held(tokenizer)[i] for i in range(4)])
    batch.pop("sample_type")
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).zero_grad()
    model(**batch).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    after = probe.measure(model, 1)
    assert after["kl"] > 1e-6
    assert [p["step"] for p in probe.points] == [0, 1]


def test_heldout_loss_is_the_models_own_loss_over_answer_tokens(one_thread):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    held = _held(tokenizer, 5)
    collator = DataCollator(tokenizer)
    batch = collator([held[i] for i in range(len(held))])
    batch.pop("sample_type")
    with torch.no_grad():
        expected = model(**batch).loss.item()
    assert heldout_loss(model, held, collator, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_general_texts_reads_paragraphs_and_refuses_missing_or_empty_files(tmp_path):
    file = tmp_path / "text.txt"
    file.write_text("first one\n\n\n  second one \n\nthird")
    assert general_texts(file, 2) == ["first one", "second one"]
    with pytest.raises(ValueError, match="no such file"):
        general_texts(tmp_path / "missing.txt", 2)
    (tmp_path / "empty.txt").write_text("\n\n \n")
    with pytest.raises(ValueError, match="no text"):
        general_texts(tmp_path / "empty.txt", 2)
    assert len(general_texts(None, 3)) == 3  # the shipped Wikipedia paragraphs


def test_default_data_is_the_task_train_splits_that_fit_and_a_disjoint_heldout_part(tmp_path):
    tokenizer = tiny_tokenizer()
    train_file, heldout_file = fine_tuning_data(None, tmp_path, tokenizer, max_length=24, heldout=5, seed=0)
    train_rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    held_rows = [json.loads(line) for line in heldout_file.read_text().splitlines()]
    assert len(held_rows) == 5 and len(train_rows) > 20
    assert {row["type"] for row in train_rows + held_rows} == {"task"}
    assert not {json.dumps(r) for r in held_rows} & {json.dumps(r) for r in train_rows}
    records, _ = read_records([train_file])
    assert max(map(len, tokenize_records(records, tokenizer, max_length=10**6)["input_ids"])) <= 24
    with pytest.raises(ValueError, match="need more than --heldout 5"):
        fine_tuning_data([[typed_records(1)[0]] * 5], tmp_path / "small", tokenizer, max_length=24, heldout=5, seed=0)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    save_tiny(root / "model")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in typed_records(40)))
    (root / "text.txt").write_text(TEXT)
    args = ["scaling", "--model", str(root / "model"), "--data", str(root / "data.jsonl"), "--text",
            str(root / "text.txt"), "--method", "lora,loramoe", "--ranks", "1", "2", "4", "--steps", "6",
            "--eval-every", "2", "--heldout", "8", "--max-length", "32", "--lr", "5e-3", "--output", str(root / "out")]
    cli_main(args)
    return root, args


def test_sweep_writes_points_fits_plots_and_summary(sweep):
    root, _ = sweep
    out = root / "out"
    result = json.loads((out / "scaling.json").read_text())
    assert [(r["method"], r["size"]) for r in result["runs"]] == [
        ("lora", 1), ("lora", 2), ("lora", 4), ("loramoe", 1), ("loramoe", 2), ("loramoe", 4)]
    for run in result["runs"]:
        assert [p["step"] for p in run["points"]] == [0, 2, 4, 6]
        assert run["points"][0]["kl"] == pytest.approx(0.0, abs=1e-7)
        assert run["points"][-1]["kl"] > 0
    lora = {r["size"]: r["trainable_parameters"] for r in result["runs"] if r["method"] == "lora"}
    assert lora[2] == 2 * lora[1] and lora[4] == 4 * lora[1]
    for method in ("lora", "loramoe"):
        fits = result["fits"][method]
        assert fits["points"] == 9  # steps 2, 4, 6 of three sizes (steps <= 6 // 5 = 1 excluded)
        assert {"c", "s", "r2", "residuals"} <= set(fits["linear"]) and len(fits["linear"]["residuals"]) == 9
        assert {"alpha", "beta", "rho", "r2"} <= set(fits["power_forgetting"])
    pair = result["comparison"]["pairs"][0]  # LoRAMoE's one expert of rank 4 vs LoRA of rank 4
    assert (pair["size"], pair["reference_size"]) == (1, 4)
    for name in result["plots"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "scaling.md").read_text()
    assert "0.035" in summary and "0.147" in summary and result["comparison"]["sentence"] in summary
    assert (out / "data" / "train.jsonl").is_file() and (out / "data" / "heldout.jsonl").is_file()


def test_a_rerun_reuses_finished_runs_and_a_changed_setting_trains_again(sweep, monkeypatch):
    root, args = sweep
    before = json.loads((root / "out" / "scaling.json").read_text())

    def no_training(**kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loramoe.scaling.main, "train", no_training)
    cli_main(args)
    again = json.loads((root / "out" / "scaling.json").read_text())
    assert again["runs"] == before["runs"]
    with pytest.raises(AssertionError, match="trained again"):
        cli_main([*args[:-2], "--lr", "1e-3", "--output", str(root / "out")])


def test_list_flags_take_spaces_or_commas_only_where_the_subcommand_allows():
    assert _normalise_flags(["scaling", "--ranks", "1,2", "4", "--method", "lora"]) == [
        "scaling", "--ranks", '["1", "2", "4"]', "--method", '["lora"]']
    assert _normalise_flags(["train", "--method", "lora"]) == ["train", "--method", "lora"]
    assert _normalise_flags(["train", "--target-modules", "a{1,2}"]) == ["train", "--target_modules", '["a{1,2}"]']


def test_bad_sweep_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--eval-every must be in"):
        loramoe.scaling.scaling(model=str(tmp_path), steps=4, eval_every=5, output=tmp_path / "x")
    with pytest.raises(ValueError, match="--ranks must be positive"):
        loramoe.scaling.scaling(model=str(tmp_path), ranks=[0, 2], output=tmp_path / "x")
