"""What a stack produces for its smoke prompts, observed through shared engine sessions.

Both ``bisect`` and ``matrix`` run many variants of one lock. A variant's smoke prompts are re-rendered from its
own template and tokenizer flags (pure, no engine); the engine runs them through :func:`record_lock` on a
session shared by every variant with the same engine, model file and backend, so each such combination loads
its model once.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Self

from pydantic import Field

from stacklock import errors
from stacklock.engines.base import Observation
from stacklock.engines.runner import EngineSession, Progress
from stacklock.errors import StacklockError
from stacklock.files.digest import HashCache
from stacklock.lock.smoke import effective_add_bos, render_smoke
from stacklock.model.base import Model
from stacklock.model.lock import Lock, SmokeGolden
from stacklock.verify.compare import expectation_failure, golden_from_observation
from stacklock.verify.session import check_engine, rendered_smoke

__all__ = [
    "PromptOutcome",
    "Render",
    "SessionPool",
    "absolute",
    "check_model",
    "observe_lock",
    "render_lock_prompts",
]


class Render(Model):
    """A smoke prompt as the engine would be given it: decided without an engine."""

    name: str = Field(description="The smoke prompt.")
    rendered: str | None = Field(description="The rendered text (null: the template could not render it).")
    add_bos: bool = Field(description="Whether tokenization adds BOS.")
    error: str | None = Field(default=None, description="Why the prompt could not be rendered.")


class PromptOutcome(Model):
    """One smoke prompt's render and, when the engine ran it, what it produced."""

    render: Render = Field(description="The prompt as rendered for the engine.")
    golden: SmokeGolden | None = Field(default=None, description="What the engine produced (null: not run).")
    pieces: tuple[str, ...] = Field(default=(), description="Each generated token as text.")
    expects: bool = Field(default=False, description="Whether the prompt has an expectation.")
    expectation_failure: str | None = Field(
        default=None,
        description="Why the output fails the prompt's expectation (null: it passes or has none).",
    )


def absolute(lock: Lock, base: Path) -> Lock:
    """The lock with its model path absolute, so variants built from two locks in two directories run anywhere."""
    if lock.model.path.startswith("hf://"):
        return lock
    path = (base / lock.model.path).resolve()
    return lock.model_copy(update={"model": lock.model.model_copy(update={"path": str(path)})})


def render_lock_prompts(lock: Lock) -> tuple[Render, ...]:
    """Every smoke prompt of ``lock`` rendered with its own template and BOS decision (pure)."""
    renders = []
    for pin in lock.smoke:
        try:
            rendered = render_smoke(pin, lock.template, lock.tokenizer)
        except StacklockError as exc:
            renders.append(Render(name=pin.name, rendered=None, add_bos=False, error=exc.one_line()))
            continue
        renders.append(
            Render(name=pin.name, rendered=rendered, add_bos=effective_add_bos(pin, rendered, lock.tokenizer))
        )
    return tuple(renders)


class SessionPool:
    """Engine sessions kept open for the duration of an exploration, one per engine, model file and backend."""

    def __init__(self, progress: Progress | None = None) -> None:
        self._sessions: dict[str, EngineSession] = {}
        self._lock = threading.Lock()
        self._progress = progress
        #: How many batches the engines ran (one per observed variant): what the benchmarks count.
        self.engine_runs = 0
        #: How many engine sessions (model loads) were started.
        self.starts = 0

    def session(self, lock: Lock, base: Path) -> EngineSession:
        model = base / lock.model.path
        key = f"{lock.engine.name}\0{model.resolve()}\0{lock.backend.model_dump_json()}"
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = EngineSession.start(
                    lock.engine.name, model, lock.backend, progress=self._progress
                )
                self.starts += 1
            return self._sessions[key]

    def close(self) -> None:
        for session in self._sessions.values():
            with contextlib.suppress(Exception):
                session.close()
        self._sessions.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_model(lock: Lock, base: Path) -> None:
    """The lock's model file must be the one it pins (hashes are cached by file identity)."""
    path = base / lock.model.path
    if not path.is_file():
        raise errors.EngineError(f"model file {path} is missing, so the engine cannot run")
    if HashCache().sha256(path) != lock.model.sha256:
        raise errors.StaleLockError(
            f"{path} is not the file the lock pins (sha256 {lock.model.sha256[:12]}…)",
            hint="put the locked file back, or re-lock",
        )


def observe_lock(lock: Lock, base: Path, pool: SessionPool, *, top_k: int = 5) -> tuple[PromptOutcome, ...]:
    """Run every smoke prompt of ``lock`` that renders on the pool's session for its engine and backend.

    A prompt the template cannot render is reported by its render alone. An engine that is not installed here,
    or not the locked version, is an :class:`EngineError`. The caller has checked the model file
    (:func:`check_model`). A session observes one batch at a time: callers running variants in parallel give
    each thread its own engine/backend combinations.
    """
    renders = render_lock_prompts(lock)
    runnable = [pin for pin, r in zip(lock.smoke, renders, strict=True) if r.rendered is not None]
    observations: dict[str, Observation] = {}
    if runnable:
        check_engine(lock)
        run = pool.session(lock, base).observe([rendered_smoke(lock, pin) for pin in runnable], top_k=top_k)
        pool.engine_runs += 1
        observations = run.observations
    outcomes = []
    for pin, render in zip(lock.smoke, renders, strict=True):
        seen = observations.get(pin.name)
        golden = golden_from_observation(seen) if seen is not None else None
        failure = expectation_failure(pin.expect, golden.text) if golden is not None else None
        outcomes.append(
            PromptOutcome(
                render=render,
                golden=golden,
                pieces=seen.generation.pieces if seen is not None else (),
                expects=pin.expect is not None,
                expectation_failure=failure,
            )
        )
    return tuple(outcomes)
