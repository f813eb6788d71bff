"""The replay cache (stacklock/cli/replay.py): a recorded command's output is printed again only while nothing it
reads has changed; every change of an input gives the verdict of the full run, byte for byte.

Each command runs as the console script runs it, in a fresh interpreter. To tell a replay from a run, a test
plants a marker in the recorded output: the marker shows when the entry is used and must not show after any
input changed. Model files are made more than RACY_S seconds before the runs that may record them (a file
changed in the last clock ticks is not trusted by identity).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stacklock.cli.replay import RACY_S, Command, parse_command
from tests.conftest import CHATML
from tests.gguf_builder import build_tiny_gguf

MARKER = "REPLAYED-FROM-THE-CACHE\n"

MANIFEST = """\
[stack]
name = "tiny"

[model]
source = "model.gguf"

[template]
source = "file:chat.jinja"

[engine]
name = "llama-cpp-python"

[backend]
kind = "cpu"

[sampler]
temperature = 0.0

[[registry]]
name = "team"
url = "team-registry"
"""

TEAM_RULE = """\
id = "team-no-tiny-models"
title = "Tiny models are not for production"
severity = "error"
links = ["model"]
explanation = "Added to the team's registry after the stack was locked."
fix = "Use a real model."
references = ["https://example.org/team/rules/1"]

[when]
all = [{ fact = "model.parameter-count", less-than = 1000000 }]
"""


def _settled(path: Path) -> Path:
    """Wait until ``path`` is older than the racy window, so that a run may record it by identity."""
    time.sleep(max(0.0, path.stat().st_ctime + RACY_S + 0.1 - time.time()))
    return path


@pytest.fixture(scope="module")
def shared_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny model for the module, made once, so that only the test that edits a model waits for it."""
    return _settled(build_tiny_gguf(tmp_path_factory.mktemp("model") / "model.gguf", chat_template=CHATML))


Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def project(tmp_path: Path, shared_model: Path) -> Path:
    project = tmp_path / "project"
    (project / "team-registry" / "rules").mkdir(parents=True)
    (project / "team-registry" / "registry.toml").write_text('format-version = 1\nname = "team"\n')
    (project / "model.gguf").symlink_to(shared_model)
    (project / "chat.jinja").write_text(CHATML)
    (project / "llmstack.toml").write_text(MANIFEST)
    return project


@pytest.fixture
def stacklock(project: Path, shared_model: Path) -> Run:
    env = {**os.environ, "STACKLOCK_ALLOW_PATHS": str(shared_model.parent)}

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stacklock", *args],
            cwd=project,
            env=env | extra_env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    assert run("lock").returncode == 0
    return run


def _entries() -> list[Path]:
    return sorted((Path(os.environ["STACKLOCK_CACHE_DIR"]) / "replay").glob("*.json"))


def _mark(entry: Path, **key: str) -> None:
    """Plant the marker in a recorded output (and change key parts, as another stacklock would have recorded)."""
    data = json.loads(entry.read_text())
    data["output"].insert(0, ["w", "out", MARKER])
    data["key"] |= key
    entry.write_text(json.dumps(data))


def _full_run(run: Run, *args: str) -> subprocess.CompletedProcess[str]:
    """What the command prints without the replay cache (the other caches as they are)."""
    shutil.rmtree(Path(os.environ["STACKLOCK_CACHE_DIR"]) / "replay", ignore_errors=True)
    return run(*args)


def _same(a: subprocess.CompletedProcess[str], b: subprocess.CompletedProcess[str]) -> bool:
    return (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)


COMMANDS = [("lock", "--check"), ("check",), ("check", "--format", "json"), ("lock",)]


@pytest.mark.parametrize("args", COMMANDS)
def test_a_replay_prints_what_the_full_run_printed(stacklock: Run, args: tuple[str, ...]) -> None:
    first, second, third = stacklock(*args), stacklock(*args), stacklock(*args)
    assert first.returncode == 0, first.stderr
    assert _same(first, second)
    assert _same(second, third)
    [entry] = _entries()
    _mark(entry)
    assert stacklock(*args).stdout.startswith(MARKER)  # The entry is what was printed.


