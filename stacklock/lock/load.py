"""Loading the inputs of a manifest: the model file's header and hash, the template, the installed engine and
the registries, read from the world once (:func:`load_inputs`), so that :mod:`stacklock.lock.resolve` stays pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from stacklock.engines.base import AdapterInfo
from stacklock.engines.machine import installed_engine_version
from stacklock.engines.plugins import adapter_info
from stacklock.errors import SourceError, TemplateError
from stacklock.files.digest import FileDigests, HashCache
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
from stacklock.reporter import NO_REPORTER, Reporter
from stacklock.sources.hub import env_true, read_hub_text, read_remote_header, stat_hub_model
from stacklock.sources.local import confine, read_text_file
from stacklock.sources.model import HubSource, ModelSource, fetch_model, parse_model_source
from stacklock.template.upstream import TEMPLATE_FILES, parse_hub_template_source, parse_template_file

if TYPE_CHECKING:
    from stacklock.gguf.reader import GGUFFile


@dataclass(frozen=True)
class ResolvedTemplate:
    text: str | None
    origin: str
    revision: str | None


@dataclass(frozen=True)
class UpstreamTokenizerFiles:
    """A hub repository's tokenizer.json and tokenizer_config.json (None when it has none), as read."""

    tokenizer_json: str
    config_json: str | None
    origin: str
    revision: str


@dataclass(frozen=True)
class Inputs:
    """Everything resolution needs, read from the world by :func:`load_inputs`."""

    manifest: Manifest
    manifest_data: Mapping[str, Any]
    base_dir: Path
    model_path: Path | None
    """The model file on disk; None for a hub model locked from its header alone."""
    model_revision: str | None
    model_digests: FileDigests
    """For a hub model locked from its header: the LFS sha256 only (the region digests need the bytes)."""
    model_size: int
    parts: tuple[FilePin, ...]
    header: ModelHeader
    template: ResolvedTemplate
    installed_engine_version: str | None
    registries: tuple[LoadedRegistry, ...] = field(default=())
    #: What the engine's adapter declares; None when no adapter is registered for the manifest's engine.
    adapter: AdapterInfo | None = None
    upstream_tokenizer: UpstreamTokenizerFiles | None = None
    generation_config: Mapping[str, Any] | None = None


def load_inputs(
    manifest_path: Path,
    *,
    use_cache: bool = True,
    reporter: Reporter = NO_REPORTER,
    offline: bool = False,
    cache: HashCache | None = None,
    registry_pins: Sequence[RegistryPin] = (),
    refresh_registries: bool = False,
    revisions: Mapping[str, str] | None = None,
) -> Inputs:
    """Read everything resolution needs. ``revisions`` (by link: model, template, tokenizer) reads hub sources
    at commits locked before instead of resolving their branches and tags again."""
    pinned = revisions or {}
    model_revision = pinned.get("model")
    manifest, data = read_manifest(manifest_path)
    base = manifest_path.parent
    source = parse_model_source(manifest.model.source)
    if isinstance(source, HubSource) and model_revision is not None:
        source = HubSource(source.repo, model_revision, source.path)
    hashes = cache or HashCache()
    if isinstance(source, HubSource) and not (offline or env_true("HF_HUB_OFFLINE")):
        model = _remote_model(source, hashes, use_cache=use_cache)
    else:
        model = _local_model(source, base, hashes, use_cache=use_cache, reporter=reporter, offline=offline)
    hashes.save()
    if manifest.model.sha256 is not None and model.digests.sha256 != manifest.model.sha256:
        raise SourceError(
            f"model.sha256: {model.shown} has sha256 {model.digests.sha256}, the manifest expects "
            f"{manifest.model.sha256}",
            hint="the file changed; get the expected file back or update model.sha256",
        )
    registries = resolve_registries(
        manifest.registries,
        pins=registry_pins,
        offline=offline,
        refresh=refresh_registries,
        base_dir=base,
        reporter=reporter,
    )
    return Inputs(
        manifest=manifest,
        manifest_data=data,
        base_dir=base,
        model_path=model.path,
        model_revision=model.revision,
        model_digests=model.digests,
        model_size=model.size,
        parts=model.parts,
        header=model.header,
        template=load_template(
            manifest, model.header, base, registries, offline=offline, revision=pinned.get("template")
        ),
        installed_engine_version=installed_engine_version(manifest.engine.name),
        registries=registries,
        upstream_tokenizer=load_upstream_tokenizer(
            manifest, offline=offline, revision=pinned.get("tokenizer")
        ),
        generation_config=load_generation_config(manifest, offline=offline),
        adapter=adapter_info(manifest.engine.name),
    )


