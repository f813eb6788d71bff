"""Registry sources: a local directory, a git repository or an archive URL, pinned and cached.

The lock pins every registry by digest and, for git, by commit. Remote registries are cached under
``<cache>/registries/<digest>/`` (``<cache>`` is ``$STACKLOCK_CACHE_DIR`` or ``~/.cache/stacklock``), so a
pinned registry resolves offline. An unreachable git repository or URL is a
:class:`~stacklock.errors.NetworkError`.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.parse
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Final

from stacklock.errors import NetworkError, RegistryError
from stacklock.files.atomic import file_error
from stacklock.files.cache_dir import default_cache_dir
from stacklock.model.findings import RegistryPin, RegistrySource
from stacklock.registry.files import (
    BUNDLED,
    LoadedRegistry,
    load_bundled_registry,
    read_registry,
    read_registry_files,
    registry_digest,
)
from stacklock.registry.location import local_path, source_kind
from stacklock.reporter import NO_REPORTER, Reporter, step
from stacklock.sources.local import confine_dir

MAX_ARCHIVE_BYTES: Final = 64 << 20
MAX_EXTRACTED_BYTES: Final = 256 << 20
GIT_TIMEOUT_S: Final = 120
HTTP_TIMEOUT_S: Final = 30
_LOOPBACK: Final = frozenset({"127.0.0.1", "localhost", "::1"})


# -- Sources: local directory, git, archive URL --------------------------------------------------------------


def registries_cache_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "registries"


def _check_http_url(name: str, url: str) -> None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "https":
        return
    if parsed.scheme == "http" and parsed.hostname in _LOOPBACK:
        return
    raise RegistryError(
        f"registry '{name}': {url}: plain http is only allowed for 127.0.0.1 and localhost; use https://"
    )


def fetch_archive(name: str, url: str) -> bytes:
    """Download an archive (HTTPS, or HTTP on the loopback interface), at most 64 MiB."""
    # urllib.request (and http.client, ssl) load only for a download, not for every registry resolution.
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    _check_http_url(name, url)
    request = urllib.request.Request(url, headers={"User-Agent": "stacklock"})  # noqa: S310 - scheme checked above
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310
            data: bytes = response.read(MAX_ARCHIVE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise NetworkError(
            f"registry '{name}': {url} answered HTTP {exc.code} {exc.reason}", hint="check the URL"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NetworkError(
            f"registry '{name}': cannot reach {url}: {reason}",
            hint="check the network, or resolve offline from a pinned, cached registry",
        ) from None
    if len(data) > MAX_ARCHIVE_BYTES:
        raise RegistryError(
            f"registry '{name}': {url} is larger than {MAX_ARCHIVE_BYTES >> 20} MiB; a registry is small data"
        )
    return data


def _safe_member(name: str, origin: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise RegistryError(f"{origin}: archive member '{name}' escapes the archive; refusing to extract it")
    return path


def extract_archive(data: bytes, dest: Path, origin: str) -> None:
    """Extract a .tar.gz, .tar or .zip archive into ``dest``; links, devices and escaping paths are "
    "refused."""
    total = 0
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                path = _safe_member(info.filename, origin)
                if info.is_dir():
                    continue
                total += info.file_size
                if total > MAX_EXTRACTED_BYTES:
                    raise RegistryError(f"{origin}: archive expands beyond {MAX_EXTRACTED_BYTES >> 20} MiB")
                target = dest.joinpath(*path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(info))
        return
    try:
        archive_file = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")  # noqa: SIM115 - closed below
    except tarfile.TarError:
        raise RegistryError(
            f"{origin}: not a .tar.gz, .tar or .zip archive; publish the registry as one"
        ) from None
    with archive_file as archive:
        for member in archive.getmembers():
            path = _safe_member(member.name, origin)
            if member.isdir():
                continue
            if not member.isfile():
                raise RegistryError(
                    f"{origin}: archive member '{member.name}' is a link or device; refusing it"
                )
            total += member.size
            if total > MAX_EXTRACTED_BYTES:
                raise RegistryError(f"{origin}: archive expands beyond {MAX_EXTRACTED_BYTES >> 20} MiB")
            extracted = archive.extractfile(member)
            assert extracted is not None
            target = dest.joinpath(*path.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(extracted.read())


def _registry_root(tree: Path) -> Path:
    # Archives from forges wrap the tree in one top-level directory (repo-<commit>/).
    if (tree / "registry.toml").is_file():
        return tree
    children = [p for p in tree.iterdir() if not p.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir() and (children[0] / "registry.toml").is_file():
        return children[0]
    return tree


def _git(args: Sequence[str], *, name: str, url: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "LC_ALL": "C"}
    try:
        return subprocess.run(  # noqa: S603 - a fixed git command line, no shell
            ["git", *args],  # noqa: S607 - git is looked up on PATH on purpose
            capture_output=True,
            check=False,
            env=env,
            timeout=GIT_TIMEOUT_S,
        )
    except FileNotFoundError:
        raise NetworkError(
            f"registry '{name}': {url} needs git, which is not installed", hint="install git"
        ) from None
    except subprocess.TimeoutExpired:
        raise NetworkError(f"registry '{name}': git timed out after {GIT_TIMEOUT_S} s on {url}") from None


def fetch_git(name: str, url: str, revision: str | None, dest: Path) -> str:
    """Clone ``url``, resolve ``revision`` (default HEAD) to a commit and write its tree into ``dest``.

    Returns the commit. The tree comes from ``git archive``, so no ``.git`` directory or work-tree state leaks
    into the registry's digest.
    """
    remote = url.removeprefix("git+")
    bare = dest.parent / f"{dest.name}.git"
    clone = _git(["clone", "--quiet", "--bare", "--", remote, str(bare)], name=name, url=url)
    if clone.returncode != 0:
        detail = clone.stderr.decode(errors="replace").strip().splitlines()
        raise NetworkError(
            f"registry '{name}': cannot clone {url}: {detail[-1] if detail else 'git failed'}",
            hint="check the URL and your access to it",
        )
    wanted = revision or "HEAD"
    parsed = _git(
        ["-C", str(bare), "rev-parse", "--verify", "--quiet", f"{wanted}^{{commit}}"], name=name, url=url
    )
    if parsed.returncode != 0:
        raise RegistryError(
            f"registry '{name}': revision '{wanted}' is not in {url}; use a branch, tag or commit that exists"
        )
    commit = parsed.stdout.decode().strip()
    archived = _git(["-C", str(bare), "archive", "--format=tar", commit], name=name, url=url)
    if archived.returncode != 0:  # pragma: no cover - git archive of a resolved commit does not fail
        raise RegistryError(
            f"registry '{name}': git archive {commit} failed: {archived.stderr.decode().strip()}"
        )
    dest.mkdir(parents=True)
    extract_archive(archived.stdout, dest, url)
    shutil.rmtree(bare, ignore_errors=True)
    return commit


def _store_in_cache(tree: Path, cache: Path) -> tuple[Path, str]:
    """Move a fetched tree into ``cache/<digest>``; an existing entry with that digest is kept."""
    digest = registry_digest(read_registry_files(tree))
    target = cache / digest
    if target.is_dir():
        shutil.rmtree(tree, ignore_errors=True)
    else:
        tree.replace(target)
    return target, digest


def _cached(cache: Path, digest: str) -> Path | None:
    target = cache / digest
    if not target.is_dir():
        return None
    # A cache entry is trusted only if its content still has the digest it is named after.
    if registry_digest(read_registry_files(target)) != digest:
        shutil.rmtree(target, ignore_errors=True)
        return None
    return target


def _matching_pin(source: RegistrySource, pins: Sequence[RegistryPin]) -> RegistryPin | None:
    for pin in pins:
        if pin.name == source.name and pin.url == source.url:
            return pin
    return None


def load_registry_source(
    source: RegistrySource,
    *,
    pin: RegistryPin | None = None,
    offline: bool = False,
    refresh: bool = False,
    cache_dir: Path | None = None,
    base_dir: Path | None = None,
    reporter: Reporter = NO_REPORTER,
) -> LoadedRegistry:
    """Read one configured registry.

    A local directory is always read as it is now. A git or archive registry whose pinned digest is in the
    cache is read from the cache, without the network, unless ``refresh`` asks for the source's current state
    (what ``lock --check`` uses to report a changed digest). A git registry is fetched at the pinned commit
    when there is a pin, else at ``source.revision``. ``offline`` never touches the network.
    """
    if source.name == BUNDLED:
        raise RegistryError(
            f"registry '{BUNDLED}': the name is reserved for the registry shipped with stacklock; rename it"
        )
    kind = source_kind(source.url)
    if kind == "directory":
        root = local_path(source.url, base_dir)
        if base_dir is not None:
            # A manifest's registry directory is confined to the project like any other local source.
            root = confine_dir(str(root), base_dir, f"registry '{source.name}'")
        if not (root / "registry.toml").is_file():
            raise RegistryError(
                f"registry '{source.name}': {root} holds no registry.toml; point the url at a registry "
                "directory"
            )
        return read_registry(root, name=source.name, url=source.url)
    cache = registries_cache_dir(cache_dir)
    revision = pin.revision if (pin is not None and not refresh and pin.revision) else source.revision
    if pin is not None and not refresh:
        hit = _cached(cache, pin.digest)
        if hit is not None:
            return read_registry(
                hit, name=source.name, url=source.url, revision=pin.revision, origin=source.url
            )
    if offline:
        why = "its pinned digest is not cached" if pin is not None else "the lock pins no digest for it"
        raise NetworkError(
            f"registry '{source.name}' ({source.url}) cannot be read offline: {why}",
            hint="run once without --offline to fill the cache",
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_error("create the registry cache", cache, exc) from None
    with (
        step(reporter, f"fetching registry '{source.name}' from {source.url}"),
        tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp,
    ):
        tree = Path(tmp) / "tree"
        commit: str | None = None
        if kind == "git":
            commit = fetch_git(source.name, source.url, revision, tree)
        else:
            data = fetch_archive(source.name, source.url)
            tree.mkdir()
            extract_archive(data, tree, source.url)
            root = _registry_root(tree)
            if root != tree:
                moved = Path(tmp) / "root"
                root.replace(moved)
                shutil.rmtree(tree)
                tree = moved
        stored, _ = _store_in_cache(tree, cache)
    return read_registry(stored, name=source.name, url=source.url, revision=commit, origin=source.url)


def resolve_registries(
    sources: Sequence[RegistrySource],
    *,
    pins: Sequence[RegistryPin] = (),
    offline: bool = False,
    refresh: bool = False,
    cache_dir: Path | None = None,
    base_dir: Path | None = None,
    include_bundled: bool = True,
    reporter: Reporter = NO_REPORTER,
) -> tuple[LoadedRegistry, ...]:
    """The bundled registry, then every configured one in order, each with its :class:`RegistryPin`.

    ``pins`` are the lock's pins: a source matches a pin with the same name and url. ``base_dir`` resolves
    relative directory paths (the manifest's directory). Rule ids must be unique across all registries.
    """
    loaded: list[LoadedRegistry] = [load_bundled_registry()] if include_bundled else []
    names = {r.name for r in loaded}
    for source in sources:
        if source.name == BUNDLED:
            raise RegistryError(
                f"registry '{BUNDLED}': the name is reserved for the registry shipped with stacklock; "
                "rename it"
            )
        if source.name in names:
            raise RegistryError(
                f"registry '{source.name}' is configured twice; give each registry its own name"
            )
        names.add(source.name)
        loaded.append(
            load_registry_source(
                source,
                pin=_matching_pin(source, pins),
                offline=offline,
                refresh=refresh,
                cache_dir=cache_dir,
                base_dir=base_dir,
                reporter=reporter,
            )
        )
    owner: dict[str, str] = {}
    for registry in loaded:
        for rule in registry.rules:
            if rule.id in owner:
                raise RegistryError(
                    f"rule '{rule.id}' is defined by registry '{owner[rule.id]}' and by registry "
                    f"'{registry.name}'; "
                    "rule ids must be unique, rename one"
                )
            owner[rule.id] = registry.name
    return tuple(loaded)


def compare_pins(locked: Sequence[RegistryPin], registries: Sequence[LoadedRegistry]) -> tuple[str, ...]:
    """One line per difference between the lock's pins and the registries as resolved now (for ``lock "
    "--check``)."""
    now = {r.name: r.pin for r in registries}
    before = {p.name: p for p in locked}
    changes: list[str] = []
    for name, pin in now.items():
        old = before.get(name)
        if old is None:
            changes.append(f"registry '{name}' is not pinned in the lock; re-lock to pin it")
        elif old.url != pin.url:
            changes.append(f"registry '{name}' moved from {old.url} to {pin.url}; re-lock")
        elif old.digest != pin.digest:
            moved = f", revision {old.revision} → {pin.revision}" if old.revision != pin.revision else ""
            changes.append(
                f"registry '{name}' changed: digest {old.digest[:12]} → {pin.digest[:12]}{moved}; "
                "re-lock to accept the new rules"
            )
    changes.extend(
        f"registry '{name}' is pinned in the lock but no longer configured; re-lock"
        for name in before
        if name not in now
    )
    return tuple(changes)
