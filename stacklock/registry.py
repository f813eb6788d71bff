"""Registries: the bundled one and user-configured ones (a local directory, a git repository, an archive URL).

A registry is a directory of data, never code::

    registry.toml                    format-version, name, description
    rules/<id>.toml                  compatibility rules (stacklock.rules)
    engines/<engine>.toml            release → vendored llama.cpp build tables (stacklock.versions)
    templates/<id>.toml + <file>     known-good chat templates with provenance
    stacks/<name>/stack.toml         known-good stacks: metadata, plus
    stacks/<name>/llmstack.toml        the manifest,
    stacks/<name>/llmstack.lock        the lock, and
    stacks/<name>/certificate.json     the certificate of its verification

Its *digest* is the sha256 over its files, sorted by relative path (hidden files and directories excluded);
the lock pins every registry by that digest and, for git, by commit. Remote registries are cached under
``<cache>/registries/<digest>/`` (``<cache>`` is ``$STACKLOCK_CACHE_DIR`` or ``~/.cache/stacklock``), so a
pinned registry resolves offline.

``parse_*`` functions are pure (file contents in, models out); ``read_*``/``load_*``/``resolve_*``/``fetch``
touch the file system, a ``git`` process or the network; ``write_*``/``export_*`` write files.

Errors: a malformed registry file is a :class:`~stacklock.errors.RegistryError` naming the file and key path;
an unreachable git repository or URL is a :class:`~stacklock.errors.NetworkError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal

from pydantic import Field, field_validator

from stacklock._model import Model
from stacklock.atomic import write_text_atomic
from stacklock.errors import NetworkError, RegistryError
from stacklock.findings import RegistryPin, RegistrySource, Severity
from stacklock.hashing import default_cache_dir
from stacklock.manifest import Name
from stacklock.rules import (
    Rule,
    parse_rule,
    predicate_json_schema_defs,
)
from stacklock.tomlio import parse_toml, validate
from stacklock.versions import EngineTable, EngineTables, parse_engine_table

#: The registry format this stacklock reads; ``registry.toml`` says which one a registry is written in.
FORMAT_VERSION: Final = 1
BUNDLED: Final = "bundled"
STACK_FILES: Final = ("stack.toml", "llmstack.toml", "llmstack.lock", "certificate.json")
MAX_ARCHIVE_BYTES: Final = 64 << 20
MAX_EXTRACTED_BYTES: Final = 256 << 20
GIT_TIMEOUT_S: Final = 120
HTTP_TIMEOUT_S: Final = 30
_LOOPBACK: Final = frozenset({"127.0.0.1", "localhost", "::1"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# -- Models of registry files --------------------------------------------------------------------------------


class RegistryIndex(Model):
    """``registry.toml``: what the registry is and which format it is written in."""

    format_version: int = Field(ge=1, description="The registry format; this stacklock reads format 1.")
    name: str = Field(description="A short name for the registry, e.g. 'stacklock-community'.")
    description: str = Field(default="", description="What the registry holds and who maintains it.")


class TemplateEntry(Model):
    """``templates/<id>.toml``: a known-good chat template and where it comes from."""

    id: str = Field(description="The template id; manifests use it as 'registry:<id>'. Equals the file stem.")
    title: str = Field(min_length=1, description="One line: which models the template is for.")
    file: str | None = Field(
        default=None, description="The template file in templates/; default '<id>.jinja' (or '<id>.gotmpl')."
    )
    dialect: Literal["jinja2", "go-template"] = Field(default="jinja2", description="The template language.")
    sha256: str = Field(description="sha256 of the template file's bytes.")
    source_repo: str = Field(
        description="Where it comes from, e.g. 'google/gemma-3-270m-it' (a Hugging Face repo)."
    )
    source_revision: str = Field(
        description="The revision (commit) of the source repository it was taken from."
    )
    source_path: str = Field(description="The file in the source repository, e.g. 'tokenizer_config.json'.")
    reproduces: str = Field(
        min_length=1,
        description="What rendering it reproduces, e.g. transformers' apply_chat_template output.",
    )
    architectures: tuple[str, ...] = Field(default=(), description="general.architecture values it fits.")

    notes: str = Field(default="", description="Changes from the source, caveats.")

    @property
    def filename(self) -> str:
        if self.file is not None:
            return self.file
        return f"{self.id}.gotmpl" if self.dialect == "go-template" else f"{self.id}.jinja"

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        if not _SHA256.match(value):
            raise ValueError("must be 64 lowercase hexadecimal characters")
        return value


class StackMeta(Model):
    """``stacks/<name>/stack.toml``: what a shared known-good stack is."""

    name: Name = Field(description="The stack's name; equals its directory name. Used by 'init --from NAME'.")
    title: str = Field(min_length=1, description="One line: model, engine and purpose.")
    description: str = Field(default="", description="What the stack is for, and what was verified.")
    tags: tuple[str, ...] = Field(default=(), description="Search words, e.g. 'gemma3', 'cpu'.")


@dataclass(frozen=True, slots=True)
class StackEntry:
    """A known-good stack as read from a registry."""

    meta: StackMeta
    registry: str
    path: str
    manifest_text: str
    lock_text: str
    certificate: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.meta.name


@dataclass(frozen=True, slots=True)
class LoadedRegistry:
    """One registry, read and validated, with what the lock pins about it."""

    name: str
    url: str
    revision: str | None
    digest: str
    root: Path
    index: RegistryIndex
    rules: tuple[Rule, ...]
    templates: tuple[TemplateEntry, ...]
    template_texts: Mapping[str, str]
    stacks: tuple[StackEntry, ...]
    engines: EngineTables
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def pin(self) -> RegistryPin:
        return RegistryPin(name=self.name, url=self.url, revision=self.revision, digest=self.digest)


# -- Pure core: files → registry -----------------------------------------------------------------------------


def registry_digest(files: Mapping[str, bytes]) -> str:
    """sha256 over (path, size, content) of every file, in sorted path order; paths are POSIX and relative."""
    digest = hashlib.sha256()
    for path in sorted(files):
        data = files[path]
        # The length prefix makes the framing unambiguous: no two file sets hash the same stream.
        digest.update(f"{path}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _text(files: Mapping[str, bytes], path: str, origin: str) -> str:
    try:
        return files[path].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{origin}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def parse_registry(
    files: Mapping[str, bytes],
    *,
    name: str,
    url: str,
    revision: str | None = None,
    root: Path = Path(),
    origin: str = "registry",
) -> LoadedRegistry:
    """Validate a registry given as {relative path: content}. ``origin`` prefixes paths in error messages."""
    where = f"{origin}/registry.toml"
    if "registry.toml" not in files:
        raise RegistryError(
            f"{where}: missing; a registry needs a registry.toml with format-version = {FORMAT_VERSION} and "
            "a name"
        )
    index_text = _text(files, "registry.toml", where)
    index = validate(
        RegistryIndex, parse_toml(index_text, where, RegistryError), where, index_text, RegistryError
    )
    if index.format_version > FORMAT_VERSION:
        raise RegistryError(
            f"{where}: format-version {index.format_version} is newer than this stacklock reads "
            f"({FORMAT_VERSION}); upgrade stacklock"
        )
    rules: list[Rule] = []
    first_file: dict[str, str] = {}
    tables: list[EngineTable] = []
    templates: list[TemplateEntry] = []
    template_texts: dict[str, str] = {}
    sources: dict[str, str] = {}
    stack_dirs: set[str] = set()
    for path in sorted(files):
        parts = PurePosixPath(path).parts
        file_origin = f"{origin}/{path}"
        if len(parts) == 2 and parts[0] == "rules" and path.endswith(".toml"):
            text = _text(files, path, file_origin)
            rule = parse_rule(text, file_origin)
            stem = PurePosixPath(path).stem
            if rule.id != stem:
                raise RegistryError(
                    f"{file_origin}: id: '{rule.id}' differs from the file name; rename it {rule.id}.toml"
                )
            if rule.id in first_file:
                raise RegistryError(
                    f"{file_origin}: id: '{rule.id}' is already defined in {first_file[rule.id]}"
                )
            first_file[rule.id] = file_origin
            rules.append(rule.in_registry(name))
            sources[f"rule:{rule.id}"] = text
        elif len(parts) == 2 and parts[0] == "engines" and path.endswith(".toml"):
            tables.append(parse_engine_table(_text(files, path, file_origin), file_origin))
        elif len(parts) == 2 and parts[0] == "templates" and path.endswith(".toml"):
            text = _text(files, path, file_origin)
            entry = parse_template_entry(text, file_origin)
            if entry.id != PurePosixPath(path).stem:
                raise RegistryError(
                    f"{file_origin}: id: '{entry.id}' differs from the file name; rename it {entry.id}.toml"
                )
            template_path = f"templates/{entry.filename}"
            if template_path not in files:
                raise RegistryError(
                    f"{file_origin}: file: '{entry.filename}' is not in templates/; add it or fix the name"
                )
            actual = hashlib.sha256(files[template_path]).hexdigest()
            if actual != entry.sha256:
                raise RegistryError(
                    f"{file_origin}: sha256: does not match templates/{entry.filename} (its sha256 is "
                    f"{actual}); "
                    "update the entry if the template change is intended"
                )
            templates.append(entry)
            template_texts[entry.id] = _text(files, template_path, f"{origin}/{template_path}")
            sources[f"template:{entry.id}"] = text
        elif len(parts) >= 3 and parts[0] == "stacks":
            stack_dirs.add(parts[1])
    seen_engines: dict[str, int] = {}
    for table in tables:
        seen_engines[table.engine] = seen_engines.get(table.engine, 0) + 1
        if seen_engines[table.engine] > 1:
            raise RegistryError(f"{origin}/engines: engine '{table.engine}' has two tables; keep one")
    stacks = tuple(
        parse_stack_entry(
            {f: files[f"stacks/{d}/{f}"] for f in STACK_FILES if f"stacks/{d}/{f}" in files},
            directory=d,
            registry=name,
            origin=f"{origin}/stacks/{d}",
        )
        for d in sorted(stack_dirs)
    )
    for stack in stacks:
        sources[f"stack:{stack.name}"] = stack.manifest_text
    return LoadedRegistry(
        name=name,
        url=url,
        revision=revision,
        digest=registry_digest(files),
        root=root,
        index=index,
        rules=tuple(rules),
        templates=tuple(templates),
        template_texts=template_texts,
        stacks=stacks,
        engines=EngineTables.of(tables),
        sources=sources,
    )


def parse_template_entry(text: str, origin: str) -> TemplateEntry:
    return validate(TemplateEntry, parse_toml(text, origin, RegistryError), origin, text, RegistryError)


def parse_stack_entry(
    files: Mapping[str, bytes], *, directory: str, registry: str, origin: str
) -> StackEntry:
    """Validate one stack entry from its four files. The manifest and lock must at least be TOML here;
    their full validation needs the manifest and lock models and happens where those are imported."""
    missing = [f for f in STACK_FILES if f not in files]
    if missing:
        raise RegistryError(
            f"{origin}: missing {', '.join(missing)}; a stack entry needs {', '.join(STACK_FILES)}"
        )
    meta_origin = f"{origin}/stack.toml"
    meta_text = _text(files, "stack.toml", meta_origin)
    meta = validate(
        StackMeta, parse_toml(meta_text, meta_origin, RegistryError), meta_origin, meta_text, RegistryError
    )
    if meta.name != directory:
        raise RegistryError(
            f"{meta_origin}: name: '{meta.name}' differs from the directory '{directory}'; make them equal"
        )
    manifest_text = _text(files, "llmstack.toml", f"{origin}/llmstack.toml")
    parse_toml(manifest_text, f"{origin}/llmstack.toml", RegistryError)
    lock_text = _text(files, "llmstack.lock", f"{origin}/llmstack.lock")
    parse_toml(lock_text, f"{origin}/llmstack.lock", RegistryError)
    certificate = parse_certificate(
        _text(files, "certificate.json", f"{origin}/certificate.json"), f"{origin}/certificate.json"
    )
    return StackEntry(
        meta=meta,
        registry=registry,
        path=f"stacks/{directory}",
        manifest_text=manifest_text,
        lock_text=lock_text,
        certificate=certificate,
    )


def parse_certificate(text: str, origin: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(
            f"{origin}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}; fix the syntax"
        ) from None
    if not isinstance(data, dict):
        raise RegistryError(f"{origin}: a certificate must be a JSON object")
    return data


# -- Reading from disk ---------------------------------------------------------------------------------------


def read_registry_files(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` by relative POSIX path, skipping hidden entries (``.git``)."""
    if not root.is_dir():
        raise RegistryError(
            f"{root}: not a directory; point the registry at a directory holding registry.toml"
        )
    files: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        base = Path(dirpath)
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = base / filename
            if path.is_file():
                files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def read_registry(
    root: Path, *, name: str, url: str, revision: str | None = None, origin: str | None = None
) -> LoadedRegistry:
    return parse_registry(
        read_registry_files(root),
        name=name,
        url=url,
        revision=revision,
        root=root,
        origin=origin or str(root),
    )


