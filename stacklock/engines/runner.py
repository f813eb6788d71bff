"""The child-process runner: an engine loads the model once in a child process and observes every job.

A crash inside the engine (a failed assertion, a segfault) then becomes a clear exit-3 error instead of killing
stacklock, and the engine's own output goes to a log file instead of the terminal.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stacklock import errors
from stacklock.engines.base import EngineIdentity, Observation, observe
from stacklock.engines.plugins import load_engine
from stacklock.errors import EngineError, StacklockError
from stacklock.model.lock import Lock


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
    _remove_stale_logs()
    handle, log_name = tempfile.mkstemp(prefix=f"{_LOG_PREFIX}{os.getpid()}-", suffix=".log")
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
    try:
        return EngineRun(
            identity=EngineIdentity.model_validate_json(message["identity"]),
            builtin=tuple(message["builtin"]) if message["builtin"] else None,
            observations={k: Observation.model_validate_json(v) for k, v in message["observations"].items()},
            decoded={int(k): v for k, v in message["decoded"].items()},
        )
    except ValidationError as exc:
        raise _unrecordable(lock.engine.name, exc) from None


_LOG_PREFIX = "stacklock-engine-"


def _remove_stale_logs() -> None:
    """Remove the logs of runs whose stacklock process is gone (killed before it could clean up).

    A log is named after the pid of the stacklock process that ran the engine; a crash's log, kept for a bug
    report, is renamed without it (``stacklock-engine-crash-*``) and stays.
    """
    for path in Path(tempfile.gettempdir()).glob(f"{_LOG_PREFIX}*-*.log"):
        owner = path.name.removeprefix(_LOG_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unrecordable(engine: str, exc: ValidationError) -> EngineError:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    return EngineError(
        f"the engine ({engine}) returned a value stacklock cannot record: {where}: {err['msg']}",
        hint="NaN or infinite numbers usually mean broken weights or sampler settings; check the model file",
    )


def _die_with_parent() -> None:
    """Linux: the kernel kills this child when the stacklock process dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # noqa: PLC0415 - only the engine's child needs it.

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


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
    if lines:
        kept_path = log_path.with_name(log_path.name.replace(_LOG_PREFIX, f"{_LOG_PREFIX}crash-", 1))
        log_path = log_path.rename(kept_path)
    kept = f"; the engine's full output is in {log_path}" if lines else ""
    if not lines:
        log_path.unlink(missing_ok=True)
    return EngineError(
        f"the engine ({engine}) crashed ({how}) while {doing}{quoted}",
        hint=f"check the model file and the backend settings, or report it to the engine's authors{kept}",
    )


def _child(payload: dict[str, Any], sender: Any) -> None:
    _die_with_parent()
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
    except ValidationError as exc:
        # NaN logprobs from broken weights, an infinite sampler value: the engine's output, not a bug.
        failure = _unrecordable(payload["engine"], exc)
        sender.send(
            {"kind": "error", "class": "EngineError", "message": failure.message, "hint": failure.hint}
        )
    except Exception:  # noqa: BLE001 - Anything else is an adapter bug; the parent shows its traceback.
        sender.send({"kind": "bug", "traceback": traceback.format_exc()})
    finally:
        sender.close()
