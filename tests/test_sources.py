"""Model sources: parsing, local files, and ``hf://`` through the real huggingface_hub client.

The hub is the hub-compatible HTTP server of :mod:`tests.hub_server` on 127.0.0.1. Nothing here reaches the
real hub.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from stacklock.errors import ExitCode, NetworkError, SourceError
from stacklock.sources.model import (
    FetchedModel,
    HubSource,
    LocalSource,
    RegistryModelSource,
    fetch_model,
    parse_model_source,
)
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf
from tests.hub_server import Hub
from tests.recording import RecordingReporter

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
REPO = "tiny-org/tiny-gguf"


@pytest.fixture
def model_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "built" / "tiny.gguf"
    path.parent.mkdir()
    build_tiny_gguf(path, chat_template=CHATML)
    return path.read_bytes()


def _fetch(text: str, **kwargs: object) -> FetchedModel:
    return fetch_model(parse_model_source(text), Path("/nonexistent"), **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models/x.gguf", LocalSource("models/x.gguf")),
        ("file:models/x.gguf", LocalSource("models/x.gguf")),
        ("/abs/x.gguf", LocalSource("/abs/x.gguf")),
        ("hf://owner/repo/x.gguf", HubSource("owner/repo", "main", "x.gguf")),
        ("hf://owner/repo@v1.0/sub/dir/x.gguf", HubSource("owner/repo", "v1.0", "sub/dir/x.gguf")),
        (f"hf://o-1/r.e_po@{COMMIT}/x.gguf", HubSource("o-1/r.e_po", COMMIT, "x.gguf")),
        ("registry://gemma3-270m", RegistryModelSource("gemma3-270m")),
    ],
)
def test_parse_model_source(text: str, expected: object) -> None:
    assert parse_model_source(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "hf://just-a-repo",
            "model.source: 'hf://just-a-repo' is not a hub source; write hf://owner/repo@revision/path/to/file.gguf",
        ),
        (
            "hf://owner/repo@main",
            "model.source: 'hf://owner/repo@main' is not a hub source; write hf://owner/repo@revision/path/to/file.gguf",
        ),
        (
            "s3://bucket/x.gguf",
            (
                "model.source: unsupported source scheme in 's3://bucket/x.gguf'; "
                "use a local path, hf://owner/repo@revision/file.gguf or registry://name"
            ),
        ),
    ],
)
def test_parse_model_source_errors(text: str, message: str) -> None:
    with pytest.raises(SourceError) as info:
        parse_model_source(text)
    assert str(info.value) == message


def test_local_source_is_relative_to_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.gguf").write_bytes(b"GGUF")
    assert fetch_model(LocalSource("models/x.gguf"), tmp_path) == FetchedModel(
        tmp_path / "models" / "x.gguf", None
    )
    with pytest.raises(SourceError) as info:
        fetch_model(LocalSource("models/y.gguf"), tmp_path)
    assert str(info.value) == (
        "model.source: file not found: models/y.gguf; fix the path (relative to llmstack.toml) or create the file"
    )


# -------------------------------------------------------------------------------------------- hub sources


def test_hub_download_returns_the_file_and_its_commit(hub: Hub, model_bytes: bytes, tmp_path: Path) -> None:
    hub.add(REPO, COMMIT, {"gguf/tiny-q8_0.gguf": model_bytes})
    fetched = _fetch(f"hf://{REPO}/gguf/tiny-q8_0.gguf")
    assert fetched.revision == COMMIT  # "main" was asked for; the lock needs the commit it resolved to.
    assert fetched.path.read_bytes() == model_bytes
    assert fetched.path.is_relative_to(tmp_path / "hf-cache")
    assert fetched.path.parts[-4:] == ("snapshots", COMMIT, "gguf", "tiny-q8_0.gguf")
    assert f"HEAD /{REPO}/resolve/main/gguf/tiny-q8_0.gguf" in hub.requests
    assert f"GET /blobs/{hashlib.sha256(model_bytes).hexdigest()}" in hub.requests


def test_hub_tags_and_commits_resolve_to_their_own_commit(hub: Hub, model_bytes: bytes) -> None:
    hub.add(REPO, OLD_COMMIT, {"tiny.gguf": model_bytes[:-1] + b"\0"}, refs=("v1",))
    hub.add(REPO, COMMIT, {"tiny.gguf": model_bytes})
    assert _fetch(f"hf://{REPO}@v1/tiny.gguf").revision == OLD_COMMIT
    pinned = _fetch(f"hf://{REPO}@{OLD_COMMIT}/tiny.gguf")
    assert pinned.revision == OLD_COMMIT
    assert pinned.path.read_bytes()[-1:] == b"\0"
    assert _fetch(f"hf://{REPO}/tiny.gguf").path.read_bytes() == model_bytes


def test_the_endpoint_parameter_wins_over_the_environment(
    hub: Hub, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model_bytes})
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # Nothing listens on the discard port.
    assert _fetch(f"hf://{REPO}/tiny.gguf", endpoint=hub.url).revision == COMMIT


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "hf://nobody/nothing@main/tiny.gguf",
            (
                "model.source: hf://nobody/nothing@main/tiny.gguf: repository not found (or private); "
                "check the owner/repo name (a private repository needs HF_TOKEN)"
            ),
        ),
        (
            f"hf://{REPO}@no-such-branch/tiny.gguf",
            f"model.source: hf://{REPO}@no-such-branch/tiny.gguf: revision not found; check the branch, tag or commit",
        ),
        (
            f"hf://{REPO}@main/other.gguf",
            f"model.source: hf://{REPO}@main/other.gguf: file not found in the repository; check the path",
        ),
    ],
)
def test_hub_errors_are_one_line_source_errors(
    hub: Hub, model_bytes: bytes, source: str, message: str
) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model_bytes})
    with pytest.raises(SourceError) as info:
        _fetch(source)
    assert str(info.value) == message
    assert info.value.exit_code == ExitCode.BAD_INPUT


def test_offline_uses_the_hub_cache(hub: Hub, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model_bytes})
    online = _fetch(f"hf://{REPO}/tiny.gguf")
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = _fetch(f"hf://{REPO}/tiny.gguf")
    assert offline == online
    assert offline.revision == COMMIT
    assert hub.requests == []  # Not one request: offline means offline.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert _fetch(f"hf://{REPO}/tiny.gguf", offline=True) == online
    assert hub.requests == []


def test_offline_without_the_file_cached_is_a_network_error(hub: Hub, model_bytes: bytes) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model_bytes})
    with pytest.raises(NetworkError) as info:
        _fetch(f"hf://{REPO}/tiny.gguf", offline=True)
    assert str(info.value) == (
        f"model.source: hf://{REPO}@main/tiny.gguf: not in the local hub cache and the hub is not reachable; "
        "go online once to download it, or set HF_ENDPOINT"
    )
    assert info.value.exit_code == ExitCode.UNAVAILABLE
    assert hub.requests == []


def test_a_hub_cache_that_cannot_be_written_is_not_a_network_error(
    hub: Hub, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The cache directory lies under a regular file: the download itself works, storing it cannot.
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a-file" / "hub"))
    hub.add(REPO, COMMIT, {"tiny.gguf": model_bytes})
    with pytest.raises(SourceError) as info:
        _fetch(f"hf://{REPO}/tiny.gguf")
    assert str(info.value).startswith(
        f"model.source: hf://{REPO}@main/tiny.gguf: cannot write the hub cache: "
    )
    assert "Not a directory" in str(info.value)
    assert str(info.value).endswith("; free disk space, or point HF_HUB_CACHE at a writable directory")
    assert info.value.exit_code == ExitCode.BAD_INPUT


def test_a_download_reports_its_bytes(hub: Hub, model_bytes: bytes) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model_bytes})
    reporter = RecordingReporter()
    fetch_model(parse_model_source(f"hf://{REPO}/tiny.gguf"), Path("/nonexistent"), reporter=reporter)
    step = f"fetching hf://{REPO}@main/tiny.gguf"
    assert reporter.steps == [step]
    assert reporter.progress_of(step)[-1] == (len(model_bytes), len(model_bytes))
    assert reporter.calls[-1] == ("finished", step)


def test_an_endpoint_that_is_not_a_hub_is_a_network_error(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    # HF_ENDPOINT at a plain web server (here the CDN) and nothing cached: the client cannot fall back to the
    # cache. (A closed port would do too, but the client retries it for about 20 seconds.)
    monkeypatch.setenv("HF_ENDPOINT", hub.cdn_url)
    with pytest.raises(NetworkError) as info:
        _fetch(f"hf://{REPO}/tiny.gguf")
    assert str(info.value) == (
        f"model.source: hf://{REPO}@main/tiny.gguf: not in the local hub cache and the hub is not reachable; "
        "go online once to download it, or set HF_ENDPOINT"
    )
    assert int(info.value.exit_code) == 3
    # First the quick reachability probe (it answers, so the client asks), then the client's one request.
    assert hub.requests == ["HEAD /", f"HEAD /{REPO}/resolve/main/tiny.gguf"]


# ------------------------------------------------------------------------------------------ through the CLI

HUB_MANIFEST = """\
[stack]
name = "tiny-hub"

