"""A user path the file system refuses (a directory where a file belongs, no permission, a read-only or full
disk) is one ``error:`` line with exit 2, never a traceback: for every path a command reads or writes.

Tests run as root here, so permissions cannot be taken away with chmod; real refusals come from a directory
where a file is expected, a file where a directory is expected, and /sys (which refuses new files even to root).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from stacklock.errors import FileError
from stacklock.files.atomic import write_text_atomic
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

Cli = Callable[..., Result]


@pytest.fixture
def project(tmp_path: Path, cli: Cli) -> Path:
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML)
    assert cli("init", "tiny.gguf", cwd=tmp_path).code == 0
    return tmp_path


def _one_error_line(result: Result, expected: str) -> None:
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    assert result.err.splitlines()[-1] == expected


def test_a_manifest_that_is_a_directory(project: Path, cli: Cli) -> None:
    assert cli("lock", cwd=project).code == 0
    (project / "llmstack.toml").unlink()
    (project / "llmstack.toml").mkdir()
    expected = "error: llmstack.toml: is a directory, not a regular file; give a regular file"
    for command in (["lock"], ["lock", "--check"], ["check"], ["registry", "list"]):
        _one_error_line(cli(*command, cwd=project), expected)


def test_a_lock_that_is_a_directory(project: Path, cli: Cli) -> None:
    (project / "llmstack.lock").mkdir()
    # lock writes it (and says so); the others read it.
    wrote = (
        "error: cannot write llmstack.lock: Is a directory; that path is a directory; give the path of a file"
    )
    read = "error: llmstack.lock: is a directory, not a regular file; give a regular file"
    for command in ("lock", "check", "record", "verify"):
        expected = wrote if command == "lock" else read
        _one_error_line(cli(command, cwd=project), expected)


def test_a_template_file_that_is_a_directory(project: Path, cli: Cli) -> None:
    (project / "chat.jinja").mkdir()
    manifest = project / "llmstack.toml"
    manifest.write_text(
        manifest.read_text().replace(
            'model file.\nsource = "gguf"', 'model file.\nsource = "file:chat.jinja"'
        )
    )
    _one_error_line(
        cli("lock", cwd=project),
        "error: template.source: chat.jinja is a directory, not a regular file; name a file",
    )


def test_a_manifest_written_where_the_file_system_refuses(project: Path, cli: Cli) -> None:
    _one_error_line(
        cli("init", "tiny.gguf", "--manifest", "/sys/llmstack.toml", cwd=project),
        "error: cannot write /sys/llmstack.toml: Permission denied; you lack permission there; choose a "
        "writable location or fix the permissions",
    )


def test_a_certificate_under_a_file(project: Path, cli: Cli) -> None:
    assert cli("lock", cwd=project).code == 0
    _one_error_line(
        cli("verify", "--certificate", "tiny.gguf/cert.json", cwd=project),
        "error: cannot create tiny.gguf: File exists; check the path and the file system",
    )
    (project / "cert").mkdir()
    _one_error_line(
        cli("verify", "--certificate", "cert", cwd=project),
        "error: --certificate cert: is a directory; give the path of a file",
    )


def test_a_share_destination_whose_stacks_folder_is_a_file(project: Path, cli: Cli) -> None:
    registry = project / "registry"
    registry.mkdir()
    (registry / "registry.toml").write_text('format-version = 1\nname = "team"\n')
    (registry / "stacks").write_text("not a folder")
    assert cli("lock", cwd=project).code == 0
    assert cli("record", cwd=project).code == 0
    assert cli("verify", "--certificate", "cert.json", cwd=project).code == 0
    _one_error_line(
        cli("share", "registry", "--certificate", "cert.json", cwd=project),
        "error: cannot create registry/stacks/tiny: Not a directory; a part of that path is a file, not a "
        "directory; fix the path",
    )


def test_a_registry_cache_under_a_file(
    project: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "cache-file").write_text("")
    monkeypatch.setenv("STACKLOCK_CACHE_DIR", str(tmp_path / "cache-file"))
    manifest = project / "llmstack.toml"
    manifest.write_text(
        manifest.read_text() + '\n[[registry]]\nname = "team"\nurl = "git+https://example.invalid/r.git"\n'
    )
    result = cli("lock", cwd=project)
    _one_error_line(
        result,
        # The first thing lock creates in the cache is its run lock, which serialises runs on one lock file.
        f"error: cannot create the cache directory {tmp_path}/cache-file/runs: Not a directory; a part "
        "of that path is a file, not a directory; fix the path",
    )


def test_the_atomic_writer_maps_refusals_to_one_line() -> None:
    with pytest.raises(FileError) as info:
        write_text_atomic(Path("/sys/llmstack.lock"), "x")
    assert str(info.value) == (
        "cannot write /sys/llmstack.lock: Permission denied; you lack permission there; choose a writable "
        "location or fix the permissions"
    )
