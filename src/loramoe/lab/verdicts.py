"""A contrast's verdict from its numbers: the difference's 95 % interval read together with each
arm's own change against the base model, so that two arms that both keep everything are not
reported as "no detectable difference" (which would suggest a protection was tested).

The sentences the report says about them live here too, each a pure function of ``results.json``
(or one of its contrasts), so that no sentence claims more than the numbers it is built from.
"""

from __future__ import annotations

from typing import Any

Interval = dict[str, Any]
"""``{"estimate", "low", "high", ...}``; ``low``/``high`` are None where no interval exists."""

KEEPS_MORE = "keeps more"
KEEPS_LESS = "keeps less"
NOTHING_TO_KEEP = "nothing to keep"
NO_DIFFERENCE = "no detectable difference"
NOT_MEASURABLE = "not measurable"
VERDICTS = (KEEPS_MORE, KEEPS_LESS, NOTHING_TO_KEEP, NO_DIFFERENCE, NOT_MEASURABLE)


def lost(change: Interval) -> bool:
    """An arm lost knowledge: its own change against the base model lies below 0, interval included."""
    return change.get("high") is not None and change["high"] < 0


def classify(difference: Interval, a: Interval, b: Interval) -> str:
    """The verdict on ``a - b`` at one level and measure. "Keeps more" needs the interval above 0
    *and* b's own loss beyond 0 (there was something to keep); "keeps less" the mirror; where
    neither arm lost anything the contrast cannot speak of protection at all."""
    if difference.get("low") is None:
        return NOT_MEASURABLE
    if not lost(a) and not lost(b):
        return NOTHING_TO_KEEP
    if difference["low"] > 0 and lost(b):
        return KEEPS_MORE
    if difference["high"] < 0 and lost(a):
        return KEEPS_LESS
    return NO_DIFFERENCE


UNITS = {"gold_share": ("gold log-probability normalised over the choices", "nats", 3),
         "mc": ("multiple choice (lm-eval acc)", "points", 1),
         "mc_norm": ("multiple choice, length-normalised (lm-eval acc_norm)", "points", 1),
         "gold_logprob": ("gold log-probability", "nats", 3)}
"""Per knowledge measure, in the report's column order: its name, its unit and the digits it is printed with."""
SHORT = {"gold_share": "normalised gold log-probability", "mc": "multiple choice (acc)",
         "mc_norm": "multiple choice (acc_norm)", "gold_logprob": "gold log-probability"}
"""Per knowledge measure, its name in the verdict sentences."""


