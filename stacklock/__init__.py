"""stacklock: lock and certify local LLM stacks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stacklock")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
