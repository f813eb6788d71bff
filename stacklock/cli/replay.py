"""The replay cache: a command's recorded output, printed again while nothing the command reads has changed.

`lock --check`, `check`, `inspect --json` and `lock` of an unchanged stack run far more often than their
inputs change (in every pre-commit hook and CI job). As ruff and mypy do, the first run records what it
printed and its exit code under a key; a later run with the same key prints the same bytes, in the same order,
and exits with the same code, without loading typer, pydantic, numpy or the engine code. This module uses the
standard library only, so that a hit costs little more than the interpreter's start.

The key is everything the command reads, and the cache is skipped wherever that cannot be told cheaply:

- the command line, the working directory, the interpreter, the whole environment (hashed, never stored: it
  may hold secrets), and whether stdout and stderr are terminals (and their size);
- stacklock itself (every file of the package by identity, the bundled registry by content) and the installed
  distributions (each metadata directory on ``sys.path`` by name and identity: installing, upgrading or
  removing a package changes them, and with them the engine's version and the adapters' entry points);
- the user's configuration (allowed paths), the manifest and the lock by content, every ``file:`` source and
  every local registry directory by content;
- the hash and header caches (a run that fills them prints a step that the next run does not);
- model files (the model and its split parts) by identity: device, inode, size, mtime_ns and ctime_ns, like the
  hash cache, plus ctime, which every write changes and no user can set back.

A manifest that names anything remote (``hf://``, ``registry://``, a git or archive registry) is not replayed,
nor is any other command line (global options included). An entry is recorded only when the command exited
0 or 1, its key was the same before and after it ran, and no model file changed in the :data:`RACY_S` seconds
before it started (a write in the same clock tick could keep the times: git's "racily clean" case). A missing,
corrupt or foreign entry is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple, TextIO

from stacklock.errors import StacklockError
from stacklock.files.cache_dir import default_cache_dir
from stacklock.registry.location import bundled_registry_path, local_path, source_kind
from stacklock.sources.local import config_path

FORMAT: Final = 1
"""The entry layout; an entry of another format is a miss."""
RACY_S: Final = 2.0
"""A model file whose times are this recent when a command starts is not trusted by identity."""
MAX_READ_BYTES: Final = 64 << 20
"""Inputs read by content (manifest, lock, templates, registry files) larger than this are never replayed."""
REPLAYED_CODES: Final = frozenset({0, 1})
"""Verdicts (fresh or stale, ok or findings); errors are not recorded, they may be passing ones."""
_VOLATILE_ENV: Final = frozenset({"OLDPWD", "_"})
"""Set by the shell on every `cd` or command; stacklock reads neither."""
_DISTRIBUTION_FILES: Final = (".dist-info", ".egg-info", ".egg-link", ".pth")
_PACKAGE: Final = Path(__file__).resolve().parent.parent
_LOCK_COMMANDS: Final = frozenset({"lock", "check"})

Identity = list[Any]
"""A file's resolved path, device, inode, size, mtime_ns and ctime_ns; None when it does not exist."""


class Command(NamedTuple):
    """A command line the cache may answer (a named tuple: ``dataclasses`` costs a replay a fifth of its time)."""

    args: tuple[str, ...]
    name: str
    """``lock``, ``check`` or ``inspect``."""
    manifest: Path = Path("llmstack.toml")
    gguf: Path | None = None


def parse_command(args: Sequence[str]) -> Command | None:
    """The command line when it is one the cache may answer, else None (typer parses every other)."""
    if not args:
        return None
    name, rest = args[0], list(args[1:])
    if name == "inspect":
        paths = [a for a in rest if a != "--json"]
        if len(rest) == 2 and len(paths) == 1 and not paths[0].startswith("-"):
            return Command(tuple(args), name, gguf=Path(paths[0]))
        return None
    if name not in _LOCK_COMMANDS:
        return None
    flags = {"lock": {"--check", "--offline"}, "check": {"--offline"}}[name]
    values = {"--manifest": "--manifest", "-m": "--manifest"} | (
        {"--format": "--format"} if name == "check" else {}
    )
    seen: dict[str, str] = {}
    while rest:
        arg = rest.pop(0)
        option, equals, value = arg.partition("=")
        if arg in flags:
            option, value = arg, ""
        elif option in values and equals:
            option = values[option]
        elif arg in values and rest and not rest[0].startswith("-"):
            option, value = values[arg], rest.pop(0)
        else:
            return None
        if option in seen:
            return None
        seen[option] = value
    return Command(tuple(args), name, manifest=Path(seen.get("--manifest") or "llmstack.toml"))