[model]
source = "{source}"

[template]
source = "gguf"

[engine]
name = "llama.cpp"
version = "==b4628"
"""


def _hub_project(tmp_path: Path, source: str) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "llmstack.toml").write_text(HUB_MANIFEST.format(source=source), encoding="utf-8")
    return project


def test_lock_a_hub_model(hub: Hub, model_bytes: bytes, tmp_path: Path, cli: Callable[..., Result]) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model_bytes})
    project = _hub_project(tmp_path, f"hf://{REPO}/tiny.gguf")
    result = cli("lock", cwd=project)
    assert result.code == 0, result.err
    lock = (project / "llmstack.lock").read_text(encoding="utf-8")
    assert f'source = "hf://{REPO}/tiny.gguf"' in lock
    assert f'sha256 = "{hashlib.sha256(model_bytes).hexdigest()}"' in lock


@pytest.mark.parametrize(
    ("source", "offline", "code", "error"),
    [
        (
            f"hf://{REPO}@main/missing.gguf",
            False,
            2,
            f"error: model.source: hf://{REPO}@main/missing.gguf: file not found in the repository; check the path\n",
        ),
        (
            f"hf://{REPO}@main/tiny.gguf",
            True,
            3,
            (
                f"error: model.source: hf://{REPO}@main/tiny.gguf: not in the local hub cache and the hub is not "
                "reachable; go online once to download it, or set HF_ENDPOINT\n"
            ),
        ),
    ],
)
def test_lock_hub_errors_exit_with_one_line(
    hub: Hub,
    model_bytes: bytes,
    tmp_path: Path,
    cli: Callable[..., Result],
    source: str,
    offline: bool,
    code: int,
    error: str,
) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model_bytes})
    project = _hub_project(tmp_path, source)
    result = cli("lock", *(["--offline"] if offline else []), cwd=project)
    # Online, a hub model is locked from its metadata and header (no download step); offline, from the cache.
    step = f"fetching {source}\n" if offline else ""
    assert (result.code, result.err) == (code, f"{step}{error}")
    assert not (project / "llmstack.lock").exists()
