"""The lab's knowledge of its machine (loramoe.lab.pace): unit costs learnt from the runs it
trains, and ``precision: auto`` measured once per machine. Made-up timings: nothing trains."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import loramoe.lab.main as lab_main
from loramoe.lab import pace
from loramoe.lab.config import LabConfigError, load_config
from loramoe.lab.pace import DEFAULTS, Pace, Stopwatch, resolve_precision
from loramoe.lab.runs import Run
from tests.conftest import save_tiny

START, STEP_FULL, STEP_ADAPTER, POINT, FINAL, BASE = 7.0, 0.5, 0.25, 3.0, 11.0, 20.0
"""Made-up seconds: a run's start, a step per record (full, adapter), a point, the free answers, the base."""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """The machine file in this test's folder, never the user's cache."""
    monkeypatch.setenv("LORAMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_run(tmp_path, method: str, batch: int, max_steps: int = 10, steps: list[int] | None = None) -> Run:
    data = tmp_path / "mix.jsonl"
    data.write_text("{}\n")
    settings = {"method": method, "data": [str(data)], "model": "m", "precision": "bf16", "max_length": 192,
                "group_by_length": True, "batch_size": batch, "max_steps": max_steps}
    return Run(f"{method}-s0", method, 0, 80, settings, steps or [2, 5, max_steps], "scoring")


def truth(run: Run) -> float:
    per_record = STEP_FULL if run.method == "full" else STEP_ADAPTER
    return START + run.settings["max_steps"] * per_record * run.settings["batch_size"] + \
        len(run.steps) * POINT + FINAL


def simulate(run: Run, estimate: dict[str, float]) -> Stopwatch:
    """The ticks ``execute`` sends, on a clock that moves by the made-up seconds."""
    clock = Clock()
    watch = Stopwatch(run, estimate, clock)
    per_record = STEP_FULL if run.method == "full" else STEP_ADAPTER
    clock.now += START - 1.0  # loading, before the first step
    for step in range(1, run.settings["max_steps"] + 1):
        clock.now += per_record * run.settings["batch_size"]
        watch.tick("step")
        if step in run.steps:
            clock.now += POINT + (FINAL if step == run.steps[-1] else 0.0)
            watch.tick("point")
    clock.now += 1.0  # saving
    watch.stop()
    return watch


def test_costs_learnt_from_runs_estimate_a_planned_lab_within_one_percent(tmp_path):
    known = Pace("scoring")
    trained = [make_run(tmp_path, "full", 8), make_run(tmp_path, "lora", 8)]
    for run in trained:
        known.observe(run, simulate(run, known.estimate(run)))
    known.observe_base(BASE)
    later = Pace("scoring")  # a second lab reads what the first wrote
    planned = [make_run(tmp_path, "full", 8, max_steps=40, steps=[3, 12, 40]),
               make_run(tmp_path, "loramoe", 8, max_steps=40, steps=[3, 12, 40]),
               make_run(tmp_path, "loramoe", 4, max_steps=40, steps=[3, 12, 40])]
    estimated = sum(later.estimate(r)["total"] for r in planned) + later.base()
    assert estimated == pytest.approx(sum(truth(r) for r in planned) + BASE, rel=0.01)


def test_the_progress_ticks_of_a_run_add_up_to_its_estimate(tmp_path):
    run = make_run(tmp_path, "lora", 8)
    estimate = Pace("scoring").estimate(run)
    clock = Clock()
    watch = Stopwatch(run, estimate, clock)
    ticked = sum(watch.tick("step") + (watch.tick("point") if s in run.steps else 0.0)
                 for s in range(1, run.settings["max_steps"] + 1))
    assert ticked == pytest.approx(estimate["total"])


def test_the_machine_file_round_trips_and_each_update_keeps_the_rest(tmp_path, cache):
    run = make_run(tmp_path, "lora", 8)
    first = Pace("scoring")
    first.observe(run, simulate(run, first.estimate(run)))
    first.observe_base(BASE)
    assert pace.pace_file().parent == cache / "lab"
    saved = json.loads(pace.pace_file().read_text())
    assert saved["machine"] == pace.machine() and saved["score"]["scoring"]["base"] == BASE
    assert Pace("scoring").estimate(run) == pytest.approx({
        "start": START, "step": STEP_ADAPTER * 8, "point": POINT, "final": FINAL, "total": truth(run)})
    first.observe_base(2 * BASE)  # a second measure is blended with the first
    assert Pace("scoring").base() == pytest.approx(1.5 * BASE)
    assert Pace("other").base() == DEFAULTS["base"]  # another probe: not measured yet


@pytest.mark.parametrize("text", [
    "{not json",
    "[1, 2]",
    json.dumps({"machine": {"cpu": "another", "bf16": [], "torch": "0", "threads": 64},
                "score": {"scoring": {"base": 1.0, "point": 1.0, "final": 1.0}}}),
    "BAD_VALUES",
])
def test_a_corrupt_or_foreign_file_is_ignored_for_the_constants(tmp_path, text):
    path = pace.pace_file()
    path.parent.mkdir(parents=True)
    if text == "BAD_VALUES":  # this machine's file, but values no cost can be
        text = json.dumps({"machine": pace.machine(), "train": [], "precision": {"m": "bf16"},
                           "score": {"scoring": {"base": -1.0, "point": "fast", "final": float("nan")}}})
    path.write_text(text)
    run = make_run(tmp_path, "full", 8)
    costs = Pace("scoring")
    assert costs.base() == DEFAULTS["base"]
    assert costs.estimate(run)["step"] == pytest.approx(DEFAULTS["full"] * 8)
    costs.observe(run, simulate(run, costs.estimate(run)))  # and the next write replaces it
    assert Pace("scoring").estimate(run)["point"] == pytest.approx(POINT)


def timings(train_bf16: float, score_bf16: float) -> dict:
    return {"train_shape": [8, 96], "score_shape": [32, 16], "train_step": {"bf16": train_bf16, "fp32": 1.0},
            "score_forward": {"bf16": score_bf16, "fp32": 1.0}}


@pytest.fixture
def timer(monkeypatch):
    """pace.measure replaced: bf16 trains faster and scores slower; counts its calls."""
    calls: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pace, "measure", lambda *args: calls.append(args) or timings(0.6, 1.4))
    return calls


