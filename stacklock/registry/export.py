"""Writing a stack entry into a registry directory, validated before anything is written."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomlkit

from stacklock.errors import RegistryError
from stacklock.files.atomic import file_error, write_text_atomic
from stacklock.registry.files import STACK_FILES, StackMeta, parse_stack_entry

# -- Sharing a stack -----------------------------------------------------------------------------------------


def render_stack_meta(meta: StackMeta) -> str:
    """A stack entry's ``stack.toml``: the empty description and tags are left out."""
    doc = tomlkit.document()
    doc.update({"name": meta.name, "title": meta.title})
    if meta.description:
        doc["description"] = meta.description
    if meta.tags:
        doc["tags"] = list(meta.tags)
    return tomlkit.dumps(doc)


StackValidator = Callable[[str, str, Mapping[str, Any]], None]


def export_stack_entry(
    manifest_text: str,
    lock_text: str,
    certificate_json: str,
    dest: Path,
    name: str,
    *,
    title: str | None = None,
    description: str = "",
    tags: Sequence[str] = (),
    check: StackValidator | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a stack entry into the registry directory ``dest`` (``dest/stacks/<name>/``) and return its path.

    Everything is validated before anything is written: the entry as a registry would read it, and, when
    given, ``check(manifest_text, lock_text, certificate)`` — the caller's full manifest/lock/certificate
    validation, which raises a StacklockError. The written entry is read back through the registry loader.
    """
    origin = f"{dest}/stacks/{name}"
    try:
        meta = StackMeta(name=name, title=title or name, description=description, tags=tuple(tags))
    except ValueError:
        raise RegistryError(
            f"{origin}: name: '{name}' must be lowercase letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        ) from None
    files = {
        "stack.toml": render_stack_meta(meta).encode(),
        "llmstack.toml": manifest_text.encode(),
        "llmstack.lock": lock_text.encode(),
        "certificate.json": certificate_json.encode(),
    }
    entry = parse_stack_entry(files, directory=name, registry="export", origin=origin)
    if check is not None:
        check(entry.manifest_text, entry.lock_text, entry.certificate)
    target = dest / "stacks" / name
    if target.exists() and not overwrite:
        raise RegistryError(
            f"{target}: a stack entry with this name exists; choose another name or overwrite it"
        )
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_error("create", target, exc) from None
    for filename, data in files.items():
        write_text_atomic(target / filename, data.decode())
    on_disk = {f: (target / f).read_bytes() for f in STACK_FILES}
    parse_stack_entry(on_disk, directory=name, registry="export", origin=origin)
    return target
