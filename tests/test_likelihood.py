"""Teacher-forced continuation scoring against a plain full-sequence forward."""

from __future__ import annotations

import pytest
import torch

import loramoe
from loramoe import LoraMoEConfig
from loramoe.likelihood import continuation_logprobs

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
OPTIONS = [[[20], [21, 22], [23, 24, 25]], [[30, 31]], [[40], [41]]]


def reference(model, prompt: list[int], continuation: list[int]) -> list[float]:
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return [logp[len(prompt) - 1 + j, token].item() for j, token in enumerate(continuation)]


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_equals_a_plain_forward_over_each_whole_sequence(tiny_model, batch_size):
    scored = continuation_logprobs(tiny_model, PROMPTS, OPTIONS, pad_id=0, batch_size=batch_size)
    for prompt, options, got in zip(PROMPTS, OPTIONS, scored.logprobs):
        assert [len(g) for g in got] == [len(c) for c in options]
        for continuation, values in zip(options, got):
            assert values == pytest.approx(reference(tiny_model, prompt, continuation), abs=1e-5)
    assert scored.prompt_gates is None


def test_loramoe_prompt_gates_are_each_prompts_mean_gates():
    from tests.conftest import tiny_llama

    model = tiny_llama()
    loramoe.attach(model, LoraMoEConfig(num_experts=4, r=2))
    scored = continuation_logprobs(model, PROMPTS, OPTIONS, pad_id=0, batch_size=2, prompt_routing=True)
    path = next(iter(scored.prompt_gates))
    assert scored.prompt_gates[path].shape == (3, 4)
    assert scored.prompt_gates[path].sum(-1) == pytest.approx(torch.ones(3), abs=1e-5)
    with loramoe.capture_routing(model) as record:
        model(input_ids=torch.tensor([PROMPTS[2]]))
    expected = record.layers[path][0][0] / len(PROMPTS[2])
    assert scored.prompt_gates[path][2] == pytest.approx(expected, abs=1e-5)
    for prompt, options, got in zip(PROMPTS, OPTIONS, scored.logprobs):
        for continuation, values in zip(options, got):
            assert values == pytest.approx(reference(model, prompt, continuation), abs=1e-5)


def test_empty_continuations_are_refused(tiny_model):
    with pytest.raises(ValueError, match="prompt 1"):
        continuation_logprobs(tiny_model, [[1], [2]], [[[3]], [[]]], pad_id=0)
