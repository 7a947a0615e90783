"""The HTTP layer of ``loramoe serve``: OpenAI's chat and text completion routes, the model list,
the chat page at ``/`` and ``/health``, over the :class:`~loramoe.serve.engine.Engine`.

Every error leaves in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so an
OpenAI client raises its usual exception class with the server's message: malformed JSON 400, a
missing or wrong API key 401, an unknown model or route 404, a prompt that fills the context 413,
a field the request cannot have 422 (``param`` names it). The API key is checked by a middleware
before anything else, so a caller without it learns nothing about routes or models.

A streamed answer is server-sent events (``data: {json}``, then ``data: [DONE]``). A client that
goes away cancels its engine row: Starlette cancels the stream's task when the connection drops,
which raises in the generator below, and a non-streamed request checks for it after each token.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from loramoe.data import encode_prompt
from loramoe.serve.engine import Engine, Finished, Handle, Job, Token
from loramoe.serve.registry import Registry, ServedModel
from loramoe.serve.schemas import ChatRequest, CompletionRequest

DEFAULT_MAX_TOKENS = 256
"""The longest completion of a request that sets no limit (less where the context has less room)."""


class ApiError(Exception):
    """An error the client caused (or a server fault), answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _param(loc: tuple) -> str | None:
    """A validation error's location as a field path (``messages[0].role``), without ``body``."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')} "
                           f"(at character {first['loc'][-1]})")
    if tuple(first["loc"]) == ("body",):  # no body, a body not sent as JSON, or JSON that is not an object
        return _error(400, "the request needs a JSON object as its body, sent as Content-Type: application/json")
    param = _param(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own validators' messages
    return _error(422, f"{param}: {message}" if param else message, param=param)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message, code = f"no route {request.method} {request.url.path}", "not_found"
    elif exc.status_code == 405:
        message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return _error(exc.status_code, message, code=code, headers=exc.headers)


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)


async def _server_error(_request: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"the server failed: {type(exc).__name__}: {exc}", type="server_error")


class ApiKeyCheck:
    """Refuses ``/v1/*`` without ``Authorization: Bearer <key>``; ``/`` and ``/health`` stay open
    (the page holds no data, and a load balancer's probe has no key)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = next((value for name, value in scope["headers"] if name == b"authorization"), None)
            if given is None or not secrets.compare_digest(given, self.expected):
                message = ("no API key: send the header 'Authorization: Bearer KEY' with the server's --api-key"
                           if given is None else "the API key is not the server's --api-key")
                await _error(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def _served(registry: Registry, name: str) -> ServedModel:
    try:
        return registry.get(name)
    except KeyError:
        raise ApiError(404, f"model '{name}' is not served here; served: {', '.join(registry.names())}",
                       param="model", code="model_not_found") from None


def _job(served: ServedModel, body: ChatRequest | CompletionRequest, prompt_ids: list[int], prompt_param: str) -> Job:
    """The engine's job for a request, after the checks that need the model: routing, context."""
    if body.routing and not served.groups:
        raise ApiError(422, f"loramoe.routing: model '{served.name}' is a {served.kind} model; routing needs a "
                            "LoRAMoE model", param="loramoe.routing")
    context, prompt = served.context, len(prompt_ids)
    if prompt == 0:
        raise ApiError(422, f"{prompt_param}: the prompt is empty", param=prompt_param)
    if prompt >= context:
        raise ApiError(413, f"the prompt is {prompt} tokens, and model '{served.name}' has a context of {context} "
                            "tokens for the prompt and the completion together", param=prompt_param,
                       code="context_length_exceeded")
    limit = body.completion_limit
    if limit is not None and limit > context:
        raise ApiError(422, f"{body.limit_param}: {limit} is more than the context of model '{served.name}' "
                            f"({context} tokens)", param=body.limit_param)
    return Job(model=served.name, prompt_ids=prompt_ids, max_tokens=min(limit or DEFAULT_MAX_TOKENS, context - prompt),
               temperature=body.sampling_temperature, top_p=1.0 if body.top_p is None else body.top_p,
               stop=list(body.stop or []), seed=body.seed, routing=body.routing)


@dataclass
class _Reply:
    """Builds the answer objects of one request, in the chat or the text completion flavour."""

    chat: bool
    model: str
    groups: list[str]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _reply(self, object: str, choice: dict[str, Any]) -> dict[str, Any]:
        prefix = "chatcmpl" if self.chat else "cmpl"
        return {"id": f"{prefix}-{self.id}", "object": object, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice, "logprobs": None}]}

    def chunk(self, text: str | None, reason: str | None = None, *, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return self._reply("text_completion", {"text": text or "", "finish_reason": reason})
        delta = {"role": "assistant", "content": ""} if first else {"content": text} if text else {}
        return self._reply("chat.completion.chunk", {"delta": delta, "finish_reason": reason})

    def usage_chunk(self, end: Finished) -> dict[str, Any]:
        return {**self.chunk(None), "choices": [], "usage": _usage(end)}

    def whole(self, text: str, end: Finished, tokens: list[str], routing: list[dict[str, float]] | None
              ) -> dict[str, Any]:
        answer = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        reply = self._reply("chat.completion" if self.chat else "text_completion",
                            {**answer, "finish_reason": end.reason})
        reply["usage"] = _usage(end)
        if routing is not None:
            reply["loramoe"] = {"groups": self.groups, "tokens": tokens, "routing": routing}
        return reply


def _usage(end: Finished) -> dict[str, int]:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(handle: Handle, reply: _Reply, include_usage: bool) -> AsyncIterator[str]:
    ended = False
    try:
        if reply.chat:
            yield _sse(reply.chunk(None, first=True))
        async for event in handle.events():
            if isinstance(event, Token):
                if event.text or event.routing is not None:  # a routed token is shown even while its text is held
                    chunk = reply.chunk(event.text)
                    if event.routing is not None:
                        chunk["loramoe"] = {"token": event.token, "routing": event.routing}
                    yield _sse(chunk)
            elif isinstance(event, Finished):
                ended = True
                yield _sse(reply.chunk(event.text, event.reason))
                if include_usage:
                    yield _sse(reply.usage_chunk(event))
            else:
                ended = True
                yield _sse(error_body(event.message, "server_error"))
        yield _sse("[DONE]")
    finally:
        if not ended:  # the client went away (the task was cancelled) before the answer ended
            handle.cancel()


async def _collect(handle: Handle, reply: _Reply, request: Request) -> dict[str, Any]:
    texts, tokens, routing = [], [], []
    ended = False
    try:
        async for event in handle.events():
            if isinstance(event, Token):
                texts.append(event.text)
                tokens.append(event.token)
                routing.append(event.routing)
                if await request.is_disconnected():
                    break
            elif isinstance(event, Finished):
                ended = True
                return reply.whole("".join(texts) + event.text, event, tokens, routing if reply.groups else None)
            else:
                ended = True
                raise ApiError(500, event.message, type="server_error")
        return {}  # the client went away: nobody reads this
    finally:
        if not ended:
            handle.cancel()


def create_app(registry: Registry, engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over a registry of served models and the engine that generates for them
    (started and stopped by the caller, around the server's run). ``api_key``: the key ``/v1/*``
    asks for; None: none is asked."""
    started = int(time.time())
    # no OpenAPI pages: the API is OpenAI's, documented there, and "/docs" would be one more open route
    app = FastAPI(title="loramoe serve", docs_url=None, redoc_url=None, openapi_url=None, strict_content_type=False)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _server_error)
    if api_key:
        app.add_middleware(ApiKeyCheck, api_key=api_key)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        page = resources.files("loramoe.serve").joinpath("page.html")
        if not page.is_file():
            raise ApiError(404, "the chat page is not installed (loramoe/serve/page.html)", code="not_found")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    def describe(name: str) -> dict[str, Any]:
        served = registry.get(name)
        return {"id": name, "object": "model", "created": started, "owned_by": "loramoe",
                "loramoe": {"kind": served.kind, "groups": list(served.groups), "context": served.context}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [describe(name) for name in registry.names()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return describe(_served(registry, name).name)

    async def answer(request: Request, body: ChatRequest | CompletionRequest, served: ServedModel, job: Job,
                     chat: bool) -> Any:
        try:
            handle = engine.submit(job)
        except RuntimeError:
            raise ApiError(503, "the server is shutting down", type="server_error") from None
        reply = _Reply(chat=chat, model=served.name, groups=list(served.groups) if job.routing else [])
        if body.stream:
            return StreamingResponse(_stream(handle, reply, body.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(handle, reply, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        served = _served(registry, body.model)
        try:
            prompt_ids = encode_prompt([m.model_dump() for m in body.messages], served.tokenizer)
        except TemplateError as error:
            raise ApiError(422, f"messages: the model's chat template refused the conversation: {error}",
                           param="messages") from None
        return await answer(request, body, served, _job(served, body, prompt_ids, "messages"), chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        served = _served(registry, body.model)
        prompt_ids = list(served.tokenizer(body.prompt)["input_ids"])
        return await answer(request, body, served, _job(served, body, prompt_ids, "prompt"), chat=False)

    return app
