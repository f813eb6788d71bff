"""`stacklock record` and `stacklock verify`: run the smoke prompts of a locked stack on its engine.

``record`` stores goldens in the lock; ``verify`` compares a new run with them stage by stage
(:mod:`stacklock.verify` decides; this module only gathers observations). The engine runs in a child process
that loads the model once for every prompt: a crash inside the engine (a failed assertion, a segfault) then
becomes a clear exit-3 error instead of killing stacklock.
"""

from __future__ import annotations

import faulthandler
import json
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stacklock import errors
from stacklock.engines import (
    EngineIdentity,
    Observation,
    current_environment,
    installed_engine_version,
    load_engine,
    observe,
    sha256_text,
)
from stacklock.errors import EngineError, StacklockError
from stacklock.gguf_file import read_gguf
from stacklock.hashing import HashCache
from stacklock.header import header_from_gguf
from stacklock.lock import Lock, SmokePin
from stacklock.project import read_lock, read_manifest, write_lock
from stacklock.registry import resolve_registries
from stacklock.resolve import effective_add_bos, load_template, render_smoke
from stacklock.sources import fetch_model, parse_model_source
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


def run_engine(lock: Lock, model_path: Path, jobs: Sequence[Job], *, top_k: int) -> EngineRun:
    """Load the model once in a child process and observe every job; crashes become EngineError.

    The child's stderr goes to a log file, so the engine's own output does not interleave with stacklock's.
    When the child dies, the lines of that log that say why are quoted in the error, and the file is kept for
    a bug report; otherwise it is removed.
    """
    # Forking is fast but only safe in a single-threaded process: a parent that already ran an engine holds
    # its thread pool (OpenMP), which the child inherits broken and waits on forever.
    fork = sys.platform.startswith("linux") and _single_threaded()
    context = multiprocessing.get_context("fork") if fork else multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    handle, log_name = tempfile.mkstemp(prefix="stacklock-engine-", suffix=".log")
    os.close(handle)
    log_path = Path(log_name)
    payload = {
        "engine": lock.engine.name,
        "model": str(model_path),
        "lock": lock.model_dump_json(by_alias=True),
        "jobs": [job.__dict__ for job in jobs],
        "top_k": top_k,
        "log": log_name,
    }
    doing = "starting the engine"
    message: dict[str, Any] | None = None
    try:
        process = context.Process(target=_child, args=(payload, sender), daemon=True)
        process.start()
        sender.close()
        while message is None:
            try:
                received = receiver.recv()
            except EOFError:
                break
            if received["kind"] == "at":
                doing = received["doing"]
            else:
                message = received
        process.join()
    except BaseException:
        # Interrupted (Ctrl-C) or failed to start: the log says nothing anyone asked for.
        log_path.unlink(missing_ok=True)
        raise
    if message is None:
        raise _crash(lock.engine.name, process.exitcode, doing, log_path)
    log_path.unlink(missing_ok=True)
    kind = message["kind"]
    if kind == "error":
        error_class = getattr(errors, message["class"], StacklockError)
        raise error_class(message["message"], hint=message["hint"])
    if kind == "bug":
        raise RuntimeError(f"the engine adapter failed:\n{message['traceback']}")
    return EngineRun(
        identity=EngineIdentity.model_validate_json(message["identity"]),
        builtin=tuple(message["builtin"]) if message["builtin"] else None,
        observations={k: Observation.model_validate_json(v) for k, v in message["observations"].items()},
        decoded={int(k): v for k, v in message["decoded"].items()},
    )


def _single_threaded() -> bool:
    """Whether this process runs one thread, native threads included (Linux: one entry in /proc/self/task)."""
    try:
        return len(list(Path("/proc/self/task").iterdir())) == 1
    except OSError:
        return False


# Lines of an engine's dying output that say why; the rest is progress and noise.
_CRASH_LINE = re.compile(
    r"terminate called|what\(\)|GGML_ASSERT|GGML_ABORT|assert|abort|error|fatal|exception|segmentation",
    re.IGNORECASE,
)


