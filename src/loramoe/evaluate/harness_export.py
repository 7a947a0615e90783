"""``loramoe eval --export-harness DIR``: the lab's knowledge probe as lm-evaluation-harness tasks,
so that any model can be asked our held-out facts with a plain ``lm_eval --include_path DIR``, and
our figures checked by a program we did not write.

The facts are the default lab's (:mod:`loramoe.lab`: its mix, its seed, its distractors), and each
fact's gold answer is the alias the base model finds likeliest (:func:`loramoe.lab.scoring.choose_gold`
with the lab's scoring settings). Per relation two tasks:

- ``loramoe_probe_<relation>_mc`` (``multiple_choice``): the statement, then ``" " + answer`` for
  the gold answer (first, the target) and the distractors in the lab's order, as the lab scores them.
  lm-eval's ``acc`` is the lab's ``mc`` and ``acc_norm`` its ``mc_norm`` (:mod:`loramoe.lab.measures`),
  except on an exact tie, which lm-eval gives to the gold answer and the lab counts wrong.
- ``loramoe_probe_<relation>_gen`` (``generate_until``): a greedy continuation of the statement
  (at most ``max_new_tokens`` of the lab), cut at the first newline, period or comma, is right when it
  equals one of the fact's aliases (:data:`EXACT_MATCH_RULE`).

Groups: ``loramoe_probe_mc`` and ``loramoe_probe_gen`` (shares over every fact), and ``loramoe_probe``
holding both. lm-eval is not needed to write them.
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import loramoe.lab.probe as probes
from loramoe import models
from loramoe.errors import OutputFolderError
from loramoe.fileio import atomic_write_text, ensure_writable_folder
from loramoe.lab.config import LabConfig, load_config
from loramoe.lab.mix import build_mix
from loramoe.lab.probe import Probe
from loramoe.lab.scoring import candidates, choose_gold

GROUP = "loramoe_probe"
STOP = ["\n", ".", ","]
"""Where a generated answer ends: every fact has an alias without these (``St. John's`` has
``Saint John's``)."""
# lm-eval strips the regexes first (articles in any case, then every whitespace), then lowercases
# and drops ASCII punctuation, on the prediction and each alias alike
IGNORED = [r"(?i)\b(?:a|an|the)\b", r"\s+"]
EXACT_MATCH_RULE = ("right when the continuation, cut at the first newline, period or comma, equals one of "
                    "the fact's aliases once both drop the articles a/an/the, all whitespace and ASCII "
                    "punctuation, ignoring case")

# lm-eval resolves `!function` next to the YAML that names it, whereas a relative `data_files`
# would be read from the working directory; this loader lets the folder be moved and run from anywhere
LOADER = '''"""Reads this folder's probe data for the task YAMLs beside it (their `custom_dataset`)."""

import json
from pathlib import Path

import datasets


def load(data_file, **metadata):
    rows = json.loads((Path(__file__).parent / data_file).read_text(encoding="utf-8"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
'''


def lab_probe(settings: LabConfig) -> Probe:
    """The probe ``loramoe lab`` builds with ``settings``: its mix is built only to keep out the
    facts it gives away, so it goes to a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        return probes.lab_probe(settings, build_mix(settings.mix, Path(folder), settings.seed).path)


def _yaml(lines: dict[str, Any]) -> str:
    """A flat task YAML; JSON scalars and lists are YAML too, ``!function`` values stay as given."""
    return "".join(f"{key}: {value if key == 'custom_dataset' else json.dumps(value)}\n"
                   for key, value in lines.items())


def _task(name: str, relation: str) -> dict[str, Any]:
    return {"task": name, "custom_dataset": "!function loader.load",
            "dataset_kwargs": {"data_file": f"data/{relation}.json"}, "test_split": "test",
            "doc_to_text": "statement", "target_delimiter": " "}


def _tasks(relation: str, max_new_tokens: int) -> dict[str, str]:
    mc, gen = f"{GROUP}_{relation}_mc", f"{GROUP}_{relation}_gen"
    exact = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True,
             "ignore_punctuation": True, "regexes_to_ignore": IGNORED}
    return {
        mc: _yaml({**_task(mc, relation), "output_type": "multiple_choice", "doc_to_choice": "choices",
                   "doc_to_target": 0, "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
                   "metadata": {"version": 1}}),
        gen: _yaml({**_task(gen, relation), "output_type": "generate_until", "doc_to_target": "aliases",
                    "generation_kwargs": {"until": STOP, "max_gen_toks": max_new_tokens, "do_sample": False},
                    "metric_list": [exact], "metadata": {"version": 1}}),
    }


def _group(name: str, tasks: list[str], metrics: list[str]) -> str:
    aggregate = [{"metric": m, "aggregation": "mean", "weight_by_size": True} for m in metrics]
    return _yaml({"group": name, "task": tasks, **({"aggregate_metric_list": aggregate} if metrics else {}),
                  "metadata": {"version": 1}})


def _readme(model: str, counts: dict[str, int]) -> str:
    rows = "".join(f"| {r} | {n} |\n" for r, n in counts.items())
    return (f"# The loramoe lab's knowledge probe as lm-evaluation-harness tasks\n\n"
            f"Written by loramoe {version('loramoe')}; gold answers chosen by `{model}`.\n\n"
            f"    lm_eval --model hf --model_args pretrained=MODEL --include_path THIS_FOLDER --tasks {GROUP}\n"
            f"    python -m loramoe.harness --model loramoe --model_args pretrained=MODEL,adapter=ADAPTER "
            f"--include_path THIS_FOLDER --tasks {GROUP}\n\n"
            f"`*_mc`: multiple choice by summed log-likelihood of \" \" + answer, gold first (acc, acc_norm).\n"
            f"`*_gen`: greedy continuation, exact match: {EXACT_MATCH_RULE}.\n\n"
            f"| relation | facts |\n| --- | --- |\n{rows}")


def _check_folder(folder: Path, overwrite: bool) -> Path:
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputFolderError(f"--export-harness {folder}: the folder is not empty; give a new folder, "
                                "or --overwrite to replace the export's files there")
    return ensure_writable_folder(folder, "--export-harness")


def export_probe(folder: Path, model: str = "smollm2-135m", *, overwrite: bool = False,
                 trust_remote_code: bool = False, settings: LabConfig | None = None) -> dict[str, Any]:
    """Write the probe's tasks into ``folder`` (see the module docstring) with gold answers chosen by
    ``model``; ``settings``: the lab's (default: the shipped ones). Returns what it wrote."""
    folder = _check_folder(Path(folder), overwrite)  # before the model loads, not after
    settings = settings or load_config()
    probe = lab_probe(settings)
    loaded, tokenizer = models.load(model, trust_remote_code=trust_remote_code)
    gold = choose_gold(loaded, tokenizer, probe, batch_size=settings.score.batch_size,
                       precision=settings.score.precision)
    rows: dict[str, list[dict[str, Any]]] = {r: [] for r in probe.relations}
    for fact, answer, choices in zip(probe.facts, gold, candidates(probe, gold)):
        rows[fact.example.relation or ""].append({"id": fact.example.id, "statement": fact.statement,
                                                  "gold": answer, "choices": list(choices),
                                                  "aliases": list(fact.aliases)})
    (folder / "data").mkdir(exist_ok=True)
    files: dict[str, str] = {"loader.py": LOADER}
    for relation, facts in rows.items():
        files[f"data/{relation}.json"] = json.dumps(facts, ensure_ascii=False, indent=1) + "\n"
        files.update({f"{name}.yaml": text for name, text in _tasks(relation, settings.score.max_new_tokens).items()})
    for kind, metrics in (("mc", ["acc", "acc_norm"]), ("gen", ["exact_match"])):
        files[f"{GROUP}_{kind}.yaml"] = _group(f"{GROUP}_{kind}", [f"{GROUP}_{r}_{kind}" for r in rows], metrics)
    files[f"{GROUP}.yaml"] = _group(GROUP, [f"{GROUP}_mc", f"{GROUP}_gen"], [])
    counts = {r: len(facts) for r, facts in rows.items()}
    files["README.md"] = _readme(model, counts)
    for name, text in files.items():
        atomic_write_text(folder / name, text)
    return {"folder": str(folder), "model": model, "facts": counts, "files": sorted(files)}
