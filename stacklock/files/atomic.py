"""Atomic file writes: a temporary file in the same directory, flushed to disk, then renamed over the target.

A crash or an error at any point leaves either the old file or the new one, never a half-written or missing one.
A write the file system refuses (a directory in the way, no permission, a read-only or full disk) is a one-line
:class:`~stacklock.errors.FileError`, not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from stacklock.errors import FileError

# What a user can do about the file system errors a write or read of their path can meet.
_HINTS = {
    errno.ENOSPC: "free some disk space and run it again",
    errno.EDQUOT: "free some disk quota and run it again",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "you lack permission there; choose a writable location or fix the permissions",
    errno.EPERM: "you lack permission there; choose a writable location or fix the permissions",
    errno.EISDIR: "that path is a directory; give the path of a file",
    errno.ENOTDIR: "a part of that path is a file, not a directory; fix the path",
    errno.ENOENT: "the directory does not exist; create it or fix the path",
}


def describe_os_error(exc: OSError) -> str:
    """An OSError as one line: its reason, and the file it names."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason} ({exc.filename})" if exc.filename else reason


def file_error(action: str, path: Path, exc: OSError) -> FileError:
    """The one-line error for a user path the file system refused: ``cannot write llmstack.lock: ...``."""
    return FileError(
        f"cannot {action} {path}: {exc.strerror or type(exc).__name__}",
        hint=_HINTS.get(exc.errno or 0, "check the path and the file system"),
    )


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    try:
        _write_bytes_atomic(path, data)
    except OSError as exc:
        raise file_error("write", path, exc) from None


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # Keep the permissions of the file we replace, so a lock stays as readable as it was.
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, path.stat().st_mode & 0o777)
        if not path.exists():
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename is durable only once the directory entry is flushed.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_text(path: Path) -> str:
    """A user's text file as UTF-8. A path the file system refuses (a directory, no permission) is a FileError;
    a missing file (FileNotFoundError) and bad UTF-8 (UnicodeDecodeError) go to the caller, which knows what the
    file is for and says how to make it.
    """
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise file_error("read", path, exc) from None
