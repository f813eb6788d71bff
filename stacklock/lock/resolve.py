"""Resolution: :class:`~stacklock.lock.load.Inputs` → :class:`~stacklock.model.lock.Lock` and the rules' findings.

Pure: no stat, no file reads; everything comes in through the inputs.

What stacklock knows about the engine comes from its adapter's :class:`~stacklock.engines.base.AdapterInfo`,
read from the adapter class without importing the engine. An engine with no adapter registered (a server
stacklock cannot drive yet) is still lockable, with nothing invented for it:

- its version: the requirement must name one version exactly, since stacklock cannot see it installed. The
  requirement's syntax says what a version is: llama.cpp build clauses (``==b4628``) make the version the
  build; anything else is PEP 440, and the build comes from a registry's engine table when one has the engine
  (``engines/<name>.toml``), else stays unknown. An adapter's ``build-scheme`` overrides the syntax and refuses
  a requirement written the other way;
- its defaults: unknown; the lock says so value by value (:mod:`stacklock.rules.policy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from stacklock.engines.base import AdapterInfo
from stacklock.errors import EngineError, ManifestError, TemplateError
from stacklock.files.digest import FileDigests, sha256_text
from stacklock.gguf.header import ModelHeader
from stacklock.gguf.structure import check_structure
from stacklock.lock.load import Inputs, ResolvedTemplate, _rel
from stacklock.lock.smoke import _rendered, _smoke_pin
from stacklock.model.effective import effective_backend, effective_sampler
from stacklock.model.findings import Allowance, Finding
from stacklock.model.lock import (
    LOCK_VERSION,
    EnginePin,
    FilePin,
    Lock,
    ModelPin,
    TemplatePin,
    UpstreamTokenizerPin,
    created_by,
    manifest_hash,
    pin_metadata_value,
)
from stacklock.model.manifest import Manifest
from stacklock.rules.builtin import run_checks
from stacklock.rules.facts import facts_from_lock
from stacklock.rules.predicates import evaluate, finding_sort_key, judge, rules_for
from stacklock.rules.upstream import compare_tokenizers, parse_upstream_tokenizer, tokenizer_finding
from stacklock.rules.versions import (
    EngineTables,
    is_build_requirement,
    parse_build,
    parse_build_range,
    vendored_build,
)
from stacklock.sources.model import HubSource, parse_model_source
from stacklock.template.sandbox import template_dialect, template_features
from stacklock.template.upstream import stale_embedded_finding


@dataclass(frozen=True)
class Resolution:
    lock: Lock
    blocking: tuple[Finding, ...]
    stale: tuple[Allowance, ...] = ()
    """The previous lock's allowances that match no error finding any more: dropped from the new lock."""


