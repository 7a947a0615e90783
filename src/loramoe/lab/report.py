"""The lab's report from ``results.json`` alone: ``report.md`` with PNG figures beside it
(:mod:`loramoe.lab.figures`), and ``report.html``, the same report with the figures embedded (one
file to mail around). Every sentence of the verdict paragraph comes from :mod:`loramoe.lab.verdicts`;
every number printed is one of results.json. HTML with python-markdown.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import markdown

from loramoe.fileio import atomic_write_text
from loramoe.lab.figures import figures
from loramoe.lab.verdicts import (
    UNITS,
    ci,
    contrast_sentence,
    detectable_sentence,
    fmt,
    regime_sentence,
    routing_sentence,
    share,
    signed,
)

# fmt and signed stay importable from here: tests/lab_checks.py formats results.json with them
__all__ = ["fmt", "paragraph", "render", "signed", "to_html"]

HEADERS = " | ".join(f"{label} ({unit})" for label, unit, _ in UNITS.values())


def _cells(results_by_measure: dict) -> str:
    return " | ".join(ci(results_by_measure[m], digits) for m, (_, _, digits) in UNITS.items())


def paragraph(results: dict) -> str:
    """The verdict, computed from the numbers: the regime, every named contrast, the power."""
    return "\n\n".join([regime_sentence(results), *(contrast_sentence(c, results) for c in results["contrasts"]),
                         detectable_sentence(results)])


def _design(results: dict) -> list[str]:
    lines = ["## Design", "", ("Contrasts, named in the settings: each is a minus b in knowledge at equal task skill; "
             "a side is an arm or a frontier (the best of an arm set at each skill)."), "",
             "| contrast | kind | a | b | question |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c['name']} | {c['kind']} | {c['a']} | {c['b']} | {c['question']} |" for c in results["contrasts"]]
    lines += ["", "| arm | method | lr | seeds | scored at steps | trainable parameters | train s per run |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, arm in results["arms"].items():
        lines.append(f"| {name} | {arm['method']} | {fmt(arm['lr'], 4)} | {' / '.join(map(fmt, arm['seeds']))} | "
                     f"{' / '.join(map(fmt, arm['path']['steps']))} | {fmt(arm['trainable_parameters'])} | "
                     f"{fmt(arm['train_seconds'])} |")
    p, mix, base = results["probe"], results["mix"], results["base"]
    lines += ["", (f"The mix: {fmt(mix['total'])} records, {fmt(mix['knowledge'])} of them knowledge QA. The probe: "
              f"{fmt(p['facts'])} held-out facts "
              f"({'; '.join(f'{r} {fmt(n)}' for r, n in p['facts_per_relation'].items())}: "
              f"{fmt(p['removed_by_overlap'])} removed as given away by the mix), each a statement to complete and a "
              f"choice among {fmt(p['choices'])} answers of its relation; {fmt(p['task_items'])} task items "
              f"({'; '.join(f'{t} {fmt(n)}' for t, n in p['task_items_per_task'].items())}); {fmt(p['chat_items'])} "
              f"facts asked in chat and {fmt(p['generation_items'])} task items answered freely at the end. The "
              "base model: " + ", ".join(f"{label} {fmt(base[m], digits)} {'%' if unit == 'points' else unit}"
                                          for m, (label, unit, digits) in UNITS.items())
              + f", task loss {fmt(base['task_loss'], 3)} nats.")]
    return lines


def _frontiers(results: dict, image: str) -> list[str]:
    lines = ["## Frontiers", ""]
    if results["frontiers"]:
        lines += [("A frontier is the best knowledge any of its arms keeps at each skill (the upper envelope of "
                   "their paths); the figure draws it thick, its arms' paths thin."), "",
                  "| frontier | method | arms | lr |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {s['method']} | {', '.join(s['variants'])} | "
                  f"{' / '.join(fmt(lr, 4) for lr in s['lrs'])} |" for name, s in results["frontiers"].items()]
    else:
        lines.append("These settings name no frontier: each arm is drawn as its own, one learning rate per arm, "
                     "so the figure shows paths, not envelopes over learning rates.")
    return lines + ["", f"![frontiers]({image})"]


def _level(results: dict, i: int) -> str:
    said = share(results["level_shares"][i])
    return f"**{said}** (verdicts)" if i == results["verdict_level"] else said


def _contrast_level(results: dict, c: dict, measure: str, i: int) -> dict:
    rows = c["by_level"].get(measure)
    return rows[i] if rows else results["equal_skill"][measure][i]["contrasts"][f"{c['a']} vs {c['b']}"]


def _equal_skill(results: dict) -> list[str]:
    vl, verdict = results["verdict_level"], results["measures"]["verdict"]
    lines = ["## Knowledge at equal task skill", "",
             (f"Levels: shares {', '.join(share(s) for s in results['level_shares'])} of the highest skill every "
              f"arm reaches ({fmt(results['common_skill'], 3)} nats), i.e. "
              f"{', '.join(fmt(s, 3) for s in results['levels'])} nats; the verdicts read share "
              f"{share(results['level_shares'][vl])} ({fmt(results['levels'][vl], 3)} nats). Each cell: estimate "
              f"[{fmt(results['constants']['interval_percent'])} % interval]."), "",
             f"| contrast | share | skill (nats) | {HEADERS} | verdict ({' / '.join(verdict)}) |",
             "|" + " --- |" * (4 + len(UNITS))]
    for c in results["contrasts"]:
        for i, level in enumerate(results["levels"]):
            cells = _cells({m: _contrast_level(results, c, m, i) for m in UNITS})
            words = " / ".join(c["by_level"][m][i]["verdict"] for m in verdict)
            lines.append(f"| {c['name']} | {_level(results, i)} | {fmt(level, 3)} | {cells} | {words} |")
    eq = results["equal_skill"]
    lines += ["", "Each arm's (and frontier's) change against the base model where its path first reaches each level:",
              "", f"| arm | share | skill (nats) | {HEADERS} |", "|" + " --- |" * (3 + len(UNITS))]
    units = [("arms", n) for n in results["arms"]] + [("sets", n) for n in results["frontiers"]]
    for kind, name in units:
        for i, level in enumerate(results["levels"]):
            cells = _cells({m: eq[m][i][kind][name] for m in UNITS})
            lines.append(f"| {name} | {_level(results, i)} | {fmt(level, 3)} | {cells} |")
    lines += ["", ("Each arm's worst change from where it first reaches each level to the end of its run "
                   "(forgetting after the level):"), "",
              f"| arm | share | skill (nats) | {HEADERS} |", "|" + " --- |" * (3 + len(UNITS))]
    for name in results["arms"]:
        for i, level in enumerate(results["levels"]):
            cells = _cells({m: eq[m][i]["arms"][name]["worst_after"] for m in UNITS})
            lines.append(f"| {name} | {_level(results, i)} | {fmt(level, 3)} | {cells} |")
    return lines


def _ends(results: dict) -> list[str]:
    lines = ["## At the end of each run", "", ("Changes against the base model, paired by item, averaged over seeds "
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
              "from facts lost, and so is a fact lost in chat that multiple choice still gets right (the model "
              "still picks its gold answer among the choices)."), "",
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
    const = results["constants"]
    threshold = share(const["routed_share"])
    uniform = next(iter(next(iter(routed.values()))["uniform_share"].values()))
    lines = ["## Router: where each type of item is sent", "",
             ("The gate share each type of item (held-out fact statements, task prompts) sends to its own expert "
              "group, averaged over layers and seeds; with no preference it equals the group's share of the experts "
              f"({fmt(uniform, 3)}). The localized balancing constraint's loss is lowest at "
              f"{fmt(const['lbc_optimum'], 3)} of a sample's gate mass on its own group (balance delta "
              f"{share(const['balance_delta'])}); the routing objective's at its target. An arm that claims routing "
              f"(a routing objective) routes where both shares end at {threshold} or more."), "",
             ("The same held-out facts are also asked as training asks (the chat question): the router trained on that "
              "form, so the two knowledge shares side by side say whether it reads the fact or the question's form."),
             "",
             ("| arm | claims routing | target | fact statements to the knowledge group, end | the facts as questions, "
              f"end | task prompts to the task group, end | routed (both {threshold} or more) |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    flags = []
    for name, r in routed.items():
        end = r["end_share"]
        state = "not claimed" if r["routed"] is None else ("yes" if r["routed"] else "no")
        lines.append(f"| {name} | {'yes' if r['claims_routing'] else 'no'} | {fmt(r['target'], 3)} | "
                     f"{fmt(end.get('knowledge'), 3)} | {fmt(end.get('questions'), 3)} | {fmt(end.get('task'), 3)} | "
                     f"{state} |")
        if r["routed"] is False:
            entry = {"arm": name, "knowledge": end.get("knowledge"), "task": end.get("task"), "routed": False}
            flags.append(f"{routing_sentence(entry, const['routed_share'])}, so no contrast with it tests routing "
                         "by type.")
    lines += ["", *flags, "", "| arm | step | knowledge items to knowledge group | task items to task group |",
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
    lines += _frontiers(results, images["frontiers"]) + [""]
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
