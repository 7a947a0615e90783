"""Instruction data for training: records from files and lists, tokenized with a loss on answers.

A record is ``{"instruction", "input"?, "output", "type"?}`` or ``{"messages": [{"role",
"content"}, ...], "type"?}``; both become messages ending with the assistant's response, the
``input`` joining the instruction after a blank line in one user message (so a chat template and
the plain template see the same text). Messages are an optional system message, then user and
assistant turns alternating, which every template can render. ``type`` is a free string naming
the expert group of a sample; records in the paper's own format, ``task_type`` 1 or 0 instead of
``type``, are typed ``knowledge`` and ``task``. A ``null`` or an empty CSV cell counts as absent (Parquet and CSV
cannot tell them apart). Other fields are not read: one warning names them and counts their records
(a misspelt ``input`` or ``type`` would train unnoticed), or ``strict_fields`` makes them an error;
``subject`` and ``relation``, which loramoe's own fact records carry for ``filter_overlap``, pass.

Where records come from (files, ``datasets`` folders, the hub, column mappings) is
:mod:`loramoe.data_sources`.

Prompts use the tokenizer's chat template when it has one; otherwise ``PLAIN_TEMPLATE`` per user
turn, ``"### System:\\n{content}\\n\\n"`` for a system message, each earlier answer and a blank
line, and EOS after the response. When a template's generation prompt is not a prefix of the
whole conversation it renders, a sample is the prompt's tokens, the response's and EOS. The loss
covers the last assistant message and what ends it (the template's end-of-turn tokens, or EOS);
earlier answers are context only, as multi-turn data often holds answers nobody checked.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from loramoe.data_sources import RECORD_FIELDS, map_columns, open_source, parse_columns
from loramoe.errors import DataError, UsageError

PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
"""The prompt of a user turn for tokenizers without a chat template (the response follows it)."""

IGNORE_INDEX = -100
"""The label of tokens the loss skips (the prompt, and padding)."""

_PLAIN_SYSTEM = "### System:\n{content}\n\n"
_INSTRUCTION_FIELDS = {"instruction", "input", "output"}
_KNOWN_FIELDS = {*RECORD_FIELDS, "subject", "relation"}
_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "attention_mask": datasets.List(datasets.Value("int8")),
    "labels": datasets.List(datasets.Value("int32")),
    "sample_type": datasets.Value("int32"),
    "content_start": datasets.Value("int32"),
})


@dataclass(frozen=True)
class Record:
    messages: list[dict[str, str]]
    """``{"role", "content"}`` dicts; the last one is the assistant's response."""
    type: str | None
    source: str
    """Where the record came from, for error messages: ``file.jsonl:12`` or ``<list>[3]``."""


def record_content(record: Record) -> bytes:
    """A record's conversation and type as bytes: what the run's data hash must see, and nothing of
    where it came from (the validation split groups records by their conversation alone)."""
    return json.dumps([record.messages, record.type], sort_keys=True).encode()


def read_records(sources: Sequence[str | os.PathLike | list[dict]], *, skip_bad: bool = False,
                 columns: Sequence[str] | Mapping[str, str] | None = None,
                 strict_fields: bool = False) -> tuple[list[Record], int]:
    """Reads every source in order; returns the records and the number of bad records skipped (0
    unless ``skip_bad``). With ``skip_bad=False`` the first bad record raises DataError. With
    ``skip_bad=True`` bad records are skipped, counted, and a warning reports the count per file.
    An empty file (or one where every record is bad) is always an error. A source is a file, a
    ``datasets`` folder (``folder`` or ``folder:split``), a hub dataset (``hub:NAME[:CONFIG]:SPLIT``)
    or a list of dicts; ``columns`` maps each row's columns to record fields
    (:mod:`loramoe.data_sources`). Fields no record shape has get one warning for all sources,
    or with ``strict_fields`` make their record bad (see the module docstring)."""
    if isinstance(sources, (str, os.PathLike)):
        raise TypeError("read_records takes a list of sources; put the single path in a list")
    mapping = parse_columns(columns)
    records: list[Record] = []
    skipped = 0
    unread: Counter[str] = Counter()
    carriers, first_carrier = 0, None
    for source in sources:
        name, entries = open_source(source)
        entries = map_columns(entries, mapping)
        before, bad, first_error = len(records), 0, None
        for where, raw in entries:
            try:
                records.append(_to_record(raw, where, strict_fields))
            except DataError as error:
                if not skip_bad:
                    raise
                bad, first_error = bad + 1, first_error or error
                continue
            if extra := _unread_fields(raw):
                unread.update(extra)
                carriers, first_carrier = carriers + 1, first_carrier or where
        good = len(records) - before
        if not good:
            why = f"all {bad} are bad; the first: {first_error}" if bad else "it is empty"
            raise DataError(f"{name}: no records ({why})")
        if bad:
            warnings.warn(f"{name}: skipped {bad} bad record(s) of {bad + good}; the first: {first_error}",
                          stacklevel=2)
        skipped += bad
    if unread:
        counts = ", ".join(f"'{field}' ({n})" for field, n in unread.most_common())
        warnings.warn(f"{carriers} of {len(records)} records have fields loramoe does not read: {counts}; the "
                      f"first at {first_carrier}. They are ignored; a record's fields are {', '.join(RECORD_FIELDS)} "
                      "(--columns maps other names). --strict-fields makes this an error.", stacklevel=2)
    return records, skipped


