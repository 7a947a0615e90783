"""The knowledge measures per fact, from one scored point's ``choices`` (each candidate answer's
log-probability after the statement, summed over its tokens, the gold answer first), and what the
candidates' lengths alone would choose.

- ``gold_logprob``: the gold answer's summed log-probability (nats). Moving probability to other
  continuations than the candidates lowers it without losing the fact.
- ``mc``: right (100) when the gold answer's summed log-probability is the largest, else 0: lm-eval's
  ``acc``. A sum favours candidates of fewer tokens.
- ``gold_share``: the gold answer's log-probability normalised over the candidates, the log-softmax
  of their summed log-probabilities at the gold (nats, at most 0): only how the model ranks the
  candidates against each other counts, not how much probability it leaves outside them.
- ``mc_norm``: lm-eval's ``acc_norm`` for ``output_type: multiple_choice``: each candidate's summed
  log-probability divided by its length in characters, the answer string without the space before
  it (lm-eval scores ``target_delimiter + choice`` and divides by ``len(choice)``); right when the
  gold answer's quotient is the largest. Ties count as wrong, as in ``mc``: the gold answer is always
  first here, so lm-eval's first-index ``argmax`` would hand it every tie.

The length-only baseline scores every candidate by its token count alone, fewest first (what a
summed log-probability favours); a tie of ``t`` candidates that includes the gold answer counts
``1/t``. Where it comes close to the base model's own accuracy, length alone could make the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loramoe.lab.probe import Probe
from loramoe.lab.scoring import answer_ids, candidates


@dataclass(frozen=True)
class Lengths:
    """Each fact's candidates (gold first) measured, from the tokenizer and the base model's gold
    answers alone: no model runs, so results are built from cached points without scoring again."""

    chars: np.ndarray
    """(facts, choices): characters of each answer string (lm-eval's ``len(choice)``)."""
    tokens: np.ndarray
    """(facts, choices): tokens each candidate is scored as (:func:`loramoe.lab.scoring.answer_ids`)."""


def candidate_lengths(tokenizer, probe: Probe, gold: list[str]) -> Lengths:
    answers = candidates(probe, gold)
    return Lengths(np.array([[len(a) for a in c] for c in answers], dtype=float),
                   np.array([[len(answer_ids(tokenizer, a)) for a in c] for c in answers], dtype=float))


def gold_share(choices: np.ndarray) -> np.ndarray:
    """(facts, choices) summed log-probabilities, gold first -> (facts,) log-softmax at the gold."""
    return choices[:, 0] - np.logaddexp.reduce(choices, axis=1)


def _gold_wins(scores: np.ndarray) -> np.ndarray:
    return np.where(scores[:, 0] > scores[:, 1:].max(axis=1), 100.0, 0.0)


def fact_measures(point: dict[str, Any], lengths: Lengths) -> dict[str, np.ndarray]:
    """Every measure of the module docstring, per fact, for one scored point."""
    choices = np.array(point["choices"], dtype=float)
    return {"gold_logprob": choices[:, 0], "mc": _gold_wins(choices), "gold_share": gold_share(choices),
            "mc_norm": _gold_wins(choices / lengths.chars)}


def _shortest(tokens: np.ndarray) -> np.ndarray:
    """(facts, choices): whether each candidate has the fewest tokens of its fact."""
    return tokens == tokens.min(axis=1, keepdims=True)


def length_only(tokens: np.ndarray) -> np.ndarray:
    """Per fact, the length-only baseline's score (points): 100 / t when the gold answer is among the
    t candidates of fewest tokens, else 0."""
    shortest = _shortest(tokens)
    return np.where(shortest[:, 0], 100.0 / shortest.sum(axis=1), 0.0)


def length_table(probe: Probe, base: dict[str, Any], lengths: Lengths) -> dict[str, Any]:
    """Per relation and over all facts: the candidates' mean lengths, the length-only baseline's
    accuracy next to the base model's (summed and length-normalised), and how often a length-only
    pick (drawn evenly among ties) is the base model's own pick (percent)."""
    know = fact_measures(base, lengths)
    choices = np.array(base["choices"], dtype=float)
    shortest = _shortest(lengths.tokens)
    picked = shortest[np.arange(len(choices)), choices.argmax(axis=1)]
    agrees = np.where(picked, 100.0 / shortest.sum(axis=1), 0.0)
    baseline = length_only(lengths.tokens)
    relations = np.array([f.example.relation for f in probe.facts])

    def summary(rows: np.ndarray) -> dict[str, Any]:
        return {"facts": int(rows.sum()),
                "gold_tokens": float(lengths.tokens[rows, 0].mean()),
                "distractor_tokens": float(lengths.tokens[rows, 1:].mean()),
                "gold_chars": float(lengths.chars[rows, 0].mean()),
                "distractor_chars": float(lengths.chars[rows, 1:].mean()),
                "length_only_mc": float(baseline[rows].mean()),
                "base_mc": float(know["mc"][rows].mean()), "base_mc_norm": float(know["mc_norm"][rows].mean()),
                "base_picks_length_only": float(agrees[rows].mean())}

    return {"chance": 100.0 / lengths.tokens.shape[1],
            "per_relation": {r: summary(relations == r) for r in probe.relations},
            "all": summary(np.ones(len(relations), dtype=bool))}
