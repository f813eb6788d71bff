"""`stacklock record` and `stacklock verify`: run the smoke prompts of a locked stack on its engine.

``record`` stores goldens in the lock; ``verify`` compares a new run with them stage by stage
(:mod:`stacklock.verify.compare` decides; this module only gathers observations through
:mod:`stacklock.engines.runner`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stacklock import errors
from stacklock.engines.machine import current_environment, installed_engine_version
from stacklock.engines.runner import EngineRun, Job, run_engine
from stacklock.engines.served import ServedEngine, is_served, open_served
from stacklock.errors import EngineError, StacklockError
from stacklock.files.digest import HashCache, sha256_text
from stacklock.gguf.header import header_from_gguf
from stacklock.gguf.reader import read_gguf
from stacklock.lock.diff import embedded_template, explain_model, template_diff
from stacklock.lock.load import load_template
from stacklock.lock.project import read_lock, read_manifest, write_lock
from stacklock.lock.resolve import pin_model
from stacklock.lock.smoke import effective_add_bos, render_smoke
from stacklock.model.lock import FilePin, Lock, SmokePin
from stacklock.registry.fetch import resolve_registries
from stacklock.sources.model import fetch_model, parse_model_source
from stacklock.verify.compare import (
    STAGES,
    StageResult,
    Tolerance,
    VerifyReport,
    build_report,
    compare_artifacts,
    compare_smoke,
    golden_from_observation,
    recording_from,
    skipped,
    smoke_result,
)
from stacklock.verify.served import ANOTHER_MODEL, run_served, served_artifacts


def check_engine(lock: Lock) -> None:
    """Before running anything: the installed engine must be the locked version."""
    installed = installed_engine_version(lock.engine.name)
    if installed is not None and installed != lock.engine.version:
        raise EngineError(
            f"installed {lock.engine.name} {installed} is not the locked {lock.engine.version}",
            hint=f"pip install '{lock.engine.name}=={lock.engine.version}', or re-lock and re-record on {installed}",
        )


def locate(location: str, base: Path) -> Path | None:
    """A locked file on disk (relative to the manifest, or a hub file at its pinned commit in the local cache).

    None when it is not there: verify never downloads.
    """
    if not location.startswith("hf://"):
        path = base / location
        return path if path.is_file() else None
    try:
        return fetch_model(parse_model_source(location), base, offline=True).path
    except StacklockError:
        return None


def model_files(lock: Lock, base: Path) -> dict[str, Path | None]:
    files = {lock.model.path: locate(lock.model.path, base)}
    files.update({part.path: locate(part.path, base) for part in lock.model.parts})
    return files


def _require_model(lock: Lock, base: Path) -> Path:
    path = locate(lock.model.path, base)
    if path is None:
        raise EngineError(
            f"model file {lock.model.path} is missing, so the engine cannot run",
            hint="put the locked file back (the lock pins its sha256) or re-lock",
        )
    return path


def _job(lock: Lock, pin: SmokePin) -> Job:
    # The BOS decision is re-derived from the lock's tokenizer flags, so an edited flag shows at tokenization.
    rendered = render_smoke(pin, lock.template, lock.tokenizer)
    return Job(pin.name, rendered, pin.max_tokens, effective_add_bos(pin, rendered, lock.tokenizer))


def record(lock_path: Path, *, top_k: int = 5, endpoint: str | None = None) -> Lock:
    """Run every smoke prompt and store its golden in the lock (written atomically)."""
    lock = read_lock(lock_path)
    base = lock_path.parent
    check_engine(lock)
    if not lock.smoke:
        raise errors.LockError(
            f"{lock_path}: no smoke prompts to record", hint="add [[smoke]] entries and re-lock"
        )
    served = _served(lock, endpoint)
    artifacts = _artifacts(lock, base, HashCache()) if served is None else served_artifacts(lock, served)
    if artifacts.status != "pass":
        raise errors.StaleLockError(f"cannot record: {artifacts.detail}")
    jobs = [_job(lock, p) for p in lock.smoke]
    if served is None:
        run = run_engine(lock, _require_model(lock, base), jobs, top_k=top_k)
    else:
        run = run_served(lock, served, jobs, top_k=top_k, from_golden=False)
    smoke = tuple(
        pin.model_copy(update={"golden": golden_from_observation(run.observations[pin.name])})
        for pin in lock.smoke
    )
    environment = current_environment().model_dump(mode="json", by_alias=True)
    recorded = lock.model_copy(
        update={"smoke": smoke, "recording": recording_from(run.identity, environment, top_k)}
    )
    write_lock(lock_path, recorded)
    return recorded


def _artifacts(lock: Lock, base: Path, cache: HashCache) -> StageResult:
    expected = {lock.model.path: lock.model.sha256} | {p.path: p.sha256 for p in lock.model.parts}
    observed: dict[str, str | None] = {}
    for label, path in model_files(lock, base).items():
        observed[label] = None if path is None else cache.sha256(path)
    changes: tuple[str, ...] = ()
    diff = None
    model_path = locate(lock.model.path, base)
    if model_path is not None and observed[lock.model.path] != lock.model.sha256:
        changes, diff = _explain_model(lock, model_path, cache)
    cache.save()
    return compare_artifacts(expected, observed, changes=changes, diff=diff)


def _explain_model(lock: Lock, path: Path, cache: HashCache) -> tuple[tuple[str, ...], str | None]:
    """Which parts of a changed model file changed, and the embedded template's diff when it did."""
    try:
        gguf = read_gguf(path)
    except StacklockError as exc:
        return (f"the file is no longer a readable GGUF: {exc.one_line()}",), None
    header = header_from_gguf(gguf)
    digests = cache.digests(path, lambda _: gguf.data_offset)
    parts = tuple(FilePin(path=p.path, sha256=p.sha256, size=p.size) for p in lock.model.parts)
    now = pin_model(
        header,
        digests,
        source=lock.model.source,
        path=lock.model.path,
        revision=lock.model.revision,
        size=path.stat().st_size,
        parts=parts,
    )
    old_text = embedded_template(lock)
    new_text = header.chat_template
    changes = explain_model(lock.model, now, old_template=old_text, new_template=new_text)
    if old_text is None or new_text is None or old_text == new_text:
        return changes, None
    return changes, template_diff(old_text, new_text, name="tokenizer.chat_template")


