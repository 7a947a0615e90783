"""The lab's statistics, as pure numpy functions: paths in the knowledge-skill plane, knowledge at
equal task skill, and paired bootstrap intervals over items and seeds.

A *path* is one arm's training: per scored point (point 0 is the base model, shared by every
arm), a knowledge value per held-out fact and a task loss per task item, for each seed. Skill at a
point is the mean task loss of the base model minus the point's (nats per token; 0 at the base,
higher is better). An arm's path is the mean over its seeds at each point (the seeds share steps).

Knowledge at skill level ``s`` is read off an arm's path where it first reaches ``s``, linearly
between the two points around it. Levels are shares of the highest skill every arm reaches.

Intervals: a paired bootstrap. Each replicate draws the facts and the task items with
replacement (the same draw for every arm: the comparison is paired) and, for each arm, its seeds
with replacement; every statistic is recomputed on the replicate, and the 95 % interval is the
2.5th to 97.5th percentile over replicates. A level is set again in each replicate (its share of
that replicate's common skill), so every path reaches it.
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


def _path(name: str, values: np.ndarray, weights: np.ndarray | None, draws: Draws | None) -> np.ndarray:
    """(replicates, points): per-item values (seeds, points, items) averaged over items and seeds;
    one row, the estimate, without draws."""
    if draws is None:
        return values.mean(-1).mean(0)[None]
    return _mean_over_seeds(np.einsum("spi,ri->srp", values, weights), draws.seeds(name, values.shape[0]))


def skill_path(name: str, arm: ArmData, draws: Draws | None) -> np.ndarray:
    """The arm's skill along its path: the base task loss minus the point's, (replicates, points)."""
    return _path(name, arm.task_loss[:, :1, :] - arm.task_loss, None if draws is None else draws.tasks, draws)


def knowledge_path(name: str, arm: ArmData, measure: str, draws: Draws | None) -> np.ndarray:
    """The arm's knowledge measure along its path, (replicates, points)."""
    return _path(name, arm.knowledge[measure], None if draws is None else draws.facts, draws)


def at_level(skill: np.ndarray, knowledge: np.ndarray, level: float | np.ndarray) -> np.ndarray:
    """Per row, the knowledge where the path first reaches ``level`` of skill (one for all rows,
    or one per row), linearly interpolated between the points around it; NaN where it never does."""
    levels = np.broadcast_to(np.asarray(level, dtype=float), skill.shape[:1])
    reached = skill >= levels[:, None]
    first = np.argmax(reached, axis=1)
    out = np.full(skill.shape[0], np.nan)
    for r in np.nonzero(reached.any(axis=1))[0]:
        j = first[r]
        if j == 0:
            out[r] = knowledge[r, 0]
            continue
        span = skill[r, j] - skill[r, j - 1]
        t = 0.0 if span <= 0 else (levels[r] - skill[r, j - 1]) / span
        out[r] = knowledge[r, j - 1] + t * (knowledge[r, j] - knowledge[r, j - 1])
    return out


def interval(estimate: float, replicates: np.ndarray) -> dict[str, float | None]:
    """An estimate with its bootstrap standard error and 95 % percentile interval."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size < 2 or not np.isfinite(estimate):
        return {"estimate": float(estimate), "low": None, "high": None, "stderr": None}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"estimate": float(estimate), "low": float(low), "high": float(high), "stderr": float(finite.std(ddof=1))}


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
    return float(min(skill_path(name, arm, None).max() for name, arm in arms.items()))


def equal_skill(arms: dict[str, ArmData], contrasts: list[tuple[str, str]], measures: list[str],
                shares: list[float], draws: Draws) -> dict:
    """Per measure and level: each arm's knowledge change against the base model at that skill,
    and each contrast ``(a, b)``'s difference a - b, all with intervals. A level is a share of the
    highest skill every arm reaches, in the estimate and again in each replicate, so that every
    path reaches every level (share 1: the weakest arm at its best skill)."""
    skills = {name: skill_path(name, arm, None) for name, arm in arms.items()}
    boot_skills = {name: skill_path(name, arm, draws) for name, arm in arms.items()}
    common = common_skill(arms)
    boot_common = np.min([s.max(axis=1) for s in boot_skills.values()], axis=0)  # (replicates,)
    out: dict = {}
    for measure in measures:
        know = {name: knowledge_path(name, arm, measure, None) for name, arm in arms.items()}
        boot_know = {name: knowledge_path(name, arm, measure, draws) for name, arm in arms.items()}
        per_level = []
        for share in shares:
            estimates, replicates = {}, {}
            for name in arms:
                estimates[name] = at_level(skills[name], know[name], share * common)[0] - know[name][0, 0]
                replicates[name] = (at_level(boot_skills[name], boot_know[name], share * boot_common)
                                    - boot_know[name][:, 0])
            row = {"share": share, "skill": share * common,
                   "arms": {name: interval(estimates[name], replicates[name]) for name in arms},
                   "contrasts": {f"{a} vs {b}": interval(estimates[a] - estimates[b], replicates[a] - replicates[b])
                                 for a, b in contrasts}}
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
