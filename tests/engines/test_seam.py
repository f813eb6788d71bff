"""The adapter seam: engine registration and its errors, without needing an engine installed."""

from __future__ import annotations

import sys

import pytest

from stacklock.engines.plugins import ENTRY_POINT_GROUP, adapter_info, engine_names, load_engine
from stacklock.errors import EngineError, ExitCode
from tests.conftest import Plugins


def test_built_in_engine_is_registered() -> None:
    assert "llama-cpp-python" in engine_names()


def test_unknown_engine() -> None:
    with pytest.raises(EngineError) as caught:
        load_engine("vllm-nonexistent")
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    assert str(caught.value) == (
        f"unknown engine 'vllm-nonexistent' (registered engines: {', '.join(engine_names())}); install a "
        f"package that registers it under the '{ENTRY_POINT_GROUP}' entry points"
    )


def test_missing_llama_cpp_python_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import llama_cpp` raise ImportError, as on a machine without the extra.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(EngineError) as caught:
        load_engine("llama-cpp-python")
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    assert str(caught.value).startswith("the llama-cpp-python engine is not installed (")
    assert str(caught.value).endswith(
        "; install it with pip install 'stacklock[llama]' (it builds llama.cpp from source, about 10 minutes)"
    )


def test_a_plugin_registered_through_the_entry_point_group_is_found(fake_engine: str) -> None:
    assert fake_engine in engine_names()
    info = adapter_info(fake_engine)
    assert info is not None
    assert (info.name, info.distribution, info.build_scheme) == ("fake", "stacklock-fake-engine", "none")
    engine = load_engine(fake_engine)
    assert engine.identity().version == "0"


def test_a_duplicate_registration_is_an_error(fake_engine: str, plugins: Plugins) -> None:
    plugins.add("duplicate_engine")
    with pytest.raises(EngineError) as caught:
        load_engine(fake_engine)
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    assert str(caught.value) == (
        "engine 'fake' is registered twice: stacklock_duplicate_engine:FakeEngine and "
        "stacklock_fake_engine:FakeEngine; uninstall one of the packages that register it"
    )


def test_a_broken_plugin_is_an_unavailable_engine(plugins: Plugins) -> None:
    plugins.add("broken_engine")
    # Listing the engines does not import them: one broken plugin does not hide the others.
    assert {"broken", "llama-cpp-python"} <= set(engine_names())
    assert adapter_info("llama-cpp-python") is not None
    with pytest.raises(EngineError) as caught:
        load_engine("broken")
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    assert str(caught.value) == (
        "engine 'broken' (stacklock_broken_engine:BrokenEngine) failed to load: ImportError: "
        "stacklock_broken_engine needs libbroken, which is not installed; reinstall the package that provides it"
    )
