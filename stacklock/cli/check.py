"""`stacklock check`: the lock (or, when `lock` refused, the manifest's resolution) against rules and probes.

When there is no lock because `stacklock lock` refused on error findings, `check` still reports those findings
(exit 1) in every format: tools that read JSON or SARIF see what is wrong instead of "no lock here".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stacklock import __version__
from stacklock.engines.machine import installed_engine_version
from stacklock.errors import StacklockError
from stacklock.lock.load import load_inputs
from stacklock.lock.project import read_lock, read_manifest
from stacklock.lock.resolve import resolve
from stacklock.registry.fetch import resolve_registries
from stacklock.report.check import render_check_json, render_check_text
from stacklock.report.sarif import render_sarif, table_lines
from stacklock.rules.check import check_catalog, check_stack

if TYPE_CHECKING:
    from pathlib import Path

    from stacklock.model.lock import Lock
    from stacklock.registry.files import LoadedRegistry


@dataclass(frozen=True)
class CheckOutput:
    text: str
    ok: bool


def run_check(manifest: Path, lock_path: Path, fmt: str, *, offline: bool) -> CheckOutput:
    """Check the lock, or the manifest's refused resolution when there is no lock; render as ``fmt`` (text, json or sarif)."""
    if lock_path.exists() or not manifest.exists():
        artifact = lock_path
        locked = read_lock(lock_path)
        data = lock_path.read_bytes()
        text = data.decode("utf-8")
        registries = locked_registries(manifest, locked, offline=offline)
        lock_sha256: str | None = hashlib.sha256(data).hexdigest()
    else:
        refused = _refused(manifest, offline=offline)
        if refused is None:
            read_lock(lock_path)  # Raises: no lock, and no finding that explains why.
        assert refused is not None
        (locked, registries), artifact, lock_sha256 = refused, manifest, None
        text = manifest.read_text(encoding="utf-8")
    result = check_stack(locked, registries, installed_engine_version(locked.engine.name))
    if fmt == "sarif":
        rendered = render_sarif(
            result.findings,
            artifact_uri=artifact.name,
            allowances=result.allowances,
            tool_version=__version__,
            catalog=check_catalog(registries),
            lines=table_lines(text),
        ).rstrip("\n")
    elif fmt == "json":
        rendered = render_check_json(result, locked, lock_sha256=lock_sha256, tool_version=__version__)
    else:
        rendered = render_check_text(result)
        if lock_sha256 is None:
            rendered = (
                f"{lock_path.name}: none (lock refused); findings of {manifest.name}'s resolution\n{rendered}"
            )
    return CheckOutput(rendered, result.ok)


def locked_registries(manifest: Path, locked: Lock, *, offline: bool) -> tuple[LoadedRegistry, ...]:
    """The registries a lock is checked against: the manifest's (when there is one) at the lock's pins."""
    sources = read_manifest(manifest)[0].registries if manifest.exists() else ()
    return resolve_registries(sources, pins=locked.registries, offline=offline, base_dir=manifest.parent)


def _refused(manifest: Path, *, offline: bool) -> tuple[Lock, tuple[LoadedRegistry, ...]] | None:
    """The manifest's resolution when `stacklock lock` would refuse it on error findings, else None."""
    try:
        inputs = load_inputs(manifest, offline=offline)
        resolution = resolve(inputs)
    except StacklockError:
        return None
    return (resolution.lock, tuple(inputs.registries)) if resolution.blocking else None
