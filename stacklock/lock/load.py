"""Loading the inputs of a manifest: the model file's header and hash, the template, the installed engine and
the registries, read from the world once (:func:`load_inputs`), so that :mod:`stacklock.lock.resolve` stays pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stacklock.engines.machine import installed_engine_version
from stacklock.errors import SourceError, TemplateError
from stacklock.files.digest import FileDigests, HashCache, HashProgress
from stacklock.gguf.header import HeaderCache, ModelHeader, header_from_gguf
from stacklock.lock.project import read_manifest
from stacklock.model.findings import RegistryPin
from stacklock.model.lock import (
    FilePin,
)
from stacklock.model.manifest import Manifest
from stacklock.registry.fetch import resolve_registries
from stacklock.registry.files import LoadedRegistry
from stacklock.registry.query import find_template
from stacklock.sources.model import HubSource, fetch_model, parse_model_source

if TYPE_CHECKING:
    from stacklock.gguf.reader import GGUFFile


@dataclass(frozen=True)
class ResolvedTemplate:
    text: str | None
    origin: str
    revision: str | None


@dataclass(frozen=True)
class Inputs:
    """Everything resolution needs, read from the world by :func:`load_inputs`."""

    manifest: Manifest
    manifest_data: Mapping[str, Any]
    base_dir: Path
    model_path: Path
    model_revision: str | None
    model_digests: FileDigests
    parts: tuple[FilePin, ...]
    header: ModelHeader
    template: ResolvedTemplate
    installed_engine_version: str | None
    registries: tuple[LoadedRegistry, ...] = field(default=())


def load_inputs(
    manifest_path: Path,
    *,
    use_cache: bool = True,
    progress: HashProgress | None = None,
    offline: bool = False,
    cache: HashCache | None = None,
    registry_pins: Sequence[RegistryPin] = (),
    refresh_registries: bool = False,
    model_revision: str | None = None,
) -> Inputs:
    """Read everything resolution needs. ``model_revision`` fetches a hub source at a pinned commit."""
    manifest, data = read_manifest(manifest_path)
    base = manifest_path.parent
    source = parse_model_source(manifest.model.source)
    if isinstance(source, HubSource) and model_revision is not None:
        source = HubSource(source.repo, model_revision, source.path)
    fetched = fetch_model(source, base, offline=offline)
    hashes = cache or HashCache()
    parsed: list[GGUFFile] = []

    def data_offset(path: Path) -> int:
        # Hashing by region needs the header's end; the parse is kept for the header summary below.
        from stacklock.gguf.reader import read_gguf  # noqa: PLC0415 - numpy is only needed on a cache miss.

        parsed.append(read_gguf(path))
        return parsed[-1].data_offset

    digests = hashes.digests(fetched.path, data_offset, use_cache=use_cache, progress=progress)
    digest = digests.sha256
    header, part_paths = _header(
        fetched.path, digest, hashes, use_cache=use_cache, progress=progress, parsed=parsed
    )
    hashes.save()
    if manifest.model.sha256 is not None and digest != manifest.model.sha256:
        raise SourceError(
            f"model.sha256: {_rel(fetched.path, base)} has sha256 {digest}, the manifest expects "
            f"{manifest.model.sha256}",
            hint="the file changed; get the expected file back or update model.sha256",
        )
    parts = tuple(
        FilePin(path=_rel(p, base), sha256=d, size=p.stat().st_size)
        for p, d in zip(part_paths, header.part_sha256, strict=True)
    )
    registries = resolve_registries(
        manifest.registries, pins=registry_pins, offline=offline, refresh=refresh_registries, base_dir=base
    )
    return Inputs(
        manifest=manifest,
        manifest_data=data,
        base_dir=base,
        model_path=fetched.path,
        model_revision=fetched.revision,
        model_digests=digests,
        parts=parts,
        header=header,
        template=load_template(manifest, header, base, registries),
        installed_engine_version=installed_engine_version(manifest.engine.name),
        registries=registries,
    )


def _header(
    path: Path,
    digest: str,
    hashes: HashCache,
    *,
    use_cache: bool,
    progress: HashProgress | None,
    parsed: Sequence[GGUFFile] = (),
) -> tuple[ModelHeader, tuple[Path, ...]]:
    """The header summary: from the cache when the file (and every split part) is unchanged, else parsed."""
    headers = HeaderCache(hashes.path.parent)
    cached = headers.get(digest) if use_cache else None
    if cached is not None:
        others = tuple(path.with_name(name) for name in cached.part_names[1:])
        if all(p.is_file() for p in others):
            digests = tuple(hashes.sha256(p, progress=progress) for p in others)
            if digests == cached.part_sha256:
                return cached, others
    from stacklock.gguf.reader import read_gguf  # noqa: PLC0415 - numpy is only needed on a cache miss.

    gguf = parsed[-1] if parsed else read_gguf(path)
    others = gguf.parts[1:]
    digests = tuple(hashes.sha256(p, use_cache=use_cache, progress=progress) for p in others)
    header = header_from_gguf(gguf).model_copy(update={"part_sha256": digests})
    headers.put(digest, header)
    return header, others


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def load_template(
    manifest: Manifest, header: ModelHeader, base: Path, registries: Sequence[LoadedRegistry]
) -> ResolvedTemplate:
    source = manifest.template.source
    model_name = Path(manifest.model.source).name
    if source == "none":
        return ResolvedTemplate(None, "none", None)
    if source == "gguf":
        return ResolvedTemplate(header.chat_template, f"{model_name}: tokenizer.chat_template", None)
    kind, _, name = source.partition(":")
    if kind == "gguf":
        text = header.named_chat_templates.get(name)
        if text is None:
            known = ", ".join(sorted(header.named_chat_templates)) or "none"
            raise TemplateError(
                f"template.source: the model has no template named '{name}'",
                hint=f"named templates in the file: {known}",
            )
        return ResolvedTemplate(text, f"{model_name}: tokenizer.chat_template.{name}", None)
    if kind == "file":
        path = base / name
        try:
            return ResolvedTemplate(path.read_text(encoding="utf-8"), name, None)
        except FileNotFoundError:
            raise TemplateError(
                f"template.source: file not found: {name}", hint="fix the path (relative to llmstack.toml)"
            ) from None
        except UnicodeDecodeError as exc:
            raise TemplateError(f"template.source: {name}: not UTF-8 (byte {exc.start})") from None
    entry = find_template(registries, name)
    return ResolvedTemplate(entry.text, f"registry {entry.registry}: templates/{entry.id}", entry.digest)