def bundled_registry_path() -> Path:
    """The registry shipped with stacklock: ``stacklock/_registry`` in a wheel, ``registry/`` in a "
    "checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_registry", here.parent / "registry"):
        if (candidate / "registry.toml").is_file():
            return candidate
    raise RegistryError(
        f"the bundled registry is missing (looked in {here / '_registry'} and {here.parent / 'registry'}); "
        "reinstall stacklock"
    )


def load_bundled_registry() -> LoadedRegistry:
    root = bundled_registry_path()
    return read_registry(root, name=BUNDLED, url=BUNDLED, origin="registry")


def bundled_templates_for(architecture: str) -> tuple[str, ...]:
    """Ids of the bundled registry's known-good templates for an architecture, for `stacklock init`."""
    return tuple(t.id for t in load_bundled_registry().templates if architecture in t.architectures)


# -- Sources: local directory, git, archive URL --------------------------------------------------------------

SourceKind = Literal["directory", "git", "archive"]


def source_kind(url: str) -> SourceKind:
    """``git+...`` or a path/URL ending in ``.git`` is git; ``http(s)://`` is an archive; anything else a "
    "directory."""
    if url.startswith("git+") or url.rstrip("/").endswith(".git"):
        return "git"
    if url.startswith(("https://", "http://")):
        return "archive"
    return "directory"


