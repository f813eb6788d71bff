"""The reporter: how the library tells its caller what it is doing. The library never prints.

Every long-running call (``lock``, ``record``, ``verify``, a registry fetch, a hub download, hashing a model
file) takes a :class:`Reporter` and calls its hooks; the base class does nothing, so a caller that wants no
output passes nothing. The CLI passes one that draws progress bars on a terminal and one line per step on a
pipe (:mod:`stacklock.cli.progress`); tests pass one that records the calls. resolvelib's ``BaseReporter`` is
the model: a class of no-op hooks, overridden as needed, so a new hook never breaks an existing reporter.

A *step* is one unit of work a user would name ("hashing model.gguf", "running the smoke prompt 'capital'");
``progress`` reports bytes or items done within the current step; ``event`` is a one-line note that is not a
step (a dropped allowance, a reused cache entry).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Reporter:
    """No-op hooks; subclass and override the ones you need. Hooks must not raise."""

    def step_started(self, name: str) -> None:
        """A step begins: ``name`` is one line, e.g. ``hashing models/x.gguf``."""

    def progress(self, step: str, done: int, total: int) -> None:
        """``done`` of ``total`` units (bytes, items) of the step ``step`` are finished; ``total`` may be 0."""

    def step_finished(self, name: str) -> None:
        """The step ``name`` ended (successfully or not: a failure raises after this hook)."""

    def event(self, message: str) -> None:
        """A one-line note that is not a step."""


NO_REPORTER = Reporter()
"""The reporter used when a caller passes none: it reports nothing."""


@contextlib.contextmanager
def step(reporter: Reporter, name: str) -> Iterator[None]:
    """Report ``name`` as one step around a block: finished is reported even when the block raises."""
    reporter.step_started(name)
    try:
        yield
    finally:
        reporter.step_finished(name)