def replay(command: Command) -> int | None:
    """Print the recorded output of ``command`` and return its exit code; None when there is no valid entry."""
    inputs = _inputs(command)
    if inputs is None:
        return None
    try:
        entry = json.loads(_read_small(_entry_path(command)) or b"null")
        if not _matches(entry, inputs[0]):
            return None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    # Validated whole before the first byte is written: a replay never stops half-way into a full run.
    streams = {"out": sys.stdout, "err": sys.stderr}
    for event in entry["output"]:
        if event[0] == "w":
            streams[event[1]].write(event[2])
        else:
            streams[event[1]].flush()
    return int(entry["code"])


def run_recorded(command: Command, run: Callable[[], None]) -> None:
    """Run the command (``run`` exits through SystemExit, as typer does) and record its output when allowed."""
    start_ns = time.time_ns()
    before = _inputs(command)
    if before is None:
        run()
        return
    events: list[list[str]] = []
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, "out", events), _Tee(err, "err", events)
    code: object = None
    try:
        run()
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code
        raise
    finally:
        sys.stdout, sys.stderr = out, err
        if code in REPLAYED_CODES:
            _record(command, before, events, code, start_ns)


def _record(
    command: Command,
    before: tuple[dict[str, Any], dict[str, Identity | None]],
    events: list[list[str]],
    code: object,
    start_ns: int,
) -> None:
    after = _inputs(command)
    if after != before:
        return  # Something changed while it ran: the output may belong to neither state.
    key = before[0]
    files = before[1] if command.gguf is None else _inspected_files(command.gguf, events)
    if files is None:
        return
    racy = start_ns - int(RACY_S * 1e9)
    if any(i is None or max(i[4], i[5]) >= racy for i in files.values()):
        return
    entry = {"format": FORMAT, "key": key | {"files": files}, "output": events, "code": code}
    from stacklock.files.atomic import write_text_atomic  # noqa: PLC0415 - only a recording run writes.

    path = _entry_path(command)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(entry))
    except (OSError, StacklockError):
        pass  # A read-only cache only costs the next run its speed.


def _matches(entry: Any, key: dict[str, Any]) -> bool:
    """The entry is ours and was recorded under this key, and its model files are as they were."""
    if (
        not isinstance(entry, dict)
        or entry.get("format") != FORMAT
        or entry.get("code") not in REPLAYED_CODES
    ):
        return False
    recorded = entry.get("key")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), dict):
        return False
    files = recorded["files"]
    if {k: v for k, v in recorded.items() if k != "files"} != key:
        return False
    if any(_identity(Path(p)) != identity for p, identity in files.items()):
        return False
    events = entry.get("output")
    return isinstance(events, list) and all(_valid_event(e) for e in events)


def _valid_event(event: Any) -> bool:
    if not isinstance(event, list) or len(event) not in (2, 3) or event[1] not in ("out", "err"):
        return False
    return (event[0] == "w" and len(event) == 3 and isinstance(event[2], str)) or (
        event[0] == "f" and len(event) == 2
    )


def _entry_path(command: Command) -> Path:
    name = hashlib.sha256(json.dumps([str(Path.cwd()), *command.args]).encode()).hexdigest()[:32]
    return default_cache_dir() / "replay" / f"{name}.json"


class _Tee(io.TextIOBase):
    """A text stream that writes through to ``stream`` and records each write and flush, in order."""

    def __init__(self, stream: TextIO, name: str, events: list[list[str]]) -> None:
        super().__init__()
        self._stream, self._name, self._events = stream, name, events

    @property
    def encoding(self) -> str:  # type: ignore[override]  # The underlying stream's, for click's checks.
        return self._stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._stream.errors

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # click probes with b"" to tell a binary stream; this is a text one.
            raise TypeError("write() argument must be str")
        written = self._stream.write(text)
        if text:
            self._events.append(["w", self._name, text])
        return written

    def flush(self) -> None:
        self._stream.flush()
        self._events.append(["f", self._name])


