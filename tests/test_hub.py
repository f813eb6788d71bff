"""Hub sources without downloading: lock from the LFS digest and a ranged header read; verify fetches exactly the
locked bytes; every failure of the hub is one line.

The real huggingface-hub client talks to the hub-compatible server of :mod:`tests.hub_server` on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest

from stacklock.errors import ExitCode, NetworkError, SourceError
from stacklock.gguf.reader import read_gguf
from stacklock.lock.project import read_lock
from stacklock.sources.hub import read_remote_header, stat_hub_model
from stacklock.verify.session import model_files
from tests.conftest import CHATML, Result
from tests.gguf_builder import TypedValue, build_tiny_gguf
from tests.hub_server import Fault, Hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEW_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
REPO = "tiny-org/tiny-gguf"

MANIFEST = """\
[stack]
name = "tiny-hub"

[model]
source = "{source}"

[engine]
name = "llama.cpp"
version = "==b4628"
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def model(tmp_path: Path) -> bytes:
    # A tail of zero bytes stands in for the weights, so that a download of the whole file would show.
    (tmp_path / "built").mkdir()
    path = build_tiny_gguf(tmp_path / "built" / "tiny.gguf", chat_template=CHATML)
    return path.read_bytes() + bytes(4 << 20)


@pytest.fixture
def split(tmp_path: Path) -> dict[str, bytes]:
    (tmp_path / "split").mkdir()
    first = build_tiny_gguf(tmp_path / "split" / "m.gguf", split_max_tensors=8, chat_template=CHATML)
    return {p.name: p.read_bytes() for p in sorted(first.parent.glob("m-*.gguf"))}


def _project(tmp_path: Path, source: str) -> Path:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "llmstack.toml").write_text(MANIFEST.format(source=source), encoding="utf-8")
    return project


def _cached_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "hf-cache").rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------ lock without download


def test_lock_reads_only_the_header(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    hub.add(REPO, COMMIT, {"gguf/tiny.gguf": model})
    project = _project(tmp_path, f"hf://{REPO}/gguf/tiny.gguf")
    result = cli("lock", cwd=project)
    assert result.code == 0, result.err
    lock = read_lock(project / "llmstack.lock")
    assert lock.model.sha256 == _sha(model)
    assert lock.model.size == len(model)
    assert lock.model.revision == COMMIT
    assert lock.model.path == f"hf://{REPO}@{COMMIT}/gguf/tiny.gguf"
    assert lock.template.text == CHATML
    assert hub.bytes_sent < 1 << 20  # The header, not the 4 MiB of "weights".
    assert _cached_files(tmp_path) == []  # Nothing was downloaded.
    ranged = [r for r in hub.requests if r.startswith("GET /blobs/")]
    assert ranged, hub.requests


def test_a_remote_lock_equals_a_local_lock(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model})
    project = _project(tmp_path, f"hf://{REPO}/tiny.gguf")
    assert cli("lock", cwd=project).code == 0
    remote = read_lock(project / "llmstack.lock")
    assert cli("lock", "--offline", cwd=project).code == 3  # Offline, from an empty cache: nothing to read.
    # Downloaded once (by verify's fetch), an offline lock reads the cached file: the same pins.
    assert model_files(remote, project, download=True)
    assert cli("lock", "--offline", cwd=project).code == 0
    local = read_lock(project / "llmstack.lock")
    # The same pins, but for the region digests, which need the bytes a remote lock does not read.
    regions = {"header_sha256", "data_xxh3"}
    assert local.model.model_dump(exclude=regions) == remote.model.model_dump(exclude=regions)
    assert (remote.model.header_sha256, remote.model.data_xxh3) == (None, None)
    assert local.model.data_xxh3 is not None
    assert local.tokenizer == remote.tokenizer


