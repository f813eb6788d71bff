"""The GitHub Action and the pre-commit hooks, checked by the tools that run them: actionlint and pre-commit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CHATML
from tests.gguf_builder import build_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it comes with the 'dev' extra (scripts/setup.sh)")
    return found


def _workflow_repo(tmp_path: Path, workflow: str) -> Path:
    """A repository whose workflow uses the action as a local one: actionlint then checks the inputs against it."""
    repo = tmp_path / "repo"
    (repo / ".github" / "workflows").mkdir(parents=True)
    (repo / ".github" / "actions" / "stacklock").mkdir(parents=True)
    shutil.copy(ROOT / "action.yml", repo / ".github" / "actions" / "stacklock" / "action.yml")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, timeout=60)
    (repo / ".github" / "workflows" / "stacklock.yml").write_text(workflow)
    return repo


def _example_workflow() -> str:
    return (
        (ROOT / "examples" / "ci" / "stacklock.yml")
        .read_text()
        .replace("OWNER/stacklock@v0.1.0", "./.github/actions/stacklock")
    )


def _actionlint(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("actionlint"), "-no-color", ".github/workflows/stacklock.yml"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_example_workflow_and_the_action_pass_actionlint(tmp_path: Path) -> None:
    result = _actionlint(_workflow_repo(tmp_path, _example_workflow()))
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_an_input_the_action_does_not_have(tmp_path: Path) -> None:
    broken = _example_workflow().replace("working-directory:", "workdir:")
    result = _actionlint(_workflow_repo(tmp_path, broken))
    assert result.returncode == 1
    assert 'input "workdir" is not defined in action "stacklock"' in result.stdout


def test_the_action_runs_each_check_and_keeps_inputs_out_of_scripts() -> None:
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    scripts = "\n".join(step.get("run", "") for step in action["runs"]["steps"])
    for command in ("stacklock lock --check", "stacklock check --format sarif", "stacklock verify"):
        assert command in scripts
    assert "$GITHUB_STEP_SUMMARY" in scripts
    # Inputs reach shell scripts through the environment, never spliced into the script text.
    assert "${{ inputs." not in scripts
    assert any(
        step.get("uses", "").startswith("github/codeql-action/upload-sarif")
        for step in action["runs"]["steps"]
    )


MANIFEST = """\
[stack]
name = "tiny-hooks"
[model]
source = "tiny.gguf"
[template]
source = "gguf"
[engine]
name = "llama-cpp-python"
version = "==0.3.36"
[sampler]
temperature = 0.0
seed = 1
[[smoke]]
name = "greeting"
messages = [{ role = "user", content = "Hello" }]
max-tokens = 4
"""


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def test_the_pre_commit_hooks_pass_a_fresh_lock_and_stop_a_stale_one(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    build_tiny_gguf(project / "tiny.gguf", chat_template=CHATML)
    (project / "llmstack.toml").write_text(MANIFEST)
    env = {**os.environ, "STACKLOCK_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run(
        [_tool("stacklock"), "lock"], cwd=project, env=env, check=True, capture_output=True, timeout=120
    )
    _git("init", "-q", cwd=project)
    _git("add", ".", cwd=project)
    # pre-commit installs this repository (with its uncommitted changes) into an environment of its own, the way
    # a user's pre-commit does from a tag: the hooks run the installed console script, not this checkout's.
    env["PRE_COMMIT_HOME"] = str(tmp_path / "pre-commit-home")

    def run_hooks() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_tool("pre-commit"), "try-repo", str(ROOT), "--all-files", "--color", "never"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    fresh = run_hooks()
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "stacklock lock --check" in fresh.stdout
    assert "stacklock check" in fresh.stdout

    (project / "llmstack.toml").write_text(MANIFEST.replace("seed = 1", "seed = 2"))
    _git("add", ".", cwd=project)
    stale = run_hooks()
    assert stale.returncode == 1
    assert "llmstack.toml changed since it was locked" in stale.stdout