def _inspected_files(gguf: Path, events: list[list[str]]) -> dict[str, Identity | None] | None:
    """The GGUF file and its split parts, as `inspect --json` printed them."""
    printed = "".join(e[2] for e in events if e[0] == "w" and e[1] == "out")
    try:
        parts = json.loads(printed)["parts"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        return None
    return {str(p): _identity(Path(p)) for p in [str(gguf), *parts]}


# -- The key --------------------------------------------------------------------------------------------------


def _inputs(command: Command) -> tuple[dict[str, Any], dict[str, Identity | None]] | None:
    """The command's key and its model files by identity; None when the command reads what is not keyed."""
    try:
        return _keyed_inputs(command)
    except (
        OSError,
        StacklockError,
        RecursionError,
    ):  # No working directory, a hostile tree: the full run says.
        return None


def _keyed_inputs(command: Command) -> tuple[dict[str, Any], dict[str, Identity | None]] | None:
    key: dict[str, Any] = {
        "command": [str(Path.cwd()), *command.args],
        "python": [sys.executable, sys.version],
        "environment": _digest(sorted((k, v) for k, v in os.environ.items() if k not in _VOLATILE_ENV)),
        "terminal": _terminal(),
        "installed": _installed(),
        "config": _content(config_path()),
        # A run that fills the hash or header cache prints a step ("hashing ...") that the next one does not.
        "caches": [
            _content(default_cache_dir() / "hashes.json"),
            _tree(default_cache_dir() / "headers", by_content=False),
        ],
    }
    key["stacklock"] = _digest([_tree(_PACKAGE, by_content=False), _tree(bundled_registry_path())])
    if command.gguf is not None:
        return key, {str(command.gguf): _identity(command.gguf)}
    return _stack_inputs(command, key)


def _stack_inputs(
    command: Command, key: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Identity | None]] | None:
    manifest_path = command.manifest
    lock_path = manifest_path.with_name("llmstack.lock")
    base = manifest_path.parent
    try:
        manifest_bytes, lock_bytes = _read_small(manifest_path), _read_small(lock_path)
        if manifest_bytes is None or lock_bytes is None:
            return None
        manifest, lock = tomllib.loads(manifest_bytes.decode()), tomllib.loads(lock_bytes.decode())
        model_source = manifest["model"]["source"]
        registries = manifest.get("registry", [])
        parts = lock["model"].get("parts", [])
        part_paths = [str(base / p["path"]) for p in parts]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None  # No lock (`check` then resolves the manifest), or input the command itself reports.
    if not isinstance(model_source, str) or not isinstance(registries, list):
        return None
    key |= {"manifest": _digest(manifest_bytes), "lock": _digest(lock_bytes)}
    local_files = []
    for text in _strings({k: v for k, v in manifest.items() if k != "registry"}):
        if "://" in text:
            return None  # A hub or registry source: its current state needs the network or the registry code.
        if text.startswith("file:"):
            path = base / text.removeprefix("file:")
            # Where it leads too: a symlink out of the project is refused even when its target's bytes match.
            local_files.append([os.path.realpath(path), _content(path)])
    key["sources"] = local_files
    trees = []
    for registry in registries:
        url = registry.get("url") if isinstance(registry, dict) else None
        if not isinstance(url, str) or source_kind(url) != "directory":
            return None
        trees.append(_tree(local_path(url, base)))
    key["registries"] = _digest(trees)
    model = base / model_source.removeprefix("file:")
    return key, {p: _identity(Path(p)) for p in [str(model), *part_paths]}


def _installed() -> str:
    """The distributions on ``sys.path``: their metadata directories (named with the version, replaced on every
    install) and ``.pth`` files, by identity. Not the directories themselves: the script's and the working
    directory change all the time."""
    found = []
    for entry in sys.path:
        try:
            names = sorted(p.name for p in Path(entry or ".").iterdir())
        except OSError:
            continue
        found += [[entry, n, _stat(Path(entry, n))] for n in names if n.endswith(_DISTRIBUTION_FILES)]
    return _digest(found)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _terminal() -> list[Any]:
    ttys = [sys.stdout.isatty(), sys.stderr.isatty()]
    size = None
    if any(ttys):
        try:
            size = list(os.get_terminal_size(sys.stderr.fileno() if ttys[1] else sys.stdout.fileno()))
        except (OSError, ValueError):
            size = None
    return [*ttys, size, os.environ.get("COLUMNS")]


def _digest(value: Any) -> str:
    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    return hashlib.sha256(data).hexdigest()


def _stat(path: Path) -> list[int] | None:
    try:
        s = path.stat()
    except OSError:
        return None
    return [s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns]


def _identity(path: Path) -> Identity | None:
    found = _stat(path)
    return None if found is None else [os.path.realpath(path), *found]


def _content(path: Path) -> str | None:
    data = _read_small(path)
    return None if data is None else _digest(data)


def _read_small(path: Path) -> bytes | None:
    """A regular file's bytes, or None: a FIFO or a device is never opened for a blocking read, and a file
    over :data:`MAX_READ_BYTES` is left to the full run (which bounds what it reads)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_READ_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(MAX_READ_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def _tree(root: Path, *, by_content: bool = True) -> str:
    """Every entry under ``root`` (hidden ones and bytecode skipped): regular files by content or identity,
    symlinks by target."""
    entries: list[Any] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                entries.append([rel, "->", str(path.readlink())])
            else:
                entries.append([rel, _content(path) if by_content else _stat(path)])
    return _digest([os.path.realpath(root), entries])
