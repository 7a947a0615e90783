from __future__ import annotations

import pytest

from loramoe.inference import eval_mode
from tests.conftest import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_and_padding_side_even_when_the_body_raises(training):
    model, tokenizer = tiny_llama().train(training), tiny_tokenizer()
    tokenizer.padding_side = "left"
    with pytest.raises(RuntimeError, match="body"), eval_mode(model, tokenizer, padding_side="right"):
        assert not any(m.training for m in model.modules()) and tokenizer.padding_side == "right"
        raise RuntimeError("body")
    assert all(m.training == training for m in model.modules()) and tokenizer.padding_side == "left"


def test_eval_mode_leaves_the_tokenizer_alone_without_a_padding_side():
    model, tokenizer = tiny_llama().train(), tiny_tokenizer()
    tokenizer.padding_side = "left"
    with eval_mode(model, tokenizer):
        assert not model.training and tokenizer.padding_side == "left"
    assert model.training and tokenizer.padding_side == "left"
