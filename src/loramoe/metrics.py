"""Scoring benchmark answers, and the language-modelling loss on general text.

Short answers are compared after the TriviaQA normalisation (``loramoe.suites.text.normalize_answer``,
the one the overlap filter uses too), against every accepted alias, keeping the best: exact match,
SQuAD v1.1 token F1, and ``contains_answer``, which asks whether an alias appears as whole words
anywhere in the answer. Small models answer a closed-book question with a sentence ("The capital
of France is Paris.") at least as often as with the bare answer, and exact match counts every such
answer wrong, so ``contains_answer`` is the primary closed-book QA accuracy; exact match and F1 are
reported beside it. Its flaw is that a hedge naming several candidates counts, so the three are
always read together.

ROUGE-L comes from ``rouge-score`` (with stemming; its tokenizer keeps only ASCII letters and
digits, which suits the English summaries it scores) and chrF and BLEU from ``sacrebleu``, rather
than hand-written versions, so the numbers compare with published ones. References may hold several
aliases per item: ROUGE-L keeps the best-matching one, sacrebleu uses them all as references.

Scales: the per-answer functions return what their libraries return (``exact_match``, ``token_f1``,
``contains_answer``, ``label_match``, ``rouge_l`` in [0, 1]; ``chrf`` and ``bleu`` in [0, 100]);
``score`` and ``per_item``, which feed reports, give everything in percent, and ``score`` is the mean
of ``per_item`` for every key except the corpus-level chrF and BLEU.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import NoReturn

import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loramoe.errors import UsageError
from loramoe.suites.base import Example, Metric
from loramoe.suites.text import normalize_answer

Answers = str | Sequence[str]
"""One reference, or its accepted aliases (canonical first)."""

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _aliases(answers: Answers) -> tuple[str, ...]:
    aliases = (answers,) if isinstance(answers, str) else tuple(answers)
    if not aliases:
        raise UsageError("an item has no reference answer to score against")
    return aliases


def exact_match(prediction: str, answers: Answers) -> float:
    """1.0 when the normalised prediction equals a normalised alias, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(alias) for alias in _aliases(answers)))


def token_f1(prediction: str, answers: Answers) -> float:
    """SQuAD v1.1 token F1 over normalised words, best alias; 0.0 when no word is shared."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for alias in _aliases(answers):
        reference = normalize_answer(alias).split()
        shared = sum((Counter(predicted) & Counter(reference)).values())
        if shared:
            precision, recall = shared / len(predicted), shared / len(reference)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def contains_answer(prediction: str, answers: Answers) -> float:
    """1.0 when a normalised alias occurs as whole words in the normalised prediction (so "Paris"
    is in "the capital of france is paris" but "Rome" is not in "romeo"), else 0.0."""
    predicted = f" {normalize_answer(prediction)} "
    return float(any(alias and f" {alias} " in predicted
                     for alias in map(normalize_answer, _aliases(answers))))


def label_match(prediction: str, answers: Answers, choices: Sequence[str] = ()) -> float:
    """1.0 when the prediction names the label, else 0.0: its normalised text equals a normalised
    label alias, or, given the allowed labels, the longest choice it starts with (as whole words) is
    a label alias. So "Sports." counts for ``sports``, and with choices "sports: the text covers a
    match" too; a label anywhere else ("The topic is sports") does not, as a choice mentioned later
    may be negated."""
    predicted = normalize_answer(prediction)
    labels = {normalize_answer(alias) for alias in _aliases(answers)}
    if predicted in labels:
        return 1.0
    starts = [choice for choice in map(normalize_answer, choices)
              if choice and f"{predicted} ".startswith(f"{choice} ")]
    return float(bool(starts) and max(starts, key=len) in labels)


def _check_lengths(predictions: Sequence[str], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise UsageError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise UsageError("nothing to score: no predictions")


def accuracy(predictions: Sequence[str], labels: Sequence[Answers],
             choices: Sequence[Sequence[str]] | None = None) -> float:
    """The share of predictions that name their label (``label_match``); ``choices[i]`` lists the
    allowed labels of item i."""
    _check_lengths(predictions, labels)
    if choices is not None and len(choices) != len(labels):
        raise UsageError(f"{len(choices)} choice lists for {len(labels)} labels")
    per_choice = choices if choices is not None else [()] * len(labels)
    return sum(map(label_match, predictions, labels, per_choice)) / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[Answers]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, stemmed), each item against its best-matching alias."""
    _check_lengths(predictions, references)
    return sum(_ROUGE.score_multi(list(_aliases(reference)), prediction)["rougeL"].fmeasure
               for prediction, reference in zip(predictions, references)) / len(predictions)


