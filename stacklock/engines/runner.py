"""The child-process runner: an engine loads a model once in a child process and observes prompt after prompt.

A crash inside the engine (a failed assertion, a segfault, an adapter bug) then becomes a clear exit-3 error
instead of killing stacklock, and the engine's own output goes to a log file instead of the terminal.

An :class:`EngineSession` is one engine with one model loaded on one backend. It observes any number of batches
of prompts, each prompt with its own sampler, so that prompts of different locks that share the model, the engine and
the backend (a matrix of sampler settings, a bisection over locks) pay for loading the model once::

    with EngineSession.start("llama-cpp-python", model_path, lock.backend) as session:
        first = session.observe(jobs_of_one_lock, top_k=5)
        second = session.observe(jobs_of_another_lock, top_k=5)
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from pydantic import ValidationError

from stacklock import errors
from stacklock.engines.base import EngineIdentity, Observation, observe
from stacklock.engines.memory import check_kv_cache_fits
from stacklock.engines.plugins import adapter_info, load_engine
from stacklock.errors import EngineError, StacklockError
from stacklock.model.effective import EffectiveBackend, EffectiveSampler

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

#: Seconds an engine may stay silent (no prompt finished, no step begun) before it is declared hung. A smoke
#: prompt of a large model on a slow CPU can take minutes; an engine that says nothing for ten is stuck.
DEFAULT_TIMEOUT = 600.0
TIMEOUT_VARIABLE = "STACKLOCK_ENGINE_TIMEOUT"


@dataclass(frozen=True)
class RenderedSmoke:
    """One prompt for the engine: already rendered, with the sampler it runs under."""

    name: str
    rendered: str
    max_tokens: int
    add_bos: bool
    sampler: EffectiveSampler
    #: Token ids a report may name besides the observed ones (a golden's tokens, BOS, EOS), decoded while the
    #: model is loaded. Ids outside the vocabulary must be left out: llama.cpp aborts on them.
    decode: tuple[int, ...] = ()


@dataclass(frozen=True)
class EngineRun:
    """What one engine session observed for one batch of prompts."""

    identity: EngineIdentity
    builtin: tuple[str, str] | None
    observations: dict[str, Observation]
    #: Token pieces by id; a served engine's are decoded on demand while its run is open.
    decoded: Mapping[int, str]


Progress = Callable[[str], None]


def _timeout() -> float | None:
    value = os.environ.get(TIMEOUT_VARIABLE)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise errors.UsageError(
            f"{TIMEOUT_VARIABLE}={value!r} is not a number of seconds",
            hint=f"set {TIMEOUT_VARIABLE} to e.g. 600, or 0 for no limit",
        ) from None
    return seconds if seconds > 0 else None


class EngineSession:
    """One engine child process holding one loaded model: ``start``, ``observe`` many times, ``close``.

    After an error inside a prompt the session stays usable (the engine reported it; the model is still loaded);
    after a crash or a hang it is closed, and every later call raises the same :class:`EngineError`.
    """

    def __init__(
        self,
        engine: str,
        model_path: Path,
        backend: EffectiveBackend,
        process: BaseProcess,
        connection: Connection,
        log_path: Path,
        timeout: float | None,
        progress: Progress | None,
    ) -> None:
        self.engine = engine
        self.model_path = model_path
        self.backend = backend
        self._process = process
        self._connection = connection
        self._log_path = log_path
        self._timeout = timeout
        self._progress = progress
        self._failure: EngineError | None = None
        self.identity: EngineIdentity
        self.builtin: tuple[str, str] | None = None

    @classmethod
    def start(
        cls,
        engine: str,
        model_path: Path,
        backend: EffectiveBackend,
        *,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> EngineSession:
        """Start the engine in a child process and load the model; a failure to do so is an EngineError.

        ``timeout`` is the longest the engine may stay silent, in seconds (0: no limit); by default it is read
        from the environment variable ``STACKLOCK_ENGINE_TIMEOUT`` (600 s when unset).
        ``progress`` is called with what the engine is doing ("loading the model ...", "running the smoke
        prompt 'capital'").
        """
        limit = _timeout() if timeout is None else timeout or None
        info = adapter_info(engine)
        if info is None or not info.capabilities.served:
            # A model loaded on this machine: a KV cache larger than its memory must not reach the allocator.
            check_kv_cache_fits(model_path, backend)
        # Forking is fast but only safe in a single-threaded process: a parent that already ran an engine holds
        # its thread pool (OpenMP), which the child inherits broken and waits on forever.
        fork = sys.platform.startswith("linux") and _single_threaded()
        context = multiprocessing.get_context("fork") if fork else multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe(duplex=True)
        _remove_stale_logs()
        handle, log_name = tempfile.mkstemp(prefix=f"{_LOG_PREFIX}{os.getpid()}-", suffix=".log")
        os.close(handle)
        log_path = Path(log_name)
        payload = {
            "engine": engine,
            "model": str(model_path),
            "backend": backend.model_dump_json(),
            "log": log_name,
        }
        process = context.Process(target=_child, args=(payload, child_end), daemon=True)
        session = cls(engine, model_path, backend, process, parent_end, log_path, limit, progress)
        try:
            process.start()
            child_end.close()
            started = session._reply("starting the engine")
        except BaseException:
            session.close()
            raise
        session.identity = EngineIdentity.model_validate_json(started["identity"])
        session.builtin = (started["builtin"][0], started["builtin"][1]) if started["builtin"] else None
        return session

    def observe(self, prompts: Sequence[RenderedSmoke], *, top_k: int) -> EngineRun:
        """Tokenize and generate every prompt, each from an empty context, with the top-k logprobs of each step."""
        if self._failure is not None:
            raise self._failure
        message = {
            "kind": "observe",
            "top_k": top_k,
            "prompts": [
                {
                    "name": prompt.name,
                    "rendered": prompt.rendered,
                    "max_tokens": prompt.max_tokens,
                    "add_bos": prompt.add_bos,
                    "sampler": prompt.sampler.model_dump_json(),
                    "decode": list(prompt.decode),
                }
                for prompt in prompts
            ],
        }
        try:
            self._connection.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            raise self._failed(self._crash("sending it the prompts")) from None
        reply = self._reply("waiting for the engine")
        return EngineRun(
            identity=self.identity,
            builtin=self.builtin,
            observations={k: Observation.model_validate_json(v) for k, v in reply["observations"].items()},
            decoded={int(k): v for k, v in reply["decoded"].items()},
        )

    def close(self) -> None:
        """Ask the engine to release the model and end; a child that does not end in time is killed."""
        if self._process.pid is not None and self._process.is_alive():
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
                self._connection.send({"kind": "close"})
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._connection.close()
        if self._failure is None:
            # A clean end: the engine's log says nothing anyone asked for.
            self._log_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # The parent's side of the conversation ----------------------------------------------------------------

    def _reply(self, doing: str) -> dict[str, Any]:
        """Wait for the child's answer, following its progress; errors, crashes and hangs raise."""
        while True:
            try:
                ready = self._connection.poll(self._timeout)
            except (EOFError, OSError):
                ready = True
            if not ready:
                self._process.kill()
                self._process.join()
                raise self._failed(
                    EngineError(
                        f"the engine ({self.engine}) did not answer for {self._timeout:g} s while {doing}",
                        hint=f"set {TIMEOUT_VARIABLE} to a longer time in seconds (0: no limit) if it is "
                        "only slow, or report the hang to the engine's authors",
                    )
                )
            try:
                received = self._connection.recv()
            except (EOFError, OSError):
                self._process.join()
                raise self._failed(self._crash(doing)) from None
            if received["kind"] == "at":
                doing = received["doing"]
                if self._progress is not None:
                    self._progress(doing)
                continue
            break
        if received["kind"] == "ok":
            return dict(received)
        if received["kind"] == "error":
            error_class = getattr(errors, received["class"], StacklockError)
            raise error_class(received["message"], hint=received["hint"])
        # An adapter bug: one line here, the traceback in the log, which is kept for a bug report.
        self._log_path.write_text(received["traceback"], encoding="utf-8")
        raise self._failed(
            EngineError(
                f"the engine adapter ({self.engine}) failed while {doing}: {received['summary']}",
                hint=f"report it to the adapter's authors with the traceback in {self._log_path}",
            )
        )

    def _failed(self, error: EngineError) -> EngineError:
        """Remember the error that ended the session: every later call raises it again."""
        self._failure = error
        return error

    def _crash(self, doing: str) -> EngineError:
        return _crash(self.engine, self._process.exitcode, doing, self._log_path)


def run_engine(
    engine: str,
    model_path: Path,
    backend: EffectiveBackend,
    prompts: Sequence[RenderedSmoke],
    *,
    top_k: int,
    progress: Progress | None = None,
) -> EngineRun:
    """Load the model once in a child process, observe every prompt, and end the process."""
    with EngineSession.start(engine, model_path, backend, progress=progress) as session:
        return session.observe(prompts, top_k=top_k)


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


# The child's side ---------------------------------------------------------------------------------------


def _malformed(engine: str, problem: str) -> EngineError:
    return EngineError(
        f"the engine adapter ({engine}) returned a malformed generation: {problem}",
        hint="report it to the adapter's authors",
    )


def _observe_checked(loaded: Any, prompt: dict[str, Any], top_k: int, engine: str) -> Observation:
    """One prompt observed, with what the adapter returned checked against the seam's contract."""
    sampler = EffectiveSampler.model_validate_json(prompt["sampler"])
    try:
        seen = observe(
            loaded,
            prompt["rendered"],
            add_bos=prompt["add_bos"],
            sampler=sampler,
            max_tokens=prompt["max_tokens"],
            # Unknown stop strings (an engine whose defaults stacklock does not know): stacklock asks for
            # none, and the engine applies whatever it applies on its own.
            stop=sampler.stop or (),
            top_k=top_k,
        )
    except ValidationError as exc:
        problem = exc.errors()[0]
        if problem["type"] == "finite_number":
            # NaN logprobs from broken weights, an infinite sampler value: the engine's output, not a bug.
            raise _unrecordable(engine, exc) from None
        where = ".".join(str(part) for part in problem["loc"])
        raise _malformed(engine, f"{where}: {problem['msg']}") from None
    generation = seen.generation
    if [step.token for step in generation.steps] != list(generation.tokens):
        raise _malformed(engine, "its steps do not match its tokens")
    if any(step.logprob > 0 or any(lp > 0 for _, lp in step.top) for step in generation.steps):
        raise _malformed(engine, "a logprob above 0")
    return seen


def _child(payload: dict[str, Any], connection: Connection) -> None:
    _die_with_parent()
    # The engine's own output goes to the log file: C code writes to file descriptor 2 directly. ggml would
    # attach gdb to print a backtrace when it aborts; that takes seconds and says nothing a user can act on.
    log = open(payload["log"], "a", encoding="utf-8", errors="replace")  # noqa: SIM115, PTH123 - kept open for the process.
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log)
    os.environ["GGML_NO_BACKTRACE"] = "1"
    name = payload["engine"]

    def doing(what: str) -> None:
        connection.send({"kind": "at", "doing": what})

    def answer(work: Callable[[], dict[str, Any]]) -> bool:
        """Send the work's result, or the error it raised; False when the session cannot go on."""
        try:
            connection.send({"kind": "ok", **work()})
        except StacklockError as exc:
            connection.send(
                {"kind": "error", "class": type(exc).__name__, "message": exc.message, "hint": exc.hint}
            )
        except Exception as exc:  # noqa: BLE001 - Anything else is an adapter bug: one line, then the traceback.
            summary = f"{type(exc).__name__}: {exc}".splitlines()[0]
            connection.send({"kind": "bug", "summary": summary, "traceback": traceback.format_exc()})
            return False
        return True

    loaded: Any = None

    def load() -> dict[str, Any]:
        nonlocal loaded
        doing("loading the engine")
        engine = load_engine(name)
        doing(f"loading the model {Path(payload['model']).name}")
        loaded = engine.load(Path(payload["model"]), EffectiveBackend.model_validate_json(payload["backend"]))
        doing("asking the engine how it would render a chat")
        builtin = loaded.builtin_chat_render([{"role": "user", "content": "Hi"}])
        return {
            "identity": loaded.identity().model_dump_json(),
            "builtin": list(builtin) if builtin else None,
        }

    def run(request: dict[str, Any]) -> dict[str, Any]:
        observations: dict[str, str] = {}
        decoded: dict[int, str] = {}
        for prompt in request["prompts"]:
            doing(f"running the smoke prompt '{prompt['name']}'")
            seen = _observe_checked(loaded, prompt, request["top_k"], name)
            generation = seen.generation
            observations[prompt["name"]] = seen.model_dump_json()
            # Explanations show tokens as text; decode the ones a report could name, while the model is here.
            wanted = {*generation.prompt_tokens, *generation.tokens, *prompt["decode"]}
            wanted |= {t for step in generation.steps for t, _ in step.top}
            decoded.update({t: loaded.detokenize([t], special=True) for t in wanted - decoded.keys()})
        return {"observations": observations, "decoded": decoded}

    try:
        if not answer(load):
            return
        if loaded is None:
            return
        while True:
            try:
                request = connection.recv()
            except EOFError:
                break
            if request["kind"] == "close" or not answer(functools.partial(run, request)):
                break
    finally:
        if loaded is not None:
            loaded.close()
        connection.close()
