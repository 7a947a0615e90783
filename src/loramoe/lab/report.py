"""The lab's report from ``results.json`` alone: ``report.md`` with PNG figures beside it, and
``report.html``, the same report with the figures embedded (one file to mail around).

Figures: each arm's path in the knowledge-skill plane (every knowledge measure, seeds drawn thin,
the equal-skill levels dotted), and the LoRAMoE routers' own-group share per layer. Plots with
matplotlib, HTML with python-markdown.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import markdown

from loramoe.fileio import atomic_write_text
from loramoe.plots import pyplot, save_figure


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


UNITS = {"gold_logprob": ("gold log-probability", "nats", 3), "mc": ("multiple choice", "points", 1),
         "gold_share": ("gold log-probability normalised over the choices", "nats", 3),
         "mc_norm": ("multiple choice, length-normalised (lm-eval acc_norm)", "points", 1)}
"""Per knowledge measure: its name in the report, its unit and the digits it is printed with."""
HEADERS = " | ".join(f"{label} ({unit})" for label, unit, _ in UNITS.values())


def _cells(results_by_measure: dict[str, dict[str, Any]]) -> str:
    return " | ".join(ci(results_by_measure[m], digits) for m, (_, _, digits) in UNITS.items())


def ci(result: dict[str, Any], digits: int) -> str:
    """``+0.123 [-0.010, +0.250]``: an estimate and its 95 % interval."""
    if result["low"] is None:
        return f"{signed(result['estimate'], digits)} [n/a]"
    return f"{signed(result['estimate'], digits)} [{signed(result['low'], digits)}, {signed(result['high'], digits)}]"


def _trajectories(results: dict, path: Path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.6), layout="constrained")
    for ax, measure in zip(axes.flat, UNITS):
        label, unit, _ = UNITS[measure]
        for name, arm in results["arms"].items():
            p = arm["path"]
            seeds = len(arm["seeds"])
            line, = ax.plot(p["skill"], p[measure], marker="o",
                            label=f"{name} ({seeds} seed{'s' if seeds > 1 else ''})")
            if len(p["per_seed"]) > 1:
                for seed in p["per_seed"].values():
                    ax.plot(seed["skill"], seed[measure], color=line.get_color(), alpha=0.3, linewidth=0.8)
        for level in results["levels"]:
            ax.axvline(level, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("task skill: base task loss minus the model's (nats per token)")
        ax.set_ylabel(f"change against the base ({unit})")
        ax.set_title(label, fontsize=10)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Knowledge along training (dotted: the equal-skill levels)", fontsize=11)
    save_figure(fig, path)
    return path.name


def _router(results: dict, path: Path) -> str | None:
    routed = {name: arm["router"] for name, arm in results["arms"].items() if "router" in arm}
    if not routed:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(routed), figsize=(4.5 * len(routed), 3.4), squeeze=False, layout="constrained")
    for ax, (name, router) in zip(axes[0], routed.items()):
        for kind, per_group in router["final_per_layer"].items():
            ax.plot(range(len(per_group[kind])), per_group[kind], marker=".", label=f"{kind} items to the {kind} group")
        uniform = next(iter(router["uniform_share"].values()))
        ax.axhline(uniform, color="grey", linestyle=":", linewidth=1, label="no preference")
        ax.set_xlabel("layer")
        ax.set_ylabel("gate share to its own group")
        ax.set_title(f"{name}, end of run", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return path.name


def figures(results: dict, folder: Path) -> dict[str, str]:
    out = {"trajectories": _trajectories(results, folder / "trajectories.png")}
    router = _router(results, folder / "router_by_layer.png")
    if router:
        out["router"] = router
    return out


def _verdict_words(verdict: str, a: str, b: str, measure: str) -> str:
    if verdict == "higher":
        return f"{a} keeps more ({UNITS[measure][0]})"
    if verdict == "lower":
        return f"{a} keeps less ({UNITS[measure][0]})"
    return verdict


def paragraph(results: dict) -> str:
    """The verdict, computed from the numbers: the regime, then every named contrast."""
    parts = []
    regime = results.get("regime")
    if regime:
        forgets = [m for m, yes in regime["forgets"].items() if yes]
        parts.append(f"Full fine-tuning ({regime['arm']}) at the end of its run changed the gold answers' "
                     f"log-probability by {ci(regime['gold_logprob'], 3)} nats and multiple choice by "
                     f"{ci(regime['mc'], 1)} points ({fmt(results['constants']['interval_percent'])} % intervals): "
                     + ("it forgets facts here, so the contrasts below are measured where forgetting happens."
                        if forgets else "its loss is not outside its interval, so this setting does not reach "
                        "the regime where fine-tuning forgets facts; read the contrasts below with that in mind."))
    for c in results["contrasts"]:
        said = "; ".join(f"{UNITS[m][0]} {ci(c[m], UNITS[m][2])} {UNITS[m][1]}: "
                         f"{_verdict_words(c[m]['verdict'], c['a'], c['b'], m)}" for m in ("gold_logprob", "mc"))
        parts.append(f"**{c['name']}** ({c['a']} minus {c['b']}, at a task skill of {fmt(c['at_skill'], 3)} nats): "
                     f"{said}.")
    d = results["detectable"]
    parts.append(f"With {fmt(results['probe']['facts'])} facts and {fmt(results['probe']['task_items'])} task items, "
                 f"differences smaller than about {fmt(d['gold_logprob'], 3)} nats of log-probability or "
                 f"{fmt(d['mc'], 1)} points of multiple choice would go undetected here "
                 f"({fmt(results['constants']['detectable_stderrs'], 1)} standard errors of the median contrast).")
    return "\n\n".join(parts)


def _design(results: dict) -> list[str]:
    lines = ["## Design", "", ("Contrasts, named before the numbers: each is arm a minus arm b in knowledge at "
             "equal task skill."), "", "| contrast | a | b | question |", "| --- | --- | --- | --- |"]
    lines += [f"| {c['name']} | {c['a']} | {c['b']} | {c['question']} |" for c in results["contrasts"]]
    lines += ["", "| arm | method | lr | seeds | scored at steps | trainable parameters | train s per run |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, arm in results["arms"].items():
        lines.append(f"| {name} | {arm['method']} | {fmt(arm['lr'], 4)} | {' / '.join(map(fmt, arm['seeds']))} | "
                     f"{' / '.join(map(fmt, arm['path']['steps']))} | {fmt(arm['trainable_parameters'])} | "
                     f"{fmt(arm['train_seconds'])} |")
    p, m = results["probe"], results["mix"]
    lines += ["", (f"The mix: {fmt(m['total'])} records, {fmt(m['knowledge'])} of them knowledge QA. The probe: "
              f"{fmt(p['facts'])} held-out facts "
              f"({'; '.join(f'{r} {fmt(n)}' for r, n in p['facts_per_relation'].items())}: "
              f"{fmt(p['removed_by_overlap'])} removed as given away by the mix), each a statement to complete and a "
              f"choice among {fmt(p['choices'])} answers of its relation; {fmt(p['task_items'])} task items "
              f"({'; '.join(f'{t} {fmt(n)}' for t, n in p['task_items_per_task'].items())}); {fmt(p['chat_items'])} "
              f"facts asked in chat and {fmt(p['generation_items'])} task items answered freely at the end. The "
              f"base model: multiple choice {fmt(results['base']['mc'])} %, mean gold log-probability "
              f"{fmt(results['base']['gold_logprob'], 3)} nats, "
              f"task loss {fmt(results['base']['task_loss'], 3)} nats.")]
    return lines


def _equal_skill(results: dict) -> list[str]:
    lines = ["## Knowledge at equal task skill", "",
             (f"Levels: {', '.join(fmt(s, 3) for s in results['level_shares'])} of the highest skill every arm "
             f"reaches ({fmt(results['common_skill'], 3)} nats), i.e. "
             f"{', '.join(fmt(s, 3) for s in results['levels'])} nats. Each cell: estimate "
             f"[{fmt(results['constants']['interval_percent'])} % interval]."), "",
             f"| contrast | skill (nats) | {HEADERS} |", "|" + " --- |" * (2 + len(UNITS))]
    eq = results["equal_skill"]
    for c in results["contrasts"]:
        key = f"{c['a']} vs {c['b']}"
        for i, level in enumerate(results["levels"]):
            lines.append(f"| {c['name']} | {fmt(level, 3)} | "
                         f"{_cells({m: eq[m][i]['contrasts'][key] for m in UNITS})} |")
    lines += ["", "Each arm's change against the base model at those levels:", "",
              f"| arm | skill (nats) | {HEADERS} |", "|" + " --- |" * (2 + len(UNITS))]
    for name in results["arms"]:
        for i, level in enumerate(results["levels"]):
            lines.append(f"| {name} | {fmt(level, 3)} | {_cells({m: eq[m][i]['arms'][name] for m in UNITS})} |")
    return lines


def _ends(results: dict) -> list[str]:
    lines = ["## At the end of each run", "", ("Changes against the base model, paired by item, seeds pooled "
             f"(estimate [{fmt(results['constants']['interval_percent'])} % interval])."), "",
             (f"| arm | task skill (nats) | {HEADERS} | "
             "chat answers right (points) | task answers, main metric (points) |"),
             "|" + " --- |" * (4 + len(UNITS))]
    for name, arm in results["arms"].items():
        e = arm["end"]
        lines.append(f"| {name} | {ci(e['skill'], 3)} | {_cells(e)} | "
                     f"{ci(arm['chat']['change'], 1)} | {ci(arm['generation']['change'], 1)} |")
    lines += ["", "### What a user sees: chat answers to the held-out facts", "",
              (f"A change of answer format (a sentence of {fmt(results['constants']['sentence_words'])} words or more "
              "against a short answer) is counted apart "
              "from facts lost; a fact lost in chat that multiple choice still gets right was lost to format, "
              "not forgotten."), "",
              ("| arm | right (%) | base right (%) | format changed (%) | facts lost | of them, format changed | "
              "of them, multiple choice still right | facts gained |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, arm in results["arms"].items():
        c = arm["chat"]
        lines.append(f"| {name} | {fmt(c['accuracy'])} | {fmt(c['base_accuracy'])} | {fmt(c['format_changed'])} | "
                     f"{fmt(c['lost'])} | {fmt(c['lost_with_format_change'])} | {fmt(c['lost_but_probe_right'])} | "
                     f"{fmt(c['gained'])} |")
    relations = list(results["base"]["per_relation_mc"])
    lines += ["", "### Multiple choice per relation at the end (%)", "", "| model | " + " | ".join(relations) + " |",
              "|" + " --- |" * (1 + len(relations)), "| base model | " +
              " | ".join(fmt(v) for v in results["base"]["per_relation_mc"].values()) + " |"]
    lines += [f"| {name} | " + " | ".join(fmt(arm["per_relation_mc"][r]) for r in relations) + " |"
              for name, arm in results["arms"].items()]
    return lines


def _length_only(results: dict) -> list[str]:
    length = results["length_only"]
    lines = ["## Does length alone predict the choice? (base model)", "",
             ("Multiple choice sums each candidate's token log-probabilities, which favours candidates of "
              "fewer tokens. *Length alone* scores every candidate by its token count only, fewest first, ties "
              "shared evenly (a tie of three with the gold answer counts a third); next to it the base model's own "
              "accuracy, summed and length-normalised (each sum divided by the answer's characters, as lm-eval's "
              "acc_norm), and how often a length-only pick is the base model's own. Where length alone comes close "
              f"to the base model, length could make the choice (chance: {fmt(length['chance'])} %)."), "",
             ("| relation | facts | tokens: gold / others | characters: gold / others | length alone right (%) | "
              "base right, summed (%) | base right, length-normalised (%) | base picks the length-only answer (%) |"),
             "|" + " --- |" * 8]
    for relation, row in [*length["per_relation"].items(), ("all", length["all"])]:
        lines.append(f"| {relation} | {fmt(row['facts'])} | {fmt(row['gold_tokens'])} / "
                     f"{fmt(row['distractor_tokens'])} | {fmt(row['gold_chars'])} / {fmt(row['distractor_chars'])} | "
                     f"{fmt(row['length_only_mc'])} | {fmt(row['base_mc'])} | {fmt(row['base_mc_norm'])} | "
                     f"{fmt(row['base_picks_length_only'])} |")
    return lines


def _routers(results: dict) -> list[str]:
    routed = {name: arm["router"] for name, arm in results["arms"].items() if "router" in arm}
    if not routed:
        return []
    lines = ["## Router: does any specialisation happen?", "",
             ("The gate share each type of item (held-out fact statements, task prompts) sends to its own expert "
             "group, averaged over layers and seeds, at each scored step; with no preference it equals the group's "
             "share of the experts. The localized balancing constraint's optimum is half of one minus delta of the "
             "mass on "
             "a sample's own group (0.450 at delta 0.1), slightly *against* specialisation; the routing objective's "
             "is its target."), "", "| arm | step | knowledge items to knowledge group | task items to task group |",
             "| --- | --- | --- | --- |"]
    for name, router in routed.items():
        own = router["own_group_share"]
        for i, step in enumerate(router["steps"]):
            lines.append(f"| {name} | {fmt(step)} | {fmt(own.get('knowledge', [None] * (i + 1))[i], 3)} | "
                         f"{fmt(own.get('task', [None] * (i + 1))[i], 3)} |")
    lines += ["", "By depth at the end (early / middle / late thirds of the layers):", "",
              "| arm | knowledge items to knowledge group | task items to task group |", "| --- | --- | --- |"]
    for name, router in routed.items():
        depth = router["own_share_by_depth"]
        lines.append(f"| {name} | " + " | ".join(" / ".join(fmt(v, 3) for v in depth.get(k, []))
                                                  for k in ("knowledge", "task")) + " |")
    return lines


def render(results: dict, folder: Path) -> tuple[Path, Path]:
    """Writes the figures, report.md and report.html into ``folder``."""
    images = figures(results, folder)
    lab = results["lab"]
    lines = [f"# loramoe lab: does a method keep world knowledge at equal task skill? ({lab['model']})", "",
             paragraph(results), "",
             (f"Settings: {', '.join(lab['sources'])}; {fmt(lab['runs'])} runs in {fmt(lab['seconds'])} s "
             f"(cached runs count the time they took when they ran). Every number here is in results.json."), ""]
    lines += _design(results)
    lines += ["", "## Paths in the knowledge-skill plane", "", f"![trajectories]({images['trajectories']})", ""]
    lines += _equal_skill(results) + [""] + _ends(results) + [""] + _length_only(results) + [""] + _routers(results)
    if "router" in images:
        lines += ["", f"![router]({images['router']})"]
    text = "\n".join(lines) + "\n"
    md_path, html_path = folder / "report.md", folder / "report.html"
    atomic_write_text(md_path, text)
    atomic_write_text(html_path, to_html(text, folder))
    return md_path, html_path


def to_html(text: str, folder: Path) -> str:
    """report.md as one self-contained HTML page: the PNGs inlined as data URIs."""
    body = markdown.markdown(text, extensions=["tables"])

    def inline(match: re.Match) -> str:
        data = base64.b64encode((folder / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"/]+\.png)"', inline, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
             "img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>loramoe lab</title><style>{style}</style>" \
           f"</head><body>{body}</body></html>\n"