def _unread_fields(raw: Mapping[str, Any]) -> list[str]:
    return [str(key) for key, value in raw.items() if value is not None and key not in _KNOWN_FIELDS]


def _string(fields: Mapping[str, Any], key: str, source: str, label: str | None = None, *,
            required: bool = True) -> str | None:
    value = fields.get(key)
    if value is None:
        if required:
            raise DataError(f"{source}: field '{label or key}' is missing")
        return None
    if not isinstance(value, str):
        raise DataError(f"{source}: field '{label or key}' must be a string, found {type(value).__name__}")
    return value


def _to_record(raw: object, source: str, strict_fields: bool = False) -> Record:
    if isinstance(raw, DataError):  # the reader could not parse it
        raise raw
    if not isinstance(raw, Mapping):
        raise DataError(f"{source}: a record must be an object, found {type(raw).__name__}")
    if strict_fields and (extra := _unread_fields(raw)):  # before the shape: a misspelt field is often why it is bad
        raise DataError(f"{source}: field '{extra[0]}' is not a record field ({', '.join(RECORD_FIELDS)}); "
                        "correct or remove it, or leave out --strict-fields to ignore it")
    fields = {key: value for key, value in raw.items() if value is not None}
    record_type = _string(fields, "type", source, required=False)
    if record_type is None and "task_type" in fields:
        record_type = _paper_type(fields["task_type"], source)
    if "messages" in fields:
        if fields.keys() & _INSTRUCTION_FIELDS:
            other = min(fields.keys() & _INSTRUCTION_FIELDS)
            raise DataError(f"{source}: field 'messages' and field '{other}' in one record; use one shape")
        return Record(_messages(fields["messages"], source), record_type, source)
    if not fields.keys() & _INSTRUCTION_FIELDS:
        found = ", ".join(map(str, fields)) or "none"
        raise DataError(f"{source}: a record needs fields 'instruction' and 'output', or 'messages' "
                        f"(found: {found})")
    instruction = _string(fields, "instruction", source)
    output = _string(fields, "output", source)
    extra = _string(fields, "input", source, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Record([{"role": "user", "content": prompt}, {"role": "assistant", "content": output}],
                  record_type, source)


PAPER_TYPES = {1: "knowledge", 0: "task"}
"""The paper's code marks a record ``task_type`` 1 (world knowledge) or 0 (the other tasks)."""


def _paper_type(value: object, source: str) -> str:
    if isinstance(value, bool) or value not in PAPER_TYPES:
        raise DataError(f"{source}: field 'task_type' is {value!r}; the paper's format has 1 (world knowledge, "
                        "type 'knowledge') or 0 (other tasks, type 'task')")
    return PAPER_TYPES[value]


def _messages(value: object, source: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        found = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(f"{source}: field 'messages' must be a non-empty list of messages, found {found}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(f"{source}: field 'messages[{i}]' must be an object with 'role' and 'content', "
                            f"found {type(message).__name__}")
        messages.append({key: _string(message, key, source, f"messages[{i}].{key}")
                         for key in ("role", "content")})
    first = 1 if messages[0]["role"] == "system" else 0
    for i in range(first, len(messages)):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise DataError(f"{source}: field 'messages[{i}].role' is '{messages[i]['role']}', expected "
                            f"'{expected}' (an optional system message, then user and assistant alternating)")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{source}: field 'messages' must end with the assistant's response, "
                        f"not a '{messages[-1]['role']}' message")
    return messages


def tokenize_records(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                     type_ids: Mapping[str, int] | None = None,
                     require_types: bool = False) -> datasets.Dataset:
    """Columns: ``input_ids``, ``attention_mask``, ``labels`` (``IGNORE_INDEX`` on the prompt),
    ``sample_type`` (``type_ids[type]``, or -1 for untyped records and types not in ``type_ids``)
    and ``content_start``: where the record's own tokens start, after the chat template's opening
    (its default system prompt, the user header) that every record shares (:func:`shared_prefix`).

    With ``require_types`` every record's type must be in ``type_ids`` (else DataError); without
    it, records of a type ``type_ids`` lacks train untyped, and one warning counts them per type
    (when ``type_ids`` is given: only LoRAMoE's groups claim types). Longer
    sequences than ``max_length`` keep their start, and one warning says how many were cut. A sample
    whose prompt fills ``max_length`` keeps no label, so it is dropped, and the warning counts it: a
    batch of only such samples would have a loss of 0/0, which is no divergence. If every sample is
    dropped, DataError.
    """
    if max_length < 1:
        raise UsageError(f"max_length must be at least 1, got {max_length}")
    grouped, type_ids = type_ids is not None, dict(type_ids or {})
    if require_types:
        known = ", ".join(sorted(type_ids)) or "none"
        for record in records:
            if record.type not in type_ids:
                problem = ("is missing" if record.type is None
                           else f"is '{record.type}', which no expert group claims")
                raise DataError(f"{record.source}: field 'type' {problem}; known types: {known}")
    unclaimed = Counter(record.type for record in records if record.type is not None and record.type not in type_ids)
    if unclaimed and grouped:
        counts = ", ".join(f"'{name}': {n}" for name, n in unclaimed.most_common())
        claimed = ", ".join(type_ids) or "none (the experts form one pool without groups)"
        warnings.warn(f"{sum(unclaimed.values())} of {len(records)} records have a type that no expert group "
                      f"claims ({counts}); they train untyped. Groups: {claimed}. --require-types makes this an "
                      "error.", stacklevel=2)
    columns: dict[str, list] = {name: [] for name in _FEATURES}
    truncated = unlabelled = 0
    opening = shared_prefix(tokenizer)
    for record in records:
        ids, prompt_length = _encode(record.messages, tokenizer)
        start = 0
        while start < min(len(opening), prompt_length) and ids[start] == opening[start]:
            start += 1
        labels = [IGNORE_INDEX] * prompt_length + ids[prompt_length:]
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
            if prompt_length >= max_length:
                unlabelled += 1
                continue
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append(labels)
        columns["sample_type"].append(type_ids.get(record.type, -1))  # untyped: None is never a key
        columns["content_start"].append(min(start, len(ids) - 1))
    if unlabelled == len(records) and records:
        raise DataError(f"{records[0].source}: every sample's prompt fills max_length={max_length} tokens, "
                        f"so none has a response to learn; raise --max-length")
    if truncated:
        lost = (f"; {unlabelled} of them kept nothing of the response and were dropped (nothing to learn)"
                if unlabelled else "")
        warnings.warn(f"{truncated} of {len(records)} samples are longer than max_length={max_length} "
                      f"tokens and were truncated, keeping the start{lost}", stacklevel=2)
    return datasets.Dataset.from_dict(columns, features=_FEATURES)


def shared_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens every single-turn record's prompt starts with: the prompt of an empty user turn,
    up to where its (empty) instruction would be. A record's tokens match it for as long as the
    template is all they are, so the longest common prefix with it is the template's opening."""
    return encode_prompt([{"role": "user", "content": ""}], tokenizer)


def encode_prompt(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a conversation that ends with a user turn, up to where the answer starts: what
    generation is given, rendered exactly as training renders the prompt."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    return tokenizer(_plain_prompt(messages + [{"role": "assistant", "content": ""}]))["input_ids"]


def _encode(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], int]:
    """The token ids of a whole conversation, and how many of them are prompt."""
    prompt = encode_prompt(messages[:-1], tokenizer)
    if tokenizer.chat_template:
        full = list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
        if full[:len(prompt)] == prompt:
            return full, len(prompt)
        # the template renders the history differently once an answer follows (some drop earlier
        # reasoning): train on the prompt as generation will see it, then the response and EOS
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no EOS token to end responses with; set tokenizer.eos_token")
    response = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    return prompt + response + [tokenizer.eos_token_id], len(prompt)


def _plain_prompt(messages: list[dict[str, str]]) -> str:
    """Everything before the response, in the plain format of the module docstring."""
    parts = []
    for message in messages[:-1]:
        if message["role"] == "system":
            parts.append(_PLAIN_SYSTEM.format(content=message["content"]))
        elif message["role"] == "user":
            parts.append(PLAIN_TEMPLATE.format(instruction=message["content"]))
        else:  # an earlier answer: it follows the "### Response:" header of its user turn
            parts.append(f"{message['content']}\n\n")
    return "".join(parts)


class DataCollator:
    """Pads a batch to its longest sample, on the right: ``input_ids`` with the pad token,
    ``attention_mask`` with 0 and ``labels`` with ``IGNORE_INDEX``; ``sample_type`` and
    ``content_start`` (0 where a feature lacks it) become (batch,) tensors. All long tensors.
    ``pad_to_multiple_of`` rounds the length up (tensor cores)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None):
        if tokenizer.pad_token_id is None:
            raise UsageError("the tokenizer has no pad token; set tokenizer.pad_token "
                             "(loramoe.models.load uses the EOS token)")
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {}
        for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
            batch[key] = torch.full((len(features), length), pad, dtype=torch.long)
            for row, feature in zip(batch[key], features):
                values = torch.as_tensor(feature[key], dtype=torch.long)
                row[:len(values)] = values
        batch["sample_type"] = torch.tensor([int(f["sample_type"]) for f in features], dtype=torch.long)
        batch["content_start"] = torch.tensor([int(f.get("content_start", 0)) for f in features], dtype=torch.long)
        return batch
