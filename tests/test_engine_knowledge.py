"""Engine knowledge: adapters declare it, the registries' engine tables map releases to llama.cpp builds, and a
lock never invents what stacklock does not know (defaults of an engine without an adapter, the exact build of a
release between two table rows)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from stacklock.engines.base import EngineIdentity
from stacklock.engines.plugins import adapter_info, load_engine
from stacklock.errors import EngineError
from stacklock.model.lock import parse_lock, render_lock
from stacklock.registry.files import load_bundled_registry
from stacklock.rules.check import check_stack
from stacklock.rules.facts import facts_from_lock
from stacklock.rules.predicates import AtLeast, Rule, evaluate, parse_rule
from stacklock.rules.versions import EngineTables, parse_engine_table, same_commit, vendored_build
from stacklock.verify.session import check_engine_commit
from tests.conftest import CHATML, Result
from tests.test_facts import CHAT_SMOKE, LCP_VERSION, fired, lock_of, manifest

Cli = Callable[..., Result]

BUNDLED = load_bundled_registry().engines


# -- Defect: llama-cpp-python 0.3.36 vendors b11312, and a row between releases is a lower bound ---------------


def test_llama_cpp_python_0_3_36_vendors_b11312_exactly() -> None:
    found = vendored_build("llama-cpp-python", "0.3.36", BUNDLED)
    assert found is not None
    assert (found.build, found.exact, found.commit) == (11312, True, "0c1e57098")


@pytest.mark.parametrize(
    ("engine", "version", "build", "exact"),
    [
        ("llama-cpp-python", "0.3.35", 10454, True),  # a row: the submodule commit at that tag
        ("llama-cpp-python", "0.3.11", 5763, False),  # between rows: at least the earlier row's build
        ("llama-cpp-python", "0.3.37", 11312, False),  # after the last row
        ("ollama", "0.1.35", 2770, True),  # inside a row's stated span (0.1.33 to 0.1.38)
        ("ollama", "0.4.0", 3862, False),  # past the submodule era: a lower bound only
    ],
)
def test_table_rows_are_exact_only_where_the_table_says_so(
    engine: str, version: str, build: int, exact: bool
) -> None:
    found = vendored_build(engine, version, BUNDLED)
    assert found is not None
    assert (found.build, found.exact) == (build, exact)


def test_the_lock_pins_the_exact_vendored_build_and_commit(tmp_path: Path) -> None:
    if LCP_VERSION != "0.3.36":
        pytest.skip(f"llama-cpp-python {LCP_VERSION} is installed here; the lock pins the installed version")
    lock = lock_of(tmp_path, manifest())
    assert (lock.engine.build, lock.engine.build_exact, lock.engine.commit) == (11312, True, "0c1e57098")
    assert facts_from_lock(lock)["engine.build"] == 11312


def test_a_lower_bound_build_stays_a_lower_bound_in_the_lock_and_its_facts(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(engine="ollama", version="==0.4.0"))
    assert (lock.engine.build, lock.engine.build_exact) == (3862, False)
    assert facts_from_lock(lock)["engine.build"] == AtLeast(3862)


BUILD_RULE = """\
id = "fixed-in-b4000"
title = "Broken before b4000"
severity = "error"
links = ["engine"]
explanation = "A bug fixed in b4000."
fix = "Upgrade."
references = ["https://example.org/fix"]

