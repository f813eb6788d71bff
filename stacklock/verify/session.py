"""`stacklock record` and `stacklock verify`: run the smoke prompts of a locked stack on its engine.

``record`` stores goldens in the lock; ``verify`` compares a new run with them stage by stage
(:mod:`stacklock.verify.compare` decides; this module only gathers observations through
:mod:`stacklock.engines.runner`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stacklock import errors
from stacklock.engines.base import EngineIdentity
from stacklock.engines.machine import current_environment, installed_engine_version
from stacklock.engines.runner import EngineRun, EngineSession, RenderedSmoke, run_engine
from stacklock.engines.served import ServedEngine, check_served_version, served_engine
from stacklock.errors import EngineError, StacklockError
from stacklock.files.digest import HashCache, sha256_text
from stacklock.gguf.header import header_from_gguf
from stacklock.gguf.reader import read_gguf
from stacklock.lock.diff import embedded_template, explain_model, template_diff
from stacklock.lock.load import load_template
from stacklock.lock.project import project_lock, read_lock, read_manifest, write_lock
from stacklock.lock.resolve import pin_model
from stacklock.lock.smoke import effective_add_bos, render_smoke
from stacklock.model.lock import FilePin, Lock, SmokePin
from stacklock.model.manifest import MANIFEST_NAME
from stacklock.registry.fetch import resolve_registries
from stacklock.reporter import NO_REPORTER, Reporter
from stacklock.rules.versions import same_commit
from stacklock.sources.hub import download_hub_file
from stacklock.sources.local import confine
from stacklock.sources.model import HubSource, parse_model_source
from stacklock.verify.compare import (
    STAGES,
    Stage,
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
from stacklock.verify.served import (
    ANOTHER_MODEL,
    hide_unobservable,
    run_served,
    served_artifacts,
    unobservable_stages,
)


def check_engine(lock: Lock) -> None:
    """Before running anything: the installed engine must be the locked version."""
    installed = installed_engine_version(lock.engine.name)
    if installed is not None and installed != lock.engine.version:
        raise EngineError(
            f"installed {lock.engine.name} {installed} is not the locked {lock.engine.version}",
            hint=f"pip install '{lock.engine.name}=={lock.engine.version}', or re-lock and re-record on {installed}",
        )


def check_engine_commit(lock: Lock, identity: EngineIdentity) -> None:
    """After the engine started: the llama.cpp commit it reports must be the one the lock pins.

    The lock pins the commit from the registry's engine table (the row that gave its exact build); an engine
    built from other sources (a git checkout, a patched vendor tree) carries another build under the same
    version, and every build-range rule was judged for the wrong one.
    """
    pinned, reported = lock.engine.commit, identity.build
    if pinned is None or reported is None or same_commit(pinned, reported):
        return
    raise EngineError(
        f"installed {lock.engine.name} {identity.version} runs llama.cpp commit {reported}, but the lock pins "
        f"{pinned} (build b{lock.engine.build}) for that version",
        hint="reinstall the released package, or re-lock with a registry engine table whose row names this commit",
    )


def locate(location: str, base: Path, *, sha256: str | None = None, download: bool = False) -> Path | None:
    """A locked file on disk (relative to the manifest, or a hub file at its pinned commit in the hub cache).

    None when it is not there. With ``download``, a hub file missing from the cache is downloaded at the locked
    commit and checked against ``sha256`` before it is used; a download that fails is an error (exit 3).
    """
    source = parse_model_source(location)
    if not isinstance(source, HubSource):
        # A hand-edited lock may point anywhere: it is confined like a manifest's source.
        lexists = "\x00" not in location and os.path.lexists(base / location)
        return confine(location, base, "model.path in the lock") if lexists else None
    try:
        path, _ = download_hub_file(
            source.repo, source.revision, source.path, offline=not download, sha256=sha256
        )
    except errors.NetworkError:
        if download:
            raise
        return None
    except StacklockError:
        return None
    return path


def model_files(lock: Lock, base: Path, *, download: bool = False) -> dict[str, Path | None]:
    pins = [(lock.model.path, lock.model.sha256), *((p.path, p.sha256) for p in lock.model.parts)]
    return {label: locate(label, base, sha256=sha, download=download) for label, sha in pins}


def _require_model(lock: Lock, base: Path) -> Path:
    path = locate(lock.model.path, base)
    if path is None:
        raise EngineError(
            f"model file {lock.model.path} is missing, so the engine cannot run",
            hint="put the locked file back (the lock pins its sha256) or re-lock",
        )
    return path


def rendered_smoke(lock: Lock, pin: SmokePin) -> RenderedSmoke:
    """One smoke prompt of a lock as the engine is given it (also used by bisect and matrix)."""
    # The BOS decision is re-derived from the lock's tokenizer flags, so an edited flag shows at tokenization.
    rendered = render_smoke(pin, lock.template, lock.tokenizer)
    # A report may name the golden's tokens, BOS and EOS; a hand-edited golden may name a token the
    # vocabulary lacks, which llama.cpp aborts on, so only ids inside the vocabulary are decoded.
    wanted = {t for t in (lock.tokenizer.bos_id, lock.tokenizer.eos_id) if t is not None}
    if pin.golden is not None:
        wanted |= {*(pin.golden.prompt_tokens or ()), *pin.golden.tokens}
        wanted |= {t for step in pin.golden.top_logprobs for t, _ in step}
    return RenderedSmoke(
        name=pin.name,
        rendered=rendered,
        max_tokens=pin.max_tokens,
        add_bos=effective_add_bos(pin, rendered, lock.tokenizer),
        sampler=lock.sampler,
        decode=tuple(sorted(t for t in wanted if 0 <= t < lock.tokenizer.vocab_size)),
    )


class _EngineSteps:
    """What the engine's child process says it is doing, as reporter steps: each activity ends the one before."""

    def __init__(self, reporter: Reporter, prompts: int) -> None:
        self._reporter = reporter
        self._current: str | None = None
        self._prompts = prompts
        self._done = 0

    def __call__(self, doing: str) -> None:
        self.close()
        self._current = doing
        self._reporter.step_started(doing)
        if doing.startswith("running the smoke prompt"):
            # Smoke prompts are counted: a terminal shows "1 of N".
            self._reporter.progress(doing, self._done, self._prompts)
            self._done += 1

    def close(self) -> None:
        if self._current is not None:
            self._reporter.step_finished(self._current)
            self._current = None