def _reference_streams(references: Sequence[Answers]) -> list[list[str | None]]:
    """sacrebleu's layout: stream k holds every item's k-th reference, None where an item has fewer."""
    aliases = [_aliases(reference) for reference in references]
    depth = max(map(len, aliases))
    return [[item[k] if k < len(item) else None for item in aliases] for k in range(depth)]


def chrf(predictions: Sequence[str], references: Sequence[Answers]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100."""
    _check_lengths(predictions, references)
    return sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score


def bleu(predictions: Sequence[str], references: Sequence[Answers]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams), 0-100."""
    _check_lengths(predictions, references)
    return sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score


def per_item(metric: Metric, prediction: str, example: Example) -> dict[str, float]:
    """One answer's scores in percent, for reports; translation gives sentence-level chrF and BLEU."""
    answers = example.answers
    if metric == "qa":
        return {"em": 100 * exact_match(prediction, answers), "f1": 100 * token_f1(prediction, answers),
                "contains": 100 * contains_answer(prediction, answers)}
    if metric == "rouge":
        return {"rougeL": 100 * rouge_l([prediction], [answers])}
    if metric == "translation":
        references = list(_aliases(answers))
        return {"chrf": sacrebleu.sentence_chrf(prediction, references).score,
                "bleu": sacrebleu.sentence_bleu(prediction, references).score,
                "em": 100 * exact_match(prediction, answers)}
    if metric == "accuracy":
        return {"accuracy": 100 * label_match(prediction, answers, example.choices)}
    _not_generative(metric)


def score(metric: Metric, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """A benchmark's scores in percent: qa -> em, f1, contains; rouge -> rougeL; translation ->
    corpus chrf and bleu, and em; accuracy -> accuracy."""
    _check_lengths(predictions, examples)
    items = [per_item(metric, prediction, example) for prediction, example in zip(predictions, examples)]
    means = {key: sum(item[key] for item in items) / len(items) for key in items[0]}
    if metric == "translation":
        references = [example.answers for example in examples]
        means.update(chrf=chrf(predictions, references), bleu=bleu(predictions, references))
    return means


def _not_generative(metric: str) -> NoReturn:
    if metric == "lm_loss":
        raise UsageError("metric 'lm_loss' scores text, not answers: use loramoe.metrics.lm_loss")
    raise UsageError(f"unknown metric '{metric}'; use qa, rouge, translation, accuracy or lm_loss")


def lm_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *,
            batch_size: int = 8, max_length: int = 512, progress: bool = True) -> dict[str, float]:
    """Next-token cross-entropy (nats) over every predicted token of ``texts``, token-weighted, its
    perplexity ``exp(cross_entropy)`` and the token count. Each text is tokenized on its own, with the
    special tokens the tokenizer adds (BOS), cut to its first ``max_length`` tokens, and batched with
    texts of similar length, right-padded; padding is masked out, so the result does not depend on
    the batch size (up to float rounding)."""
    if batch_size < 1 or max_length < 2:
        raise UsageError(f"batch_size must be at least 1 and max_length at least 2, "
                         f"got {batch_size} and {max_length}")
    encoded = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    encoded = sorted((ids for ids in encoded if len(ids) > 1), key=len, reverse=True)  # others predict nothing
    if not encoded:
        raise UsageError("no token to predict: every text is empty or a single token")
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        batches = range(0, len(encoded), batch_size)
        for start in tqdm(batches, desc="lm loss", unit="batch", disable=not progress):
            rows = encoded[start:start + batch_size]
            length = max(map(len, rows))
            ids = torch.zeros((len(rows), length), dtype=torch.long)  # any id: padding is masked out
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, :len(row)] = 1
            ids, mask = ids.to(model.device), mask.to(model.device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
            losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
            target_mask = mask[:, 1:].bool()
            total += losses[target_mask].double().sum().item()
            tokens += int(target_mask.sum())
    finally:
        model.train(was_training)
    cross_entropy = total / tokens
    return {"cross_entropy": cross_entropy, "perplexity": math.exp(cross_entropy), "tokens": tokens}
