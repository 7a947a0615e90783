"""How many items and seeds the lab needs to detect a difference of a given size: a normal-theory
power calculation, pure numpy.

The lab's estimates are means over seeds and held-out facts (items) of per-item changes: an arm's
change against the base model, or a contrast's difference between two arms' changes, paired by
fact (and by seed where both arms ran the same seeds). Per seed ``s`` and item ``i`` write such a
change as ``mu + a_i + b_s + e_si``: an item effect (facts differ in how much they move), a seed
effect (a whole run lands higher or lower) and what is left (each seed moves each fact its own
way), with variances ``sa^2``, ``sb^2`` and ``se^2``. The mean over ``S`` seeds and ``I`` items has

    var = sa^2 / I + sb^2 / S + se^2 / (S I).

The lab plans with two terms, ``item_sd^2 / I + seed_sd^2 / S`` (:func:`standard_error`):

- ``item_sd``: the SD over items of one seed's per-item changes, ``sqrt(sa^2 + se^2)``. It is what
  one seed alone measures (a single-seed lab cannot tell ``sa`` from ``se``), and charging ``se^2``
  at ``1 / I`` rather than ``1 / (S I)`` overstates the variance by at most ``se^2 / I``: a plan made
  with it errs towards more items. With several seeds :meth:`Components.item_sd_at` removes that
  excess for a planned seed count.
- ``seed_sd``: ``sb``, the SD over seeds of the per-seed means *less the item part they carry*: a
  seed's mean over ``I`` items holds ``se^2 / I`` of remaining variance besides ``sb^2``, and that
  part is already in the item term.

A difference is detected with 80 % power by a two-sided 5 % test when it is ``z = 1.96 + 0.84 = 2.8``
standard errors: 1.96 puts the test's 95 % interval edge at 1.96 SE from the estimate, and a true
difference 0.84 SE beyond that edge (the 80th percentile of a standard normal) keeps the estimate
outside it four times in five.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

Z_POWER = 2.8
"""Standard errors a true difference must span to be found with 80 % power by a two-sided 5 %
test: 1.96 (the test's critical value) + 0.84 (the standard normal's 80th percentile)."""


class Components(NamedTuple):
    """The variance components of per-seed, per-item changes (the module docstring's terms)."""

    item_sd: float
    """``sqrt(sa^2 + se^2)``: the SD over items of one seed's changes, pooled over seeds."""
    seed_sd: float
    """``sb``: the seed effect's SD; NaN with one seed, where nothing measures it."""
    residual_sd: float
    """``se``: what is left after item and seed effects; NaN with one seed."""

    def item_sd_at(self, seeds: int) -> float:
        """The item SD that makes the two-term formula exact at ``seeds`` seeds,
        ``sqrt(sa^2 + se^2 / seeds)``; ``item_sd`` itself (the upper bound) where ``se`` is unknown."""
        if not math.isfinite(self.residual_sd):
            return self.item_sd
        return math.sqrt(max(self.item_sd ** 2 - self.residual_sd ** 2 * (1.0 - 1.0 / seeds), 0.0))


def components(changes: np.ndarray) -> Components:
    """The variance components of ``changes`` (seeds, items): per seed, per item changes against the
    base model, or differences between two arms paired by item and seed.

    A two-way analysis of variance without replication: ``se^2`` is the residual mean square after
    removing seed and item means, ``(S - 1)(I - 1)`` degrees of freedom; ``item_sd^2`` the mean over
    seeds of the variance over items (expected ``sa^2 + se^2``); ``seed_sd^2`` the variance of the
    seed means less ``se^2 / I`` (expected ``sb^2``), floored at 0 where sampling takes it below.
    """
    changes = np.asarray(changes, dtype=float)
    if changes.ndim != 2 or changes.shape[1] < 2:
        raise ValueError(f"changes must be (seeds, items) with at least 2 items, got shape {changes.shape}")
    seeds, items = changes.shape
    item_sd = float(np.sqrt(changes.var(axis=1, ddof=1).mean()))
    if seeds < 2:
        return Components(item_sd, math.nan, math.nan)
    residual = changes - changes.mean(1, keepdims=True) - changes.mean(0, keepdims=True) + changes.mean()
    residual_var = float((residual ** 2).sum() / ((seeds - 1) * (items - 1)))
    seed_var = float(changes.mean(1).var(ddof=1)) - residual_var / items
    return Components(item_sd, math.sqrt(max(seed_var, 0.0)), math.sqrt(residual_var))


def standard_error(item_sd: float, seed_sd: float, items: float, seeds: float) -> float:
    """``sqrt(item_sd^2 / items + seed_sd^2 / seeds)``: the standard error of a mean change (or of a
    paired contrast, given the SDs of the differences) over ``items`` items and ``seeds`` seeds."""
    return math.sqrt(item_sd ** 2 / items + seed_sd ** 2 / seeds)


def detectable(item_sd: float, seed_sd: float, items: float, seeds: float, z: float = Z_POWER) -> float:
    """The smallest true difference found with 80 % power by a two-sided 5 % test (at the default
    ``z`` = 1.96 + 0.84 = 2.8): ``z * sqrt(item_sd^2 / items + seed_sd^2 / seeds)``."""
    return z * standard_error(item_sd, seed_sd, items, seeds)


def needed(item_sd: float, seed_sd: float, target: float, seeds: float | None = None,
           items: float | None = None, z: float = Z_POWER) -> float:
    """What :func:`detectable` needs to reach ``target``: the items at ``seeds`` seeds, or the seeds
    at ``items`` items (give exactly one). Solves ``(target / z)^2 = item_sd^2 / items + seed_sd^2 /
    seeds`` for the other count; the exact real value, to be rounded up. ``inf`` where the given
    count's term alone takes the whole budget ``(target / z)^2``: no number of the other helps.
    """
    if (seeds is None) == (items is None):
        raise ValueError("give exactly one of seeds and items")
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")
    budget = (target / z) ** 2
    if seeds is not None:
        spare, sd = budget - seed_sd ** 2 / seeds, item_sd
    else:
        spare, sd = budget - item_sd ** 2 / items, seed_sd
    if spare <= 0:
        return math.inf
    return sd ** 2 / spare
