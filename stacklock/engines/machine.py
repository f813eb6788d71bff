"""The machine stacklock runs on: operating system, CPU, and which engine packages are installed."""

from __future__ import annotations

import platform
import sys
from importlib import metadata as importlib_metadata

from stacklock.engines.base import Environment
from stacklock.engines.plugins import adapter_info


def installed_engine_version(name: str) -> str | None:
    """The installed version of an engine that is a Python distribution (its adapter says which), read from
    the package metadata without importing the engine; None when it is not installed, not a Python package,
    or no adapter is registered for it."""
    info = adapter_info(name)
    if info is None or info.distribution is None:
        return None
    try:
        return importlib_metadata.version(info.distribution)
    except importlib_metadata.PackageNotFoundError:
        return None


def current_environment() -> Environment:
    """The machine this process runs on."""
    return Environment(
        os=f"{platform.system()} {platform.release()}",
        machine=platform.machine(),
        python=platform.python_version(),
    )


def read_cpu_name() -> str:
    """The CPU model name from the OS, or the machine architecture when it cannot be read."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:  # noqa: PTH123
                for line in cpuinfo:
                    key, _, value = line.partition(":")
                    if key.strip() in {"model name", "Hardware", "cpu model"}:
                        return value.strip()
        except OSError:
            pass
    return platform.processor() or platform.machine() or "unknown"
