"""The lab's statistics, as pure numpy functions: paths in the knowledge-skill plane, knowledge at
equal task skill for arms and for frontiers, and intervals over items and seeds.

A *path* is one run's training: per scored point (point 0 is the base model, shared by every
arm), a knowledge value per held-out fact and a task loss per task item. Skill at a point is the
mean task loss of the base model minus the point's (nats per token; 0 at the base, higher is
better); knowledge is the change against the base model. An arm's path is the mean over its seeds
at each point (the seeds share steps).

Readings: an arm's knowledge at skill level ``s`` is read where its path first reaches ``s``,
linearly between the two points around it; its *worst after* ``s`` is the lowest knowledge on the
path from there to its end (later forgetting is not hidden by "first reaches"). A *frontier* is a
set of arms (one method at several learning rates): its knowledge at ``s`` is the best of its
arms' readings, the upper envelope of the method's paths. Levels are shares of the highest skill
every arm reaches (its *common skill*), set again in each bootstrap replicate.

Intervals combine two sources of error. Items: a paired bootstrap draws the facts and the task
items with replacement, the same draw for every arm, and recomputes every reading on seed-mean
paths. Seeds: the same reading on each seed's own path gives the spread between training runs
(its level the share of the skill every arm's path of that seed reaches, set again per seed as in
a replicate: a fixed level would lie beyond some seeds' ends at share 1 and drop them);
seed ``k`` of every arm shares its data order, so a contrast takes the per-seed differences
(paired by seed) and their standard error enters each replicate as a Student-t draw with
``seeds - 1`` degrees of freedom (Welch's when the arms' seeds differ). Resampling three seeds
instead would shrink their variance by a third and give intervals that cover the truth far less
than 95 % of the time (``tests/test_lab_coverage.py`` measures both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ArmData:
    """One arm: per seed, per point, per item values."""

    steps: list[int]
    knowledge: dict[str, np.ndarray]
    """Measure -> (seeds, points, facts)."""
    task_loss: np.ndarray
    """(seeds, points, task items)."""
    seeds: list[int] = field(default_factory=list)
    """The training seeds, in the order of the first axis (seed k shares data order across arms)."""

    def __post_init__(self) -> None:
        if not self.seeds:
            self.seeds = list(range(self.task_loss.shape[0]))


@dataclass
class Draws:
    """The bootstrap's item draws and Student-t draws, shared by every statistic (paired)."""

    facts: np.ndarray
    """(replicates, facts) weights summing to 1 per replicate."""
    tasks: np.ndarray
    """(replicates, task items) weights."""
    seed: int
    _t: dict[float, np.ndarray] = field(default_factory=dict)

    @classmethod
    def make(cls, facts: int, tasks: int, replicates: int, seed: int) -> Draws:
        rng = np.random.default_rng(seed)
        f = rng.multinomial(facts, np.full(facts, 1.0 / facts), size=replicates) / facts
        t = rng.multinomial(tasks, np.full(tasks, 1.0 / tasks), size=replicates) / tasks
        return cls(f, t, seed)

    @property
    def replicates(self) -> int:
        return self.facts.shape[0]

    def t(self, df: float) -> np.ndarray:
        """(replicates,) Student-t draws with ``df`` degrees of freedom, fixed per ``df``."""
        if df not in self._t:
            self._t[df] = np.random.default_rng([self.seed, 7, round(df * 1000)]).standard_t(df, self.replicates)
        return self._t[df]


@dataclass
class Paths:
    """Skill and knowledge-change paths, (rows, points): one row for an estimate, one per replicate."""

    skill: np.ndarray
    knowledge: np.ndarray


def arm_paths(arm: ArmData, measure: str, fact_weights: np.ndarray | None,
              task_weights: np.ndarray | None) -> tuple[Paths, list[Paths]]:
    """The arm's seed-mean paths under item weights (uniform where None), and each seed's own
    path with uniform weights (for the spread between seeds)."""
    skill = arm.task_loss[:, :1, :] - arm.task_loss
    know = arm.knowledge[measure] - arm.knowledge[measure][:, :1, :]
    per_seed = [Paths(skill[k].mean(-1)[None], know[k].mean(-1)[None]) for k in range(skill.shape[0])]
    if fact_weights is None:
        return Paths(skill.mean(-1).mean(0)[None], know.mean(-1).mean(0)[None]), per_seed
    return Paths(np.einsum("spi,ri->rp", skill, task_weights) / skill.shape[0],
                 np.einsum("spi,ri->rp", know, fact_weights) / know.shape[0]), per_seed