def test_the_header_is_read_in_a_few_ranges(hub: Hub, tmp_path: Path) -> None:
    # A header larger than the first read: the prefix grows, and little more than the header is transferred.
    words = [f"word{i:06d}" for i in range(200_000)]
    tags = TypedValue(words, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    path = build_tiny_gguf(tmp_path / "big.gguf", extra_metadata={"general.tags": tags})
    data = path.read_bytes() + bytes(8 << 20)
    hub.add(REPO, COMMIT, {"big.gguf": data})
    files = stat_hub_model(REPO, "main", "big.gguf")
    header = read_remote_header(files)
    assert len(header.gguf.metadata["general.tags"]) == 200_000
    data_start = min(t.file_offset for t in header.gguf.tensors)
    assert data_start <= header.bytes_read <= 1.1 * data_start
    assert header.bytes_read < len(data) // 3


def test_split_model_every_part_is_pinned(
    hub: Hub, split: dict[str, bytes], tmp_path: Path, cli: Callable[..., Result]
) -> None:
    assert len(split) == 3
    hub.add(REPO, COMMIT, dict(split))
    project = _project(tmp_path, f"hf://{REPO}/m-00001-of-00003.gguf")
    result = cli("lock", cwd=project)
    assert result.code == 0, result.err
    lock = read_lock(project / "llmstack.lock")
    assert lock.model.sha256 == _sha(split["m-00001-of-00003.gguf"])
    assert [(p.path, p.sha256, p.size) for p in lock.model.parts] == [
        (f"hf://{REPO}@{COMMIT}/{name}", _sha(data), len(data))
        for name, data in split.items()
        if not name.startswith("m-00001")
    ]
    assert _cached_files(tmp_path) == []
    # Verify's fetch downloads every part, at the locked commit, each checked against its pin.
    files = model_files(lock, project, download=True)
    assert sorted(p.name for p in files.values() if p) == sorted(split)


def test_a_later_part_named_as_the_source_is_refused(hub: Hub, split: dict[str, bytes]) -> None:
    hub.add(REPO, COMMIT, dict(split))
    with pytest.raises(SourceError) as info:
        stat_hub_model(REPO, "main", "m-00002-of-00003.gguf")
    assert "is part 2 of 3" in str(info.value)


# --------------------------------------------------------------------------- verify fetches the locked bytes


def _lock(hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]) -> Path:
    hub.add(REPO, COMMIT, {"tiny.gguf": model})
    project = _project(tmp_path, f"hf://{REPO}/tiny.gguf")
    assert cli("lock", cwd=project).code == 0
    return project


def test_verify_fetches_the_locked_commit_after_the_branch_moved(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    project = _lock(hub, model, tmp_path, cli)
    hub.add(REPO, NEW_COMMIT, {"tiny.gguf": model + b"re-uploaded"})  # main moves; the file is re-uploaded.
    lock = read_lock(project / "llmstack.lock")
    path = model_files(lock, project, download=True)[lock.model.path]
    assert path is not None
    assert path.read_bytes() == model
    assert path.parts[-2] == COMMIT
    # A warm cache: no request at all, even with the hub gone.
    hub.requests.clear()
    hub.faults.append(Fault("", status=500, times=100))
    assert model_files(lock, project, download=True)[lock.model.path] == path
    assert hub.requests == []


def test_verify_refuses_bytes_that_do_not_match_the_lock(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    project = _lock(hub, model, tmp_path, cli)
    # The hub now serves other bytes under the locked commit (a re-upload that rewrote history).
    hub.add(REPO, COMMIT, {"tiny.gguf": model + b"tampered"})
    lock = read_lock(project / "llmstack.lock")
    with pytest.raises(NetworkError) as info:
        model_files(lock, project, download=True)
    assert f"the downloaded file has sha256 {_sha(model + b'tampered')}, the lock pins {_sha(model)}" in str(
        info.value
    )


def test_offline_verify_downloads_nothing(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    project = _lock(hub, model, tmp_path, cli)
    lock = read_lock(project / "llmstack.lock")
    hub.requests.clear()
    assert model_files(lock, project) == {lock.model.path: None}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkError) as info:
        model_files(lock, project, download=True)
    assert "not in the local hub cache" in str(info.value)
    assert hub.requests == []


# ---------------------------------------------------------------------------------------- faults of the hub


def test_a_server_error_is_retried(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    hub.faults.append(Fault("HEAD /", status=503))
    hub.faults.append(Fault("GET /blobs/", status=500))
    project = _lock(hub, model, tmp_path, cli)
    assert (project / "llmstack.lock").exists()
    assert all(f.times == 0 for f in hub.faults)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault("HEAD /", status=429, times=99), "rate limited by the hub (HTTP 429) after 3 retries"),
        (Fault("HEAD /", status=503, times=99), "the hub answered HTTP 503 after 3 retries"),
        (Fault("HEAD /", status=401, times=99), "the hub refused access (HTTP 401; HF_TOKEN is not set)"),
        (Fault("HEAD /", status=403, times=99), "the hub refused access (HTTP 403; HF_TOKEN is not set)"),
        (Fault("HEAD /", stall=1.5, times=99), "the hub did not answer in time after 3 retries"),
        (Fault("GET /blobs/", stall=1.5, times=99), "the hub did not answer in time after 3 retries"),
        (Fault("GET /blobs/", truncate=10, times=99), "came back as"),
    ],
)
def test_hub_faults_are_one_line_exit_3(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result], fault: Fault, message: str
) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model})
    hub.faults.append(fault)
    project = _project(tmp_path, f"hf://{REPO}/tiny.gguf")
    result = cli("lock", cwd=project)
    assert result.code == ExitCode.UNAVAILABLE, result.err
    assert result.err.startswith("error: model.source: hf://") or result.err.startswith("error: hf://")
    assert message in result.err
    assert result.err.count("\n") == 1
    assert "Traceback" not in result.err
    assert not (project / "llmstack.lock").exists()