def _local_path(url: str, base_dir: Path | None) -> Path:
    if url.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    path = Path(url).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


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
        root = _local_path(source.url, base_dir)
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
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
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


# -- list / show / search ------------------------------------------------------------------------------------

EntryKind = Literal["rule", "template", "stack"]
ENTRY_KINDS: Final[tuple[EntryKind, ...]] = ("rule", "template", "stack")


class EntrySummary(Model):
    """One line of ``stacklock registry list`` or ``search``."""

    kind: EntryKind = Field(description="rule, template or stack.")
    id: str = Field(description="The rule or template id, or the stack name.")
    title: str = Field(description="One line.")
    registry: str = Field(description="The registry holding it.")
    severity: Severity | None = Field(default=None, description="For rules: error, warning or info.")


@dataclass(frozen=True, slots=True)
class ShownEntry:
    """One entry in full, for ``stacklock registry show``: the model and the file text it came from."""

    kind: EntryKind
    registry: str
    entry: Rule | TemplateEntry | StackEntry
    text: str


def _summaries(registry: LoadedRegistry) -> Iterable[tuple[EntrySummary, str]]:
    for rule in registry.rules:
        haystack = " ".join(
            [
                rule.id,
                rule.title,
                rule.explanation,
                rule.fix,
                *rule.references,
                *sorted(rule.when.fact_names()),
                json.dumps(rule.when.data),
            ]
        )
        yield (
            EntrySummary(
                kind="rule", id=rule.id, title=rule.title, registry=registry.name, severity=rule.severity
            ),
            haystack,
        )
    for template in registry.templates:
        haystack = " ".join(
            [
                template.id,
                template.title,
                template.reproduces,
                template.source_repo,
                template.notes,
                *template.architectures,
            ]
        )
        yield (
            EntrySummary(kind="template", id=template.id, title=template.title, registry=registry.name),
            haystack,
        )
    for stack in registry.stacks:
        haystack = " ".join([stack.name, stack.meta.title, stack.meta.description, *stack.meta.tags])
        yield (
            EntrySummary(kind="stack", id=stack.name, title=stack.meta.title, registry=registry.name),
            haystack,
        )


