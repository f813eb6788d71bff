"""Engine versions: PEP 440 versions for Python-package engines and llama.cpp build numbers (``bNNNN``).

A llama.cpp build number is the commit count of ``master`` at a commit; the release tag ``b4628`` and
``llama-server --version`` print it. Wrappers (llama-cpp-python, Ollama) vendor a llama.cpp build, and a
llama.cpp fix reaches a wrapper only at the first release whose vendored build is at or above the fix build.
Which release vendors which build is registry data (``registry/engines/*.toml``), never code: this module
only parses those tables (:func:`parse_engine_table`) and looks versions up in them (:func:`vendored_build`).
The tables of every loaded registry count, the bundled one first (:meth:`EngineTables.merged`).

A table row is exact for its own release (the vendored submodule commit at that tag), and for the releases up
to its ``last`` when the table says so. A release between two rows is only known from below: it vendors at
least the earlier row's build. :class:`VendoredBuild` keeps that distinction, the lock records it
(``build-exact``), and a rule whose answer depends on the unknown part says so instead of guessing
(:mod:`stacklock.rules.predicates`).

An engine with no table and no adapter is not guessed either: a requirement written as llama.cpp builds
(``==b4628``) makes the version the build (:func:`is_build_requirement`); any other engine's build is unknown.
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


def is_build_requirement(text: str) -> bool:
    """Whether a version requirement is written in llama.cpp builds (``'>=b4628,<b7756'``), not PEP 440.

    The syntax decides, so an engine that no adapter describes can still be locked by its build: ``b4628`` is
    never a PEP 440 version, and a PEP 440 requirement never parses as builds.
    """
    return bool(text.strip()) and all(_CLAUSE.match(clause.strip()) for clause in text.split(","))


@functools.lru_cache(maxsize=4096)
def parse_version(text: str) -> Version | None:
    """A PEP 440 version, or None when the text is not one. Cached: rules compare the same version often."""
    try:
        return Version(text)
    except InvalidVersion:
        return None


# -- Version → vendored build tables (registry data) ------------------------------------------------------


class BuildRow(Model):
    """One release of a wrapper and the llama.cpp build it vendors; later releases vendor at least this build."""

    version: str = Field(description="The release (PEP 440) whose vendored build this row gives exactly.")
    build: str = Field(description="The vendored llama.cpp build, e.g. 'b4875'.")
    last: str | None = Field(
        default=None,
        description="The last release that vendors exactly this build too (default: this row's release only); "
        "releases after it and before the next row vendor at least this build.",
    )
    commit: str | None = Field(
        default=None,
        description="The vendored llama.cpp commit (at least 7 hex digits), which engines that report their "
        "commit are checked against.",
        pattern=r"^[0-9a-f]{7,40}$",
    )
    date: str | None = Field(default=None, description="The release date (YYYY-MM-DD), for readers.")
    note: str | None = Field(default=None, description="Patches or caveats of this release.")

    @field_validator("version", "last")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is not None and parse_version(value) is None:
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

    def build_for(self, version: str) -> VendoredBuild | None:
        """The vendored build of ``version``, exact or a lower bound; None when it precedes the first row."""
        parsed = parse_version(version)
        if parsed is None:
            return None
        found: BuildRow | None = None
        for row in self.releases:
            if parse_version(row.version) <= parsed:  # type: ignore[operator]
                found = row
            else:
                break
        if found is None:
            return None
        last = parse_version(found.last or found.version)
        exact = parsed <= last  # type: ignore[operator]
        return VendoredBuild(parse_build(found.build), exact, found.commit if exact else None)


def same_commit(one: str, other: str) -> bool:
    """Two git commit ids name the same commit: one is a prefix of the other, at least 7 hex digits long.

    What follows the hex digits is ignored: ggml reports a tree with local changes as ``0c1e570-dirty``.
    """
    one, other = _hex_prefix(one), _hex_prefix(other)
    shorter = min(len(one), len(other))
    return shorter >= 7 and one[:shorter] == other[:shorter]


def _hex_prefix(commit: str) -> str:
    match = _HEX.match(commit.strip().lower())
    return "" if match is None else match[0]


_HEX = re.compile(r"[0-9a-f]*")


@dataclass(frozen=True, slots=True)
class VendoredBuild:
    """The llama.cpp build a release carries: exact, or only known from below (``exact`` False)."""

    build: int
    exact: bool
    commit: str | None = None


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
        """The tables of several registries, in order (the bundled one first).

        For an engine in more than one, the rows are joined: a later registry adds releases the earlier ones do
        not list (a team registry can carry the row of a release newer than this stacklock), and its row for a
        release they do list wins.
        """
        return cls.of(table for registry in registries for table in registry.engines.tables.values())

    @classmethod
    def of(cls, tables: Iterable[EngineTable]) -> EngineTables:
        by_name: dict[str, EngineTable] = {}
        for table in tables:
            earlier = by_name.get(table.engine)
            by_name[table.engine] = table if earlier is None else _joined(earlier, table)
        return cls(by_name)


def _joined(earlier: EngineTable, later: EngineTable) -> EngineTable:
    rows = {parse_version(row.version): row for row in (*earlier.releases, *later.releases)}
    ordered = tuple(rows[version] for version in sorted(rows))  # type: ignore[type-var]
    return earlier.model_copy(update={"releases": ordered})


def read_engine_tables(directory: Path) -> EngineTables:
    """Read every ``*.toml`` in a registry's ``engines/`` directory."""
    return EngineTables.of(
        parse_engine_table(path.read_text(encoding="utf-8"), str(path))
        for path in sorted(directory.glob("*.toml"))
    )


def vendored_build(engine_name: str, version: str, tables: EngineTables) -> VendoredBuild | None:
    """The llama.cpp build a release of ``engine_name`` vendors, from the loaded registries' tables.

    An engine without a table, an unparseable version, or a release older than the table: None (unknown).
    """
    table = tables.tables.get(engine_name)
    return None if table is None else table.build_for(version)


__all__ = [
    "BuildRange",
    "BuildRow",
    "EngineTable",
    "EngineTables",
    "VendoredBuild",
    "is_build_requirement",
    "parse_build",
    "parse_build_range",
    "parse_engine_table",
    "parse_version",
    "read_engine_tables",
    "same_commit",
    "vendored_build",
]
