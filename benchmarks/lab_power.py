"""The items and seeds ``loramoe lab`` needs to detect 0.1 nats (``gold_share``, ``gold_logprob``) or
1.5 points (``mc``, ``mc_norm``), from the variance a finished lab folder shows
(:mod:`loramoe.lab.power`).

    python benchmarks/lab_power.py <lab output folder> [--point -1] [--seed-sd NATS POINTS]

Per measure, for each arm against the base model and each pair of arms (paired by fact, and by
seed where both ran it; the base model cancels from a pair's difference), at one scored point of
the runs (the last by default): the mean change, the item SD (SD over facts of one seed's
per-fact change, or of the per-fact difference between two arms), the seed SD where the arms ran
at least 2 seeds, the difference detectable at the folder's facts and seeds, and the facts needed
at 3 and 5 seeds. An arm with one seed does not measure the seed term: the first table then
leaves it out, and a second one assumes ``--seed-sd``. Last, where ``results.json`` holds them, the
lab's own bootstrap errors for its named contrasts at equal skill, for comparison.

The probe is rebuilt from the folder's settings and mix, and the tokenizer loaded, only to measure
the candidates' lengths ``mc_norm`` divides by; no model runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loramoe.lab.measures import candidate_lengths, fact_measures
from loramoe.lab.power import Z_POWER, Components, components, detectable, needed
from loramoe.lab.probe import build_probe
from loramoe.models import load_tokenizer

TARGETS = {"gold_share": 0.1, "gold_logprob": 0.1, "mc": 1.5, "mc_norm": 1.5}
"""The differences the lab should detect, in each measure's unit (nats, or accuracy points)."""
UNITS = {"gold_share": "nats", "gold_logprob": "nats", "mc": "points", "mc_norm": "points"}
PLAN_SEEDS = (3, 5)


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


@dataclass
class Lab:
    """What one lab folder measured, at one scored point of its runs."""

    base: dict[str, np.ndarray]
    """Measure -> the base model's value per fact."""
    arms: dict[str, dict[int, dict[str, np.ndarray]]]
    """Arm -> seed -> measure -> value per fact."""
    results: dict[str, Any]
    """The folder's ``results.json``."""

    @property
    def contrasts(self) -> list[dict[str, str]]:
        """The settings' named contrasts, ``{name, a, b, question}``."""
        return self.results["lab"]["settings"].get("contrasts", [])


def load(folder: Path, point: int) -> Lab:
    """The base model's measures per fact, and each arm's per seed at its runs' scored point
    ``point`` (an index into each run's ``points.json``; ``-1``: the last)."""
    results = _read(folder / "results.json")
    settings = results["lab"]["settings"]
    bases = sorted((folder / "runs").glob("base-*/points.json"))
    if len(bases) != 1:
        raise SystemExit(f"{folder}: expected one base-*/points.json under runs/, found {len(bases)}")
    base = _read(bases[0])
    score, mix = settings["score"], settings["mix"]
    probe = build_probe(relations=mix["knowledge"], tasks=mix["tasks"], mix_file=folder / "mix" / "mix.jsonl",
                        seed=settings["seed"], choices=score["choices"], task_items=score["task_items"],
                        chat_items=score["chat_items"], generation_items=score["generation_items"],
                        max_context_chars=mix["max_context_chars"], fact_items=score.get("fact_items"))
    lengths = candidate_lengths(load_tokenizer(results["lab"]["model"]), probe, base["gold"])
    arms: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for done in sorted((folder / "runs").glob("*/lab_run.json")):
        record = _read(done)
        variant, seed = record["variant"], record["seed"]
        if seed not in settings["variants"].get(variant, {}).get("seeds", [settings["seed"]]):
            continue  # a cached run of other settings
        if seed in arms.get(variant, {}):
            raise SystemExit(f"{folder}: two finished runs of {variant} seed {seed}")
        points = _read(done.parent / "points.json")
        arms.setdefault(variant, {})[seed] = fact_measures(points[point], lengths)
    return Lab(fact_measures(base, lengths), arms, results)


def pairs(arms: dict[str, Any], contrasts: list[dict[str, str]]) -> list[tuple[str, str]]:
    """The settings' contrasts ``(a, b)`` first, oriented as the lab reports them, then every other
    pair of arms."""
    named = [(c["a"], c["b"]) for c in contrasts if c["a"] in arms and c["b"] in arms]
    return named + [p for p in itertools.combinations(arms, 2) if p not in named and p[::-1] not in named]


def comparisons(base: dict[str, np.ndarray], arms: dict[str, dict[int, dict[str, np.ndarray]]],
                measure: str, contrasts: list[dict[str, str]]) -> dict[str, np.ndarray]:
    """Per comparison, its per-seed, per-fact values (seeds, facts): each arm's change against the
    base model, then each pair's difference a - b over the seeds both ran."""
    out = {f"{name} vs base": np.stack([m[measure] for m in runs.values()]) - base[measure][None]
           for name, runs in arms.items()}
    for a, b in pairs(arms, contrasts):
        both = sorted(set(arms[a]) & set(arms[b]))
        if both:
            out[f"{a} vs {b}"] = np.stack([arms[a][s][measure] - arms[b][s][measure] for s in both])
    return out


