"""The fast command line: `--help` from the stored text, and what each command imports.

The import sets are asserted, not the times (times are `benchmarks/bench_cli.py`'s job): a module that a
command imports and does not need is what makes it slow, and it shows here on any machine, loaded or not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from stacklock.cli import help_text
from stacklock.cli.fast import render_help_module, typer_help
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

Cli = Callable[..., Result]

# Each command runs in a fresh interpreter, the way the console script runs it; it prints what it imported.
PROBE = """\
import json, sys
from stacklock.cli.fast import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""

# Neither the engine nor the network clients: nothing that reads a lock or a GGUF header needs them.
ENGINE_AND_NETWORK = {"llama_cpp", "huggingface_hub", "httpx", "rich"}


def _run(args: list[str], cwd: Path, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=120
    )


def _imported(args: list[str], cwd: Path) -> set[str]:
    done = _run(["-c", PROBE, *args], cwd)
    modules: list[str] = json.loads(done.stderr.splitlines()[-1])
    return {name.partition(".")[0] for name in modules} | set(modules)


def _typer_direct(cwd: Path, columns: int) -> str:
    """`stacklock --help` as typer renders it, bypassing the stored text."""
    code = "from stacklock.cli.app import app; app(['--help'], prog_name='stacklock')"
    return _run(["-c", code], cwd, columns).stdout


def test_stored_help_is_current() -> None:
    text = typer_help()
    assert text == help_text.TOP_LEVEL_HELP, "stale: run `python -m stacklock.cli.fast`"
    assert Path(help_text.__file__).read_text(encoding="utf-8") == render_help_module(text)


@pytest.mark.parametrize("columns", [80, 200])
def test_help_is_typers_byte_for_byte(tmp_path: Path, columns: int) -> None:
    fast = _run(["-m", "stacklock", "--help"], tmp_path, columns)
    assert fast.returncode == 0
    assert fast.stdout == _typer_direct(tmp_path, columns)
    assert fast.stdout.startswith("Usage: stacklock [OPTIONS] COMMAND [ARGS]...\n")


def test_a_narrow_terminal_gets_typers_wrapping(tmp_path: Path) -> None:
    narrow = _run(["-m", "stacklock", "--help"], tmp_path, 60)
    assert narrow.stdout == _typer_direct(tmp_path, 60)
    assert narrow.stdout != help_text.TOP_LEVEL_HELP


def test_help_imports_neither_typer_nor_pydantic(tmp_path: Path) -> None:
    imported = _imported(["--help"], tmp_path)
    assert not imported & {"typer", "click", "pydantic", "stacklock.cli.app", "jinja2", "numpy"}
    assert not imported & ENGINE_AND_NETWORK


def test_check_and_lock_check_import_no_engine_numpy_or_network(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "model.gguf", chat_template=CHATML)
    (tmp_path / "llmstack.toml").write_text(
        '[stack]\nname = "tiny"\n\n[model]\nsource = "model.gguf"\n\n[template]\nsource = "gguf"\n\n'
        '[engine]\nname = "llama-cpp-python"\n\n[backend]\nkind = "cpu"\n'
    )
    assert cli("lock", cwd=tmp_path).code == 0
    for args in (["lock", "--check"], ["check"]):
        imported = _imported(args, tmp_path)
        assert "stacklock.lock.project" in imported, args  # The command did run.
        # Reading a lock needs no TOML writer; resolving local registries no HTTP client.
        # The adapter module is read for its declared AdapterInfo; the engine library itself stays unloaded.
        # The progress reporter loads rich only for a terminal's bars, not for a pipe's lines.
        unused = {"numpy", "tomlkit", "urllib.request"} | ENGINE_AND_NETWORK
        assert not imported & unused, args


def test_inspect_imports_no_template_engine_or_network(tmp_path: Path) -> None:
    build_tiny_gguf(tmp_path / "model.gguf", chat_template=CHATML)
    imported = _imported(["inspect", "--json", "model.gguf"], tmp_path)
    assert "stacklock.gguf.reader" in imported
    assert not imported & (ENGINE_AND_NETWORK | {"jinja2", "tomlkit", "stacklock.lock"})