def load_generation_config(manifest: Manifest, *, offline: bool = False) -> Mapping[str, Any] | None:
    """``[sampler] defaults = "hf://…"``: the repository's generation_config.json."""
    hub = parse_hub_template_source(manifest.sampler.defaults or "")
    if hub is None:
        return None
    link = "sampler.defaults"
    _, text, commit = read_hub_text(
        hub.repo, hub.revision, ("generation_config.json",), offline=offline, link=link
    )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{link}: hf://{hub.repo}@{commit}/generation_config.json: not JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    return data if isinstance(data, dict) else {}


def load_upstream_tokenizer(
    manifest: Manifest, *, offline: bool = False, revision: str | None = None
) -> UpstreamTokenizerFiles | None:
    """``[tokenizer] source = "hf://…"``: the repository's tokenizer.json and tokenizer_config.json."""
    hub = parse_hub_template_source(manifest.tokenizer.source)
    if hub is None:
        return None
    link = "tokenizer.source"
    at = revision or hub.revision
    _, text, commit = read_hub_text(hub.repo, at, ("tokenizer.json",), offline=offline, link=link)
    try:
        _, config, _ = read_hub_text(hub.repo, commit, ("tokenizer_config.json",), offline=offline, link=link)
    except SourceError:
        config = None  # Optional: without it, special tokens and add-bos are not compared.
    return UpstreamTokenizerFiles(text, config, f"hf://{hub.repo}@{commit}/tokenizer.json", commit)


@dataclass(frozen=True)
class _Model:
    path: Path | None
    shown: str
    revision: str | None
    digests: FileDigests
    size: int
    parts: tuple[FilePin, ...]
    header: ModelHeader


def _local_model(
    source: ModelSource,
    base: Path,
    hashes: HashCache,
    *,
    use_cache: bool,
    reporter: Reporter,
    offline: bool,
) -> _Model:
    """A model file on disk (or in the hub cache, offline): hashed, its header parsed (both cached)."""
    fetched = fetch_model(source, base, offline=offline, reporter=reporter)
    parsed: list[GGUFFile] = []

    def data_offset(path: Path) -> int:
        # Hashing by region needs the header's end; the parse is kept for the header summary below.
        from stacklock.gguf.reader import read_gguf  # noqa: PLC0415 - numpy is only needed on a cache miss.

        parsed.append(read_gguf(path))
        return parsed[-1].data_offset

    digests = hashes.digests(fetched.path, data_offset, use_cache=use_cache, reporter=reporter)
    header, part_paths = _header(
        fetched.path, digests.sha256, hashes, use_cache=use_cache, reporter=reporter, parsed=parsed
    )
    if isinstance(source, HubSource):
        # Parts of a hub model are pinned where verify finds them: in the repository, at the commit.
        folder = str(PurePosixPath(source.path).parent)
        at = f"hf://{source.repo}@{fetched.revision}/" + ("" if folder == "." else f"{folder}/")
        labels = [at + p.name for p in part_paths]
    else:
        labels = [_rel(p, base) for p in part_paths]
    parts = tuple(
        FilePin(path=label, sha256=d, size=p.stat().st_size)
        for label, p, d in zip(labels, part_paths, header.part_sha256, strict=True)
    )
    size = fetched.path.stat().st_size
    return _Model(fetched.path, _rel(fetched.path, base), fetched.revision, digests, size, parts, header)


