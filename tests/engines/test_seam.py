"""The adapter seam: engine registration and its errors, without needing an engine installed."""

from __future__ import annotations

import sys

import pytest

from stacklock.engines.base import sha256_tokens
from stacklock.engines.plugins import ENTRY_POINT_GROUP, engine_names, load_engine
from stacklock.errors import EngineError, ExitCode
from stacklock.files.digest import sha256_text


def test_built_in_engine_is_registered():
    assert "llama-cpp-python" in engine_names()


def test_unknown_engine():
    with pytest.raises(EngineError) as caught:
        load_engine("vllm-nonexistent")
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    assert str(caught.value) == (
        f"unknown engine 'vllm-nonexistent' (registered engines: {', '.join(engine_names())}); install a "
        f"package that registers it under the '{ENTRY_POINT_GROUP}' entry points"
    )


def test_missing_llama_cpp_python_gives_the_install_hint(monkeypatch):
    # None in sys.modules makes `import llama_cpp` raise ImportError, as on a machine without the extra.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(EngineError) as caught:
        load_engine("llama-cpp-python")
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    assert str(caught.value).startswith("the llama-cpp-python engine is not installed (")
    assert str(caught.value).endswith(
        "; install it with pip install 'stacklock[llama]' (it builds llama.cpp from source, about 10 minutes)"
    )


def test_digests():
    assert sha256_text("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert sha256_tokens(()) == sha256_text("")
    assert sha256_tokens((2, 105)) == sha256_text("2,105")
