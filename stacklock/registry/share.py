"""Sharing known-good stacks through registries: `stacklock share` and `stacklock init --from`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stacklock.errors import RegistryError, UsageError
from stacklock.files.atomic import write_text_atomic
from stacklock.files.digest import sha256_text
from stacklock.model.findings import RegistrySource
from stacklock.model.lock import LOCK_NAME, parse_lock
from stacklock.model.manifest import MANIFEST_NAME, parse_manifest
from stacklock.registry.export import export_stack_entry
from stacklock.registry.fetch import resolve_registries
from stacklock.registry.files import FORMAT_VERSION, parse_certificate
from stacklock.registry.query import find_stack
from stacklock.sources.local import read_text_file


def validate_stack(
    manifest_text: str,
    lock_text: str,
    certificate: Mapping[str, Any],
    *,
    manifest_origin: str = MANIFEST_NAME,
    lock_origin: str = LOCK_NAME,
    certificate_origin: str = "certificate.json",
) -> None:
    """A shareable stack: a valid manifest and lock with goldens, and a certificate that reproduced this lock.

    The origins name the files in errors: the user's files when sharing, the entry's files when exporting.
    """
    parse_manifest(manifest_text, manifest_origin)
    lock = parse_lock(lock_text, lock_origin)
    if not lock.recordings:
        raise RegistryError(
            f"{lock_origin}: no goldens recorded",
            hint="run `stacklock record`, then `stacklock verify --certificate FILE`",
        )
    digest = sha256_text(lock_text)
    if certificate.get("lock-sha256") != digest:
        raise RegistryError(
            f"{certificate_origin}: certifies another lock than {lock_origin} (lock-sha256 differs)",
            hint="run `stacklock verify --certificate FILE` on this lock again",
        )
    if certificate.get("reproduced") is not True:
        raise RegistryError(
            f"{certificate_origin}: the stack did not reproduce",
            hint="only certified stacks are shared; make `stacklock verify` pass first",
        )


def share_stack(
    manifest_path: Path,
    certificate_path: Path,
    registry_dir: Path,
    *,
    name: str | None = None,
    title: str | None = None,
    tags: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    # Checked first: a wrong target is cheaper to fix than anything about the stack.
    if not registry_dir.is_dir():
        raise UsageError(f"{registry_dir}: not a directory", hint="give the path of a registry checkout")
    if not (registry_dir / "registry.toml").is_file():
        raise UsageError(
            f"{registry_dir}: not a registry (no registry.toml)",
            hint=f"give the path of a registry checkout, or create registry.toml with format-version = "
            f"{FORMAT_VERSION} and a name",
        )
    lock_path = manifest_path.with_name(LOCK_NAME)
    manifest_text, lock_text, certificate_text = (
        read_text_file(p, str(p), UsageError, hint="run `stacklock lock`, `record` and `verify` first")
        for p in (manifest_path, lock_path, certificate_path)
    )
    manifest = parse_manifest(manifest_text, str(manifest_path))
    certificate = parse_certificate(certificate_text, str(certificate_path))
    validate_stack(
        manifest_text,
        lock_text,
        certificate,
        manifest_origin=str(manifest_path),
        lock_origin=str(lock_path),
        certificate_origin=str(certificate_path),
    )
    entry_name = name or manifest.stack.name
    entry = f"{registry_dir}/stacks/{entry_name}"
    return export_stack_entry(
        manifest_text,
        lock_text,
        certificate_text,
        registry_dir,
        entry_name,
        title=title or manifest.stack.description or manifest.stack.name,
        description=manifest.stack.description,
        tags=tags,
        check=lambda m, lk, c: validate_stack(
            m,
            lk,
            c,
            manifest_origin=f"{entry}/{MANIFEST_NAME}",
            lock_origin=f"{entry}/{LOCK_NAME}",
            certificate_origin=f"{entry}/certificate.json",
        ),
        overwrite=overwrite,
    )


def init_from_stack(
    name: str, directory: Path, *, registries: Sequence[str] = (), force: bool = False
) -> tuple[list[Path], list[str]]:
    """Copy a known-good stack's manifest and lock (with its goldens) into a directory."""
    sources = [RegistrySource(name=f"extra-{i}", url=url) for i, url in enumerate(registries, start=1)]
    loaded = resolve_registries(sources, base_dir=directory)
    entry = find_stack(loaded, name)
    written = []
    for filename, text in ((MANIFEST_NAME, entry.manifest_text), (LOCK_NAME, entry.lock_text)):
        target = directory / filename
        if target.exists() and not force:
            raise UsageError(f"{target} already exists", hint="pass --force to overwrite it")
        write_text_atomic(target, text)
        written.append(target)
    lock = parse_lock(entry.lock_text, f"{entry.registry}: stacks/{name}/{LOCK_NAME}")
    notes = []
    if not (directory / lock.model.path).exists():
        notes.append(
            f"put the model at {lock.model.path} (sha256 {lock.model.sha256}); "
            "then `stacklock verify` checks this machine reproduces the shared goldens"
        )
    return written, notes