def _crash(engine: str, code: int | None, doing: str, log_path: Path) -> EngineError:
    """The error for a child that died without a reply: how, while doing what, and what the engine said."""
    if code is not None and code < 0:
        try:
            how = f"signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"signal {-code}"
    else:
        how = f"exit status {code}"
    try:
        lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        lines = []
    lines = [line for line in lines if line]
    said = [line for line in lines if _CRASH_LINE.search(line)][-3:] or lines[-2:]
    quoted = f": {' | '.join(said)}" if said else ""
    kept = f"; the engine's full output is in {log_path}" if lines else ""
    if not lines:
        log_path.unlink(missing_ok=True)
    return EngineError(
        f"the engine ({engine}) crashed ({how}) while {doing}{quoted}",
        hint=f"check the model file and the backend settings, or report it to the engine's authors{kept}",
    )


def _child(payload: dict[str, Any], sender: Any) -> None:
    # The engine's own output goes to the log file: C code writes to file descriptor 2 directly. ggml would
    # attach gdb to print a backtrace when it aborts; that takes seconds and says nothing a user can act on.
    log = open(payload["log"], "a", encoding="utf-8", errors="replace")  # noqa: SIM115, PTH123 - kept open for the process.
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log)
    os.environ["GGML_NO_BACKTRACE"] = "1"

    def doing(what: str) -> None:
        sender.send({"kind": "at", "doing": what})

    try:
        lock = Lock.model_validate_json(payload["lock"])
        vocab_size = lock.tokenizer.vocab_size
        doing("loading the engine")
        engine = load_engine(payload["engine"])
        doing(f"loading the model {lock.model.path}")
        loaded = engine.load(Path(payload["model"]), lock.backend)
        try:
            observations: dict[str, str] = {}
            decoded: dict[int, str] = {}
            for job in payload["jobs"]:
                doing(f"running the smoke prompt '{job['name']}'")
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
                wanted = {*generation.prompt_tokens, *generation.tokens}
                wanted |= {t for step in generation.steps for t, _ in step.top}
                wanted |= {t for t in (lock.tokenizer.bos_id, lock.tokenizer.eos_id) if t is not None}
                pin = next(p for p in lock.smoke if p.name == job["name"])
                if pin.golden is not None:
                    wanted |= {*(pin.golden.prompt_tokens or ()), *pin.golden.tokens}
                    wanted |= {t for step in pin.golden.top_logprobs for t, _ in step}
                # A hand-edited golden may name a token the vocabulary lacks; llama.cpp aborts on those.
                wanted = {t for t in wanted if t not in decoded and 0 <= t < vocab_size}
                decoded.update({t: loaded.detokenize([t], special=True) for t in wanted})
            doing("asking the engine how it would render a chat")
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
        raise errors.LockError(
            f"{lock_path}: no smoke prompts to record", hint="add [[smoke]] entries and re-lock"
        )
    artifacts = _artifacts(lock, base, HashCache())
    if artifacts.status != "pass":
        raise errors.StaleLockError(f"cannot record: {artifacts.detail}")
    run = run_engine(lock, _require_model(lock, base), [_job(lock, p) for p in lock.smoke], top_k=top_k)
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
    cache.save()
    return compare_artifacts(expected, observed)


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


def verify(lock_path: Path, *, tolerance: Tolerance | None = None) -> VerifyReport:
    """Re-run every smoke prompt and compare each stage with the goldens."""
    lock = read_lock(lock_path)
    base = lock_path.parent
    if not lock.smoke:
        raise errors.LockError(
            f"{lock_path}: no smoke prompts to verify", hint="add [[smoke]] entries and re-lock"
        )
    check_engine(lock)
    artifacts = _artifacts(lock, base, HashCache())
    model_path = _require_model(lock, base)
    # Re-reading the template's source (the GGUF, a registry) only pays off when the locked text was edited.
    text = lock.template.text
    edited = (
        text is not None and lock.template.sha256 is not None and sha256_text(text) != lock.template.sha256
    )
    reference = _reference_template(lock_path.with_name("llmstack.toml"), lock) if edited else None
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
        "lock-sha256": sha256_text(lock_text),
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
