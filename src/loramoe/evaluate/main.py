"""``loramoe eval``: score a model (with an adapter, or fully fine-tuned) on knowledge, tasks and
general text, and with ``--vs-base`` measure what fine-tuning cost against the base model.

Writes ``eval.json`` (every number and every per-item prediction), ``eval.md`` (the tables) and,
for LoRAMoE, ``router.json`` / ``router.png`` (gate share per expert for each benchmark); with
``--harness``, lm-evaluation-harness tasks too (:mod:`loramoe.evaluate.harness_run`).
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
from loramoe.data import read_records
from loramoe.errors import OutputFolderError, UsageError
from loramoe.evaluate import harness_run
from loramoe.evaluate.harness_export import export_probe
from loramoe.evaluate.router_analysis import gate_shares, group_share, save_gate_shares
from loramoe.fileio import atomic_write_text, ensure_writable_folder
from loramoe.forgetting import distribution_shift, knowledge_change, parameter_drift, summarize_drift
from loramoe.generation import generate
from loramoe.metrics import lm_loss, per_item, score
from loramoe.serialization import load_adapter, read_adapter_config
from loramoe.suites import filter_overlap
from loramoe.suites.base import Benchmark, PromptStyle
from loramoe.suites.registry import BENCHMARKS, Limit, load_benchmarks, suite_names


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
    """The base model's entries of an earlier eval.json, checked to cover the very same test items
    and to hold every field the comparison reads, so that a wrong file is one error line here."""
    where = f"--base-eval {path}"
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, or not JSON
        raise UsageError(f"{where}: not a readable eval.json ({error})") from error
    saved = document.get("benchmarks") if isinstance(document, dict) else None
    if not isinstance(saved, dict):
        raise UsageError(f"{where}: not an eval.json (a JSON object whose 'benchmarks' maps names to results)")
    for bench in benchmarks:
        if bench.metric != "lm_loss":
            _check_base_entry(saved.get(bench.name), bench, where)
    return saved


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_base_entry(entry: Any, bench: Benchmark, where: str) -> None:
    """``entry`` holds numeric scores and, for each test item of ``bench`` in order, its id, its
    prediction and the score that counts it right."""
    if not isinstance(entry, dict) or not isinstance(entry.get("items"), list):
        raise UsageError(f"{where}: no items for benchmark '{bench.name}'")
    where = f"{where}: benchmark '{bench.name}'"
    scores = entry.get("scores")
    if not isinstance(scores, dict) or not all(_is_number(v) for v in scores.values()):
        raise UsageError(f"{where}: 'scores' must map metric names to numbers")
    wanted = {"id": "a string", "prediction": "a string"}
    correct = BENCHMARKS[bench.name].correct
    if correct:
        wanted[correct] = "a number"
    for i, item in enumerate(entry["items"]):
        if not isinstance(item, dict):
            raise UsageError(f"{where}: item {i} is not a JSON object")
        for key, kind in wanted.items():
            value = item.get(key)
            if not (_is_number(value) if kind == "a number" else isinstance(value, str)):
                raise UsageError(f"{where}: item {i}: '{key}' must be {kind}, got {value!r}")
    ids = [item["id"] for item in entry["items"]]
    if ids != [e.id for e in bench.test]:
        raise UsageError(f"{where} was scored on other test items ({len(ids)} there, {len(bench.test)} here); "
                         f"use the same suite, limit, seed and training data")


EVAL_FILES = ("eval.json", "eval.md")
ROUTER_FILES = ("router.json", "router.png")


def _check_limit(limit: Limit) -> None:
    """Refuse a limit that leaves a benchmark nothing to score, before anything is loaded."""
    for name, value in limit.items() if isinstance(limit, dict) else [(None, limit)]:
        if value is not None and value < 1:
            given = f"{name}: {value}" if name is not None else value
            raise UsageError(f"--limit {given}: a benchmark needs at least 1 test item to score; give 1 or more, "
                             "or null for all")


def _check_output(output: Path, overwrite: bool) -> Path:
    """``output``, writable, and holding no earlier evaluation unless ``overwrite``."""
    earlier = [name for name in (*EVAL_FILES, *ROUTER_FILES, harness_run.RESULTS)
               if (output / name).exists()] if output.is_dir() else []
    if earlier and not overwrite:
        raise OutputFolderError(f"--output {output}: the folder holds an earlier evaluation ({', '.join(earlier)}); "
                                "give a new folder, or --overwrite to replace it")
    return ensure_writable_folder(output, "--output")


def evaluate(
    model: str = "smollm2-135m",
    adapter: Path | None = None,
    suite: str = ",".join(suite_names()),
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
    overwrite: bool = False,
    export_harness: Path | None = None,
    harness: list[str] | None = None,
    num_fewshot: int | None = None,
    include_path: Path | None = None,
) -> dict[str, Any]:
    """Evaluate a model on built-in benchmark suites and write eval.json and eval.md to ``output``.

    Args:
        model: ``smollm2-135m`` (embedded), a local folder (a fully fine-tuned run) or a hub id.
        adapter: a saved adapter folder to attach (a ``loramoe train`` output folder).
        suite: comma-separated suites: ``knowledge``, ``tasks``, ``lm-loss``.
        vs_base: also score the base model on the same items and report what changed (for
            ``harness`` tasks: per metric, paired by document, with a 95 % interval).
        base_model: the base model for ``--vs-base`` on a fully fine-tuned model (adapters are
            switched off instead).
        base_eval: an ``eval.json`` of the base model on the same items: the comparison (implies
            ``--vs-base``) reads the base model's answers from it instead of generating them again.
        train_data: training files; test items they give away are dropped first (``filter_overlap``).
        output: folder for eval.json, eval.md and the router heatmap; one that holds them from an
            earlier evaluation is refused unless ``overwrite``.
        limit: test items per benchmark at most, 1 or more (None: all), or a mapping from suite or
            benchmark name to its limit, e.g. ``{knowledge: 40, tasks: 16}`` (others: all). It
            caps each ``harness`` task's documents too (give one number then; None for the full
            tasks, as published scores are).
        prompt_style: ``completion`` or ``chat`` for every benchmark (default: each benchmark's own).
        batch_size: prompts per generation batch (and lm-eval's batch size for ``harness``).
        max_new_tokens: longest generated answer.
        max_length: longest text for the language-model loss, in tokens.
        seed: seed of the train/test split.
        trust_remote_code: allow a hub model's own code to run.
        overwrite: replace the earlier evaluation in ``output``.
        export_harness: write the lab's knowledge probe there as lm-eval tasks, gold answers chosen
            by ``model``, and stop (:mod:`loramoe.evaluate.harness_export`).
        harness: lm-evaluation-harness tasks, groups or tags (``--harness arc_easy,hellaswag``)
            to score on the same loaded model; results under ``output``/harness and in eval.md.
        num_fewshot: few-shot examples for the ``harness`` tasks (default: each task's own).
        include_path: a folder of local lm-eval task YAMLs for ``harness`` (an ``--export-harness``
            folder, say).
    """
    if export_harness is not None:
        written = export_probe(Path(export_harness), model, overwrite=overwrite, trust_remote_code=trust_remote_code)
        print(f"wrote {export_harness}: {sum(written['facts'].values())} facts; run: lm_eval --model hf --model_args "
              f"pretrained=MODEL --include_path {export_harness} --tasks loramoe_probe")
        return written
    started = time.time()
    _check_limit(limit)
    output = _check_output(Path(output), overwrite)  # before the generation it would store
    benchmarks = load_benchmarks(suite, limit, seed)
    overlap = _without_overlap(benchmarks, train_data) if train_data else {}
    saved_base = _read_base_eval(base_eval, benchmarks) if base_eval is not None else None
    tasks = harness_run.load_tasks(harness, limit=limit, num_fewshot=num_fewshot,
                                   include_path=include_path) if harness else None
    if adapter is not None:
        read_adapter_config(adapter)  # a bad config is refused before the model loads, not after
    torch.manual_seed(seed)
    tuned, tokenizer = models.load(model, trust_remote_code=trust_remote_code)
    if adapter is not None:
        load_adapter(tuned, adapter)
    reference = None
    vs_base = vs_base or base_eval is not None
    if vs_base and adapter_config(tuned) is None:
        if base_model is None:
            raise UsageError("--vs-base on a model without an adapter needs --base-model")
        reference, _ = models.load(base_model, trust_remote_code=trust_remote_code)
    tuned.eval()

    results: dict[str, Any] = {"model": model, "adapter": str(adapter) if adapter else None, "suite": suite,
                               "benchmarks": {}}
    styles = {b.name: prompt_style or b.prompt_style for b in benchmarks}
    settings = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "max_length": max_length}
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
                key = BENCHMARKS[bench.name].correct
                if key:
                    entry["change"] = knowledge_change({i["id"]: i[key] > 0 for i in base_entry["items"]},
                                                       {i["id"]: i[key] > 0 for i in entry["items"]})
                for item, base_item in zip(entry["items"], base_entry["items"]):
                    item["base_prediction"] = base_item["prediction"]
        results["benchmarks"][bench.name] = entry

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
    else:  # an earlier evaluation's heatmap (only there with --overwrite) would pass for this one's
        for name in ROUTER_FILES:
            (output / name).unlink(missing_ok=True)
    if tasks is not None:
        results["harness"] = harness_run.run_harness(
            tuned, tokenizer, tasks, output=output, name=model, adapter=adapter, vs_base=vs_base, reference=reference,
            base_model=base_model, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, seed=seed)
    else:
        harness_run.clear(output)
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
    lines += harness_run.harness_markdown(results.get("harness"))
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
