"""``loramoe eval --harness TASKS``: lm-evaluation-harness tasks scored on the model ``loramoe eval``
has already loaded (no second load), beside the built-in suites.

Under ``<output>/harness/``: ``results.json`` (lm-eval's results, groups, configs, versions, n-shot,
n-samples and run config) and ``samples_<task>.jsonl`` (its per-document log); with ``--vs-base``
the same under ``base/``, from the same model object with its adapter switched off (or the
``--base-model`` loaded for a fully fine-tuned model). eval.json's ``harness`` section holds each
task's metrics (value and stderr) and, with ``--vs-base``, each change (adapter - base) paired by
document, with a 95 % interval from a paired bootstrap over documents.

Tasks are built before the model loads, so a task that cannot be had fails first, in one line: an
unknown name (with close matches), or, offline, a task whose data must come from the hub.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from loramoe.errors import UsageError
from loramoe.fileio import atomic_write_text

FOLDER = "harness"
RESULTS = f"{FOLDER}/results.json"
BOOTSTRAP = 2000
"""Paired bootstrap replicates for each change's interval."""
HUB_OFFLINE = ("task '{}' needs its data from the Hugging Face hub, which is not reachable offline "
               "(HF_HUB_OFFLINE=1); use a local task with --include-path")
_UNSAFE = re.compile(r"[^\w.-]")
"""Characters a task name may hold that a file name should not."""


def _offline() -> bool:
    import datasets
    import huggingface_hub

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)


def _from_hub(error: BaseException) -> bool:
    """Whether ``error`` (or one it came from) is a hub download refused or failed."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kinds = (ConnectionError, DatasetNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled)
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kinds):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@functools.cache
def _lm_eval_tasks() -> Any:
    """lm-eval's own tasks: indexing its thousands of YAML files takes seconds, and they do not
    change while the process runs (local task files may: they are indexed afresh each time)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _local_only(name: str, index: dict[str, Any], seen: frozenset[str] = frozenset()) -> bool:
    """Whether the local task files alone build ``name``: a local group may name lm-eval's own tasks."""
    entry = index.get(name)
    if entry is None or name in seen:
        return False
    children = (entry.cfg or {}).get("task", []) if entry.kind.name == "GROUP" else []
    return all(isinstance(child, dict) or _local_only(child, index, seen | {name})
               for child in (children if isinstance(children, list) else [children]))


def _matching(given: str, index: dict[str, Any]) -> list[str]:
    """The names of ``index`` that ``given`` names: itself, or those its glob pattern matches."""
    return [given] if given in index else sorted(n for n in index if fnmatch.fnmatchcase(n, given))


