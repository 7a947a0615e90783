"""Checks every lab report must pass, on a tiny model in test_lab.py and on the real model in
test_embedded.py: the files are there, the HTML is self-contained, and every number the report
prints is a number of results.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

from loramoe.lab.report import fmt, signed

NUMBER = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?")

TINY_LAB = """
model: {model}
mix: {{records: 16, knowledge_share: 0.25}}
train: {{batch_size: 4, max_length: 64, precision: fp32}}
variants:
{variants}
contrasts:
{contrasts}
score: {{points: 2, task_items: 2, chat_items: 1, generation_items: 1, max_new_tokens: 3, batch_size: 8,
        precision: fp32, bootstrap: 200}}
"""
"""A lab the tiny model runs in seconds; ``variants`` and ``contrasts`` are lab.yaml lines (indented)."""


def _numbers(value, out: set[str]) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _numbers(item, out)
    elif isinstance(value, list):
        for item in value:
            _numbers(item, out)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, (int, float)):
        out.update({fmt(value, d) for d in (1, 3, 4)} | {signed(value, d) for d in (1, 3)})
        if isinstance(value, float) and value.is_integer():
            out.add(fmt(int(value)))
    elif isinstance(value, str):
        out.update(NUMBER.findall(value))


def check_report(folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())
    for name in ("report.md", "report.html", "trajectories.png"):
        assert (folder / name).is_file(), name
    html = (folder / "report.html").read_text()
    assert "data:image/png;base64," in html and not re.search(r'src="(?!data:)', html)
    known: set[str] = set()
    _numbers(results, known)
    text = (folder / "report.md").read_text()
    text = re.sub(r"\]\([^)]*\)", "]", text)  # image file names are not numbers
    for number in NUMBER.findall(text):
        assert number in known, f"report.md prints {number}, which results.json does not hold"
    assert {"lab", "mix", "probe", "base", "arms", "equal_skill", "contrasts", "regime", "detectable"} <= set(results)
    for arm in results["arms"].values():
        assert {"path", "end", "chat", "generation", "trainable_parameters", "train_seconds"} <= set(arm)
    return results
