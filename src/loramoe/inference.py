"""Running a model for measurement without leaving a trace on it: the caller may be in the middle of
training it, or hand it on to code that expects its tokenizer as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from torch import nn
from transformers import PreTrainedTokenizerBase


@contextmanager
def eval_mode(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None = None, *,
              padding_side: Literal["left", "right"] | None = None) -> Iterator[None]:
    """``model`` in eval mode (dropout off) for the ``with`` block and, given ``padding_side``,
    ``tokenizer`` padding on that side; both put back as they were afterwards, also when the block
    raises."""
    was_training = model.training
    restore_side = tokenizer.padding_side if tokenizer is not None and padding_side is not None else None
    model.eval()
    if restore_side is not None:
        tokenizer.padding_side = padding_side
    try:
        yield
    finally:
        model.train(was_training)
        if restore_side is not None:
            tokenizer.padding_side = restore_side
