"""Resolution: :class:`~stacklock.lock.load.Inputs` → :class:`~stacklock.model.lock.Lock` and the rules' findings.

Pure: no stat, no file reads; everything comes in through the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from stacklock.errors import EngineError, TemplateError
from stacklock.files.digest import FileDigests, sha256_text
from stacklock.gguf.header import ModelHeader
from stacklock.gguf.structure import check_structure
from stacklock.lock.load import Inputs, ResolvedTemplate, _rel
from stacklock.lock.smoke import _rendered, _smoke_pin
from stacklock.model.effective import effective_backend, effective_sampler
from stacklock.model.findings import Allowance, Finding, Severity
from stacklock.model.lock import (
    LOCK_VERSION,
    EnginePin,
    FilePin,
    Lock,
    ModelPin,
    TemplatePin,
    created_by,
    manifest_hash,
    pin_metadata_value,
)
from stacklock.model.manifest import BUILD_NUMBERED_ENGINES, Manifest
from stacklock.rules.builtin import run_checks
from stacklock.rules.facts import facts_from_lock
from stacklock.rules.predicates import evaluate, finding_sort_key, rules_for, split_allowed
from stacklock.rules.versions import EngineTables, parse_build_range, vendored_build
from stacklock.sources.model import HubSource, parse_model_source
from stacklock.template.sandbox import template_dialect, template_features


@dataclass(frozen=True)
class Resolution:
    lock: Lock
    blocking: tuple[Finding, ...]


def resolve(inputs: Inputs, allow: Sequence[Allowance] = (), carried: Sequence[Allowance] = ()) -> Resolution:
    """Turn inputs into a lock; pure.

    ``allow`` are allowances given now: one that matches no error finding blocks the lock. ``carried`` are the
    previous lock's allowances: kept while their rule still fires, dropped silently once it no longer does.
    """
    manifest = inputs.manifest
    header = inputs.header
    engine = _engine_pin(manifest, inputs.installed_engine_version, EngineTables.merged(inputs.registries))
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
    # Built-in checks (template probes, pre-tokenizers, the GGUF's structure) report like rules, so --allow, lock refusal and `check` treat both alike.
    findings = tuple(
        sorted(
            (
                *evaluate(rules_for(inputs.registries), facts_from_lock(lock)),
                *run_checks(lock, inputs.registries).findings,
                *check_structure(header),
            ),
            key=finding_sort_key,
        )
    )
    fired = {f.rule for f in findings if f.severity is Severity.ERROR}
    given = {a.rule for a in allow}
    kept = [a for a in carried if a.rule in fired and a.rule not in given]
    blocking, allowed = split_allowed(findings, [*allow, *kept])
    if render_error is not None and not blocking:
        raise render_error
    lock = lock.model_copy(update={"findings": findings, "allowances": allowed})
    return Resolution(lock, blocking)


def _model_pin(inputs: Inputs) -> ModelPin:
    return pin_model(
        inputs.header,
        inputs.model_digests,
        source=inputs.manifest.model.source,
        path=model_location(inputs),
        revision=inputs.model_revision,
        size=inputs.model_path.stat().st_size,
        parts=inputs.parts,
    )


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
    return _rel(inputs.model_path, inputs.base_dir)


def _sha256_text(text: str | None) -> str | None:
    return None if text is None else sha256_text(text)


def _engine_pin(manifest: Manifest, installed: str | None, tables: EngineTables) -> EnginePin:
    spec = manifest.engine
    requirement = spec.version.strip()
    if spec.name in BUILD_NUMBERED_ENGINES:
        build = _exact_build(requirement)
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
            endpoint=spec.endpoint,
            api_key_env=spec.api_key_env,
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
                hint=f"install {spec.name} or pin one version, e.g. version = '==0.3.36'",
            )
        version = exact
    return EnginePin(
        name=spec.name,
        requirement=requirement,
        version=version,
        build=vendored_build(spec.name, version, tables),
        endpoint=spec.endpoint,
        api_key_env=spec.api_key_env,
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
