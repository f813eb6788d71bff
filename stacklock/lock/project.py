"""The project's files on disk: reading llmstack.toml and llmstack.lock, and writing the lock atomically."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from filelock import FileLock, Timeout

from stacklock.errors import LockError, ManifestError, UsageError
from stacklock.files.atomic import file_error, write_text_atomic
from stacklock.files.cache_dir import default_cache_dir
from stacklock.model.lock import Lock, parse_lock, render_lock
from stacklock.model.manifest import Manifest, parse_manifest
from stacklock.model.toml import parse_toml
from stacklock.sources.local import read_text_file


def read_manifest(path: Path) -> tuple[Manifest, dict[str, Any]]:
    text = read_text_file(
        path,
        str(path),
        ManifestError,
        missing="no manifest here",
        hint="run `stacklock init MODEL.gguf` to write one",
    )
    return parse_manifest(text, str(path)), parse_toml(text, str(path), ManifestError)


def read_lock(path: Path) -> Lock:
    text = read_text_file(path, str(path), LockError, missing="no lock here", hint="run `stacklock lock`")
    return parse_lock(text, str(path))


def write_lock(path: Path, lock: Lock) -> bool:
    """Write the lock atomically; returns whether the file changed."""
    text = render_lock(lock)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        # Not there, or not a readable lock: the write below replaces it, or says why it cannot.
        pass
    write_text_atomic(path, text)
    return True


WAIT_FOR_OTHER_RUN_S: Final = 600.0


@contextlib.contextmanager
def project_lock(lock_path: Path) -> Iterator[None]:
    """Serialise the runs that rewrite one lock (`lock`, `record`): a second run waits for the first.

    The lock file lives in the cache directory, keyed by the lock's resolved path, so projects stay clean; the
    operating system releases it when a run dies, however it dies. Once held, temporary files that a killed
    run left beside the lock are removed: no other run can be writing them.
    """
    key = hashlib.sha256(str(lock_path.resolve()).encode()).hexdigest()[:32]
    directory = default_cache_dir() / "runs"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_error("create the cache directory", directory, exc) from None
    try:
        with FileLock(directory / f"{key}.lock", timeout=WAIT_FOR_OTHER_RUN_S):
            for stale in lock_path.parent.glob(f".{lock_path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            yield
    except Timeout:
        raise UsageError(
            f"{lock_path}: another stacklock run has been rewriting it for {WAIT_FOR_OTHER_RUN_S:g} s",
            hint="wait for it to finish, or stop it",
        ) from None
