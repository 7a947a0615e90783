"""Real ``loramoe serve`` processes for the tests: a tiny model folder with a LoRA and a LoRAMoE
adapter, the command started as a subprocess on a free loopback port, waited for until
``/health`` answers, and stopped with SIGTERM. Raw requests go through ``http.client`` (the
standard library), so a test controls the bytes sent and can drop a connection mid-stream; the
official ``openai`` client comes from :meth:`Server.client`.

A test module gets one server with ``server = server_fixture()`` (module scoped: the model loads
once per module)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

import loramoe
from loramoe import LoraConfig, LoraMoEConfig
from loramoe.models import load
from tests.conftest import child_env, save_tiny

LORA, MOE = "lora", "moe"
"""The names the adapters are served under."""
GROUPS = {"knowledge": 2, "task": 2}
CONTEXT = 64
"""The tiny Llama's ``max_position_embeddings``."""


@dataclass
class Folders:
    model: Path
    adapters: dict[str, Path]


def make_folders(root: Path) -> Folders:
    """The tiny model saved as a model folder, and a LoRA and a LoRAMoE adapter trained to nothing
    but made non-zero (random B and routers), so each answers differently from the base."""
    save_tiny(root / "model")
    torch.manual_seed(0)
    lora = loramoe.attach(load(str(root / "model"))[0], LoraConfig(r=2))
    for _, layer in loramoe.adapter_layers(lora):
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    loramoe.save_adapter(lora, root / LORA)
    moe = loramoe.attach(load(str(root / "model"))[0], LoraMoEConfig(r=2, groups=GROUPS))
    for _, layer in loramoe.adapter_layers(moe):
        torch.nn.init.normal_(layer.lora_B, std=0.3)
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    loramoe.save_adapter(moe, root / MOE)
    return Folders(root / "model", {LORA: root / LORA, MOE: root / MOE})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(folders: Folders, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loramoe.cli", "serve", "--model", str(folders.model), "--adapter",
            *(f"{name}={folder}" for name, folder in folders.adapters.items()), "--port", str(port), *extra]


@dataclass
class Server:
    """A running ``loramoe serve`` and what it serves."""

    process: subprocess.Popen
    port: int
    folders: Folders
    log: Path
    api_key: str | None = None

    @property
    def base(self) -> str:
        """The base model's name: ``--model`` as given."""
        return str(self.folders.model)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0, timeout=120)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (killed after ``timeout`` seconds: a hung shutdown fails the
        caller's assert on the code, not the whole run)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(folders: Folders, log: Path, *extra: str, api_key: str | None = None, timeout: float = 120) -> Server:
    """Start ``loramoe serve`` over ``folders`` and wait until ``/health`` answers."""
    port = free_port()
    args = serve_command(folders, port, *extra, *(["--api-key", api_key] if api_key else []))
    with log.open("wb") as out:  # the child keeps its own handle; a pipe nobody reads could fill and block it
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=child_env(OMP_NUM_THREADS="1"))
    server = Server(process, port, folders, log, api_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"loramoe serve exited with {process.returncode}:\n{server.output()}")
        try:
            if request(server, "GET", "/health")[0] == 200:
                return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"loramoe serve did not answer /health in {timeout} s:\n{server.output()}")


def server_fixture(api_key: str | None = None):
    """A module-scoped fixture: a server over fresh folders, stopped (SIGTERM) after the module."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory) -> Iterator[Server]:
        root = tmp_path_factory.mktemp("serve")
        server = start_server(make_folders(root), root / "server.log", api_key=api_key)
        yield server
        server.stop()

    return fixture


def _connection(server: Server, timeout: float = 120) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)


def request(server: Server, method: str, path: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request with exactly these bytes (a dict is sent as JSON); the status and the body,
    parsed as JSON when it is."""
    connection = _connection(server, timeout=10 if path == "/health" else 120)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        sent = {"Content-Type": "application/json", **server.headers(), **(headers or {})} if data is not None else \
            {**server.headers(), **(headers or {})}
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        text = response.read().decode()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text
    finally:
        connection.close()


@dataclass
class Stream:
    """A streamed answer being read event by event; ``close()`` drops the connection."""

    connection: http.client.HTTPConnection
    response: http.client.HTTPResponse

    def events(self) -> Iterator[dict | str]:
        """Each ``data:`` event, parsed (``"[DONE]"`` as the string)."""
        for line in self.response:
            line = line.decode().rstrip("\r\n")
            if line.startswith("data: "):
                payload = line[len("data: "):]
                yield payload if payload == "[DONE]" else json.loads(payload)

    def close(self) -> None:
        self.connection.sock.shutdown(socket.SHUT_RDWR)
        self.connection.close()


def open_stream(server: Server, path: str, body: dict) -> Stream:
    connection = _connection(server)
    connection.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                       headers={"Content-Type": "application/json", **server.headers()})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    assert response.getheader("Content-Type", "").startswith("text/event-stream")
    return Stream(connection, response)


def chat_body(model: str, prompt: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    """A greedy chat request of one user turn."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def chat_text(server: Server, model: str, prompt: str, max_tokens: int = 8) -> str:
    """The greedy answer, through the official client."""
    answer = server.client().chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                     max_tokens=max_tokens, temperature=0)
    return answer.choices[0].message.content
