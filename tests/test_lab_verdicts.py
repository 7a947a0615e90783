"""The lab's verdict sentences and report, from made-up results that follow results.json's schema:
each sentence kind said where its numbers call for it and nowhere else, and a whole report whose
every number is one of results.json, with the frontiers figure beside it and inlined."""

from __future__ import annotations

import json

import pytest

from loramoe.lab.figures import envelope, frontier_sets
from loramoe.lab.report import render
from loramoe.lab.verdicts import classify, contrast_sentence, lost, regime_sentence
from tests.lab_checks import check_report

MEASURES = ("gold_share", "mc", "mc_norm", "gold_logprob")
VERDICT = ["gold_share", "mc", "mc_norm"]
SHARES, LEVELS = [0.5, 0.8, 1.0], [0.9, 1.44, 1.8]
SCALE = {"gold_share": 1.0, "mc": 10.0, "mc_norm": 10.0, "gold_logprob": 2.0}
CONSTANTS = {"interval_percent": 95, "detectable_stderrs": 2.8, "power_percent": 80, "routed_share": 0.7,
             "sentence_words": 4, "balance_delta": 0.1, "lbc_optimum": 0.45}
DETECTABLE = {"gold_share": 0.123, "mc": 2.5, "mc_norm": 2.7, "gold_logprob": 0.301}
CONTEXT = {"measures": {"primary": "gold_share", "verdict": VERDICT, "secondary": ["gold_logprob"]},
           "constants": CONSTANTS, "detectable": DETECTABLE, "frontiers": {}}


def iv(estimate, low, high, seeds=3, paired=True):
    return {"estimate": estimate, "low": low, "high": high,
            "stderr": None if low is None else (high - low) / 3.92, "seeds": seeds, "paired": paired}


def contrast(a, b, levels, routing=(), name="c", verdict_level=1):
    """A contrast of the schema from, per level and measure, (difference, a's change, b's change)."""
    by_level = {m: [{"share": SHARES[i], "skill": LEVELS[i], **level[m][0], "verdict": classify(*level[m]),
                     "a_change": level[m][1], "b_change": level[m][2]} for i, level in enumerate(levels)]
                for m in MEASURES}
    return {"name": name, "a": a, "b": b, "question": "?", "kind": "arms", "at_skill": LEVELS[verdict_level],
            "share": SHARES[verdict_level],
            **{m: {k: v for k, v in by_level[m][verdict_level].items() if k not in ("share", "skill")}
               for m in MEASURES},
            "by_level": by_level,
            "verdict_changes_with_level": {m: len({r["verdict"] for r in by_level[m]}) > 1 for m in MEASURES},
            "routing": list(routing)}


def same(difference, a, b):
    """One reading for every level and measure."""
    return [{m: (difference, a, b) for m in MEASURES}] * 3


def sentence(c):
    return contrast_sentence(c, CONTEXT)


def test_keeps_more_only_where_the_other_arm_lost_and_keeps_less_the_mirror():
    said = sentence(contrast("a", "b", same(iv(0.5, 0.2, 0.8), iv(-0.1, -0.3, 0.1), iv(-0.6, -0.9, -0.3))))
    assert "Normalised gold log-probability: a keeps more than b: +0.500 [+0.200, +0.800] " \
           "nats, where b itself lost -0.600 [-0.900, -0.300]." in said
    assert "Multiple choice (acc): a keeps more than b: +0.5 [+0.2, +0.8] points" in said
    assert "keeps less" not in said and "changes with the level" not in said and "seed" not in said
    said = sentence(contrast("a", "b", same(iv(-0.5, -0.8, -0.2), iv(-0.6, -0.9, -0.3), iv(-0.1, -0.3, 0.1))))
    assert "a keeps less than b: -0.500 [-0.800, -0.200] nats, where a itself lost -0.600 [-0.900, -0.300]." in said
    assert "keeps more" not in said


def test_two_arms_that_both_gained_have_nothing_to_keep_not_no_difference():
    said = sentence(contrast("lora", "loramoe", same(iv(0.02, -0.05, 0.09), iv(0.05, 0.01, 0.1), iv(0.03, 0.0, 0.06))))
    assert "neither arm lost knowledge here: nothing to keep (lora +0.050 [+0.010, +0.100], " \
           "loramoe +0.030 [+0.000, +0.060] nats)" in said
    assert "no detectable difference" not in said and "power" not in said


def test_no_detectable_difference_gives_the_size_detected_with_80_percent_power():
    said = sentence(contrast("a", "b", same(iv(0.05, -0.1, 0.2), iv(-0.3, -0.4, -0.2), iv(-0.35, -0.5, -0.2))))
    assert "no detectable difference (+0.050 [-0.100, +0.200] nats); a difference of about 0.123 nats would be " \
           "detected with 80 % power." in said
    assert "a difference of about 2.5 points would be detected with 80 % power" in said
    assert "undetected" not in said and "smaller than" not in said


