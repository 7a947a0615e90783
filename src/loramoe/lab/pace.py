"""What the lab knows of the machine it runs on: which precision is faster, and what its work costs.

Both are measured here and kept per machine in one small JSON file beside the embedded model's
cache (``<cache>/lab/pace-<machine>.json``, ``$LORAMOE_CACHE`` moves it), keyed by the CPU's
name and bf16 instructions, the torch version and its thread count:

- ``precision: auto`` (``train.precision``, ``score.precision``): a few training steps under bf16
  autocast against fp32, and a scoring forward on a bf16 copy against fp32, on the lab's model
  with batches shaped like the lab's; each setting takes the faster. Measured once per machine and
  model, and resolved before the runs are planned, so a run's settings (and its cache key) hold
  ``bf16`` or ``fp32``, never ``auto``. On a GPU ``auto`` is the trainer's own choice.
- the unit costs of the progress bar: seconds per optimiser step per record (full fine-tuning or
  an adapter), per scored point, per run's free answers, per run's start and per scoring of the
  base model; updated after each run the lab trains. Until a cost is measured the reference
  machine's (a 2-core CPU, bf16) stands in for it.

A file that cannot be read, belongs to another machine or holds a value that is not a positive
number is ignored where it fails: the lab never stops for it.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from loramoe import models
from loramoe.fileio import atomic_write_text
from loramoe.lab.config import LabConfig
from loramoe.lab.runs import Run
from loramoe.train.main import _precision

DEFAULTS = {"start": 5.0, "full": 1.3 / 8, "adapter": 1.25 / 8, "point": 14.0, "final": 13.0, "base": 24.0}
"""Seconds on the reference machine (the default lab, 2-core CPU, bf16): a run's start (loading the
model and data, saving), an optimiser step per record (full fine-tuning, adapters), a scored point,
a run's free answers at its end, and scoring the base model."""
KEPT = 16
"""Entries kept per section, the most recently updated: every model folder and setting a lab ever
ran with would otherwise stay in the file for good."""
NEW_WEIGHT = 0.5
"""The weight of a run's measure against what the file held: the machine's load drifts."""
TRAIN_TOKENS, SCORE_ROWS, SCORE_TOKENS = 96, 32, 16
"""The precision measurement's batches: training rows of about the default mix's records (84 tokens
on average), and scoring rows of about a fact's statement and answer."""
ROUNDS = 3
"""Rounds of the precision measurement; the first warms up and is discarded, the fastest counts."""


def machine() -> dict[str, Any]:
    """What the measures depend on besides the work: the CPU (its name, and its bf16 instructions,
    which a virtual machine's generic name does not tell), torch and its threads."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name or platform.processor() or platform.machine(),
            "bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def pace_file() -> Path:
    digest = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:12]
    return models.cache_dir() / "lab" / f"pace-{digest}.json"


def _positive(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else None


def _digits(seconds: float) -> float:
    """Four significant digits: a tiny model's costs are fractions of a millisecond."""
    return float(f"{seconds:.4g}")