[when]
all = [{{ fact = "engine.build", build-range = "{range}" }}]
"""


@pytest.mark.parametrize(
    ("build_range", "outcome"),
    [
        ("<b4000", "unknown"),  # b3862 or later: before or after the fix, stacklock cannot tell
        ("<b3000", "quiet"),  # every build >= b3862 is past it
        (">=b3000", "fires"),  # every build >= b3862 is in it
        (">=b3800,<b3900", "unknown"),
    ],
)
def test_a_rule_that_depends_on_the_unknown_part_of_a_build_says_so(build_range: str, outcome: str) -> None:
    rule = parse_rule(BUILD_RULE.format(range=build_range), "rules/fixed-in-b4000.toml")
    findings = evaluate([rule], {"engine.name": "ollama", "engine.build": AtLeast(3862)})
    if outcome == "quiet":
        assert findings == ()
        return
    assert len(findings) == 1
    finding = findings[0]
    assert finding.rule == "fixed-in-b4000"
    if outcome == "fires":
        assert (finding.severity.value, finding.title) == ("error", "Broken before b4000")
    else:
        assert finding.severity.value == "info"
        assert finding.title == "Cannot tell for llama.cpp build >= b3862: Broken before b4000"


# -- Defect: user registries' engine tables are used, not only the bundled ones ------------------------------


def test_a_user_registry_engine_table_decides_the_build(tmp_path: Path) -> None:
    registry = tmp_path / "team-registry"
    (registry / "engines").mkdir(parents=True)
    (registry / "registry.toml").write_text('format-version = 1\nname = "team"\n')
    (registry / "engines" / "inhouse.toml").write_text(
        'engine = "inhouse"\nsource = "our release notes"\n[[releases]]\nversion = "1.0"\nbuild = "b3260"\n'
    )
    text = (
        manifest(engine="inhouse", version="==1.0") + '\n[[registry]]\nname = "team"\nurl = "team-registry"\n'
    )
    lock = lock_of(tmp_path, text, arch="gemma2")
    assert (lock.engine.build, lock.engine.build_exact) == (3260, True)
    assert "arch-gemma2-softcap" in fired(lock)


# -- Defect: an engine whose defaults stacklock does not know gets no invented ones ----------------------------


def test_an_engine_without_an_adapter_has_unknown_defaults(tmp_path: Path) -> None:
    # The ollama adapter declares no defaults either: Ollama's built-ins change across its releases.
    info = adapter_info("ollama")
    assert info is None or info.sampler_defaults is None
    text = manifest(
        engine="ollama", version="==0.3.14", backend="context-size = 2048", sampler="temperature = 0.0"
    )
    lock = lock_of(tmp_path, text)
    assert lock.sampler.top_k is None
    assert lock.sampler.origin["top-k"] == "unknown"
    assert lock.sampler.origin["temperature"] == "manifest"
    assert lock.backend.context_size == 2048
    assert lock.backend.cache_type_k is None
    assert lock.backend.origin["cache-type-k"] == "unknown"
    assert "sampler.top-k" not in facts_from_lock(lock)
    [finding] = [f for f in lock.findings if f.rule == "engine-defaults-unknown"]
    assert finding.severity.value == "warning"
    assert "sampler.top-k" in finding.explanation
    assert "backend.cache-type-k" in finding.explanation
    assert "sampler.temperature" not in finding.explanation
    assert "[sampler]" in finding.fix
    # The lock round-trips with the unknown values left out.
    assert parse_lock(render_lock(lock)) == lock


def test_llama_cpp_python_defaults_come_from_its_adapter(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest())
    info = adapter_info("llama-cpp-python")
    assert info is not None
    assert info.sampler_defaults is not None
    assert lock.sampler.top_k == info.sampler_defaults["top_k"]
    assert lock.sampler.origin["top-k"] == "engine-default"
    assert "engine-defaults-unknown" not in fired(lock)


def test_old_locks_without_origins_or_exactness_still_read() -> None:
    # The example lock as stacklock wrote it before builds had exactness and the backend had origins.
    old = parse_lock((Path(__file__).parent / "data" / "locks" / "before-engine-knowledge.lock").read_text())
    assert (old.engine.build, old.engine.build_exact, old.engine.commit) == (10454, False, None)
    assert old.backend.origin == {}
    assert facts_from_lock(old)["engine.build"] == AtLeast(10454)


# -- Policy at lock time: what the adapter refused at record -------------------------------------------------


def test_unseeded_sampling_is_found_at_lock(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(sampler="temperature = 0.7"))
    [finding] = [f for f in lock.findings if f.rule == "policy-unseeded-sampling"]
    assert finding.severity.value == "error"
    assert "sampler.seed" in finding.fix


def test_seeded_or_greedy_sampling_is_fine(tmp_path: Path) -> None:
    seeded = lock_of(tmp_path / "seeded", manifest(sampler="temperature = 0.7\nseed = 3"))
    greedy = lock_of(tmp_path / "greedy", manifest(sampler="temperature = 0.0"))
    assert "policy-unseeded-sampling" not in fired(seeded) | fired(greedy)


def test_a_prompt_that_may_overflow_the_context_is_found_at_lock(tmp_path: Path) -> None:
    long_smoke = '\n[[smoke]]\nname = "long"\nprompt = "' + "word " * 200 + '"\nmax-tokens = 8\n'
    small = lock_of(
        tmp_path / "small", manifest(backend="context-size = 64", smoke=long_smoke), chat_template=CHATML
    )
    roomy = lock_of(
        tmp_path / "roomy", manifest(backend="context-size = 4096", smoke=long_smoke), chat_template=CHATML
    )
    assert "policy-context-overflow" in fired(small)
    [finding] = [f for f in small.findings if f.rule == "policy-context-overflow"]
    assert "long" in finding.title
    assert "policy-context-overflow" not in fired(roomy)


def test_a_chat_smoke_on_the_default_context_is_fine(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(smoke=CHAT_SMOKE), chat_template=CHATML)
    assert "policy-context-overflow" not in fired(lock)


# -- The commit the engine reports is checked against the lock at record and verify ----------------------------


def test_the_reported_commit_must_be_the_locked_one(tmp_path: Path) -> None:
    if LCP_VERSION != "0.3.36":
        pytest.skip(f"llama-cpp-python {LCP_VERSION} is installed here; the lock pins the installed version")
    lock = lock_of(tmp_path, manifest())
    same = _identity("0c1e570-dirty")
    check_engine_commit(lock, same)  # ggml's own abbreviation of the pinned commit
    check_engine_commit(lock, _identity(None))  # an engine that cannot say: nothing to check
    with pytest.raises(EngineError) as caught:
        check_engine_commit(lock, _identity("1234abc"))
    assert caught.value.one_line().startswith(
        "installed llama-cpp-python 0.3.36 runs llama.cpp commit 1234abc, but the lock pins 0c1e57098 "
        "(build b11312) for that version"
    )


def _identity(build: str | None) -> EngineIdentity:
    return EngineIdentity(
        name="llama-cpp-python",
        version="0.3.36",
        build=build,
        backend="cpu",
        system_info="",
        python="CPython 3.11",
        platform="Linux",
        cpu="x86_64",
    )


@pytest.mark.engine
def test_the_installed_engine_reports_the_commit_its_table_row_names() -> None:
    pytest.importorskip("llama_cpp", reason="the 'llama' extra (llama-cpp-python) is not installed")
    engine = load_engine("llama-cpp-python")
    identity = engine.identity()
    row = vendored_build("llama-cpp-python", identity.version, BUNDLED)
    assert identity.build is not None
    assert row is not None
    assert row.exact
    assert row.commit is not None
    assert same_commit(row.commit, identity.build)


def test_a_user_registry_extends_the_bundled_table_of_an_engine() -> None:
    team = parse_engine_table(
        'engine = "llama-cpp-python"\nsource = "our build farm"\n'
        '[[releases]]\nversion = "0.3.37"\nbuild = "b11400"\ncommit = "abcdef1"\n',
        "team/engines/llama-cpp-python.toml",
    )
    tables = EngineTables.of([*BUNDLED.tables.values(), team])
    newer = vendored_build("llama-cpp-python", "0.3.37", tables)
    assert newer is not None
    assert (newer.build, newer.exact, newer.commit) == (11400, True, "abcdef1")
    older = vendored_build("llama-cpp-python", "0.3.36", tables)
    assert older is not None
    assert (older.build, older.exact) == (11312, True)


@dataclass(frozen=True)
class TeamRegistry:
    rules: tuple[Rule, ...]
    engines: EngineTables
    pretokenizers: None = None  # no pre-tokenizer table of its own


def test_check_judges_the_installed_engine_with_a_user_registry_table(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest())
    team_table = parse_engine_table(
        'engine = "llama-cpp-python"\nsource = "ours"\n[[releases]]\nversion = "9.9"\nbuild = "b99999"\n',
        "team/engines/llama-cpp-python.toml",
    )
    team = TeamRegistry(
        (parse_rule(BUILD_RULE.format(range=">=b99999"), "rules/fixed-in-b4000.toml"),),
        EngineTables.of([team_table]),
    )
    result = check_stack(lock, [load_bundled_registry(), team], installed_engine="9.9")
    assert "fixed-in-b4000" in {f.rule for f in result.findings}


def test_check_reports_the_policy_findings_lock_reported(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(sampler="temperature = 0.7"))
    result = check_stack(lock, [load_bundled_registry()], installed_engine=None)
    assert "policy-unseeded-sampling" in {f.rule for f in result.blocking}
