"""How adapters are found: the ``stacklock.engines`` entry-point group.

The built-in adapters register the same way as third-party ones, from stacklock's own ``pyproject.toml`` (the
package is always installed, so its entry points always exist); duplicate names are an error, and a broken
plugin is an unavailable engine, not a crash.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import cast

from stacklock.engines.base import AdapterInfo, Engine
from stacklock.errors import EngineError

ENTRY_POINT_GROUP = "stacklock.engines"


def _entry_point_targets() -> dict[str, list[str]]:
    targets: dict[str, list[str]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        targets.setdefault(ep.name, [])
        if ep.value not in targets[ep.name]:
            targets[ep.name].append(ep.value)
    return targets


def engine_names() -> tuple[str, ...]:
    """The names of every registered engine, sorted."""
    return tuple(sorted(_entry_point_targets()))


def adapter_class(name: str) -> type[Engine]:
    """The adapter class registered as ``name``, imported but not instantiated (the engine is not loaded)."""
    targets = _entry_point_targets()
    if name not in targets:
        known = ", ".join(sorted(targets)) or "none"
        raise EngineError(
            f"unknown engine {name!r} (registered engines: {known})",
            hint=f"install a package that registers it under the '{ENTRY_POINT_GROUP}' entry points",
        )
    if len(targets[name]) > 1:
        raise EngineError(
            f"engine {name!r} is registered twice: {' and '.join(targets[name])}",
            hint="uninstall one of the packages that register it",
        )
    module_name, _, attr = targets[name][0].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # A broken plugin must not crash the CLI; it is an unavailable engine.
        raise EngineError(
            f"engine {name!r} ({targets[name][0]}) failed to load: {type(exc).__name__}: {exc}",
            hint="reinstall the package that provides it",
        ) from exc
    if not isinstance(getattr(cls, "info", None), AdapterInfo):
        raise EngineError(
            f"engine {name!r} ({targets[name][0]}) declares no AdapterInfo (its class attribute 'info')",
            hint="upgrade the package that provides it",
        )
    return cast("type[Engine]", cls)


def adapter_info(name: str) -> AdapterInfo | None:
    """What the adapter registered as ``name`` declares about its engine; None when no adapter is registered."""
    if name not in _entry_point_targets():
        return None
    return adapter_class(name).info


def load_engine(name: str) -> Engine:
    """Instantiate the engine registered as ``name``; a missing or broken one is an :class:`EngineError`."""
    cls = adapter_class(name)
    try:
        engine = cls()
    except EngineError:
        raise
    except Exception as exc:  # A broken plugin must not crash the CLI; it is an unavailable engine.
        raise EngineError(
            f"engine {name!r} failed to start: {type(exc).__name__}: {exc}",
            hint="reinstall the package that provides it",
        ) from exc
    if not isinstance(engine, Engine):
        raise EngineError(
            f"engine {name!r} ({cls.__module__}:{cls.__qualname__}) does not implement the stacklock engine "
            "interface",
            hint="upgrade the package that provides it",
        )
    return engine
