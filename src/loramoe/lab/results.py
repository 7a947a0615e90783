"""From the runs' scored points to ``results.json``: every number the report prints, and nothing the
report computes on its own.

Measures (per item, so every comparison is paired by item):

- knowledge (:mod:`loramoe.lab.measures`): ``gold_logprob`` and ``gold_share`` in nats, and
  multiple choice summed (``mc``) and length-normalised (``mc_norm``), right (100) or wrong (0): the
  mean is an accuracy in percent. Each as a change against the base model.
- skill: the base model's task loss minus the model's (nats per token of the reference answers).

Knowledge at equal skill (:func:`loramoe.lab.stats.equal_skill`) is read at the levels
``score.levels`` of the highest skill every arm reaches, for every arm, frontier and named contrast;
the verdicts use ``score.verdict_level``, chosen before the numbers, and read each difference's
interval together with each arm's own change (:mod:`loramoe.lab.verdicts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loramoe.adapters import LoraMoEConfig
from loramoe.errors import UsageError
from loramoe.lab.config import LabConfig
from loramoe.lab.measures import Lengths, fact_measures, length_table
from loramoe.lab.probe import Probe
from loramoe.lab.stats import ArmData, Draws, arm_paths, common_skill, end_change, equal_skill
from loramoe.lab.verdicts import classify, lost
from loramoe.metrics import contains_answer, per_item

MEASURES = ("gold_share", "mc", "mc_norm", "gold_logprob")
VERDICT_MEASURES = ("gold_share", "mc", "mc_norm")
"""The measures verdicts are given in: the likelihood normalised over the choices (primary) and
multiple choice summed and length-normalised; the absolute ``gold_logprob`` is a secondary column
(moving probability to continuations outside the choices lowers it without losing the fact)."""
ROUTED_SHARE = 0.7
"""A routing arm routes when held-out fact statements send at least this gate share to the
knowledge group and task prompts to the task group, at the end of its run."""
SENTENCE_WORDS = 4
"""An answer of at least this many words is a sentence ("The capital of Peru is Lima."), else short."""
DETECTABLE_STDERRS = 2.8
"""A difference of this many standard errors is found by a two-sided 5 % test with 80 % power."""


def arm_data(base: dict[str, Any], seeds: Sequence[list[dict[str, Any]]], lengths: Lengths,
             seed_ids: Sequence[int] = ()) -> ArmData:
    """One arm's per-item arrays, the base point first in every seed's path; ``seed_ids`` are the
    training seeds in that order (seed k of every arm shares its data order: contrasts pair them)."""
    paths = [[base, *points] for points in seeds]
    steps = [p["step"] for p in paths[0]]
    if any([p["step"] for p in path] != steps for path in paths):
        raise UsageError("the seeds of one arm were scored at different steps")
    measured = [[fact_measures(p, lengths) for p in path] for path in paths]
    knowledge = {m: np.stack([np.stack([k[m] for k in path]) for path in measured]) for m in MEASURES}
    loss = np.stack([np.stack([np.array(p["task_loss"]) for p in path]) for path in paths])
    return ArmData(steps, knowledge, loss, list(seed_ids))


def _chat(probe: Probe, base: dict[str, Any], finals: list[dict[str, Any]], final_mc: np.ndarray, draws: Draws,
          name: str) -> dict[str, Any]:
    """What a user sees: greedy chat answers to the chat subset, facts lost apart from format;
    ``final_mc`` (seeds, facts) is multiple choice at the end of each seed's run."""
    facts = [probe.facts[i] for i in probe.chat]
    right = np.array([[100.0 * contains_answer(a, f.aliases) for a, f in zip(p["chat"], facts)] for p in finals])
    base_right = np.array([100.0 * contains_answer(a, f.aliases) for a, f in zip(base["chat"], facts)])
    base_long = [len(a.split()) >= SENTENCE_WORDS for a in base["chat"]]
    lost = changed = lost_changed = lost_probe_right = gained = 0
    for point, hits, mc in zip(finals, right, final_mc):
        probe_right = mc[probe.chat] > 0
        for j, answer in enumerate(point["chat"]):
            format_changed = (len(answer.split()) >= SENTENCE_WORDS) != base_long[j]
            changed += format_changed
            if base_right[j] and not hits[j]:
                lost += 1
                lost_changed += format_changed
                lost_probe_right += bool(probe_right[j])
            gained += bool(hits[j] and not base_right[j])
    answers = right.size
    return {"accuracy": float(right.mean()), "base_accuracy": float(base_right.mean()),
            "change": end_change(right, base_right, draws.facts, draws),
            "answers": answers, "format_changed": 100.0 * changed / answers, "lost": lost, "gained": gained,
            "lost_with_format_change": lost_changed, "lost_but_probe_right": lost_probe_right,
            "base_sentence_answers": 100.0 * sum(base_long) / len(base_long)}


def _generation_scores(probe: Probe, answers: list[str]) -> np.ndarray:
    items = [probe.tasks[i] for i in probe.generation]
    return np.array([per_item(t.metric, a, t.example)[t.main] for t, a in zip(items, answers)])


