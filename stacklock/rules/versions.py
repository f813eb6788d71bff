"""Engine versions: PEP 440 versions for Python-package engines and llama.cpp build numbers (``bNNNN``).

A llama.cpp build number is the commit count of ``master`` at a commit; the release tag ``b4628`` and
``llama-server --version`` print it. Wrappers (llama-cpp-python, Ollama) vendor a llama.cpp build, and a
llama.cpp fix reaches a wrapper only at the first release whose vendored build is at or above the fix build.
Which release vendors which build is registry data (``registry/engines/*.toml``), never code: this module
only parses those tables (:func:`parse_engine_table`) and looks versions up in them (:func:`vendored_build`).

A table row says "from this release on, the vendored build is at least this one". A release between two rows
is given the earlier row's build, which is a lower bound: rules of the form ``build < bFIX`` may then fire for
a release that in fact already carries the fix, never the other way round.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from packaging.version import InvalidVersion, Version
from pydantic import Field, field_validator

from stacklock.errors import RegistryError
from stacklock.model.base import Model
from stacklock.model.toml import parse_toml, validate

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path

#: Engines whose own versions are llama.cpp build numbers.
BUILD_NUMBERED_ENGINES = frozenset({"llama.cpp", "llama-server"})

_BUILD = re.compile(r"^b?(\d+)$")
_CLAUSE = re.compile(r"^(==|!=|<=|>=|<|>)\s*b(\d+)$")

Operator = Literal["==", "!=", "<=", ">=", "<", ">"]


def parse_build(text: str) -> int:
    """``'b4628'`` (or ``'4628'``) → ``4628``. Raises ValueError with a message that says what to write."""
    match = _BUILD.match(text.strip())
    if match is None:
        raise ValueError(f"'{text}' is not a llama.cpp build number; write e.g. 'b4628'")
    return int(match[1])


@dataclass(frozen=True, slots=True)
class BuildRange:
    """A conjunction of clauses over llama.cpp build numbers, e.g. ``>=b3259,<b3266``."""

    clauses: tuple[tuple[Operator, int], ...]

    def __contains__(self, build: object) -> bool:
        if not isinstance(build, int) or isinstance(build, bool):
            return False
        return all(_compare(build, op, bound) for op, bound in self.clauses)

    def __str__(self) -> str:
        return ",".join(f"{op}b{bound}" for op, bound in self.clauses)


def _compare(build: int, op: Operator, bound: int) -> bool:
    # A chain of comparisons is faster than an operator-module lookup in the 10,000-rule benchmark.
    if op == "<":
        return build < bound
    if op == ">=":
        return build >= bound
    if op == "<=":
        return build <= bound
    if op == ">":
        return build > bound
    if op == "==":
        return build == bound
    return build != bound


def parse_build_range(text: str) -> BuildRange:
    """Parse ``'>=b3259,<b3266'``. Raises ValueError naming the bad clause and what to write instead."""
    clauses: list[tuple[Operator, int]] = []
    for raw in text.split(","):
        clause = raw.strip()
        match = _CLAUSE.match(clause)
        if match is None:
            raise ValueError(
                f"'{clause}' is not a llama.cpp build clause; write e.g. '<b3266' or '>=b3259,<b3266'"
            )
        op: Operator = match[1]  # type: ignore[assignment]
        clauses.append((op, int(match[2])))
    return BuildRange(tuple(clauses))


@functools.lru_cache(maxsize=4096)
def parse_version(text: str) -> Version | None:
    """A PEP 440 version, or None when the text is not one. Cached: rules compare the same version often."""
    try:
        return Version(text)
    except InvalidVersion:
        return None


# -- Version → vendored build tables (registry data) ------------------------------------------------------


class BuildRow(Model):
    """One release of a wrapper and the llama.cpp build it vendors from that release on."""

    version: str = Field(description="The first release (PEP 440) that vendors this build.")
    build: str = Field(description="The vendored llama.cpp build, e.g. 'b4875'.")
    date: str | None = Field(default=None, description="The release date (YYYY-MM-DD), for readers.")
    note: str | None = Field(default=None, description="Patches or caveats of this release.")

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if parse_version(value) is None:
            raise ValueError(f"'{value}' is not a PEP 440 version; write e.g. '0.3.8'")
        return value

    @field_validator("build")
    @classmethod
    def _build(cls, value: str) -> str:
        parse_build(value)
        return value


class EngineTable(Model):
    """``registry/engines/<engine>.toml``: which llama.cpp build each release of a wrapper vendors."""

    engine: str = Field(description="The engine name as locks spell it, e.g. 'llama-cpp-python' or 'ollama'.")
    vendors: Literal["llama.cpp"] = Field(default="llama.cpp", description="What the engine vendors.")
    source: str = Field(description="How the table was derived (submodule commit at each tag, ...).")
    references: tuple[str, ...] = Field(default=(), description="Where the rows can be re-checked.")
    releases: tuple[BuildRow, ...] = Field(
        min_length=1, description="Rows in ascending version order; each holds until the next row."
    )

    @field_validator("releases")
    @classmethod
    def _ascending(cls, rows: tuple[BuildRow, ...]) -> tuple[BuildRow, ...]:
        for earlier, later in itertools.pairwise(rows):
            if not parse_version(earlier.version) < parse_version(later.version):  # type: ignore[operator]
                raise ValueError(
                    f"rows must ascend by version: '{later.version}' follows '{earlier.version}'"
                )
            if parse_build(later.build) < parse_build(earlier.build):
                raise ValueError(f"builds must not go down: '{later.version}' vendors an older build")
        return rows

    def build_for(self, version: str) -> int | None:
        """The vendored build (a lower bound) of ``version``; None when it precedes the first row."""
        parsed = parse_version(version)
        if parsed is None:
            return None
        found: int | None = None
        for row in self.releases:
            if parse_version(row.version) <= parsed:  # type: ignore[operator]
                found = parse_build(row.build)
            else:
                break
        return found


def parse_engine_table(text: str, origin: str) -> EngineTable:
    """Parse one ``registry/engines/*.toml`` file; errors name the file and key path."""
    return validate(EngineTable, parse_toml(text, origin, RegistryError), origin, text, RegistryError)


class HasEngineTables(Protocol):
    @property
    def engines(self) -> EngineTables: ...


@dataclass(frozen=True, slots=True)
class EngineTables:
    """Every engine table of the loaded registries, by engine name."""

    tables: Mapping[str, EngineTable]

    @classmethod
    def merged(cls, registries: Iterable[HasEngineTables]) -> EngineTables:
        """The tables of several registries; for an engine in more than one, the first registry's wins."""
        return cls.of(table for registry in registries for table in registry.engines.tables.values())

    @classmethod
    def of(cls, tables: Iterable[EngineTable]) -> EngineTables:
        by_name: dict[str, EngineTable] = {}
        for table in tables:
            by_name.setdefault(table.engine, table)
        return cls(by_name)


def engine_build(engine_name: str, version: str, tables: EngineTables) -> int | None:
    """The llama.cpp build an engine runs: its own build number, or the build a wrapper vendors."""
    if engine_name in BUILD_NUMBERED_ENGINES:
        try:
            return parse_build(version)
        except ValueError:
            return None
    table = tables.tables.get(engine_name)
    return None if table is None else table.build_for(version)


def read_engine_tables(directory: Path) -> EngineTables:
    """Read every ``*.toml`` in a registry's ``engines/`` directory."""
    return EngineTables.of(
        parse_engine_table(path.read_text(encoding="utf-8"), str(path))
        for path in sorted(directory.glob("*.toml"))
    )


def vendored_build(engine_name: str, version: str, tables: EngineTables) -> int | None:
    """The llama.cpp build of ``engine_name`` at ``version``, from the loaded registries' tables.

    llama.cpp itself: the version is the build (``'b4628'`` → 4628). A wrapper: its table's lower bound.
    Unknown engine, unparseable version, or a release older than the table: None (the fact stays unknown).
    """
    return engine_build(engine_name, version, tables)


__all__ = [
    "BUILD_NUMBERED_ENGINES",
    "BuildRange",
    "BuildRow",
    "EngineTable",
    "EngineTables",
    "engine_build",
    "parse_build",
    "parse_build_range",
    "parse_engine_table",
    "parse_version",
    "read_engine_tables",
    "vendored_build",
]
