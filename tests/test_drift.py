"""Drift explained link by link: region digests, `lock --check`, verify's artifacts stage, bounded pins."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import xxhash

from stacklock.files.digest import HashCache, digest_regions
from stacklock.gguf.reader import read_gguf
from stacklock.lock.project import read_lock
from stacklock.model.lock import MAX_PINNED_TEXT, PinnedText, render_lock
from tests.conftest import CHATML, Result
from tests.gguf_builder import TypedValue, build_tiny_gguf

Cli = Callable[..., Result]

# ChatML with the assistant turn closed by another line: only the embedded template differs.
CHATML_FIXED = CHATML.replace("<|im_end|>\n{% endfor %}", "<|im_end|>\n\n{% endfor %}")

MANIFEST = """[stack]
name = "drift"

[model]
source = "tiny.gguf"

[template]
source = "{template}"

[engine]
name = "llama-cpp-python"

[sampler]
temperature = 0.0
seed = 0

[[smoke]]
name = "hi"
max-tokens = 3
messages = [{{ role = "user", content = "hello" }}]
"""


def _project(tmp_path: Path, *, template: str = "gguf", **arguments: Any) -> Path:
    arguments.setdefault("chat_template", CHATML)
    build_tiny_gguf(tmp_path / "tiny.gguf", **arguments)
    if template.startswith("file:"):
        (tmp_path / template.removeprefix("file:")).write_text(CHATML)
    (tmp_path / "llmstack.toml").write_text(MANIFEST.format(template=template))
    return tmp_path


def test_region_digests_split_the_file_at_its_data_region(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML)
    offset = read_gguf(path).data_offset
    data = path.read_bytes()
    found = digest_regions(path, offset)
    assert 0 < offset < len(data)
    assert found.sha256 == hashlib.sha256(data).hexdigest()
    assert found.header_sha256 == hashlib.sha256(data[:offset]).hexdigest()
    assert found.data_xxh3 == xxhash.xxh3_128(data[offset:]).hexdigest()


def test_region_digests_are_cached_by_file_identity(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "tiny.gguf")
    cache = HashCache(tmp_path / "cache")
    asked: list[Path] = []

    def offset(p: Path) -> int:
        asked.append(p)
        return read_gguf(p).data_offset

    first = cache.digests(path, offset)
    cache.save()
    again = HashCache(tmp_path / "cache").digests(path, offset)
    assert again == first
    assert asked == [path]  # The second read came from the cache, without parsing the header again.


def test_a_re_upload_with_only_the_template_changed_is_explained_by_lock_check(
    tmp_path: Path, cli: Cli
) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    build_tiny_gguf(project / "tiny.gguf", chat_template=CHATML_FIXED)
    result = cli("lock", "--check", cwd=project)
    assert result.code == 1
    step, first = result.err.splitlines()[:2]
    assert step == "hashing tiny.gguf"  # The reporter's one line per step, on a pipe.
    assert "tiny.gguf changed" in first
    assert "the embedded chat template changed (diff below); tensor data identical" in first
    assert "metadata changed" not in first
    assert "+++ b/tokenizer.chat_template" in result.err
    assert "+<|im_start|>{{ m['role'] }}" not in result.err  # Only the changed lines and their context.
    assert re.search(r"^\+$", result.err, re.MULTILINE)  # The added blank line.


def test_lock_check_names_the_metadata_key_and_the_tensor_data(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    build_tiny_gguf(project / "tiny.gguf", chat_template=CHATML, name="renamed")
    renamed = cli("lock", "--check", cwd=project)
    assert "metadata changed: general.name; tensor data identical" in renamed.err
    build_tiny_gguf(project / "tiny.gguf", chat_template=CHATML, seed=1)
    retrained = cli("lock", "--check", cwd=project)
    assert retrained.err.splitlines()[1].endswith(
        "): tensor data changed; run `stacklock lock` to re-pin (and `stacklock record`), or restore the locked file"
    )


def test_without_the_old_text_the_template_change_is_told_by_digest(tmp_path: Path, cli: Cli) -> None:
    # The stack's template comes from a file, so the lock does not hold the embedded text.
    project = _project(tmp_path, template="file:chatml.jinja")
    assert cli("lock", cwd=project).code == 0
    old = read_lock(project / "llmstack.lock").model.chat_template_sha256
    build_tiny_gguf(project / "tiny.gguf", chat_template=CHATML_FIXED)
    result = cli("lock", "--check", cwd=project)
    assert old is not None
    assert f"the embedded chat template changed (sha256 {old[:12]}… → " in result.err
    assert "tensor data identical" in result.err


def test_verify_explains_a_template_only_re_upload_at_the_artifacts_stage(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    assert cli("record", cwd=project).code == 0
    build_tiny_gguf(project / "tiny.gguf", chat_template=CHATML_FIXED)
    result = cli("verify", cwd=project)
    assert result.code == 1
    artifacts = next(line for line in result.out.splitlines() if line.strip().startswith("artifacts"))
    assert "FAIL" in artifacts
    assert "the embedded chat template changed (diff below); tensor data identical" in artifacts
    assert "+++ b/tokenizer.chat_template" in result.out
    report = json.loads(cli("verify", "--format", "json", cwd=project).out)
    stage = report["results"][0]["stages"][0]
    assert stage["changes"] == ["the embedded chat template changed (diff below)", "tensor data identical"]
    assert stage["diff"].startswith("--- a/tokenizer.chat_template")


LONG = "x" * (2 << 20)


def test_a_megabyte_metadata_string_is_pinned_by_digest_and_length(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path, extra_metadata={"general.description": LONG})
    assert cli("lock", cwd=project).code == 0
    lock_file = project / "llmstack.lock"
    assert lock_file.stat().st_size < 64 << 10
    pinned = read_lock(lock_file).model.metadata["general.description"]
    assert pinned == PinnedText(sha256=hashlib.sha256(LONG.encode()).hexdigest(), length=len(LONG))
    assert cli("lock", "--check", cwd=project).code == 0
    # The same length, one character changed: the digest still sees it.
    build_tiny_gguf(
        project / "tiny.gguf", chat_template=CHATML, extra_metadata={"general.description": LONG[:-1] + "y"}
    )
    result = cli("lock", "--check", cwd=project)
    assert result.code == 1
    assert "metadata changed: general.description; tensor data identical" in result.err


def test_short_metadata_strings_stay_verbatim(tmp_path: Path, cli: Cli) -> None:
    text = "y" * MAX_PINNED_TEXT
    project = _project(tmp_path, extra_metadata={"general.description": text})
    assert cli("lock", "--check", cwd=project).code == 1
    assert cli("lock", cwd=project).code == 0
    assert read_lock(project / "llmstack.lock").model.metadata["general.description"] == text


def test_an_older_lock_stays_readable_and_fresh(tmp_path: Path, cli: Cli) -> None:
    """A lock without region digests and with a long string copied verbatim, as stacklock wrote them before."""
    project = _project(
        tmp_path,
        extra_metadata={"general.description": TypedValue("z" * 4000, gguf.GGUFValueType.STRING)},
    )
    assert cli("lock", cwd=project).code == 0
    lock_file = project / "llmstack.lock"
    lock = read_lock(lock_file)
    metadata = {**lock.model.metadata, "general.description": "z" * 4000}
    model = lock.model.model_copy(update={"metadata": metadata, "header_sha256": None, "data_xxh3": None})
    lock_file.write_text(render_lock(lock.model_copy(update={"model": model})))
    text = lock_file.read_text()
    assert "z" * 4000 in text
    assert "data-xxh3" not in text
    assert cli("lock", "--check", cwd=project).code == 0
