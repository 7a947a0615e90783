"""`loramoe lab` on a tiny local model: settings, the mix, the arms and seeds, the cache, the report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import loramoe.lab.runs as lab_runs
from loramoe.cli import main as cli_main
from loramoe.lab import lab
from loramoe.lab.config import LabConfigError, load_config
from loramoe.lab.mix import build_mix
from loramoe.lab.probe import build_probe, lab_probe
from loramoe.lab.verdicts import VERDICTS
from loramoe.train.sampling import LengthGroupedSampler
from tests.conftest import save_tiny
from tests.lab_checks import TINY_LAB, check_report

TINY = dict(variants="""\
  full: {method: full, lr: 1.0e-3, seeds: [0]}
  lora: {method: lora, lr: 1.0e-3, seeds: [0]}
  loramoe-lbc: {method: loramoe, lr: 1.0e-3, balance_weight: 0.1, seeds: [0, 1]}""", contrasts="""\
  - {name: backbone, a: loramoe-lbc, b: full, question: "Does the frozen backbone keep more?"}
  - {name: mixture, a: loramoe-lbc, b: lora, question: "Does the mixture keep more?"}""")


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lab")
    cache = os.environ.get("LORAMOE_CACHE")
    os.environ["LORAMOE_CACHE"] = str(root / "cache")  # the pace file a lab keeps stays in the test's folder
    save_tiny(root / "model")
    config = root / "lab.yaml"
    config.write_text(TINY_LAB.format(model=root / "model", **TINY))
    results = lab(lab_config=config, output=root / "out")
    yield root, config, results
    torch.set_num_threads(threads)
    if cache is None:
        os.environ.pop("LORAMOE_CACHE")
    else:
        os.environ["LORAMOE_CACHE"] = cache


def test_the_report_holds_every_arm_contrast_and_only_numbers_of_results_json(tiny_lab):
    root, _, results = tiny_lab
    saved = check_report(root / "out")
    assert saved["contrasts"] == json.loads(json.dumps(results["contrasts"]))
    assert list(saved["arms"]) == ["full", "lora", "loramoe-lbc"]
    assert saved["arms"]["loramoe-lbc"]["runs"] == ["loramoe-lbc-s0", "loramoe-lbc-s1"]
    for arm in saved["arms"].values():
        assert arm["path"]["steps"] == [0, 2, 4] and arm["path"]["skill"][0] == 0.0  # log-spaced: 4 ** (1/2), 4
        for measure in ("gold_logprob", "mc", "gold_share", "mc_norm", "skill"):
            end = arm["end"][measure]
            assert end["low"] <= end["estimate"] <= end["high"]
    assert [c["name"] for c in saved["contrasts"]] == ["backbone", "mixture"]
    for contrast in saved["contrasts"]:
        for measure in ("mc", "gold_share", "mc_norm"):
            assert contrast[measure]["verdict"] in VERDICTS
    length = saved["length_only"]
    assert list(length["per_relation"]) == list(saved["probe"]["facts_per_relation"])
    assert length["all"]["facts"] == saved["probe"]["facts"]
    router = saved["arms"]["loramoe-lbc"]["router"]
    assert router["steps"] == [2, 4] and len(router["own_group_share"]["knowledge"]) == 2
    assert len(router["final_per_layer"]["task"]["task"]) == 2  # two layers
    assert saved["regime"]["full"] == "full" and saved["probe"]["facts"] > 100
    assert set(saved["regime"]["arms"]["lora"]["lost"]) == {"gold_share", "mc", "mc_norm"}
    assert saved["arms"]["full"]["trainable_parameters"] > saved["arms"]["loramoe-lbc"]["trainable_parameters"]
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
    assert trained == [] and again["arms"] == json.loads(json.dumps(results["arms"]))

    extended = root / "extended.yaml"
    extended.write_text(config.read_text().replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    more = lab(lab_config=extended, output=root / "out")
    assert [name.rsplit("-", 1)[0] for name in trained] == ["loramoe-lbc-s2"]
    assert more["arms"]["loramoe-lbc"]["seeds"] == [0, 1, 2]


def test_an_interrupted_run_is_done_again_and_nothing_else(tiny_lab, monkeypatch):
    root, config, _ = tiny_lab
    folder = next(p for p in (root / "out" / "runs").iterdir() if p.name.startswith("lora-s0"))
    (folder / "lab_run.json").unlink()  # killed before it finished
    trained: list[str] = []
    real_train = lab_runs.train
    monkeypatch.setattr(lab_runs, "train", lambda **kw: trained.append(Path(kw["output"]).name) or real_train(**kw))
    lab(lab_config=config, output=root / "out")
    assert trained == [folder.name] and (folder / "lab_run.json").is_file()


def test_other_score_settings_redo_every_run(tiny_lab, monkeypatch):
    root, config, _ = tiny_lab
    trained: list[str] = []
    real_train = lab_runs.train
    monkeypatch.setattr(lab_runs, "train", lambda **kw: trained.append(Path(kw["output"]).name) or real_train(**kw))
    other = root / "other_score.yaml"
    other.write_text(config.read_text().replace("task_items: 2,", "task_items: 1,"))
    results = lab(lab_config=other, output=root / "out/other")
    assert len(trained) == 4 and results["probe"]["task_items"] == 6
    check_report(root / "out/other")


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
    assert list(default.variants) == ["full", "lora", "loramoe-lbc", "loramoe-route"]
    assert default.contrasts[0].name == "mixture with constraint vs LoRA"
    assert {tuple(default.seeds(v)) for v in default.variants} == {(0, 1, 2)}  # every arm, paired by seed
    assert default.score.verdict_level in default.score.levels and default.score.verdict_level < 1
    quick = load_config(profile="quick")
    assert quick.mix.records < default.mix.records and quick.mix.templates == default.mix.templates
    assert quick.sources == ["lab.yaml (shipped)", "profile quick"] and quick.score.points == default.score.points


def test_a_user_file_merges_mappings_and_replaces_variants(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("mix: {records: 10}\nvariants:\n  lora: {method: lora, lr: 0.001}\ncontrasts: []\n")
    config = load_config(path)
    assert config.mix.records == 10 and config.mix.knowledge_share == load_config().mix.knowledge_share
    assert list(config.variants) == ["lora"] and config.seeds("lora") == [config.seed]


@pytest.mark.parametrize("text, message", [
    ("bogus: 1\n", "unknown key 'bogus'"),
    ("mix: {units: 3}\n", "'mix' has unknown keys \\['units'\\]"),
    ("variants: {x: {method: dora}}\ncontrasts: []\n", "variants.x.method must be"),
    ("variants: {x: {method: lora, learning_rate: 1}}\ncontrasts: []\n", "variants.x.learning_rate"),
    ("variants: {x: {method: lora, seeds: [1, 1]}}\ncontrasts: []\n", "variants.x.seeds"),
    ("contrasts: [{name: c, a: full, b: nope, question: q}]\n", "contrast 'c' names 'nope'"),
    ("contrasts: [{name: c, a: full}]\n", "contrasts\\[0\\]"),
    ("train: {data: [a.jsonl]}\n", "train.data"),
    ("train: {max_steps: 3}\n", "train.max_steps"),
    ("mix: {knowledge: [capitol]}\n", "mix.knowledge \\['capitol'\\]"),
    ("mix: {knowledge_share: 1.5}\n", "knowledge_share"),
    ("score: {precision: fp8}\n", "score.precision"),
    ("score: {levels: [0.5, 2]}\n", "score.levels"),
    ("score: {levels: [0.5, 1.0], verdict_level: 0.8}\n", "score.verdict_level 0.8 must be one of"),
    ("frontiers: {lora: [lora]}\n", "frontiers.lora: the name is also a variant's"),
    ("frontiers: {f: [lora, nope]}\n", "frontiers.f: 'nope' is not in variants"),
    ("frontiers: {f: [lora, full]}\n", "frontiers.f: its variants train different methods"),
    (("frontiers: {f: [loramoe-lbc, loramoe-route]}\nvariants:\n  loramoe-lbc: {method: loramoe, seeds: [0]}\n"
      "  loramoe-route: {method: loramoe, seeds: [1]}\ncontrasts: []\n"), "frontiers.f: its variants must run"),
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


def test_the_mix_is_typed_short_and_a_prefix_of_a_larger_one(tmp_path):
    config = load_config().mix
    mix = build_mix(config, tmp_path / "a", seed=0)
    records = [json.loads(line) for line in mix.path.read_text().splitlines()]
    assert len(records) == config.records and mix.counts["total"] == config.records
    assert sum(r["type"] == "knowledge" for r in records) == mix.counts["knowledge"] == \
        round(config.records * config.knowledge_share)
    assert all(len(r["instruction"]) < config.max_context_chars + 400 for r in records)
    config.records *= 2
    larger = {json.dumps(json.loads(line), sort_keys=True)
              for line in build_mix(config, tmp_path / "b", seed=0).path.read_text().splitlines()}
    assert {json.dumps(r, sort_keys=True) for r in records if r["type"] == "task"} <= larger
    config.records = 1_000_000
    with pytest.raises(ValueError, match="lower mix.records"):
        build_mix(config, tmp_path / "big", seed=0)


def test_the_probe_asks_held_out_facts_with_distractors_of_their_relation(tmp_path):
    config = load_config()
    mix = build_mix(config.mix, tmp_path, seed=0)
    probe = lab_probe(config, mix.path)
    s = config.score
    per_relation = [sum(f.example.relation == r for f in probe.facts) for r in config.mix.knowledge]
    assert per_relation == [s.fact_items] * len(config.mix.knowledge) and probe.relations == config.mix.knowledge
    for fact in probe.facts:
        assert len(fact.distractors) == 3 and not set(fact.distractors) & set(fact.aliases)
    assert len(probe.chat) == s.chat_items * len(config.mix.knowledge)
    assert all(n <= s.task_items for n in [sum(t.task == name for t in probe.tasks) for name in probe.task_names])
    every = build_probe(relations=config.mix.knowledge, tasks=config.mix.tasks, mix_file=mix.path, seed=0,
                        choices=4, task_items=s.task_items, chat_items=s.chat_items,
                        generation_items=s.generation_items, max_context_chars=config.mix.max_context_chars)
    assert len(every.facts) > 500  # fact_items takes a seeded subset of all of them
    assert {f.example.id for f in probe.facts} <= {f.example.id for f in every.facts}


@pytest.mark.parametrize("profile", [None, "quick", "frontier"])
def test_no_held_out_fact_trains_in_any_profile(tmp_path, profile):
    """The overlap filter's proof: no probe fact's subject is asked about, in its relation, by any
    knowledge record of the mix, and no task record states it either."""
    config = load_config(profile=profile)
    mix = build_mix(config.mix, tmp_path, seed=config.seed)
    records = [json.loads(line) for line in mix.path.read_text().splitlines()]
    trained = {(r["relation"], r["subject"].lower()) for r in records if r["type"] == "knowledge"}
    assert len(trained) >= config.mix.records * config.mix.knowledge_share / (2 * config.mix.templates)
    probe = lab_probe(config, mix.path)
    for fact in probe.facts:
        assert (fact.example.relation, fact.example.subject.lower()) not in trained, fact.example.id
    texts = [(r["instruction"] + " " + r["output"]).lower() for r in records if r["type"] == "task"]
    stated = [f for f in probe.facts if any(f.statement.lower() in t for t in texts)]
    assert not stated


def test_the_full_profile_plans_its_runs_without_training(tmp_path):
    save_tiny(tmp_path / "model")
    path = tmp_path / "gpu.yaml"
    path.write_text(f"model: {tmp_path / 'model'}\n")
    config = load_config(path, profile="full")
    mix = build_mix(config.mix, tmp_path / "mix", seed=config.seed)
    runs = lab_runs.plan(config, mix, "key")
    assert len(runs) == sum(len(config.seeds(v)) for v in config.variants) == 21
    assert {r.settings["max_steps"] for r in runs} == {4096 // 16}
    assert runs[0].steps == [3, 6, 16, 40, 102, 256]
    assert {r.settings["model"] for r in runs} == {str(tmp_path / "model")}
    assert len({r.key for r in runs}) == len(runs)


def test_the_frontier_profile_plans_two_rates_per_method_with_paired_seeds(tmp_path):
    config = load_config(profile="frontier")
    mix = build_mix(config.mix, tmp_path / "mix", seed=config.seed)
    runs = lab_runs.plan(config, mix, "key")
    assert len(runs) == 30 and {r.seed for r in runs} == {0, 1, 2}
    assert set(config.frontiers) == {"full", "lora", "loramoe", "loramoe-lbc", "loramoe-route"}
    for members in config.frontiers.values():
        assert len({config.variants[m]["lr"] for m in members}) == 2
    named = {side for c in config.contrasts for side in (c.a, c.b)}
    assert named <= set(config.frontiers)


def test_seed_k_gives_every_arm_the_same_data_order(tmp_path):
    """The contrasts pair arms by seed: what decides a run's data order (the data, the seed and the
    batching) is the same for every arm of one seed, and the sampler draws from nothing else."""
    config = load_config()
    runs = lab_runs.plan(config, build_mix(config.mix, tmp_path, seed=config.seed), "key")
    order = ("data", "seed", "batch_size", "grad_accum", "max_length", "group_by_length", "epochs", "max_steps")
    by_seed: dict[int, set[str]] = {}
    for run in runs:
        by_seed.setdefault(run.seed, set()).add(json.dumps({k: run.settings.get(k) for k in order}, sort_keys=True))
    assert sorted(by_seed) == [0, 1, 2] and all(len(kinds) == 1 for kinds in by_seed.values())
    lengths = [5, 9, 3, 12, 7, 7, 2, 10, 4, 8, 6, 11]
    first, again, other = (list(LengthGroupedSampler(lengths, 4, seed=s)) for s in (1, 1, 2))
    assert first == again != other
