from __future__ import annotations

from pathlib import Path

import pytest

from stacklock.errors import ExitCode, ManifestError
from stacklock.model.manifest import BackendKind, parse_manifest

DATA = Path(__file__).parent / "data" / "manifests"
EXAMPLE = Path(__file__).parent.parent / "examples" / "gemma3-270m" / "llmstack.toml"
CASES = sorted(p.stem for p in DATA.glob("*.toml"))


def test_there_are_error_cases() -> None:
    assert len(CASES) >= 10


@pytest.mark.parametrize("case", CASES)
def test_bad_manifest_gives_exact_one_line_error(case: str) -> None:
    text = (DATA / f"{case}.toml").read_text()
    expected = (DATA / f"{case}.error").read_text().strip()
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "bad.toml")
    assert str(info.value) == expected
    assert "\n" not in str(info.value)
    assert info.value.exit_code == ExitCode.BAD_INPUT


def test_example_manifest_parses_with_kebab_keys() -> None:
    manifest = parse_manifest(EXAMPLE.read_text(), str(EXAMPLE))
    assert manifest.stack.name == "gemma3-270m-q4km-cpu"
    assert manifest.template.source == "registry:gemma3-it"
    assert manifest.backend.kind is BackendKind.CPU
    assert manifest.backend.context_size == 1024
    assert manifest.sampler.temperature == 0.0
    assert [s.name for s in manifest.smoke] == ["capital", "colours", "chat", "chat-with-system"]


def test_system_prompt_goes_first_in_the_conversation() -> None:
    manifest = parse_manifest(EXAMPLE.read_text())
    smoke = manifest.smoke[3]
    assert [m["role"] for m in smoke.conversation()] == ["system", "user"]


def test_manifest_models_are_frozen() -> None:
    manifest = parse_manifest(EXAMPLE.read_text())
    with pytest.raises(ValueError, match="frozen"):
        manifest.stack.name = "other"  # type: ignore[misc]


def test_defaults_fill_missing_tables() -> None:
    manifest = parse_manifest('[stack]\nname = "s"\n[model]\nsource = "m.gguf"\n')
    assert manifest.template.source == "gguf"
    assert manifest.engine.name == "llama-cpp-python"
    assert manifest.smoke == ()


@pytest.mark.parametrize(
    ("engine", "version"),
    [
        ("llama.cpp", ">=b4628,<b7756"),
        ("llama.cpp", "==b4628"),
        ("llama-cpp-python", "~=0.3.24"),
        ("vllm", ""),
    ],
)
def test_engine_requirements_accepted(engine: str, version: str) -> None:
    text = f'[stack]\nname = "s"\n[model]\nsource = "m"\n[engine]\nname = "{engine}"\nversion = "{version}"\n'
    assert parse_manifest(text).engine.version == version


def test_hf_source_is_accepted_by_the_manifest() -> None:
    text = '[stack]\nname = "s"\n[model]\nsource = "hf://google/gemma-3-270m-it-GGUF@main/model.gguf"\n'
    assert parse_manifest(text).model.source.startswith("hf://")
