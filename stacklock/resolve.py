"""Resolution: manifest → lock.

``load_inputs`` reads the world once (the model file's header and hash, the template, the installed engine, the
registries). ``resolve`` is pure: it turns those inputs into a :class:`Lock` and the rules' findings.
``lock_stack``, ``write_lock`` and ``check_lock`` are what the CLI calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from stacklock.effective import effective_backend, effective_sampler
from stacklock.engines import installed_engine_version
from stacklock.errors import (
    EngineError,
    RuleViolation,
    SourceError,
    StaleLockError,
    TemplateError,
)
from stacklock.facts import facts_from_lock
from stacklock.findings import Allowance, Finding, RegistryPin, Severity
from stacklock.hashing import HashCache, HashProgress, sha256_text
from stacklock.header import HeaderCache, ModelHeader, header_from_gguf
from stacklock.lock import (
    LOCK_VERSION,
    EnginePin,
    FilePin,
    Lock,
    ModelPin,
    SmokePin,
    TemplatePin,
    created_by,
    manifest_hash,
)
from stacklock.manifest import BUILD_NUMBERED_ENGINES, Manifest, Message, Smoke
from stacklock.project import read_lock, read_manifest
from stacklock.registry import LoadedRegistry, compare_pins, find_template, resolve_registries
from stacklock.rules import evaluate, rules_for, split_allowed
from stacklock.sources import HubSource, fetch_model, parse_model_source
from stacklock.template import render_chat_template, template_dialect, template_features
from stacklock.tokenizer import TokenizerFingerprint
from stacklock.versions import parse_build_range, vendored_build


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
    model_sha256: str
    parts: tuple[FilePin, ...]
    header: ModelHeader
    template: ResolvedTemplate
    installed_engine_version: str | None
    registries: tuple[LoadedRegistry, ...] = field(default=())


@dataclass(frozen=True)
class Resolution:
    lock: Lock
    blocking: tuple[Finding, ...]


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
    digest = hashes.sha256(fetched.path, use_cache=use_cache, progress=progress)
    header, part_paths = _header(fetched.path, digest, hashes, use_cache=use_cache, progress=progress)
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
        model_sha256=digest,
        parts=parts,
        header=header,
        template=load_template(manifest, header, base, registries),
        installed_engine_version=installed_engine_version(manifest.engine.name),
        registries=registries,
    )


def _header(
    path: Path, digest: str, hashes: HashCache, *, use_cache: bool, progress: HashProgress | None
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
    from stacklock.gguf_file import read_gguf  # noqa: PLC0415 - numpy is only needed on a cache miss.

    gguf = read_gguf(path)
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


def resolve(inputs: Inputs, allow: Sequence[Allowance] = (), carried: Sequence[Allowance] = ()) -> Resolution:
    """Turn inputs into a lock; pure.

    ``allow`` are allowances given now: one that matches no error finding blocks the lock. ``carried`` are the
    previous lock's allowances: kept while their rule still fires, dropped silently once it no longer does.
    """
    manifest = inputs.manifest
    header = inputs.header
    engine = _engine_pin(manifest, inputs.installed_engine_version)
    template = _template_pin(manifest, inputs.template)
    sampler = effective_sampler(engine.name, header.metadata, manifest.sampler)
    unrendered = tuple(_smoke_pin(s, sampler.max_tokens) for s in manifest.smoke)
    # Rules are evaluated even when a smoke prompt does not render: the rule that explains why (no template,
    # a template that rejects the system role) is a better message than the template's own error.
    render_error: TemplateError | None = None
    try:
        smoke = tuple(_rendered(pin, template, inputs.header.tokenizer) for pin in unrendered)
    except TemplateError as exc:
        render_error, smoke = exc, unrendered
    lock = Lock(
        lock_version=LOCK_VERSION,
        created_by=created_by(),
        manifest_hash=manifest_hash(inputs.manifest_data),
        stack=manifest.stack,
        model=_model_pin(inputs),
        template=template,
        tokenizer=inputs.header.tokenizer,
        engine=engine,
        backend=effective_backend(engine.name, manifest.backend),
        sampler=sampler,
        registries=tuple(r.pin for r in inputs.registries),
        smoke=smoke,
    )
    findings = evaluate(rules_for(inputs.registries), facts_from_lock(lock))
    fired = {f.rule for f in findings if f.severity is Severity.ERROR}
    given = {a.rule for a in allow}
    kept = [a for a in carried if a.rule in fired and a.rule not in given]
    blocking, allowed = split_allowed(findings, [*allow, *kept])
    if render_error is not None and not blocking:
        raise render_error
    lock = lock.model_copy(update={"findings": findings, "allowances": allowed})
    return Resolution(lock, blocking)


def _model_pin(inputs: Inputs) -> ModelPin:
    header = inputs.header
    # Chat templates are pinned under [template]; the model pin keeps only their digest.
    scalars = {k: v for k, v in header.metadata.items() if not k.startswith("tokenizer.chat_template")}
    return ModelPin(
        source=inputs.manifest.model.source,
        path=model_location(inputs),
        revision=inputs.model_revision,
        sha256=inputs.model_sha256,
        size=inputs.model_path.stat().st_size,
        parts=inputs.parts,
        gguf_version=header.version,
        architecture=header.architecture,
        name=header.name,
        parameter_count=header.parameter_count,
        quantization=header.quantization,
        tensor_types=header.tensor_type_counts,
        context_length=header.context_length,
        chat_template_sha256=_sha256_text(header.chat_template),
        special_texts=header.special_texts,
        metadata=scalars,
        arrays=header.arrays,
    )


def model_location(inputs: Inputs) -> str:
    """Where verify finds the model: a path relative to the manifest, or a hub source at its resolved commit."""
    source = parse_model_source(inputs.manifest.model.source)
    if isinstance(source, HubSource):
        return f"hf://{source.repo}@{inputs.model_revision or source.revision}/{source.path}"
    return _rel(inputs.model_path, inputs.base_dir)


def _sha256_text(text: str | None) -> str | None:
    return None if text is None else sha256_text(text)


def _engine_pin(manifest: Manifest, installed: str | None) -> EnginePin:
    spec = manifest.engine
    requirement = spec.version.strip()
    if spec.name in BUILD_NUMBERED_ENGINES:
        build = _exact_build(requirement)
        if build is None:
            raise EngineError(
                f"engine.version: '{requirement or '(any)'}' does not name one {spec.name} build",
                hint="stacklock cannot see an installed llama.cpp; pin one build, e.g. version = '==b4628'",
            )
        return EnginePin(name=spec.name, requirement=requirement, version=f"b{build}", build=build)
    if installed is not None:
        if requirement and not SpecifierSet(requirement).contains(installed, prereleases=True):
            raise EngineError(
                f"engine.version: installed {spec.name} {installed} does not satisfy '{requirement}'",
                hint=f"install a matching version (pip install '{spec.name}{requirement}') or change engine.version",
            )
        version = installed
    else:
        exact = _exact_version(requirement)
        if exact is None:
            raise EngineError(
                f"engine.version: {spec.name} is not installed and '{requirement or '(any)'}' is not one version",
                hint=f"install {spec.name} or pin one version, e.g. version = '==0.3.36'",
            )
        version = exact
    return EnginePin(
        name=spec.name,
        requirement=requirement,
        version=version,
        build=vendored_build(spec.name, version),
    )


def _exact_version(requirement: str) -> str | None:
    if requirement.startswith("==") and "," not in requirement and "*" not in requirement:
        try:
            return str(Version(requirement[2:].strip()))
        except InvalidVersion:
            return None
    return None


def _exact_build(requirement: str) -> int | None:
    if not requirement.startswith("==") or "," in requirement:
        return None
    build_range = parse_build_range(requirement)
    bounds = [b for op, b in build_range.clauses if op == "=="]
    return bounds[0] if bounds else None


def _template_pin(manifest: Manifest, resolved: ResolvedTemplate) -> TemplatePin:
    spec = manifest.template
    text = resolved.text
    return TemplatePin(
        source=spec.source,
        origin=resolved.origin,
        revision=resolved.revision,
        dialect="none" if text is None else template_dialect(text),
        features=() if text is None else template_features(text),
        sha256=_sha256_text(text),
        now=spec.now,
        variables=dict(sorted(spec.variables.items())),
        text=text,
    )


def render_smoke(smoke: SmokePin, template: TemplatePin, tokenizer: TokenizerFingerprint) -> str:
    """The exact prompt text of a smoke prompt: the raw prompt, or the conversation rendered by the template."""
    if smoke.kind == "raw":
        return smoke.prompt or ""
    if template.text is None:
        raise TemplateError(
            f"smoke '{smoke.name}': a chat needs a chat template, and the stack has none ({template.origin})",
            hint="set template.source (e.g. 'registry:gemma3-it' or 'file:template.jinja') or use a raw prompt",
        )
    return render_chat_template(
        template.text,
        [m.model_dump() for m in smoke.messages or ()],
        add_generation_prompt=smoke.add_generation_prompt,
        bos_token=tokenizer.bos_text,
        eos_token=tokenizer.eos_text,
        extra_context=template.variables,
        now=template.now,
        origin=template.origin,
    )


def effective_add_bos(smoke: SmokePin, rendered: str, tokenizer: TokenizerFingerprint) -> bool:
    """Whether tokenization adds BOS to a rendered prompt.

    Raw prompts get the tokenizer's add-bos. A chat whose render already starts with the BOS text (the template
    emits ``bos_token``) is tokenized without adding another, as transformers' ``apply_chat_template`` does;
    otherwise the prompt would start with two BOS tokens, a classic cause of degraded output.
    """
    add_bos = tokenizer.add_bos is not False
    if smoke.kind == "chat" and tokenizer.bos_text and rendered.startswith(tokenizer.bos_text):
        return False
    return add_bos


def _smoke_pin(smoke: Smoke, default_max_tokens: int) -> SmokePin:
    """A smoke prompt as the lock pins it, before its render is known."""
    conversation = smoke.conversation()
    return SmokePin(
        name=smoke.name,
        kind="raw" if smoke.prompt is not None else "chat",
        messages=tuple(Message.model_validate(m) for m in conversation)
        if smoke.messages is not None
        else None,
        add_generation_prompt=smoke.add_generation_prompt,
        prompt=smoke.prompt,
        max_tokens=smoke.max_tokens or default_max_tokens,
        expect=smoke.expect,
        rendered_sha256="",
    )


def _rendered(pin: SmokePin, template: TemplatePin, tokenizer: TokenizerFingerprint) -> SmokePin:
    rendered = render_smoke(pin, template, tokenizer)
    digest = sha256_text(rendered)
    add_bos = effective_add_bos(pin, rendered, tokenizer)
    return pin.model_copy(update={"rendered": rendered, "rendered_sha256": digest, "add_bos": add_bos})


def lock_stack(
    manifest_path: Path,
    *,
    allow: Sequence[Allowance] = (),
    carried: Sequence[Allowance] = (),
    use_cache: bool = True,
    progress: HashProgress | None = None,
    offline: bool = False,
) -> Lock:
    inputs = load_inputs(manifest_path, use_cache=use_cache, progress=progress, offline=offline)
    resolution = resolve(inputs, allow, carried)
    if resolution.blocking:
        first = resolution.blocking[0]
        more = f" (and {len(resolution.blocking) - 1} more)" if len(resolution.blocking) > 1 else ""
        raise RuleViolation(
            f"rule {first.rule}: {first.title}{more}",
            hint=f"{first.fix} — or accept it with --allow {first.rule} --reason TEXT",
        )
    return resolution.lock


def merge_goldens(new: Lock, previous: Lock | None) -> Lock:
    """Keep recorded goldens across a re-lock when every pin is unchanged; they no longer apply otherwise."""
    if previous is None or previous.behaviour() != new.behaviour():
        return new
    return new.model_copy(update={"smoke": previous.smoke, "recording": previous.recording})


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


__all__ = [
    "Inputs",
    "Resolution",
    "check_lock",
    "load_inputs",
    "lock_stack",
    "merge_goldens",
    "render_smoke",
    "resolve",
]
