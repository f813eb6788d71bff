"""Hugging Face hub files, through huggingface-hub's own client: pinned, measured and read without downloading.

A lock of a remote model must cost O(header), not O(file): one ``HEAD`` per file gives the commit a revision
resolves to and the file's LFS digest (sha256) and size (:func:`stat_hub_file`); the GGUF header is read with
HTTP range requests of only its bytes (:func:`read_remote_model`). Verify downloads through the hub cache at the
locked commit and checks the locked sha256 before the file is used (:func:`download_hub_file`).

Every failure is one line: a missing repository, revision or file is bad input (exit 2); no access, rate limits,
server errors, timeouts and truncated bodies are the network (exit 3), after bounded retries with backoff.
Tokens come from ``HF_TOKEN`` (or the token file) through huggingface-hub and are never printed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from stacklock.errors import GGUFError, NetworkError, SourceError
from stacklock.files.atomic import describe_os_error
from stacklock.files.digest import HashCache
from stacklock.reporter import NO_REPORTER, Reporter, step

if TYPE_CHECKING:
    from stacklock.gguf.reader import GGUFFile

#: The first range read of a GGUF header; real vocabularies make headers of 1 to 10 MB.
FIRST_READ = 512 << 10
#: Each further read grows the prefix by at least this fraction, so at most 10% more than the header is read.
GROWTH = 10
#: Headers larger than this are refused rather than read: a bound on memory sized by a remote file.
MAX_HEADER = 256 << 20
#: Retries of one request on 429, 5xx and timeouts (huggingface-hub's backoff), and the waits between them.
RETRIES = 3
FIRST_WAIT_S = 0.5
MAX_WAIT_S = 4.0
#: Our own cap on the time a header read may take, whatever the per-request timeouts.
HEADER_DEADLINE_S = 120.0

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def env_true(name: str) -> bool:
    # The spellings huggingface_hub accepts for its own switches.
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def _env_seconds(name: str, default: float) -> float:
    # huggingface_hub reads its timeouts once, at import; reading them per call lets a test or a long-lived
    # process change them.
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def hub_cache_dir() -> str | None:
    # huggingface_hub reads these once, when it is first imported; reading them here, per call, lets a
    # long-lived process (or a test) point stacklock at another cache without re-importing the client.
    if cache := os.environ.get("HF_HUB_CACHE"):
        return cache
    if home := os.environ.get("HF_HOME"):
        return str(Path(home) / "hub")
    return None


def hub_endpoint(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.match(revision))


def split_part_names(path: str) -> tuple[str, ...]:
    """Every part of a split GGUF (``NAME-00001-of-00003.gguf``) in order, or just ``path``."""
    posix = PurePosixPath(path)
    match = _SPLIT.match(posix.name)
    if match is None:
        return (path,)
    count = int(match["count"])
    if count == 0 or int(match["no"]) != 1:
        raise SourceError(
            f"model.source: {path} is part {int(match['no'])} of {count}",
            hint="name the first part (-00001-of-...) as the model source",
        )
    return tuple(
        str(posix.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf")) for i in range(1, count + 1)
    )


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository at a commit, as the hub describes it (no byte of it downloaded)."""

    repo: str
    commit: str
    path: str
    sha256: str | None
    """The LFS digest; None for a small file kept in git (the hub gives only its git oid)."""
    size: int
    url: str
    """Where its bytes are served (the CDN for LFS files)."""

    @property
    def location(self) -> str:
        return f"hf://{self.repo}@{self.commit}/{self.path}"


class HubFileMissingError(SourceError):
    """The repository and revision exist, the file does not (a caller may try another name)."""