def test_a_gated_repository_names_the_token_variable(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model})
    hub.gated.add(REPO)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_never_printed")
    result = cli("lock", cwd=_project(tmp_path, f"hf://{REPO}/tiny.gguf"))
    assert result.code == ExitCode.UNAVAILABLE
    assert "the repository is gated and this token has no access (HF_TOKEN is set)" in result.err
    assert "hf_secret" not in result.err + result.out


def test_a_truncated_download_is_not_used(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    project = _lock(hub, model, tmp_path, cli)
    lock = read_lock(project / "llmstack.lock")
    hub.faults.append(Fault("GET /blobs/", truncate=1000, times=99))
    with pytest.raises(NetworkError) as info:
        model_files(lock, project, download=True)
    assert info.value.exit_code == ExitCode.UNAVAILABLE
    assert "\n" not in str(info.value)
    snapshots = [p for p in _cached_files(tmp_path) if "snapshots" in p.parts]
    assert snapshots == []


# ---------------------------------------------------------------------------------------- moving revisions


def test_relock_keeps_the_locked_commit_until_upgrade(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    project = _lock(hub, model, tmp_path, cli)
    moved = model + b"new upload"
    hub.add(REPO, NEW_COMMIT, {"tiny.gguf": moved})  # main moves on.
    check = cli("lock", "--check", cwd=project)
    assert check.code == 0, check.err  # A moved branch is information, not staleness.
    assert (
        f"info: model: hf://{REPO}@main has moved to {NEW_COMMIT[:12]} since the lock "
        f"(locked at {COMMIT[:12]}); `stacklock lock --upgrade` re-pins it"
    ) in check.err
    assert cli("lock", cwd=project).code == 0
    assert read_lock(project / "llmstack.lock").model.revision == COMMIT  # Kept.
    assert cli("lock", "--upgrade", cwd=project).code == 0
    upgraded = read_lock(project / "llmstack.lock").model
    assert (upgraded.revision, upgraded.sha256) == (NEW_COMMIT, _sha(moved))
    check = cli("lock", "--check", cwd=project)
    assert check.code == 0
    assert "info:" not in check.err


# ------------------------------------------------------------------------------------- upstream templates

UPSTREAM = CHATML.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n")
TEMPLATE_REPO = "tiny-org/tiny-chat"


@pytest.mark.parametrize(
    ("files", "suffix", "expected"),
    [
        ({"chat_template.jinja": UPSTREAM.encode()}, "", UPSTREAM),
        ({"chat_template.json": json.dumps({"chat_template": UPSTREAM}).encode()}, "", UPSTREAM),
        (
            {
                "tokenizer_config.json": json.dumps(
                    {
                        "chat_template": [
                            {"name": "default", "template": UPSTREAM},
                            {"name": "tool_use", "template": "{# tool_use #}" + UPSTREAM},
                        ]
                    }
                ).encode()
            },
            "#tool_use",
            "{# tool_use #}" + UPSTREAM,
        ),
    ],
)
def test_a_hub_template_is_pinned_by_commit_and_digest(
    hub: Hub,
    model: bytes,
    tmp_path: Path,
    cli: Callable[..., Result],
    files: dict[str, bytes],
    suffix: str,
    expected: str,
) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model})
    hub.add(TEMPLATE_REPO, NEW_COMMIT, dict(files))
    project = _project(tmp_path, f"hf://{REPO}/tiny.gguf")
    manifest = project / "llmstack.toml"
    manifest.write_text(
        manifest.read_text() + f'\n[template]\nsource = "hf://{TEMPLATE_REPO}@main{suffix}"\n',
        encoding="utf-8",
    )
    result = cli("lock", cwd=project)
    assert result.code == 0, result.err
    lock = read_lock(project / "llmstack.lock")
    assert lock.template.text == expected
    assert lock.template.revision == NEW_COMMIT
    assert lock.template.origin == f"hf://{TEMPLATE_REPO}@{NEW_COMMIT}/{next(iter(files))}{suffix}"
    assert lock.template.sha256 == _sha(expected.encode())
    assert lock.template.embedded_differs is True  # The GGUF embeds CHATML.
    stale = [f for f in lock.findings if f.rule == "stale-embedded-template"]
    assert len(stale) == 1
    assert "first differ at character" in stale[0].explanation
    check = cli("check", cwd=project)
    assert "stale-embedded-template" in check.out + check.err