def _observe(
    lock: Lock,
    model_path: Path,
    prompts: Sequence[RenderedSmoke],
    *,
    top_k: int,
    session: EngineSession | None,
    reporter: Reporter,
) -> EngineRun:
    """Run the prompts on the caller's engine session, or on one started (and ended) for them."""
    if session is None:
        steps = _EngineSteps(reporter, len(prompts))
        try:
            run = run_engine(lock.engine.name, model_path, lock.backend, prompts, top_k=top_k, progress=steps)
        finally:
            steps.close()
        check_engine_commit(lock, run.identity)
        return run
    # Jobs of several locks share a session only when it runs exactly what each lock pins.
    if session.engine != lock.engine.name:
        mismatch = f"runs {session.engine}, but the lock names {lock.engine.name}"
    elif session.model_path.resolve() != model_path.resolve():
        mismatch = f"holds {session.model_path}, but the lock's model is {model_path}"
    elif session.backend != lock.backend:
        mismatch = "was started with another backend than the lock's"
    else:
        run = session.observe(prompts, top_k=top_k)
        check_engine_commit(lock, run.identity)
        return run
    raise errors.UsageError(
        f"the engine session {mismatch}", hint="start one session per engine, model and backend"
    )


def record_lock(
    lock: Lock,
    base: Path,
    *,
    top_k: int = 5,
    session: EngineSession | None = None,
    reporter: Reporter = NO_REPORTER,
    offline: bool = False,
    endpoint: str | None = None,
) -> Lock:
    """Run every smoke prompt of ``lock`` and return it with the goldens stored; nothing is written.

    ``base`` is the directory relative model paths are read from. ``session`` is an engine session already
    holding the locked model on the locked backend (a matrix or a bisection shares one); without it one is
    started for this call. ``reporter`` is told what stacklock and the engine are doing. Hub files missing from
    the hub cache are downloaded at their locked commit, unless ``offline``. A served engine is reached at
    ``endpoint`` (``--endpoint``) or the locked one.
    """
    check_engine(lock)
    if not lock.smoke:
        raise errors.LockError(
            f"stack '{lock.stack.name}': no smoke prompts to record", hint="add [[smoke]] entries and re-lock"
        )
    served = _served(lock, endpoint)
    if served is None:
        artifacts = _artifacts(lock, base, HashCache(), reporter, download=not offline)
    else:
        artifacts = served_artifacts(lock, served)
    if artifacts.status != "pass":
        raise errors.StaleLockError(f"cannot record: {artifacts.detail}")
    prompts = [rendered_smoke(lock, p) for p in lock.smoke]
    if served is None:
        model_path = _require_model(lock, base)
        run = _observe(lock, model_path, prompts, top_k=top_k, session=session, reporter=reporter)
    else:
        with run_served(lock, served, prompts, top_k=top_k, from_golden=False) as run:
            pass
    smoke = tuple(
        pin.model_copy(update={"golden": golden_from_observation(run.observations[pin.name])})
        for pin in lock.smoke
    )
    environment = current_environment().model_dump(mode="json", by_alias=True)
    return lock.model_copy(
        update={"smoke": smoke, "recording": recording_from(run.identity, environment, top_k)}
    )


