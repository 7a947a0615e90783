"""A user's own file of records as a benchmark, read as training data is read
(``loramoe.data.read_records``: JSON Lines, JSON, CSV or Parquet, either record shape).

Every record is a test item: the prompt is its user message, the one reference its output. A
record is one request and one answer, so conversations with several user turns or a system
message are refused (an ``Example`` holds a single request, and dropping the rest would change
what is asked). For ``accuracy`` the labels (``choices``) are every distinct output in the file;
for ``lm_loss`` the text scored is the user message and the output together.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import get_args

from loramoe.data import DataError, Record, read_records
from loramoe.errors import UsageError
from loramoe.suites.base import Benchmark, Example, Metric, PromptStyle


def _request(record: Record) -> str:
    roles = [message["role"] for message in record.messages]
    if roles != ["user", "assistant"]:
        raise DataError(f"{record.source}: a benchmark item is one user message and one answer; this record "
                        f"has {' -> '.join(roles)} (several turns or a system message cannot be asked as one prompt)")
    return record.messages[0]["content"]


def load_user_benchmark(path: str | os.PathLike, *, metric: Metric, name: str | None = None,
                        prompt_style: PromptStyle = "chat", type: str | None = None) -> Benchmark:
    """All of the file's records as test items (ids ``<name>/<i>``, i from 0 in file order).

    ``name`` defaults to ``user/<file stem>``; ``type`` to the records' ``type`` when they all
    share one, else ``user``. With ``prompt_style="completion"`` the user message is also the
    text to continue (``Example.completion``)."""
    if metric not in get_args(Metric):
        raise UsageError(f"unknown metric '{metric}'; use one of: {', '.join(get_args(Metric))}")
    if prompt_style not in get_args(PromptStyle):
        raise UsageError(f"unknown prompt style '{prompt_style}'; use one of: {', '.join(get_args(PromptStyle))}")
    records, _ = read_records([path])
    name = name or f"user/{Path(path).stem}"
    outputs = [record.messages[-1]["content"] for record in records]
    choices = tuple(sorted(set(outputs))) if metric == "accuracy" else ()
    examples = []
    for i, (record, output) in enumerate(zip(records, outputs)):
        request = _request(record)
        if metric == "lm_loss":
            examples.append(Example(id=f"{name}/{i}", prompt=f"{request}\n\n{output}"))
            continue
        examples.append(Example(id=f"{name}/{i}", prompt=request, answers=(output,), choices=choices,
                                completion=request if prompt_style == "completion" else None))
    if type is None:
        shared = {record.type for record in records}
        only = next(iter(shared))
        type = only if len(shared) == 1 and only is not None else "user"
    return Benchmark(name, type, metric, prompt_style, train=[], test=examples)