def _count(value: float) -> str:
    return "inf" if math.isinf(value) else str(math.ceil(value))


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def row(name: str, values: np.ndarray, target: float, assumed: float | None) -> list[str]:
    """One table row; ``assumed`` replaces an unmeasured seed SD (None: leave the seed term out
    and mark the detectable difference a lower bound)."""
    seeds, facts = values.shape
    parts = components(values)
    seed_sd, bound, seed_cell = parts.seed_sd, "", _number(parts.seed_sd)
    if math.isnan(seed_sd):
        seed_sd, bound = (0.0, ">= ") if assumed is None else (assumed, "")
        seed_cell = "unknown (1 seed)" if assumed is None else f"{assumed:g} (assumed)"
    planned = Components(parts.item_sd, seed_sd, parts.residual_sd)
    cells = [name, _number(values.mean()), _number(parts.item_sd), seed_cell,
             bound + _number(detectable(planned.item_sd_at(seeds), seed_sd, facts, seeds))]
    return cells + [_count(needed(planned.item_sd_at(s), seed_sd, target, seeds=s)) for s in PLAN_SEEDS]


def table(lab: Lab, assumed: dict[str, float] | None) -> str:
    """The markdown table, every measure's comparisons; ``assumed`` (measure -> seed SD) stands in
    for a seed SD the folder does not measure."""
    facts = len(lab.base["mc"])
    seeds = sorted({len(runs) for runs in lab.arms.values()})
    head = ["measure", "comparison", "mean", "item SD", "seed SD",
            f"detectable ({facts} facts, {'/'.join(map(str, seeds))} seeds)"]
    head += [f"facts for the target at {s} seeds" for s in PLAN_SEEDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for measure, target in TARGETS.items():
        label = f"{measure} ({target:g} {UNITS[measure]})"
        for name, values in comparisons(lab.base, lab.arms, measure, lab.contrasts).items():
            cells = row(name, values, target, None if assumed is None else assumed[measure])
            lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def bootstrap_lines(lab: Lab) -> list[str]:
    """The lab's own detectable difference for its named contrasts at the headline (last) skill
    level, 2.8 bootstrap standard errors, where ``results.json`` holds them: knowledge at equal
    skill also carries the uncertainty of where each path reaches the level, which the item and
    seed terms of an end point leave out."""
    out = []
    for measure in TARGETS:
        rows = lab.results.get("equal_skill", {}).get(measure)
        if not isinstance(rows, list) or not rows:
            continue
        for name, result in rows[-1].get("contrasts", {}).items():
            if isinstance(result, dict) and result.get("stderr") is not None:
                out.append(f"| {measure} | {name} | {Z_POWER * result['stderr']:.3g} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a `loramoe lab` output folder (results.json, runs/)")
    parser.add_argument("--point", type=int, default=-1,
                        help="which of each run's scored points, by index (0: the first after the start, -1: the last)")
    parser.add_argument("--seed-sd", type=float, nargs=2, default=[0.03, 0.5], metavar=("NATS", "POINTS"),
                        help="the seed SD assumed where an arm ran one seed, for the nats measures and for "
                             "the accuracy measures (default: 0.03 0.5)")
    args = parser.parse_args()
    lab = load(args.folder, args.point)
    print(f"# {args.folder}: {len(lab.base['mc'])} facts; seeds per arm: "
          + ", ".join(f"{name} {len(runs)}" for name, runs in lab.arms.items()) + "\n")
    print("Detectable: 2.8 standard errors (80 % power, two-sided 5 % test). Facts needed: to detect 0.1 nats "
          "(gold_share, gold_logprob) or 1.5 points (mc, mc_norm).\n")
    print(table(lab, None))
    if any(len(runs) < 2 for runs in lab.arms.values()):
        nats, points = args.seed_sd
        print("\nAn arm with one seed does not measure the seed term: its row leaves it out. Its detectable "
              "difference at the folder's one seed is then a lower bound (>=). Its facts needed charge one "
              "seed's whole per-fact variance to every seed count (too much by the part of it that differs "
              "between seeds, which more seeds average out) and no seed term (too little): a guide, not a "
              f"bound. With an assumed seed SD of {nats:g} nats / {points:g} points:\n")
        print(table(lab, {m: nats if UNITS[m] == "nats" else points for m in TARGETS}))
    lines = bootstrap_lines(lab)
    if lines:
        print("\nThe lab's own bootstrap, knowledge at equal skill (results.json), its named contrasts at the "
              "headline level:\n\n| measure | contrast | detectable (2.8 bootstrap SE) |\n|---|---|---|")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