def fmt(value: Any, digits: int = 1) -> str:
    """The one way the report prints a number (the structure test formats results.json alike)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def signed(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else ("+" if value >= 0 else "") + fmt(value, digits)


def ci(result: Interval, digits: int) -> str:
    """``+0.123 [-0.010, +0.250]``: an estimate and its 95 % interval."""
    if result["low"] is None:
        return f"{signed(result['estimate'], digits)} [n/a]"
    return f"{signed(result['estimate'], digits)} [{signed(result['low'], digits)}, {signed(result['high'], digits)}]"


def share(value: float) -> str:
    """A share (0.8, 0.75, 1.0) with the fewest of the report's digits that print it exactly: 0.75
    must not read 0.8."""
    for digits in (1, 3):
        if abs(round(value, digits) - value) < 1e-9:
            return fmt(value, digits)
    return fmt(value, 4)


def _side(name: str, results: dict) -> str:
    return f"the frontier {name}" if name in results.get("frontiers", {}) else name


def measure_clause(contrast: dict, measure: str, results: dict) -> str:
    """What one measure says at the verdict level: the verdict in words with the numbers behind it."""
    r, (_, unit, digits) = contrast[measure], UNITS[measure]
    a, b = _side(contrast["a"], results), _side(contrast["b"], results)
    verdict = r["verdict"]
    if verdict == KEEPS_MORE:
        return f"{a} keeps more than {b}: {ci(r, digits)} {unit}, where {b} itself lost {ci(r['b_change'], digits)}"
    if verdict == KEEPS_LESS:
        return f"{a} keeps less than {b}: {ci(r, digits)} {unit}, where {a} itself lost {ci(r['a_change'], digits)}"
    if verdict == NOTHING_TO_KEEP:
        return (f"neither arm lost knowledge here: nothing to keep ({a} {ci(r['a_change'], digits)}, "
                f"{b} {ci(r['b_change'], digits)} {unit})")
    if verdict == NO_DIFFERENCE:
        size = results["detectable"][measure]
        if size is None:
            return f"no detectable difference ({ci(r, digits)} {unit}); no contrast here has a standard error"
        power = fmt(results["constants"]["power_percent"])
        return (f"no detectable difference ({ci(r, digits)} {unit}); a difference of about {fmt(size, digits)} "
                f"{unit} would be detected with {power} % power")
    if verdict == NOT_MEASURABLE:
        return f"not measurable ({ci(r, digits)} {unit}): the difference has no interval at this level"
    raise ValueError(f"contrast '{contrast['name']}' has verdict {verdict!r}, none of {VERDICTS}")


def level_clause(contrast: dict, measure: str) -> str | None:
    """Where the verdict differs between levels, the verdict at each (None where it does not)."""
    if not contrast["verdict_changes_with_level"].get(measure):
        return None
    return "the verdict changes with the level: " + ", ".join(
        f"{row['verdict']} at share {share(row['share'])}" for row in contrast["by_level"][measure])


def routing_sentence(entry: dict, routed_share: float) -> str:
    """Whether an arm that claims routing routes, with its two end-of-run shares."""
    shares = (f"held-out fact statements {fmt(entry['knowledge'], 3)} to the knowledge group and task prompts "
              f"{fmt(entry['task'], 3)} to the task group ({share(routed_share)} needed)")
    if entry["routed"]:
        return f"{entry['arm']}'s router routed: it sent {shares}"
    return f"{entry['arm']}'s router did not route: it sent {shares}"


def seeds_sentence(difference: Interval) -> str | None:
    """What the interval cannot hold: training variance with fewer than two seeds per arm, the
    pairing of seeds where the arms ran different ones (None where seeds are paired and several)."""
    seeds = difference.get("seeds")
    if seeds is None:
        return None
    if seeds == 1:
        return "one seed: no training variance in this interval"
    if seeds == 0:
        return "no seed common to the arms: no training variance in this interval"
    if not difference.get("paired"):
        return "the arms ran different seeds: the interval treats their runs as unpaired"
    return None


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def contrast_sentence(contrast: dict, results: dict) -> str:
    """A contrast's paragraph: the primary measure first, then the other verdict measures, each with
    the level change where there is one; then routing the contrast does not test, then seeds."""
    measures = results["measures"]
    head = (f"**{contrast['name']}** ({_side(contrast['a'], results)} minus {_side(contrast['b'], results)} at "
            f"share {share(contrast['share'])} of the common skill, {fmt(contrast['at_skill'], 3)} nats of skill)")
    parts = []
    for measure in [measures["primary"], *(m for m in measures["verdict"] if m != measures["primary"])]:
        said = measure_clause(contrast, measure, results)
        changes = level_clause(contrast, measure)
        parts.append(f"{_capital(SHORT[measure])}: {said}" + (f"; {changes}" if changes else "") + ".")
    routed_share = results["constants"]["routed_share"]
    # an arm's name starts these sentences as it is spelled: names are identifiers
    parts += [routing_sentence(e, routed_share) + ("." if e["routed"] else ", so this contrast does not test "
                                                                           "routing by type.")
              for e in contrast["routing"]]
    seeds = seeds_sentence(contrast[measures["primary"]])
    if seeds:
        parts.append(_capital(seeds) + ".")
    return f"{head}: " + " ".join(parts)


def regime_sentence(results: dict) -> str:
    """Which arms lost knowledge by the end of their runs in the primary measure, and whether the
    adapters lost anything at all: where none did, their contrasts have nothing to keep."""
    primary, regime, arms = results["measures"]["primary"], results["regime"], results["arms"]
    label, (_, unit, digits) = SHORT[primary], UNITS[primary]
    losers = [name for name, r in regime["arms"].items() if r["lost"].get(primary)]
    if losers:
        said = "By the end of its run, " + "; ".join(
            f"{name} lost knowledge ({label}: {ci(arms[name]['end'][primary], digits)} {unit})" for name in losers)
    else:
        said = f"No arm lost knowledge by the end of its run ({label}: no end interval lies below 0)"
    full = regime.get("full")
    if full and full not in losers:
        said += (f"; full fine-tuning ({full}) {'did not' if losers else 'ended at'}: "
                 f"{ci(arms[full]['end'][primary], digits)} {unit}")
    adapters = [name for name in regime["arms"] if arms[name]["method"] != "full"]
    if adapters and not any(any(regime["arms"][name]["lost"].values()) for name in adapters):
        *rest, last = [SHORT[m] for m in results["measures"]["verdict"]]
        verdict = f"{', '.join(rest)} or {last}" if rest else last
        said += (f". No adapter arm lost knowledge by the end of its run in {verdict}, so the "
                 f"contrasts between adapters can only read \"{NOTHING_TO_KEEP}\" here, short of an adapter that "
                 "lost knowledge on its way and regained it by the end")
    return said + "."


def detectable_sentence(results: dict) -> str:
    """The size a contrast would need to be detected, per verdict measure (80 % power, two-sided 5 %)."""
    d, c, p = results["detectable"], results["constants"], results["probe"]
    *rest, last = [f"{fmt(d[m], UNITS[m][2])} {UNITS[m][1]} of {SHORT[m]}" for m in results["measures"]["verdict"]]
    sizes = f"{', '.join(rest)} or {last}" if rest else last
    return (f"With {fmt(p['facts'])} facts and {fmt(p['task_items'])} task items, a difference of about {sizes} "
            f"would be detected with {fmt(c['power_percent'])} % power ({fmt(c['detectable_stderrs'], 1)} "
            "standard errors of the median contrast at the verdict level).")
