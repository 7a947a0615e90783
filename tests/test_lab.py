"""`loramoe lab` on a tiny local model: settings, the mix, the sweep, its cache and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import loramoe.lab.runs as lab_runs
from loramoe.cli import main as cli_main
from loramoe.lab import lab
from loramoe.lab.config import LabConfigError, load_config
from loramoe.lab.mix import build_mix, size_label
from tests.conftest import save_tiny
from tests.lab_checks import check_report

TINY = """
model: {model}
mix: {{unit: 8, sizes: [1, 2]}}
train: {{batch_size: 4, max_length: 64}}
variants:
  full: {{method: full, lr: 1.0e-3}}
  lora: {{method: lora, lr: 1.0e-3}}
  loramoe-lbc: {{method: loramoe, lr: 1.0e-3, balance_weight: 0.1}}
sequential: [full, loramoe-lbc]
eval: {{limit: {{knowledge: 3, tasks: 1, lm-loss: 2}}, max_new_tokens: 3, batch_size: 8, max_length: 64}}
"""


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lab")
    save_tiny(root / "model")
    config = root / "lab.yaml"
    config.write_text(TINY.format(model=root / "model"))
    results = lab(lab_config=config, output=root / "out")
    yield root, config, results
    torch.set_num_threads(threads)


def test_the_report_holds_every_run_and_only_numbers_of_results_json(tiny_lab):
    root, _, results = tiny_lab
    saved = check_report(root / "out")
    assert saved["findings"] == json.loads(json.dumps(results["findings"]))
    names = [row["name"] for row in saved["runs"]]
    assert names == ["full-1x", "full-2x", "lora-1x", "lora-2x", "loramoe-lbc-1x", "loramoe-lbc-2x",
                     "full-2x-sequential", "loramoe-lbc-2x-sequential"]
    rows = {row["name"]: row for row in saved["runs"]}
    assert rows["full-2x"]["records"] == 16 and rows["full-2x-sequential"]["records"] == 16
    assert rows["full-2x"]["trainable_parameters"] > rows["loramoe-lbc-2x"]["trainable_parameters"] > \
        rows["lora-2x"]["trainable_parameters"]
    assert set(rows["loramoe-lbc-2x"]["router"]) == {"knowledge", "task", "text"}
    assert len(rows["loramoe-lbc-2x"]["router_experts"]["knowledge"]) == 6
    assert rows["full-2x"]["kl_to_base"] > 0 and rows["lora-2x"]["drift"] > 0
    assert saved["mix"]["2x"] == {"knowledge": 4, "task": 12, "total": 16}
    assert (root / "out" / "router_by_type.png").is_file()
    full_runs = [p for p in (root / "out" / "runs").iterdir() if p.name.startswith("full-")]
    assert full_runs and not any((p / "model.safetensors").exists() for p in full_runs)  # weights dropped


def test_a_second_lab_reuses_every_run_and_an_extended_one_trains_only_the_new(tiny_lab, monkeypatch):
    root, config, results = tiny_lab
    trained: list[str] = []
    real_train = lab_runs.train

    def counting_train(**kwargs):
        trained.append(Path(kwargs["output"]).name)
        return real_train(**kwargs)

    monkeypatch.setattr(lab_runs, "train", counting_train)
    again = lab(lab_config=config, output=root / "out")
    assert trained == [] and again["runs"] == json.loads(json.dumps(results["runs"]))

    extended = root / "extended.yaml"
    extended.write_text(config.read_text().replace("loramoe-lbc: {", "loramoe: {method: loramoe, lr: 1.0e-3, "
                                                   "balance_weight: 0.0}\n  loramoe-lbc: {"))
    more = lab(lab_config=extended, output=root / "out")
    assert sorted(name.rsplit("-", 1)[0] for name in trained) == ["loramoe-1x", "loramoe-2x"]
    assert len(more["runs"]) == len(results["runs"]) + 2


def test_an_interrupted_run_is_taken_up_where_it_stopped(tiny_lab, monkeypatch):
    root, config, _ = tiny_lab
    folder = next(p for p in (root / "out" / "runs").iterdir() if p.name.startswith("lora-2x"))
    (folder / "lab_run.json").unlink()  # trained, killed while scoring
    monkeypatch.setattr(lab_runs, "train", lambda **kwargs: pytest.fail("a trained run was trained again"))
    scored: list[str] = []
    real_evaluate = lab_runs.evaluate
    monkeypatch.setattr(lab_runs, "evaluate", lambda **kw: scored.append(str(kw["output"])) or real_evaluate(**kw))
    lab(lab_config=config, output=root / "out")
    assert scored == [str(folder / "eval")] and (folder / "lab_run.json").is_file()


def test_other_eval_settings_rescore_every_run_and_retrain_only_dropped_full_weights(tiny_lab, monkeypatch):
    root, config, _ = tiny_lab
    trained: list[str] = []
    real_train = lab_runs.train
    monkeypatch.setattr(lab_runs, "train", lambda **kw: trained.append(Path(kw["output"]).name) or real_train(**kw))
    other = root / "other_eval.yaml"
    other.write_text(config.read_text().replace("knowledge: 3,", "knowledge: 2,"))
    results = lab(lab_config=other, output=root / "out")
    assert sorted(name.rsplit("-", 1)[0] for name in trained) == [
        "full-1x", "full-2x", "full-2x-sequential", "full-2x-sequential-stage1"]
    assert all(row["knowledge_questions"] == 2 * 6 for row in results["runs"])
    assert results["base"]["knowledge_questions"] == 2 * 6
    check_report(root / "out")


def test_cli_runs_the_lab_and_writes_a_config_to_copy(tiny_lab, tmp_path):
    root, config, _ = tiny_lab
    cli_main(["lab", "--config", str(config), "--output", str(root / "out")])
    copy = tmp_path / "my.yaml"
    cli_main(["lab", "--init-config", str(copy)])
    assert copy.read_text() == (Path(lab_runs.__file__).parent / "lab.yaml").read_text()
    with pytest.raises(FileExistsError, match="my.yaml"):
        lab(init_config=copy)
    with pytest.raises(ValueError, match="exclude each other"):
        lab(quick=True, full=True)


def test_settings_merge_file_then_profile():
    default = load_config()
    assert list(default.variants) == ["full", "lora", "tied-lora", "loramoe", "loramoe-lbc"]
    assert default.mix.sizes == [1, 4, 16] and default.sequential == ["full", "loramoe-lbc"]
    quick = load_config(profile="quick")
    assert quick.mix.sizes == [1, 4] and quick.mix.templates == default.mix.templates
    assert quick.sources == ["lab.yaml (shipped)", "profile quick"]


def test_a_user_file_merges_mappings_and_replaces_variants(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("mix: {unit: 10}\nvariants:\n  lora: {method: lora, lr: 0.001}\nsequential: []\n")
    config = load_config(path)
    assert config.mix.unit == 10 and config.mix.sizes == [1, 4, 16]
    assert list(config.variants) == ["lora"] and config.eval.max_new_tokens == 20


@pytest.mark.parametrize("text, message", [
    ("bogus: 1\n", "unknown key 'bogus'"),
    ("mix: {units: 3}\n", "'mix' has unknown keys \\['units'\\]"),
    ("variants: {x: {method: dora}}\nsequential: []\n", "variants.x.method must be"),
    ("variants: {x: {method: lora, learning_rate: 1}}\nsequential: []\n", "variants.x.learning_rate"),
    ("sequential: [nope]\n", "sequential names 'nope'"),
    ("train: {data: [a.jsonl]}\n", "train.data"),
    ("mix: {knowledge: [capitol]}\n", "mix.knowledge \\['capitol'\\]"),
    ("mix: {knowledge_share: 1.5}\n", "knowledge_share"),
    ("- a list\n", "must be a mapping"),
    ("mix: [unclosed\n", "not valid YAML"),
])
def test_bad_settings_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LabConfigError, match=message) as error:
        load_config(path)
    assert "bad.yaml" in str(error.value)
    with pytest.raises(LabConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_the_mix_is_nested_typed_and_split_in_two_for_the_sequential_runs(tmp_path):
    config = load_config().mix
    mix = build_mix(config, tmp_path, seed=0)
    read = {size: [json.loads(line) for line in path.read_text().splitlines()] for size, path in mix.sizes.items()}
    assert {size: len(records) for size, records in read.items()} == {"1x": 8, "4x": 32, "16x": 128}
    as_set = {size: {json.dumps(r, sort_keys=True) for r in records} for size, records in read.items()}
    assert as_set["1x"] <= as_set["4x"] <= as_set["16x"]
    assert sum(r["type"] == "knowledge" for r in read["16x"]) == 32
    parts = [json.loads(line) for p in (mix.task_part, mix.knowledge_part) for line in p.read_text().splitlines()]
    assert {json.dumps(r, sort_keys=True) for r in parts} == as_set["16x"]
    assert all(len(r["instruction"]) < config.max_context_chars + 400 for r in read["16x"])
    config.unit = 100_000
    with pytest.raises(ValueError, match="lower mix.unit"):
        build_mix(config, tmp_path / "big", seed=0)


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_every_shipped_profile_builds_its_mix(tmp_path, profile):
    config = load_config(profile=profile)
    mix = build_mix(config.mix, tmp_path, seed=config.seed)
    assert list(mix.counts) == [size_label(size) for size in sorted(config.mix.sizes)]
