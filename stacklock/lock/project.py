"""The project's files on disk: reading llmstack.toml and llmstack.lock, and writing the lock atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stacklock.errors import LockError, ManifestError
from stacklock.files.atomic import read_text, write_text_atomic
from stacklock.model.lock import Lock, parse_lock, render_lock
from stacklock.model.manifest import Manifest, parse_manifest
from stacklock.model.toml import parse_toml


def read_manifest(path: Path) -> tuple[Manifest, dict[str, Any]]:
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise ManifestError(
            f"{path}: no manifest here", hint="run `stacklock init MODEL.gguf` to write one"
        ) from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start})", hint="save it as UTF-8") from None
    return parse_manifest(text, str(path)), parse_toml(text, str(path), ManifestError)


def read_lock(path: Path) -> Lock:
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise LockError(f"{path}: no lock here", hint="run `stacklock lock`") from None
    except UnicodeDecodeError as exc:
        raise LockError(
            f"{path}: not UTF-8 text (byte {exc.start})", hint="regenerate it with `stacklock lock`"
        ) from None
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
