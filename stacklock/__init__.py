"""stacklock: lock and certify local LLM stacks."""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # The version is read from the installed metadata only when asked for: every command pays for imports,
    # and few print the version.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            value = version("stacklock")
        except PackageNotFoundError:  # A source tree that was not installed.
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'stacklock' has no attribute {name!r}")
