"""The reporter: what lock, record and verify report, and how the CLI renders it on a terminal and on a pipe.

The library is driven for real (a tiny GGUF on the real engine); the reporter is a parameter, so recording
what it is told needs no mock.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from stacklock.cli.progress import BarReporter, LineReporter, cli_reporter
from stacklock.lock.api import lock_stack
from stacklock.lock.project import write_lock
from stacklock.verify.session import record, verify
from tests.conftest import CHATML
from tests.gguf_builder import build_tiny_gguf
from tests.recording import RecordingReporter

MANIFEST = """\
[stack]
name = "tiny"

[model]
source = "tiny.gguf"

[template]
source = "gguf"

[engine]
name = "llama-cpp-python"

[backend]
kind = "cpu"

[sampler]
temperature = 0.0
seed = 0

[[smoke]]
name = "hello"
messages = [{ role = "user", content = "Hi" }]
max-tokens = 2

[[smoke]]
name = "again"
messages = [{ role = "user", content = "Hi again" }]
max-tokens = 2
"""

ENGINE_STEPS = [
    "loading the engine",
    "loading the model tiny.gguf",
    "asking the engine how it would render a chat",
    "running the smoke prompt 'hello'",
    "running the smoke prompt 'again'",
]


def test_lock_record_and_verify_report_their_steps(tmp_path: Path) -> None:
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML)
    (tmp_path / "llmstack.toml").write_text(MANIFEST, encoding="utf-8")
    size = (tmp_path / "tiny.gguf").stat().st_size

    locking = RecordingReporter()
    write_lock(tmp_path / "llmstack.lock", lock_stack(tmp_path / "llmstack.toml", reporter=locking))
    assert locking.steps == ["hashing tiny.gguf"]
    assert locking.progress_of("hashing tiny.gguf")[-1] == (size, size)
    assert locking.calls[-1] == ("finished", "hashing tiny.gguf")

    recording = RecordingReporter()
    record(tmp_path / "llmstack.lock", reporter=recording)
    # The model is hashed again (cached by file identity: no step), then each step of the engine's run.
    assert recording.steps == ENGINE_STEPS
    assert recording.progress_of("running the smoke prompt 'hello'") == [(0, 2)]
    assert recording.progress_of("running the smoke prompt 'again'") == [(1, 2)]
    # Every step that started also finished, in order.
    finished = [c[1] for c in recording.calls if c[0] == "finished"]
    assert finished == ENGINE_STEPS

    verifying = RecordingReporter()
    assert verify(tmp_path / "llmstack.lock", reporter=verifying).reproduced
    assert verifying.steps == ENGINE_STEPS


def test_a_pipe_gets_one_plain_line_per_step_and_event() -> None:
    out = io.StringIO()
    with cli_reporter(out) as reporter:
        assert isinstance(reporter, LineReporter)
        reporter.step_started("hashing model.gguf")
        reporter.progress("hashing model.gguf", 50, 100)
        reporter.progress("hashing model.gguf", 100, 100)
        reporter.step_finished("hashing model.gguf")
        reporter.event("dropped the allowance for rule x")
    assert out.getvalue() == "hashing model.gguf\ndropped the allowance for rule x\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_progress_bar_that_is_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TERM", raising=False)
    out = _Terminal()
    threads = threading.active_count()
    with cli_reporter(out) as reporter:
        assert isinstance(reporter, BarReporter)
        reporter.step_started("hashing model.gguf")
        reporter.progress("hashing model.gguf", 50 << 20, 100 << 20)
        # No refresh thread: the engine's child process is forked only from a single-threaded process.
        assert threading.active_count() == threads
        reporter.step_finished("hashing model.gguf")
    drawn = out.getvalue()
    assert "hashing model.gguf" in drawn
    assert "52.4/104.9 MB" in drawn
    assert "\x1b[" in drawn  # Cursor control: the bar is redrawn in place, then erased.


def test_ci_logs_get_lines_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    out = _Terminal()
    with cli_reporter(out) as reporter:
        reporter.step_started("running the smoke prompt 'hello'")
        reporter.progress("running the smoke prompt 'hello'", 0, 3)
    assert out.getvalue() == "running the smoke prompt 'hello'\n"
