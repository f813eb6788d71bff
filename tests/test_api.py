"""The Python API at the package top: the commands as functions, lazily imported, raising the commands' errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import stacklock
from stacklock import api
from stacklock.errors import LockError, StacklockError, StaleLockError, UsageError
from stacklock.model.lock import parse_lock
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf, gemma_model_path

Cli = Callable[..., Result]

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "gemma3-270m"
MANIFEST = (
    '[stack]\nname = "tiny"\n\n[model]\nsource = "model.gguf"\n\n[template]\nsource = "gguf"\n\n'
    '[engine]\nname = "llama-cpp-python"\n\n[backend]\nkind = "cpu"\n'
)


def _project(tmp_path: Path) -> Path:
    build_tiny_gguf(tmp_path / "model.gguf", chat_template=CHATML)
    (tmp_path / "llmstack.toml").write_text(MANIFEST)
    return tmp_path


def test_names_at_the_package_top_are_the_api_functions() -> None:
    for name in set(stacklock.__all__) - {"__version__"}:
        assert getattr(stacklock, name) is getattr(api, name)
    with pytest.raises(AttributeError, match="no attribute 'lock_stacks'"):
        _ = stacklock.lock_stacks  # type: ignore[attr-defined]


def test_importing_the_package_imports_nothing_else() -> None:
    code = "import sys, stacklock; print(sorted(m for m in sys.modules if m.startswith('stacklock')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['stacklock']"


def test_lock_check_and_diff_on_a_tiny_stack(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    manifest = project / "llmstack.toml"
    written = stacklock.lock_stack(manifest)
    lock_path = project / "llmstack.lock"
    assert parse_lock(lock_path.read_text()) == written
    assert stacklock.check_lock(str(manifest)) == written
    checked = stacklock.check_stack(manifest)
    assert checked.ok
    assert [f.rule for f in checked.findings] == [f.rule for f in written.findings]
    # The command agrees with the function on the lock the function wrote.
    assert cli("lock", "--check", cwd=project).code == 0
    shutil.copy(lock_path, project / "before.lock")
    manifest.write_text(MANIFEST.replace('name = "tiny"', 'name = "renamed"'))
    with pytest.raises(StaleLockError, match="changed since it was locked"):
        stacklock.check_lock(manifest)
    relocked = stacklock.lock_stack(manifest)
    assert relocked.stack.name == "renamed"
    difference = stacklock.diff_locks(project / "before.lock", lock_path)
    assert not difference.identical
    assert stacklock.diff_locks(lock_path, lock_path).identical


def test_errors_are_the_commands(tmp_path: Path) -> None:
    project = _project(tmp_path)
    with pytest.raises(UsageError, match="allow needs a reason"):
        stacklock.lock_stack(project / "llmstack.toml", allow=["some-rule"])
    with pytest.raises(LockError):
        stacklock.check_stack(project / "llmstack.toml")  # Not locked yet.
    with pytest.raises(UsageError, match="tolerance must be greater than 0"):
        stacklock.verify_stack(project / "llmstack.lock", tolerance=0)
    with pytest.raises(StacklockError) as missing:
        stacklock.diff_locks(project / "a.lock", project / "b.lock")
    assert missing.value.exit_code == 2


@pytest.mark.engine
@pytest.mark.gemma
def test_the_readme_example_runs_as_shown(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="the 'llama' extra (llama-cpp-python) is not installed")
    gemma = gemma_model_path()
    if gemma is None:
        pytest.skip("the Gemma 3 270M model is not installed (the 'example' extra)")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The Python API") :]
    found = re.search(r"```python\n(.*?)```\n\n```text\n(.*?)```", section, re.DOTALL)
    assert found is not None, "the README's API section lost its example or its output"
    code, shown = found.groups()
    for name in ("llmstack.toml", "llmstack.lock"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf").symlink_to(gemma)
    # Run as a script, the way a user runs it: the engine's child process re-imports the main module.
    (tmp_path / "example.py").write_text(code, encoding="utf-8")
    # The model is linked from outside the project: the user allows its directory, as confinement asks.
    env = {**os.environ, "STACKLOCK_ALLOW_PATHS": str(Path(gemma).resolve().parent)}
    done = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == shown
