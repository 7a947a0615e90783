"""A bounded load test of a real ``loramoe serve`` on loopback: 64 requests from 16 concurrent
clients (both adapters and the base model, streamed and not, different lengths, routing on some)
lose nothing, and each greedy answer is the one the same request gets alone. Then SIGTERM while
streams are in flight: they finish whole, and the process exits 0."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.serving import LORA, MOE, make_folders, open_stream, server_fixture, start_server

server = server_fixture()

PROMPTS = ["w5 w7 w9", "w20 w3", "w40 w41 w42 w43", "w11", "w60 w61", "w33 w2 w90", "w8 w8 w8 w8 w8", "w77 w12"]
CLIENTS, REQUESTS = 16, 64


def _plan(base: str) -> list[dict[str, Any]]:
    """64 different requests: every prompt for each model, lengths 3 to 25, a third streamed,
    routing on half of the LoRAMoE ones."""
    models = [LORA, MOE, base]
    plan = []
    for i in range(REQUESTS):
        model = models[i % 3]
        plan.append({"model": model, "prompt": PROMPTS[(i * 5) % len(PROMPTS)], "max_tokens": 3 + (i * 7) % 23,
                     "stream": i % 3 == 1, "routing": model == MOE and i % 2 == 0})
    return plan


def _ask(server, job: dict[str, Any]) -> dict[str, Any]:
    """One request through the official client: its text, finish reason, usage and routing."""
    client = server.client()
    extra = {"extra_body": {"loramoe": {"routing": True}}} if job["routing"] else {}
    messages = [{"role": "user", "content": job["prompt"]}]
    if not job["stream"]:
        reply = client.chat.completions.create(model=job["model"], messages=messages, max_tokens=job["max_tokens"],
                                               temperature=0, **extra)
        routed = (reply.model_extra or {}).get("loramoe")
        return {"text": reply.choices[0].message.content, "finish": reply.choices[0].finish_reason,
                "tokens": reply.usage.completion_tokens, "routing": routed["routing"] if routed else None}
    chunks = list(client.chat.completions.create(model=job["model"], messages=messages, max_tokens=job["max_tokens"],
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 **extra))
    routing = [c.model_extra["loramoe"]["routing"] for c in chunks if "loramoe" in (c.model_extra or {})]
    return {"text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
            "finish": next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason),
            "tokens": chunks[-1].usage.completion_tokens, "routing": routing or None}


def _same(alone: dict[str, Any], together: dict[str, Any]) -> bool:
    """Equal text, finish and length; the routing shares within 1e-3 (their 4th decimal may move
    with the batch's padding)."""
    if (alone["text"], alone["finish"], alone["tokens"]) != (together["text"], together["finish"], together["tokens"]):
        return False
    if alone["routing"] is None or together["routing"] is None:
        return alone["routing"] is together["routing"]
    return len(alone["routing"]) == len(together["routing"]) and all(
        abs(a[k] - b[k]) <= 1e-3 for a, b in zip(alone["routing"], together["routing"]) for k in a)


def test_64_requests_from_16_clients_each_get_their_answer_alone(server):
    plan = _plan(server.base)
    alone = [_ask(server, job) for job in plan]
    with ThreadPoolExecutor(CLIENTS) as pool:
        together = list(pool.map(lambda job: _ask(server, job), plan))
    assert len(together) == REQUESTS and all(answer["text"] for answer in together)
    different = [(job, a, b) for job, a, b in zip(plan, alone, together) if not _same(a, b)]
    assert not different, different[:3]
    assert all(answer["tokens"] == job["max_tokens"] for job, answer in zip(plan, together))  # no EOS in these


def test_sigterm_lets_the_streams_in_flight_finish_and_exits_0(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigterm")
    server = start_server(make_folders(root), root / "server.log")
    try:
        jobs = [{"model": [LORA, MOE][i % 2], "prompt": PROMPTS[i], "max_tokens": 50, "stream": False,
                 "routing": False} for i in range(8)]
        expected = [_ask(server, job)["text"] for job in jobs]
        streams = [open_stream(server, "/v1/chat/completions",
                               {"model": job["model"], "messages": [{"role": "user", "content": job["prompt"]}],
                                "max_tokens": job["max_tokens"], "temperature": 0}) for job in jobs]
        readers = [stream.events() for stream in streams]
        for events in readers:
            assert next(events)["choices"][0]["delta"]["role"] == "assistant"  # each request is in the engine
        server.process.send_signal(signal.SIGTERM)
        for events, text in zip(readers, expected):
            rest = list(events)
            assert rest[-1] == "[DONE]"
            assert "".join(e["choices"][0]["delta"].get("content", "") for e in rest[:-1]) == text
            assert rest[-2]["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(60) == 0, server.output()
    finally:
        server.stop()
