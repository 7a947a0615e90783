"""Metrics: hand-computed normalisation, EM, F1, containment and label cases; the libraries'
documented examples and hand-computable cases for ROUGE-L, chrF and BLEU; lm_loss against a
cross-entropy computed by hand on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import torch

from loramoe.metrics import (
    accuracy,
    bleu,
    chrf,
    contains_answer,
    exact_match,
    label_match,
    lm_loss,
    normalize_answer,
    per_item,
    rouge_l,
    score,
    token_f1,
)
from loramoe.suites.base import Example
from tests.conftest import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize("text, expected", [
    ("The_Beatles", "beatles"),
    ("‘Hello’ World!", "hello world"),
    ("“Quoted” ´text` here", "quoted text here"),
    ("  A Tale of Two   Cities. ", "tale of two cities"),
    ("Saint-Denis", "saint denis"),
    ("an apple and the pear", "apple and pear"),
    ("Theatre Anthem", "theatre anthem"),  # articles only as whole words
    ("don't", "don t"),
    ("The", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_the_best_alias():
    assert exact_match("J.R.R. Tolkien", ["Tolkien", "J. R. R. Tolkien"]) == 1.0
    assert exact_match("the Paris", "Paris.") == 1.0
    assert exact_match("Paris, France", ["Paris", "Lutetia"]) == 0.0


def test_token_f1_is_squad_f1_over_aliases():
    # "eiffel tower in paris" vs "eiffel tower": 2 shared, precision 2/4, recall 2/2
    assert token_f1("The Eiffel Tower, in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    # best alias: "tower" alone gives precision 1/4, recall 1 -> 0.4; the full name wins
    assert token_f1("The Eiffel Tower, in Paris", ["tower", "Eiffel Tower"]) == pytest.approx(2 / 3)
    assert token_f1("paris paris", "paris") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts are clipped
    assert token_f1("London", ["Paris", "Lutetia"]) == 0.0
    assert token_f1("", "Paris") == 0.0


def test_contains_answer_needs_whole_words():
    assert contains_answer("The capital of France is Paris.", ["Paris"]) == 1.0
    assert contains_answer("It is New York City", ["NYC", "New_York"]) == 1.0
    assert contains_answer("Parisian food", "Paris") == 0.0
    assert contains_answer("Romeo", "Rome") == 0.0
    assert contains_answer("The answer", "The") == 0.0  # an alias that normalises to nothing never matches


def test_an_item_without_references_is_an_error():
    with pytest.raises(ValueError, match="no reference"):
        exact_match("Paris", [])


def test_label_match_and_accuracy():
    choices = ("sports", "politics", "new", "new york")
    assert label_match("Sports.", "sports") == 1.0
    assert label_match("sports: the text covers a match", "sports") == 0.0  # no choices: equality only
    assert label_match("sports: the text covers a match", "sports", choices) == 1.0
    assert label_match("The topic is sports", "sports", choices) == 0.0
    assert label_match("New York, clearly", "new york", choices) == 1.0  # the longest choice wins
    assert label_match("New York, clearly", "new", choices) == 0.0
    assert label_match("politics", "sports", choices) == 0.0
    predictions = ["Sports.", "sports and more", "politics"]
    assert accuracy(predictions, ["sports", "sports", "sports"]) == pytest.approx(1 / 3)
    assert accuracy(predictions, ["sports", "sports", "sports"], [choices] * 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 3"):
        accuracy(predictions[:2], ["a", "b", "c"])


def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 of 6 words each way
    assert rouge_l(["the cat lay on the mat"], ["the cat sat on the mat"]) == pytest.approx(5 / 6)
    # LCS 3: precision 3/3, recall 3/6 -> F 2/3; the second item matches after stemming (cats -> cat)
    assert rouge_l(["cat on mat", "the cats sat"], ["the cat sat on the mat", "The cat sat."]) == \
        pytest.approx((2 / 3 + 1) / 2)
    # several aliases: the best-matching one counts
    assert rouge_l(["cat on mat"], [["a dog", "the cat sat on the mat"]]) == pytest.approx(2 / 3)


# sacrebleu's README: two reference streams for three segments
README_HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
README_STREAMS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
                  ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]


def test_chrf_and_bleu_reproduce_the_sacrebleu_readme():
    per_item_aliases = [list(aliases) for aliases in zip(*README_STREAMS)]
    assert bleu(README_HYPS, per_item_aliases) == pytest.approx(48.53, abs=0.005)
    assert chrf(README_HYPS, per_item_aliases) == pytest.approx(59.73, abs=0.005)


def test_chrf_and_bleu_by_hand_and_with_uneven_aliases():
    assert bleu(["the quick brown fox jumps"], ["the quick brown fox jumps"]) == pytest.approx(100)
    assert chrf(["the quick brown fox jumps"], [["a slow dog", "the quick brown fox jumps"]]) == pytest.approx(100)
    assert bleu(["a b c d"], ["e f g h"]) == 0.0
    # an item with fewer aliases is padded with None, which sacrebleu skips
    references = [["The dog bit the man.", "The dog had bit the man."], "It was not unexpected."]
    streams = [[references[0][0], references[1]], [references[0][1], None]]
    expected = sacrebleu.corpus_bleu(README_HYPS[:2], streams)
    assert bleu(README_HYPS[:2], references) == pytest.approx(expected.score)


def test_score_dispatches_by_metric_in_percent():
    qa = [Example("a", "capital of France?", ("Paris", "Lutetia")), Example("b", "capital of Peru?", ("Lima",))]
    assert score("qa", ["The capital is Paris.", "Lima"], qa) == pytest.approx(
        {"em": 50.0, "f1": (50.0 + 100.0) / 2, "contains": 100.0})  # "capital is paris" vs "paris": F1 0.5
    assert per_item("qa", "Lima", qa[1]) == {"em": 100.0, "f1": 100.0, "contains": 100.0}
    summary = [Example("s", "summarise", ("the cat sat on the mat",))]
    assert score("rouge", ["the cat lay on the mat"], summary) == pytest.approx({"rougeL": 500 / 6})
    labels = [Example("c", "topic?", ("sports",), choices=("sports", "politics"))]
    assert score("accuracy", ["Sports: a match"], labels) == {"accuracy": 100.0}
    translation = [Example(str(i), "translate", aliases) for i, aliases in enumerate(zip(*README_STREAMS))]
    result = score("translation", README_HYPS, translation)
    assert result == pytest.approx({"chrf": 59.73, "bleu": 48.53, "em": 100 / 3}, abs=0.005)
    item = per_item("translation", README_HYPS[0], translation[0])
    assert item["bleu"] == pytest.approx(100) and item["chrf"] == pytest.approx(100) and item["em"] == 100.0


def test_score_rejects_what_it_cannot_score():
    example = Example("t", "some text")
    with pytest.raises(ValueError, match="use loramoe.metrics.lm_loss"):
        score("lm_loss", ["x"], [example])
    with pytest.raises(ValueError, match="unknown metric 'bogus'"):
        score("bogus", ["x"], [example])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nothing to score"):
        score("qa", [], [])


# no word starts with "w1": the tokenizer would split off its EOS token "w1"
TEXTS = ["w5 w6 w7 w8 w9 w22 w23 w24 w25", "w20 w21", "w30 w31 w32 w33 w34", "w40 w41 w42 w43 w44 w45 w46"]


def manual_loss(model, tokenizer, texts: list[str], max_length: int) -> tuple[float, int]:
    """Sum of -log p(next token) over each text on its own, no padding anywhere."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"][:max_length]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        total -= log_probs.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return total / count, count


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("batch_size", [1, 3])
def test_lm_loss_matches_a_manual_cross_entropy_whatever_the_batch_size(batch_size):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    ce, count = manual_loss(model, tokenizer, TEXTS, max_length=64)
    result = lm_loss(model, tokenizer, TEXTS, batch_size=batch_size, max_length=64, progress=False)
    assert result["tokens"] == count == 8 + 1 + 4 + 6
    assert result["cross_entropy"] == pytest.approx(ce, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_lm_loss_truncates_restores_the_mode_and_rejects_nothing_to_predict():
    model, tokenizer = tiny_llama().train(), tiny_tokenizer()
    ce, count = manual_loss(model.eval(), tokenizer, TEXTS, max_length=4)
    model.train()
    result = lm_loss(model, tokenizer, TEXTS, batch_size=2, max_length=4, progress=False)
    assert result["tokens"] == count == 3 + 1 + 3 + 3
    assert result["cross_entropy"] == pytest.approx(ce, abs=1e-5)
    assert model.training
    with pytest.raises(ValueError, match="no token to predict"):
        lm_loss(model, tokenizer, ["w5", ""], batch_size=2, max_length=4, progress=False)