def auto_config(tmp_path, train: str = "auto", score: str = "auto"):
    path = tmp_path / "auto.yaml"
    path.write_text(f"model: {tmp_path / 'model'}\ntrain: {{precision: {train}, batch_size: 4}}\n"
                    f"score: {{precision: {score}}}\n")
    return load_config(path)


def test_auto_takes_the_faster_precision_of_each_and_measures_once_per_machine(tmp_path, timer):
    resolved, record = resolve_precision(auto_config(tmp_path))
    assert (resolved.train["precision"], resolved.score.precision) == ("bf16", "fp32")
    assert record["train"] == "bf16" and record["score"] == "fp32"
    assert record["measured"]["train_step"] == {"bf16": 0.6, "fp32": 1.0} and record["cpu"] == pace.machine()["cpu"]
    assert timer == [(str(tmp_path / "model"), (4, 96), (32, 16))]
    again, second = resolve_precision(auto_config(tmp_path))
    assert len(timer) == 1 and second == record and again.score.precision == "fp32"


def test_fixed_precisions_are_not_measured_and_a_gpu_keeps_the_trainers_choice(tmp_path, timer, monkeypatch):
    config, record = resolve_precision(auto_config(tmp_path, "fp32", "bf16"))
    assert (config.train["precision"], config.score.precision) == ("fp32", "bf16") and record["measured"] is None
    unset = replace(auto_config(tmp_path), train={"batch_size": 4})  # no train.precision: the trainer's default
    config, record = resolve_precision(unset)
    assert "precision" not in config.train and config.score.precision == "fp32" and record["train"] == "auto"
    timer.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    config, record = resolve_precision(auto_config(tmp_path))
    assert (config.train["precision"], config.score.precision) == ("fp16", "fp32") and timer == []


def test_the_lab_resolves_auto_before_it_plans_its_runs(tmp_path, timer, monkeypatch):
    save_tiny(tmp_path / "model")
    (tmp_path / "auto.yaml").write_text(f"model: {tmp_path / 'model'}\nmix: {{records: 16}}\n"
                                        "train: {precision: auto, batch_size: 4}\nscore: {precision: auto}\n")
    planned, real_plan = [], lab_main.plan

    class Planned(Exception):
        """Stops the lab once its runs are planned: nothing trains."""

    def plan(config, mix, scoring):
        planned.extend(run.settings for run in real_plan(config, mix, scoring))
        raise Planned

    monkeypatch.setattr(lab_main, "plan", plan)
    with pytest.raises(Planned):
        lab_main.lab(lab_config=tmp_path / "auto.yaml", output=tmp_path / "out")
    assert planned and {s["precision"] for s in planned} == {"bf16"} and len(timer) == 1


def test_auto_is_a_score_precision_and_others_are_refused(tmp_path):
    assert auto_config(tmp_path).score.precision == "auto"
    (tmp_path / "bad.yaml").write_text("score: {precision: fp8}\n")
    with pytest.raises(LabConfigError, match="bf16, fp32 or auto"):
        load_config(tmp_path / "bad.yaml")


def test_the_real_measure_times_both_precisions_on_a_tiny_model(tmp_path, one_thread):
    save_tiny(tmp_path / "model")
    measured = pace.measure(str(tmp_path / "model"), (2, 96), (4, 16))
    assert measured["train_shape"] == [2, 64]  # the tiny model's 64 positions
    for part in ("train_step", "score_forward"):
        assert set(measured[part]) == {"bf16", "fp32"} and all(v > 0 for v in measured[part].values())
