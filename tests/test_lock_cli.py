"""`stacklock init`, `lock`, `lock --check` and `inspect`, end to end on tiny GGUF files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from stacklock.model.lock import created_by, parse_lock, render_lock
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

DATA = Path(__file__).parent / "data" / "locks"

PINNED_MANIFEST = """\
[stack]
name = "tiny-chatml"
description = "A tiny random model, for the golden lock"

[model]
source = "tiny.gguf"

[template]
source = "gguf"

[engine]
name = "llama.cpp"
version = "==b4628"

[backend]
kind = "cpu"
threads = 2

[sampler]
temperature = 0.0
seed = 7
stop = ["<|im_end|>"]

[[smoke]]
name = "hello"
system = "Be brief."
messages = [{ role = "user", content = "Hello" }]
max-tokens = 4
expect = { regex = ".*" }

[[smoke]]
name = "raw"
prompt = "Once upon a time"
max-tokens = 4
"""

Cli = Callable[..., Result]


def _project(tmp_path: Path, manifest: str = PINNED_MANIFEST) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML)
    (tmp_path / "llmstack.toml").write_text(manifest)
    return tmp_path


def test_golden_lock(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    result = cli("lock", cwd=project)
    assert result.code == 0, result.err
    text = (project / "llmstack.lock").read_text()
    golden = DATA / "tiny-chatml.lock"
    if os.environ.get("STACKLOCK_REGEN_GOLDENS"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_lock_is_deterministic_across_runs_and_directories(tmp_path: Path, cli: Cli) -> None:
    one = _project(tmp_path / "one")
    two = _project(tmp_path / "two")
    assert cli("lock", cwd=one).code == 0
    first = (one / "llmstack.lock").read_bytes()
    assert cli("lock", "--no-cache", cwd=one).code == 0
    assert (one / "llmstack.lock").read_bytes() == first
    assert cli("lock", cwd=two).code == 0
    assert (two / "llmstack.lock").read_bytes() == first


def test_lock_round_trips(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    text = (project / "llmstack.lock").read_text()
    lock = parse_lock(text)
    assert render_lock(lock) == text
    assert lock.sampler.origin["seed"] == "manifest"
    # llama.cpp has no adapter: its defaults are unknown, never llama-cpp-python's.
    assert lock.sampler.origin["top-k"] == "unknown"
    assert lock.engine.version == "b4628"
    assert lock.engine.build == 4628
    assert lock.template.features == ()
    assert lock.smoke[0].messages is not None
    assert [m.role for m in lock.smoke[0].messages] == ["system", "user"]


def test_gguf_sampling_recommendations_sit_between_engine_defaults_and_manifest(
    tmp_path: Path, cli: Cli
) -> None:
    build_tiny_gguf(
        tmp_path / "tiny.gguf",
        chat_template=CHATML,
        extra_metadata={"general.sampling.top_k": 20, "general.sampling.temp": 0.6},
    )
    (tmp_path / "llmstack.toml").write_text(PINNED_MANIFEST)
    assert cli("lock", cwd=tmp_path).code == 0
    lock = parse_lock((tmp_path / "llmstack.lock").read_text())
    assert (lock.sampler.top_k, lock.sampler.origin["top-k"]) == (20, "gguf")
    # The manifest's temperature wins over the GGUF's recommendation.
    assert (lock.sampler.temperature, lock.sampler.origin["temperature"]) == (0.0, "manifest")


def test_check_passes_on_a_fresh_lock(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    result = cli("lock", "--check", cwd=project)
    assert result.code == 0, result.err
    assert "is fresh" in result.err


def test_check_fails_when_the_lock_is_missing(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    result = cli("lock", "--check", cwd=project)
    assert result.code == 1
    assert result.err == "error: llmstack.lock: missing; run `stacklock lock` and commit the lock\n"


def test_check_fails_when_the_manifest_changed(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    manifest = project / "llmstack.toml"
    manifest.write_text(manifest.read_text().replace("seed = 7", "seed = 8"))
    result = cli("lock", "--check", cwd=project)
    assert result.code == 1
    assert result.err == (
        "error: llmstack.lock is stale: llmstack.toml changed since it was locked; run `stacklock lock`\n"
    )


def test_comments_and_formatting_do_not_make_the_lock_stale(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    manifest = project / "llmstack.toml"
    manifest.write_text("# A comment.\n" + manifest.read_text().replace("seed = 7", "seed   =   7  # fixed"))
    assert cli("lock", "--check", cwd=project).code == 0


def test_check_names_the_pinned_file_whose_hash_changed(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    locked = parse_lock((project / "llmstack.lock").read_text())
    model = project / "tiny.gguf"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # A weight byte: the header, and so every other pin, stays the same.
    model.write_bytes(bytes(data))
    result = cli("lock", "--check", cwd=project)
    assert result.code == 1
    now = hashlib.sha256(model.read_bytes()).hexdigest()
    assert (
        result.err
        == (
            "hashing tiny.gguf\n"  # The reporter's one line per step, on a pipe.
            f"error: llmstack.lock is stale: tiny.gguf changed ({locked.model.sha256[:12]}… → {now[:12]}…): "
            "tensor data changed; run `stacklock lock` to re-pin (and `stacklock record`), or restore the locked file\n"
        )
    )


def test_check_notices_a_changed_template_file(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path, PINNED_MANIFEST.replace('source = "gguf"', 'source = "file:chat.jinja"'))
    (project / "chat.jinja").write_text(CHATML)
    assert cli("lock", cwd=project).code == 0
    (project / "chat.jinja").write_text(CHATML.replace("assistant", "model"))
    result = cli("lock", "--check", cwd=project)
    assert result.code == 1
    assert "is stale: template.sha256 is" in result.err


def test_failed_lock_leaves_the_previous_lock_intact(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    before = (project / "llmstack.lock").read_bytes()
    manifest = project / "llmstack.toml"
    manifest.write_text(manifest.read_text().replace('source = "gguf"', 'source = "file:missing.jinja"'))
    result = cli("lock", cwd=project)
    assert result.code == 2
    assert result.err == (
        "error: template.source: file not found: missing.jinja; fix the path (relative to llmstack.toml) or create the file\n"
    )
    assert (project / "llmstack.lock").read_bytes() == before
    assert sorted(p.name for p in project.iterdir()) == ["llmstack.lock", "llmstack.toml", "tiny.gguf"]


def test_manifest_sha256_mismatch_is_refused(tmp_path: Path, cli: Cli) -> None:
    project = _project(
        tmp_path,
        PINNED_MANIFEST.replace('source = "tiny.gguf"', 'source = "tiny.gguf"\nsha256 = "' + "0" * 64 + '"'),
    )
    result = cli("lock", cwd=project)
    assert result.code == 2
    assert "model.sha256: tiny.gguf has sha256 " in result.err
    assert not (project / "llmstack.lock").exists()


def test_malformed_gguf_is_one_line(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    model = project / "tiny.gguf"
    model.write_bytes(model.read_bytes()[:100])
    result = cli("lock", cwd=project)
    assert result.code == 2
    # The header is parsed before the file is hashed: no step started, the error is the only line.
    assert result.err.count("\n") == 1
    assert result.err.startswith("error: ")
    assert "tiny.gguf" in result.err
    assert "byte" in result.err
    assert "Traceback" not in result.err


def test_chat_smoke_without_a_template_is_explained(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "llmstack.toml").write_text(PINNED_MANIFEST)
    result = cli("lock", cwd=tmp_path)
    assert result.code != 0
    assert result.err.splitlines()[0] == "hashing tiny.gguf"
    assert result.err.count("\n") == 2


def test_init_then_lock_then_check(tiny_project: Path, cli: Cli) -> None:
    result = cli("init", "tiny.gguf", cwd=tiny_project)
    assert result.code == 0, result.err
    manifest = (tiny_project / "llmstack.toml").read_text()
    assert 'source = "tiny.gguf"' in manifest
    assert 'source = "gguf"' in manifest
    assert "[[smoke]]" in manifest
    assert cli("lock", cwd=tiny_project).code == 0
    assert cli("lock", "--check", cwd=tiny_project).code == 0


def test_init_refuses_to_overwrite(tiny_project: Path, cli: Cli) -> None:
    assert cli("init", "tiny.gguf", cwd=tiny_project).code == 0
    result = cli("init", "tiny.gguf", cwd=tiny_project)
    assert result.code == 2
    assert result.err == "error: llmstack.toml already exists; pass --force to overwrite it\n"


def test_init_without_template_picks_raw_prompts(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "bare.gguf")
    result = cli("init", "bare.gguf", cwd=tmp_path)
    assert result.code == 0
    assert "has no chat template" in result.err
    text = (tmp_path / "llmstack.toml").read_text()
    assert 'source = "none"' in text
    assert "messages" not in text
    assert cli("lock", cwd=tmp_path).code == 0


def test_inspect_json(tiny_project: Path, cli: Cli) -> None:
    result = cli("inspect", "tiny.gguf", "--json", cwd=tiny_project)
    assert result.code == 0
    report = json.loads(result.out)
    assert report["architecture"] == "llama"
    assert report["chat-template"] == CHATML
    assert report["tokenizer"]["kind"] == "llama"
    assert report["tokenizer"]["bos-id"] == 1


def test_inspect_says_plainly_when_there_is_no_template(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "bare.gguf")
    result = cli("inspect", "bare.gguf", cwd=tmp_path)
    assert result.code == 0
    assert "chat template none: this GGUF carries no chat template" in result.out


def test_inspect_missing_file(tmp_path: Path, cli: Cli) -> None:
    result = cli("inspect", "nope.gguf", cwd=tmp_path)
    assert result.code == 2
    assert result.err.startswith("error: nope.gguf")
    assert result.err.count("\n") == 1


@pytest.mark.parametrize(
    "args", [["lock", "--allow", "x"], ["lock", "--check", "--allow", "x", "--reason", "y"]]
)
def test_usage_errors(tiny_project: Path, cli: Cli, args: list[str]) -> None:
    (tiny_project / "llmstack.toml").write_text(PINNED_MANIFEST)
    result = cli(*args, cwd=tiny_project)
    assert result.code == 2
    assert result.err.startswith("error: --allow")


def test_relock_reads_the_header_from_the_cache_and_no_cache_rereads_it(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    locked = parse_lock((project / "llmstack.lock").read_text())
    entry = Path(os.environ["STACKLOCK_CACHE_DIR"]) / "headers" / f"{locked.model.sha256}.json"
    data = json.loads(entry.read_text())
    assert data["name"] == "tiny"
    # Tamper with the cached summary: a warm re-lock must use it (no parse), --no-cache must not.
    entry.write_text(json.dumps({**data, "name": "from-the-cache"}))
    assert cli("lock", cwd=project).code == 0
    assert parse_lock((project / "llmstack.lock").read_text()).model.name == "from-the-cache"
    assert cli("lock", "--no-cache", cwd=project).code == 0
    assert parse_lock((project / "llmstack.lock").read_text()).model.name == "tiny"


def test_split_model_pins_every_part(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML, split_max_tensors=8)
    parts = sorted(p.name for p in tmp_path.glob("*.gguf"))
    assert len(parts) >= 2
    manifest = PINNED_MANIFEST.replace('source = "tiny.gguf"', f'source = "{parts[0]}"')
    (tmp_path / "llmstack.toml").write_text(manifest)
    assert cli("lock", cwd=tmp_path).code == 0
    first = (tmp_path / "llmstack.lock").read_text()
    lock = parse_lock(first)
    assert [p.path for p in lock.model.parts] == parts[1:]
    assert all(
        p.sha256 == hashlib.sha256((tmp_path / p.path).read_bytes()).hexdigest() for p in lock.model.parts
    )
    assert cli("lock", cwd=tmp_path).code == 0  # The warm cache gives the same pins.
    assert (tmp_path / "llmstack.lock").read_text() == first
    last = tmp_path / parts[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))
    result = cli("lock", "--check", cwd=tmp_path)
    assert result.code == 1
    assert f"model.parts[{len(parts) - 2}].sha256" in result.err


def test_a_lock_from_a_newer_stacklock_is_refused_naming_both_versions(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    path = project / "llmstack.lock"
    newer = (
        path.read_text()
        .replace("lock-version = 2", "lock-version = 3")
        .replace(f'created-by = "{created_by()}"', 'created-by = "stacklock 9.0.0"')
    )
    path.write_text(newer)
    expected = (
        f"error: llmstack.lock: lock-version 3 (written by stacklock 9.0.0) is newer than {created_by()} reads "
        "(lock-version 2); upgrade stacklock; re-locking with this version would discard what the newer one "
        "pinned\n"
    )
    for command in (["check"], ["verify"], ["lock", "--check"], ["lock"]):
        result = cli(*command, cwd=project)
        assert (result.code, result.err) == (2, expected), command
    # `lock` did not replace the newer lock with an older format.
    assert path.read_text() == newer


def test_a_lock_with_a_prefixed_manifest_hash_stays_fresh(tmp_path: Path, cli: Cli) -> None:
    # Locks written before the one digest format carried `manifest-hash = "sha256:<hex>"`.
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    path = project / "llmstack.lock"
    text = path.read_text()
    digest = parse_lock(text).manifest_hash
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    path.write_text(text.replace(f'manifest-hash = "{digest}"', f'manifest-hash = "sha256:{digest}"'))
    assert parse_lock(path.read_text()).manifest_hash == digest
    result = cli("lock", "--check", cwd=project)
    assert result.code == 0, result.err


def test_init_writes_valid_toml_for_any_model_name(tmp_path: Path, cli: Cli) -> None:
    # The model's own name goes into the description: quotes, backslashes and a DEL character (which JSON
    # leaves raw but TOML forbids in a string) must come out as valid TOML, so tomlkit writes it.
    name = 'tiny "q" \\ \x7f ü'
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML, name=name)
    assert cli("init", "tiny.gguf", cwd=tmp_path).code == 0
    manifest = tomllib.loads((tmp_path / "llmstack.toml").read_text(encoding="utf-8"))
    assert manifest["stack"]["description"] == f"{name} (llama, F32) on CPU"
    assert manifest["smoke"][0]["messages"] == [
        {"role": "user", "content": "Say hello in one short sentence."}
    ]
    assert cli("lock", cwd=tmp_path).code == 0
