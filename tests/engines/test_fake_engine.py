"""The record/verify session, the engine session and the child-process transport, on the fake engine.

The fake engine (tests/plugins/fake_engine) is a real plugin of the ``stacklock.engines`` entry-point group;
it runs in milliseconds and can be told to crash, hang, fail or return malformed data, so every path between
stacklock and an engine is exercised without llama.cpp.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stacklock.engines.runner import EngineSession, RenderedSmoke
from stacklock.errors import EngineError, ExitCode, UsageError
from stacklock.lock.project import read_lock
from stacklock.model.effective import EffectiveSampler
from stacklock.model.lock import Lock
from stacklock.verify.session import record_lock, verify_lock
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

Cli = Callable[..., Result]

MANIFEST = """\
[stack]
name = "fake-stack"

[model]
source = "tiny.gguf"

[template]
source = "gguf"

[engine]
name = "fake"
version = "==0"

[backend]
kind = "cpu"
context-size = 256

[sampler]
temperature = 0.0
seed = 0

[[smoke]]
name = "hello"
messages = [{ role = "user", content = "Hello" }]
max-tokens = 8

[[smoke]]
name = "raw"
prompt = "Once upon a time"
max-tokens = 20
"""


@pytest.fixture
def project(tmp_path: Path, fake_engine: str, cli: Cli) -> Path:
    """A tiny stack on the fake engine, locked."""
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML)
    (tmp_path / "llmstack.toml").write_text(MANIFEST, encoding="utf-8")
    locked = cli("lock", cwd=tmp_path)
    assert locked.code == 0, locked.err
    return tmp_path


@pytest.fixture
def recorded(project: Path, cli: Cli) -> Path:
    result = cli("record", cwd=project)
    assert result.code == 0, result.err
    return project


def test_record_stores_what_the_fake_engine_generates(recorded: Path) -> None:
    lock = read_lock(recorded / "llmstack.lock")
    (recording,) = lock.recordings
    raw = recording.goldens["raw"]
    # The fake engine's rule, worked out by hand for "Once upon a time" with a BOS: 12 letters, then EOS.
    assert raw.text == "ra cplguycpl"
    assert raw.tokens[-1] == 2
    assert len(raw.tokens) == 13
    # Its first step: the chosen letter, then its neighbours one nat apart, the lower id first on a tie.
    first = raw.top_logprobs[0]
    assert [token for token, _ in first] == [ord(c) + 3 for c in "rqspt"]
    assert [round(b - a, 3) for (_, a), (_, b) in itertools.pairwise(first)] == [
        -1.0,
        0.0,
        -1.0,
        0.0,
    ]
    assert recording.id == "fake-0-cpu"
    assert recording.engine["name"] == "fake"
    assert recording.engine["version"] == "0"
    # What the fake engine does not report (its build) is left out, not written as an empty value.
    assert "build" not in recording.engine


def test_record_then_verify_reproduces(recorded: Path, cli: Cli) -> None:
    result = cli("verify", "--format", "json", cwd=recorded)
    assert result.code == 0, result.out + result.err
    report = json.loads(result.out)
    assert report["reproduced"] is True
    assert [r["name"] for r in report["results"]] == ["hello", "raw"]


def test_verify_names_the_generation_stage_when_the_engine_drifts(
    recorded: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACKLOCK_FAKE_ENGINE", "drift")
    result = cli("verify", "--format", "json", cwd=recorded)
    assert result.code == ExitCode.STACK_WRONG
    stages = [(s["stage"], s["status"]) for s in json.loads(result.out)["results"][1]["stages"]]
    assert stages[:4] == [
        ("artifacts", "pass"),
        ("template", "pass"),
        ("tokenization", "pass"),
        ("generation", "fail"),
    ]


def test_verify_names_the_tokenization_stage_when_the_tokenizer_drifts(
    recorded: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACKLOCK_FAKE_ENGINE", "tokenize-drift")
    result = cli("verify", "--format", "json", cwd=recorded)
    assert result.code == ExitCode.STACK_WRONG
    stages = [(s["stage"], s["status"]) for s in json.loads(result.out)["results"][0]["stages"]]
    assert stages[:3] == [("artifacts", "pass"), ("template", "pass"), ("tokenization", "fail")]


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        (
            "abort-on-load",
            "error: the engine (fake) crashed (signal SIGABRT) while loading the model tiny.gguf",
        ),
        ("abort", "error: the engine (fake) crashed (signal SIGABRT) while running the smoke prompt 'hello'"),
        ("hang", "error: the engine (fake) did not answer for 4 s while running the smoke prompt 'hello'"),
        ("error", "error: fake engine: the backend refused the prompt; this is a test"),
        (
            "bug",
            "error: the engine adapter (fake) failed while running the smoke prompt 'hello': ZeroDivisionError: division by zero",
        ),
        (
            "malformed",
            "error: the engine adapter (fake) returned a malformed generation: generation.prompt_tokens: Input should be a valid tuple",
        ),
    ],
)
def test_an_engine_failure_is_exit_3_with_one_line(
    project: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch, mode: str, says: str
) -> None:
    monkeypatch.setenv("STACKLOCK_FAKE_ENGINE", mode)
    monkeypatch.setenv("STACKLOCK_ENGINE_TIMEOUT", "4")
    started = time.monotonic()
    result = cli("record", cwd=project)
    assert time.monotonic() - started < 30
    assert result.code == ExitCode.UNAVAILABLE
    assert result.out == ""
    # Piped, the reporter prints one line per step (hashing, loading); the failure is one error line, last.
    *steps, last = result.err.splitlines()
    assert last.startswith(says), result.err
    assert not any(line.startswith("error:") or "Traceback" in line for line in steps), result.err
    # A failed record leaves the lock without goldens.
    assert not read_lock(project / "llmstack.lock").recordings


def test_a_bad_timeout_setting_is_a_usage_error(
    project: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACKLOCK_ENGINE_TIMEOUT", "soon")
    result = cli("record", cwd=project)
    assert result.code == ExitCode.BAD_INPUT
    assert result.err.startswith("error: STACKLOCK_ENGINE_TIMEOUT='soon' is not a number of seconds")


def test_the_cli_finds_the_plugin_in_a_child_process(project: Path) -> None:
    # PYTHONPATH carries the plugin to a separate interpreter, as an installed distribution would be found.
    env = {**os.environ, "STACKLOCK_ENGINE_TIMEOUT": "60"}
    done = subprocess.run(
        [sys.executable, "-m", "stacklock", "record"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "recorded raw: 13 token(s), 'ra cplguycpl'" in done.stderr


# The session API: a Lock object, and one engine session for many prompts ---------------------------------------


def _sampled(lock: Lock, seed: int) -> Lock:
    sampler = lock.sampler.model_copy(update={"temperature": 1.0, "seed": seed})
    return lock.model_copy(update={"sampler": sampler})


def test_one_session_records_and_verifies_locks_that_share_model_engine_and_backend(project: Path) -> None:
    lock = read_lock(project / "llmstack.lock")
    locks = [lock, _sampled(lock, 1), _sampled(lock, 2)]
    with EngineSession.start("fake", project / "tiny.gguf", lock.backend) as session:
        recorded = [record_lock(each, project, session=session) for each in locks]
        reports = [verify_lock(each, project, session=session) for each in recorded]
        pid = session._process.pid
        assert session._process.is_alive()
    assert all(report.reproduced for report in reports)
    texts = [r.recordings[0].goldens["raw"] for r in recorded]
    assert all(t is not None for t in texts)
    # Different samplers really ran: greedy and two seeds give three different outputs.
    assert len({t.text for t in texts if t is not None}) == 3
    # The same lock on a separate session gives the same goldens: the session carries no state between prompts.
    alone = record_lock(locks[2], project)
    assert alone.recordings[0].goldens == recorded[2].recordings[0].goldens
    assert pid is not None


def test_a_goldens_recorded_on_one_sampler_fail_verify_under_another(project: Path) -> None:
    lock = read_lock(project / "llmstack.lock")
    recorded = record_lock(lock, project)
    changed = recorded.model_copy(update={"sampler": _sampled(recorded, 5).sampler})
    report = verify_lock(changed, project)
    assert not report.reproduced


def test_an_error_in_one_job_leaves_the_session_usable(project: Path) -> None:
    lock = read_lock(project / "llmstack.lock")
    sampler = EffectiveSampler.model_validate(lock.sampler.model_dump())
    too_long = RenderedSmoke(name="long", rendered="x" * 300, max_tokens=8, add_bos=True, sampler=sampler)
    fine = RenderedSmoke(name="short", rendered="Hi", max_tokens=3, add_bos=True, sampler=sampler)
    with EngineSession.start("fake", project / "tiny.gguf", lock.backend) as session:
        with pytest.raises(EngineError, match=r"exceed the context \(256\)"):
            session.observe([too_long], top_k=2)
        run = session.observe([fine], top_k=2)
    assert run.observations["short"].generation.prompt_tokens == (1, ord("H") + 3, ord("i") + 3)
    assert run.decoded[1] == "<bos>"
    assert all(len(step.top) == 2 for step in run.observations["short"].generation.steps)


def test_a_crashed_session_stays_failed(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = read_lock(project / "llmstack.lock")
    prompt = RenderedSmoke(name="a", rendered="Hi", max_tokens=3, add_bos=True, sampler=lock.sampler)
    monkeypatch.setenv("STACKLOCK_FAKE_ENGINE", "abort")
    with EngineSession.start("fake", project / "tiny.gguf", lock.backend) as session:
        with pytest.raises(EngineError, match=r"crashed \(signal SIGABRT\)") as first:
            session.observe([prompt], top_k=2)
        with pytest.raises(EngineError) as second:
            session.observe([prompt], top_k=2)
    assert second.value is first.value


def test_a_model_the_engine_refuses_is_an_engine_error(project: Path) -> None:
    lock = read_lock(project / "llmstack.lock")
    (project / "not.gguf").write_bytes(b"not a model")
    with pytest.raises(EngineError, match=r"^fake engine: .*not\.gguf is not a GGUF file$"):
        EngineSession.start("fake", project / "not.gguf", lock.backend)


def test_record_lock_refuses_a_session_that_runs_something_else(project: Path) -> None:
    lock = read_lock(project / "llmstack.lock")
    other_engine = lock.model_copy(update={"engine": lock.engine.model_copy(update={"name": "other"})})
    other_backend = lock.model_copy(update={"backend": lock.backend.model_copy(update={"context_size": 128})})
    build_tiny_gguf(project / "other.gguf", seed=1)
    with (
        EngineSession.start("fake", project / "other.gguf", lock.backend) as other_model,
        pytest.raises(UsageError, match=r"^the engine session holds .*other\.gguf, but the lock's model is "),
    ):
        record_lock(lock, project, session=other_model)
    with EngineSession.start("fake", project / "tiny.gguf", lock.backend) as session:
        with pytest.raises(UsageError, match=r"^the engine session runs fake, but the lock names other; "):
            record_lock(other_engine, project, session=session)
        with pytest.raises(
            UsageError, match=r"^the engine session was started with another backend than the lock's"
        ):
            verify_lock(other_backend, project, session=session)
