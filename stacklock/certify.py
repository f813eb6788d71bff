"""`stacklock record` and `stacklock verify`: run the smoke prompts of a locked stack on its engine.

``record`` stores goldens in the lock; ``verify`` compares a new run with them stage by stage
(:mod:`stacklock.verify` decides; this module only gathers observations). The engine runs in a child process
that loads the model once for every prompt: a crash inside the engine (a failed assertion, a segfault) then
becomes a clear exit-3 error instead of killing stacklock.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stacklock import errors
from stacklock.engines import EngineIdentity, Observation, current_environment, load_engine, observe
from stacklock.errors import EngineError, StacklockError
from stacklock.hashing import HashCache
from stacklock.lock import Lock, SmokePin
from stacklock.gguf_file import read_gguf
from stacklock.registry import resolve_registries
from stacklock.resolve import (
    effective_add_bos,
    installed_engine_version,
    load_template,
    read_lock,
    read_manifest,
    render_smoke,
    write_lock,
)
from stacklock.verify import (
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

CERTIFICATE_VERSION = 1


@dataclass(frozen=True)
class Job:
    name: str
    rendered: str
    max_tokens: int
    add_bos: bool


@dataclass(frozen=True)
class EngineRun:
    """What one engine session observed."""

    identity: EngineIdentity
    builtin: tuple[str, str] | None
    observations: dict[str, Observation]
    decoded: dict[int, str]


def check_engine(lock: Lock) -> None:
    """Before running anything: the installed engine must be the locked version."""
    installed = installed_engine_version(lock.engine.name)
    if installed is not None and installed != lock.engine.version:
        raise EngineError(
            f"installed {lock.engine.name} {installed} is not the locked {lock.engine.version}",
            hint=f"pip install '{lock.engine.name}=={lock.engine.version}', or re-lock and re-record on {installed}",
        )


def model_files(lock: Lock, base: Path) -> dict[str, Path]:
    files = {lock.model.path: base / lock.model.path}
    files.update({part.path: base / part.path for part in lock.model.parts})
    return files


def _require_model(lock: Lock, base: Path) -> Path:
    path = base / lock.model.path
    if not path.is_file():
        raise EngineError(
            f"model file {lock.model.path} is missing, so the engine cannot run",
            hint="put the locked file back (the lock pins its sha256) or re-lock",
        )
    return path


def _job(lock: Lock, pin: SmokePin) -> Job:
    # The BOS decision is re-derived from the lock's tokenizer flags, so an edited flag shows at tokenization.
    rendered = render_smoke(pin, lock.template, lock.tokenizer)
    return Job(pin.name, rendered, pin.max_tokens, effective_add_bos(pin, rendered, lock.tokenizer))


def run_engine(lock: Lock, model_path: Path, jobs: Sequence[Job], *, top_k: int) -> EngineRun:
    """Load the model once in a child process and observe every job; crashes become EngineError."""
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    receiver, sender = context.Pipe(duplex=False)
    payload = {
        "engine": lock.engine.name,
        "model": str(model_path),
        "lock": lock.model_dump_json(by_alias=True),
        "jobs": [job.__dict__ for job in jobs],
        "top_k": top_k,
    }
    process = context.Process(target=_child, args=(payload, sender), daemon=True)
    process.start()
    sender.close()
    try:
        message = receiver.recv()
    except EOFError:
        message = None
    process.join()
    if message is None:
        code = process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        raise EngineError(
            f"the engine ({lock.engine.name}) crashed ({how}) while running the smoke prompts",
            hint="its own messages above say why; check the model file and backend, or report it upstream",
        )
    kind = message["kind"]
    if kind == "error":
        error_class = getattr(errors, message["class"], StacklockError)
        raise error_class(message["message"], hint=message["hint"])
    if kind == "bug":
        raise RuntimeError(f"the engine adapter failed:\n{message['traceback']}")
    return EngineRun(
        identity=EngineIdentity.model_validate_json(message["identity"]),
        builtin=tuple(message["builtin"]) if message["builtin"] else None,  # type: ignore[arg-type]
        observations={k: Observation.model_validate_json(v) for k, v in message["observations"].items()},
        decoded={int(k): v for k, v in message["decoded"].items()},
    )


def _child(payload: dict[str, Any], sender: Any) -> None:
    try:
        lock = Lock.model_validate_json(payload["lock"])
        engine = load_engine(payload["engine"])
        loaded = engine.load(Path(payload["model"]), lock.backend)
        try:
            observations: dict[str, str] = {}
            decoded: dict[int, str] = {}
            for job in payload["jobs"]:
                seen = observe(
                    loaded,
                    job["rendered"],
                    add_bos=job["add_bos"],
                    sampler=lock.sampler,
                    max_tokens=job["max_tokens"],
                    stop=lock.sampler.stop,
                    top_k=payload["top_k"],
                )
                observations[job["name"]] = seen.model_dump_json()
                # Explanations show tokens as text; decode the ones a report could name, while the model is here.
                generation = seen.generation
                wanted = {*generation.prompt_tokens[:4], *generation.tokens}
                wanted |= {t for step in generation.steps for t, _ in step.top}
                pin = next(p for p in lock.smoke if p.name == job["name"])
                if pin.golden is not None:
                    wanted |= {*pin.golden.tokens, *(t for step in pin.golden.top_logprobs for t, _ in step)}
                decoded.update({t: loaded.detokenize([t], special=True) for t in wanted if t not in decoded})
            builtin = loaded.builtin_chat_render([{"role": "user", "content": "Hi"}])
            identity = loaded.identity().model_dump_json()
        finally:
            loaded.close()
        sender.send(
            {
                "kind": "ok",
                "identity": identity,
                "builtin": list(builtin) if builtin else None,
                "observations": observations,
                "decoded": decoded,
            }
        )
    except StacklockError as exc:
        sender.send({"kind": "error", "class": type(exc).__name__, "message": exc.message, "hint": exc.hint})
    except Exception:  # noqa: BLE001 - Anything else is an adapter bug; the parent shows its traceback.
        sender.send({"kind": "bug", "traceback": traceback.format_exc()})
    finally:
        sender.close()


def record(lock_path: Path, *, top_k: int = 5) -> Lock:
    """Run every smoke prompt and store its golden in the lock (written atomically)."""
    lock = read_lock(lock_path)
    base = lock_path.parent
    check_engine(lock)
    if not lock.smoke:
        raise errors.LockError(f"{lock_path}: no smoke prompts to record", hint="add [[smoke]] entries and re-lock")
    artifacts = _artifacts(lock, base, HashCache())
    if artifacts.status != "pass":
        raise errors.StaleLockError(f"cannot record: {artifacts.detail}")
    run = run_engine(lock, _require_model(lock, base), [_job(lock, p) for p in lock.smoke], top_k=top_k)
    smoke = tuple(
        pin.model_copy(update={"golden": golden_from_observation(run.observations[pin.name])}) for pin in lock.smoke
    )
    environment = current_environment().model_dump(mode="json", by_alias=True)
    recorded = lock.model_copy(update={"smoke": smoke, "recording": recording_from(run.identity, environment, top_k)})
    write_lock(lock_path, recorded)
    return recorded


def _artifacts(lock: Lock, base: Path, cache: HashCache) -> StageResult:
    expected = {lock.model.path: lock.model.sha256} | {p.path: p.sha256 for p in lock.model.parts}
    observed: dict[str, str | None] = {}
    for label, path in model_files(lock, base).items():
        observed[label] = cache.sha256(path) if path.is_file() else None
    cache.save()
    return compare_artifacts(expected, observed)


def _reference_template(manifest_path: Path, lock: Lock) -> str | None:
    """The template re-read from its source, to point at the first character an edited lock changed."""
    base = manifest_path.parent
    try:
        manifest, _ = read_manifest(manifest_path)
        gguf = read_gguf(base / lock.model.path)
        registries = resolve_registries(manifest.registries, pins=lock.registries, offline=True, base_dir=base)
        return load_template(manifest, gguf, base, registries).text
    except StacklockError:
        return None


def verify(lock_path: Path, *, tolerance: Tolerance | None = None) -> VerifyReport:
    """Re-run every smoke prompt and compare each stage with the goldens."""
    lock = read_lock(lock_path)
    base = lock_path.parent
    if not lock.smoke:
        raise errors.LockError(f"{lock_path}: no smoke prompts to verify", hint="add [[smoke]] entries and re-lock")
    check_engine(lock)
    artifacts = _artifacts(lock, base, HashCache())
    model_path = _require_model(lock, base)
    reference = _reference_template(lock_path.with_name("llmstack.toml"), lock)
    jobs: list[Job] = []
    broken: dict[str, StageResult] = {}
    for pin in lock.smoke:
        # A template that no longer renders fails that prompt's template stage; the engine is not asked.
        try:
            jobs.append(_job(lock, pin))
        except errors.TemplateError as exc:
            broken[pin.name] = StageResult(stage="template", status="fail", detail=exc.one_line())
    run = run_engine(lock, model_path, jobs, top_k=lock.recording.top_k if lock.recording else 5)
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
    report = build_report(results, engine=run.identity, recorded_engine=recorded, tolerance=tolerance)
    notes = list(report.notes)
    if run.builtin is not None:
        fmt, _ = run.builtin
        notes.append(
            f"on its own, {lock.engine.name} would render chats for this model with its '{fmt}' format; "
            "stacklock renders the locked template instead"
        )
    return report.model_copy(update={"notes": tuple(notes)})


def _decoder(decoded: Mapping[int, str]) -> Any:
    def decode(tokens: Sequence[int]) -> str:
        return "".join(decoded.get(t, f"<{t}>") for t in tokens)

    return decode


def certificate(lock_text: str, lock: Lock, report: VerifyReport) -> dict[str, Any]:
    """The JSON certificate `verify --certificate` writes: what was verified, where, with what result."""
    return {
        "certificate-version": CERTIFICATE_VERSION,
        "stack": lock.stack.name,
        "reproduced": report.reproduced,
        "tolerated": report.tolerated,
        "lock-sha256": hashlib.sha256(lock_text.encode("utf-8")).hexdigest(),
        "model-sha256": lock.model.sha256,
        "template-sha256": lock.template.sha256,
        "tokenizer-sha256": lock.tokenizer.sha256,
        "engine": report.engine.model_dump(mode="json", by_alias=True) if report.engine else None,
        "environment": current_environment().model_dump(mode="json", by_alias=True),
        "recorded-on": lock.recording.model_dump(mode="json", by_alias=True) if lock.recording else None,
        "results": [r.model_dump(mode="json", by_alias=True) for r in report.results],
        "notes": list(report.notes),
    }


def render_certificate(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
