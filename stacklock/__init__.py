"""stacklock: lock and certify local LLM stacks.

The Python API (:mod:`stacklock.api`) is importable from here: ``stacklock.lock_stack``, ``check_lock``,
``check_stack``, ``record_goldens``, ``verify_stack`` and ``diff_locks``. Importing ``stacklock`` loads none of
them; the first use of a name imports it (PEP 562), so the command line pays only for what a command uses.
``__init__.pyi`` declares the names for type checkers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "__version__",
    "check_lock",
    "check_stack",
    "diff_locks",
    "lock_stack",
    "record_goldens",
    "verify_stack",
]

_API = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name in _API:
        # By name, not `from stacklock import api`: the package must not import what imports it. Type
        # checkers read the signatures from __init__.pyi.
        value = getattr(importlib.import_module("stacklock.api"), name)
        globals()[name] = value
        return value
    # The version is read from the installed metadata only when asked for: every command pays for imports,
    # and few print the version.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            release = version("stacklock")
        except PackageNotFoundError:  # A source tree that was not installed.
            release = "0.0.0+unknown"
        globals()["__version__"] = release
        return release
    raise AttributeError(f"module 'stacklock' has no attribute {name!r}")