def _order(summary: EntrySummary) -> tuple[int, str, str]:
    return ENTRY_KINDS.index(summary.kind), summary.id, summary.registry


def list_entries(
    registries: Iterable[LoadedRegistry], kind: EntryKind | None = None
) -> tuple[EntrySummary, ...]:
    found = [s for r in registries for s, _ in _summaries(r) if kind is None or s.kind == kind]
    return tuple(sorted(found, key=_order))


def search_entries(
    registries: Iterable[LoadedRegistry], query: str, kind: EntryKind | None = None
) -> tuple[EntrySummary, ...]:
    """Entries whose id, title, text, references or facts contain every word of ``query`` (any case)."""
    words = query.casefold().split()
    found = [
        s
        for r in registries
        for s, haystack in _summaries(r)
        if (kind is None or s.kind == kind) and all(w in haystack.casefold() for w in words)
    ]
    return tuple(sorted(found, key=_order))


def show_entry(
    registries: Sequence[LoadedRegistry], entry_id: str, kind: EntryKind | None = None
) -> ShownEntry:
    """The entry named ``entry_id``. Raises RegistryError when none or several kinds match."""
    matches: list[ShownEntry] = []
    for registry in registries:
        if kind in (None, "rule"):
            matches.extend(
                ShownEntry("rule", registry.name, r, registry.sources.get(f"rule:{r.id}", ""))
                for r in registry.rules
                if r.id == entry_id
            )
        if kind in (None, "template"):
            matches.extend(
                ShownEntry("template", registry.name, t, registry.template_texts.get(t.id, ""))
                for t in registry.templates
                if t.id == entry_id
            )
        if kind in (None, "stack"):
            matches.extend(
                ShownEntry("stack", registry.name, s, s.manifest_text)
                for s in registry.stacks
                if s.name == entry_id
            )
    if not matches:
        what = kind or "rule, template or stack"
        names = ", ".join(r.name for r in registries) or "none"
        raise RegistryError(
            f"no {what} named '{entry_id}' in the registries ({names}); `stacklock registry search` finds "
            "entries"
        )
    kinds = sorted({m.kind for m in matches})
    if len(kinds) > 1:
        raise RegistryError(f"'{entry_id}' names a {' and a '.join(kinds)}; say which kind to show")
    return matches[0]


