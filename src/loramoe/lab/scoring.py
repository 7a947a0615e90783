"""Scoring one model at one point of its training on the lab's probe (:mod:`loramoe.lab.probe`).

Format-free measures, on every fact and task item, teacher-forced (:mod:`loramoe.likelihood`):

- ``gold_logprob``: log p(gold answer | statement), summed over the answer's tokens. The gold
  answer is the alias the base model finds likeliest (``choose_gold``), then fixed for every model.
- ``choices``: the same for the gold answer (first) and each distractor; multiple choice is
  right when the gold answer's is the largest.
- ``task_loss``: the mean per-token negative log-likelihood of each task item's reference answer,
  rendered as training renders a record.
- ``router``: for LoRAMoE, the gate share per item type, expert group and layer (prompt tokens):
  ``knowledge`` for the held-out fact statements, ``task`` for the task prompts, and at the end of
  a run ``questions`` for the same held-out facts asked as training asks (the chat question, as a
  record renders it): the router was trained on that format, so the two knowledge shares side by
  side say whether it learned to read the fact or the question's form.

At the end of a run (``final``) also what a user sees: greedy chat answers to a subset of the facts
and free answers to a subset of the task items.
"""

from __future__ import annotations

import re
from copy import deepcopy
from typing import Any

import torch
from torch import nn

from loramoe.adapters import LoraMoEConfig
from loramoe.attach import adapter_config
from loramoe.balance import group_mass
from loramoe.data import IGNORE_INDEX, read_records, tokenize_records
from loramoe.generation import generate
from loramoe.lab.probe import Probe
from loramoe.likelihood import continuation_logprobs

ALIASES = 4
"""Aliases per fact the base model chooses its gold answer among (canonical spelling first)."""
_LAYER = re.compile(r"\.(\d+)\.")


def _to_score(model: nn.Module, precision: str) -> nn.Module:
    """The model to score: itself in fp32, else a bf16 copy. A copy, not autocast: autocast casts
    every weight again at each call, which is most of the time of a decoded token; and the model
    may be in the middle of its training, which must go on untouched."""
    return deepcopy(model).to(torch.bfloat16) if precision == "bf16" else model


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The tokens a candidate answer is scored as: after a space, as it follows its statement."""
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"]


def candidates(probe: Probe, gold: list[str]) -> list[tuple[str, ...]]:
    """Per fact, the answers multiple choice is among: the gold answer first, then the distractors."""
    return [(g, *f.distractors) for f, g in zip(probe.facts, gold)]


def _statement_ids(tokenizer, probe: Probe) -> list[list[int]]:
    return [tokenizer(f.statement)["input_ids"] for f in probe.facts]


def choose_gold(model: nn.Module, tokenizer, probe: Probe, *, batch_size: int, precision: str) -> list[str]:
    """Per fact, the alias (of its first ``ALIASES``) the model gives the highest log-probability."""
    options = [f.aliases[:ALIASES] for f in probe.facts]
    scored = continuation_logprobs(_to_score(model, precision), _statement_ids(tokenizer, probe),
                                   [[answer_ids(tokenizer, a) for a in o] for o in options],
                                   pad_id=tokenizer.pad_token_id, batch_size=batch_size)
    return [o[max(range(len(o)), key=lambda j: sum(lp[j]))] for o, lp in zip(options, scored.logprobs)]


def _record_sequences(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
    """Instruction/answer pairs rendered as training renders a record, split into the prompt's
    tokens and the answer's."""
    records, _ = read_records([[{"instruction": prompt, "output": answer} for prompt, answer in pairs]])
    rows = tokenize_records(records, tokenizer, max_length=1 << 16)
    prompts, answers = [], []
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompts.append(ids[:start])
        answers.append(ids[start:])
    return prompts, answers


def router_shares(gates: dict[str, torch.Tensor], config: LoraMoEConfig) -> dict[str, list[float]]:
    """Per expert group, the mean gate share of the items per layer index (projections of one
    layer averaged), from (items, E) gate means per LoRAMoE layer path."""
    groups = list(config.groups or {"all": config.num_experts})
    of_expert = torch.tensor(config.expert_groups())
    by_layer: dict[int, list[torch.Tensor]] = {}
    for path, values in gates.items():
        match = _LAYER.search(path)
        by_layer.setdefault(int(match.group(1)) if match else 0, []).append(values)
    shares = [group_mass(torch.stack(v).mean(0), of_expert, len(groups)).mean(0)  # per layer (G,)
              for _, v in sorted(by_layer.items())]
    return {name: [round(float(s[g]), 5) for s in shares] for g, name in enumerate(groups)}


def score_point(model: nn.Module, tokenizer, probe: Probe, gold: list[str], *, step: int, final: bool,
                batch_size: int, max_new_tokens: int, precision: str) -> dict[str, Any]:
    """Every measure of the module docstring for ``model`` as it is now (see there)."""
    config = adapter_config(model)
    routed = isinstance(config, LoraMoEConfig)
    pad = tokenizer.pad_token_id
    scored_model = _to_score(model, precision)
    facts = continuation_logprobs(
        scored_model, _statement_ids(tokenizer, probe),
        [[answer_ids(tokenizer, a) for a in c] for c in candidates(probe, gold)],
        pad_id=pad, batch_size=batch_size, prompt_routing=routed)
    prompts, answers = _record_sequences(tokenizer, [(t.example.prompt, t.example.answers[0]) for t in probe.tasks])
    tasks = continuation_logprobs(scored_model, prompts, [[a] for a in answers], pad_id=pad,
                                  batch_size=max(1, batch_size // 4), prompt_routing=routed)
    point: dict[str, Any] = {
        "step": step,
        "choices": [[round(sum(c), 5) for c in lp] for lp in facts.logprobs],
        "task_loss": [round(-sum(lp[0]) / len(lp[0]), 5) for lp in tasks.logprobs],
    }
    if routed:
        point["router"] = {"knowledge": router_shares(facts.prompt_gates, config),
                           "task": router_shares(tasks.prompt_gates, config)}
        if final:
            asked, golds = _record_sequences(tokenizer, [(f.example.prompt, g) for f, g in zip(probe.facts, gold)])
            questions = continuation_logprobs(scored_model, asked, [[a] for a in golds], pad_id=pad,
                                              batch_size=max(1, batch_size // 4), prompt_routing=True)
            point["router"]["questions"] = router_shares(questions.prompt_gates, config)
    if final:
        examples = [probe.facts[i].example for i in probe.chat] + \
            [probe.tasks[i].example for i in probe.generation]
        replies = generate(scored_model, tokenizer, examples, style="chat", max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=False)
        point["chat"] = replies[:len(probe.chat)]
        point["generation"] = replies[len(probe.chat):]
    return point
