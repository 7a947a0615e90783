"""Every bad input to a real ``loramoe serve`` gets its status and OpenAI's error shape, and the
server answers the next request as before: malformed JSON, unknown model or route, a prompt
longer than the context, limits and types a request cannot have, routing asked of a model without
a router, a missing or wrong API key, a client that drops its stream; and the command refuses to
listen beyond loopback without a key. The module's server asks for an API key, so every request
here also passes the key check."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
from dataclasses import replace

import openai
import pytest
import uvicorn

from loramoe.models import load
from loramoe.serve.app import create_app
from loramoe.serve.engine import Engine
from loramoe.serve.registry import Registry
from tests.conftest import child_env
from tests.serving import CONTEXT, LORA, MOE, chat_body, free_port, open_stream, request, serve_command, server_fixture

KEY = "sk-test-7f3a"
server = server_fixture(api_key=KEY)

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPT = "w5 w7 w9"
LONG = " ".join(f"w{2 + i % 90}" for i in range(CONTEXT))  # 64 words: with the template, past the context
BASE = "<base>"  # stands for the base model's name, which is its folder's path


def _user(content) -> dict:
    return {**chat_body(MOE, PROMPT), "messages": [{"role": "user", "content": content}]}


BAD_INPUTS = {
    # name: (method, route, body, extra headers, status, error code, param)
    "malformed JSON": ("POST", CHAT, b'{"model": "moe", "messages": [', {}, 400, None, None),
    "no body": ("POST", CHAT, None, {}, 400, None, None),
    "a form body, not JSON": ("POST", CHAT, b"model=moe", {"Content-Type": "application/x-www-form-urlencoded"},
                              400, None, None),
    "JSON that is not an object": ("POST", CHAT, b"[1, 2]", {}, 400, None, None),
    "unknown model": ("POST", CHAT, chat_body("gpt-4o", PROMPT), {}, 404, "model_not_found", "model"),
    "unknown route": ("GET", "/v1/engines", None, {}, 404, "not_found", None),
    "wrong method": ("GET", CHAT, None, {}, 405, "method_not_allowed", None),
    "prompt longer than the context (chat)": ("POST", CHAT, chat_body(MOE, LONG), {}, 413,
                                              "context_length_exceeded", "messages"),
    "prompt longer than the context (completions)": ("POST", COMPLETIONS, {"model": LORA, "prompt": LONG + " w3"},
                                                     {}, 413, "context_length_exceeded", "prompt"),
    "max_tokens 0": ("POST", CHAT, chat_body(MOE, PROMPT, max_tokens=0), {}, 422, None, "max_tokens"),
    "max_tokens above the context": ("POST", CHAT, chat_body(MOE, PROMPT, max_tokens=CONTEXT + 1), {}, 422, None,
                                     "max_tokens"),
    "max_completion_tokens above the context": ("POST", CHAT, chat_body(MOE, PROMPT, max_completion_tokens=10**6),
                                                {}, 422, None, "max_completion_tokens"),
    "max_tokens 0 (completions)": ("POST", COMPLETIONS, {"model": MOE, "prompt": PROMPT, "max_tokens": 0}, {}, 422,
                                   None, "max_tokens"),
    "max_tokens a string": ("POST", CHAT, chat_body(MOE, PROMPT, max_tokens="8"), {}, 422, None, "max_tokens"),
    "temperature a string": ("POST", CHAT, chat_body(MOE, PROMPT, temperature="hot"), {}, 422, None, "temperature"),
    "temperature above 2": ("POST", CHAT, chat_body(MOE, PROMPT, temperature=2.5), {}, 422, None, "temperature"),
    "top_p 0": ("POST", CHAT, chat_body(MOE, PROMPT, top_p=0), {}, 422, None, "top_p"),
    "seed a float": ("POST", CHAT, chat_body(MOE, PROMPT, seed=1.5), {}, 422, None, "seed"),
    "stream a string": ("POST", CHAT, chat_body(MOE, PROMPT, stream="yes"), {}, 422, None, "stream"),
    "five stop strings": ("POST", CHAT, chat_body(MOE, PROMPT, stop=["a", "b", "c", "d", "e"]), {}, 422, None,
                          "stop"),
    "stop a number": ("POST", CHAT, chat_body(MOE, PROMPT, stop=3), {}, 422, None, "stop"),
    "model missing": ("POST", CHAT, {"messages": [{"role": "user", "content": PROMPT}]}, {}, 422, None, "model"),
    "messages not a list": ("POST", CHAT, {**chat_body(MOE, PROMPT), "messages": PROMPT}, {}, 422, None, "messages"),
    "no messages": ("POST", CHAT, {**chat_body(MOE, PROMPT), "messages": []}, {}, 422, None, "messages"),
    "content a number": ("POST", CHAT, _user(5), {}, 422, None, "messages[0].content"),
    "unknown role": ("POST", CHAT, {**chat_body(MOE, PROMPT), "messages": [{"role": "robot", "content": "w3"}]}, {},
                     422, None, "messages[0].role"),
    "last message not the user's": ("POST", CHAT, {**chat_body(MOE, PROMPT), "messages": [
        {"role": "user", "content": "w3"}, {"role": "assistant", "content": "w4"}]}, {}, 422, None, "messages"),
    "prompt a list (completions)": ("POST", COMPLETIONS, {"model": MOE, "prompt": ["w3"]}, {}, 422, None, "prompt"),
    "routing of the base model": ("POST", CHAT, chat_body(BASE, PROMPT, loramoe={"routing": True}), {}, 422, None,
                                  "loramoe.routing"),
    "routing of a LoRA model": ("POST", COMPLETIONS, {"model": LORA, "prompt": PROMPT, "loramoe": {"routing": True}},
                                {}, 422, None, "loramoe.routing"),
    "routing a string": ("POST", CHAT, chat_body(MOE, PROMPT, loramoe={"routing": "yes"}), {}, 422, None,
                         "loramoe.routing"),
    "no API key": ("POST", CHAT, chat_body(MOE, PROMPT), {"Authorization": ""}, 401, "invalid_api_key", None),
    "wrong API key": ("POST", CHAT, chat_body(MOE, PROMPT), {"Authorization": "Bearer sk-wrong"}, 401,
                      "invalid_api_key", None),
    "the key without Bearer": ("POST", CHAT, chat_body(MOE, PROMPT), {"Authorization": KEY}, 401, "invalid_api_key",
                               None),
    "a model list without a key": ("GET", "/v1/models", None, {"Authorization": ""}, 401, "invalid_api_key", None),
}


@pytest.fixture(scope="module")
def normal_answer(server) -> str:
    status, reply = request(server, "POST", CHAT, chat_body(MOE, PROMPT))
    assert status == 200, reply
    return reply["choices"][0]["message"]["content"]


def _still_serves(server, normal_answer: str) -> None:
    status, reply = request(server, "POST", CHAT, chat_body(MOE, PROMPT))
    assert status == 200 and reply["choices"][0]["message"]["content"] == normal_answer, (status, reply)


def _with_base(value, base: str):
    """``value`` with :data:`BASE` replaced by the base model's name."""
    if isinstance(value, dict):
        return {k: _with_base(v, base) for k, v in value.items()}
    return base if value == BASE else value