def find_stack(registries: Sequence[LoadedRegistry], name: str) -> StackEntry:
    """The known-good stack ``name`` (``stacklock init --from NAME``); the first registry that has it wins."""
    for registry in registries:
        for stack in registry.stacks:
            if stack.name == name:
                return stack
    known = sorted({s.name for r in registries for s in r.stacks})
    listing = ", ".join(known) if known else "none"
    raise RegistryError(
        f"no stack named '{name}' in the registries (known stacks: {listing}); check the name"
    )


@dataclass(frozen=True, slots=True)
class RegistryTemplate:
    """A known-good template found in a registry, with its text."""

    entry: TemplateEntry
    registry: str
    text: str

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def digest(self) -> str:
        """sha256 of the template file (checked against the entry when the registry was read)."""
        return self.entry.sha256


def find_template(registries: Sequence[LoadedRegistry], template_id: str) -> RegistryTemplate:
    """A known-good template and its text (``template.source = 'registry:ID'``); the first registry wins."""
    for registry in registries:
        for template in registry.templates:
            if template.id == template_id:
                return RegistryTemplate(template, registry.name, registry.template_texts[template.id])
    known = ", ".join(sorted({t.id for r in registries for t in r.templates})) or "none"
    raise RegistryError(
        f"no template named '{template_id}' in the registries (known templates: {known}); check the id"
    )


# -- Sharing a stack -----------------------------------------------------------------------------------------