def test_a_difference_without_interval_is_not_measurable():
    said = sentence(contrast("a", "b", same(iv(0.05, None, None), iv(-0.3, -0.4, -0.2), iv(-0.35, -0.5, -0.2))))
    assert "not measurable (+0.050 [n/a] nats): the difference has no interval at this level" in said
    assert "keeps" not in said and "no detectable difference" not in said


def test_a_verdict_that_changes_with_the_level_names_the_verdict_at_each():
    gained, lost_ = iv(0.05, 0.01, 0.1), iv(-0.6, -0.9, -0.3)
    levels = [{m: (iv(0.04, -0.02, 0.1), gained, iv(0.01, -0.02, 0.04)) for m in MEASURES},
              {m: (iv(0.65, 0.3, 0.9), gained, lost_) for m in MEASURES},
              {m: (iv(0.65, 0.3, 0.9), gained, lost_) for m in MEASURES}]
    said = sentence(contrast("a", "b", levels))
    assert "a keeps more than b: +0.650 [+0.300, +0.900] nats, where b itself lost -0.600 [-0.900, -0.300]; the " \
           "verdict changes with the level: nothing to keep at share 0.5, keeps more at share 0.8, keeps more at " \
           "share 1.0." in said
    assert said.count("the verdict changes with the level") == 3  # each verdict measure


def test_an_arm_whose_router_did_not_route_is_named_with_both_shares():
    routing = [{"arm": "loramoe-route", "knowledge": 0.272, "task": 0.839, "routed": False}]
    said = sentence(contrast("loramoe-route", "loramoe", same(iv(0.05, -0.1, 0.2), iv(-0.3, -0.4, -0.2),
                                                             iv(-0.35, -0.5, -0.2)), routing))
    assert "loramoe-route's router did not route: it sent held-out fact statements 0.272 to the knowledge group " \
           "and task prompts 0.839 to the task group (0.7 needed), so this contrast does not test routing by " \
           "type." in said
    routing[0] |= {"knowledge": 0.81, "task": 0.9, "routed": True}
    said = sentence(contrast("loramoe-route", "loramoe", same(iv(0.05, -0.1, 0.2), iv(-0.3, -0.4, -0.2),
                                                             iv(-0.35, -0.5, -0.2)), routing))
    assert "router routed: it sent held-out fact statements 0.810" in said and "does not test" not in said


@pytest.mark.parametrize("seeds, paired, words", [
    (1, True, "One seed: no training variance in this interval."),
    (1, False, "One seed: no training variance in this interval."),
    (3, False, "The arms ran different seeds: the interval treats their runs as unpaired."),
    (3, True, None),
])
def test_the_seeds_behind_an_interval_are_said_where_they_limit_it(seeds, paired, words):
    said = sentence(contrast("a", "full", same(iv(0.5, 0.2, 0.8, seeds, paired), iv(-0.1, -0.3, 0.1),
                                               iv(-0.6, -0.9, -0.3))))
    if words:
        assert said.endswith(words)
    else:
        assert "seed" not in said


def _regime(ends):
    arms = {name: {"method": method, "end": {m: iv(*end) for m in MEASURES}} for name, (method, end) in ends.items()}
    return {**CONTEXT, "arms": arms, "regime": {"full": "full", "arms": {
        name: {"lost": {m: lost(arm["end"][m]) for m in VERDICT}} for name, arm in arms.items()}}}


def test_the_regime_names_the_arms_that_lost_and_the_floor_of_the_adapters():
    results = _regime({"full": ("full", (-0.9, -1.2, -0.6)), "lora": ("lora", (0.1, 0.0, 0.2))})
    said = regime_sentence(results)
    assert said.startswith("By the end of its run, full lost knowledge (normalised gold log-probability: "
                           "-0.900 [-1.200, -0.600] nats).")
    assert 'contrasts between adapters can only read "nothing to keep" here' in said
    results = _regime({"full": ("full", (0.1, -0.1, 0.3)), "lora": ("lora", (-0.4, -0.6, -0.2))})
    said = regime_sentence(results)
    assert "lora lost knowledge" in said and "full fine-tuning (full) did not: +0.100 [-0.100, +0.300] nats" in said
    assert "can only read" not in said
    said = regime_sentence(_regime({"full": ("full", (0.1, -0.1, 0.3)), "lora": ("lora", (0.1, 0.0, 0.2))}))
    assert said.startswith("No arm lost knowledge by the end of its run (normalised gold log-probability: no end "
                           "interval lies below 0); full fine-tuning (full) ended at: +0.100 [-0.100, +0.300] nats.")
    assert "can only read" in said


