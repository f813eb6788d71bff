"""Real HTTP servers on 127.0.0.1 for the served-engine tests: llama-server, and a replay server.

llama-server is built by ``scripts/build_llama_server.sh`` (or named by ``STACKLOCK_LLAMA_SERVER``). Tests that
need it are skipped when it is absent, except in CI (``CI`` set), where its absence fails them loudly.

The replay server answers each path with a canned response of the shape an engine documents (for engines
that cannot run here: Ollama, LM Studio, vLLM without a GPU) or with a fault (a status, a delay, a body that
is not JSON, a connection reset mid-response), so the adapters' request and response handling is tested over
real HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).parent.parent
DEFAULT_BINARY = ROOT / ".venv" / "llama-server" / "bin" / "llama-server"


def llama_server_binary() -> Path:
    """The llama-server binary; skips the test without one, fails it in CI."""
    named = os.environ.get("STACKLOCK_LLAMA_SERVER")
    path = Path(named) if named else DEFAULT_BINARY
    if path.is_file() and os.access(path, os.X_OK):
        return path
    if os.environ.get("CI"):
        pytest.fail(f"llama-server is missing at {path} in CI: run scripts/build_llama_server.sh")
    pytest.skip(f"llama-server is not built ({path}); run scripts/build_llama_server.sh")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def llama_server(model: Path, *args: str, log: Path) -> Iterator[str]:
    """Start llama-server on a free port with ``model``; yields its URL once /health says ok."""
    port = free_port()
    command = [str(llama_server_binary()), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    command += ["-t", "2", "-c", "1024", "-np", "1", "--no-webui", *args]
    with _serving(command, f"http://127.0.0.1:{port}", "/health", log) as url:
        yield url


@contextmanager
def llama_cpp_python_server(model: Path, *args: str, log: Path) -> Iterator[str]:
    """Start llama-cpp-python's own server (``python -m llama_cpp.server``, the 'server' extra) on a free port
    with ``model``; yields its URL once it lists its model."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_threads", "2", "--n_ctx", "1024", *args]
    with _serving(command, f"http://127.0.0.1:{port}", "/v1/models", log) as url:
        yield url


@contextmanager
def _serving(command: list[str], url: str, ready: str, log: Path) -> Iterator[str]:
    """Run a server until the block ends; yields ``url`` once ``ready`` answers 200."""
    name = Path(command[0]).name if command[0] != sys.executable else command[2]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}{ready}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not become ready in 120 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Reply:
    """One canned answer: a JSON body (or raw bytes), a status, and an optional delay before answering; with
    ``reset``, the server sends the headers and half the body, then resets the connection (a crashed worker,
    a proxy dropping it)."""

    body: Any = None
    status: int = 200
    delay: float = 0.0
    raw: bytes | None = None
    reset: bool = False


@dataclass
class Replay:
    """What the replay server answers per 'METHOD /path', and the requests it received."""

    routes: dict[str, Reply | list[Reply] | Callable[[Any], Reply]]
    requests: list[tuple[str, Any]] = field(default_factory=list)

    def answer(self, key: str, body: Any) -> Reply:
        self.requests.append((key, body))
        route = self.routes.get(key)
        if route is None:
            return Reply({"error": f"no route {key}"}, status=404)
        if isinstance(route, list):
            return route.pop(0) if len(route) > 1 else route[0]
        if callable(route):
            return route(body)
        return route


@contextmanager
def replay_server(
    routes: Mapping[str, Reply | list[Reply] | Callable[[Any], Reply]],
) -> Iterator[tuple[str, Replay]]:
    """A real HTTP server on 127.0.0.1 answering from ``routes``; yields (URL, replay)."""
    replay = Replay(dict(routes))

    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else b""
            body = json.loads(data) if data else None
            reply = replay.answer(f"{method} {self.path}", body)
            time.sleep(reply.delay)
            payload = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if reply.reset:
                    self.wfile.write(payload[: len(payload) // 2])
                    # Linger 0: closing sends a TCP reset instead of an orderly end of the stream.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", replay
    finally:
        server.shutdown()
        server.server_close()
