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


def read_available_memory() -> int | None:
    """Bytes a new allocation can still get on this machine: available RAM plus free swap, within the
    process's cgroup limit when it runs in a container; None when the OS does not say (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as meminfo:  # noqa: PTH123
            for line in meminfo:
                key, _, value = line.partition(":")
                number = value.split()[:1]
                if number and number[0].isdigit():
                    fields[key] = int(number[0]) * 1024  # /proc/meminfo counts in KiB.
    except OSError:
        return None
    if "MemAvailable" not in fields:
        return None
    available = fields["MemAvailable"] + fields.get("SwapFree", 0)
    limit = _cgroup_room()
    return available if limit is None else min(available, limit)


def _cgroup_room() -> int | None:
    """What the cgroup (v2) this process runs in still allows it, when a limit is set (CI containers)."""
    try:
        with open("/proc/self/cgroup", encoding="ascii", errors="replace") as cgroup:  # noqa: PTH123
            line = next((entry for entry in cgroup if entry.startswith("0::")), None)
        if line is None:
            return None
        directory = "/sys/fs/cgroup" + line[3:].strip()
        with open(f"{directory}/memory.max", encoding="ascii") as maximum:  # noqa: PTH123
            limit = maximum.read().strip()
        with open(f"{directory}/memory.current", encoding="ascii") as current:  # noqa: PTH123
            used = current.read().strip()
    except OSError:
        return None
    if not limit.isdigit() or not used.isdigit():
        return None  # "max": no limit.
    return max(int(limit) - int(used), 0)
