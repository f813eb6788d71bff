"""Freshness: `stacklock lock --check`, which names the first pin that no longer matches its inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stacklock.errors import StaleLockError
from stacklock.lock.load import load_inputs
from stacklock.lock.project import read_lock, read_manifest
from stacklock.lock.resolve import resolve
from stacklock.model.lock import (
    Lock,
    manifest_hash,
)
from stacklock.registry.fetch import compare_pins


def check_lock(manifest_path: Path, lock_path: Path, *, offline: bool = False) -> Lock:
    """Raise StaleLockError with one reason when the lock is missing or no longer matches its inputs."""
    if not lock_path.exists():
        raise StaleLockError(f"{lock_path}: missing", hint="run `stacklock lock` and commit the lock")
    locked = read_lock(lock_path)
    _manifest, data = read_manifest(manifest_path)
    if locked.manifest_hash != manifest_hash(data):
        raise StaleLockError(
            f"{lock_path} is stale: {manifest_path.name} changed since it was locked",
            hint="run `stacklock lock`",
        )
    # Registries are re-read (not served from the cache by their pinned digest) so that a changed one shows.
    inputs = load_inputs(
        manifest_path,
        offline=offline,
        registry_pins=locked.registries,
        refresh_registries=not offline,
        model_revision=locked.model.revision,
    )
    changed = compare_pins(locked.registries, inputs.registries)
    if changed:
        raise StaleLockError(f"{lock_path} is stale: {changed[0]}", hint="run `stacklock lock` to re-pin")
    fresh = resolve(inputs, carried=locked.allowances).lock
    # What a served engine said at lock time is not an input; the server is not asked again here.
    fresh = fresh.model_copy(
        update={"engine": fresh.engine.model_copy(update={"served": locked.engine.served})}
    )
    difference = first_difference(locked.pins(), fresh.pins())
    if difference is not None:
        where, old, new = difference
        raise StaleLockError(
            f"{lock_path} is stale: {where} is {_short(old)} in the lock but {_short(new)} now",
            hint="run `stacklock lock` to re-pin, or restore the input that changed",
        )
    return locked


def first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first key path at which two dumped locks differ, in lock order."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            found = first_difference(a, b, f"{path}[{index}]")
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