def test_a_replay_loads_neither_typer_nor_pydantic(stacklock: Run, project: Path, shared_model: Path) -> None:
    env = {**os.environ, "STACKLOCK_ALLOW_PATHS": str(shared_model.parent)}
    probe = (
        "import json, sys\nfrom stacklock.cli.fast import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    for args in (["lock", "--check"], ["check"]):
        for _ in range(2):
            done = subprocess.run(
                [sys.executable, "-c", probe, *args],
                cwd=project,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
        imported = set(json.loads(done.stderr.splitlines()[-1]))
        unused = {"typer", "click", "pydantic", "numpy", "jinja2", "rich", "stacklock.lock"}
        assert not imported & unused, (args, imported & unused)


def _edit_manifest(project: Path) -> None:
    text = (project / "llmstack.toml").read_text()
    (project / "llmstack.toml").write_text(text.replace("temperature = 0.0", "temperature = 0.5"))


def _edit_template(project: Path) -> None:
    (project / "chat.jinja").write_text(CHATML + "{# edited #}")


def _add_team_rule(project: Path) -> None:
    (project / "team-registry" / "rules" / "team-no-tiny-models.toml").write_text(TEAM_RULE)


def _replace_the_lock(project: Path) -> None:
    lock = project / "llmstack.lock"
    lock.write_text(lock.read_text().replace("temperature = 0.0", "temperature = 0.25"))


@pytest.mark.parametrize("change", [_edit_manifest, _edit_template, _add_team_rule, _replace_the_lock])
@pytest.mark.parametrize("args", [("lock", "--check"), ("check",)])
def test_a_changed_input_gives_the_full_verdict(
    stacklock: Run, project: Path, change: Callable[[Path], None], args: tuple[str, ...]
) -> None:
    assert stacklock(*args).returncode == 0
    [entry] = _entries()
    _mark(entry)
    change(project)
    replayed = stacklock(*args)
    assert MARKER not in replayed.stdout
    assert _same(replayed, _full_run(stacklock, *args))


def test_lock_check_sees_each_change_as_stale(stacklock: Run, project: Path) -> None:
    for change in (_edit_manifest, _edit_template, _add_team_rule):
        assert stacklock("lock").returncode == 0
        assert stacklock("lock", "--check").returncode == 0
        change(project)
        stale = stacklock("lock", "--check")
        assert stale.returncode == 1, (change, stale.stderr)
        assert "stale" in stale.stderr


def test_check_reports_a_rule_added_after_a_clean_replay(stacklock: Run, project: Path) -> None:
    for _ in range(3):
        assert stacklock("check").returncode == 0
    _add_team_rule(project)
    found = stacklock("check")
    assert found.returncode == 1
    assert "error: team-no-tiny-models: Tiny models are not for production" in found.stdout.splitlines()


def test_a_model_rewritten_with_the_same_size_is_stale(stacklock: Run, project: Path) -> None:
    model = project / "model.gguf"
    model.unlink()
    build_tiny_gguf(model, chat_template=CHATML)
    _settled(model)
    assert stacklock("lock").returncode == 0
    for _ in range(2):
        assert stacklock("lock", "--check").returncode == 0
    [entry] = [e for e in _entries() if "--check" in e.read_text()]
    _mark(entry)
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # One tensor byte: the size stays, the digest does not.
    model.write_bytes(bytes(data))
    stale = stacklock("lock", "--check")
    assert MARKER not in stale.stdout
    assert stale.returncode == 1
    assert "model.gguf changed" in stale.stderr


def test_another_stacklock_or_environment_is_a_miss(stacklock: Run) -> None:
    assert stacklock("check").returncode == 0
    [entry] = _entries()
    _mark(entry, stacklock="recorded by another stacklock")
    assert MARKER not in stacklock("check").stdout
    [entry] = _entries()  # Recorded again by this one.
    _mark(entry)
    assert MARKER not in stacklock("check", STACKLOCK_ALLOW_PATHS="/elsewhere").stdout


@pytest.mark.parametrize("damage", ["{not json", '{"format": 1}', "[]", '{"format": 1, "key": 3}', ""])
def test_a_corrupt_entry_is_ignored_and_recorded_again(stacklock: Run, damage: str) -> None:
    good = stacklock("lock", "--check")
    [entry] = _entries()
    entry.write_text(damage)
    again = stacklock("lock", "--check")
    assert _same(again, good)
    assert json.loads(entry.read_text())["code"] == 0


def test_inspect_json_replays_until_the_file_changes(tmp_path: Path) -> None:
    model = _settled(build_tiny_gguf(tmp_path / "model.gguf", chat_template=CHATML))

    def inspect() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stacklock", "inspect", "--json", "model.gguf"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )

    first, second = inspect(), inspect()
    assert _same(first, second)
    [entry] = _entries()
    _mark(entry)
    assert inspect().stdout.startswith(MARKER)
    build_tiny_gguf(model, chat_template=CHATML.replace("<|im_start|>", "<|im_begin|>"))
    changed = inspect()
    assert MARKER not in changed.stdout
    assert "<|im_begin|>" in json.loads(changed.stdout)["chat-template"]


def test_a_missing_lock_is_never_recorded(tmp_path: Path) -> None:
    (tmp_path / "llmstack.toml").write_text(MANIFEST)
    done = subprocess.run(
        [sys.executable, "-m", "stacklock", "lock", "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1  # No lock: stale.
    assert _entries() == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["lock", "--check"], Command(("lock", "--check"), "lock")),
        (
            ["check", "--format=json", "-m", "x/llmstack.toml"],
            Command(("check", "--format=json", "-m", "x/llmstack.toml"), "check", Path("x/llmstack.toml")),
        ),
        (
            ["inspect", "m.gguf", "--json"],
            Command(("inspect", "m.gguf", "--json"), "inspect", gguf=Path("m.gguf")),
        ),
        (["lock", "--no-cache"], None),
        (["lock", "--check", "--check"], None),
        (["lock", "--format", "json"], None),
        (["--allow-outside-paths", "check"], None),
        (["inspect", "m.gguf"], None),
        (["verify"], None),
        ([], None),
    ],
)
def test_only_known_command_lines_are_replayed(args: list[str], expected: Command | None) -> None:
    assert parse_command(args) == expected
