"""Freshness: `stacklock lock --check`, which names the first pin that no longer matches its inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stacklock.errors import StaleLockError
from stacklock.lock.diff import embedded_template, explain_model, template_diff
from stacklock.lock.load import load_inputs
from stacklock.lock.project import read_lock, read_manifest
from stacklock.lock.resolve import resolve
from stacklock.model.lock import (
    Lock,
    manifest_hash,
    pin_metadata_value,
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
    if locked.model.sha256 != fresh.model.sha256:
        raise _model_changed(lock_path, locked, fresh, inputs.header.chat_template)
    difference = first_difference(_comparable(locked).pins(), _comparable_to(fresh, locked).pins())
    if difference is not None:
        where, old, new = difference
        raise StaleLockError(
            f"{lock_path} is stale: {where} is {_short(old)} in the lock but {_short(new)} now",
            hint="run `stacklock lock` to re-pin, or restore the input that changed",
        )
    return locked


def _model_changed(lock_path: Path, locked: Lock, fresh: Lock, embedded: str | None) -> StaleLockError:
    """The model file changed: say which parts of it did, with the template's diff when it is known."""
    old_text = embedded_template(locked)
    lines = explain_model(locked.model, fresh.model, old_template=old_text, new_template=embedded)
    message = f"{lock_path} is stale: {locked.model.path} changed ({locked.model.sha256[:12]}… → "
    message += f"{fresh.model.sha256[:12]}…): " + "; ".join(lines)
    hint = "run `stacklock lock` to re-pin (and `stacklock record`), or restore the locked file"
    if old_text is not None and embedded is not None and old_text != embedded:
        # The diff follows the one-line reason, so that the reason and its fix stay on the first line.
        message += f"; {hint}\n" + template_diff(old_text, embedded, name="tokenizer.chat_template")
        hint = ""
    return StaleLockError(message, hint=hint or None)


def _comparable(locked: Lock) -> Lock:
    """A lock written before long metadata strings were bounded, with them pinned as now (by digest)."""
    metadata = {
        k: pin_metadata_value(v) if isinstance(v, str) else v for k, v in locked.model.metadata.items()
    }
    return locked.model_copy(update={"model": locked.model.model_copy(update={"metadata": metadata})})


def _comparable_to(fresh: Lock, locked: Lock) -> Lock:
    """The fresh lock without the pins an older lock did not have yet (region digests): not a change."""
    absent = {k: None for k in ("header_sha256", "data_xxh3") if getattr(locked.model, k) is None}
    return fresh.model_copy(update={"model": fresh.model.model_copy(update=absent)})


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
