"""Sources: where a link's file comes from, parsed from the manifest's ``source`` strings.

One string format covers every kind, so new kinds slot in without a manifest format change:

- a local path, relative to the manifest (``models/x.gguf``, or explicitly ``file:models/x.gguf``);
- ``hf://owner/repo@revision/path/in/repo.gguf``: a file in a Hugging Face hub repository;
- ``registry://name``: a model entry of a registry.

``parse_*`` here is pure; ``fetch_model`` touches the file system or the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from stacklock.errors import SourceError
from stacklock.reporter import NO_REPORTER, Reporter
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
    source: ModelSource,
    base_dir: Path,
    *,
    offline: bool = False,
    endpoint: str | None = None,
    reporter: Reporter = NO_REPORTER,
) -> FetchedModel:
    """Make the model file available locally and say where it is.

    ``endpoint`` is the hub to ask for ``hf://`` sources (default: ``$HF_ENDPOINT``, else huggingface.co).
    """
    if isinstance(source, LocalSource):
        return FetchedModel(confine(source.path, base_dir, "model.source"), None)
    if isinstance(source, HubSource):
        return _fetch_hub(source, offline=offline, endpoint=endpoint, reporter=reporter)
    raise SourceError(
        f"model.source: registry://{source.name}: registry model sources are not supported yet",
        hint="use a local path or hf://owner/repo@revision/file.gguf",
    )


def _fetch_hub(source: HubSource, *, offline: bool, endpoint: str | None, reporter: Reporter) -> FetchedModel:
    from stacklock.sources.hub import download_hub_file  # noqa: PLC0415 - huggingface_hub is slow to import.

    path, commit = download_hub_file(
        source.repo, source.revision, source.path, offline=offline, endpoint=endpoint, reporter=reporter
    )
    return FetchedModel(path, commit)
