"""Sources: where a link's file comes from, parsed from the manifest's ``source`` strings.

One string format covers every kind, so new kinds slot in without a manifest format change:

- a local path, relative to the manifest (``models/x.gguf``, or explicitly ``file:models/x.gguf``);
- ``hf://owner/repo@revision/path/in/repo.gguf``: a file in a Hugging Face hub repository;
- ``registry://name``: a model entry of a registry.

``parse_*`` here is pure; ``fetch_model`` touches the file system or the network.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from stacklock.errors import NetworkError, SourceError
from stacklock.sources.local import confine

_HF = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^/]+))?/(?P<path>.+)$")


@dataclass(frozen=True)
class LocalSource:
    path: str


@dataclass(frozen=True)
class HubSource:
    repo: str
    revision: str
    path: str


@dataclass(frozen=True)
class RegistryModelSource:
    name: str


ModelSource = LocalSource | HubSource | RegistryModelSource


def parse_model_source(text: str, where: str = "model.source") -> ModelSource:
    if text.startswith("hf://"):
        match = _HF.match(text)
        if match is None:
            raise SourceError(
                f"{where}: '{text}' is not a hub source",
                hint="write hf://owner/repo@revision/path/to/file.gguf",
            )
        _check_hub_names(text, where, match["repo"], match["path"])
        return HubSource(match["repo"], match["rev"] or "main", match["path"])
    if text.startswith("registry://"):
        return RegistryModelSource(text.removeprefix("registry://"))
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        raise SourceError(
            f"{where}: unsupported source scheme in '{text}'",
            hint="use a local path, hf://owner/repo@revision/file.gguf or registry://name",
        )
    return LocalSource(text.removeprefix("file:"))


def _check_hub_names(text: str, where: str, repo: str, path: str) -> None:
    # The hub's own rules for repository ids, checked here so that its client's ValueError never escapes.
    if "--" in repo or ".." in repo or repo.endswith((".", "-")):
        raise SourceError(
            f"{where}: '{text}': the repository id '{repo}' may not contain '--' or '..', nor end in '.' or '-'",
            hint="write hf://owner/repo@revision/path/to/file.gguf",
        )
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise SourceError(
            f"{where}: '{text}': the path in the repository may not contain '.', '..' or empty segments",
            hint="name the file by its path from the repository's root",
        )


@dataclass(frozen=True)
class FetchedModel:
    path: Path
    """The file on disk."""
    revision: str | None
    """The resolved revision (a hub commit), when the source has one."""


def fetch_model(
    source: ModelSource, base_dir: Path, *, offline: bool = False, endpoint: str | None = None
) -> FetchedModel:
    """Make the model file available locally and say where it is.

    ``endpoint`` is the hub to ask for ``hf://`` sources (default: ``$HF_ENDPOINT``, else huggingface.co).
    """
    if isinstance(source, LocalSource):
        return FetchedModel(confine(source.path, base_dir, "model.source"), None)
    if isinstance(source, HubSource):
        return _fetch_hub(source, offline=offline, endpoint=endpoint)
    raise SourceError(
        f"model.source: registry://{source.name}: registry model sources are not supported yet",
        hint="use a local path or hf://owner/repo@revision/file.gguf",
    )


def _env_true(name: str) -> bool:
    # The spellings huggingface_hub accepts for its own switches.
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


HUB_PROBE_TIMEOUT_S = 5.0


def _reachable(endpoint: str) -> bool:
    """Whether the hub answers at all (any HTTP status counts), within :data:`HUB_PROBE_TIMEOUT_S`."""
    request = urllib.request.Request(endpoint, method="HEAD")  # noqa: S310 - the user's own hub endpoint.
    try:
        with urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S):  # noqa: S310
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _hub_cache_dir() -> str | None:
    # huggingface_hub reads these once, when it is first imported; reading them here, per call, lets a
    # long-lived process (or a test) point stacklock at another cache without re-importing the client.
    if cache := os.environ.get("HF_HUB_CACHE"):
        return cache
    if home := os.environ.get("HF_HOME"):
        return str(Path(home) / "hub")
    return None


def _fetch_hub(source: HubSource, *, offline: bool, endpoint: str | None) -> FetchedModel:
    # Imported here: huggingface_hub is slow to import and only hub sources need it.
    from huggingface_hub import hf_hub_download  # noqa: PLC0415
    from huggingface_hub.errors import (  # noqa: PLC0415
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"model.source: hf://{source.repo}@{source.revision}/{source.path}"
    hub = endpoint or os.environ.get("HF_ENDPOINT") or None
    # huggingface_hub retries a refused connection for about 23 s; one quick probe makes "no network" a
    # cache lookup instead, answered in seconds.
    offline = offline or _env_true("HF_HUB_OFFLINE") or not _reachable(hub or "https://huggingface.co")
    try:
        local = hf_hub_download(
            repo_id=source.repo,
            filename=source.path,
            revision=source.revision,
            cache_dir=_hub_cache_dir(),
            # The client reads HF_ENDPOINT and HF_HUB_OFFLINE at import; these are read per call.
            endpoint=hub,
            local_files_only=offline,
        )
    except RepositoryNotFoundError:
        raise SourceError(
            f"{where}: repository not found (or private)",
            hint="check the owner/repo name (a private repository needs HF_TOKEN)",
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"{where}: revision not found", hint="check the branch, tag or commit") from None
    except RemoteEntryNotFoundError:
        raise SourceError(f"{where}: file not found in the repository", hint="check the path") from None
    except LocalEntryNotFoundError:
        # Also an EntryNotFoundError in huggingface_hub: caught by its own class, after the remote one.
        raise NetworkError(
            f"{where}: not in the local hub cache and the hub is not reachable",
            hint="go online once to download it, or set HF_ENDPOINT",
        ) from None
    except ValueError as exc:  # HFValidationError: a name the parser let through but the hub refuses.
        raise SourceError(f"{where}: {str(exc).splitlines()[0]}", hint="fix the hf:// source") from None
    except (HfHubHTTPError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NetworkError(
            f"{where}: download failed: {reason}", hint="check the network or HF_ENDPOINT"
        ) from None
    path = Path(local)
    # The hub cache lays files out as <repo>/snapshots/<commit>/<path in the repo>: the directory above the
    # path's own folders is the resolved commit, whatever the branch or tag asked for.
    depth = len(PurePosixPath(source.path).parts)
    snapshot = path.parents[depth - 1]
    revision = snapshot.name if snapshot.parent.name == "snapshots" else source.revision
    return FetchedModel(path, revision)
