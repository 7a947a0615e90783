"""What ``loramoe scaling`` writes: the fits per method, the LoRAMoE-vs-LoRA comparison, plots and
``scaling.md`` next to the paper's constants, and ``scaling.json`` with every point and fit."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from loramoe.adapters import LAYER_CLASSES
from loramoe.fileio import atomic_write_text
from loramoe.plots import pyplot, save_figure
from loramoe.scaling.laws import PowerLawFit, fit_linear_law, fit_power_law

PAPER = {
    "source": "arXiv 2401.05605 (Llama 2 7B chat, LoRA ranks 8-256, 260 steps, first 50 excluded)",
    "linear": {"OpenOrca": {"c": 1.733, "s": 2.048, "r2": 0.945}, "News": {"c": 1.062, "s": 3.129, "r2": 0.974}},
    "power_forgetting": {"OpenOrca": {"alpha": 0.035, "beta": 0.147, "rho": 7.69},
                         "News": {"alpha": 0.046, "beta": 0.104}},
    "power_r2": "0.96-0.98",
}
"""The paper's fitted constants, as collected in docs/method.md, section 3 ("Scaling laws of
forgetting")."""

PLOTS = {"steps": "forgetting_vs_steps.png", "linear": "forgetting_vs_finetuning.png", "residuals": "residuals.png"}
NAMES = {**{kind.config_class.method: kind.display_name for kind in LAYER_CLASSES.values()}, "full": "full fine-tuning"}
MATCH_RATIO = 1.5
"""Runs of two methods count as of near-equal size when their trainable parameters differ by at
most this factor."""


def _fit(fit, *columns) -> dict[str, Any]:
    try:
        return fit(*columns).to_dict()
    except ValueError as error:  # too few points, one size only...: say why instead of stopping
        return {"error": str(error)}


def fit_method(runs: list[dict], metric: str, exclude_steps: int) -> dict[str, Any]:
    """The linear law and the power law (of the forgetting and of the fine-tuning loss) over the
    points after ``exclude_steps`` of every run of one method."""
    rows = [(run["trainable_parameters"], p["step"], p["fine_tuning_loss"], p[metric])
            for run in runs for p in run["points"] if p["step"] > exclude_steps]
    params, steps, ft, forgetting = (np.array(c, dtype=float) for c in zip(*rows)) if rows else ([],) * 4
    return {"points": len(rows),
            "linear": _fit(fit_linear_law, ft, forgetting),
            "power_forgetting": _fit(fit_power_law, params, steps, forgetting),
            "power_fine_tuning": _fit(fit_power_law, params, steps, ft)}


def compare(runs: list[dict], reference: str = "lora", candidate: str = "loramoe") -> dict[str, Any] | None:
    """Final-step forgetting (KL) and fine-tuning loss of ``candidate`` runs against the
    ``reference`` run of nearest trainable-parameter count, where within ``MATCH_RATIO``."""
    refs = [r for r in runs if r["method"] == reference]
    pairs = []
    for run in (r for r in runs if r["method"] == candidate):
        if not refs:
            break
        ref = min(refs, key=lambda r: abs(math.log(r["trainable_parameters"] / run["trainable_parameters"])))
        ratio = run["trainable_parameters"] / ref["trainable_parameters"]
        if max(ratio, 1 / ratio) <= MATCH_RATIO:
            pairs.append({"size": run["size"], "reference_size": ref["size"],
                          "params": run["trainable_parameters"], "reference_params": ref["trainable_parameters"],
                          "kl": run["points"][-1]["kl"], "reference_kl": ref["points"][-1]["kl"],
                          "fine_tuning_loss": run["points"][-1]["fine_tuning_loss"],
                          "reference_fine_tuning_loss": ref["points"][-1]["fine_tuning_loss"]})
    if not pairs:
        return None
    kl = float(np.mean([p["kl"] for p in pairs]))
    ref_kl = float(np.mean([p["reference_kl"] for p in pairs]))
    ft = float(np.mean([p["fine_tuning_loss"] for p in pairs]))
    ref_ft = float(np.mean([p["reference_fine_tuning_loss"] for p in pairs]))
    change = (kl - ref_kl) / ref_kl * 100 if ref_kl > 0 else float("nan")
    sentence = (f"At near-equal trainable parameters ({len(pairs)} pair(s), sizes within {MATCH_RATIO}x), "
                f"{NAMES[candidate]} forgot {abs(change):.0f}% {'less' if change < 0 else 'more'} than "
                f"{NAMES[reference]} after "
                f"{runs[0]['points'][-1]['step']} steps "
                f"(mean KL to the base model {kl:.4f} vs {ref_kl:.4f} nats/token) "
                f"while reaching a fine-tuning loss of {ft:.3f} vs {ref_ft:.3f}.")
    return {"pairs": pairs, "kl": kl, "reference_kl": ref_kl, "fine_tuning_loss": ft,
            "reference_fine_tuning_loss": ref_ft, "kl_change_percent": change, "sentence": sentence}


