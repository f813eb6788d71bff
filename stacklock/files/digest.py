"""Content hashes of model files, with a cache keyed by file identity so re-locking a multi-GB file is instant.

A GGUF file is also hashed by region in the same read loop (:func:`digest_regions`): the header (metadata and
tensor infos) by sha256, the tensor data by xxh3-128, so that a drifted file can be explained ("the metadata
changed, the tensors did not") without a second pass. The data digest explains; the whole file's sha256 is the
pin. xxh3 costs a few per cent of sha256's time where a second sha256 would double it.

The cache key is (device, inode, size, mtime_ns): a file rewritten in place, replaced by a rename, grown or
touched gets a new key, so a stale digest is never served. ``use_cache=False`` forces a re-hash (and refreshes
the cache entry).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from stacklock.errors import FileError
from stacklock.files.atomic import write_text_atomic
from stacklock.files.cache_dir import default_cache_dir
from stacklock.reporter import NO_REPORTER, Reporter, step

CHUNK = 1 << 20
CACHE_VERSION = 1


def sha256_bytes(data: bytes) -> str:
    """sha256 of bytes in stacklock's one digest format: 64 lowercase hex characters, no ``sha256:`` prefix."""
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    """sha256 of a text's UTF-8 bytes: templates, rendered prompts, locks, canonical JSON."""
    return sha256_bytes(text.encode("utf-8"))


def canonical_digest(value: str) -> str:
    """A digest as read from a file, in the one format: earlier locks prefixed ``manifest-hash`` with ``sha256:``."""
    return value.removeprefix("sha256:")


@dataclass(frozen=True, slots=True)
class FileDigests:
    """A file's sha256 and, split at ``data_offset``, the digests of its header and of its data region."""

    sha256: str
    data_offset: int
    header_sha256: str
    data_xxh3: str


def sha256_file(path: Path, reporter: Reporter = NO_REPORTER) -> str:
    """The sha256 of a file, read in 1 MiB chunks into one reused buffer."""
    return _hash_file(path, None, reporter).sha256


def digest_regions(path: Path, data_offset: int, reporter: Reporter = NO_REPORTER) -> FileDigests:
    """The file's sha256 and its region digests, split at ``data_offset``, in one read of the file."""
    return _hash_file(path, data_offset, reporter)


def _hash_file(path: Path, data_offset: int | None, reporter: Reporter) -> FileDigests:
    whole = hashlib.sha256()
    header = hashlib.sha256()
    data = xxhash.xxh3_128()
    split = -1 if data_offset is None else data_offset
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    name = f"hashing {path.name}"
    with step(reporter, name), path.open("rb", buffering=0) as handle:
        total = os.fstat(handle.fileno()).st_size
        done = 0
        readinto: Callable[[memoryview], int | None] = handle.readinto
        while n := readinto(view):
            chunk = view[:n]
            whole.update(chunk)
            if split >= 0:
                # Only the chunk that holds the split point is cut; every other goes to one region whole.
                cut = min(max(split - done, 0), n)
                if cut:
                    header.update(chunk[:cut])
                if cut < n:
                    data.update(chunk[cut:])
            done += n
            reporter.progress(name, done, total)
    return FileDigests(whole.hexdigest(), split, header.hexdigest(), data.hexdigest())


class HashCache:
    """sha256 digests keyed by file identity, stored as one small JSON file."""

    def __init__(self, directory: Path | None = None) -> None:
        self.path = (directory or default_cache_dir()) / "hashes.json"
        self._entries: dict[str, dict[str, object]] | None = None
        self._dirty = False

    @staticmethod
    def _identity(stat: os.stat_result) -> list[int]:
        return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns]

    def _load(self) -> dict[str, dict[str, object]]:
        if self._entries is None:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                ok = isinstance(data, dict) and data.get("version") == CACHE_VERSION
                self._entries = data["entries"] if ok else {}
            except (OSError, ValueError, KeyError, TypeError):
                # A missing or damaged cache only costs a re-hash; it is never an error.
                self._entries = {}
        return self._entries

    def sha256(self, path: Path, *, use_cache: bool = True, reporter: Reporter = NO_REPORTER) -> str:
        key = str(path.resolve())
        identity = self._identity(path.stat())
        entries = self._load()
        entry = entries.get(key)
        if use_cache and entry is not None and entry.get("identity") == identity:
            return str(entry["sha256"])
        digest = sha256_file(path, reporter)
        # The file may have changed while it was read; only cache a digest whose identity held throughout.
        if self._identity(path.stat()) == identity:
            entries[key] = {"identity": identity, "sha256": digest}
            self._dirty = True
        return digest

    def digests(
        self,
        path: Path,
        data_offset: Callable[[Path], int],
        *,
        use_cache: bool = True,
        reporter: Reporter = NO_REPORTER,
    ) -> FileDigests:
        """The file's sha256 and region digests; ``data_offset`` is asked only when the file must be hashed."""
        key = str(path.resolve())
        identity = self._identity(path.stat())
        entries = self._load()
        entry = entries.get(key)
        regions = entry.get("regions") if use_cache and entry is not None else None
        if isinstance(regions, dict) and entry is not None and entry.get("identity") == identity:
            return FileDigests(
                str(entry["sha256"]),
                int(regions["data-offset"]),
                str(regions["header-sha256"]),
                str(regions["data-xxh3"]),
            )
        found = digest_regions(path, data_offset(path), reporter)
        if self._identity(path.stat()) == identity:
            entries[key] = {
                "identity": identity,
                "sha256": found.sha256,
                "regions": {
                    "data-offset": found.data_offset,
                    "header-sha256": found.header_sha256,
                    "data-xxh3": found.data_xxh3,
                },
            }
            self._dirty = True
        return found

    def save(self) -> None:
        """Write the cache if it changed. A read-only cache directory is not an error."""
        if not self._dirty or self._entries is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            body = json.dumps({"version": CACHE_VERSION, "entries": self._entries}, sort_keys=True)
            write_text_atomic(self.path, body)
            self._dirty = False
        except (OSError, FileError):
            # Only costs a re-hash next time.
            pass