def resolve(inputs: Inputs, allow: Sequence[Allowance] = (), carried: Sequence[Allowance] = ()) -> Resolution:
    """Turn inputs into a lock; pure.

    ``allow`` are allowances given now: one that matches no error finding blocks the lock. ``carried`` are the
    previous lock's allowances: kept while their rule still fires, dropped (``stale``) once it no longer does.
    Both are judged by :func:`~stacklock.rules.predicates.judge`, as ``stacklock check`` judges a lock.
    """
    manifest = inputs.manifest
    header = inputs.header
    info = inputs.adapter
    tables = EngineTables.merged(inputs.registries)
    engine = _engine_pin(manifest, info, inputs.installed_engine_version, tables)
    template = _template_pin(manifest, inputs.template, header.chat_template)
    sampler = effective_sampler(
        info.sampler_defaults if info else None, header.metadata, manifest.sampler, inputs.generation_config
    )
    unrendered = tuple(
        _smoke_pin(s, _max_tokens(s.name, s.max_tokens, sampler.max_tokens, engine.name))
        for s in manifest.smoke
    )
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
        upstream_tokenizer=_upstream_tokenizer(inputs),
        engine=engine,
        backend=effective_backend(info.backend_defaults if info else None, manifest.backend),
        sampler=sampler,
        registries=tuple(r.pin for r in inputs.registries),
        smoke=smoke,
    )
    stale = stale_embedded_finding(
        header.chat_template if template.embedded_differs else None,
        template.text,
        bos=header.tokenizer.bos_text,
        eos=header.tokenizer.eos_text,
    )
    mismatch = tokenizer_finding(lock.upstream_tokenizer) if lock.upstream_tokenizer else None
    # Built-in checks (template probes, pre-tokenizers, the GGUF's structure) report like rules, so --allow, lock refusal and `check` treat both alike.
    findings = tuple(
        sorted(
            (
                *evaluate(rules_for(inputs.registries), facts_from_lock(lock)),
                *run_checks(lock, inputs.registries).findings,
                *check_structure(header),
                *(f for f in (stale, mismatch) if f is not None),
            ),
            key=finding_sort_key,
        )
    )
    judgement = judge(findings, given=allow, carried=carried)
    if render_error is not None and judgement.ok:
        raise render_error
    lock = lock.model_copy(update={"findings": findings, "allowances": judgement.allowances})
    return Resolution(lock, judgement.blocking, judgement.stale)


def _upstream_tokenizer(inputs: Inputs) -> UpstreamTokenizerPin | None:
    files = inputs.upstream_tokenizer
    if files is None:
        return None
    pin = parse_upstream_tokenizer(
        files.tokenizer_json,
        files.config_json,
        source=inputs.manifest.tokenizer.source,
        origin=files.origin,
        revision=files.revision,
    )
    return pin.model_copy(update={"differences": compare_tokenizers(inputs.header.tokenizer, pin)})


def _model_pin(inputs: Inputs) -> ModelPin:
    pin = pin_model(
        inputs.header,
        inputs.model_digests,
        source=inputs.manifest.model.source,
        path=model_location(inputs),
        revision=inputs.model_revision,
        size=inputs.model_size,
        parts=inputs.parts,
    )
    if inputs.model_path is None:  # A hub model locked from its header: no region digests (see load).
        return pin.model_copy(update={"header_sha256": None, "data_xxh3": None})
    return pin


def pin_model(
    header: ModelHeader,
    digests: FileDigests,
    *,
    source: str,
    path: str,
    revision: str | None,
    size: int,
    parts: tuple[FilePin, ...],
) -> ModelPin:
    """The model pin of a file from its header summary and digests; pure."""
    # Chat templates are pinned under [template]; the model pin keeps only their digest.
    scalars = {
        k: pin_metadata_value(v)
        for k, v in header.metadata.items()
        if not k.startswith("tokenizer.chat_template")
    }
    return ModelPin(
        source=source,
        path=path,
        revision=revision,
        sha256=digests.sha256,
        size=size,
        header_sha256=digests.header_sha256,
        data_xxh3=digests.data_xxh3,
        parts=parts,
        gguf_version=header.version,
        architecture=header.architecture,
        name=header.name,
        parameter_count=header.parameter_count,
        quantization=header.quantization,
        tensor_types=header.tensor_type_counts,
        context_length=header.context_length,
        chat_template_sha256=_sha256_text(header.chat_template),
        special_texts=header.special_texts,
        special_texts_complete=True,
        metadata=scalars,
        arrays=header.arrays,
    )


def model_location(inputs: Inputs) -> str:
    """Where verify finds the model: a path relative to the manifest, or a hub source at its resolved commit."""
    source = parse_model_source(inputs.manifest.model.source)
    if isinstance(source, HubSource):
        return f"hf://{source.repo}@{inputs.model_revision or source.revision}/{source.path}"
    if inputs.model_path is None:  # Only hub models are locked without a local file.
        return inputs.manifest.model.source
    return _rel(inputs.model_path, inputs.base_dir)


