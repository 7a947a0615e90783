"""``loramoe serve``: the OpenAI HTTP API and a chat page over a base model and its adapters.

FastAPI and uvicorn carry the HTTP side (routes, validation, server-sent events, graceful
shutdown); :mod:`.engine` batches the generation; :mod:`.registry` holds the models. uvicorn
handles SIGTERM and SIGINT: it stops accepting connections, lets the requests in flight finish
(streams included), and returns; the engine then finishes what it was given, and the command
exits 0.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket

from loramoe.errors import UsageError

API_KEY_ENV = "LORAMOE_API_KEY"
LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def serve(
    model: str = "smollm2-135m",
    adapter: list[str] | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    trust_remote_code: bool = False,
) -> None:
    """Serve a base model and its adapters over the OpenAI HTTP API, with a chat page at ``/``.

    Args:
        model: ``smollm2-135m`` (embedded), a local folder or a hub id; served under this name.
        adapter: adapter folders, each ``NAME=DIR`` (requests ask for NAME) or ``DIR`` (served
            under the path as given); several share the base model's weights.
        dtype: the base model's dtype (``float32``, ``bfloat16``, ...); default: as saved.
        quantize: ``4bit`` or ``8bit``: a quantized base (needs bitsandbytes and a GPU).
        host: the address to listen on; other than loopback only with an API key.
        port: the TCP port.
        api_key: the key clients send as ``Authorization: Bearer KEY`` (default: the
            ``LORAMOE_API_KEY`` environment variable); none: no key is asked.
        max_batch: the most requests decoded together.
        trust_remote_code: allow a hub model's own code to run.
    """
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and not api_key:
        raise UsageError(f"--host {host} is reachable from other machines: give --api-key (or set {API_KEY_ENV}), "
                         "or serve on 127.0.0.1")
    if not 0 <= port <= 65535 or max_batch < 1:
        raise UsageError(f"--port must be in 0-65535 and --max-batch at least 1, got {port} and {max_batch}")
    import uvicorn  # the server extra: imported only by the command that needs it

    from loramoe.serve.app import create_app
    from loramoe.serve.engine import Engine
    from loramoe.serve.registry import load_registry

    registry = load_registry(model, list(adapter or []), dtype=dtype, quantize=quantize,
                             trust_remote_code=trust_remote_code)
    engine = Engine(registry, max_batch=max_batch)
    engine.start()
    # uvicorn handles the signal, shuts down, then raises it again for the handler it found installed:
    # with Python's default that would kill the process (exit -15) after a clean shutdown
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"loramoe serve: {', '.join(registry.names())} on http://{host}:{port} (chat page at /)", flush=True)
        uvicorn.Server(uvicorn.Config(create_app(registry, engine, api_key=api_key), host=host, port=port,
                                      log_level="warning")).run()
    finally:
        engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
