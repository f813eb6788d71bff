"""Where a registry source's url points: its kind and, for a directory, its path. Standard library only, so
that the command line's replay cache (:mod:`stacklock.cli.replay`) can tell a local registry without loading
the registry code."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Literal

from stacklock.errors import RegistryError

SourceKind = Literal["directory", "git", "archive"]


def source_kind(url: str) -> SourceKind:
    """``git+...`` or a path/URL ending in ``.git`` is git; ``http(s)://`` is an archive; anything else a "
    "directory."""
    if url.startswith("git+") or url.rstrip("/").endswith(".git"):
        return "git"
    if url.startswith(("https://", "http://")):
        return "archive"
    return "directory"


def local_path(url: str, base_dir: Path | None) -> Path:
    """A directory registry's path: a ``file://`` URL or a path, relative ones from ``base_dir``."""
    if url.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    path = Path(url).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


def bundled_registry_path() -> Path:
    """The registry shipped with stacklock: ``stacklock/_registry`` in a wheel, ``registry/`` in a "
    "checkout."""
    here = Path(__file__).resolve().parent.parent  # The stacklock package directory.
    for candidate in (here / "_registry", here.parent / "registry"):
        if (candidate / "registry.toml").is_file():
            return candidate
    raise RegistryError(
        f"the bundled registry is missing (looked in {here / '_registry'} and {here.parent / 'registry'}); "
        "reinstall stacklock"
    )