def test_an_unchanged_embedded_template_is_not_stale(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model})
    hub.add(TEMPLATE_REPO, NEW_COMMIT, {"chat_template.jinja": CHATML.encode()})
    project = _project(tmp_path, f"hf://{REPO}/tiny.gguf")
    manifest = project / "llmstack.toml"
    manifest.write_text(
        manifest.read_text() + f'\n[template]\nsource = "hf://{TEMPLATE_REPO}"\n', encoding="utf-8"
    )
    assert cli("lock", cwd=project).code == 0
    lock = read_lock(project / "llmstack.lock")
    assert lock.template.embedded_differs is False
    assert not [f for f in lock.findings if f.rule == "stale-embedded-template"]


def test_a_repository_without_a_template_is_one_line(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model})
    hub.add(TEMPLATE_REPO, NEW_COMMIT, {"README.md": b"hello"})
    project = _project(tmp_path, f"hf://{REPO}/tiny.gguf")
    manifest = project / "llmstack.toml"
    manifest.write_text(
        manifest.read_text() + f'\n[template]\nsource = "hf://{TEMPLATE_REPO}"\n', encoding="utf-8"
    )
    result = cli("lock", cwd=project)
    assert result.code == 2
    assert result.err == (
        f"error: template.source: hf://{TEMPLATE_REPO}@main has none of chat_template.jinja, chat_template.json, "
        "tokenizer_config.json; name the file: hf://owner/repo@revision/path/to/chat_template.jinja\n"
    )


# ------------------------------------------------------------------------------------ upstream tokenizers


def _tokenizer_files(model: Path, *, rename: int | None = None, add_bos: bool = True) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json as transformers writes them for the GGUF's vocabulary."""
    gguf_file = read_gguf(model)
    tokens = list(gguf_file.metadata["tokenizer.ggml.tokens"].values())
    if rename is not None:
        tokens[rename] = "renamed-token"
    bos = tokens[gguf_file.metadata["tokenizer.ggml.bos_token_id"]]
    tokenizer = {"model": {"type": "Unigram", "vocab": [[t, 0.0] for t in tokens]}, "added_tokens": []}
    config = {"bos_token": {"content": bos}, "add_bos_token": add_bos}
    return {
        "tokenizer.json": json.dumps(tokenizer).encode(),
        "tokenizer_config.json": json.dumps(config).encode(),
    }