@contextlib.contextmanager
def hub_errors(where: str) -> Iterator[None]:
    """Turn huggingface-hub's and the HTTP client's exceptions into one-line stacklock errors."""
    import httpx2  # noqa: PLC0415 - huggingface_hub's HTTP client; slow to import, only hub sources need it.
    from huggingface_hub.errors import (  # noqa: PLC0415
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    # huggingface_hub logs each retry to stderr; the error below says it in one line instead.
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    except GatedRepoError:
        raise NetworkError(
            f"{where}: the repository is gated and this token has no access ({token})",
            hint="accept the conditions on the repository's page, then set HF_TOKEN to a token of that account",
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{where}: repository not found (or private)",
            hint="check the owner/repo name (a private repository needs HF_TOKEN)",
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"{where}: revision not found", hint="check the branch, tag or commit") from None
    except RemoteEntryNotFoundError:
        raise HubFileMissingError(
            f"{where}: file not found in the repository", hint="check the path"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        # LocalEntryNotFoundError is also an EntryNotFoundError: caught by its own class, after the remote one.
        raise NetworkError(
            f"{where}: not in the local hub cache and the hub is not reachable",
            hint="go online once to download it, or set HF_ENDPOINT",
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise NetworkError(
                f"{where}: the hub refused access (HTTP {status}; {token})",
                hint="set HF_TOKEN to a token that can read the repository",
            ) from None
        if status == 429:
            raise NetworkError(
                f"{where}: rate limited by the hub (HTTP 429) after {RETRIES} retries",
                hint="wait and retry, or set HF_TOKEN (authenticated requests have higher limits)",
            ) from None
        raise NetworkError(
            f"{where}: the hub answered HTTP {status} after {RETRIES} retries",
            hint="retry later, or check HF_ENDPOINT",
        ) from None
    except httpx2.TimeoutException:
        raise NetworkError(
            f"{where}: the hub did not answer in time after {RETRIES} retries",
            hint="retry, or raise HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT (seconds)",
        ) from None
    except httpx2.HTTPError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NetworkError(f"{where}: {reason}", hint="check the network or HF_ENDPOINT") from None
    except OSError as exc:
        if exc.errno is None:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise NetworkError(f"{where}: {reason}", hint="check the network or HF_ENDPOINT") from None
        # An OSError with an errno is the local file system (the hub cache full, read-only or not a directory),
        # not the network: retrying online would not help.
        raise SourceError(
            f"{where}: cannot write the hub cache: {describe_os_error(exc)}",
            hint="free disk space, or point HF_HUB_CACHE at a writable directory",
        ) from None
    finally:
        hub_logger.setLevel(level)


#: Seconds the hub has to answer a first probe before stacklock calls it unreachable.
HUB_PROBE_TIMEOUT_S = 5.0


def _require_reachable(where: str, endpoint: str) -> None:
    """Fail in seconds when nothing answers at the hub's address (any HTTP status counts as an answer).

    huggingface-hub retries a refused connection for about 23 s; a run without network should say so quickly.
    """
    import urllib.error  # noqa: PLC0415 - only a hub source asks: lock --check of a local stack stays light.
    import urllib.request  # noqa: PLC0415

    request = urllib.request.Request(endpoint, method="HEAD")  # noqa: S310 - the user's own hub endpoint.
    try:
        with urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S):  # noqa: S310
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise NetworkError(
            f"{where}: the hub at {endpoint} is not reachable ({reason})",
            hint="check the network or HF_ENDPOINT, or use --offline with a filled hub cache",
        ) from None


def stat_hub_file(
    repo: str, revision: str, path: str, *, endpoint: str | None = None, link: str = "model.source"
) -> HubFile:
    """The commit ``revision`` names and the file's sha256 and size, from one ``HEAD`` (no download).

    ``link`` is the manifest key errors name.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url  # noqa: PLC0415

    where = f"{link}: hf://{repo}@{revision}/{path}"
    if env_true("HF_HUB_OFFLINE"):
        raise NetworkError(f"{where}: HF_HUB_OFFLINE is set, so the hub cannot be asked", hint="unset it")
    _require_reachable(where, hub_endpoint(endpoint) or "https://huggingface.co")
    with hub_errors(where):
        url = hf_hub_url(repo, path, revision=revision, endpoint=hub_endpoint(endpoint))
        meta = get_hf_file_metadata(
            url,
            timeout=_env_seconds("HF_HUB_ETAG_TIMEOUT", 10),
            endpoint=hub_endpoint(endpoint),
            retry_on_errors=True,
        )
    if meta.commit_hash is None or meta.size is None:
        raise NetworkError(
            f"{where}: the hub's answer has no commit or size (X-Repo-Commit, X-Linked-Size)",
            hint="check that HF_ENDPOINT is a Hugging Face hub",
        )
    sha = meta.etag if meta.etag and _SHA256.match(meta.etag) else None
    return HubFile(repo, meta.commit_hash, path, sha, meta.size, meta.location)


def read_hub_range(file: HubFile, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of a hub file, by one HTTP range request (with retries)."""
    import httpx2  # noqa: PLC0415
    from huggingface_hub import hf_raise_for_status  # noqa: PLC0415

    # Public names that huggingface_hub.utils exports lazily, which mypy cannot see.
    from huggingface_hub.utils import (  # type: ignore[attr-defined]  # noqa: PLC0415
        build_hf_headers,
        http_stream_backoff,
    )

    headers = build_hf_headers()
    headers["Range"] = f"bytes={start}-{end - 1}"
    headers["Accept-Encoding"] = "identity"
    data = bytearray()
    with (
        hub_errors(file.location),
        http_stream_backoff(
            "GET",
            file.url,
            headers=headers,
            timeout=_env_seconds("HF_HUB_DOWNLOAD_TIMEOUT", 10),
            follow_redirects=True,
            max_retries=RETRIES,
            base_wait_time=FIRST_WAIT_S,
            max_wait_time=MAX_WAIT_S,
        ) as response,
    ):
        hf_raise_for_status(response)
        if response.status_code != 206:  # Partial Content
            # A server that ignores Range would send the whole file: stop before reading it.
            raise NetworkError(
                f"{file.location}: the server ignored a range request (HTTP {response.status_code})",
                hint="HF_ENDPOINT must serve byte ranges, as huggingface.co does",
            )
        # A body cut short must not escape into the backoff context (it cannot retry a stream it handed out):
        # it shows as a short read below.
        with contextlib.suppress(httpx2.TransportError):
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > end - start:
                    break
    if len(data) != end - start:
        raise NetworkError(
            f"{file.location}: bytes {start}-{end - 1} came back as {len(data)} bytes",
            hint="the connection was cut or the file changed; retry",
        )
    return bytes(data)


@dataclass(frozen=True)
class RemoteModel:
    """A GGUF model on the hub: every part pinned, and its header, read with range requests only."""

    commit: str
    files: tuple[HubFile, ...]
    gguf: GGUFFile
    bytes_read: int


def stat_hub_model(
    repo: str, revision: str, path: str, *, endpoint: str | None = None
) -> tuple[HubFile, ...]:
    """Every part of a hub GGUF (one, or all of a split file) at one commit, each with its sha256 and size."""
    names = split_part_names(path)
    first = stat_hub_file(repo, revision, path, endpoint=endpoint)
    files = (first, *(stat_hub_file(repo, first.commit, name, endpoint=endpoint) for name in names[1:]))
    for file in files:
        if file.sha256 is None:
            raise SourceError(
                f"model.source: {file.location}: the hub gives no sha256 for this file (it is not stored with LFS)",
                hint="a GGUF model on the hub is an LFS file; check the path",
            )
    return files


@dataclass(frozen=True)
class RemoteHeader:
    gguf: GGUFFile
    bytes_read: int
    """How many bytes of the files were transferred to read their headers."""


def read_remote_header(files: tuple[HubFile, ...]) -> RemoteHeader:
    """Parse a hub GGUF's header (every part's) from HTTP range reads of only the header bytes, roughly."""
    # numpy (under the reader) is imported only when a header is parsed, not on a cache hit.
    from stacklock.gguf.reader import HeaderBytes, HeaderIncomplete, parse_gguf_header  # noqa: PLC0415

    prefixes = [b""] * len(files)
    deadline = time.monotonic() + HEADER_DEADLINE_S
    read = 0
    while True:
        try:
            gguf = parse_gguf_header(
                [
                    HeaderBytes(PurePosixPath(f.path).name, data, f.size, f.location)
                    for f, data in zip(files, prefixes, strict=True)
                ]
            )
            return RemoteHeader(gguf, read)
        except HeaderIncomplete as more:
            file, have = files[more.part], len(prefixes[more.part])
            want = min(file.size, max(more.at_least, have + have // GROWTH, FIRST_READ))
            if want > MAX_HEADER:
                raise GGUFError(
                    f"{file.location}: the GGUF header is longer than {MAX_HEADER >> 20} MiB",
                    hint="the file is corrupt, or not a GGUF model",
                ) from None
            if time.monotonic() > deadline:
                raise NetworkError(
                    f"{file.location}: reading the header took over {HEADER_DEADLINE_S:.0f} s",
                    hint="retry on a faster connection",
                ) from None
            prefixes[more.part] += read_hub_range(file, have, want)
            read += want - have


def _cached_at_commit(repo: str, revision: str, path: str) -> bool:
    """Whether a file pinned at a commit is in the hub cache already: then the hub is not asked at all."""
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

    if not _COMMIT.match(revision):
        return False
    return isinstance(try_to_load_from_cache(repo, path, cache_dir=hub_cache_dir(), revision=revision), str)


def download_hub_file(
    repo: str,
    revision: str,
    path: str,
    *,
    offline: bool = False,
    endpoint: str | None = None,
    sha256: str | None = None,
    where: str = "model.source",
    reporter: Reporter = NO_REPORTER,
) -> tuple[Path, str]:
    """The file in the hub cache (downloaded there if needed) and the commit it came from.

    The download is one step of ``reporter``, with its bytes as progress.

    With ``sha256``, the bytes are checked before the path is returned: a file that does not match is never used.
    """
    # Imported here: huggingface_hub is slow to import and only hub sources need it.
    from huggingface_hub import hf_hub_download  # noqa: PLC0415

    label = f"{where}: hf://{repo}@{revision}/{path}"
    name = f"fetching hf://{repo}@{revision}/{path}"
    offline = offline or env_true("HF_HUB_OFFLINE")
    if not offline and not _cached_at_commit(repo, revision, path):
        _require_reachable(label, hub_endpoint(endpoint) or "https://huggingface.co")
    with hub_errors(label), step(reporter, name):
        local = Path(
            hf_hub_download(
                repo_id=repo,
                filename=path,
                revision=revision,
                cache_dir=hub_cache_dir(),
                # The client reads HF_ENDPOINT and HF_HUB_OFFLINE at import; these are read per call.
                endpoint=hub_endpoint(endpoint),
                local_files_only=offline,
                etag_timeout=_env_seconds("HF_HUB_ETAG_TIMEOUT", 10),
                tqdm_class=_download_bar(reporter, name),
            )
        )
    # The hub cache lays files out as <repo>/snapshots/<commit>/<path in the repo>: the directory above the
    # path's own folders is the resolved commit, whatever the branch or tag asked for.
    snapshot = local.parents[len(PurePosixPath(path).parts) - 1]
    commit = snapshot.name if snapshot.parent.name == "snapshots" else revision
    if sha256 is not None:
        cache = HashCache()
        digest = cache.sha256(local)
        cache.save()
        if digest != sha256:
            raise NetworkError(
                f"{label}: the downloaded file has sha256 {digest}, the lock pins {sha256}",
                hint="the hub served other bytes for the locked commit; delete it from the hub cache and retry",
            )
    return local, commit


def read_hub_text(
    repo: str,
    revision: str,
    candidates: tuple[str, ...],
    *,
    offline: bool = False,
    link: str = "template.source",
) -> tuple[str, str, str]:
    """The first of ``candidates`` that the repository has at ``revision``: its name, text and the commit.

    Small files: downloaded into the hub cache (at the commit, so a re-lock offline finds them).
    """
    for name in candidates:
        try:
            path, commit = download_hub_file(repo, revision, name, offline=offline, where=link)
        except HubFileMissingError:
            continue
        try:
            return name, path.read_text(encoding="utf-8"), commit
        except UnicodeDecodeError as exc:
            raise SourceError(
                f"template.source: hf://{repo}@{commit}/{name}: not UTF-8 (byte {exc.start})"
            ) from None
    raise SourceError(
        f"template.source: hf://{repo}@{revision} has none of {', '.join(candidates)}",
        hint="name the file: hf://owner/repo@revision/path/to/chat_template.jinja",
    )


def _download_bar(reporter: Reporter, name: str) -> type[Any]:
    """A tqdm class for huggingface_hub that forwards the bytes downloaded to ``reporter`` and draws nothing."""
    from tqdm import tqdm  # type: ignore[import-untyped]  # noqa: PLC0415 - huggingface_hub brings it.

    class ToReporter(tqdm):  # type: ignore[misc]  # tqdm has no type hints here.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._done = int(kwargs.get("initial") or 0)
            self._total = int(kwargs.get("total") or 0)
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            reporter.progress(name, self._done, self._total)
            return None

    return ToReporter