def record(
    lock_path: Path,
    *,
    top_k: int = 5,
    reporter: Reporter = NO_REPORTER,
    offline: bool = False,
    endpoint: str | None = None,
) -> Lock:
    """Run every smoke prompt of the lock file and store the goldens in it (written atomically, one run at a
    time)."""
    with project_lock(lock_path):
        recorded = record_lock(
            read_lock(lock_path),
            lock_path.parent,
            top_k=top_k,
            reporter=reporter,
            offline=offline,
            endpoint=endpoint,
        )
        write_lock(lock_path, recorded)
    return recorded


def _served(lock: Lock, endpoint: str | None) -> ServedEngine | None:
    """The served engine the lock names, checked to run the locked build; None for an in-process engine."""
    pin = lock.engine
    served = served_engine(pin.name, pin.endpoint, pin.api_key_env, override=endpoint, model=pin.model)
    if served is not None:
        check_served_version(lock.engine, served)
    return served


def _artifacts(
    lock: Lock, base: Path, cache: HashCache, reporter: Reporter, *, download: bool = False
) -> StageResult:
    expected = {lock.model.path: lock.model.sha256} | {p.path: p.sha256 for p in lock.model.parts}
    observed: dict[str, str | None] = {}
    for label, path in model_files(lock, base, download=download).items():
        observed[label] = None if path is None else _sha256_readable(label, path, cache, reporter)
    changes: tuple[str, ...] = ()
    diff = None
    model_path = locate(lock.model.path, base)
    if model_path is not None and observed[lock.model.path] != lock.model.sha256:
        changes, diff = _explain_model(lock, model_path, cache)
    cache.save()
    return compare_artifacts(expected, observed, changes=changes, diff=diff)


def _sha256_readable(label: str, path: Path, cache: HashCache, reporter: Reporter) -> str:
    """The file's sha256; a file this process cannot read is one line (exit 2), before any engine tries."""
    try:
        # A cached digest reads nothing, and the engine must read the file: opening it proves it can.
        with path.open("rb"):
            pass
        return cache.sha256(path, reporter=reporter)
    except OSError as exc:
        raise errors.SourceError(
            f"model.path in the lock: {label}: cannot read it ({exc.strerror or exc})",
            hint="make the file readable by this user, or put the locked file back",
        ) from None


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
        # A hub template is re-read from the hub cache at its locked commit; verify asks the hub nothing for it.
        return load_template(
            manifest, header, base, registries, offline=True, revision=lock.template.revision
        ).text
    except StacklockError:
        return None


def verify_lock(
    lock: Lock,
    base: Path,
    *,
    tolerance: Tolerance | None = None,
    manifest_path: Path | None = None,
    session: EngineSession | None = None,
    reporter: Reporter = NO_REPORTER,
    offline: bool = False,
    endpoint: str | None = None,
) -> VerifyReport:
    """Re-run every smoke prompt of ``lock`` and compare each stage with its goldens.

    ``base``, ``session``, ``reporter`` and ``offline`` are as for :func:`record_lock`. ``manifest_path`` names the manifest
    whose template source is re-read when the locked template text was edited (to show the first changed
    character); without it that explanation is left out. A served engine is verified through its own chat
    path at ``endpoint`` or the locked one (see :mod:`stacklock.verify.served`).
    """
    if not lock.smoke:
        raise errors.LockError(
            f"stack '{lock.stack.name}': no smoke prompts to verify", hint="add [[smoke]] entries and re-lock"
        )
    check_engine(lock)
    served = _served(lock, endpoint)
    if served is not None:
        return _verify_served(lock, served, tolerance)
    artifacts = _artifacts(lock, base, HashCache(), reporter, download=not offline)
    present = all(path is not None for path in model_files(lock, base).values())
    if artifacts.status != "pass" and present:
        # A truncated or replaced model is an artifacts failure (exit 1), not an engine that cannot load it;
        # a missing one still stops below, as an engine that cannot run (exit 3).
        reason = "the locked files differ"
        stages = [artifacts, *(skipped(stage, reason) for stage in STAGES[1:])]
        return build_report([smoke_result(pin.name, stages) for pin in lock.smoke], tolerance=tolerance)
    model_path = _require_model(lock, base)
    # Re-reading the template's source (the GGUF, a registry) only pays off when the locked text was edited.
    text = lock.template.text
    edited = (
        text is not None and lock.template.sha256 is not None and sha256_text(text) != lock.template.sha256
    )
    reference = _reference_template(manifest_path, lock) if edited and manifest_path is not None else None
    prompts, broken = _rendered(lock)
    top_k = lock.recording.top_k if lock.recording else 5
    run = _observe(lock, model_path, prompts, top_k=top_k, session=session, reporter=reporter)
    report = _compare(lock, run, broken, artifacts, reference, tolerance)
    notes = list(report.notes)
    if run.builtin is not None:
        fmt, _ = run.builtin
        notes.append(
            f"on its own, {lock.engine.name} would render chats for this model with its '{fmt}' format; "
            "stacklock renders the locked template instead"
        )
    return report.model_copy(update={"notes": tuple(notes)})


