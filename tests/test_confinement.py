"""No secret leaves through a lock: local sources stay inside the project unless the user allows more.

A manifest is untrusted (a pull request can edit it); the user's own environment and configuration are not.
Each test plants a unique secret in the environment of a real `stacklock` process and checks it appears in
no file stacklock writes and in none of its output.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CHATML
from tests.gguf_builder import build_tiny_gguf

MANIFEST = """\
[stack]
name = "confined"

[model]
source = "{model}"

[template]
source = "{template}"

[engine]
name = "llama-cpp-python"
version = "==0.3.36"

[backend]
kind = "cpu"
threads = 1
context-size = 256

[sampler]
temperature = 0.0
seed = 1

[[smoke]]
name = "hello"
messages = [{{ role = "user", content = "Hello" }}]
max-tokens = 4
"""

SECRET_VAR = "STACKLOCK_TEST_SECRET"


@pytest.fixture
def secret() -> str:
    return f"s3cr3t-{secrets.token_hex(16)}"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "work" / "project"
    root.mkdir(parents=True)
    build_tiny_gguf(root / "tiny.gguf", chat_template=CHATML)
    return root


def _write(project: Path, *, model: str = "tiny.gguf", template: str = "gguf", extra: str = "") -> None:
    (project / "llmstack.toml").write_text(MANIFEST.format(model=model, template=template) + extra)


def _run(
    project: Path, secret: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process, whose /proc/self/environ holds the secret."""
    full = {k: v for k, v in os.environ.items() if k != "STACKLOCK_ALLOW_PATHS"}
    full |= {SECRET_VAR: secret, "XDG_CONFIG_HOME": str(project.parent / "config")} | (env or {})
    done = subprocess.run(
        [sys.executable, "-m", "stacklock", *args],
        cwd=project,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert secret not in done.stdout
    assert secret not in done.stderr
    assert "Traceback" not in done.stderr
    return done


def _assert_nowhere(root: Path, secret: str) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert secret.encode() not in path.read_bytes(), path


def _refused(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    # Piped, the reporter prints one line per step (hashing...) before it; the refusal is one error line, last.
    *steps, last = done.stderr.strip().splitlines()
    assert last.startswith("error: "), done.stderr
    assert not any(line.startswith("error:") or "Traceback" in line for line in steps), done.stderr
    for needle in needles:
        assert needle in last


@pytest.mark.parametrize(
    ("template", "needles"),
    [
        ("file:/proc/self/environ", ("template.source", "pseudo file system")),
        ("file:../../../etc/hostname", ("template.source", "outside the project directory")),
        ("file:/etc/hostname", ("template.source", "absolute path outside")),
        ("file:.", ("template.source", "empty path")),
        ("file:sub", ("template.source", "is a directory, not a regular file")),
        ("file:link-out.jinja", ("template.source", "outside the project directory")),
        ("file:environ.jinja", ("template.source", "pseudo file system")),
        ("file:fifo.jinja", ("template.source", "is a FIFO")),
        ("file:sock.jinja", ("template.source", "is a socket")),
        ("file:zero.jinja", ("template.source", "pseudo file system")),
    ],
)
def test_a_template_outside_the_project_is_refused(
    project: Path, secret: str, template: str, needles: tuple[str, ...]
) -> None:
    (project / "sub").mkdir()
    outside = project.parent / "outside.jinja"
    outside.write_text(f"{secret} {{{{ messages }}}}")
    (project / "link-out.jinja").symlink_to(outside)
    (project / "environ.jinja").symlink_to("/proc/self/environ")
    (project / "zero.jinja").symlink_to("/dev/zero")
    os.mkfifo(project / "fifo.jinja")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(project / "sock.jinja"))
        _write(project, template=template)
        _refused(_run(project, secret, "lock"), *needles)
    assert not (project / "llmstack.lock").exists()
    _assert_nowhere(project, secret)


@pytest.mark.parametrize(
    ("model", "needles"),
    [
        ("/proc/self/mem", ("model.source", "pseudo file system")),
        ("/proc/self/environ", ("model.source", "pseudo file system")),
        ("../outside.gguf", ("model.source", "outside the project directory")),
        ("x" * 5000, ("model.source", "5000 characters")),
        ("file:.", ("model.source", "empty path")),
        ("bad\\u0000name.gguf", ("model.source", "NUL byte")),
    ],
)
def test_a_model_outside_the_project_is_refused(
    project: Path, secret: str, model: str, needles: tuple[str, ...]
) -> None:
    (project / "tiny.gguf").rename(project.parent / "outside.gguf")
    _write(project, model=model)
    _refused(_run(project, secret, "lock"), *needles)


def test_a_registry_directory_outside_the_project_is_refused(project: Path, secret: str) -> None:
    outside = project.parent / "reg"
    outside.mkdir()
    (outside / "registry.toml").write_text('format-version = 1\nname = "outside"\n')
    _write(project, extra=f'\n[[registries]]\nname = "outside"\nurl = "{outside}"\n')
    _refused(_run(project, secret, "lock"), "registry 'outside'", "outside the project directory")


def test_a_symlink_inside_a_registry_is_not_followed(project: Path, secret: str) -> None:
    registry = project / "reg"
    (registry / "templates").mkdir(parents=True)
    (registry / "registry.toml").write_text('format-version = 1\nname = "mine"\n')
    (registry / "templates" / "leak.jinja").symlink_to("/proc/self/environ")
    _write(project, extra='\n[[registries]]\nname = "mine"\nurl = "reg"\n')
    done = _run(project, secret, "lock")
    assert done.returncode == 0, done.stderr
    _assert_nowhere(project, secret)


def test_the_user_can_allow_a_directory_outside_the_manifest(project: Path, secret: str) -> None:
    outside = project.parent / "shared"
    outside.mkdir()
    (outside / "chat.jinja").write_text(CHATML)
    _write(project, template=f"file:{outside / 'chat.jinja'}")
    _refused(_run(project, secret, "lock"), "absolute path outside")
    # By the environment ...
    assert _run(project, secret, "lock", env={"STACKLOCK_ALLOW_PATHS": str(outside)}).returncode == 0
    # ... by the user's configuration file ...
    config = project.parent / "config" / "stacklock"
    config.mkdir(parents=True)
    (config / "config.toml").write_text(f'allow-paths = ["{outside}"]\n')
    assert _run(project, secret, "lock", "--check").returncode == 0
    (config / "config.toml").unlink()
    # ... or by the command-line flag, which still never opens a pseudo file system.
    assert _run(project, secret, "--allow-outside-paths", "lock").returncode == 0
    _write(project, template="file:/proc/self/environ")
    _refused(_run(project, secret, "--allow-outside-paths", "lock"), "pseudo file system")
    _assert_nowhere(project, secret)


def test_a_manifest_cannot_allow_itself_outside_paths(project: Path, secret: str) -> None:
    _write(project, template="file:../../../etc/hostname", extra='\nallow-paths = ["/"]\n')
    done = _run(project, secret, "lock")
    assert done.returncode == 2
    assert "allow-paths" in done.stderr


def test_a_hand_edited_lock_cannot_point_verify_outside(project: Path, secret: str) -> None:
    _write(project)
    assert _run(project, secret, "lock").returncode == 0
    lock = project / "llmstack.lock"
    lock.write_text(lock.read_text().replace('path = "tiny.gguf"', 'path = "/proc/self/environ"', 1))
    _refused(_run(project, secret, "verify"), "model.path in the lock", "pseudo file system")


@pytest.mark.engine
def test_no_planted_secret_in_any_output_of_the_whole_workflow(project: Path, secret: str) -> None:
    pytest.importorskip("llama_cpp")
    _write(project)
    assert _run(project, secret, "lock").returncode == 0
    for fmt in ("json", "sarif"):
        assert _run(project, secret, "check", "--format", fmt).returncode == 0
    assert _run(project, secret, "record").returncode == 0
    for fmt in ("json", "junit"):
        done = _run(project, secret, "verify", "--format", fmt, "--certificate", "cert.json")
        assert done.returncode == 0, done.stderr
    registry = project.parent / "registry"
    registry.mkdir()
    (registry / "registry.toml").write_text('format-version = 1\nname = "shared"\n')
    assert _run(project, secret, "share", str(registry), "--certificate", "cert.json").returncode == 0
    assert _run(project, secret, "lock", "--check").returncode == 0
    _assert_nowhere(project.parent, secret)
