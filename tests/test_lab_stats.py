"""The lab's statistics on numbers worked by hand: readings at a skill level, worst after it,
frontier envelopes, the seed term (paired by seed, Welch's otherwise) and the intervals that
combine it with the item bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from loramoe.lab.stats import (
    ArmData,
    Draws,
    Paths,
    at_level,
    combine,
    end_change,
    equal_skill,
    interval,
    reading,
    seed_term,
    worst_after,
)

SKILL = np.array([[0.0, 1.0, 2.0, 3.0]])


def test_at_level_reads_where_the_path_first_reaches_the_level():
    assert at_level(SKILL, np.array([[0.0, -1.0, -3.0, -6.0]]), 1.5)[0] == -2.0  # halfway from -1 to -3
    wavy = np.array([[0.0, 0.5, 0.4, 0.6]])
    # 0.45 is first reached between points 0 and 1 (nine tenths of the way), not at the later crossing
    assert at_level(wavy, np.array([[0.0, 1.0, 2.0, 3.0]]), 0.45)[0] == pytest.approx(0.9)
    assert np.isnan(at_level(wavy, np.array([[0.0, 1.0, 2.0, 3.0]]), 1.0)[0])
    assert at_level(SKILL, np.array([[4.0, -1.0, -3.0, -6.0]]), 0.0)[0] == 4.0  # reached at point 0
    assert at_level(SKILL, np.array([[4.0, -1.0, -3.0, -6.0]]), -1.0)[0] == 4.0
    two = at_level(np.vstack([SKILL, SKILL]), np.array([[0.0, -1.0, -3.0, -6.0], [0.0, 2.0, 4.0, 6.0]]),
                   np.array([2.5, 0.25]))  # one level per row
    assert two.tolist() == [-4.5, 0.5]


def test_worst_after_reports_a_later_dip_and_equals_the_reading_when_knowledge_rises():
    dips = np.array([[0.0, -1.0, -4.0, -2.0]])  # falls to -4 after reaching 0.5, then recovers to -2
    assert at_level(SKILL, dips, 0.5)[0] == -0.5
    assert worst_after(SKILL, dips, 0.5)[0] == -4.0
    rises = np.array([[0.0, 1.0, 2.0, 3.0]])
    assert worst_after(SKILL, rises, 0.5)[0] == at_level(SKILL, rises, 0.5)[0] == 0.5
    assert worst_after(SKILL, dips, 3.0)[0] == -2.0  # reached at the last point
    assert worst_after(SKILL, dips, 0.0)[0] == -4.0  # from point 0 on
    assert np.isnan(worst_after(SKILL, dips, 3.5)[0])


def test_a_frontier_reads_the_best_member_and_is_nan_only_where_none_reaches_the_level():
    paths = {"low_lr": Paths(np.array([[0.0, 1.0, 2.0]]), np.array([[0.0, -1.0, -3.0]])),
             "high_lr": Paths(np.array([[0.0, 1.0, 1.5]]), np.array([[0.0, -0.5, -0.6]]))}
    both = ["low_lr", "high_lr"]
    assert reading(paths, both, 1.0)[0] == -0.5  # both reach 1.0: the better one
    assert reading(paths, both, 2.0)[0] == -3.0  # high_lr never reaches 2.0: the one that does
    assert reading(paths, ["low_lr"], 1.0)[0] == -1.0  # an arm alone: its own reading
    assert np.isnan(reading(paths, both, 2.5)[0])


def test_the_seed_term_is_paired_by_seed_welch_across_unequal_seeds_and_absent_with_one_seed():
    se, df = seed_term([1.0, 2.0, 4.0], [0.0, 0.0, 1.0], paired=True)  # differences 1, 2, 3: SD 1
    assert (se, df) == pytest.approx((1 / np.sqrt(3), 2.0))
    se, df = seed_term([1.0, 2.0, 4.0], None, paired=False)  # one arm: SD sqrt(7/3), over sqrt(3)
    assert (se, df) == pytest.approx((np.sqrt(7) / 3, 2.0))
    # Welch: variances of the means 1/3 and 2/2; df = (4/3)^2 / ((1/3)^2/2 + 1^2/1) = 32/19
    se, df = seed_term([1.0, 2.0, 3.0], [0.0, 2.0], paired=False)
    assert (se, df) == pytest.approx((np.sqrt(4 / 3), 32 / 19))
    # a seed with no reading drops its pair: differences 1, 2 give SD sqrt(1/2), over sqrt(2)
    assert seed_term([1.0, 2.0, np.nan], [0.0, 0.0, 5.0], paired=True) == pytest.approx((0.5, 1.0))
    assert seed_term([1.0, np.nan, np.nan], [0.0, 0.0, 5.0], paired=True) is None  # one pair left
    assert seed_term([1.0], None, paired=False) is None
    assert seed_term([1.0, 2.0], [3.0], paired=False) is None


def test_an_interval_adds_the_seed_term_as_a_student_t_draw():
    draws = Draws.make(1, 1, 40_000, seed=0)
    result = combine(1.0, np.full(40_000, 1.0), (0.5, 2.0), draws, 3, True)
    low, high = np.percentile(draws.t(2.0), [2.5, 97.5])
    assert (result["low"], result["high"]) == pytest.approx((1.0 + 0.5 * low, 1.0 + 0.5 * high))
    # the draws' quantiles are t's with 2 df (4.30), to their sampling error (about 0.07 here)
    assert (low, high) == pytest.approx((-scipy_stats.t.ppf(0.975, 2), scipy_stats.t.ppf(0.975, 2)), abs=0.25)
    assert (result["seeds"], result["paired"]) == (3, True)
    assert combine(1.0, np.full(40_000, 1.0), None, draws, 1, False)["high"] == 1.0  # one seed: items only
    assert interval(0.0, np.array([np.nan, np.nan]))["low"] is None


def _arm(rng, drop: float, seeds: list[int], facts: int = 300, tasks: int = 60) -> ArmData:
    """Paths whose knowledge falls by ``drop`` per unit of skill, with item and seed noise."""
    gains = np.array([0.0, 0.5, 1.0, 1.5])
    n = len(seeds)
    base_know, base_loss = rng.normal(size=facts), rng.uniform(1, 3, size=tasks)
    slope = -drop + rng.normal(0, 0.05, size=(n, 1, 1))
    know = base_know + slope * gains[None, :, None] + rng.normal(0, 0.3, size=(n, 4, facts)) * (gains > 0)[:, None]
    loss = base_loss - gains[None, :, None] + rng.normal(0, 0.1, size=(n, 4, tasks)) * (gains > 0)[:, None]
    know[:, 0], loss[:, 0] = base_know, base_loss
    return ArmData([0, 1, 2, 3], {"gold_logprob": know}, loss, seeds)


def test_equal_skill_finds_a_real_difference_none_where_there_is_none_and_reads_frontiers():
    rng = np.random.default_rng(0)
    arms = {"keeps": _arm(rng, 0.2, [0, 1, 2]), "forgets": _arm(rng, 1.0, [0, 1, 2]),
            "same": _arm(rng, 0.2, [0, 1, 2]), "short": _arm(rng, 0.2, [0, 1])}
    contrasts = [("keeps", "forgets"), ("keeps", "same"), ("keeps", "short"), ("front", "forgets")]
    row = equal_skill(arms, {"front": ["forgets", "keeps"]}, contrasts, ["gold_logprob"], [2 / 3],
                      Draws.make(300, 60, 500, seed=0))["gold_logprob"][0]
    assert row["skill"] == pytest.approx(1.0, abs=0.05)  # two thirds of the common 1.5
    real, none = row["contrasts"]["keeps vs forgets"], row["contrasts"]["keeps vs same"]
    assert real["estimate"] == pytest.approx(0.8, abs=0.1) and real["low"] > 0
    assert none["low"] < 0 < none["high"]
    assert real["paired"] and none["paired"] and not row["contrasts"]["keeps vs short"]["paired"]
    assert (real["seeds"], row["contrasts"]["keeps vs short"]["seeds"]) == (3, 2)
    assert row["sets"]["front"]["estimate"] == row["arms"]["keeps"]["estimate"]  # the envelope: the better arm
    assert row["contrasts"]["front vs forgets"]["estimate"] == real["estimate"]
    forgets = row["arms"]["forgets"]
    assert forgets["estimate"] == pytest.approx(-1.0, abs=0.1) and forgets["low"] < -1.0 < forgets["high"]
    assert all("worst_after" in a for a in row["arms"].values())
    # knowledge keeps falling after the level: the worst is at the end of the path (skill 1.5)
    assert forgets["worst_after"]["estimate"] == pytest.approx(-1.5, abs=0.1)
    assert forgets["worst_after"]["low"] < -1.5 < forgets["worst_after"]["high"]


def test_at_share_one_every_seed_is_read_at_its_own_common_skill():
    """The seeds' paths end at skill 1.2, 0.9 and 0.9 (mean 1.0): a fixed level 1.0 lies beyond
    two of them; each seed is read at its share of the skill that seed reaches in every arm."""
    scale, gains = np.array([1.2, 0.9, 0.9]), np.array([0.0, 0.5, 1.0])
    skill = scale[:, None] * gains[None, :]  # identical items: the item bootstrap adds nothing
    loss = np.broadcast_to(2.0 - skill[:, :, None], (3, 3, 10)).copy()
    slopes = {"a": np.array([-0.2, -0.5, -0.4]), "b": np.array([-1.0, -0.9, -1.6])}
    arms = {name: ArmData([0, 1, 2], {"k": np.broadcast_to((s[:, None] * skill)[:, :, None], (3, 3, 10)).copy()},
                          loss, [0, 1, 2]) for name, s in slopes.items()}
    draws = Draws.make(10, 10, 2000, seed=0)
    row = equal_skill(arms, {}, [("a", "b")], ["k"], [1.0], draws)["k"][0]
    per_seed = (slopes["a"] - slopes["b"]) * scale  # each seed at its own end
    se = per_seed.std(ddof=1) / np.sqrt(3)
    contrast = row["contrasts"]["a vs b"]
    assert contrast["low"] == pytest.approx(contrast["estimate"] + se * np.percentile(draws.t(2.0), 2.5))
    assert contrast["high"] == pytest.approx(contrast["estimate"] + se * np.percentile(draws.t(2.0), 97.5))


def test_end_change_is_paired_by_item_and_adds_the_seed_term():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 5, size=400)  # large spread between items, small change: only pairing sees it
    values = base[None, :] + 0.3 + rng.normal(0, 0.5, size=(3, 400))
    draws = Draws.make(400, 1, 2000, seed=0)
    result = end_change(values, base, draws.facts, draws)
    change = values - base
    assert result["estimate"] == pytest.approx(change.mean())
    assert 0 < result["low"] < 0.3 < result["high"] < 0.6 and result["seeds"] == 3
    items_only = end_change(values[:1], base, draws.facts, draws)  # one seed: no seed term
    one = change[0] @ draws.facts.T
    assert (items_only["low"], items_only["high"]) == pytest.approx(tuple(np.percentile(one, [2.5, 97.5])))
    items = np.percentile(change.mean(0) @ draws.facts.T, [2.5, 97.5])  # the three seeds' items alone
    assert result["high"] - result["low"] > 1.2 * (items[1] - items[0])