def compare_at_equal_loss(runs: list[dict], fits: dict, metric: str, exclude: int, reference: str = "lora",
                          candidate: str = "loramoe") -> dict[str, Any] | None:
    """Forgetting of both methods at one fine-tuning loss, read off their fitted lines (law 1), at
    the median of the measured losses inside the range both methods reached: equal parameters can
    mean unequal learning."""
    laws = [fits.get(m, {}).get("linear", {"error": "no runs"}) for m in (reference, candidate)]
    if any("error" in law for law in laws):
        return None
    losses = {method: [p["fine_tuning_loss"] for r in runs if r["method"] == method for p in r["points"]
                       if p["step"] > exclude] for method in (reference, candidate)}
    low, high = max(min(v) for v in losses.values()), min(max(v) for v in losses.values())
    shared = [x for v in losses.values() for x in v if low <= x <= high]
    if not shared:
        return None
    loss = float(np.median(shared))
    ref_value, value = (-law["c"] * loss + law["s"] for law in laws)
    sentence = (f"At equal fine-tuning loss ({loss:.3f}, the median of the points in the range both reached), "
                f"the fitted lines give {NAMES[candidate]} a forgetting ({metric}) of {value:.4f} "
                f"against {ref_value:.4f} for "
                f"{NAMES[reference]} ({value - ref_value:+.4f} nats/token).")
    return {"fine_tuning_loss": loss, "forgetting": value, "reference_forgetting": ref_value, "sentence": sentence}


