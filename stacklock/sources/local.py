"""Local files named by a manifest or a lock, confined to the project directory.

A manifest is untrusted input: a pull request that edits ``llmstack.toml`` must not make ``stacklock lock`` copy
``/proc/self/environ`` (the CI job's secrets) or ``../../.ssh/id_rsa`` into a committed lock. So every local
source (model, template, registry directory) goes through :func:`confine`: it resolves inside the manifest's
directory, or inside a directory the *user* allowed outside the manifest:

- ``STACKLOCK_ALLOW_PATHS=/models:/data`` (``os.pathsep``-separated directories) in the environment;
- ``allow-paths = ["/models"]`` in ``$XDG_CONFIG_HOME/stacklock/config.toml`` (``~/.config/...``);
- ``stacklock --allow-outside-paths ...``, which allows every directory (it sets the variable to ``/``).

Pseudo file systems (``/proc``, ``/sys``, ``/dev``) are refused even then: their "regular" files are process
memory and environment. Files stacklock reads as text (manifest, lock, templates, certificates) go through
:func:`read_text_file`, which refuses FIFOs, devices and directories without blocking and bounds the bytes read.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Final

from stacklock.errors import SourceError, StacklockError

ALLOW_ENV: Final = "STACKLOCK_ALLOW_PATHS"
MAX_TEXT_BYTES: Final = 16 << 20
"""The largest manifest, lock, template or certificate read: far above any real one, far below memory."""
MAX_PATH_CHARS: Final = 4096
_PSEUDO: Final = ("/proc", "/sys", "/dev")
_ALLOW_HINT: Final = (
    "move it into the project directory, or allow its directory yourself (not in the manifest): "
    f"{ALLOW_ENV}=DIR, allow-paths in ~/.config/stacklock/config.toml, or --allow-outside-paths"
)


def config_path() -> Path:
    """The user's own configuration: ``$XDG_CONFIG_HOME/stacklock/config.toml`` (``~/.config/...``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "stacklock" / "config.toml"


def _config_roots() -> list[str]:
    path = config_path()
    try:
        data = tomllib.loads(read_text_file(path, str(path), SourceError))
    except (SourceError, tomllib.TOMLDecodeError):
        # No config, or a broken one: nothing extra is allowed, which is the safe reading.
        return []
    roots = data.get("allow-paths", [])
    return [r for r in roots if isinstance(r, str)] if isinstance(roots, list) else []


def allowed_roots() -> tuple[Path, ...]:
    """The directories outside the project the user allowed, resolved."""
    given = [r for r in os.environ.get(ALLOW_ENV, "").split(os.pathsep) if r]
    return tuple(Path(r).expanduser().resolve() for r in [*given, *_config_roots()])


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_text(text: str, where: str) -> None:
    if not text or text == ".":
        raise SourceError(f"{where}: empty path '{text}'", hint="name a file relative to llmstack.toml")
    if "\x00" in text:
        raise SourceError(f"{where}: the path contains a NUL byte", hint="remove it")
    if len(text) > MAX_PATH_CHARS:
        raise SourceError(
            f"{where}: the path is {len(text)} characters long (at most {MAX_PATH_CHARS})",
            hint="use a shorter path",
        )


def confine(text: str, base_dir: Path, where: str) -> Path:
    """The path of a local source that resolves to a regular file inside the project or an allowed directory.

    ``where`` is the manifest key (``model.source``) that every refusal names.
    """
    _check_text(text, where)
    given = Path(text)
    project = base_dir.resolve()
    try:
        resolved = (given if given.is_absolute() else project / given).resolve()
    except (OSError, RuntimeError) as exc:  # A symlink loop.
        raise SourceError(f"{where}: {text}: cannot resolve the path ({exc})") from None
    if any(_inside(resolved, Path(p)) for p in _PSEUDO):
        raise SourceError(
            f"{where}: {text} is in a pseudo file system ({resolved}); stacklock never reads it"
        )
    allowed = allowed_roots()
    if given.is_absolute() and not any(_inside(resolved, root) for root in allowed):
        raise SourceError(
            f"{where}: {text} is an absolute path outside the allowed directories", hint=_ALLOW_HINT
        )
    if not any(_inside(resolved, root) for root in (project, *allowed)):
        raise SourceError(
            f"{where}: {text} resolves to {resolved}, outside the project directory {project}",
            hint=_ALLOW_HINT,
        )
    try:
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        raise SourceError(
            f"{where}: file not found: {text}",
            hint="fix the path (relative to llmstack.toml) or create the file",
        ) from None
    except OSError as exc:
        raise SourceError(f"{where}: {text}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise SourceError(f"{where}: {text} is {_kind(mode)}, not a regular file", hint="name a file")
    # The path as written (not resolved): a lock pins 'models/x.gguf' even when an allowed symlink leads on.
    return given if given.is_absolute() else base_dir / given


def confine_dir(text: str, base_dir: Path, where: str) -> Path:
    """Like :func:`confine`, for a directory (a local registry)."""
    _check_text(text, where)
    given = Path(text).expanduser()
    project = base_dir.resolve()
    resolved = (given if given.is_absolute() else project / given).resolve()
    if any(_inside(resolved, Path(p)) for p in _PSEUDO) or not any(
        _inside(resolved, root) for root in (project, *allowed_roots())
    ):
        raise SourceError(
            f"{where}: {text} resolves to {resolved}, outside the project directory {project}",
            hint=_ALLOW_HINT,
        )
    return resolved


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def read_bytes_file(
    path: Path,
    where: str,
    error: type[StacklockError],
    *,
    limit: int = MAX_TEXT_BYTES,
    missing: str = "not found",
    hint: str | None = None,
) -> bytes:
    """The bytes of a regular file, at most ``limit`` of them.

    Opened non-blocking, so a FIFO cannot hang the open; checked with fstat on the open descriptor, so a file
    swapped for a device between a check and the open is still refused.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        # A socket cannot even be opened (ENXIO): say what it is before trying.
        if stat.S_ISSOCK(mode := path.stat().st_mode):
            raise error(f"{where}: is {_kind(mode)}, not a regular file", hint="give a regular file")
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{where}: {missing}", hint=hint) from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise error(f"{where}: cannot open it ({reason})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{where}: is {_kind(mode)}, not a regular file", hint="give a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise error(f"{where}: cannot read it ({exc.strerror})") from None
    finally:
        os.close(fd)
    if size > limit:
        raise error(f"{where}: larger than {limit >> 20} MiB; stacklock reads no text file that large")
    return b"".join(chunks)


def read_text_file(
    path: Path,
    where: str,
    error: type[StacklockError],
    *,
    limit: int = MAX_TEXT_BYTES,
    missing: str = "not found",
    hint: str | None = None,
) -> str:
    """The UTF-8 text of a regular file, bounded like :func:`read_bytes_file`."""
    data = read_bytes_file(path, where, error, limit=limit, missing=missing, hint=hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text (byte {exc.start})", hint="save it as UTF-8") from None
