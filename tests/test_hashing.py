from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from stacklock.files.atomic import write_bytes_atomic, write_text_atomic
from stacklock.files.digest import HashCache, sha256_file
from tests.recording import RecordingReporter


def _file(tmp_path: Path, size: int, name: str = "m.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = _file(tmp_path, (3 << 20) + 17)
    reporter = RecordingReporter()
    assert sha256_file(path, reporter) == hashlib.sha256(path.read_bytes()).hexdigest()
    total = (3 << 20) + 17
    assert reporter.calls[0] == ("started", f"hashing {path.name}")
    assert reporter.progress_of(f"hashing {path.name}") == [
        (1 << 20, total),
        (2 << 20, total),
        (3 << 20, total),
        (total, total),
    ]
    assert reporter.calls[-1] == ("finished", f"hashing {path.name}")


def test_cache_serves_unchanged_file_without_reading(tmp_path: Path) -> None:
    path = _file(tmp_path, 1000)
    cache = HashCache(tmp_path / "cache")
    first = cache.sha256(path)
    cache.save()
    reporter = RecordingReporter()
    assert HashCache(tmp_path / "cache").sha256(path, reporter=reporter) == first
    assert reporter.calls == []  # Served from the cache: nothing was read.


def test_no_cache_forces_rehash(tmp_path: Path) -> None:
    path = _file(tmp_path, 1000)
    cache = HashCache(tmp_path / "cache")
    cache.sha256(path)
    reporter = RecordingReporter()
    cache.sha256(path, use_cache=False, reporter=reporter)
    assert reporter.progress_of(f"hashing {path.name}") == [(1000, 1000)]


def test_changed_file_is_rehashed(tmp_path: Path) -> None:
    path = _file(tmp_path, 1000)
    cache = HashCache(tmp_path / "cache")
    first = cache.sha256(path)
    cache.save()
    # Same size, new content, new mtime: the identity changes, so the stale digest must not be served.
    stat = path.stat()
    path.write_bytes(os.urandom(1000))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = HashCache(tmp_path / "cache").sha256(path)
    assert second != first
    assert second == hashlib.sha256(path.read_bytes()).hexdigest()


def test_damaged_cache_is_ignored(tmp_path: Path) -> None:
    path = _file(tmp_path, 10)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hashes.json").write_text("{not json")
    assert HashCache(tmp_path / "cache").sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_atomic_write_replaces_and_keeps_mode(tmp_path: Path) -> None:
    target = tmp_path / "llmstack.lock"
    target.write_text("old")
    target.chmod(0o640)
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["llmstack.lock"]  # No temporary file left behind.


def test_atomic_write_failure_leaves_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "llmstack.lock"
    target.write_text("old")
    # The write fails after the temporary file exists: the cleanup path must remove it.
    with pytest.raises(TypeError):
        write_bytes_atomic(target, 12345)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["llmstack.lock"]