@pytest.mark.parametrize(
    ("rename", "add_bos", "differences"),
    [
        (None, True, ()),
        (
            40,
            False,
            ("vocabulary: same size, different token texts", "add-bos True in the GGUF, False upstream"),
        ),
    ],
)
def test_an_upstream_tokenizer_is_compared_with_the_gguf(
    hub: Hub,
    tmp_path: Path,
    cli: Callable[..., Result],
    rename: int | None,
    add_bos: bool,
    differences: tuple[str, ...],
) -> None:
    (tmp_path / "built").mkdir()
    path = build_tiny_gguf(tmp_path / "built" / "tiny.gguf", chat_template=CHATML)
    hub.add(REPO, COMMIT, {"tiny.gguf": path.read_bytes()})
    hub.add(TEMPLATE_REPO, NEW_COMMIT, _tokenizer_files(path, rename=rename, add_bos=add_bos))
    project = _project(tmp_path, f"hf://{REPO}/tiny.gguf")
    manifest = project / "llmstack.toml"
    manifest.write_text(
        manifest.read_text() + f'\n[tokenizer]\nsource = "hf://{TEMPLATE_REPO}@main"\n', encoding="utf-8"
    )
    result = cli("lock", *(["--allow", "upstream-tokenizer-mismatch", "--reason", "test"] if differences else []),
                 cwd=project)  # fmt: skip
    assert result.code == 0, result.err
    upstream = read_lock(project / "llmstack.lock").upstream_tokenizer
    assert upstream is not None
    assert upstream.origin == f"hf://{TEMPLATE_REPO}@{NEW_COMMIT}/tokenizer.json"
    assert upstream.differences == differences
    findings = [
        f for f in read_lock(project / "llmstack.lock").findings if f.rule == "upstream-tokenizer-mismatch"
    ]
    assert len(findings) == (1 if differences else 0)


def test_generation_config_defaults_are_their_own_origin(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model})
    config = {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1, "do_sample": True}
    hub.add(TEMPLATE_REPO, NEW_COMMIT, {"generation_config.json": json.dumps(config).encode()})
    project = _project(tmp_path, f"hf://{REPO}/tiny.gguf")
    manifest = project / "llmstack.toml"
    manifest.write_text(
        manifest.read_text() + f'\n[sampler]\ntop-p = 0.5\ndefaults = "hf://{TEMPLATE_REPO}@main"\n',
        encoding="utf-8",
    )
    result = cli("lock", cwd=project)
    assert result.code == 0, result.err
    sampler = read_lock(project / "llmstack.lock").sampler
    assert (sampler.temperature, sampler.repeat_penalty, sampler.top_p) == (0.6, 1.1, 0.5)
    assert sampler.origin["temperature"] == "generation-config"
    assert sampler.origin["repeat-penalty"] == "generation-config"
    assert sampler.origin["top-p"] == "manifest"  # The manifest wins over generation_config.json.
    assert sampler.origin["top-k"] == "unknown"  # llama.cpp has no adapter: its defaults are unknown


def test_upgrade_one_link_leaves_the_others_at_their_locked_commits(
    hub: Hub, model: bytes, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    hub.add(REPO, COMMIT, {"tiny.gguf": model})
    hub.add(TEMPLATE_REPO, COMMIT, {"chat_template.jinja": CHATML.encode()})
    project = _project(tmp_path, f"hf://{REPO}/tiny.gguf")
    manifest = project / "llmstack.toml"
    manifest.write_text(
        manifest.read_text() + f'\n[template]\nsource = "hf://{TEMPLATE_REPO}"\n', encoding="utf-8"
    )
    assert cli("lock", cwd=project).code == 0
    hub.add(REPO, NEW_COMMIT, {"tiny.gguf": model + b"moved"})
    hub.add(TEMPLATE_REPO, NEW_COMMIT, {"chat_template.jinja": UPSTREAM.encode()})
    check = cli("lock", "--check", cwd=project)
    assert check.code == 0, check.err
    assert "info: model: hf://" in check.err
    assert "info: template: hf://" in check.err
    assert cli("lock", cwd=project).code == 0
    kept = read_lock(project / "llmstack.lock")
    assert (kept.model.revision, kept.template.revision) == (COMMIT, COMMIT)
    assert cli("lock", "--upgrade-link", "template", cwd=project).code == 0
    upgraded = read_lock(project / "llmstack.lock")
    assert (upgraded.model.revision, upgraded.template.revision) == (COMMIT, NEW_COMMIT)
    assert upgraded.template.text == UPSTREAM
    bad = cli("lock", "--upgrade-link", "engine", cwd=project)
    assert (bad.code, bad.err) == (
        2,
        "error: --upgrade-link engine: not a hub link; use one of model, template, tokenizer\n",
    )