def test_a_verdict_outside_the_known_ones_is_an_error_not_a_sentence():
    c = contrast("a", "b", same(iv(0.5, 0.2, 0.8), iv(-0.1, -0.3, 0.1), iv(-0.6, -0.9, -0.3)))
    c["gold_share"]["verdict"] = "higher"
    with pytest.raises(ValueError, match="'higher'"):
        sentence(c)


def test_the_envelope_is_the_best_first_reading_of_the_paths_that_reach_each_skill():
    skills, best = envelope({"low": ([0.0, 1.0, 2.0], [0.0, 0.2, -0.4]), "high": ([0.0, 2.0, 3.0], [0.0, 0.0, -1.0])})
    assert skills == [0.0, 1.0, 2.0, 3.0]
    assert best == pytest.approx([0.0, 0.2, 0.0, -1.0])  # at 2: high 0.0 beats low -0.4; at 3 only high reaches


# A whole report ------------------------------------------------------------------------------------------

ARMS = {"full": ("full", 3e-4, [0], [0.01, -0.3, -0.9], -0.95),
        "lora": ("lora", 1e-3, [0, 1, 2], [0.02, 0.03, 0.01], 0.04),
        "lora-hi": ("lora", 3e-3, [0, 1, 2], [0.0, -0.05, -0.08], -0.06),
        "loramoe": ("loramoe", 1e-3, [0, 1, 2], [0.04, 0.02, 0.0], 0.01),
        "loramoe-route": ("loramoe", 1e-3, [0, 1, 2], [-0.02, -0.25, -0.7], -0.8)}
"""name: (method, lr, seeds, change at each level per unit of its measure, change at the end)."""
FRONTIERS = {"lora-frontier": ["lora", "lora-hi"]}
CONTRASTS = [("frozen backbone", "lora", "full"), ("mixture", "loramoe", "lora"),
             ("routing vs full", "loramoe-route", "full"), ("lora frontier", "lora-frontier", "full")]


def _change(name, i, m):
    value = max(ARMS[v][3][i] for v in FRONTIERS[name]) if name in FRONTIERS else ARMS[name][3][i]
    seeds = 3 if name in FRONTIERS else len(ARMS[name][2])
    s = SCALE[m]
    return iv(round(value * s, 4), round((value - 0.1) * s, 4), round((value + 0.1) * s, 4), seeds)


def _router(claims):
    end = {"knowledge": 0.272, "task": 0.839} if claims else {"knowledge": 0.512, "task": 0.498}
    shares = dict(end)
    end = {**end, "questions": 0.317 if claims else 0.516}
    return {"steps": [3, 12, 40], "own_group_share": {k: [0.5, 0.51, v] for k, v in shares.items()},
            "own_share_by_depth": {k: [0.333, 0.263, 0.221] for k in shares},
            "final_per_layer": {k: {g: [0.4, 0.6] for g in shares} for k in shares},
            "uniform_share": {"knowledge": 0.5, "task": 0.5}, "end_share": end, "claims_routing": claims,
            "target": 0.9 if claims else None, "routed": False if claims else None}


