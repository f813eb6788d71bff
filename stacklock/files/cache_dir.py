"""The stacklock cache directory (hashes, headers, registries, recorded command results); standard library only,
so that the command line's replay cache finds it without loading the digest code."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$STACKLOCK_CACHE_DIR``, else ``$XDG_CACHE_HOME/stacklock``, else ``~/.cache/stacklock``."""
    env = os.environ.get("STACKLOCK_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "stacklock"
