"""The lab's statistics, as pure numpy functions: paths in the knowledge-skill plane, knowledge at
equal task skill, and paired bootstrap intervals over items and seeds.

A *path* is one arm's training: per scored point (point 0 is the base model, shared by every
arm), a knowledge value per held-out fact and a task loss per task item, for each seed. Skill at a
point is the mean task loss of the base model minus the point's (nats per token; 0 at the base,
higher is better). An arm's path is the mean over its seeds at each point (the seeds share steps).

Knowledge at skill level ``s`` is read off an arm's path where it first reaches ``s``, linearly
between the two points around it; a path that never reaches ``s`` gives NaN.

Intervals: a paired bootstrap. Each replicate draws the facts and the task items with
replacement (the same draw for every arm: the comparison is paired) and, for each arm, its seeds
with replacement; every statistic is recomputed on the replicate, and the 95 % interval is the
2.5th to 97.5th percentile over replicates. Replicates in which a path misses a level are left out
of that level's interval, and their share is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ArmData:
    """One arm: per seed, per point, per item values."""

    steps: list[int]
    knowledge: dict[str, np.ndarray]
    """Measure -> (seeds, points, facts)."""
    task_loss: np.ndarray
    """(seeds, points, task items)."""


@dataclass
class Draws:
    """The bootstrap's resampling, shared by every statistic so that all comparisons are paired."""

    facts: np.ndarray
    """(replicates, facts) weights summing to 1 per replicate."""
    tasks: np.ndarray
    """(replicates, task items) weights."""
    seed: int
    picks: dict[str, np.ndarray]

    @classmethod
    def make(cls, facts: int, tasks: int, replicates: int, seed: int) -> Draws:
        rng = np.random.default_rng(seed)
        f = rng.multinomial(facts, np.full(facts, 1.0 / facts), size=replicates) / facts
        t = rng.multinomial(tasks, np.full(tasks, 1.0 / tasks), size=replicates) / tasks
        return cls(f, t, seed, {})

    def seeds(self, arm: str, count: int) -> np.ndarray:
        """(replicates, count) indices of the arm's seeds, drawn with replacement: independent
        between arms, the same for every statistic of one arm."""
        if arm not in self.picks:
            rng = np.random.default_rng([self.seed, *arm.encode()])
            self.picks[arm] = rng.integers(0, count, size=(self.facts.shape[0], count))
        return self.picks[arm]


def _mean_over_seeds(values: np.ndarray, pick: np.ndarray | None) -> np.ndarray:
    """values (seeds, replicates, points) -> (replicates, points): the mean over all seeds, or
    per replicate over the seeds ``pick`` (replicates, k) names."""
    if pick is None:
        return values.mean(0)
    gathered = np.take_along_axis(values.transpose(1, 0, 2), pick[:, :, None], axis=1)
    return gathered.mean(1)


def arm_paths(name: str, arm: ArmData, measure: str, draws: Draws | None) -> tuple[np.ndarray, np.ndarray]:
    """(skill, knowledge), each (replicates, points); one row, the estimate, without draws."""
    know = arm.knowledge[measure]
    base_loss = arm.task_loss[:, :1, :]
    gain = base_loss - arm.task_loss  # per seed, point, item
    if draws is None:
        return gain.mean(-1).mean(0)[None], know.mean(-1).mean(0)[None]
    pick = draws.seeds(name, know.shape[0])
    skill = _mean_over_seeds(np.einsum("spi,ri->srp", gain, draws.tasks), pick)
    knowledge = _mean_over_seeds(np.einsum("spi,ri->srp", know, draws.facts), pick)
    return skill, knowledge


def at_level(skill: np.ndarray, knowledge: np.ndarray, level: float) -> np.ndarray:
    """Per row, the knowledge where the path first reaches ``level`` of skill, linearly
    interpolated between the points around it; NaN where it never does."""
    reached = skill >= level
    first = np.argmax(reached, axis=1)
    out = np.full(skill.shape[0], np.nan)
    rows = np.nonzero(reached.any(axis=1))[0]
    for r in rows:
        j = first[r]
        if j == 0:
            out[r] = knowledge[r, 0]
            continue
        span = skill[r, j] - skill[r, j - 1]
        t = 0.0 if span <= 0 else (level - skill[r, j - 1]) / span
        out[r] = knowledge[r, j - 1] + t * (knowledge[r, j] - knowledge[r, j - 1])
    return out


def interval(estimate: float, replicates: np.ndarray) -> dict[str, float | None]:
    """An estimate with its bootstrap standard error and 95 % percentile interval."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size < 2 or not np.isfinite(estimate):
        return {"estimate": float(estimate), "low": None, "high": None, "stderr": None,
                "missed": 1.0 - finite.size / max(replicates.size, 1)}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"estimate": float(estimate), "low": float(low), "high": float(high), "stderr": float(finite.std(ddof=1)),
            "missed": 1.0 - finite.size / replicates.size}


def verdict(result: dict[str, float | None]) -> str:
    """``higher``, ``lower`` or ``no detectable difference``, from the interval alone."""
    if result["low"] is None:
        return "not measurable"
    if result["low"] > 0:
        return "higher"
    if result["high"] < 0:
        return "lower"
    return "no detectable difference"


def common_skill(arms: dict[str, ArmData]) -> float:
    """The highest skill every arm's (seed-mean) path reaches."""
    return float(min(arm_paths(name, arm, next(iter(arm.knowledge)), None)[0].max() for name, arm in arms.items()))


def equal_skill(arms: dict[str, ArmData], contrasts: list[tuple[str, str]], measures: list[str],
                levels: list[float], draws: Draws) -> dict:
    """Per measure and level: each arm's knowledge change against the base model at that skill,
    and each contrast ``(a, b)``'s difference a - b, all with intervals."""
    out: dict = {}
    for measure in measures:
        estimates, replicates = {}, {}
        for name, arm in arms.items():
            skill, know = arm_paths(name, arm, measure, None)
            boot_skill, boot_know = arm_paths(name, arm, measure, draws)
            base, boot_base = know[0, 0], boot_know[:, 0]
            estimates[name] = [at_level(skill, know, s)[0] - base for s in levels]
            replicates[name] = [at_level(boot_skill, boot_know, s) - boot_base for s in levels]
        per_level = []
        for i, level in enumerate(levels):
            row = {"skill": level,
                   "arms": {name: interval(estimates[name][i], replicates[name][i]) for name in arms},
                   "contrasts": {}}
            for a, b in contrasts:
                row["contrasts"][f"{a} vs {b}"] = interval(estimates[a][i] - estimates[b][i],
                                                           replicates[a][i] - replicates[b][i])
            per_level.append(row)
        out[measure] = per_level
    return out


def end_change(name: str, values: np.ndarray, base: np.ndarray, weights: np.ndarray,
               draws: Draws) -> dict[str, float | None]:
    """Arm ``name``'s mean change against the base model of per-item values (seeds, items), paired
    by item, with its interval; ``weights`` (replicates, items) are item draws of matching length."""
    change = values - base[None, :]
    estimate = change.mean()
    pick = draws.seeds(name, change.shape[0])
    per_seed = change @ weights.T  # (seeds, replicates)
    boot = np.take_along_axis(per_seed.T, pick, axis=1).mean(1)
    return interval(float(estimate), boot)