def _by_method(runs: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for run in runs:
        grouped.setdefault(run["method"], []).append(run)
    return grouped


def plot_steps(runs: list[dict], fits: dict, metric: str, exclude: int, path: Path) -> None:
    plt = pyplot()
    grouped = _by_method(runs)
    fig, axes = plt.subplots(1, len(grouped), figsize=(5.5 * len(grouped), 4), squeeze=False)
    for ax, (method, method_runs) in zip(axes[0], grouped.items()):
        law = fits[method]["power_forgetting"]
        for color, run in zip(plt.cm.viridis(np.linspace(0, 0.9, len(method_runs))), method_runs):
            steps = np.array([p["step"] for p in run["points"]])
            values = np.array([p[metric] for p in run["points"]])
            used = steps > exclude
            label = f"size {run['size']} (P={run['trainable_parameters']:,})"
            ax.plot(steps[used], values[used], "o", color=color, label=label)
            ax.plot(steps[~used], values[~used], "o", mfc="none", color=color)
            if "error" not in law:
                grid = np.linspace(max(exclude, 1), steps.max(), 50)
                curve = PowerLawFit(**law).predict(np.full_like(grid, run["trainable_parameters"]), grid)
                ax.plot(grid, curve, "-", color=color, lw=1)
        ax.set(title=f"{method}: forgetting vs steps (hollow: not fitted)", xlabel="step", ylabel=metric)
        ax.legend(fontsize=7)
    save_figure(fig, path, bbox_inches="tight")


def plot_linear(runs: list[dict], fits: dict, metric: str, exclude: int, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for color, (method, method_runs) in zip(plt.cm.tab10.colors, _by_method(runs).items()):
        points = [p for run in method_runs for p in run["points"] if p["step"] > exclude]
        x = np.array([p["fine_tuning_loss"] for p in points])
        ax.plot(x, [p[metric] for p in points], "o", color=color, alpha=0.7, label=method)
        law = fits[method]["linear"]
        if "error" not in law and len(x):
            grid = np.linspace(x.min(), x.max(), 20)
            ax.plot(grid, -law["c"] * grid + law["s"], "-", color=color,
                    label=f"{method}: L_f = -{law['c']:.3f} L_ft + {law['s']:.3f} (R2 {law['r2']:.3f})")
    ax.set(title="forgetting vs fine-tuning loss", xlabel="fine-tuning loss (held-out)", ylabel=metric)
    ax.legend(fontsize=7)
    save_figure(fig, path, bbox_inches="tight")


def plot_residuals(runs: list[dict], fits: dict, metric: str, exclude: int, path: Path) -> None:
    plt = pyplot()
    grouped = _by_method(runs)
    fig, axes = plt.subplots(len(grouped), 2, figsize=(10, 3.2 * len(grouped)), squeeze=False)
    for row, (method, method_runs) in zip(axes, grouped.items()):
        points = [p for run in method_runs for p in run["points"] if p["step"] > exclude]
        for ax, key, title, x, xlabel in (
                (row[0], "linear", "law 1 (linear)", [p["fine_tuning_loss"] for p in points], "fine-tuning loss"),
                (row[1], "power_forgetting", "law 2 (power law)", [p["step"] for p in points], "step")):
            law = fits[method][key]
            if "error" in law:
                ax.text(0.5, 0.5, law["error"], ha="center", va="center", wrap=True, fontsize=8)
            else:
                ax.plot(x, law["residuals"], "o")
                ax.axhline(0, color="grey", lw=0.8)
            ax.set(title=f"{method}: {title} residuals", xlabel=xlabel, ylabel=f"{metric} residual")
    fig.tight_layout()
    save_figure(fig, path, bbox_inches="tight")


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def render_markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = ["# Forgetting scaling laws (arXiv 2401.05605)", "",
             (f"Model `{settings['model']}`, methods {', '.join(settings['method'])}, sizes {settings['ranks']} "
              f"(rank; experts of rank {settings['expert_rank']} for loramoe), {settings['steps']} steps, measured "
              f"every {settings['eval_every']}, fitted after step {settings['exclude_steps']}, forgetting = "
              f"`{settings['metric']}` on {settings['text_max_length']}-token held-out paragraphs. Wall time "
              f"{result['seconds']:.0f} s."), "",
             "## Runs", "",
             "| method | size | trainable P | final step | fine-tuning loss | forgetting | KL | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in result["runs"]:
        last = run["points"][-1]
        lines.append(f"| {run['method']} | {run['size']} | {run['trainable_parameters']:,} | {last['step']} | "
                     f"{last['fine_tuning_loss']:.4f} | {last[settings['metric']]:.4f} | {last['kl']:.5f} | "
                     f"{run['seconds']} |")
    lines += ["", "## Law 1: L_f = -c * L_ft + s", "", "| fit | c | s | R^2 | points |",
              "| --- | --- | --- | --- | --- |"]
    for method, fit in result["fits"].items():
        law = fit["linear"]
        lines.append(f"| {method} | " + (f"{law['error']} | | | |" if "error" in law else
                     f"{law['c']:.4g} ± {law['c_stderr']:.2g} | {law['s']:.4g} | {law['r2']:.3f} | {law['points']} |"))
    for name, law in PAPER["linear"].items():
        lines.append(f"| paper, {name} | {law['c']} | {law['s']} | {law['r2']} | |")
    lines += ["", "## Law 2: L = c * ((a/P)^alpha + (b/N)^beta)^rho + s", "",
              "|c| is fixed to 1 (c, a and b are not separately identifiable); compare the exponents.", "",
              "| fit | sign c | a | alpha | b | beta | rho | s | R^2 | undetermined |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, fit in result["fits"].items():
        for key, label in (("power_forgetting", "forgetting"), ("power_fine_tuning", "fine-tuning loss")):
            law = fit[key]
            if "error" in law:
                lines.append(f"| {method}, {label} | {law['error']} | | | | | | | | |")
            else:
                lines.append(f"| {method}, {label} | {law['c']:+.0f} | {law['a']:.4g} | {law['alpha']:.4g} | "
                             f"{law['b']:.4g} | "
                             f"{law['beta']:.4g} | {law['rho']:.4g} | {law['s']:.4g} | {law['r2']:.3f} | "
                             f"{', '.join(law['undetermined']) or '-'} |")
    for name, law in PAPER["power_forgetting"].items():
        lines.append(f"| paper, {name}, forgetting | | | {law['alpha']} | | {law['beta']} | {_num(law.get('rho'))} | | "
                     f"{PAPER['power_r2']} | |")
    lines += ["", ("Undetermined: on a bound of the search, or a standard error larger than the value; the data do "
                   "not pin it down (a and alpha when the loss does not change with P), the law degenerates to a "
                   "simpler one, and R^2 says how well that one fits.")]
    comparison, at_loss = result["comparison"], result["comparison_at_equal_loss"]
    lines += ["", "## LoRAMoE vs LoRA", "",
              comparison["sentence"] if comparison
              else "No LoRAMoE run has a LoRA run of near-equal size in this sweep.",
              ""]
    if comparison:
        lines += ["| LoRAMoE experts | P | LoRA rank | P | KL LoRAMoE | KL LoRA | L_ft LoRAMoE | L_ft LoRA |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {p['size']} | {p['params']:,} | {p['reference_size']} | {p['reference_params']:,} | "
                  f"{p['kl']:.5f} | "
                  f"{p['reference_kl']:.5f} | {p['fine_tuning_loss']:.4f} | {p['reference_fine_tuning_loss']:.4f} |"
                  for p in comparison["pairs"]]
        twins = [p for p in comparison["pairs"] if p["size"] == 1 and p["reference_size"] == settings["expert_rank"]]
        if twins and twins[0]["reference_kl"] > 0:
            gap = abs(twins[0]["kl"] / twins[0]["reference_kl"] - 1) * 100
            lines += ["", (f"LoRAMoE with one expert computes what LoRA of rank {settings['expert_rank']} computes "
                           f"(a softmax over one expert is 1), from another random initialisation: their KL differ "
                           f"by {gap:.0f}%, a gauge of the run-to-run noise in these numbers.")]
        lines.append("")
    lines += [at_loss["sentence"] if at_loss else "The two methods' fine-tuning losses do not overlap (or a line "
              "was not fitted): no comparison at equal fine-tuning loss.",
              "", "## Plots", "", *(f"![{key}]({name})" for key, name in PLOTS.items()), "",
              f"Paper: {PAPER['source']}.", ""]
    return "\n".join(lines)


def write_report(runs: list[dict], settings: dict[str, Any], output: Path, *, seconds: float) -> dict[str, Any]:
    """Fits, comparison, plots, ``scaling.json`` and ``scaling.md`` in ``output``; returns the JSON."""
    metric, exclude = settings["metric"], settings["exclude_steps"]
    fits = {method: fit_method(method_runs, metric, exclude) for method, method_runs in _by_method(runs).items()}
    result = {"settings": settings, "seconds": seconds, "runs": runs, "fits": fits, "comparison": compare(runs),
              "comparison_at_equal_loss": compare_at_equal_loss(runs, fits, metric, exclude), "paper": PAPER,
              "plots": PLOTS}
    output.mkdir(parents=True, exist_ok=True)
    plot_steps(runs, fits, metric, exclude, output / PLOTS["steps"])
    plot_linear(runs, fits, metric, exclude, output / PLOTS["linear"])
    plot_residuals(runs, fits, metric, exclude, output / PLOTS["residuals"])
    atomic_write_text(output / "scaling.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(output / "scaling.md", render_markdown(result))
    return result
