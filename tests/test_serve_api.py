"""``loramoe serve`` driven by the official ``openai`` client, against a real server process: each
answer equals ``loramoe generate``'s (or ``transformers``' ``generate``'s) for the same model,
adapter and prompt; streamed chunks make the same text; the routing extension equals
``capture_routing`` over the same tokens."""

from __future__ import annotations

import pytest
import torch

from loramoe.attach import adapter_config
from loramoe.data import encode_prompt
from loramoe.generate import generate
from loramoe.generate.main import load_for_generation
from loramoe.generation import answer_end, stop_token_ids
from loramoe.routing import capture_routing
from tests.serving import CONTEXT, LORA, MOE, chat_body, open_stream, request, server_fixture

server = server_fixture()

PROMPTS = ["w5 w7 w9", "w20 w3", "w40 w41 w42 w43"]
N = 8
ROUTING = {"loramoe": {"routing": True}}


def _names(server) -> list[str]:
    return [server.base, LORA, MOE]


def _load(server, name: str):
    adapter = server.folders.adapters.get(name)
    return load_for_generation(str(server.folders.model), adapter)


def _greedy_ids(model, tokenizer, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generate: the answer's token ids, up to the first stop token."""
    ids = torch.tensor([prompt_ids])
    stops = stop_token_ids(model, tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(prompt_ids):].tolist()
    return new[:answer_end(new, stops)]


def _chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    return encode_prompt([{"role": "user", "content": prompt}], tokenizer)


def test_health_the_model_list_and_the_page(server):
    assert request(server, "GET", "/health") == (200, {"status": "ok"})
    listed = {m.id: m.model_extra["loramoe"] for m in server.client().models.list().data}
    assert listed == {server.base: {"kind": "base", "groups": [], "context": CONTEXT},
                      LORA: {"kind": "lora", "groups": [], "context": CONTEXT},
                      MOE: {"kind": "loramoe", "groups": ["knowledge", "task"], "context": CONTEXT}}
    assert server.client().models.retrieve(MOE).id == MOE
    status, page = request(server, "GET", "/")
    assert status == 200 and isinstance(page, str)


def test_chat_answers_are_loramoe_generates(server, one_thread):
    client = server.client()
    for prompt in PROMPTS:
        answers = []
        for name in _names(server):
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=N, temperature=0)
            adapter = server.folders.adapters.get(name)
            expected = generate(model=str(server.folders.model), adapter=adapter, prompt=prompt, max_new_tokens=N)
            assert reply.choices[0].message.content == expected[0]["response"], (name, prompt)
            assert reply.model == name and reply.object == "chat.completion"
            model, tokenizer = _load(server, name)
            prompt_ids = _chat_prompt_ids(tokenizer, prompt)
            generated = _greedy_ids(model, tokenizer, prompt_ids, N)
            assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
                len(prompt_ids), len(generated), len(prompt_ids) + len(generated))
            assert reply.choices[0].finish_reason == ("length" if len(generated) == N else "stop")
            answers.append(reply.choices[0].message.content)
        assert len(set(answers)) == 3, f"base, LoRA and LoRAMoE gave the same answer to {prompt!r}"


def test_streamed_chunks_make_the_same_answer(server):
    client = server.client()
    for name, prompt in zip(_names(server), PROMPTS):
        whole = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=N, temperature=0)
        chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                     max_tokens=N, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finished == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_text_completions_are_generates_on_the_raw_prompt(server):
    client = server.client()
    for name in (server.base, MOE):
        model, tokenizer = _load(server, name)
        prompt_ids = tokenizer(PROMPTS[2])["input_ids"]
        expected = tokenizer.decode(_greedy_ids(model, tokenizer, prompt_ids, N), skip_special_tokens=True)
        reply = client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=N, temperature=0)
        assert reply.object == "text_completion" and reply.choices[0].text == expected
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt_ids), N)
        streamed = client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=N, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected


