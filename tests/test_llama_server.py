"""The Gemma stack behind a real llama-server (llama.cpp b11434, built by scripts/build_llama_server.sh).

The stack is locked, recorded and verified through the server's endpoints; then servers started with one thing
changed on their side (another chat template, another model, another default temperature, a tokenizer flag
overridden) must each fail verify at the stage that names that link.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stacklock.model.lock import parse_lock
from tests.conftest import Result
from tests.gguf_builder import build_tiny_gguf, gemma_model_path
from tests.servers import llama_server, llama_server_binary

pytestmark = [pytest.mark.server, pytest.mark.gemma]

Cli = Callable[..., Result]

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "gemma3-270m"
TEMPLATE = ROOT / "registry" / "templates" / "gemma3-it.jinja"
MODEL = "models/gemma-3-270m-q4_k_m.gguf"
# The backend options no endpoint reports, pinned where the server is started (see the README).
BACKEND = ("-fa", "off", "--swa-full", "--jinja")


@pytest.fixture(scope="module")
def gemma() -> Iterator[Path]:
    llama_server_binary()
    path = gemma_model_path()
    if path is None:
        pytest.skip("the Gemma 3 270M model is not installed (the 'example' extra)")
    # The projects link the shared model file, which lies outside them: the user allows its directory.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STACKLOCK_ALLOW_PATHS", str(path.resolve().parent))
        yield path


def _served_manifest(project: Path) -> None:
    text = (EXAMPLE / "llmstack.toml").read_text(encoding="utf-8")
    text = text.replace(
        'name = "llama-cpp-python"\nversion = "==0.3.36"', 'name = "llama-server"\nversion = "==b11434"'
    )
    assert 'name = "llama-server"' in text
    (project / "llmstack.toml").write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def recorded(gemma: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Gemma stack locked and recorded through a llama-server started as the README says."""
    project = tmp_path_factory.mktemp("served")
    _served_manifest(project)
    (project / "models").mkdir()
    (project / MODEL).symlink_to(gemma)
    from stacklock.cli.app import main  # noqa: PLC0415 - the module-scoped fixture cannot use `cli`.

    with llama_server(
        gemma, *BACKEND, "--chat-template-file", str(TEMPLATE), log=project / "server.log"
    ) as url:
        for command in (["lock", "--endpoint", url], ["record", "--endpoint", url]):
            with pytest.raises(SystemExit) as info:
                main([*command, "--manifest", str(project / "llmstack.toml")])
            assert info.value.code in {0, None}, command
    return project


def _verify(cli: Cli, project: Path, url: str) -> dict[str, object]:
    result = cli("verify", "--format", "json", "--endpoint", url, cwd=project)
    assert result.code in {0, 1}, result.err
    report: dict[str, object] = json.loads(result.out)
    return report


def _first_failures(report: dict[str, object]) -> dict[str, str | None]:
    results = report["results"]
    assert isinstance(results, list)
    return {r["name"]: r["first-failure"] for r in results}


def test_the_lock_pins_the_servers_identity(recorded: Path) -> None:
    lock = parse_lock((recorded / "llmstack.lock").read_text(encoding="utf-8"))
    assert lock.engine.name == "llama-server"
    assert lock.engine.version == "b11434"
    served = lock.engine.served
    assert served is not None
    assert served.build.startswith("b11434")
    assert served.model["vocab-size"] == lock.tokenizer.vocab_size == 262144
    assert served.model["parameter-count"] == lock.model.parameter_count
    assert served.sampler_defaults["temperature"] == pytest.approx(0.8)
    assert "backend.flash-attention" in served.unobservable
    assert all(pin.golden is not None for pin in lock.smoke)


def test_verify_endpoint_certifies_the_gemma_stack(recorded: Path, gemma: Path, cli: Cli) -> None:
    with llama_server(gemma, *BACKEND, "--chat-template-file", str(TEMPLATE), log=recorded / "v.log") as url:
        report = _verify(cli, recorded, url)
        text = cli("verify", "--endpoint", url, cwd=recorded)
    assert report["reproduced"] is True, report
    assert all(s["status"] == "pass" for r in report["results"] for s in r["stages"])  # type: ignore[attr-defined]
    notes = report["notes"]
    assert isinstance(notes, list)
    assert any(
        n.startswith("not checked (no llama-server endpoint reports them): backend.flash-attention")
        for n in notes
    )
    assert text.code == 0
    assert text.out.splitlines()[-1].startswith("reproduced: 4 smoke prompt(s)")


def test_another_chat_template_fails_at_the_template_stage(recorded: Path, gemma: Path, cli: Cli) -> None:
    with llama_server(gemma, *BACKEND, "--chat-template", "chatml", log=recorded / "t.log") as url:
        report = _verify(cli, recorded, url)
    failures = _first_failures(report)
    assert failures["chat"] == "template"
    assert failures["chat-with-system"] == "template"
    # Raw prompts do not go through a template: they still reproduce.
    assert failures["capital"] is None


def test_another_model_fails_at_the_artifacts_stage(recorded: Path, cli: Cli) -> None:
    tiny = recorded / "tiny.gguf"
    build_tiny_gguf(tiny)
    with llama_server(tiny, "--jinja", log=recorded / "m.log") as url:
        report = _verify(cli, recorded, url)
    assert set(_first_failures(report).values()) == {"artifacts"}
    detail = report["results"][0]["stages"][0]["detail"]  # type: ignore[index]
    assert detail.startswith("the server has another model loaded")


def test_another_default_temperature_fails_at_the_artifacts_stage(
    recorded: Path, gemma: Path, cli: Cli
) -> None:
    args = (*BACKEND, "--chat-template-file", str(TEMPLATE), "--temp", "0.3")
    with llama_server(gemma, *args, log=recorded / "d.log") as url:
        report = _verify(cli, recorded, url)
    assert set(_first_failures(report).values()) == {"artifacts"}
    detail = report["results"][0]["stages"][0]["detail"]  # type: ignore[index]
    assert "default sampler settings changed" in detail
    assert "temperature 0.3" in detail


def test_an_overridden_tokenizer_flag_fails_at_the_tokenization_stage(
    recorded: Path, gemma: Path, cli: Cli
) -> None:
    args = (
        *BACKEND,
        "--chat-template-file",
        str(TEMPLATE),
        "--override-kv",
        "tokenizer.ggml.add_bos_token=bool:false",
    )
    with llama_server(gemma, *args, log=recorded / "k.log") as url:
        report = _verify(cli, recorded, url)
    failures = _first_failures(report)
    # Raw prompts get their BOS from the tokenizer flag; chats carry <bos> in the locked render itself.
    assert failures["capital"] == "tokenization"
    assert failures["colours"] == "tokenization"


def test_a_server_of_another_build_is_refused(recorded: Path, tmp_path: Path, cli: Cli) -> None:
    lock_path = recorded / "llmstack.lock"
    text = lock_path.read_text(encoding="utf-8").replace('version = "b11434"', 'version = "b11433"', 1)
    project = tmp_path
    shutil.copy(recorded / "llmstack.toml", project / "llmstack.toml")
    (project / "llmstack.lock").write_text(text, encoding="utf-8")
    with llama_server(recorded / MODEL, *BACKEND, log=tmp_path / "b.log") as url:
        result = cli("verify", "--endpoint", url, cwd=project)
    assert result.code == 3, result.err
    assert "runs b11434, not the locked b11433" in result.err
