"""The adapter conformance suite (tests/engines/conformance.py) run on every adapter stacklock tests.

A new adapter joins by adding an entry to ``SUBJECTS``: a function that yields its :class:`Subject` (a served
adapter would start its server or the replaying stand-in here). Adapters whose engine is not installed are
skipped, not failed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from stacklock.engines.plugins import load_engine
from tests.conftest import PLUGINS
from tests.engines.conformance import *  # noqa: F403 - the suite's tests, collected here.
from tests.engines.conformance import Subject, backend_settings
from tests.gguf_builder import build_tiny_gguf


@contextmanager
def _llama_cpp_python(directory: Path) -> Iterator[Subject]:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("the 'llama' extra (llama-cpp-python) is not installed")
    model = build_tiny_gguf(directory / "tiny.gguf")
    broken = directory / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 60)
    engine = load_engine("llama-cpp-python")
    backend = backend_settings()
    loaded = engine.load(model, backend)
    try:
        # The tiny model's SentencePiece tokenizer adds a space before the text, as Llama's does.
        yield Subject(
            "llama-cpp-python", engine, loaded, model, broken, backend, "the cat is on the", space_prefix=True
        )
    finally:
        loaded.close()


@contextmanager
def _fake(directory: Path) -> Iterator[Subject]:
    path = str(PLUGINS / "fake_engine")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(path)
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
        model = build_tiny_gguf(directory / "tiny.gguf")
        broken = directory / "broken.gguf"
        broken.write_bytes(b"not a model")
        engine = load_engine("fake")
        backend = backend_settings()
        loaded = engine.load(model, backend)
        try:
            yield Subject("fake", engine, loaded, model, broken, backend, "the cat is on the")
        finally:
            loaded.close()


SUBJECTS: dict[str, Callable[[Path], AbstractContextManager[Subject]]] = {
    "llama-cpp-python": _llama_cpp_python,
    "fake": _fake,
}


@pytest.fixture(scope="module", params=sorted(SUBJECTS))
def subject(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Subject]:
    with SUBJECTS[request.param](tmp_path_factory.mktemp(request.param)) as subject:
        yield subject
