"""``loramoe eval``: score a model (with an adapter, or fully fine-tuned) on knowledge, tasks and
general text, and with ``--vs-base`` measure what fine-tuning cost against the base model.

Writes ``eval.json`` (every number and every per-item prediction), ``eval.md`` (the tables) and,
for LoRAMoE, ``router.json`` / ``router.png`` (gate share per expert for each benchmark).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from loramoe import models
from loramoe.adapters import LoraMoEConfig
from loramoe.attach import adapter_config, disabled_adapters
from loramoe.fileio import atomic_write_text
from loramoe.forgetting import distribution_shift, knowledge_change, parameter_drift, summarize_drift
from loramoe.generation import generate
from loramoe.metrics import lm_loss, per_item, score
from loramoe.router_analysis import gate_shares, group_share, save_gate_shares
from loramoe.serialization import load_adapter
from loramoe.data import read_records
from loramoe.suites import filter_overlap, load_suite
from loramoe.suites.base import Benchmark, PromptStyle
from loramoe.suites.registry import benchmark_names, canonical_suite

CORRECT = {"qa": "contains", "translation": "em", "accuracy": "accuracy"}
"""The per-item score that counts an answer as right, for knowledge_change."""


def _predict(model, tokenizer, benchmarks: Sequence[Benchmark], styles: dict[str, PromptStyle], *,
             batch_size: int, max_new_tokens: int, base: bool) -> dict[str, list[str]]:
    """Every generative benchmark's answers, from one batched pass over all their prompts (a
    benchmark with a few test items would otherwise decode a nearly empty batch)."""
    generative = [b for b in benchmarks if b.metric != "lm_loss"]
    examples = [e for b in generative for e in b.test]
    with disabled_adapters(model) if base else nullcontext():
        predictions = generate(model, tokenizer, examples, style=[styles[b.name] for b in generative for _ in b.test],
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    out, start = {}, 0
    for bench in generative:
        out[bench.name], start = predictions[start:start + len(bench.test)], start + len(bench.test)
    return out


def _scored(bench: Benchmark, predictions: list[str], style: PromptStyle) -> dict[str, Any]:
    items = [{"id": e.id, "prompt": e.completion if style == "completion" and e.completion else e.prompt,
              "answers": list(e.answers), "prediction": p, **per_item(bench.metric, p, e)}
             for e, p in zip(bench.test, predictions)]
    return {"scores": score(bench.metric, predictions, bench.test), "items": items}


def _score_all(model, tokenizer, benchmarks: Sequence[Benchmark], styles: dict[str, PromptStyle], *,
               batch_size: int, max_new_tokens: int, max_length: int, base: bool) -> dict[str, dict[str, Any]]:
    """Each benchmark's scores (and per-item answers for the generative ones)."""
    predictions = _predict(model, tokenizer, benchmarks, styles, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, base=base)
    out = {}
    for bench in benchmarks:
        if bench.metric == "lm_loss":
            with disabled_adapters(model) if base else nullcontext():
                out[bench.name] = {"scores": lm_loss(model, tokenizer, [e.prompt for e in bench.test],
                                                     batch_size=batch_size, max_length=max_length)}
        else:
            out[bench.name] = _scored(bench, predictions[bench.name], styles[bench.name])
    return out


Limit = int | dict[str, int | None] | None


def _limit_for(limit: Limit, name: str) -> int | None:
    """A suite's or benchmark's limit: a mapping names suites or benchmarks (the benchmark wins)."""
    if not isinstance(limit, dict):
        return limit
    if name in limit:
        return limit[name]
    suite = next((s for s in ("knowledge", "tasks", "lm-loss") if name in benchmark_names(s)), None)
    return limit.get(suite) if suite else limit.get(canonical_suite(name))


def load_benchmarks(suite: str, limit: Limit = None, seed: int = 0) -> list[Benchmark]:
    """The benchmarks a comma-separated list of suites and benchmark names names, each capped by
    its limit (an int for all, or a mapping from suite or benchmark name to a limit). Benchmarks of
    one suite with one limit are built together: building a suite builds all of its benchmarks."""
    names = [name.strip() for name in suite.split(",") if name.strip()]
    if isinstance(limit, dict):
        known = {*benchmark_names(), "knowledge", "tasks", "lm-loss"}
        unknown = sorted(key for key in limit if key not in known)
        if unknown:
            raise ValueError(f"--limit names unknown suites or benchmarks: {', '.join(unknown)}")
    built: dict[tuple[str, int | None], dict[str, Benchmark]] = {}
    out = []
    for name in names:
        if name not in benchmark_names():
            out += load_suite(name, limit=_limit_for(limit, name), seed=seed)
            continue
        home = next(s for s in ("knowledge", "tasks", "lm-loss") if name in benchmark_names(s))
        key = (home, _limit_for(limit, name))
        if key not in built:
            built[key] = {b.name: b for b in load_suite(home, limit=key[1], seed=seed)}
        out.append(built[key][name])
    return out