def _sha256_text(text: str | None) -> str | None:
    return None if text is None else sha256_text(text)


def _max_tokens(smoke: str, own: int | None, default: int | None, engine: str) -> int:
    if own is not None:
        return own
    if default is None:
        raise ManifestError(
            f"smoke '{smoke}': max-tokens is unknown ({engine}'s default is unknown to stacklock)",
            hint="set sampler.max-tokens in llmstack.toml, or max-tokens on the smoke prompt",
        )
    return default


def _engine_pin(
    manifest: Manifest, info: AdapterInfo | None, installed: str | None, tables: EngineTables
) -> EnginePin:
    spec = manifest.engine
    requirement = spec.version.strip()
    by_build = _takes_builds(spec.name, requirement, info)
    if by_build:
        build = (
            _exact_build(requirement)
            if installed is None
            else _served_build(spec.name, requirement, installed)
        )
        if build is None:
            raise EngineError(
                f"engine.version: '{requirement or '(any)'}' does not name one {spec.name} build",
                hint="stacklock cannot see an installed llama.cpp; pin one build, e.g. version = '==b4628'",
            )
        return EnginePin(
            name=spec.name,
            requirement=requirement,
            version=f"b{build}",
            build=build,
            build_exact=True,
            endpoint=spec.endpoint,
            api_key_env=spec.api_key_env,
            model=spec.model,
        )
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
                hint=f"install {spec.name} or pin one version, e.g. version = '=={_example_version(info)}'",
            )
        version = exact
    vendored = (
        None
        if info is not None and info.build_scheme == "none"
        else vendored_build((info.builds_of if info else None) or spec.name, version, tables)
    )
    where = {"endpoint": spec.endpoint, "api_key_env": spec.api_key_env, "model": spec.model}
    if vendored is None:
        return EnginePin(name=spec.name, requirement=requirement, version=version, **where)
    return EnginePin(
        name=spec.name,
        requirement=requirement,
        version=version,
        build=vendored.build,
        build_exact=vendored.exact,
        commit=vendored.commit,
        **where,
    )


def _served_build(name: str, requirement: str, reported: str) -> int:
    """The build a served engine reports, which must satisfy the manifest's requirement."""
    try:
        build = parse_build(reported)
    except ValueError:
        raise EngineError(
            f"engine.version: the {name} server reports '{reported}', not a llama.cpp build number",
            hint="build the server with its build number (cmake -DLLAMA_BUILD_NUMBER=...)",
        ) from None
    if requirement and build not in parse_build_range(requirement):
        raise EngineError(
            f"engine.version: the {name} server runs b{build}, which does not satisfy '{requirement}'",
            hint="point --endpoint at a server of a matching build, or change engine.version",
        )
    return build


def _takes_builds(name: str, requirement: str, info: AdapterInfo | None) -> bool:
    """Whether the engine's versions are llama.cpp builds: its adapter says so, else the requirement's syntax."""
    by_syntax = is_build_requirement(requirement)
    if info is None:
        return by_syntax
    by_adapter = info.build_scheme == "build-number"
    if requirement and by_syntax != by_adapter:
        want = (
            "llama.cpp builds, e.g. '==b4628'"
            if by_adapter
            else f"PEP 440, e.g. '=={_example_version(info)}'"
        )
        raise ManifestError(
            f"engine.version: '{requirement}' does not fit {name}, whose versions are {want}",
            hint="fix engine.version in llmstack.toml",
        )
    return by_adapter


def _example_version(info: AdapterInfo | None) -> str:
    return (info.tested_version if info is not None else None) or "1.0.0"


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


def _template_pin(manifest: Manifest, resolved: ResolvedTemplate, embedded: str | None) -> TemplatePin:
    spec = manifest.template
    text = resolved.text
    upstream = spec.source.startswith("hf://")
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
        embedded_differs=(embedded != text)
        if upstream and embedded is not None and text is not None
        else None,
    )
