"""Regression tests for the engine-side gaps of issue 13 item 2: a KV cache larger than the machine, a regex that
backtracks catastrophically, a lock whose template no longer compiles, a model file that cannot be opened.

Each runs the real CLI in a child process (``tests.hardening_cases.measure``: exit code, stderr, time, peak RSS).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from stacklock.engines.machine import read_available_memory
from stacklock.engines.memory import check_kv_cache_fits, estimate_kv_cache_bytes
from stacklock.errors import EngineError, RegistryError
from stacklock.gguf.reader import read_gguf
from stacklock.model.effective import EffectiveBackend
from stacklock.model.manifest import BackendKind, Expectation
from stacklock.model.pattern import SEARCH_TIMEOUT_S
from stacklock.rules.predicates import evaluate, parse_rule
from stacklock.verify.compare import expectation_failure
from tests.gguf_builder import VT, TypedValue, build_tiny_gguf, gemma_model_path
from tests.hardening_cases import CATASTROPHIC_REGEX, MEMORY_LIMIT_MB, Outcome, baseline_rss_mb, measure
from tests.test_certify_cli import _project

pytest.importorskip("llama_cpp", reason="the 'llama' extra (llama-cpp-python) is not installed")

pytestmark = pytest.mark.engine

EXAMPLE = Path(__file__).parent.parent / "examples" / "gemma3-270m"
GEMMA = "models/gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> float:
    return baseline_rss_mb(tmp_path_factory.mktemp("baseline"))


@pytest.fixture(scope="module")
def gemma() -> Path:
    path = gemma_model_path()
    if path is None:
        pytest.skip("the Gemma 3 270M model is not installed (the 'example' extra)")
    return path


def _one_error(outcome: Outcome, code: int) -> str:
    """The single `error:` line of a failed run that neither hung nor printed a traceback."""
    assert not outcome.hung, f"took {outcome.seconds:.1f} s"
    assert not outcome.traceback, outcome.stderr
    assert outcome.code == code, outcome.stderr
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, outcome.stderr
    return errors[0]


def _recorded(path: Path) -> Path:
    """The tiny certify stack, locked and recorded through the CLI."""
    project = _project(path)
    for command in ("lock", "record"):
        outcome = measure((command,), project)
        assert outcome.code == 0, outcome.stderr
    return project


def _edit_lock(project: Path, old: str, new: str) -> None:
    lock = project / "llmstack.lock"
    text = lock.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    lock.write_text(text.replace(old, new), encoding="utf-8")


def _verify_json(project: Path) -> tuple[int, dict[str, object], str]:
    done = subprocess.run(
        [sys.executable, "-m", "stacklock", "verify", "--format", "json"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, json.loads(done.stdout), done.stderr


def _stage(report: dict[str, object], smoke: str, stage: str) -> dict[str, str]:
    results = report["results"]
    assert isinstance(results, list)
    result = next(r for r in results if r["name"] == smoke)
    return next(s for s in result["stages"] if s["stage"] == stage)


# -- backend.context-size against the machine's memory ----------------------------------------------------


@pytest.mark.gemma
def test_the_kv_estimate_is_what_llama_cpp_allocates_for_gemma(gemma: Path) -> None:
    metadata = read_gguf(gemma).metadata
    # llama.cpp 0.3.36 logs for n_ctx 32768: a 96 MiB non-SWA cache (3 layers) and a 480 MiB full-size SWA
    # cache (15 layers), K and V in f16.
    assert estimate_kv_cache_bytes(metadata, 32768, None, None) == 576 << 20
    # q8_0 keys (34 bytes per 32) and q4_0 values (18 bytes per 32) shrink it in proportion.
    assert estimate_kv_cache_bytes(metadata, 32768, "q8_0", "q4_0") == (288 << 20) * (34 + 18) // 64


@pytest.mark.gemma
def test_a_normal_gemma_context_passes_the_memory_check(gemma: Path) -> None:
    # Gemma's whole trained context (32768) costs 576 MiB: any machine that runs the tests has that.
    check_kv_cache_fits(gemma, EffectiveBackend(kind=BackendKind.CPU, context_size=32768))


@pytest.mark.gemma
def test_a_gemma_context_beyond_the_machine_is_refused_before_loading(
    tmp_path: Path, gemma: Path, baseline: float
) -> None:
    shutil.copy(EXAMPLE / "llmstack.toml", tmp_path / "llmstack.toml")
    shutil.copy(EXAMPLE / "llmstack.lock", tmp_path / "llmstack.lock")
    (tmp_path / "models").mkdir()
    (tmp_path / GEMMA).symlink_to(gemma)
    # 16M tokens passes the manifest's bound (no trained context is larger), and is 288 GiB of KV cache.
    _edit_lock(tmp_path, "context-size = 1024\n", "context-size = 16777216\n")
    available = read_available_memory()
    assert available is not None
    assert available < 288 << 30
    for command in ("verify", "record"):
        outcome = measure((command,), tmp_path, {"STACKLOCK_ALLOW_PATHS": str(gemma.resolve().parent)})
        error = _one_error(outcome, 3)
        assert error.startswith(
            "error: backend.context-size = 16777216 needs a KV cache of 288.0 GiB for gemma-3-270m-q4_k_m.gguf, "
            "more than the "
        )
        assert error.endswith(
            " GiB of memory this machine has available; lower backend.context-size in llmstack.toml (or quantize "
            "the cache with backend.cache-type-k and cache-type-v) and re-lock"
        )
        # Refused before the engine starts: no engine step, no model in memory.
        assert "loading the model" not in outcome.stderr
        assert outcome.max_rss_mb - baseline < MEMORY_LIMIT_MB


def test_headers_without_an_attention_cache_are_left_to_the_engine(tmp_path: Path) -> None:
    recurrent = build_tiny_gguf(tmp_path / "r.gguf", extra_metadata={"llama.attention.head_count": None})
    assert estimate_kv_cache_bytes(read_gguf(recurrent).metadata, 1 << 24, None, None) is None
    mla = build_tiny_gguf(
        tmp_path / "m.gguf", extra_metadata={"llama.attention.kv_lora_rank": TypedValue(512, VT.UINT32)}
    )
    assert estimate_kv_cache_bytes(read_gguf(mla).metadata, 1 << 24, None, None) is None
    per_layer = build_tiny_gguf(
        tmp_path / "p.gguf",
        extra_metadata={"llama.attention.head_count_kv": TypedValue([1, 4], VT.ARRAY, VT.UINT32)},
    )
    # Tiny: 2 layers, head size 16; one KV head in the first layer and four in the second.
    assert (
        estimate_kv_cache_bytes(read_gguf(per_layer).metadata, 100, None, None) == (1 + 4) * 16 * 2 * 2 * 100
    )


def test_a_tiny_model_whose_cache_cannot_fit_is_refused(tmp_path: Path) -> None:
    model = build_tiny_gguf(tmp_path / "tiny.gguf")
    metadata = read_gguf(model).metadata
    needed = estimate_kv_cache_bytes(metadata, 1 << 24, "f32", "f32")
    assert needed == 2 * 64 * 2 * 4 << 24  # 2 layers, 64 K + 64 V, 4 bytes, 16M tokens: 16 GiB.
    available = read_available_memory()
    assert available is not None
    backend = EffectiveBackend(
        kind=BackendKind.CPU, context_size=1 << 24, cache_type_k="f32", cache_type_v="f32"
    )
    if needed > available:
        with pytest.raises(EngineError, match=r"needs a KV cache of 16\.0 GiB for tiny\.gguf"):
            check_kv_cache_fits(model, backend)
    else:
        check_kv_cache_fits(model, backend)


# -- Regular expressions that backtrack catastrophically --------------------------------------------------


def test_a_catastrophic_expectation_regex_is_a_failed_expectation_not_a_hang() -> None:
    start = time.monotonic()
    failure = expectation_failure(Expectation(regex="(a|aa)+$"), "a" * 60 + "b")
    assert time.monotonic() - start < SEARCH_TIMEOUT_S + 2
    assert failure == (
        f"the regular expression '(a|aa)+$' did not finish within {SEARCH_TIMEOUT_S:g} s on 61 characters (it "
        "backtracks catastrophically); simplify it, e.g. remove nested repetition"
    )
    # The same engine still answers ordinary patterns.
    assert expectation_failure(Expectation(regex=r"^a+b$"), "a" * 60 + "b") is None
    assert expectation_failure(Expectation(regex=r"^c"), "ab") == (
        "the output does not match the regular expression '^c'"
    )


def test_a_registry_rule_whose_regex_never_ends_is_one_line() -> None:
    text = (
        'id = "slow"\ntitle = "t"\nseverity = "warning"\nlinks = ["model"]\nexplanation = "e"\nfix = "f"\n'
        f'references = ["a/b#1"]\n[when]\nfact = "gguf.general.name"\nregex = "{CATASTROPHIC_REGEX}"\n'
    )
    rule = parse_rule(text, "rules/slow.toml")
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        evaluate([rule], {"gguf.general.name": "x" * 60})
    assert time.monotonic() - start < SEARCH_TIMEOUT_S + 2
    assert info.value.one_line().startswith(
        f"rule 'slow': the regular expression '{CATASTROPHIC_REGEX}' did not finish"
    )
    assert info.value.exit_code == 2


def test_record_and_verify_bound_a_catastrophic_smoke_regex(tmp_path: Path) -> None:
    project = _project(tmp_path)
    manifest = project / "llmstack.toml"
    manifest.write_text(
        manifest.read_text() + f'\n[[smoke]]\nname = "long"\nprompt = "Once"\nmax-tokens = 32\n'
        f"expect = {{ regex = '{CATASTROPHIC_REGEX}' }}\n"
    )
    assert measure(("lock",), project).code == 0
    record = measure(("record",), project)
    assert not record.hung
    assert not record.traceback, record.stderr
    assert record.code == 0, record.stderr
    assert (
        f"warning: smoke 'long': the regular expression '{CATASTROPHIC_REGEX}' did not finish within"
        in record.stderr
    )
    start = time.monotonic()
    code, report, err = _verify_json(project)
    assert time.monotonic() - start < 60
    assert "Traceback" not in err
    assert code == 1
    output = _stage(report, "long", "output")
    assert output["status"] == "fail"
    assert output["detail"].startswith(f"the regular expression '{CATASTROPHIC_REGEX}' did not finish within")


# -- verify on a lock whose template no longer compiles ---------------------------------------------------


def test_verify_on_a_template_that_no_longer_compiles_fails_at_template(tmp_path: Path) -> None:
    project = _recorded(tmp_path)
    # As if the lock were edited, or a Jinja upgrade rejected the template: the digest matches the new text,
    # so only its compilation can fail.
    lock = (project / "llmstack.lock").read_text()
    old = tomllib.loads(lock)["template"]
    text = "{% break %}" + old["text"]
    lock = lock.replace(old["sha256"], hashlib.sha256(text.encode()).hexdigest())
    lock = lock.replace('text = """{% for m', 'text = """{% break %}{% for m', 1)
    (project / "llmstack.lock").write_text(lock)
    code, report, err = _verify_json(project)
    assert "Traceback" not in err
    assert code == 1
    template = _stage(report, "hello", "template")
    assert template["status"] == "fail"
    assert template["detail"] == (
        "chat template (tiny.gguf: tokenizer.chat_template): does not compile ('break' outside loop); "
        "{% break %} and {% continue %} belong inside a {% for %} loop; fix the template"
    )
    assert _stage(report, "hello", "generation")["status"] == "skip"
    # The raw prompt uses no template: it still reproduces.
    assert _stage(report, "raw", "output")["status"] == "pass"
    # record cannot store goldens for a prompt it cannot render: one line, exit 2.
    error = _one_error(measure(("record",), project), 2)
    assert error.startswith("error: chat template (tiny.gguf: tokenizer.chat_template): does not compile")


# -- verify on a model path that cannot be opened ---------------------------------------------------------


def test_verify_on_a_model_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    project = _recorded(tmp_path)
    (project / "tiny.gguf").unlink()
    (project / "tiny.gguf").mkdir()
    for command in ("verify", "record"):
        error = _one_error(measure((command,), project), 2)
        assert (
            error
            == "error: model.path in the lock: tiny.gguf is a directory, not a regular file; name a file"
        )


def test_verify_on_a_model_link_to_a_device_is_one_line(tmp_path: Path) -> None:
    project = _recorded(tmp_path)
    (project / "tiny.gguf").unlink()
    (project / "tiny.gguf").symlink_to("/dev/zero")
    error = _one_error(measure(("verify",), project), 2)
    assert error == (
        "error: model.path in the lock: tiny.gguf is in a pseudo file system (/dev/zero); stacklock never reads it"
    )


def test_verify_on_a_model_this_user_cannot_read_is_one_line(tmp_path: Path) -> None:
    """Permissions do not stop root: as root, the CLI runs as 'nobody' (setpriv) in a directory it may enter."""
    as_root = os.geteuid() == 0
    if as_root and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop privileges")
    project = _recorded(tmp_path)
    # The digest is cached by now: verify must still notice that the engine could not read the file.
    (project / "tiny.gguf").chmod(0)
    env = {}
    if as_root:
        for directory in (tmp_path, *tmp_path.parents):
            if directory.stat().st_mode & 0o005 != 0o005:
                directory.chmod(directory.stat().st_mode | 0o005)
        cache = tmp_path / "nobody-cache"
        cache.mkdir(mode=0o777)
        cache.chmod(0o777)
        env = {"STACKLOCK_CACHE_DIR": str(cache)}
    for command in ("verify", "record"):
        args = (command,)
        if as_root:
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m"]
            done = subprocess.run(
                [*prefix, "stacklock", *args],
                cwd=project,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                env={**os.environ, **env},
            )
            outcome = Outcome(done.returncode, done.stderr, done.stdout, 0.0, 0.0, hung=False)
        else:
            outcome = measure(args, project, env)
        error = _one_error(outcome, 2)
        assert error == (
            "error: model.path in the lock: tiny.gguf: cannot read it (Permission denied); make the file "
            "readable by this user, or put the locked file back"
        )