def send_bad_input(server, name: str) -> tuple[int, dict]:
    method, route, body, headers, *_ = BAD_INPUTS[name]
    sent = {k: v for k, v in headers.items() if v}  # "" drops the server's key from the request
    if headers.get("Authorization") == "":
        server = replace(server, api_key=None)
    return request(server, method, route, _with_base(body, server.base), sent)


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_a_bad_input_gets_its_status_and_error_shape(server, normal_answer, name):
    *_, status, code, param = BAD_INPUTS[name]
    got_status, body = send_bad_input(server, name)
    assert got_status == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param), error
    _still_serves(server, normal_answer)


def test_the_official_client_raises_its_own_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="gpt-4o"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}])
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        client.chat.completions.create(model=MOE, messages=[{"role": "user", "content": PROMPT}], max_tokens=0)
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(model=MOE, prompt=LONG)
    assert raised.value.status_code == 413
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_health_and_the_page_need_no_key(server):
    bare = replace(server, api_key=None)
    assert request(bare, "GET", "/health") == (200, {"status": "ok"})
    assert request(bare, "GET", "/")[0] == 200


def test_a_client_that_drops_its_stream_leaves_the_server_serving(server, normal_answer):
    for body in (chat_body(MOE, PROMPT, max_tokens=CONTEXT, loramoe={"routing": True}),
                 {"model": LORA, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}):
        for _ in range(3):
            stream = open_stream(server, CHAT if "messages" in body else COMPLETIONS, body)
            events = stream.events()
            next(events), next(events)
            stream.close()
        _still_serves(server, normal_answer)


def test_a_host_beyond_loopback_needs_an_api_key(server):
    args = serve_command(server.folders, free_port(), "--host", "0.0.0.0")
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=120,
                          env=child_env(OMP_NUM_THREADS="1"))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--api-key" in lines[0] and "0.0.0.0" in lines[0], done.stderr


class _RecordingEngine(Engine):
    """The real engine, keeping the handles it gave out so a test can see them cancelled."""

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        self.handles: list = []

    def submit(self, job):
        handle = super().submit(job)
        self.handles.append(handle)
        return handle


def _wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.01)


def test_a_dropped_client_cancels_its_row_in_the_engine(server, one_thread):
    """In process (the real registry, engine and uvicorn on a thread), so the engine's handles and
    the model's forwards can be counted: a client that drops a streamed or a whole answer stops
    its row after a few tokens instead of the 50 it asked for. Each forward sleeps a little so the
    drop lands while the answer is being generated."""
    model, tokenizer = load(str(server.folders.model))
    registry = Registry.from_model("base", model, tokenizer, {MOE: server.folders.adapters[MOE]})
    forwards = []
    registry.get(MOE).model.register_forward_pre_hook(lambda *_: forwards.append(time.sleep(0.02)))
    engine = _RecordingEngine(registry)
    engine.start()
    port = free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(create_app(registry, engine), port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    local = replace(server, process=None, port=port, api_key=None)
    try:
        _wait_for(lambda: uvicorn_server.started, "the in-process server started")
        stream = open_stream(local, CHAT, chat_body(MOE, PROMPT, max_tokens=50))
        events = stream.events()
        next(events), next(events)
        stream.close()
        _wait_for(lambda: engine.handles[0].cancelled, "the dropped stream's handle cancelled")
        connection = http.client.HTTPConnection("127.0.0.1", port)
        connection.request("POST", CHAT, body=json.dumps(chat_body(MOE, PROMPT, max_tokens=50)),
                           headers={"Content-Type": "application/json"})
        _wait_for(lambda: len(engine.handles) == 2 and forwards, "the whole answer's job in the engine")
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        _wait_for(lambda: engine.handles[1].cancelled, "the dropped whole answer's handle cancelled")
        status, reply = request(local, "POST", CHAT, chat_body(MOE, PROMPT, max_tokens=3))
        assert status == 200 and reply["usage"]["completion_tokens"] == 3
        assert len(forwards) < 50, f"{len(forwards)} forwards: a dropped row went on to its 50 tokens"
    finally:
        uvicorn_server.should_exit = True
        thread.join(30)
        engine.stop()
