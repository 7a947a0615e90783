"""The lab report's figures, from ``results.json`` alone, as PNG files beside report.md.

- trajectories.png: each arm's path in the knowledge-skill plane, a panel per knowledge measure
  (the primary first), seeds drawn thin, the equal-skill levels dotted and the verdict level dashed.
- frontiers.png: per frontier (or per arm where the lab names none) the upper envelope of the
  primary measure over skill across its variants' seed-mean paths, read as the statistics read a
  frontier (:func:`loramoe.lab.stats.reading`), with the variants' paths drawn thin.
- router_by_layer.png: the LoRAMoE routers' own-group share per layer at the end of the run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loramoe.lab.stats import Paths, reading
from loramoe.lab.verdicts import UNITS
from loramoe.plots import pyplot, save_figure

SKILL_LABEL = "task skill: base task loss minus the model's (nats per token)"


def _levels(ax, results: dict) -> None:
    for i, level in enumerate(results["levels"]):
        verdict = i == results["verdict_level"]
        ax.axvline(level, color="grey", linestyle="--" if verdict else ":", linewidth=1.2 if verdict else 1)


def trajectories(results: dict, path: Path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.6), layout="constrained")
    for ax, measure in zip(axes.flat, UNITS):
        label, unit, _ = UNITS[measure]
        for name, arm in results["arms"].items():
            p = arm["path"]
            seeds = len(arm["seeds"])
            line, = ax.plot(p["skill"], p[measure], marker="o",
                            label=f"{name} ({seeds} seed{'s' if seeds > 1 else ''})")
            if len(p["per_seed"]) > 1:
                for seed in p["per_seed"].values():
                    ax.plot(seed["skill"], seed[measure], color=line.get_color(), alpha=0.3, linewidth=0.8)
        _levels(ax, results)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel(SKILL_LABEL)
        ax.set_ylabel(f"change against the base ({unit})")
        ax.set_title(label, fontsize=10)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Knowledge along training (dotted: the equal-skill levels; dashed: the verdict level)", fontsize=11)
    save_figure(fig, path)
    return path.name


def envelope(paths: dict[str, tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """The upper envelope of ``paths`` (name -> (skill, knowledge) per point): at every skill any of
    them was scored at, the best knowledge among the paths that reach it, each read where it first
    does (linearly between its points); paths that never reach a skill do not count there."""
    rows = {name: Paths(np.array([skill], dtype=float), np.array([know], dtype=float))
            for name, (skill, know) in paths.items()}
    skills = sorted({float(s) for skill, _ in paths.values() for s in skill})
    best = [float(reading(rows, list(rows), s)[0]) for s in skills]
    return skills, best


def frontier_sets(results: dict) -> dict[str, list[str]]:
    """The named frontiers, or each arm as its own where the lab names none."""
    return {name: s["variants"] for name, s in results["frontiers"].items()} or {name: [name] for name in
                                                                                    results["arms"]}


def frontiers(results: dict, path: Path) -> str:
    plt = pyplot()
    measure = results["measures"]["primary"]
    label, unit, _ = UNITS[measure]
    fig, ax = plt.subplots(figsize=(8, 5.6), layout="constrained")
    for name, variants in frontier_sets(results).items():
        paths = {v: (results["arms"][v]["path"]["skill"], results["arms"][v]["path"][measure]) for v in variants}
        skills, best = envelope(paths)
        line, = ax.plot(skills, best, linewidth=2.2, label=name if len(variants) == 1 else
                        f"{name} ({', '.join(variants)})")
        if len(variants) > 1:
            for skill, know in paths.values():
                ax.plot(skill, know, color=line.get_color(), alpha=0.45, linewidth=0.8, marker=".")
    _levels(ax, results)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel(SKILL_LABEL)
    ax.set_ylabel(f"{label}: change against the base ({unit})", fontsize=8)
    ax.set_title("Frontiers: the best knowledge at each skill (thin: each variant's path)", fontsize=10)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return path.name


def router(results: dict, path: Path) -> str | None:
    routed = {name: arm["router"] for name, arm in results["arms"].items() if "router" in arm}
    if not routed:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(routed), figsize=(4.5 * len(routed), 3.4), squeeze=False, layout="constrained")
    for ax, (name, r) in zip(axes[0], routed.items()):
        for kind, per_group in r["final_per_layer"].items():
            ax.plot(range(len(per_group[kind])), per_group[kind], marker=".", label=f"{kind} items to the {kind} group")
        uniform = next(iter(r["uniform_share"].values()))
        ax.axhline(uniform, color="grey", linestyle=":", linewidth=1, label="no preference")
        if r.get("claims_routing"):
            ax.axhline(results["constants"]["routed_share"], color="black", linestyle="--", linewidth=1,
                       label="routed from here")
        ax.set_xlabel("layer")
        ax.set_ylabel("gate share to its own group")
        ax.set_title(f"{name}, end of run", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return path.name


def figures(results: dict, folder: Path) -> dict[str, str]:
    """Writes every figure into ``folder``; their file names by role."""
    out = {"trajectories": trajectories(results, folder / "trajectories.png"),
           "frontiers": frontiers(results, folder / "frontiers.png")}
    by_layer = router(results, folder / "router_by_layer.png")
    if by_layer:
        out["router"] = by_layer
    return out
