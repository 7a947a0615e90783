"""The lab's instruction mix, built offline from the built-in suites.

Downstream-task records (``type: task``) come from the train splits of the task benchmarks, and
closed-book QA records (``type: knowledge``) from the train splits of the fact relations, each
example asked in ``templates`` phrasings (the paper's augmentation by instruction templates). The
knowledge the lab measures afterwards is the relations' test splits, which share no fact with
these records (the split is by fact) and are further filtered for overlap with the largest mix.

The mix is the first ``records`` of one fixed, seeded order (facts and task kinds interleaved), so a
larger mix holds every smaller one; the points along a run's training take the place of data sizes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from loramoe.errors import UsageError
from loramoe.fileio import atomic_write_text
from loramoe.lab.config import MixConfig
from loramoe.suites import load_benchmark, to_training_records
from loramoe.suites.registry import MixRole, mix_names


@dataclass
class Mix:
    path: Path
    """The mix's JSONL file."""
    counts: dict[str, int]
    """Records per type, and ``total``."""


def _interleave(pools: list[list[list[dict]]], rng: random.Random) -> list[dict]:
    """Round-robin over the pools (each a shuffled list of one example's records), so any prefix
    holds every task kind about equally."""
    for pool in pools:
        rng.shuffle(pool)
    out: list[dict] = []
    for i in range(max(len(p) for p in pools)):
        for pool in pools:
            if i < len(pool):
                out.extend(pool[i])
    return out


def _pools(config: MixConfig, kind: MixRole, names: list[str], seed: int) -> list[list[list[dict]]]:
    benchmarks = mix_names(kind)
    pools = []
    for name in names:
        bench = load_benchmark(benchmarks[name], seed=seed)
        examples = [e for e in bench.train if e.context is None or len(e.context) <= config.max_context_chars]
        pools.append([to_training_records([e], type=kind, templates_per_example=config.templates, seed=seed,
                                         answer_style=config.answer_style)
                      for e in examples])
    return pools


def _write(path: Path, records: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def build_mix(config: MixConfig, folder: Path, seed: int = 0) -> Mix:
    """Writes ``mix.jsonl`` into ``folder``."""
    rng = random.Random(seed)
    roles: tuple[tuple[MixRole, list[str]], ...] = (("knowledge", config.knowledge), ("task", config.tasks))
    ordered = {kind: _interleave(_pools(config, kind, names, seed), rng) if names else [] for kind, names in roles}
    need = {"knowledge": round(config.records * config.knowledge_share)}
    need["task"] = config.records - need["knowledge"]
    for kind, count in need.items():
        if count > len(ordered[kind]):
            raise UsageError(f"mix: {config.records} records need {count} {kind} records but the built-in data "
                             f"gives {len(ordered[kind])} with these settings; lower mix.records, or raise "
                             f"mix.templates or mix.max_context_chars")
    records = _interleave_types(ordered["knowledge"][:need["knowledge"]], ordered["task"][:need["task"]])
    folder.mkdir(parents=True, exist_ok=True)
    return Mix(_write(folder / "mix.jsonl", records), {**need, "total": config.records})


def _interleave_types(knowledge: list[dict], task: list[dict]) -> list[dict]:
    """Knowledge records spread evenly among task records (training shuffles anyway; the file
    reads better)."""
    out, step = [], (len(task) + len(knowledge)) / max(len(knowledge), 1)
    ki = 0
    for i in range(len(task) + len(knowledge)):
        if ki < len(knowledge) and i >= ki * step:
            out.append(knowledge[ki])
            ki += 1
        else:
            out.append(task[i - ki])
    return out
