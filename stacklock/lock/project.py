"""The project's files on disk: reading llmstack.toml and llmstack.lock, and writing the lock atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stacklock.errors import LockError, ManifestError
from stacklock.files.atomic import write_text_atomic
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
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text)
    return True
