"""The lab's power calculation (loramoe.lab.power) on made-up changes of known variance components."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from loramoe.lab.power import Z_POWER, Components, components, detectable, needed, standard_error

ITEM, SEED, RESIDUAL = 0.8, 0.3, 0.5
"""The made-up item effect, seed effect and remaining SDs (the module docstring's sa, sb, se)."""


def made_up(rng: np.random.Generator, seeds: int, items: int, shift: float = 0.0, reps: int | None = None,
            sds: tuple[float, float, float] = (ITEM, SEED, RESIDUAL)) -> np.ndarray:
    """Changes ``shift + a_i + b_s + e_si`` (seeds, items) with the SDs ``sds`` of a, b and e, or
    ``reps`` independent sets of them."""
    lead = () if reps is None else (reps,)
    a = rng.normal(0, sds[0], (*lead, 1, items))
    b = rng.normal(0, sds[1], (*lead, seeds, 1))
    return shift + a + b + rng.normal(0, sds[2], (*lead, seeds, items))


def test_z_is_the_two_sided_5_percent_critical_value_plus_the_80th_percentile():
    normal = NormalDist()
    assert Z_POWER == pytest.approx(normal.inv_cdf(0.975) + normal.inv_cdf(0.8), abs=0.005)


def test_components_recover_the_item_seed_and_residual_sds():
    parts = components(made_up(np.random.default_rng(0), seeds=200, items=400))
    # item_sd is one seed's SD over items, sqrt(sa^2 + se^2); 400 item effects set it to about 4 %
    assert parts.item_sd == pytest.approx(math.hypot(ITEM, RESIDUAL), rel=0.08)
    # 200 seed effects: about 5 % (more with se^2 / items taken out)
    assert parts.seed_sd == pytest.approx(SEED, rel=0.2)
    assert parts.residual_sd == pytest.approx(RESIDUAL, rel=0.02)


def test_the_seed_sd_leaves_out_the_item_part_of_the_seed_means():
    """Without a seed effect the seed means still vary by se / sqrt(items); none of it is seed SD."""
    rng = np.random.default_rng(1)
    changes = rng.normal(0, ITEM, (1, 50)) + rng.normal(0, RESIDUAL, (400, 50))
    parts = components(changes)
    assert changes.mean(1).std(ddof=1) == pytest.approx(RESIDUAL / math.sqrt(50), rel=0.1)
    assert parts.seed_sd < 0.2 * RESIDUAL / math.sqrt(50)


def test_one_seed_measures_the_item_sd_alone():
    changes = np.array([[0.0, 1.0, 3.0, -1.0]])
    parts = components(changes)
    assert parts.item_sd == pytest.approx(changes[0].std(ddof=1))
    assert math.isnan(parts.seed_sd) and math.isnan(parts.residual_sd)
    assert parts.item_sd_at(5) == parts.item_sd


@pytest.mark.parametrize("shape", [(3,), (2, 1), (1, 2, 3)])
def test_components_want_seeds_by_items(shape):
    with pytest.raises(ValueError, match="seeds, items"):
        components(np.zeros(shape))


def test_item_sd_at_makes_the_two_term_formula_exact():
    """sa^2 / I + sb^2 / S + se^2 / (S I) is the variance of the mean over S seeds and I items."""
    parts = Components(math.hypot(ITEM, RESIDUAL), SEED, RESIDUAL)
    for seeds, items in [(1, 100), (3, 500), (5, 20)]:
        exact = ITEM ** 2 / items + SEED ** 2 / seeds + RESIDUAL ** 2 / (seeds * items)
        assert standard_error(parts.item_sd_at(seeds), SEED, items, seeds) ** 2 == pytest.approx(exact)
        # the plain item_sd charges se^2 at 1 / I: never less than the exact variance
        assert standard_error(parts.item_sd, SEED, items, seeds) ** 2 >= exact


def test_the_formula_predicts_the_spread_of_simulated_means():
    seeds, items = 3, 200
    means = made_up(np.random.default_rng(2), seeds, items, reps=4000).mean(axis=(1, 2))
    predicted = standard_error(Components(math.hypot(ITEM, RESIDUAL), SEED, RESIDUAL).item_sd_at(seeds), SEED,
                               items, seeds)
    assert means.std(ddof=1) == pytest.approx(predicted, rel=0.05)  # 4000 draws: about 1 %


def test_detectable_is_z_standard_errors():
    assert detectable(0.8, 0.2, 500, 3) == pytest.approx(2.8 * math.sqrt(0.64 / 500 + 0.04 / 3))
    assert detectable(0.8, 0.0, 64, 1, z=1.96) == pytest.approx(1.96 * 0.1)
    # more items or seeds, a smaller detectable difference
    assert detectable(0.8, 0.2, 1000, 3) < detectable(0.8, 0.2, 500, 3)
    assert detectable(0.8, 0.2, 500, 5) < detectable(0.8, 0.2, 500, 3)


@pytest.mark.parametrize("item_sd, seed_sd, target", [(0.85, 0.03, 0.1), (22.0, 0.5, 1.5), (0.4, 0.0, 0.05)])
def test_needed_inverts_detectable(item_sd, seed_sd, target):
    for seeds in (1, 3, 5):
        items = needed(item_sd, seed_sd, target, seeds=seeds)
        assert detectable(item_sd, seed_sd, items, seeds) == pytest.approx(target)
        # rounded up, the count meets the target; one fewer misses it
        assert detectable(item_sd, seed_sd, math.ceil(items), seeds) <= target
        assert detectable(item_sd, seed_sd, math.ceil(items) - 1, seeds) > target
    if seed_sd > 0:
        seeds = needed(item_sd, seed_sd, target, items=5000)
        assert detectable(item_sd, seed_sd, 5000, seeds) == pytest.approx(target)


def test_needed_is_infinite_where_the_other_term_alone_exceeds_the_target():
    # seed term alone: 2.8 * 0.1 / sqrt(3) = 0.16 > 0.1 nats, whatever the items
    assert needed(0.5, 0.1, 0.1, seeds=3) == math.inf
    assert needed(0.5, 0.1, 0.1, seeds=8) < math.inf
    # item term alone: 2.8 * 2 / sqrt(100) = 0.56 > 0.1, whatever the seeds
    assert needed(2.0, 0.01, 0.1, items=100) == math.inf


def test_needed_takes_exactly_one_count_and_a_positive_target():
    with pytest.raises(ValueError, match="exactly one"):
        needed(1.0, 0.1, 0.1)
    with pytest.raises(ValueError, match="exactly one"):
        needed(1.0, 0.1, 0.1, seeds=3, items=100)
    with pytest.raises(ValueError, match="positive"):
        needed(1.0, 0.1, 0.0, seeds=3)


def _power(changes: np.ndarray, error: float) -> float:
    """The share of simulated labs whose 95 % normal interval, mean +- 1.96 SE, excludes 0."""
    return float((np.abs(changes.mean(axis=(1, 2))) > NormalDist().inv_cdf(0.975) * error).mean())


def test_a_difference_of_the_detectable_size_is_found_four_times_in_five():
    seeds, items, reps = 3, 200, 4000
    parts = Components(math.hypot(ITEM, RESIDUAL), SEED, RESIDUAL)
    error = standard_error(parts.item_sd_at(seeds), SEED, items, seeds)
    size = detectable(parts.item_sd_at(seeds), SEED, items, seeds)
    found = _power(made_up(np.random.default_rng(3), seeds, items, size, reps), error)
    assert found == pytest.approx(0.80, abs=0.03)  # 4000 labs: about 0.6 % sampling error
    # a difference half that size is found far less often; none at all about 5 % of the time
    assert _power(made_up(np.random.default_rng(4), seeds, items, size / 2, reps), error) < 0.4
    assert _power(made_up(np.random.default_rng(5), seeds, items, 0.0, reps), error) == pytest.approx(0.05, abs=0.015)


def test_planning_with_the_one_seed_item_sd_errs_towards_more_power():
    """A plan from the plain item SD (all a one-seed lab measures) over-states the variance by the
    part of the per-item spread that more seeds average out, so the difference it calls detectable
    is found more often than promised: here, where that part dominates, about 93 % of the time."""
    seeds, items, sds = 5, 200, (0.3, 0.05, 1.0)
    one_seed = components(made_up(np.random.default_rng(6), 1, items, sds=sds)).item_sd
    assert one_seed == pytest.approx(math.hypot(sds[0], sds[2]), rel=0.2)
    size = detectable(one_seed, sds[1], items, seeds)
    error = standard_error(one_seed, sds[1], items, seeds)
    assert _power(made_up(np.random.default_rng(7), seeds, items, size, 4000, sds), error) > 0.87