def _reference_template(manifest_path: Path, lock: Lock) -> str | None:
    """The template re-read from its source, to point at the first character an edited lock changed."""
    base = manifest_path.parent
    try:
        manifest, _ = read_manifest(manifest_path)
        header = header_from_gguf(read_gguf(_require_model(lock, base)))
        registries = resolve_registries(
            manifest.registries, pins=lock.registries, offline=True, base_dir=base
        )
        return load_template(manifest, header, base, registries).text
    except StacklockError:
        return None


def _served(lock: Lock, endpoint: str | None) -> ServedEngine | None:
    """The served engine the lock names, at ``endpoint`` or the locked one; None for an in-process engine."""
    if not is_served(lock.engine.name):
        if endpoint is not None:
            raise errors.UsageError(
                f"--endpoint is for served engines; {lock.engine.name} runs in process",
                hint="drop --endpoint, or set engine.name to a served engine (llama-server...)",
            )
        return None
    served = open_served(lock.engine.name, endpoint or lock.engine.endpoint, lock.engine.api_key_env)
    version = served.identity().version
    if version != lock.engine.version:
        raise EngineError(
            f"the {lock.engine.name} at {endpoint or lock.engine.endpoint} runs {version}, not the locked "
            f"{lock.engine.version}",
            hint="point --endpoint at a server of the locked build, or re-lock and re-record against this one",
        )
    return served


