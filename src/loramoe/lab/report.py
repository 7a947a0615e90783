"""The lab's report from ``results.json`` alone: ``report.md`` with PNG figures beside it, and
``report.html``, the same report with the figures embedded (one file to mail around).

Figures: knowledge accuracy and task score against data size per variant (the paper's Figure 1 in
small), the knowledge/skill trade-off, the LoRAMoE router's gate share per expert by sample type,
and parameter drift against data size. Plots with matplotlib, HTML with python-markdown.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import markdown

from loramoe.fileio import atomic_write, atomic_write_text


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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    _plt().close(fig)
    return path.name


def _by_variant(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        if not row["sequential"]:
            out.setdefault(row["variant"], []).append(row)
    return {k: sorted(v, key=lambda r: r["factor"]) for k, v in out.items()}


def _against_size(results: dict, key: str, base_key: str | None, ylabel: str, title: str, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for variant, rows in _by_variant(results["runs"]).items():
        line, = ax.plot([r["factor"] for r in rows], [r[key] for r in rows], marker="o", label=variant)
        for seq in (r for r in results["runs"] if r["sequential"] and r["variant"] == variant):
            ax.plot([seq["factor"]], [seq[key]], marker="*", markersize=12, color=line.get_color(), linestyle="",
                    label=f"{variant} sequential")
    if base_key:
        ax.axhline(results["base"][base_key], color="black", linestyle="--", linewidth=1, label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("instruction data (x the smallest mix)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _tradeoff(results: dict, path: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    for variant, rows in _by_variant(results["runs"]).items():
        ax.scatter([r["knowledge"] for r in rows], [r["task_score"] for r in rows],
                   s=[30 + 20 * r["factor"] ** 0.5 for r in rows], label=variant, alpha=0.8)
    seq = [r for r in results["runs"] if r["sequential"]]
    if seq:
        ax.scatter([r["knowledge"] for r in seq], [r["task_score"] for r in seq], marker="*", s=140,
                   color="grey", label="sequential")
    ax.scatter([results["base"]["knowledge"]], [results["base"]["task_score"]], marker="X", s=120, color="black",
               label="base model")
    ax.set_xlabel("knowledge accuracy on held-out facts (%)")
    ax.set_ylabel("task score (%)")
    ax.set_title("knowledge against skill (marker size: data size)", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _router(results: dict, path: Path) -> str | None:
    runs = [r for r in results["runs"] if "router_experts" in r and not r["sequential"]]
    if not runs:
        return None
    largest = max(r["factor"] for r in runs)
    runs = [r for r in runs if r["factor"] == largest]
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 2.8), squeeze=False, layout="constrained")
    for ax, run in zip(axes[0], runs):
        kinds = list(run["router_experts"])
        grid = [run["router_experts"][k] for k in kinds]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(kinds)), [f"{k} items" for k in kinds])
        ax.set_xticks(range(len(grid[0])))
        ax.set_xlabel("expert")
        edge = 0
        for size in list(run["groups"].values())[:-1]:
            edge += size
            ax.axvline(edge - 0.5, color="white", linewidth=2)
        ax.set_title(f"{run['name']}: groups " + ", ".join(f"{g} {n}" for g, n in run["groups"].items()), fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="gate share")
    return _save(fig, path)


def figures(results: dict, folder: Path) -> dict[str, str]:
    out = {
        "knowledge": _against_size(results, "knowledge", "knowledge", "knowledge accuracy (%)",
                                   "closed-book QA on held-out facts", folder / "knowledge_vs_size.png"),
        "tasks": _against_size(results, "task_score", "task_score", "task score (%)", "downstream tasks",
                               folder / "tasks_vs_size.png"),
        "tradeoff": _tradeoff(results, folder / "tradeoff.png"),
        "drift": _against_size(results, "drift", None, "mean relative drift ||dW|| / ||W0||",
                               "parameter drift of the adapted (full: all linear) layers", folder / "drift_vs_size.png"),
    }
    router = _router(results, folder / "router_by_type.png")
    if router:
        out["router"] = router
    return out


def paragraph(results: dict) -> str:
    f = results["findings"]
    size, stderr = f["largest_size"], results["knowledge_stderr"]
    parts = [f"At the largest mix ({size}), the base model answers {fmt(f['base_knowledge'])} % of the held-out "
             f"fact questions (standard error about {fmt(stderr)} points, so smaller differences are noise)."]
    if f.get("full"):
        verb = "lost" if f["full"]["knowledge_change"] < 0 else "did not lose"
        parts.append(f"Full fine-tuning {verb} knowledge: {signed(f['full']['knowledge_change'])} points, while its "
                     f"task score moved {signed(f['full']['task_change'])} points and its predictions drifted from "
                     f"the base model's by a KL of {fmt(f['full']['kl_to_base'], 3)} nats per token on general text.")
    most = f["most_knowledge"]
    parts.append(f"{most['variant']} kept the most knowledge ({fmt(most['knowledge'])} %, "
                 f"{signed(most['change'])} points against the base); {f['least_knowledge']['variant']} the least "
                 f"({fmt(f['least_knowledge']['knowledge'])} %). {f['best_tasks']['variant']} gained the most task "
                 f"skill ({signed(f['best_tasks']['change'])} points).")
    if "loramoe_lbc_vs_full" in f:
        gap = f["loramoe_lbc_vs_full"]
        parts.append(f"LoRAMoE with the balancing constraint ({gap['variant']}) against full fine-tuning: "
                     f"knowledge {signed(gap['knowledge_gap'])} points, task score {signed(gap['task_gap'])} points.")
    return " ".join(parts)


def _main_table(results: dict) -> list[str]:
    lines = ["| run | records | knowledge % | vs base | lost / gained | task score % | vs base | LM loss | "
             "KL to base | drift | trainable parameters | train s |", "|" + " --- |" * 12]
    b = results["base"]
    lines.append(f"| base model | 0 | {fmt(b['knowledge'])} | | | {fmt(b['task_score'])} | | {fmt(b['lm_loss'], 3)} "
                 f"| | | | |")
    for r in results["runs"]:
        lines.append(f"| {r['name']} | {fmt(r['records'])} | {fmt(r['knowledge'])} | {signed(r['knowledge_change'])} | "
                     f"{fmt(r['knowledge_lost'])} / {fmt(r['knowledge_gained'])} | {fmt(r['task_score'])} | "
                     f"{signed(r['task_change'])} | {fmt(r['lm_loss'], 3)} | {fmt(r['kl_to_base'], 4)} | "
                     f"{fmt(r['drift'], 4)} | {fmt(r['trainable_parameters'])} | {fmt(r['train_seconds'])} |")
    return lines


def render(results: dict, folder: Path) -> tuple[Path, Path]:
    """Writes the figures, report.md and report.html into ``folder``."""
    images = figures(results, folder)
    lab = results["lab"]
    lines = [f"# loramoe lab: knowledge forgetting on {lab['model']}", "",
             paragraph(results), "",
             f"Settings: {', '.join(lab['sources'])}; {fmt(lab['runs'])} runs in {fmt(lab['seconds'])} s "
             f"(cached runs count the time they took when they ran). Every number here is in results.json.", "",
             "## Results", ""] + _main_table(results)
    lines += ["", "## Figures", ""] + [f"![{name}]({png})" for name, png in images.items()]
    lines += ["", "## Knowledge per relation (%)", "",
              "| run | " + " | ".join(results["base"]["knowledge_per_relation"]) + " |",
              "|" + " --- |" * (1 + len(results["base"]["knowledge_per_relation"]))]
    for name, per in [("base model", results["base"]["knowledge_per_relation"])] + \
            [(r["name"], r["knowledge_per_relation"]) for r in results["runs"]]:
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in per.values()) + " |")
    lines += ["", "## Task scores (%)", "", "| run | " + " | ".join(results["base"]["tasks"]) + " |",
              "|" + " --- |" * (1 + len(results["base"]["tasks"]))]
    for name, per in [("base model", results["base"]["tasks"])] + [(r["name"], r["tasks"]) for r in results["runs"]]:
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in per.values()) + " |")
    routed = [r for r in results["runs"] if "router" in r]
    if routed:
        groups = list(routed[0]["router"]["knowledge"])
        lines += ["", "## Router: gate share per expert group by sample type", "",
                  "| run | items | " + " | ".join(groups) + " |", "|" + " --- |" * (2 + len(groups))]
        for r in routed:
            for kind, shares in r["router"].items():
                lines.append(f"| {r['name']} | {kind} | " + " | ".join(fmt(shares[g], 3) for g in groups) + " |")
    lines += ["", "## Mix", "", "| size | knowledge records | task records |", "| --- | --- | --- |"]
    lines += [f"| {size} | {fmt(c['knowledge'])} | {fmt(c['task'])} |" for size, c in results["mix"].items()]
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
