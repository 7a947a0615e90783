"""How often the lab's 95 % intervals cover the truth, on simulated labs with known seed and item
variance, against the old scheme (the same item draws, each arm's seeds resampled independently
with replacement, percentile interval) on the same data.

Each simulated lab has three seeds per arm. Knowledge falls along the path with a slope per arm,
seed and fact: the arm's true slope, a seed effect seed ``k`` shares across arms (its data order),
a seed effect of the arm's own, an effect per fact and per arm and fact, and noise per point. So
the truth at a skill level is known: the true slope times the level.
"""

from __future__ import annotations

import numpy as np

from loramoe.lab.stats import ArmData, Draws, at_level, end_change, equal_skill

LABS, REPLICATES = 300, 400
SEEDS, FACTS, TASKS = 3, 200, 40
GAINS = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
DROP = {"a": 0.5, "b": 0.8}
SHARED_SD, ARM_SD = 0.15, 0.3
"""Seed effects on the slope: shared by seed k of both arms (data order), and each arm's own."""
SHARES = [0.8, 1.0]

# With 300 labs a true coverage of 0.95 has a binomial SD of sqrt(0.95 * 0.05 / 300) = 0.0126:
# the band 0.91..0.99 is about 3 SD either side. The old scheme's bounds lie about 3 SD above its
# long-run coverage (measured over 1000 labs).
BAND = (0.91, 0.99)


def _lab(rng: np.random.Generator) -> dict[str, ArmData]:
    """Two arms on the same facts and task items; task skill varies a little between seeds."""
    base_know, base_loss = rng.normal(0, 2, FACTS), rng.uniform(1, 3, TASKS)
    shared, fact = rng.normal(0, SHARED_SD, SEEDS), rng.normal(0, 0.5, FACTS)
    later = (GAINS > 0)[:, None]
    arms = {}
    for name, drop in DROP.items():
        slope = (-drop + shared[:, None] + rng.normal(0, ARM_SD, SEEDS)[:, None] + fact[None]
                 + rng.normal(0, 0.5, FACTS)[None])
        skill = GAINS[None, :] * (1 + rng.normal(0, 0.1, SEEDS))[:, None]
        know = base_know + slope[:, None, :] * skill[:, :, None] + rng.normal(0, 0.5, (SEEDS, 5, FACTS)) * later
        loss = base_loss - skill[:, :, None] + rng.normal(0, 0.2, (SEEDS, 5, TASKS)) * later
        arms[name] = ArmData(list(range(5)), {"k": know}, loss, list(range(SEEDS)))
    return arms


def _picks(seed: int, arm: int) -> np.ndarray:
    """The old scheme's seed draws: (replicates, seeds), with replacement, independent per arm."""
    return np.random.default_rng([seed, arm]).integers(0, SEEDS, (REPLICATES, SEEDS))


def _resampled(values: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """(seeds, replicates, points) -> (replicates, points): each replicate's mean over its picks."""
    return np.take_along_axis(values.transpose(1, 0, 2), pick[:, :, None], axis=1).mean(1)


def _old_contrast(arms: dict[str, ArmData], draws: Draws, seed: int) -> np.ndarray:
    """The old scheme's (shares, 2) intervals of a - b, levels set again in each replicate."""
    skill, know = {}, {}
    for i, (name, arm) in enumerate(arms.items()):
        pick = _picks(seed, i)
        skill[name] = _resampled(np.einsum("spi,ri->srp", arm.task_loss[:, :1] - arm.task_loss, draws.tasks), pick)
        change = arm.knowledge["k"] - arm.knowledge["k"][:, :1]
        know[name] = _resampled(np.einsum("spi,ri->srp", change, draws.facts), pick)
    common = np.min([s.max(axis=1) for s in skill.values()], axis=0)
    return np.array([np.percentile(at_level(skill["a"], know["a"], share * common)
                                   - at_level(skill["b"], know["b"], share * common), [2.5, 97.5])
                     for share in SHARES])


def test_contrast_intervals_cover_the_truth_and_the_old_scheme_fell_short():
    """Measured here (300 labs): at share 0.8 new 0.94, old 0.87; at share 1.0 new 0.95, old 0.85.
    Over 1000 labs (another RNG seed): new 0.95 and 0.95, old 0.84 and 0.84 (0.82 with no shared
    seed effect: the old scheme's independent resampling also counts the shared part, which the
    pairing cancels, and so falls a little less short the larger that part is)."""
    rng = np.random.default_rng(0)
    new, old = np.zeros(len(SHARES)), np.zeros(len(SHARES))
    for lab in range(LABS):
        arms = _lab(rng)
        draws = Draws.make(FACTS, TASKS, REPLICATES, seed=lab)
        rows = equal_skill(arms, {}, [("a", "b")], ["k"], SHARES, draws)["k"]
        truth = np.array([(DROP["b"] - DROP["a"]) * row["skill"] for row in rows])
        result = [row["contrasts"]["a vs b"] for row in rows]
        new += [r["low"] <= t <= r["high"] for r, t in zip(result, truth)]
        bounds = _old_contrast(arms, draws, lab)
        old += (bounds[:, 0] <= truth) & (truth <= bounds[:, 1])
    new, old = new / LABS, old / LABS
    assert all(BAND[0] <= c <= BAND[1] for c in new), new
    assert all(c < 0.91 for c in old) and all(new - old > 0.04), old  # long run 0.84, SD over 300 labs 0.021


def test_own_change_intervals_cover_the_truth_and_the_old_scheme_fell_short():
    """Measured here (300 labs): new 0.96, old 0.78; over 1000 labs (another RNG seed): new 0.95,
    old 0.78."""
    rng = np.random.default_rng(0)
    truth, new, old = -0.4, 0, 0
    for lab in range(LABS):
        base = rng.normal(0, 2, FACTS)
        values = (base + truth + rng.normal(0, ARM_SD, SEEDS)[:, None] + rng.normal(0, 0.5, FACTS)[None]
                  + rng.normal(0, 0.5, (SEEDS, FACTS)))
        draws = Draws.make(FACTS, 1, REPLICATES, seed=lab)
        result = end_change(values, base, draws.facts, draws)
        new += result["low"] <= truth <= result["high"]
        per_seed = ((values - base) @ draws.facts.T)[:, :, None]  # (seeds, replicates, 1)
        low, high = np.percentile(_resampled(per_seed, _picks(lab, 0))[:, 0], [2.5, 97.5])
        old += low <= truth <= high
    assert BAND[0] <= new / LABS <= BAND[1], new / LABS
    assert old / LABS < 0.86, old / LABS  # long run 0.78, SD over 300 labs 0.024
