"""The serving engine and registry, without HTTP: adapters share the base weights, a batch gives
each prompt what it gets alone and what ``model.generate`` gives, stop strings, token limits,
cancellation and the routing shares."""

from __future__ import annotations

import asyncio

import pytest
import torch

import loramoe
from loramoe import LoraConfig, LoraMoEConfig
from loramoe.errors import MissingFileError, UsageError
from loramoe.generation import stop_token_ids
from loramoe.routing import capture_routing
from loramoe.serve.engine import Engine, Failed, Finished, Job, Token
from loramoe.serve.registry import Registry, adapter_names
from tests.conftest import save_tiny, tiny_tokenizer

PROMPTS = [[5, 6, 7], [9, 3], [12, 13, 14, 15, 16], [20], [30, 31]]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = save_tiny(root / "model")
    for name, config in {"moe": LoraMoEConfig(r=2), "lora": LoraConfig(r=2)}.items():
        adapted = save_tiny(root / f"m-{name}")
        loramoe.attach(adapted, config)
        torch.manual_seed(1)
        for _, layer in loramoe.adapter_layers(adapted):
            torch.nn.init.normal_(layer.lora_B, std=0.3)
            if hasattr(layer, "router"):
                torch.nn.init.normal_(layer.router.weight, std=1.0)
        loramoe.save_adapter(adapted, root / name)
    return Registry.from_model("tiny", model, tiny_tokenizer(), {"moe": root / "moe", "lora": root / "lora"})


async def _collect(handle) -> list:
    return [event async for event in handle.events()]


def _run(registry: Registry, jobs: list[Job], max_batch: int = 16) -> list[list]:
    """Each job's events, all submitted before the worker starts (so they share batches)."""
    async def main():
        engine = Engine(registry, max_batch=max_batch)
        handles = [engine.submit(job) for job in jobs]
        engine.start()
        out = [await _collect(handle) for handle in handles]
        engine.stop()
        return out
    return asyncio.run(main())


def _text(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, (Token, Finished)))


def _reference(served, prompt: list[int], max_tokens: int) -> str:
    stops = stop_token_ids(served.model, served.tokenizer)
    ids = torch.tensor([prompt])
    out = served.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                do_sample=False, eos_token_id=stops, pad_token_id=0)[0, len(prompt):].tolist()
    end = next((i for i, t in enumerate(out) if t in stops), len(out))
    return served.tokenizer.decode(out[:end], skip_special_tokens=True)


def test_adapters_share_the_base_weights(registry):
    base = registry.get("tiny").model
    for name in ("moe", "lora"):
        adapted = dict(registry.get(name).model.named_parameters())
        for key, param in base.named_parameters():
            twin_key = next(k for k in adapted if k.replace(".base_layer", "") == key)
            assert adapted[twin_key].data_ptr() == param.data_ptr(), key
    assert loramoe.adapter_config(base) is None
    assert registry.get("moe").kind == "loramoe" and registry.get("moe").groups == ["knowledge", "task"]
    assert registry.get("lora").groups == [] and registry.get("tiny").kind == "base"


def test_a_batch_gives_each_prompt_what_it_gets_alone(registry):
    jobs = [Job(model=name, prompt_ids=p, max_tokens=8) for name in ("tiny", "moe", "lora") for p in PROMPTS]
    together = [_text(events) for events in _run(registry, jobs)]
    alone = [_text(_run(registry, [job])[0]) for job in jobs]
    assert together == alone
    assert together == [_reference(registry.get(job.model), job.prompt_ids, 8) for job in jobs]
    assert len(set(together)) > 5  # the adapters change the answers


def test_token_limits_usage_and_finish_reasons(registry):
    events = _run(registry, [Job(model="moe", prompt_ids=PROMPTS[0], max_tokens=3),
                             Job(model="moe", prompt_ids=PROMPTS[1], max_tokens=7)])
    for got, limit, prompt in zip(events, (3, 7), PROMPTS):
        end = got[-1]
        assert isinstance(end, Finished) and end.prompt_tokens == len(prompt)
        tokens = [e for e in got if isinstance(e, Token)]
        assert len(tokens) == end.completion_tokens <= limit
        assert end.reason == ("length" if len(tokens) == limit else "stop")


def test_the_answer_ends_before_a_stop_string(registry):
    full = _text(_run(registry, [Job(model="moe", prompt_ids=PROMPTS[2], max_tokens=10)])[0])
    words = full.split()
    stop = " ".join(words[2:4])
    events = _run(registry, [Job(model="moe", prompt_ids=PROMPTS[2], max_tokens=10, stop=[stop, "never"])])[0]
    assert _text(events) == full[:full.index(stop)]
    assert events[-1].reason == "stop"


def test_routing_shares_are_the_gates_of_one_forward_over_the_answer(registry):
    served = registry.get("moe")
    events = _run(registry, [Job(model="moe", prompt_ids=PROMPTS[0], max_tokens=6, routing=True),
                             Job(model="moe", prompt_ids=PROMPTS[3], max_tokens=6)])
    tokens = [e for e in events[0] if isinstance(e, Token)]
    assert all(e.routing is None for e in events[1] if isinstance(e, Token))
    ids = served.tokenizer(" ".join(e.token for e in tokens))["input_ids"]
    sequence = torch.tensor([PROMPTS[0] + ids])
    with torch.no_grad(), capture_routing(served.model, per_token=True) as record:
        served.model(input_ids=sequence)
    config = loramoe.adapter_config(served.model)
    onehot = torch.nn.functional.one_hot(torch.tensor(config.expert_groups()), 2).float()
    gates = torch.stack([forwards[0][0] for forwards in record.gates.values()]).mean(0) @ onehot  # (seq, groups)
    for k, token in enumerate(tokens):
        expected = gates[len(PROMPTS[0]) - 1 + k]
        assert [token.routing["knowledge"], token.routing["task"]] == pytest.approx(expected.tolist(), abs=1e-3)


def test_a_cancelled_job_ends_and_the_rest_go_on(registry):
    async def main():
        engine = Engine(registry)
        first = engine.submit(Job(model="tiny", prompt_ids=PROMPTS[0], max_tokens=40))
        second = engine.submit(Job(model="tiny", prompt_ids=PROMPTS[1], max_tokens=5))
        first.cancel()
        engine.start()
        out = [await _collect(first), await _collect(second)]
        engine.stop()
        return out
    cancelled, other = asyncio.run(main())
    assert isinstance(cancelled[-1], Finished) and cancelled[-1].completion_tokens == 0
    assert _text(other) == _reference(registry.get("tiny"), PROMPTS[1], 5)


def test_a_failing_batch_is_reported_and_the_engine_goes_on(registry):
    events = _run(registry, [Job(model="tiny", prompt_ids=[500], max_tokens=3)])[0]  # id beyond the vocabulary
    assert len(events) == 1 and isinstance(events[0], Failed) and "generation failed" in events[0].message
    assert _text(_run(registry, [Job(model="tiny", prompt_ids=PROMPTS[1], max_tokens=3)])[0])


def test_adapter_flags_are_checked_before_the_model_loads(tmp_path, registry):
    with pytest.raises(MissingFileError, match="no adapter_config.json"):
        adapter_names([f"a={tmp_path}"])
    with pytest.raises(UsageError, match="NAME=DIR"):
        adapter_names(["=x"])
    with pytest.raises(UsageError, match="served already"):
        registry.add_adapter("moe", tmp_path)
