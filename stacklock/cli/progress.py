"""The CLI's rendering of the library's reporter: progress bars on a terminal, one line per step elsewhere.

On a terminal (stderr is a TTY and ``CI`` is not set) each running step is a rich progress bar (hashing and
downloads in bytes, smoke prompts counted), cleared when it ends. On a pipe or in CI logs a step is one plain
line when it starts, with no control codes, so logs stay readable and diffable.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING

from stacklock.reporter import Reporter

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

_REDRAW_S = 0.1

# Steps whose progress counts bytes; the others count items (smoke prompts).
_BYTE_STEPS = ("hashing ", "fetching ")


class LineReporter(Reporter):
    """One line per step and per event, written when it starts: for pipes and CI logs."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def step_started(self, name: str) -> None:
        self._write(name)

    def event(self, message: str) -> None:
        self._write(message)

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()


class BarReporter(Reporter):
    """A rich progress bar per running step, removed when the step ends: for terminals.

    The bars are redrawn from the hooks, not by rich's refresh thread: the engine's child process is forked
    only from a single-threaded process (see :mod:`stacklock.engines.runner`), and a thread would force the
    slower spawn. Progress redraws at most ten times a second, so hashing a large file is not slowed.
    """

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}
        self._totals: dict[str, int] = {}
        self._drawn = 0.0

    def step_started(self, name: str) -> None:
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(name, total=None)
            self._draw()

    def progress(self, step: str, done: int, total: int) -> None:
        task = self._tasks.get(step)
        if task is None:
            return
        self._progress.update(task, completed=done, total=total or None)
        news = self._totals.get(step) != total or done >= total
        self._totals[step] = total
        if news or time.monotonic() - self._drawn >= _REDRAW_S:
            self._draw()

    def step_finished(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        self._totals.pop(name, None)
        if task is not None:
            self._progress.remove_task(task)
            self._draw()

    def event(self, message: str) -> None:
        self._progress.console.print(message, markup=False, highlight=False)

    def _draw(self) -> None:
        self._progress.refresh()
        self._drawn = time.monotonic()


def draws_bars(console: Console) -> bool:
    """Bars only on an interactive terminal; CI services set ``CI`` and keep their logs."""
    return console.is_terminal and not os.environ.get("CI")


def _may_draw_bars(out: IO[str]) -> bool:
    """False where rich would not see a terminal either: no TTY and none of the variables that make rich
    assume one. Deciding this without rich keeps it (a sixth of a `lock --check`) off every pipe and CI log."""
    if os.environ.get("CI"):
        return False
    forced = any(os.environ.get(name) for name in ("FORCE_TERMINAL", "FORCE_COLOR", "TTY_COMPATIBLE"))
    try:
        return forced or out.isatty()
    except ValueError:  # A closed stream.
        return False


@contextlib.contextmanager
def cli_reporter(stream: IO[str] | None = None) -> Iterator[Reporter]:
    """The reporter for one command: bars on a terminal, lines on a pipe; the bars are gone when it ends."""
    out = stream if stream is not None else sys.stderr
    if not _may_draw_bars(out):
        yield LineReporter(out)
        return
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text  # noqa: PLC0415

    console = Console(file=out)
    if not draws_bars(console):
        yield LineReporter(out)
        return

    class _Amount(ProgressColumn):
        """Bytes for hashing and downloads, "2/3" for smoke prompts, nothing while the total is unknown."""

        def __init__(self) -> None:
            super().__init__()
            self._bytes = DownloadColumn()
            self._items = MofNCompleteColumn()

        def render(self, task: Task) -> Text:
            if task.total is None:
                return Text("")
            column = self._bytes if task.description.startswith(_BYTE_STEPS) else self._items
            rendered = column.render(task)
            return rendered if isinstance(rendered, Text) else Text(str(rendered))

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        _Amount(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True, auto_refresh=False) as progress:
        yield BarReporter(progress)