def _without_overlap(benchmarks: list[Benchmark], train_data: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Drops, in place, the test items the training files give away; returns the count per benchmark."""
    records, _ = read_records(list(train_data))
    reports = {}
    for bench in benchmarks:
        if bench.metric == "lm_loss":
            continue
        bench.test, report = filter_overlap(bench.test, records)
        reports[bench.name] = {"total": report.total, "kept": report.kept, "removed": report.removed}
    return reports


def _read_base_eval(path: Path, benchmarks: list[Benchmark]) -> dict[str, Any]:
    """The base model's entries of an earlier eval.json, checked to cover the very same test items."""
    try:
        saved = json.loads(Path(path).read_text())["benchmarks"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--base-eval {path}: not a readable eval.json ({error})") from error
    for bench in benchmarks:
        if bench.metric == "lm_loss":
            continue
        entry = saved.get(bench.name)
        if entry is None or "items" not in entry:
            raise ValueError(f"--base-eval {path}: no items for benchmark '{bench.name}'")
        ids = [item["id"] for item in entry["items"]]
        if ids != [e.id for e in bench.test]:
            raise ValueError(f"--base-eval {path}: benchmark '{bench.name}' was scored on other test items "
                             f"({len(ids)} there, {len(bench.test)} here); use the same suite, limit, seed "
                             f"and training data")
    return saved


def evaluate(
    model: str = "smollm2-135m",
    adapter: Path | None = None,
    suite: str = "knowledge,tasks,lm-loss",
    vs_base: bool = False,
    base_model: str | None = None,
    base_eval: Path | None = None,
    train_data: list[str] | None = None,
    output: Path = Path("runs/eval"),
    limit: Limit = 200,
    prompt_style: PromptStyle | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    max_length: int = 256,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate a model on built-in benchmark suites and write eval.json and eval.md to ``output``.

    Args:
        model: ``smollm2-135m`` (embedded), a local folder (a fully fine-tuned run) or a hub id.
        adapter: a saved adapter folder to attach (a ``loramoe train`` output folder).
        suite: comma-separated suites: ``knowledge``, ``tasks``, ``lm-loss``.
        vs_base: also score the base model on the same items and report what changed.
        base_model: the base model for ``--vs-base`` on a fully fine-tuned model (adapters are
            switched off instead).
        base_eval: an ``eval.json`` of the base model on the same items: the comparison (implies
            ``--vs-base``) reads the base model's answers from it instead of generating them again.
        train_data: training files; test items they give away are dropped first (``filter_overlap``).
        output: folder for eval.json, eval.md and the router heatmap.
        limit: test items per benchmark at most (None: all), or a mapping from suite or benchmark
            name to its limit, e.g. ``{knowledge: 40, tasks: 16}`` (others: all).
        prompt_style: ``completion`` or ``chat`` for every benchmark (default: each benchmark's own).
        batch_size: prompts per generation batch.
        max_new_tokens: longest generated answer.
        max_length: longest text for the language-model loss, in tokens.
        seed: seed of the train/test split.
        trust_remote_code: allow a hub model's own code to run.
    """
    started = time.time()
    torch.manual_seed(seed)
    tuned, tokenizer = models.load(model, trust_remote_code=trust_remote_code)
    if adapter is not None:
        load_adapter(tuned, adapter)
    reference = None
    vs_base = vs_base or base_eval is not None
    if vs_base and adapter_config(tuned) is None:
        if base_model is None:
            raise ValueError("--vs-base on a model without an adapter needs --base-model")
        reference, _ = models.load(base_model, trust_remote_code=trust_remote_code)
    tuned.eval()

    benchmarks = load_benchmarks(suite, limit, seed)
    results: dict[str, Any] = {"model": model, "adapter": str(adapter) if adapter else None, "suite": suite,
                               "benchmarks": {}}
    overlap = _without_overlap(benchmarks, train_data) if train_data else {}
    saved_base = _read_base_eval(base_eval, benchmarks) if base_eval is not None else None
    styles = {b.name: prompt_style or b.prompt_style for b in benchmarks}
    settings = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length)
    tuned_scores = _score_all(tuned, tokenizer, benchmarks, styles, base=False, **settings)
    base_scores = None
    if vs_base and saved_base is None:
        generative = [b for b in benchmarks if b.metric != "lm_loss"]  # the shift on text is measured below
        base_scores = _score_all(reference if reference is not None else tuned, tokenizer, generative, styles,
                                 base=reference is None, **settings)
    for bench in benchmarks:
        entry = {"type": bench.type, "metric": bench.metric, "prompt_style": styles[bench.name],
                 "test_items": len(bench.test), **tuned_scores[bench.name]}
        if bench.name in overlap:
            entry["overlap"] = overlap[bench.name]
        if vs_base:
            if bench.metric == "lm_loss":
                texts = [e.prompt for e in bench.test]
                entry["forgetting"] = distribution_shift(tuned, tokenizer, texts, base_model=reference,
                                                         batch_size=batch_size, max_length=max_length)
            else:
                base_entry = saved_base[bench.name] if saved_base is not None else base_scores[bench.name]
                entry["base_scores"] = base_entry["scores"]
                key = CORRECT.get(bench.metric)
                if key:
                    entry["change"] = knowledge_change({i["id"]: i[key] > 0 for i in base_entry["items"]},
                                                       {i["id"]: i[key] > 0 for i in entry["items"]})
                for item, base_item in zip(entry["items"], base_entry["items"]):
                    item["base_prediction"] = base_item["prediction"]
        results["benchmarks"][bench.name] = entry

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config = adapter_config(tuned)
    if config is not None:
        results["drift"] = summarize_drift(parameter_drift(tuned))
    elif reference is not None:
        results["drift"] = summarize_drift(parameter_drift(tuned, reference.state_dict()))
    if isinstance(config, LoraMoEConfig):
        prompts = {b.name: [e.prompt for e in b.test] for b in benchmarks}
        router = gate_shares(tuned, tokenizer, prompts, batch_size=batch_size, max_length=max_length)
        save_gate_shares(router, output)
        results["router"] = {name: group_share(router, name) for name in prompts}
    results["seconds"] = round(time.time() - started, 1)
    atomic_write_text(output / "eval.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(output / "eval.md", render_markdown(results))
    return results


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def render_markdown(results: dict[str, Any]) -> str:
    """The tables of eval.md: one row per benchmark, base and change columns with --vs-base."""
    lines = [f"# Evaluation of {results['model']}" + (f" + {results['adapter']}" if results["adapter"] else ""), ""]
    rows: list[Sequence[str]] = []
    for name, entry in results["benchmarks"].items():
        for metric, value in entry["scores"].items():
            if metric == "tokens":
                continue
            base = entry.get("base_scores", {}).get(metric)
            forgetting = entry.get("forgetting", {})
            if metric in ("cross_entropy", "ce") and forgetting:
                base = forgetting.get("base_lm_loss")
            delta = "" if base is None or not isinstance(value, float) else _fmt(value - base)
            rows.append((name, entry["prompt_style"], metric, _fmt(value), "" if base is None else _fmt(base),
                         delta, str(entry["test_items"])))
    lines += ["| benchmark | style | metric | score | base | change | items |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    changes = {n: e["change"] for n, e in results["benchmarks"].items() if "change" in e}
    if changes:
        lines += ["", "## Facts lost and gained against the base model", "",
                  "| benchmark | base acc | tuned acc | lost | gained |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {n} | {_fmt(c['base_accuracy'])} | {_fmt(c['tuned_accuracy'])} | {len(c['lost'])} | "
                  f"{len(c['gained'])} |" for n, c in changes.items()]
    shifts = {n: e["forgetting"] for n, e in results["benchmarks"].items() if "forgetting" in e}
    if shifts:
        lines += ["", "## Forgetting on general text (arXiv 2401.05605)", "",
                  "| benchmark | CE vs base dist. | base entropy | KL | top-1 CE | LM loss increase |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {n} | {_fmt(s['forgetting_ce'])} | {_fmt(s['base_entropy'])} | {_fmt(s['kl'])} | "
                  f"{_fmt(s['top1_ce'])} | {_fmt(s['lm_loss_increase'])} |" for n, s in shifts.items()]
    if "drift" in results:
        lines += ["", "## Relative parameter drift ||W - W0|| / ||W0||", "",
                  "| module | drift |", "| --- | --- |"]
        lines += [f"| {m} | {d:.4f} |" for m, d in results["drift"].items()]
    if "router" in results:
        lines += ["", "## Gate share per expert group (router.png per layer)", ""]
        groups = list(next(iter(results["router"].values())))
        lines += ["| benchmark | " + " | ".join(groups) + " |", "| --- |" + " --- |" * len(groups)]
        lines += [f"| {n} | " + " | ".join(_fmt(s[g]) for g in groups) + " |" for n, s in results["router"].items()]
    lines += ["", f"{results['seconds']} s"]
    return "\n".join(lines) + "\n"
