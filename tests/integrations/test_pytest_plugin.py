"""The pytest plugin, run by pytest itself (pytester) on a recorded tiny stack with the real engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

pytest.importorskip("llama_cpp", reason="the 'llama' extra (llama-cpp-python) is not installed")

pytestmark = pytest.mark.engine
pytest_plugins = ["pytester"]

MANIFEST = """\
[stack]
name = "tiny-plugin"
[model]
source = "tiny.gguf"
[template]
source = "gguf"
[engine]
name = "llama-cpp-python"
version = "==0.3.36"
[backend]
kind = "cpu"
threads = 1
context-size = 128
[sampler]
temperature = 0.0
seed = 1
[[smoke]]
name = "greeting"
messages = [{ role = "user", content = "Hello" }]
max-tokens = 4
[[smoke]]
name = "story"
prompt = "Once upon a time"
max-tokens = 4
"""


@pytest.fixture
def recorded(tmp_path: Path, cli: Callable[..., Result]) -> Path:
    project = tmp_path / "stack"
    project.mkdir()
    build_tiny_gguf(project / "tiny.gguf", chat_template=CHATML)
    (project / "llmstack.toml").write_text(MANIFEST)
    assert cli("lock", cwd=project).code == 0
    assert cli("record", cwd=project).code == 0
    return project / "llmstack.lock"


def _break_golden(lock: Path, name: str) -> None:
    """Change the first generated token of one smoke prompt's golden, as a drifted engine would."""
    text = lock.read_text(encoding="utf-8")
    start = text.index(f"[recording.goldens.{name}]")
    tokens_at = text.index("\ntokens = [", start) + len("\ntokens = [")
    end = text.index(",", tokens_at) if text[tokens_at] != "\n" else text.index(",", tokens_at + 1)
    first = text[tokens_at:end].strip()
    lock.write_text(text[:tokens_at] + text[tokens_at:end].replace(first, str(int(first) + 1)) + text[end:])


def test_collecting_a_lock_makes_one_passing_test_per_smoke_prompt(
    recorded: Path, pytester: pytest.Pytester
) -> None:
    result = pytester.runpytest_subprocess("--stacklock", str(recorded), "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*llmstack.lock::greeting PASSED*", "*llmstack.lock::story PASSED*"])


def test_a_drifted_smoke_prompt_fails_alone_with_the_stage_named(
    recorded: Path, pytester: pytest.Pytester
) -> None:
    _break_golden(recorded, "story")
    result = pytester.runpytest_subprocess("--stacklock", str(recorded), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*story: FAILED at generation*"])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_without_the_option_a_lock_file_is_not_collected(recorded: Path, pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(str(recorded), "-p", "no:cacheprovider")
    # pytest finds no collector for a file it does not know: the plugin stays out of suites that do not ask.
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "collected 0 items" in result.stdout.str()


def test_the_marker_runs_a_test_per_smoke_prompt(recorded: Path, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_stack=f"""
        import pytest

        @pytest.mark.stacklock({str(recorded)!r})
        def test_stack(stacklock):
            assert stacklock.result.name in {{"greeting", "story"}}
            assert stacklock.report.reproduced
            stacklock.assert_reproduced()
        """
    )
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_stack[[]greeting[]] PASSED*", "*test_stack[[]story[]] PASSED*"])


def test_the_fixture_without_a_marker_verifies_any_lock(recorded: Path, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_any=f"""
        def test_any(stacklock):
            report = stacklock.verify({str(recorded)!r})
            assert [r.name for r in report.results] == ["greeting", "story"]
            assert report.reproduced
        """
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_missing_lock_fails_the_test_in_one_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(
        test_missing=f"""
        def test_missing(stacklock):
            stacklock.verify({str(tmp_path / "nowhere" / "llmstack.lock")!r})
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*stacklock: *nowhere/llmstack.lock: no lock here*"])
    result.stdout.no_fnmatch_line("*Traceback*")
