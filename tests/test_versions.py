from __future__ import annotations

import pytest

from stacklock.errors import RegistryError
from stacklock.registry.files import load_bundled_registry
from stacklock.rules.versions import (
    EngineTables,
    is_build_requirement,
    parse_build,
    parse_build_range,
    parse_engine_table,
    same_commit,
    vendored_build,
)


def test_parse_build() -> None:
    assert parse_build("b4628") == 4628
    assert parse_build("4628") == 4628
    with pytest.raises(ValueError, match=r"^'v4628' is not a llama.cpp build number; write e.g. 'b4628'$"):
        parse_build("v4628")


def test_build_ranges() -> None:
    window = parse_build_range(">=b3259, <b3266")
    assert str(window) == ">=b3259,<b3266"
    assert [b in window for b in (3258, 3259, 3265, 3266)] == [False, True, True, False]
    assert 3620 in parse_build_range("==b3620")
    assert 3620 not in parse_build_range("!=b3620")
    assert 10 in parse_build_range("<=b10")
    assert 11 in parse_build_range(">b10")
    assert "3620" not in parse_build_range("==b3620")
    with pytest.raises(ValueError, match=r"^'=>b1' is not a llama.cpp build clause"):
        parse_build_range("=>b1")


@pytest.mark.parametrize(
    ("engine", "version", "build"),
    [
        ("llama-cpp-python", "0.3.8", 4875),  # first with Gemma 3
        ("llama-cpp-python", "0.3.11", 5763),  # between rows: the earlier row, a lower bound
        ("llama-cpp-python", "0.2.59", None),  # older than the table
        ("llama-cpp-python", "0.3.36", 11312),
        ("llama-cpp-python", "not-a-version", None),
        ("ollama", "0.1.32", 2679),
        ("ollama", "0.1.38", 2770),
        ("ollama", "0.1.48", 3171),
        ("ollama", "0.3.1", 3485),
        ("llama.cpp", "b4628", None),  # no table: a build requirement decides, not a table
        ("vllm", "0.8.0", None),
    ],
)
def test_vendored_build_from_the_bundled_tables(engine: str, version: str, build: int | None) -> None:
    found = vendored_build(engine, version, load_bundled_registry().engines)
    assert (found and found.build) == build


def test_build_requirements_are_told_apart_by_their_syntax() -> None:
    assert [is_build_requirement(r) for r in ("==b4628", ">=b4628, <b7756", "==0.3.36", "", ">=b1,<2")] == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_commits_match_by_prefix_and_ignore_a_dirty_suffix() -> None:
    assert same_commit("0c1e57098", "0c1e570-dirty")
    assert same_commit("0C1E570", "0c1e57098abc")
    assert not same_commit("0c1e57", "0c1e57098")  # too short to name a commit
    assert not same_commit("0c1e570", "0c1e571")


TABLE = """engine = "wrapper"
source = "test"
[[releases]]
version = "1.0"
build = "b100"
[[releases]]
version = "{second}"
build = "{build}"
"""


def test_engine_table_lookup_and_validation() -> None:
    table = parse_engine_table(TABLE.format(second="1.2", build="b200"), "engines/wrapper.toml")
    tables = EngineTables.of([table])
    found = [vendored_build("wrapper", v, tables) for v in ("0.9", "1.0", "1.1", "1.2", "9")]
    assert [f and (f.build, f.exact) for f in found] == [
        None,
        (100, True),
        (100, False),
        (200, True),
        (200, False),
    ]
    with pytest.raises(RegistryError) as caught:
        parse_engine_table(TABLE.format(second="0.9", build="b200"), "engines/wrapper.toml")
    assert str(caught.value) == (
        "engines/wrapper.toml:3: releases: rows must ascend by version: '0.9' follows '1.0'"
    )
    with pytest.raises(RegistryError) as caught:
        parse_engine_table(TABLE.format(second="1.2", build="200x"), "engines/wrapper.toml")
    assert "'200x' is not a llama.cpp build number; write e.g. 'b4628'" in str(caught.value)