def _crossing(skill: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first point at or above the level (-1 where none) and the interpolation weight."""
    reached = skill >= levels[:, None]
    first = np.where(reached.any(axis=1), np.argmax(reached, axis=1), -1)
    rows = np.arange(skill.shape[0])
    j = np.maximum(first, 1)
    span = skill[rows, j] - skill[rows, j - 1]
    t = np.where(span > 0, (levels - skill[rows, j - 1]) / np.where(span > 0, span, 1.0), 0.0)
    return first, np.clip(t, 0.0, 1.0)


def at_level(skill: np.ndarray, knowledge: np.ndarray, level: float | np.ndarray) -> np.ndarray:
    """Per row, the knowledge where the path first reaches ``level`` of skill (one for all rows,
    or one per row), linearly interpolated between the points around it; NaN where it never does."""
    levels = np.broadcast_to(np.asarray(level, dtype=float), skill.shape[:1])
    first, t = _crossing(skill, levels)
    rows = np.arange(skill.shape[0])
    j = np.maximum(first, 1)
    value = knowledge[rows, j - 1] + t * (knowledge[rows, j] - knowledge[rows, j - 1])
    value = np.where(first == 0, knowledge[:, 0], value)
    return np.where(first >= 0, value, np.nan)


def worst_after(skill: np.ndarray, knowledge: np.ndarray, level: float | np.ndarray) -> np.ndarray:
    """Per row, the lowest knowledge on the path from where it first reaches ``level`` to its end."""
    levels = np.broadcast_to(np.asarray(level, dtype=float), skill.shape[:1])
    first, _ = _crossing(skill, levels)
    at = at_level(skill, knowledge, levels)
    later = np.where(np.arange(skill.shape[1])[None, :] >= np.maximum(first, 0)[:, None], knowledge, np.inf)
    return np.where(first >= 0, np.minimum(at, later.min(axis=1)), np.nan)


def reading(paths: dict[str, Paths], members: list[str], level: float | np.ndarray) -> np.ndarray:
    """The best knowledge of ``members`` at ``level``: an arm's own reading, a frontier's envelope."""
    values = np.stack([at_level(paths[m].skill, paths[m].knowledge, level) for m in members])
    finite = np.isfinite(values).any(axis=0)
    return np.where(finite, np.nanmax(np.where(np.isfinite(values), values, -np.inf), axis=0), np.nan)


def interval(estimate: float, replicates: np.ndarray, seeds: int = 0, paired: bool = False) -> dict:
    """An estimate with its standard error and 95 % percentile interval over ``replicates``."""
    finite = replicates[np.isfinite(replicates)]
    out = {"estimate": float(estimate), "low": None, "high": None, "stderr": None, "seeds": seeds, "paired": paired}
    if finite.size >= 2 and np.isfinite(estimate):
        low, high = np.percentile(finite, [2.5, 97.5])
        out.update(low=float(low), high=float(high), stderr=float(finite.std(ddof=1)))
    return out


def seed_term(a: list[float], b: list[float] | None, paired: bool) -> tuple[float, float] | None:
    """The standard error the seeds add and its degrees of freedom: of the mean of ``a`` alone, of
    the mean of the paired differences ``a - b``, or Welch's for unpaired arms; None when a side
    has one seed (no spread between runs to estimate)."""
    a_ = np.asarray(a, dtype=float)
    if b is None or paired:
        d = a_ if b is None else a_ - np.asarray(b, dtype=float)
        d = d[np.isfinite(d)]
        return None if d.size < 2 else (float(d.std(ddof=1) / np.sqrt(d.size)), float(d.size - 1))
    b_ = np.asarray(b, dtype=float)
    a_, b_ = a_[np.isfinite(a_)], b_[np.isfinite(b_)]
    if a_.size < 2 or b_.size < 2:
        return None
    va, vb = a_.var(ddof=1) / a_.size, b_.var(ddof=1) / b_.size
    if va + vb == 0:
        return 0.0, float(a_.size + b_.size - 2)
    df = (va + vb) ** 2 / (va ** 2 / (a_.size - 1) + vb ** 2 / (b_.size - 1))
    return float(np.sqrt(va + vb)), float(df)


def combine(estimate: float, items: np.ndarray, seeds: tuple[float, float] | None, draws: Draws,
            count: int, paired: bool) -> dict:
    """The interval of a statistic from its item replicates plus its seed term (a t draw each)."""
    noise = 0.0 if seeds is None else seeds[0] * draws.t(seeds[1])
    return interval(estimate, items + noise, count, paired)


def common_skill(paths: dict[str, Paths]) -> np.ndarray:
    """Per row, the highest skill every arm's (seed-mean) path reaches."""
    return np.min([p.skill.max(axis=1) for p in paths.values()], axis=0)


def set_seeds(arms: dict[str, ArmData], members: list[str]) -> list[int]:
    """The seeds every member ran: a frontier's per-seed envelope needs each of them."""
    common = set(arms[members[0]].seeds).intersection(*(arms[m].seeds for m in members[1:]))
    return [s for s in arms[members[0]].seeds if s in common]


def equal_skill(arms: dict[str, ArmData], sets: dict[str, list[str]], contrasts: list[tuple[str, str]],
                measures: list[str], shares: list[float], draws: Draws) -> dict:
    """Per measure and level: each arm's (and set's) knowledge change at that skill and each arm's
    worst after it, and each contrast ``(a, b)``'s difference a - b, all with intervals. ``sets``
    names frontiers (lists of arms); a contrast side names an arm or a set."""
    units = {**{name: [name] for name in arms}, **sets}
    out: dict = {}
    for measure in measures:
        est, boot, per_seed = {}, {}, {}
        for name, arm in arms.items():
            est[name], seeds = arm_paths(arm, measure, None, None)
            boot[name], _ = arm_paths(arm, measure, draws.facts, draws.tasks)
            per_seed[name] = dict(zip(arm.seeds, seeds))
        common, boot_common = common_skill(est)[0], common_skill(boot)
        seed_common = {s: min(per_seed[m][s].skill.max() for m in arms if s in per_seed[m])
                       for arm in arms.values() for s in arm.seeds}
        rows = []
        for share in shares:
            level, boot_level = share * common, share * boot_common
            value, seed_values = {}, {}
            for unit, members in units.items():
                value[unit] = (reading(est, members, level)[0], reading(boot, members, boot_level))
                seed_values[unit] = {s: reading({m: per_seed[m][s] for m in members}, members,
                                                share * seed_common[s])[0]
                                     for s in set_seeds(arms, members)}
            row: dict = {"share": share, "skill": float(level), "arms": {}, "sets": {}, "contrasts": {}}
            for unit in units:
                (e, b), per = value[unit], list(seed_values[unit].values())
                result = combine(e, b, seed_term(per, None, False), draws, len(per), False)
                if unit in arms:
                    worst = worst_after(est[unit].skill, est[unit].knowledge, level)[0]
                    worst_boot = worst_after(boot[unit].skill, boot[unit].knowledge, boot_level)
                    worst_seeds = [worst_after(p.skill, p.knowledge, share * seed_common[s])[0]
                                   for s, p in per_seed[unit].items()]
                    result["worst_after"] = combine(worst, worst_boot, seed_term(worst_seeds, None, False), draws,
                                                    len(worst_seeds), False)
                    row["arms"][unit] = result
                else:
                    row["sets"][unit] = result
            for a, b in contrasts:
                sa, sb = seed_values[a], seed_values[b]
                paired = set(sa) == set(sb)
                term = seed_term([sa[k] for k in sa], [sb[k] for k in (sa if paired else sb)], paired)
                row["contrasts"][f"{a} vs {b}"] = combine(value[a][0] - value[b][0], value[a][1] - value[b][1],
                                                          term, draws, min(len(sa), len(sb)), paired)
            rows.append(row)
        out[measure] = rows
    return out


def end_change(values: np.ndarray, base: np.ndarray, weights: np.ndarray, draws: Draws) -> dict:
    """An arm's mean change against the base model of per-item values (seeds, items), paired by
    item, with its interval; ``weights`` (replicates, items) are item draws of matching length."""
    change = values - base[None, :]
    items = (change @ weights.T).mean(0)
    per_seed = change.mean(1)
    return combine(float(change.mean()), items, seed_term(list(per_seed), None, False), draws, len(per_seed),
                   False)