def _capture_routing_shares(server, prompt: str, n: int) -> tuple[list[str], list[dict[str, float]]]:
    """Each generated token's gate share per group from ONE forward of the prompt and the answer
    through the LoRAMoE model: position prompt_len-1+k predicted token k; layers averaged."""
    model, tokenizer = _load(server, MOE)
    prompt_ids = _chat_prompt_ids(tokenizer, prompt)
    generated = _greedy_ids(model, tokenizer, prompt_ids, n)
    config = adapter_config(model)
    onehot = torch.nn.functional.one_hot(torch.tensor(config.expert_groups()), len(config.groups)).float()
    with torch.no_grad(), capture_routing(model, per_token=True) as record:
        model(input_ids=torch.tensor([prompt_ids + generated]))
    start = len(prompt_ids) - 1
    per_layer = [forwards[0][0, start:start + len(generated)] @ onehot for forwards in record.gates.values()]
    shares = torch.stack(per_layer).mean(0)
    tokens = [tokenizer.decode([token]) for token in generated]
    return tokens, [dict(zip(config.groups, row.tolist())) for row in shares]


def _close(got: list[dict[str, float]], expected: list[dict[str, float]]) -> bool:
    return len(got) == len(expected) and all(
        g.keys() == e.keys() and all(abs(g[k] - e[k]) <= 1e-3 for k in e) for g, e in zip(got, expected))


def test_the_routing_extension_equals_capture_routing(server, one_thread):
    client = server.client()
    for prompt in PROMPTS[:2]:
        tokens, expected = _capture_routing_shares(server, prompt, N)
        reply = client.chat.completions.create(model=MOE, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=N, temperature=0, extra_body=ROUTING)
        routed = reply.model_extra["loramoe"]
        assert routed["groups"] == ["knowledge", "task"] and routed["tokens"] == tokens
        assert _close(routed["routing"], expected), (routed["routing"], expected)
        assert all(abs(sum(s.values()) - 1) < 1e-3 for s in routed["routing"])
        stream = client.chat.completions.create(model=MOE, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=N, temperature=0, stream=True, extra_body=ROUTING)
        per_chunk = [c.model_extra["loramoe"] for c in stream if "loramoe" in (c.model_extra or {})]
        assert [c["token"] for c in per_chunk] == tokens
        assert _close([c["routing"] for c in per_chunk], expected)


def test_a_stop_string_ends_the_answer_before_it(server):
    client = server.client()
    whole = client.chat.completions.create(model=LORA, messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=N, temperature=0).choices[0].message.content
    stop = whole.split()[2]
    for stream in (False, True):
        reply = client.chat.completions.create(model=LORA, messages=[{"role": "user", "content": PROMPTS[0]}],
                                               max_tokens=N, temperature=0, stop=[stop, "w95 w95"], stream=stream)
        if stream:
            chunks = list(reply)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert text == whole[:whole.index(stop)] and reason == "stop"


def test_a_limit_beyond_the_room_left_is_lowered_to_it(server):
    client = server.client()
    prompt_tokens = client.chat.completions.create(model=MOE, messages=[{"role": "user", "content": PROMPTS[1]}],
                                                   max_tokens=1, temperature=0).usage.prompt_tokens
    for limit in ({"max_tokens": CONTEXT}, {"max_completion_tokens": CONTEXT - 1}, {}):
        body = {**chat_body(MOE, PROMPTS[1]), "max_tokens": None, **limit}  # no limit: as much as fits
        status, reply = request(server, "POST", "/v1/chat/completions", body)
        assert status == 200, reply
        assert reply["usage"]["completion_tokens"] == CONTEXT - prompt_tokens  # the tiny model never says EOS here
        assert reply["choices"][0]["finish_reason"] == "length"


def test_sampling_with_a_seed_repeats_itself(server):
    body = chat_body(MOE, PROMPTS[0], temperature=1.5, top_p=0.9, seed=7)
    first, second = (request(server, "POST", "/v1/chat/completions", body)[1] for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
    stream = open_stream(server, "/v1/chat/completions", body)
    events = list(stream.events())
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == first["choices"][0]["message"]["content"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_n_above_one_is_refused_not_ignored(server, route):
    body = chat_body(MOE, PROMPTS[0], n=2) if "chat" in route else {"model": MOE, "prompt": "w3", "n": 2}
    status, reply = request(server, "POST", route, body)
    assert status == 422 and reply["error"]["param"] == "n"