def _remote_model(source: HubSource, hashes: HashCache, *, use_cache: bool) -> _Model:
    """A hub model pinned without downloading it: LFS digests and sizes, and the header from range reads."""
    files = stat_hub_model(source.repo, source.revision, source.path)
    first, others = files[0], files[1:]
    digest = first.sha256 or ""
    digests = tuple(f.sha256 or "" for f in others)
    headers = HeaderCache(hashes.path.parent)
    header = headers.get(digest) if use_cache else None
    if header is None or header.part_sha256 != digests:
        header = header_from_gguf(read_remote_header(files).gguf).model_copy(update={"part_sha256": digests})
        headers.put(digest, header)
    parts = tuple(FilePin(path=f.location, sha256=f.sha256 or "", size=f.size) for f in others)
    # The region digests (header sha256, data xxh3) need bytes a remote lock does not read: left empty here,
    # they are left out of the pin (see resolve._model_pin).
    whole = FileDigests(sha256=digest, data_offset=0, header_sha256="", data_xxh3="")
    return _Model(None, first.location, first.commit, whole, first.size, parts, header)


def _header(
    path: Path,
    digest: str,
    hashes: HashCache,
    *,
    use_cache: bool,
    reporter: Reporter,
    parsed: Sequence[GGUFFile] = (),
) -> tuple[ModelHeader, tuple[Path, ...]]:
    """The header summary: from the cache when the file (and every split part) is unchanged, else parsed."""
    headers = HeaderCache(hashes.path.parent)
    cached = headers.get(digest) if use_cache else None
    if cached is not None:
        others = tuple(path.with_name(name) for name in cached.part_names[1:])
        if all(p.is_file() for p in others):
            digests = tuple(hashes.sha256(p, reporter=reporter) for p in others)
            if digests == cached.part_sha256:
                return cached, others
    from stacklock.gguf.reader import read_gguf  # noqa: PLC0415 - numpy is only needed on a cache miss.

    gguf = parsed[-1] if parsed else read_gguf(path)
    others = gguf.parts[1:]
    digests = tuple(hashes.sha256(p, use_cache=use_cache, reporter=reporter) for p in others)
    header = header_from_gguf(gguf).model_copy(update={"part_sha256": digests})
    headers.put(digest, header)
    return header, others


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def load_template(
    manifest: Manifest,
    header: ModelHeader,
    base: Path,
    registries: Sequence[LoadedRegistry],
    *,
    offline: bool = False,
    revision: str | None = None,
) -> ResolvedTemplate:
    source = manifest.template.source
    model_name = Path(manifest.model.source).name
    if source == "none":
        return ResolvedTemplate(None, "none", None)
    if source == "gguf":
        return ResolvedTemplate(header.chat_template, f"{model_name}: tokenizer.chat_template", None)
    hub = parse_hub_template_source(source)
    if hub is not None:
        candidates = (hub.path,) if hub.path else TEMPLATE_FILES
        at = revision or hub.revision
        found, raw, commit = read_hub_text(hub.repo, at, candidates, offline=offline)
        origin = f"hf://{hub.repo}@{commit}/{found}" + (f"#{hub.name}" if hub.name else "")
        return ResolvedTemplate(
            parse_template_file(found, raw, hub.name, f"template.source: {origin}"), origin, commit
        )
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
        path = confine(name, base, "template.source")
        return ResolvedTemplate(read_text_file(path, f"template.source: {name}", TemplateError), name, None)
    entry = find_template(registries, name)
    return ResolvedTemplate(entry.text, f"registry {entry.registry}: templates/{entry.id}", entry.digest)