def _router(points_by_seed: list[list[dict[str, Any]]], groups: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    """Gate share per item type to its own group, along the run and by depth at its end (and of the
    held-out facts asked as training asks, ``questions``), and whether an arm that claims routing
    (a routing objective) routes at its end: fact statements and task prompts both to their own group."""
    own = [t for t in ("knowledge", "task") if t in groups]
    steps = [p["step"] for p in points_by_seed[0]]
    along = {t: [float(np.mean([np.mean(seed[i]["router"][t][t]) for seed in points_by_seed]))
                 for i in range(len(steps))] for t in own}
    per_layer = {t: {g: np.mean([seed[-1]["router"][t][g] for seed in points_by_seed], axis=0).tolist()
                     for g in groups} for t in own}
    depth = {t: [float(np.mean(part))
                 for part in np.array_split(np.array(per_layer[t][t]), min(3, len(per_layer[t][t])))]
             for t in own}
    end_share = {t: along[t][-1] for t in own}
    if "knowledge" in groups and "questions" in points_by_seed[0][-1]["router"]:
        end_share["questions"] = float(np.mean([np.mean(seed[-1]["router"]["questions"]["knowledge"])
                                                for seed in points_by_seed]))
    claims = float(settings.get("route_weight") or 0.0) > 0
    routed = all(end_share.get(t, 0.0) >= ROUTED_SHARE for t in ("knowledge", "task")) if claims else None
    return {"steps": steps, "own_group_share": along, "own_share_by_depth": depth, "final_per_layer": per_layer,
            "uniform_share": {g: 1.0 / len(groups) for g in groups}, "end_share": end_share,
            "claims_routing": claims, "target": settings.get("route_target") if claims else None, "routed": routed}


def _contrast(c: Any, equal: dict, verdict_level: int, arms: dict[str, Any]) -> dict[str, Any]:
    """A named contrast: every measure at the verdict level and at every level, each with its
    verdict (:func:`loramoe.lab.verdicts.classify`), and the routing of its arms."""
    key = f"{c.a} vs {c.b}"

    def change(row: dict, side: str) -> dict:
        return row["arms"].get(side) or row["sets"][side]

    by_level = {}
    for m in MEASURES:
        by_level[m] = [{"share": row["share"], "skill": row["skill"], **row["contrasts"][key],
                        "verdict": classify(row["contrasts"][key], change(row, c.a), change(row, c.b)),
                        "a_change": change(row, c.a), "b_change": change(row, c.b)} for row in equal[m]]
    headline = {m: {k: v for k, v in by_level[m][verdict_level].items() if k not in ("share", "skill")}
                for m in MEASURES}
    members = [n for side in (c.a, c.b) for n in ([side] if side in arms else [])]
    routing = [{"arm": n, "knowledge": arms[n]["router"]["end_share"].get("knowledge"),
                "task": arms[n]["router"]["end_share"].get("task"),
                "questions": arms[n]["router"]["end_share"].get("questions"), "routed": arms[n]["router"]["routed"]}
               for n in members if arms[n].get("router", {}).get("claims_routing")]
    return {"name": c.name, "a": c.a, "b": c.b, "question": c.question,
            "kind": "arms" if c.a in arms and c.b in arms else "frontiers",
            "at_skill": by_level[MEASURES[0]][verdict_level]["skill"],
            "share": by_level[MEASURES[0]][verdict_level]["share"], **headline, "by_level": by_level,
            "verdict_changes_with_level": {m: len({row["verdict"] for row in by_level[m]}) > 1 for m in MEASURES},
            "routing": routing}


def build(config: LabConfig, probe: Probe, base: dict[str, Any], records: list[dict[str, Any]],
          points: dict[str, list[dict[str, Any]]], lengths: Lengths) -> dict[str, Any]:
    """``results.json`` but its ``lab`` header, from the base point, the runs' ``lab_run.json``
    records and their points (by run name), and the candidates' lengths."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_arm.setdefault(record["variant"], []).append(record)
    arms = {name: arm_data(base, [points[r["name"]] for r in rs], lengths, [r["seed"] for r in rs])
            for name, rs in by_arm.items()}
    n_facts, n_tasks = len(probe.facts), len(probe.tasks)
    draws = Draws.make(n_facts, n_tasks, config.score.bootstrap, config.seed)
    small = Draws.make(max(len(probe.chat), 1), max(len(probe.generation), 1), config.score.bootstrap, config.seed + 1)
    contrasts = [(c.a, c.b) for c in config.contrasts]
    shares = list(config.score.levels)
    equal = equal_skill(arms, config.frontiers, contrasts, list(MEASURES), shares, draws)
    levels = [row["skill"] for row in equal[MEASURES[0]]]
    verdict_level = shares.index(config.score.verdict_level)
    base_know = fact_measures(base, lengths)
    base_generation = _generation_scores(probe, base["generation"])
    out_arms = {}
    for name, rs in by_arm.items():
        arm, finals = arms[name], [points[r["name"]][-1] for r in rs]
        skill_paths = arm.task_loss[:, :1].mean(-1) - arm.task_loss.mean(-1)  # (seeds, points)
        path = {"steps": arm.steps, "skill": skill_paths.mean(0).tolist(),
                **{m: (arm.knowledge[m].mean(-1) - arm.knowledge[m][:, :1].mean(-1)).mean(0).tolist()
                   for m in MEASURES},
                "per_seed": {str(r["seed"]): {"skill": skill_paths[i].tolist(),
                                              **{m: (arm.knowledge[m][i].mean(-1)
                                                     - arm.knowledge[m][i, 0].mean()).tolist()
                                                 for m in MEASURES}} for i, r in enumerate(rs)}}
        end = {m: end_change(arm.knowledge[m][:, -1], base_know[m], draws.facts, draws) for m in MEASURES}
        end["skill"] = end_change(-arm.task_loss[:, -1], -np.array(base["task_loss"]), draws.tasks, draws)
        generation = np.stack([_generation_scores(probe, f["generation"]) for f in finals])
        settings = config.variants[name]
        groups = list((rs[0]["train"].get("adapter") or {}).get("groups") or {})
        out_arms[name] = {
            "method": settings["method"], "lr": settings.get("lr"), "seeds": [r["seed"] for r in rs],
            "runs": [r["name"] for r in rs], "trainable_parameters": rs[0]["train"]["trainable_parameters"],
            "train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
            "score_seconds": float(np.mean([r["score_seconds"] for r in rs])),
            "path": path, "end": end,
            "per_relation_mc": _per_relation(probe, arm.knowledge["mc"][:, -1].mean(0)),
            "chat": _chat(probe, base, finals, arm.knowledge["mc"][:, -1], small, name),
            "generation": {"score": float(generation.mean()), "base_score": float(base_generation.mean()),
                           "change": end_change(generation, base_generation, small.tasks, small)},
        }
        if groups and "router" in finals[0]:
            out_arms[name]["router"] = _router([points[r["name"]] for r in rs], groups, settings)
    named = [_contrast(c, equal, verdict_level, out_arms) for c in config.contrasts]
    delta = next((float(v.get("balance_delta", LoraMoEConfig.balance_delta)) for v in config.variants.values()
                  if v["method"] == "loramoe"), LoraMoEConfig.balance_delta)
    return {
        "probe": {"facts": n_facts, "facts_per_relation": {r: sum(f.example.relation == r for f in probe.facts)
                                                           for r in probe.relations},
                  "removed_by_overlap": probe.removed_by_overlap, "choices": config.score.choices,
                  "task_items": n_tasks, "task_items_per_task": {t: sum(i.task == t for i in probe.tasks)
                                                                 for t in probe.task_names},
                  "chat_items": len(probe.chat), "generation_items": len(probe.generation)},
        "base": {**{m: float(base_know[m].mean()) for m in MEASURES},
                 "task_loss": float(np.mean(base["task_loss"])), "generation": float(base_generation.mean()),
                 "per_relation_mc": _per_relation(probe, base_know["mc"])},
        "length_only": length_table(probe, base, lengths),
        "measures": {"primary": MEASURES[0], "verdict": list(VERDICT_MEASURES), "secondary": ["gold_logprob"]},
        "common_skill": float(common_skill({n: arm_paths(a, MEASURES[0], None, None)[0] for n, a in arms.items()})[0]),
        "levels": levels, "level_shares": shares,
        "verdict_level": verdict_level,
        "frontiers": {name: {"variants": list(members), "method": config.variants[members[0]]["method"],
                             "lrs": [config.variants[m].get("lr") for m in members]}
                      for name, members in config.frontiers.items()},
        "arms": out_arms, "equal_skill": equal, "contrasts": named,
        "regime": _regime(out_arms),
        "detectable": _detectable(named),
        "constants": {"interval_percent": 95, "power_percent": 80, "detectable_stderrs": DETECTABLE_STDERRS,
                      "routed_share": ROUTED_SHARE,
                      "sentence_words": SENTENCE_WORDS, "balance_delta": delta, "lbc_optimum": (1 - delta) / 2},
    }


def _per_relation(probe: Probe, mc: np.ndarray) -> dict[str, float]:
    relations = np.array([f.example.relation for f in probe.facts])
    return {r: float(mc[relations == r].mean()) for r in probe.relations}


def _regime(arms: dict[str, Any]) -> dict[str, Any]:
    """Which arms lost knowledge by the end of their runs (the end change's interval below 0), per
    verdict measure: contrasts between arms that lost nothing have nothing to keep."""
    full = next((name for name, arm in arms.items() if arm["method"] == "full"), None)
    return {"full": full, "arms": {name: {"lost": {m: lost(arm["end"][m]) for m in VERDICT_MEASURES}}
                                   for name, arm in arms.items()}}


def _detectable(contrasts: list[dict[str, Any]]) -> dict[str, float | None]:
    """The difference the headline contrasts would detect with 80 % power by a two-sided 5 % test,
    about 2.8 of their median standard error."""
    out = {}
    for m in MEASURES:
        errors = [c[m]["stderr"] for c in contrasts if c[m]["stderr"] is not None]
        out[m] = float(DETECTABLE_STDERRS * np.median(errors)) if errors else None
    return out