def _read(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The file's sections, empty where it is missing, unreadable or another machine's."""
    empty: dict[str, dict[str, dict[str, Any]]] = {"precision": {}, "train": {}, "score": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return empty
    if not isinstance(data, dict) or data.get("machine") != machine():
        return empty
    return {section: {k: v for k, v in data[section].items() if isinstance(v, dict)}
            if isinstance(data.get(section), dict) else {} for section in empty}


def measure(model: str, batch: tuple[int, int], score_batch: tuple[int, int]) -> dict[str, Any]:
    """Seconds of one training step under bf16 autocast and in fp32, and of one scoring forward on
    a bf16 copy and in fp32, the fastest of the rounds after the first. The step is an adapter's
    (most of the lab's arms): the forward, and the backward through every layer to its input, but
    no weight's gradient, which would add half again to the time measured and little to the ratio."""
    net, _ = models.load(model)
    net.requires_grad_(False)
    copy = deepcopy(net).to(torch.bfloat16)  # as scoring does it (loramoe.lab.scoring._to_score)
    longest = getattr(net.config, "max_position_embeddings", None) or TRAIN_TOKENS
    batch, score_batch = ((rows, min(tokens, longest)) for rows, tokens in (batch, score_batch))
    generator = torch.Generator().manual_seed(0)
    ids = {part: torch.randint(0, net.config.vocab_size, shape, generator=generator)
           for part, shape in (("train", batch), ("score", score_batch))}
    embeds = net.get_input_embeddings()(ids["train"]).detach().requires_grad_()

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = net(inputs_embeds=embeds, labels=ids["train"]).loss
        loss.backward()
        embeds.grad = None

    def score(scored: torch.nn.Module) -> None:
        with torch.no_grad():
            scored(input_ids=ids["score"])

    work: dict[tuple[str, str], Callable[[], None]] = {
        ("train_step", "bf16"): lambda: step(True), ("train_step", "fp32"): lambda: step(False),
        ("score_forward", "bf16"): lambda: score(copy), ("score_forward", "fp32"): lambda: score(net)}
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in work}
    for _ in range(ROUNDS):  # interleaved, so that a change of the machine's load hits both alike
        for key, run in work.items():
            started = time.perf_counter()
            run()
            seconds[key].append(time.perf_counter() - started)
    measured: dict[str, Any] = {"train_shape": list(batch), "score_shape": list(score_batch)}
    for (part, precision), times in seconds.items():
        measured.setdefault(part, {})[precision] = _digits(min(times[1:]))
    return measured


def _valid(measured: Any) -> bool:
    return isinstance(measured, dict) and all(
        isinstance(measured.get(part), dict) and all(_positive(measured[part].get(p)) for p in ("bf16", "fp32"))
        for part in ("train_step", "score_forward"))


def _faster(times: dict[str, float]) -> str:
    return "bf16" if times["bf16"] < times["fp32"] else "fp32"


def resolve_precision(config: LabConfig, path: Path | None = None) -> tuple[LabConfig, dict[str, Any]]:
    """``config`` with ``auto`` in ``train.precision`` and ``score.precision`` replaced by this
    machine's faster choice (see the module docstring), and what was chosen, and from what."""
    train, score = config.train.get("precision"), config.score.precision  # None: the trainer's default
    record: dict[str, Any] = {"train": train or "auto", "score": score, "measured": None, "cpu": machine()["cpu"]}
    if "auto" not in (train, score):
        return config, record
    if torch.cuda.is_available():
        flags = _precision("auto")
        chosen = {"train": "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32",
                  "score": "bf16" if flags["bf16"] else "fp32"}  # scoring knows no fp16
    else:
        path = path or pace_file()
        measured = _read(path)["precision"].get(config.model)
        if not _valid(measured):
            tokens = min(TRAIN_TOKENS, int(config.train.get("max_length", TRAIN_TOKENS)))
            measured = measure(config.model, (int(config.train.get("batch_size", 8)), tokens),
                               (min(config.score.batch_size, SCORE_ROWS), SCORE_TOKENS))
            _update(path, "precision", config.model, measured)
        record["measured"] = measured
        chosen = {"train": _faster(measured["train_step"]), "score": _faster(measured["score_forward"])}
    if train == "auto":
        record["train"] = chosen["train"]
        config = replace(config, train={**config.train, "precision": chosen["train"]})
    if score == "auto":
        record["score"] = chosen["score"]
        config = replace(config, score=replace(config.score, precision=chosen["score"]))
    return config, record


def _update(path: Path, section: str, key: str, entry: dict[str, Any]) -> None:
    """Write one entry, over the file as it is now (another lab may have written since this one read it)."""
    data: dict[str, Any] = {"machine": machine(), **_read(path)}
    entries = data[section]
    entries.pop(key, None)
    entries[key] = entry  # last: the most recently updated are the ones kept
    data[section] = dict(list(entries.items())[-KEPT:])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _kind(run: Run) -> str:
    return "full" if run.method == "full" else "adapter"


def _train_key(run: Run) -> str:
    """What the cost of a step depends on in a run's settings (besides its records per step)."""
    s = run.settings
    return json.dumps([s["model"], s.get("precision", "auto"), s.get("max_length", 1024),
                       bool(s.get("group_by_length", False))])


def _records(run: Run) -> int:
    return int(run.settings.get("batch_size", 8)) * int(run.settings.get("grad_accum", 1))


class Pace:
    """This machine's unit costs for one lab (its probe and scoring settings: ``scoring``)."""

    def __init__(self, scoring: str, path: Path | None = None) -> None:
        self.scoring, self.path = scoring, path or pace_file()
        self.data = _read(self.path)

    def _cost(self, section: str, key: str, unit: str) -> float:
        return _positive(self.data[section].get(key, {}).get(unit)) or DEFAULTS[unit]

    def base(self) -> float:
        return self._cost("score", self.scoring, "base")

    def estimate(self, run: Run) -> dict[str, float]:
        """A run's work in estimated seconds: its start, an optimiser step, a scored point, its free
        answers, and in all."""
        key = _train_key(run)
        costs = {"start": self._cost("train", key, "start"),
                 "step": self._cost("train", key, _kind(run)) * _records(run),
                 "point": self._cost("score", self.scoring, "point"),
                 "final": self._cost("score", self.scoring, "final")}
        costs["total"] = (costs["start"] + run.settings["max_steps"] * costs["step"]
                          + len(run.steps) * costs["point"] + costs["final"])
        return costs

    def _merge(self, section: str, key: str, measured: dict[str, float | None]) -> None:
        entry = dict(self.data[section].get(key, {}))
        for unit, value in measured.items():
            old = _positive(entry.get(unit))
            if value is not None and value > 0:
                entry[unit] = _digits(value if old is None else (1 - NEW_WEIGHT) * old + NEW_WEIGHT * value)
        self.data[section][key] = entry
        _update(self.path, section, key, entry)

    def observe_base(self, seconds: float) -> None:
        self._merge("score", self.scoring, {"base": seconds})

    def observe(self, run: Run, watch: Stopwatch) -> None:
        """Take a trained run's measured parts into this machine's costs."""
        parts = watch.parts()
        step = parts["step"]
        self._merge("train", _train_key(run), {"start": parts["start"],
                                               _kind(run): None if step is None else step / _records(run)})
        self._merge("score", self.scoring, {"point": parts["point"], "final": parts["final"]})


class Stopwatch:
    """Times the parts of one run from the ticks :func:`loramoe.lab.runs.execute` sends, and tells
    the progress bar how much of the run's estimated work each tick ends."""

    def __init__(self, run: Run, estimate: dict[str, float], clock: Callable[[], float] = time.monotonic) -> None:
        self.run, self.estimate, self.clock = run, estimate, clock
        self.started = clock()
        self.ended: float | None = None
        self.events: list[tuple[str, float]] = []

    def count(self, kind: str) -> int:
        return sum(k == kind for k, _ in self.events)

    def tick(self, kind: str) -> float:
        """Note a step or point that just ended; returns its estimated seconds (the run's start
        comes with its first step, its free answers with its last point)."""
        self.events.append((kind, self.clock()))
        cost = self.estimate[kind]
        if kind == "step" and self.count("step") == 1:
            cost += self.estimate["start"]
        if kind == "point" and self.count("point") == len(self.run.steps):
            cost += self.estimate["final"]
        return cost

    def stop(self) -> None:
        self.ended = self.clock()

    def parts(self) -> dict[str, float | None]:
        """Measured seconds of a step, a point, the free answers and the start (what the rest
        leaves of the run's time); None where the run did not show it."""
        if self.ended is None:
            raise RuntimeError("Stopwatch.parts before stop()")
        steps, points, last = [], [], self.started
        for kind, at in self.events:
            (steps if kind == "step" else points).append(at - last)
            last = at
        final = len(points) == len(self.run.steps)
        step = sum(steps[1:]) / (len(steps) - 1) if len(steps) > 1 else None  # the first holds the start
        plain = points[:-1] if final else points
        point = sum(plain) / len(plain) if plain else None
        parts: dict[str, float | None] = {"step": step, "point": point, "final": None, "start": None}
        if final:
            parts["final"] = max(0.0, points[-1] - (point or self.estimate["point"]))
        if step is not None:
            parts["start"] = max(0.0, self.ended - self.started - len(steps) * step - sum(points))
        return parts