def _rendered(lock: Lock) -> tuple[list[RenderedSmoke], dict[str, StageResult]]:
    """Every smoke prompt rendered; a template that no longer renders fails that prompt's template stage."""
    prompts: list[RenderedSmoke] = []
    broken: dict[str, StageResult] = {}
    for pin in lock.smoke:
        try:
            prompts.append(rendered_smoke(lock, pin))
        except errors.TemplateError as exc:
            broken[pin.name] = StageResult(stage="template", status="fail", detail=exc.one_line())
    return prompts, broken


def _verify_served(lock: Lock, served: ServedEngine, tolerance: Tolerance | None) -> VerifyReport:
    """Verify through the served engine's own chat path (see :mod:`stacklock.verify.served`)."""
    artifacts = served_artifacts(lock, served)
    if artifacts.detail.startswith(ANOTHER_MODEL):
        # Asking a server that holds another model to generate from the locked token ids says nothing (and
        # ids beyond its vocabulary are refused): the stack is wrong at its first link.
        stages = [artifacts, *(skipped(stage, ANOTHER_MODEL) for stage in STAGES[1:])]
        results = [smoke_result(pin.name, stages) for pin in lock.smoke]
        return build_report(results, engine=served.identity(), recorded_engine=None, tolerance=tolerance)
    prompts, broken = _rendered(lock)
    top_k = lock.recording.top_k if lock.recording else 5
    hidden = unobservable_stages(lock.engine.name, served.capabilities())
    with run_served(lock, served, prompts, top_k=top_k, from_golden=True) as run:
        report = _compare(lock, run, broken, artifacts, None, tolerance, hidden=hidden)
    notes = list(report.notes)
    if lock.engine.served is not None and lock.engine.served.unobservable:
        notes.append(
            f"not checked (no {lock.engine.name} endpoint reports them): "
            f"{', '.join(lock.engine.served.unobservable)}; pin them where the server is started"
        )
    return report.model_copy(update={"notes": tuple(notes)})


def _compare(
    lock: Lock,
    run: EngineRun,
    broken: Mapping[str, StageResult],
    artifacts: StageResult,
    reference: str | None,
    tolerance: Tolerance | None,
    *,
    hidden: Mapping[Stage, str] | None = None,
) -> VerifyReport:
    """Each smoke prompt's stages: the engine's observations against the goldens; the ``hidden`` stages (which
    a served engine does not let stacklock observe) are reported as not checked."""
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
    if hidden:
        results = hide_unobservable(lock, results, hidden)
    recorded = lock.recording.engine if lock.recording else None
    return build_report(results, engine=run.identity, recorded_engine=recorded, tolerance=tolerance)


def verify(
    lock_path: Path,
    *,
    tolerance: Tolerance | None = None,
    reporter: Reporter = NO_REPORTER,
    offline: bool = False,
    endpoint: str | None = None,
) -> VerifyReport:
    """Re-run every smoke prompt of the lock file and compare each stage with the goldens."""
    return verify_lock(
        read_lock(lock_path),
        lock_path.parent,
        tolerance=tolerance,
        manifest_path=lock_path.with_name(MANIFEST_NAME),
        reporter=reporter,
        offline=offline,
        endpoint=endpoint,
    )


def _decoder(decoded: Mapping[int, str]) -> Any:
    def decode(tokens: Sequence[int]) -> str:
        return "".join(decoded.get(t, f"<{t}>") for t in tokens)

    return decode
