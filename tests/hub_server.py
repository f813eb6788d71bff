"""A hub-compatible HTTP server on 127.0.0.1 for the real huggingface-hub client (tests and benchmarks).

It serves what ``hf_hub_download`` and ``get_hf_file_metadata`` ask for the way huggingface.co does for LFS
files: ``HEAD``/``GET /{repo}/resolve/{revision}/{path}`` answers 302 with ``X-Repo-Commit``, ``X-Linked-Etag``
(the LFS sha256) and ``X-Linked-Size``, pointing at a second server (the "CDN", another origin, so the client
stops there as it does for the real CDN), which serves the bytes, byte ranges included (206 with
``Content-Range``). Errors carry the hub's ``X-Error-Code`` header (RepoNotFound, GatedRepo, RevisionNotFound,
EntryNotFound). Faults can be injected per request: an HTTP status, a stall past the client's timeout, or a body
cut short.

Wire protocol checked against huggingface-hub 2.4.0 (the version pinned in .venv; pyproject bounds the
dependency to >=0.24,<3): the headers read by ``get_hf_file_metadata`` and ``hf_hub_download`` (X-Repo-Commit,
X-Linked-Etag, X-Linked-Size, ETag, Location, X-Error-Code) and the ``Range``/``Content-Range`` exchange of
``http_stream_backoff``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest


@dataclass(frozen=True)
class Blob:
    """File content kept on disk (a sparse multi-GB model), with its sha256 computed once by the caller."""

    path: Path
    sha256: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def read(self, start: int, end: int) -> bytes:
        with self.path.open("rb") as file:
            file.seek(start)
            return file.read(end - start)


Content = bytes | Blob


def _sha256(content: Content) -> str:
    return content.sha256 if isinstance(content, Blob) else hashlib.sha256(content).hexdigest()


def _size(content: Content) -> int:
    return content.size if isinstance(content, Blob) else len(content)


def _slice(content: Content, start: int, end: int) -> bytes:
    return content.read(start, end) if isinstance(content, Blob) else content[start:end]


@dataclass
class Fault:
    """Answer the next ``times`` requests whose ``METHOD path`` contains ``match`` with a fault.

    ``status``: that HTTP status; ``stall``: sleep this long before answering; ``truncate``: send only this many
    bytes of the body (with the full Content-Length), then close.
    """

    match: str
    status: int | None = None
    stall: float = 0.0
    truncate: int | None = None
    times: int = 1


@dataclass
class Hub:
    """Repositories by id: branches and tags name commits; each commit maps paths to file contents."""

    refs: dict[str, dict[str, str]] = field(default_factory=dict)
    commits: dict[str, dict[str, dict[str, Content]]] = field(default_factory=dict)
    blobs: dict[str, Content] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    faults: list[Fault] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    url: str = ""
    cdn_url: str = ""

    def add(
        self, repo: str, commit: str, files: Mapping[str, Content], *, refs: tuple[str, ...] = ("main",)
    ) -> None:
        self.commits.setdefault(repo, {})[commit] = dict(files)
        for ref in refs:
            self.refs.setdefault(repo, {})[ref] = commit
        for content in files.values():
            self.blobs[_sha256(content)] = content

    def fault(self, label: str) -> Fault | None:
        for fault in self.faults:
            if fault.match in label and fault.times > 0:
                fault.times -= 1
                return fault
        return None


def _handler(hub: Hub, *, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # The test output stays clean.
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _send(
            self,
            status: int,
            headers: dict[str, str],
            body: bytes = b"",
            *,
            send_body: bool,
            length: int | None = None,
            truncate: int | None = None,
        ) -> None:
            self.send_response(status)
            size = len(body) if length is None else length
            for name, value in {**headers, "Content-Length": str(size)}.items():
                self.send_header(name, value)
            if truncate is not None:
                self.send_header("Connection", "close")
            self.end_headers()
            if send_body:
                sent = body if truncate is None else body[:truncate]
                self.wfile.write(sent)
                hub.bytes_sent += len(sent)
            if truncate is not None:
                self.close_connection = True

        def _error(
            self,
            status: int,
            code: str,
            message: str,
            extra: dict[str, str] | None = None,
            *,
            send_body: bool,
        ) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
            self._send(status, headers, message.encode(), send_body=send_body)

        def _answer(self, *, body: bool) -> None:
            path = unquote(self.path.split("?", 1)[0])
            label = f"{self.command} {path}"
            hub.requests.append(label)
            fault = hub.fault(label)
            if fault is not None and fault.stall:
                time.sleep(fault.stall)
            if fault is not None and fault.status is not None:
                self._send(fault.status, {}, b"injected fault", send_body=body)
                return
            truncate = fault.truncate if fault is not None else None
            if path.startswith("/blobs/"):
                self._blob(path.removeprefix("/blobs/"), send_body=body, truncate=truncate)
                return
            if cdn:  # Like any web server that is not a hub: a page, and none of the hub's headers.
                self._send(200, {"Content-Type": "text/html"}, b"<html>not a hub</html>", send_body=body)
                return
            self._resolve(path, send_body=body)

        def _blob(self, sha: str, *, send_body: bool, truncate: int | None) -> None:
            content = hub.blobs.get(sha)
            if content is None:
                self._send(404, {}, send_body=send_body)
                return
            size = _size(content)
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes="):
                first, _, last = ranged.removeprefix("bytes=").partition("-")
                start, end = int(first), min(size, int(last) + 1 if last else size)
                headers = {"Content-Range": f"bytes {start}-{end - 1}/{size}"}
                self._send(206, headers, _slice(content, start, end), send_body=send_body, truncate=truncate)
                return
            if not send_body:
                self._send(200, {}, send_body=False, length=size)
                return
            self._send(200, {"Content-Type": "application/octet-stream"}, _slice(content, 0, size),
                       send_body=True, truncate=truncate)  # fmt: skip

        def _resolve(self, path: str, *, send_body: bool) -> None:
            # /{owner}/{name}/resolve/{revision}/{path...}
            parts = path.lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                self._send(400, {}, b"bad request", send_body=send_body)
                return
            repo, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            if repo in hub.gated:
                self._error(403, "GatedRepo", "Access to this repo is restricted", send_body=send_body)
                return
            if repo not in hub.commits:
                self._error(404, "RepoNotFound", "Repository not found", send_body=send_body)
                return
            commit = hub.refs[repo].get(revision, revision)
            if commit not in hub.commits[repo]:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", send_body=send_body)
                return
            content = hub.commits[repo][commit].get(filename)
            if content is None:
                self._error(
                    404,
                    "EntryNotFound",
                    f"{filename} does not exist",
                    {"X-Repo-Commit": commit},
                    send_body=send_body,
                )
                return
            sha = _sha256(content)
            headers = {
                "Location": f"{hub.cdn_url}/blobs/{sha}",
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(_size(content)),
                "ETag": f'"{hashlib.sha1(sha.encode()).hexdigest()}"',  # Stands in for the LFS pointer's git oid.
            }
            self._send(302, headers, send_body=send_body)

    return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up on a stalled answer breaks the pipe; that is the fault under test, not news.
        pass


@contextlib.contextmanager
def running_hub() -> Iterator[Hub]:
    """A running local hub and its CDN, each on a free port of 127.0.0.1."""
    state = Hub()
    servers = [_Server(("127.0.0.1", 0), _handler(state, cdn=cdn)) for cdn in (False, True)]
    threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    state.url, state.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    try:
        yield state
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Hub]:
    """A running local hub, with HF_ENDPOINT and an empty hub cache pointed at it, and short timeouts."""
    with running_hub() as state:
        monkeypatch.setenv("HF_ENDPOINT", state.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # No token file of the user's is read.
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
        yield state