def made_up_results():
    arms = {}
    for name, (method, lr, seeds, _, end) in ARMS.items():
        path = {"steps": [0, 3, 12, 40], "skill": [0.0, 0.7, 1.5, 1.9],
                **{m: [0.0, 0.05 * SCALE[m], end * 0.5 * SCALE[m], end * SCALE[m]] for m in MEASURES}}
        path["per_seed"] = {str(s): {k: [v + 0.01 * s for v in path[k]] for k in ("skill", *MEASURES)} for s in seeds}
        arms[name] = {"method": method, "lr": lr, "seeds": seeds, "runs": [f"{name}-s{s}" for s in seeds],
                      "trainable_parameters": 1000 if method != "full" else 100000, "train_seconds": 12.5,
                      "score_seconds": 3.5, "path": path,
                      "end": {**{m: iv(end * SCALE[m], (end - 0.15) * SCALE[m], (end + 0.15) * SCALE[m], len(seeds))
                                 for m in MEASURES}, "skill": iv(1.9, 1.8, 2.0)},
                      "per_relation_mc": {"capital": 80.5, "currency": 60.25},
                      "chat": {"accuracy": 62.5, "base_accuracy": 75.0, "change": iv(-12.5, -25.0, 0.0),
                               "answers": 16, "format_changed": 6.25, "lost": 3, "gained": 1,
                               "lost_with_format_change": 1, "lost_but_probe_right": 2, "base_sentence_answers": 12.5},
                      "generation": {"score": 20.5, "base_score": 18.0, "change": iv(2.5, -1.0, 6.0)}}
        if method == "loramoe":
            arms[name]["router"] = _router(name == "loramoe-route")
    equal = {m: [{"share": SHARES[i], "skill": LEVELS[i],
                  "arms": {n: {**_change(n, i, m), "worst_after": _change(n, min(i + 1, 2), m)} for n in ARMS},
                  "sets": {n: _change(n, i, m) for n in FRONTIERS},
                  "contrasts": {}} for i in range(3)] for m in MEASURES}
    contrasts = []
    for name, a, b in CONTRASTS:
        levels = []
        for i in range(3):
            per = {}
            for m in MEASURES:
                ca, cb = _change(a, i, m), _change(b, i, m)
                d = round(ca["estimate"] - cb["estimate"], 4)
                seeds = min(ca["seeds"], cb["seeds"])
                per[m] = (iv(d, round(d - 0.15 * SCALE[m], 4), round(d + 0.15 * SCALE[m], 4), seeds, seeds > 1), ca, cb)
                equal[m][i]["contrasts"][f"{a} vs {b}"] = per[m][0]
            levels.append(per)
        routing = [{"arm": n, "knowledge": 0.272, "task": 0.839, "routed": False}
                   for n in (a, b) if n == "loramoe-route"]
        contrasts.append(contrast(a, b, levels, routing, name) | {"kind": "frontiers" if a in FRONTIERS else "arms"})
    relation_row = {"facts": 40, "gold_tokens": 1.55, "distractor_tokens": 3.99, "gold_chars": 6.5,
                    "distractor_chars": 9.25, "length_only_mc": 45.5, "base_mc": 70.0, "base_mc_norm": 66.5,
                    "base_picks_length_only": 52.5}
    return {
        "lab": {"model": "made-up", "sources": ["lab.yaml (shipped)"], "runs": 13, "seconds": 1234.5},
        "mix": {"total": 320, "knowledge": 6},
        "probe": {"facts": 80, "facts_per_relation": {"capital": 40, "currency": 40}, "removed_by_overlap": 7,
                  "choices": 4, "task_items": 32, "task_items_per_task": {"topic": 16, "summarization": 16},
                  "chat_items": 16, "generation_items": 8},
        "base": {"gold_share": -0.61, "mc": 70.0, "mc_norm": 66.5, "gold_logprob": -4.25, "task_loss": 3.75,
                 "generation": 18.0, "per_relation_mc": {"capital": 85.0, "currency": 55.0}},
        "length_only": {"chance": 25.0, "per_relation": {"capital": relation_row, "currency": relation_row},
                        "all": {**relation_row, "facts": 80}},
        "measures": CONTEXT["measures"], "common_skill": 1.8, "levels": LEVELS, "level_shares": SHARES,
        "verdict_level": 1,
        "frontiers": {n: {"variants": v, "method": "lora", "lrs": [ARMS[x][1] for x in v]}
                      for n, v in FRONTIERS.items()},
        "arms": arms, "equal_skill": equal, "contrasts": contrasts,
        "regime": {"full": "full",
                   "arms": {n: {"lost": {m: lost(a["end"][m]) for m in VERDICT}} for n, a in arms.items()}},
        "detectable": DETECTABLE, "constants": CONSTANTS,
    }


def test_a_whole_report_prints_only_numbers_of_results_json_and_draws_the_frontiers(tmp_path):
    results = made_up_results()
    assert results["equal_skill"]["gold_share"][0]["arms"]["full"]["seeds"] == 1
    (tmp_path / "results.json").write_text(json.dumps(results))
    render(results, tmp_path)
    check_report(tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert (tmp_path / "frontiers.png").stat().st_size > 1000 and html.count("data:image/png;base64,") == 3
    text = (tmp_path / "report.md").read_text()
    assert "![frontiers](frontiers.png)" in text
    verdicts = {c["name"]: c["gold_share"]["verdict"] for c in results["contrasts"]}
    assert verdicts == {"frozen backbone": "keeps more", "mixture": "nothing to keep",
                        "routing vs full": "no detectable difference", "lora frontier": "keeps more"}
    assert "**mixture** (loramoe minus lora at share 0.8 of the common skill, 1.440 nats of skill): Normalised " \
           "gold log-probability: neither arm lost knowledge here: nothing to keep" in text
    assert "the frontier lora-frontier keeps more than full" in text
    assert "nothing to keep at share 0.5, keeps more at share 0.8, keeps more at share 1.0" in text
    assert "loramoe-route's router did not route" in text and "One seed: no training variance" in text
    assert "| lora-frontier | lora | lora, lora-hi | 0.0010 / 0.0030 |" in text
    assert "| mixture | **0.8** (verdicts) | 1.440 |" in text
    assert "| loramoe-route | yes | 0.900 | 0.272 | 0.317 | 0.839 | no |" in text
    for overclaim in ("would go undetected", "did what the formulas say", "not forgotten"):
        assert overclaim not in text
    assert list(frontier_sets(results)) == ["lora-frontier"]
    assert list(frontier_sets({**results, "frontiers": {}})) == list(ARMS)
