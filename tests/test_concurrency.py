"""Concurrent and killed runs: `lock` runs serialise on a file lock; a killed `record` leaves no engine process,
no stale temporary or log file (after the next run), and the lock intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stacklock.lock.project import project_lock
from tests.conftest import CHATML
from tests.gguf_builder import build_tiny_gguf
from tests.hardening_cases import manifest


def _stacklock(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stacklock", *args],
        cwd=cwd,
        env=os.environ | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _project(path: Path, *, smoke: str = "") -> Path:
    build_tiny_gguf(path / "tiny.gguf", chat_template=CHATML)
    (path / "llmstack.toml").write_text(manifest(smoke=smoke))
    return path


def test_a_second_lock_run_waits_for_the_first(tmp_path: Path) -> None:
    project = _project(tmp_path)
    lock = project / "llmstack.lock"
    stale = project / ".llmstack.lock.k1ll3d.tmp"
    stale.write_text("half a lock from a killed run")
    with project_lock(lock):
        run = _stacklock("lock", cwd=project)
        time.sleep(3)
        # Held by this process: the run waits instead of racing.
        assert run.poll() is None
        assert not lock.exists()
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert lock.exists()
    assert not stale.exists()


def test_two_concurrent_lock_runs_write_one_valid_lock(tmp_path: Path) -> None:
    project = _project(tmp_path)
    runs = [_stacklock("lock", cwd=project) for _ in range(2)]
    results = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    # One wrote it, the other found it unchanged.
    assert sorted(err.strip().splitlines()[-1].split()[0] for _, err in results) == ["unchanged:", "wrote"]
    check = _stacklock("lock", "--check", cwd=project)
    assert check.wait(timeout=60) == 0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(c) for c in children]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.engine
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_record_leaves_no_engine_and_the_lock_intact(tmp_path: Path, sig: signal.Signals) -> None:
    pytest.importorskip("llama_cpp")
    project = tmp_path / "project"
    project.mkdir()
    _project(project, smoke='\n[[smoke]]\nname = "long"\nprompt = "Once"\nmax-tokens = 200\n')
    temp = tmp_path / "tmp"
    temp.mkdir()
    locked = _stacklock("lock", cwd=project)
    assert locked.wait(timeout=120) == 0
    before = (project / "llmstack.lock").read_bytes()
    record = _stacklock("record", cwd=project, env={"TMPDIR": str(temp)})
    deadline = time.monotonic() + 60
    engine: list[int] = []
    # The engine's child writes its log in TMPDIR; a child seen before that renders a template.
    while not engine and time.monotonic() < deadline and record.poll() is None:
        if list(temp.glob("stacklock-engine-*.log")):
            engine = _children(record.pid)
        time.sleep(0.01)
    assert engine, "the engine's child process never started"
    os.kill(record.pid, sig)
    record.communicate(timeout=30)
    # The engine dies with its parent, whatever the signal.
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in engine)
    assert (project / "llmstack.lock").read_bytes() == before
    # The killed run's engine log is removed by the next run.
    assert list(temp.glob("stacklock-engine-*.log"))
    again = _stacklock("record", cwd=project, env={"TMPDIR": str(temp)})
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert not list(temp.glob("stacklock-engine-*.log"))
    assert list(project.glob(".llmstack.lock.*.tmp")) == []
