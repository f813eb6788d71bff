from __future__ import annotations

import os
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
