from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stacklock.cli.app import main
from tests.gguf_builder import build_tiny_gguf
from tests.hub_server import hub  # noqa: F401 - The local hub fixture, for every test module.

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never share (or pollute) the user's hash and registry caches.
    monkeypatch.setenv("STACKLOCK_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """Run the real `stacklock` entry point in-process, in a given directory."""

    def run(*args: str, cwd: Path) -> Result:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(list(args))
        out, err = capsys.readouterr()
        code = info.value.code
        return Result(code if isinstance(code, int) else 0 if code is None else 2, out, err)

    return run


@pytest.fixture
def tiny_project(tmp_path: Path) -> Iterator[Path]:
    """A directory holding a tiny chat model with a ChatML template."""
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML)
    old = os.getcwd()
    yield tmp_path
    os.chdir(old)


PLUGINS = Path(__file__).parent / "plugins"


@dataclass(frozen=True)
class Plugins:
    """Installs the test suite's engine plugins (tests/plugins/NAME) for one test, for this process and its
    children: each directory holds a module and its ``.dist-info``, so importlib.metadata finds the entry
    points for real."""

    monkeypatch: pytest.MonkeyPatch

    def add(self, name: str) -> Path:
        path = PLUGINS / name
        self.monkeypatch.syspath_prepend(str(path))
        paths = [str(path), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        self.monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
        return path


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> Plugins:
    return Plugins(monkeypatch)


@pytest.fixture
def fake_engine(plugins: Plugins) -> str:
    """The fake engine (tests/plugins/fake_engine) registered under 'fake'; its name."""
    plugins.add("fake_engine")
    return "fake"


ROOT = Path(__file__).resolve().parent.parent


def run_fresh(code: str) -> str:
    """The standard output of ``code`` run in a fresh interpreter, with another hash seed, in another directory.

    "Deterministic" must mean this: comparing two calls in one process cannot see state that a process
    carries (hash randomisation, caches, the working directory).
    """
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tempfile.gettempdir(),
        env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(paths)},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