def render_stack_meta(meta: StackMeta) -> str:
    lines = [f"name = {json.dumps(meta.name)}", f"title = {json.dumps(meta.title, ensure_ascii=False)}"]
    if meta.description:
        lines.append(f"description = {json.dumps(meta.description, ensure_ascii=False)}")
    if meta.tags:
        lines.append(f"tags = [{', '.join(json.dumps(t, ensure_ascii=False) for t in meta.tags)}]")
    return "\n".join(lines) + "\n"


StackValidator = Callable[[str, str, Mapping[str, Any]], None]


def export_stack_entry(
    manifest_text: str,
    lock_text: str,
    certificate_json: str,
    dest: Path,
    name: str,
    *,
    title: str | None = None,
    description: str = "",
    tags: Sequence[str] = (),
    check: StackValidator | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a stack entry into the registry directory ``dest`` (``dest/stacks/<name>/``) and return its path.

    Everything is validated before anything is written: the entry as a registry would read it, and, when
    given, ``check(manifest_text, lock_text, certificate)`` — the caller's full manifest/lock/certificate
    validation, which raises a StacklockError. The written entry is read back through the registry loader.
    """
    origin = f"{dest}/stacks/{name}"
    try:
        meta = StackMeta(name=name, title=title or name, description=description, tags=tuple(tags))
    except ValueError:
        raise RegistryError(
            f"{origin}: name: '{name}' must be lowercase letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        ) from None
    files = {
        "stack.toml": render_stack_meta(meta).encode(),
        "llmstack.toml": manifest_text.encode(),
        "llmstack.lock": lock_text.encode(),
        "certificate.json": certificate_json.encode(),
    }
    entry = parse_stack_entry(files, directory=name, registry="export", origin=origin)
    if check is not None:
        check(entry.manifest_text, entry.lock_text, entry.certificate)
    target = dest / "stacks" / name
    if target.exists() and not overwrite:
        raise RegistryError(
            f"{target}: a stack entry with this name exists; choose another name or overwrite it"
        )
    target.mkdir(parents=True, exist_ok=True)
    for filename, data in files.items():
        write_text_atomic(target / filename, data.decode())
    on_disk = {f: (target / f).read_bytes() for f in STACK_FILES}
    parse_stack_entry(on_disk, directory=name, registry="export", origin=origin)
    return target


# -- JSON Schemas --------------------------------------------------------------------------------------------


def _rule_schema() -> dict[str, Any]:
    schema = Rule.model_json_schema(by_alias=True)
    schema.setdefault("$defs", {}).update(predicate_json_schema_defs())
    when = schema["properties"]["when"]
    schema["properties"]["when"] = {"$ref": "#/$defs/Predicate", "description": when.get("description", "")}
    return schema


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every registry JSON Schema by file name under ``schemas/``; a test keeps the files in step with the "
    "models."""
    models: dict[str, Callable[[], dict[str, Any]]] = {
        "registry-rule.schema.json": _rule_schema,
        "registry-index.schema.json": lambda: RegistryIndex.model_json_schema(by_alias=True),
        "registry-template.schema.json": lambda: TemplateEntry.model_json_schema(by_alias=True),
        "registry-stack.schema.json": lambda: StackMeta.model_json_schema(by_alias=True),
        "registry-engine.schema.json": lambda: EngineTable.model_json_schema(by_alias=True),
    }
    out: dict[str, dict[str, Any]] = {}
    for filename, make in models.items():
        schema = make()
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        out[filename] = schema
    return out


__all__ = [
    "BUNDLED",
    "FORMAT_VERSION",
    "EntrySummary",
    "LoadedRegistry",
    "RegistryIndex",
    "RegistryTemplate",
    "ShownEntry",
    "StackEntry",
    "StackMeta",
    "TemplateEntry",
    "bundled_registry_path",
    "compare_pins",
    "export_stack_entry",
    "extract_archive",
    "fetch_archive",
    "fetch_git",
    "find_stack",
    "find_template",
    "json_schemas",
    "list_entries",
    "load_bundled_registry",
    "load_registry_source",
    "parse_registry",
    "read_registry",
    "read_registry_files",
    "registry_digest",
    "resolve_registries",
    "search_entries",
    "show_entry",
    "source_kind",
]
