"""Registry files: the pure parsing of a registry directory, and the bundled registry.

A registry is a directory of data, never code::

    registry.toml                    format-version, name, description
    rules/<id>.toml                  compatibility rules (stacklock.rules.predicates)
    engines/<engine>.toml            release → vendored llama.cpp build tables (stacklock.rules.versions)
    templates/<id>.toml + <file>     known-good chat templates with provenance
    stacks/<name>/stack.toml         known-good stacks: metadata, plus
    stacks/<name>/llmstack.toml        the manifest,
    stacks/<name>/llmstack.lock        the lock, and
    stacks/<name>/certificate.json     the certificate of its verification

Its *digest* is the sha256 over its files, sorted by relative path (hidden files and directories excluded).
``parse_*`` functions are pure (file contents in, models out); ``read_*``/``load_*`` read directories.
A malformed registry file is a :class:`~stacklock.errors.RegistryError` naming the file and key path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal

from pydantic import Field, field_validator

from stacklock.errors import RegistryError
from stacklock.files.digest import sha256_bytes
from stacklock.model.base import Model
from stacklock.model.findings import RegistryPin
from stacklock.model.manifest import Name
from stacklock.model.toml import parse_toml, validate
from stacklock.registry.location import bundled_registry_path
from stacklock.rules.predicates import Rule, parse_rule, predicate_json_schema_defs
from stacklock.rules.pretokenizers import PRETOKENIZERS_FILE, PreTokenizerTable, parse_pretokenizer_table
from stacklock.rules.versions import EngineTable, EngineTables, parse_engine_table
from stacklock.sources.local import read_bytes_file

#: The registry format this stacklock reads; ``registry.toml`` says which one a registry is written in.
FORMAT_VERSION: Final = 1
BUNDLED: Final = "bundled"
STACK_FILES: Final = ("stack.toml", "llmstack.toml", "llmstack.lock", "certificate.json")
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
    #: The tokenizer.ggml.pre values llama.cpp accepts (pretokenizers.toml), when the registry has the table.
    pretokenizers: PreTokenizerTable | None = None

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
            actual = sha256_bytes(files[template_path])
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
        pretokenizers=parse_pretokenizer_table(
            _text(files, PRETOKENIZERS_FILE, f"{origin}/{PRETOKENIZERS_FILE}"),
            f"{origin}/{PRETOKENIZERS_FILE}",
        )
        if PRETOKENIZERS_FILE in files
        else None,
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
            # A symlink could lead out of the registry (to /proc/self/environ); only regular files are read.
            if not path.is_symlink() and path.is_file():
                rel = path.relative_to(root).as_posix()
                files[rel] = read_bytes_file(path, f"{root}: {rel}", RegistryError)
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


def load_bundled_registry() -> LoadedRegistry:
    root = bundled_registry_path()
    return read_registry(root, name=BUNDLED, url=BUNDLED, origin="registry")


def bundled_templates_for(architecture: str) -> tuple[str, ...]:
    """Ids of the bundled registry's known-good templates for an architecture, for `stacklock init`."""
    return tuple(t.id for t in load_bundled_registry().templates if architecture in t.architectures)


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
        "registry-pretokenizers.schema.json": lambda: PreTokenizerTable.model_json_schema(by_alias=True),
    }
    out: dict[str, dict[str, Any]] = {}
    for filename, make in models.items():
        schema = make()
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        out[filename] = schema
    return out