def _managers(harness: list[str] | str, include_path: Path | None) -> dict[str, Any]:
    """Each task, group or tag name ``harness`` gives (glob patterns expanded) -> the lm-eval
    ``TaskManager`` that builds it; an unknown name is refused with the known names closest to it."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else None
    local_index = local.task_index if local else {}
    out: dict[str, Any] = {}
    for given in [harness] if isinstance(harness, str) else harness:
        given = given.strip()
        names = _matching(given, local_index) if given else []
        if given and not names:  # lm-eval's own tasks are indexed only where the local files lack the name
            known = {**_lm_eval_tasks().task_index, **local_index}
            names = _matching(given, known)
            if not names:
                close = difflib.get_close_matches(given, list(known), n=5)
                hint = f"close matches: {', '.join(close)}" if close else "lm-eval ls tasks lists lm-eval's own"
                raise UsageError(f"--harness: unknown task '{given}'; {hint} (local task files: --include-path DIR)")
        for name in names:
            if local is None or name not in local.task_index:
                out[name] = _lm_eval_tasks()
            elif _local_only(name, local.task_index):
                out[name] = local
            else:  # a local group of lm-eval's tasks: only a manager of both builds it
                out[name] = TaskManager(include_path=str(include_path))
    return out


def load_tasks(harness: list[str] | str, *, limit: Any, num_fewshot: int | None,
               include_path: Path | None) -> list[Any]:
    """lm-eval's task (or group) objects for ``harness``, with their data, built before the model
    loads so that a task that cannot be had is refused in one line before any scoring."""
    if limit is not None and not isinstance(limit, int):
        raise UsageError("--limit: with --harness give one number of documents for every task and benchmark "
                         "(a mapping names built-in suites and benchmarks only)")
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"--num-fewshot {num_fewshot}: give 0 or more examples")
    if include_path is not None and not Path(include_path).is_dir():
        raise UsageError(f"--include-path {include_path}: not a folder of task YAML files")
    import loramoe.harness  # noqa: F401  (names the extra to install where lm-eval is missing)

    tasks: list[Any] = []
    for name, manager in _managers(harness, include_path).items():
        try:
            loaded = manager.load([name])
        except Exception as error:  # lm-eval and datasets raise whatever their loaders raise
            if _offline() and _from_hub(error):
                raise UsageError(HUB_OFFLINE.format(name)) from error
            raise UsageError(f"--harness: task '{name}' cannot be loaded: {_one_line(error)}") from error
        top = loaded["groups"][name] if name in loaded["groups"] else loaded["tasks"].get(name)
        tasks += [top] if top is not None else list(loaded["tasks"].values())  # a tag: its tasks
    if not tasks:
        raise UsageError("--harness names no task: give lm-eval task, group or tag names, comma-separated")
    from lm_eval.tasks import TaskManager

    try:  # a task named twice (itself and in a group, say) is refused here; built objects load as they are
        TaskManager(include_defaults=False).load(tasks)
    except ValueError as error:
        raise UsageError(f"--harness: {_one_line(error)}") from error
    return tasks


def _safe(value: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable, ensure_ascii=False))


def _write(result: dict[str, Any], folder: Path) -> dict[str, list[dict[str, Any]]]:
    """lm-eval's result as results.json and one samples_<task>.jsonl per task; returns the samples
    as JSON values (what the files hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    kept = {key: value for key, value in result.items() if key != "samples"}  # in files of their own
    atomic_write_text(folder / "results.json", json.dumps(_safe(kept), indent=2, ensure_ascii=False) + "\n")
    samples = {task: _safe(rows) for task, rows in result.get("samples", {}).items()}
    for task, rows in samples.items():
        atomic_write_text(folder / f"samples_{_UNSAFE.sub('_', task)}.jsonl",
                          "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return samples


def clear(output: Path) -> None:
    """Drop an earlier evaluation's harness files (only there with ``--overwrite``): they would pass
    for this one's. Only the files it writes: the folder may hold others."""
    for folder in (Path(output) / FOLDER, Path(output) / FOLDER / "base"):
        for file in [folder / "results.json", *folder.glob("samples_*.jsonl")]:
            file.unlink(missing_ok=True)


def _number(value: Any) -> float | None:
    """``value`` as a float; None where lm-eval gives something else ("N/A", a tuple for a corpus metric)."""
    return float(value) if isinstance(value, (int, float)) else None


def _metrics(entry: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{"acc,none": {"value", "stderr"}}`` from one entry of lm-eval's results (stderr None where
    lm-eval gives "N/A")."""
    out = {}
    for key, value in entry.items():
        metric, _, kept = key.partition(",")
        if kept and not metric.endswith("_stderr") and _number(value) is not None:
            out[key] = {"value": _number(value), "stderr": _number(entry.get(f"{metric}_stderr,{kept}"))}
    return out


def _mean_metrics(task: Any) -> set[str]:
    """The metrics lm-eval aggregates as the mean over documents: their change is the mean change
    per document."""
    from lm_eval.api.metrics import mean

    return {metric for metric, aggregate in task.aggregation().items() if aggregate is mean}


def paired_change(tuned: list[dict[str, Any]], base: list[dict[str, Any]], key: str, *,
                  seed: int, draws: int = BOOTSTRAP) -> dict[str, Any] | None:
    """``key`` (``metric,filter``) changed from ``base``'s sample log to ``tuned``'s: the mean over
    documents of (tuned - base), paired by ``doc_id``, with a 95 % percentile interval from ``draws``
    bootstrap replicates of the documents; None where the metric has no number per document."""
    metric, _, kept = key.partition(",")
    pairs = [{s["doc_id"]: s for s in log if s.get("filter") == kept} for log in (tuned, base)]
    if not pairs[0] or pairs[0].keys() != pairs[1].keys():
        return None
    if any(pairs[0][d]["prompt_hash"] != pairs[1][d]["prompt_hash"] for d in pairs[0]):
        raise RuntimeError(f"{key}: the run and its base were asked different prompts")
    values = [[_number(pairs[i][d].get(metric)) for d in sorted(pairs[0])] for i in (0, 1)]
    if any(v is None for run in values for v in run):
        return None
    diff = np.asarray(values[0]) - np.asarray(values[1])
    rng, means = np.random.default_rng(seed), []
    for start in range(0, draws, 100):  # in chunks: draws x documents indices at once can be large
        picks = rng.integers(0, len(diff), size=(min(100, draws - start), len(diff)))
        means.append(diff[picks].mean(axis=1))
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    return {"change": float(diff.mean()), "ci95": [float(low), float(high)], "documents": len(diff)}


def _score(lm: Any, tasks: list[Any], settings: dict[str, Any], folder: Path) -> tuple[dict, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # the tasks are built already; without a manager of its own lm-eval would index all of its tasks again
    result = lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True,
                                     task_manager=TaskManager(include_defaults=False), **settings)
    return result, _write(result, folder)


def run_harness(model: nn.Module, tokenizer: Any, tasks: list[Any], *, output: Path, name: str,
                adapter: Path | None, vs_base: bool, reference: nn.Module | None, base_model: str | None,
                num_fewshot: int | None, limit: int | None, batch_size: int, seed: int) -> dict[str, Any]:
    """Score ``tasks`` (:func:`load_tasks`) on ``model`` (loaded as ``name`` with ``adapter``), and
    with ``vs_base`` on its base: the same object with the adapter off, or ``reference`` (loaded as
    ``base_model``) for a model without one. Writes lm-eval's files under ``output``/harness and
    returns eval.json's ``harness`` section."""
    from lm_eval.models.huggingface import HFLM

    from loramoe.harness import LoramoeLM

    class Loaded(LoramoeLM):
        """The ``loramoe`` model over a model object already loaded: LoramoeLM's own constructor
        loads one from a name, which would be a second copy here."""

        def __init__(self, loaded: nn.Module, label: str, adapter: Path | None) -> None:
            HFLM.__init__(self, pretrained=loaded, tokenizer=tokenizer, batch_size=batch_size)
            self.pretrained, self.adapter = label, str(adapter) if adapter is not None else None

    clear(output)
    settings = {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size}
    lm = Loaded(model, name, adapter)
    result, samples = _score(lm, tasks, settings, Path(output) / FOLDER)
    section: dict[str, Any] = {"settings": settings, "tasks": {}}
    for task, entry in result["results"].items():  # its groups' too
        documents = result["n-samples"].get(task, {}).get("effective", entry.get("sample_len"))
        section["tasks"][task] = {"metrics": _metrics(entry), "documents": documents,
                                  "num_fewshot": result["n-shot"].get(task), "group": task in result.get("groups", {})}
    if vs_base:
        base_lm = Loaded(reference, str(base_model), None) if reference is not None else lm
        with lm.without_adapter() if reference is None else nullcontext():
            base, base_samples = _score(base_lm, tasks, settings, Path(output) / FOLDER / "base")
        mean_metrics = {t.task_name: _mean_metrics(t) for t in _leaves(tasks)}
        for task, summary in section["tasks"].items():
            base_metrics = _metrics(base["results"].get(task, {}))
            for key, numbers in summary["metrics"].items():
                numbers["base"] = base_metrics.get(key, {}).get("value")
                numbers["base_stderr"] = base_metrics.get(key, {}).get("stderr")
                if key.partition(",")[0] in mean_metrics.get(task, ()):
                    change = paired_change(samples[task], base_samples[task], key, seed=seed)
                    if change is not None:
                        numbers.update(change)
    return section


def _leaves(tasks: list[Any]) -> list[Any]:
    from lm_eval.api.group import Group

    return [leaf for t in tasks for leaf in (t.get_all_tasks() if isinstance(t, Group) else [t])]


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def harness_markdown(section: dict[str, Any] | None) -> list[str]:
    """eval.md's table of the harness tasks: one row per task (or group) and metric."""
    if not section:
        return []
    lines = ["", "## lm-evaluation-harness (harness/results.json, per document: harness/samples_*.jsonl)", "",
             "| task | metric | score | ± | base | change | 95 % interval | docs | shots |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task, summary in section["tasks"].items():
        name = f"{task} (group)" if summary["group"] else task
        shots = "" if summary["num_fewshot"] is None else summary["num_fewshot"]
        for key, n in summary["metrics"].items():
            metric, _, kept = key.partition(",")
            shown = metric if kept == "none" else f"{metric} ({kept})"
            interval = f"[{n['ci95'][0]:.3f}, {n['ci95'][1]:.3f}]" if "ci95" in n else ""
            lines.append(f"| {name} | {shown} | {_fmt(n['value'])} | {_fmt(n['stderr'])} | {_fmt(n.get('base'))} | "
                         f"{_fmt(n.get('change'))} | {interval} | {summary['documents'] or ''} | {shots} |")
    return lines
