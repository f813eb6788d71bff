"""Run one untrusted computation in a forked child with a hard deadline and a memory cap.

The sandbox's own limits are checked between template nodes; a single filter call (``wordwrap(1)`` on a
megabyte, ``sum`` of ten thousand lists) runs inside C or library code where no check can reach it. A forked
child is stoppable wherever it is: the parent kills it at the deadline, and ``RLIMIT_AS`` turns a runaway
allocation into a ``MemoryError`` (or the child's death) instead of the machine's memory.

Fork is cheap here (copy-on-write; the template is already in memory) and needs no warm-up: on the Gemma
template a forked render costs a few milliseconds over an in-process one (``benchmarks/bench_reliability.py``).
Where there is no ``fork`` (Windows) the computation runs in-process under the sandbox's own limits.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import select
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from stacklock.errors import RenderLimitError, TemplateError

T = TypeVar("T")

MEMORY_CAP_BYTES: Final = 256 << 20
"""Address space a render may add to the process it was forked from: a chat template's render needs a few MiB;
the cap keeps a whole run within 300 MB of a bare ``stacklock --help`` (issue 13)."""
_MAX_RESULT_BYTES: Final = 64 << 20


def _address_space() -> int:
    with Path("/proc/self/statm").open(encoding="ascii") as statm:
        pages = int(statm.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _child(func: Callable[[], T], write_fd: int, memory: int) -> None:
    code = 0
    try:
        with contextlib.suppress(OSError, ValueError):
            limit = _address_space() + memory
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            outcome: tuple[str, object] = ("ok", func())
        except TemplateError as exc:
            outcome = ("error", (exc.message, exc.hint, isinstance(exc, RenderLimitError)))
        except MemoryError:
            outcome = ("memory", None)
        except BaseException as exc:  # noqa: BLE001 - A bug: reported to the parent, which raises it.
            outcome = ("bug", f"{type(exc).__name__}: {exc}")
        data = pickle.dumps(outcome)
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(data)
    except BaseException:  # noqa: BLE001 - The child never returns into the parent's code.
        code = 1
    finally:
        os._exit(code)


def run_bounded(func: Callable[[], T], *, seconds: float, label: str, memory: int = MEMORY_CAP_BYTES) -> T:
    """``func()`` in a forked child: its result, its :class:`TemplateError`, or one for time and memory."""
    if not hasattr(os, "fork") or not Path("/proc/self/statm").exists():
        return func()
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns that fork in a threaded process may deadlock the child; the child here only
        # renders Jinja (no locks that other threads hold) and always ends in os._exit.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected.
        os.close(read_fd)
        _child(func, write_fd, memory)
    os.close(write_fd)
    chunks: list[bytes] = []
    size = 0
    deadline = time.monotonic() + seconds
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                timed_out = True
                break
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > _MAX_RESULT_BYTES:
                raise RenderLimitError(
                    f"{label}: the render's result is larger than {_MAX_RESULT_BYTES >> 20} MiB"
                )
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        raise RenderLimitError(
            f"{label}: rendering exceeded {seconds:g} s",
            hint="the template loops or computes too long; check its loops and filters",
        )
    if not chunks:
        # Killed by the memory cap (or a crash) before it could report.
        raise RenderLimitError(
            f"{label}: rendering died (status {status}), most likely over the memory cap of {memory >> 20} MiB",
            hint="the template builds a runaway value; check its loops and filters",
        )
    kind, value = pickle.loads(b"".join(chunks))  # noqa: S301 - our own child's bytes, over our own pipe.
    if kind == "ok":
        return value  # type: ignore[no-any-return]
    if kind == "error":
        message, hint, limit = value
        raise (RenderLimitError if limit else TemplateError)(message, hint=hint)
    if kind == "memory":
        raise RenderLimitError(
            f"{label}: rendering ran out of its memory cap of {memory >> 20} MiB",
            hint="the template builds a runaway value; check its loops and filters",
        )
    raise RuntimeError(f"{label}: the render worker failed: {value}")