def verify(
    lock_path: Path, *, tolerance: Tolerance | None = None, endpoint: str | None = None
) -> VerifyReport:
    """Re-run every smoke prompt and compare each stage with the goldens."""
    lock = read_lock(lock_path)
    base = lock_path.parent
    if not lock.smoke:
        raise errors.LockError(
            f"{lock_path}: no smoke prompts to verify", hint="add [[smoke]] entries and re-lock"
        )
    check_engine(lock)
    served = _served(lock, endpoint)
    if served is not None:
        return _verify_served(lock, served, tolerance)
    artifacts = _artifacts(lock, base, HashCache())
    model_path = _require_model(lock, base)
    # Re-reading the template's source (the GGUF, a registry) only pays off when the locked text was edited.
    text = lock.template.text
    edited = (
        text is not None and lock.template.sha256 is not None and sha256_text(text) != lock.template.sha256
    )
    reference = _reference_template(lock_path.with_name("llmstack.toml"), lock) if edited else None
    jobs, broken = _jobs(lock)
    run = run_engine(lock, model_path, jobs, top_k=lock.recording.top_k if lock.recording else 5)
    report = _report(lock, run, broken, artifacts, reference, tolerance)
    notes = list(report.notes)
    if run.builtin is not None:
        fmt, _ = run.builtin
        notes.append(
            f"on its own, {lock.engine.name} would render chats for this model with its '{fmt}' format; "
            "stacklock renders the locked template instead"
        )
    return report.model_copy(update={"notes": tuple(notes)})


def _jobs(lock: Lock) -> tuple[list[Job], dict[str, StageResult]]:
    jobs: list[Job] = []
    broken: dict[str, StageResult] = {}
    for pin in lock.smoke:
        # A template that no longer renders fails that prompt's template stage; the engine is not asked.
        try:
            jobs.append(_job(lock, pin))
        except errors.TemplateError as exc:
            broken[pin.name] = StageResult(stage="template", status="fail", detail=exc.one_line())
    return jobs, broken


def _verify_served(lock: Lock, served: ServedEngine, tolerance: Tolerance | None) -> VerifyReport:
    """Verify through the served engine's own chat path (see :mod:`stacklock.verify.served`)."""
    artifacts = served_artifacts(lock, served)
    if artifacts.detail.startswith(ANOTHER_MODEL):
        # Asking a server that holds another model to generate from the locked token ids says nothing (and
        # ids beyond its vocabulary are refused): the stack is wrong at its first link.
        reason = ANOTHER_MODEL
        results = [
            smoke_result(pin.name, [artifacts, *(skipped(s, reason) for s in STAGES[1:])])
            for pin in lock.smoke
        ]
        return build_report(results, engine=served.identity(), recorded_engine=None, tolerance=tolerance)
    jobs, broken = _jobs(lock)
    run = run_served(
        lock, served, jobs, top_k=lock.recording.top_k if lock.recording else 5, from_golden=True
    )
    report = _report(lock, run, broken, artifacts, None, tolerance)
    unobservable = ", ".join(lock.engine.served.unobservable) if lock.engine.served else ""
    notes = [*report.notes]
    if unobservable:
        notes.append(
            f"not checked (no {lock.engine.name} endpoint reports them): {unobservable}; pin them where the "
            "server is started"
        )
    return report.model_copy(update={"notes": tuple(notes)})


def _report(
    lock: Lock,
    run: EngineRun,
    broken: Mapping[str, StageResult],
    artifacts: StageResult,
    reference: str | None,
    tolerance: Tolerance | None,
) -> VerifyReport:
    results = []
    for pin in lock.smoke:
        if pin.name in broken:
            reason = "the prompt could not be rendered"
            stages = [artifacts, broken[pin.name]]
            stages += [skipped(stage, reason) for stage in ("tokenization", "generation", "output")]
            results.append(smoke_result(pin.name, stages))
            continue
        results.append(
            compare_smoke(
                pin.name,
                pin.golden,
                run.observations[pin.name],
                rendered_sha256=pin.rendered_sha256,
                artifacts=artifacts,
                bos_id=lock.tokenizer.bos_id,
                eos_id=lock.tokenizer.eos_id,
                template=lock.template.text,
                template_sha256=lock.template.sha256,
                reference_template=reference,
                expected_rendered=pin.rendered,
                expectation=pin.expect,
                tolerance=tolerance,
                decode=_decoder(run.decoded),
            )
        )
    recorded = lock.recording.engine if lock.recording else None
    return build_report(results, engine=run.identity, recorded_engine=recorded, tolerance=tolerance)


def _decoder(decoded: Mapping[int, str]) -> Any:
    def decode(tokens: Sequence[int]) -> str:
        return "".join(decoded.get(t, f"<{t}>") for t in tokens)

    return decode
