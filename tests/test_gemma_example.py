"""The shipped example stack, Gemma 3 270M Q4_K_M on CPU, on the real model: what the README's main command does."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from stacklock.model.lock import parse_lock
from tests.conftest import Result
from tests.gguf_builder import gemma_model_path

pytest.importorskip("llama_cpp", reason="the 'llama' extra (llama-cpp-python) is not installed")

pytestmark = [pytest.mark.engine, pytest.mark.gemma]

Cli = Callable[..., Result]

EXAMPLE = Path(__file__).parent.parent / "examples" / "gemma3-270m"
MODEL = "models/gemma-3-270m-q4_k_m.gguf"
SMOKE = ["capital", "colours", "chat", "chat-with-system"]


@pytest.fixture(scope="module")
def gemma() -> Path:
    path = gemma_model_path()
    if path is None:
        pytest.skip("the Gemma 3 270M model is not installed (the 'example' extra)")
    return path


@pytest.fixture(autouse=True)
def _allow_the_model_directory(gemma: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The model is symlinked in from outside each test's project: the user allows its directory, as a user
    # with a shared model store would.
    monkeypatch.setenv("STACKLOCK_ALLOW_PATHS", str(gemma.resolve().parent))


def _example(tmp_path: Path, gemma: Path, *, with_lock: bool) -> Path:
    shutil.copy(EXAMPLE / "llmstack.toml", tmp_path / "llmstack.toml")
    if with_lock:
        shutil.copy(EXAMPLE / "llmstack.lock", tmp_path / "llmstack.lock")
    (tmp_path / "models").mkdir()
    (tmp_path / MODEL).symlink_to(gemma)
    return tmp_path


def test_the_shipped_lock_is_fresh_and_its_goldens_verify(tmp_path: Path, gemma: Path, cli: Cli) -> None:
    project = _example(tmp_path, gemma, with_lock=True)
    check = cli("lock", "--check", cwd=project)
    assert check.code == 0, check.err
    assert check.err.splitlines()[-1].startswith("llmstack.lock is fresh")
    result = cli("verify", "--format", "json", cwd=project)
    assert result.code == 0, result.out + result.err
    report = json.loads(result.out)
    assert report["reproduced"] is True
    assert report["tolerated"] is False
    assert [r["name"] for r in report["results"]] == SMOKE
    assert all(s["status"] == "pass" for r in report["results"] for s in r["stages"])
    # The GGUF carries no template: llama-cpp-python alone would fall back to its llama-2 format.
    assert any("'llama-2' format" in note for note in report["notes"])
    # verify reads the lock; it never writes it.
    assert (project / "llmstack.lock").read_bytes() == (EXAMPLE / "llmstack.lock").read_bytes()


def test_fresh_goldens_record_and_verify(tmp_path: Path, gemma: Path, cli: Cli) -> None:
    project = _example(tmp_path, gemma, with_lock=False)
    assert cli("lock", cwd=project).code == 0
    record = cli("record", cwd=project)
    assert record.code == 0, record.err
    lock = parse_lock((project / "llmstack.lock").read_text(encoding="utf-8"))
    (recording,) = lock.recordings
    assert recording.id == "llama-cpp-python-0.3.36-cpu"
    goldens = recording.goldens
    assert list(goldens) == SMOKE
    assert "Paris" in goldens["capital"].text
    assert all(len(step) == 5 for golden in goldens.values() for step in golden.top_logprobs)
    text = cli("verify", cwd=project)
    assert text.code == 0, text.out
    assert (
        text.out.splitlines()[-1] == "reproduced: 4 smoke prompt(s), every stage identical to the recording"
    )
