"""A tiny stack behind a real ``python -m llama_cpp.server`` (llama-cpp-python 0.3.36, the 'server' extra).

The server is started on 127.0.0.1 with a tiny GGUF; the stack is locked, recorded and verified through it (as
``llama-cpp-python-server``, and as any ``openai-compatible`` server), the stages it cannot show are reported
not checked, servers started with another model fail verify at the stage that shows it, and the server agrees
with the same llama-cpp-python run in process (same prompt tokens, same output).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stacklock.engines.http import ServedSettings
from stacklock.engines.llama_cpp_server import LlamaCppServerEngine
from stacklock.model.lock import parse_lock
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf
from tests.servers import Reply, llama_cpp_python_server, replay_server

pytestmark = pytest.mark.engine

Cli = Callable[..., Result]
ALIAS = "tiny-chat"

MANIFEST = """
[stack]
name = "tiny-served"

[model]
source = "tiny.gguf"

[template]
source = "gguf"

[tokenizer]
source = "gguf"

[engine]
name = "{engine}"
version = "==0.3.36"
{model}

[backend]
kind = "cpu"
context-size = 256
threads = 2

[sampler]
temperature = 0.0
top-k = 40
top-p = 0.95
min-p = 0.05
repeat-penalty = 1.0
seed = 0
max-tokens = 8

[[smoke]]
name = "raw"
prompt = "hello world"

[[smoke]]
name = "chat"
messages = [{{ role = "user", content = "hi" }}]
"""


def _project(path: Path, engine: str, *, model: str | None = ALIAS) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_gguf(path / "tiny.gguf", chat_template=CHATML)
    line = f'model = "{model}"' if model else ""
    (path / "llmstack.toml").write_text(MANIFEST.format(engine=engine, model=line), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny chat model behind a real llama-cpp-python server, known by its alias."""
    base = tmp_path_factory.mktemp("llama-cpp-python-server")
    model = build_tiny_gguf(base / "tiny.gguf", chat_template=CHATML)
    with llama_cpp_python_server(model, "--model_alias", ALIAS, log=base / "server.log") as url:
        yield url


def _stages(report: dict[str, object], smoke: str) -> dict[str, str]:
    results = report["results"]
    assert isinstance(results, list)
    [result] = [r for r in results if r["name"] == smoke]
    return {stage["stage"]: stage["status"] for stage in result["stages"]}


def _verify(cli: Cli, project: Path, url: str) -> tuple[int, dict[str, object]]:
    result = cli("verify", "--format", "json", "--endpoint", url, cwd=project)
    assert result.code in {0, 1}, result.err
    report: dict[str, object] = json.loads(result.out)
    return result.code, report


@pytest.fixture(scope="module")
def recorded(server: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = _project(tmp_path_factory.mktemp("recorded"), "llama-cpp-python-server")
    from stacklock.cli.app import main  # noqa: PLC0415 - the module-scoped fixture cannot use `cli`.

    for command in (["lock", "--endpoint", server], ["record", "--endpoint", server]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--manifest", str(project / "llmstack.toml")])
        assert info.value.code in {0, None}, command
    return project


def test_lock_pins_the_version_its_build_and_the_servers_defaults(recorded: Path) -> None:
    lock = parse_lock((recorded / "llmstack.lock").read_text(encoding="utf-8"), "llmstack.lock")
    assert (lock.engine.version, lock.engine.build) == ("0.3.36", 11312)  # the registry's vendored build
    served = lock.engine.served
    assert served is not None
    assert served.model == {"model-id": ALIAS}
    assert served.chat_template_sha256 is None
    # The server's own request defaults, read from its OpenAPI schema: not llama-cpp-python's in-process ones.
    assert served.sampler_defaults["repeat_penalty"] == pytest.approx(1.1)
    assert served.sampler_defaults["temperature"] == pytest.approx(0.8)


def test_verify_reproduces_and_says_what_it_could_not_check(recorded: Path, server: str, cli: Cli) -> None:
    code, report = _verify(cli, recorded, server)
    assert code == 0
    chat, raw = _stages(report, "chat"), _stages(report, "raw")
    assert chat == {
        "artifacts": "pass",
        "template": "not-checked",
        "tokenization": "pass",
        "generation": "not-checked",
        "output": "pass",
    }
    # A raw prompt's render is stacklock's own, compared whatever the engine.
    assert raw["template"] == "pass"


def test_the_server_agrees_with_the_same_build_in_process(
    recorded: Path, server: str, tmp_path: Path, cli: Cli
) -> None:
    inproc = _project(tmp_path / "in-process", "llama-cpp-python", model=None)
    for command in ("lock", "record"):
        assert cli(command, cwd=inproc).code == 0
    here = parse_lock((inproc / "llmstack.lock").read_text(encoding="utf-8"), "llmstack.lock")
    there = parse_lock((recorded / "llmstack.lock").read_text(encoding="utf-8"), "llmstack.lock")
    for mine, theirs in zip(here.smoke, there.smoke, strict=True):
        assert mine.golden is not None
        assert theirs.golden is not None
        assert mine.golden.prompt_tokens == theirs.golden.prompt_tokens, mine.name
        assert (mine.golden.text, mine.golden.stop_reason) == (theirs.golden.text, theirs.golden.stop_reason)
    # Token by token: the server's token texts are the in-process tokens' texts.
    engine = LlamaCppServerEngine(ServedSettings(endpoint=server))
    loaded = engine.load(None, here.backend)
    try:
        [raw] = [p for p in here.smoke if p.name == "raw"]
        assert raw.golden is not None
        assert raw.rendered is not None
        generation = loaded.generate_from_text(
            raw.rendered, sampler=here.sampler, max_tokens=raw.max_tokens, stop=()
        )
        assert generation.pieces == tuple(loaded.detokenize([t]) for t in raw.golden.tokens)
    finally:
        loaded.close()


def test_another_model_behind_the_alias_fails_at_output(recorded: Path, tmp_path: Path, cli: Cli) -> None:
    other = build_tiny_gguf(tmp_path / "other.gguf", chat_template=CHATML, seed=1)
    with llama_cpp_python_server(other, "--model_alias", ALIAS, log=tmp_path / "server.log") as url:
        code, report = _verify(cli, recorded, url)
    assert code == 1
    stages = _stages(report, "raw")
    # Same vocabulary, other weights: the prompt tokens still match; the generated text does not.
    assert (stages["tokenization"], stages["generation"], stages["output"]) == ("pass", "not-checked", "fail")


def test_a_tokenizer_without_bos_fails_at_tokenization(recorded: Path, tmp_path: Path, cli: Cli) -> None:
    other = build_tiny_gguf(tmp_path / "nobos.gguf", chat_template=CHATML, add_bos=False)
    with llama_cpp_python_server(other, "--model_alias", ALIAS, log=tmp_path / "server.log") as url:
        code, report = _verify(cli, recorded, url)
    assert code == 1
    assert _stages(report, "raw")["tokenization"] == "fail"


def test_a_server_under_another_alias_is_another_model(recorded: Path, tmp_path: Path, cli: Cli) -> None:
    model = build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML)
    with llama_cpp_python_server(model, "--model_alias", "someone-else", log=tmp_path / "server.log") as url:
        result = cli("verify", "--endpoint", url, cwd=recorded)
    assert result.code == 3
    assert "serves no model named 'tiny-chat' (it serves: someone-else)" in result.err
    assert sum(line.startswith("error:") for line in result.err.splitlines()) == 1
    assert "Traceback" not in result.err


def test_a_server_of_another_version_is_refused_at_lock(server: str, tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path, "llama-cpp-python-server")
    manifest = project / "llmstack.toml"
    manifest.write_text(
        manifest.read_text(encoding="utf-8").replace("==0.3.36", "==0.3.35"), encoding="utf-8"
    )
    result = cli("lock", "--endpoint", server, cwd=project)
    assert result.code == 3
    assert "0.3.36 does not satisfy '==0.3.35'" in result.err


def test_openai_compatible_checks_only_the_output(server: str, tmp_path: Path, cli: Cli) -> None:
    """The same real server, reached as any OpenAI-compatible one: only /v1/models and /v1/completions."""
    project = _project(tmp_path, "openai-compatible")
    for command in ("lock", "record"):
        assert cli(command, "--endpoint", server, cwd=project).code == 0
    lock = parse_lock((project / "llmstack.lock").read_text(encoding="utf-8"), "llmstack.lock")
    assert lock.engine.version == "0.3.36"
    assert lock.engine.served is not None
    assert lock.engine.served.build == "unverified"
    code, report = _verify(cli, project, server)
    assert code == 0
    assert _stages(report, "chat") == {
        "artifacts": "pass",
        "template": "not-checked",
        "tokenization": "not-checked",
        "generation": "not-checked",
        "output": "pass",
    }


def test_another_server_at_the_endpoint_is_one_line(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path, "llama-cpp-python-server")
    routes = {
        "GET /openapi.json": Reply({"openapi": "3.1.0", "info": {"title": "vLLM API", "version": "0.11.0"}})
    }
    with replay_server(routes) as (url, _):
        result = cli("lock", "--endpoint", url, cwd=project)
    assert result.code == 3
    assert "is another server ('vLLM API')" in result.err
    assert sum(line.startswith("error:") for line in result.err.splitlines()) == 1


def test_a_sampler_value_the_server_cannot_take_is_refused(
    recorded: Path, server: str, tmp_path: Path, cli: Cli
) -> None:
    project = _project(tmp_path, "llama-cpp-python-server")
    manifest = project / "llmstack.toml"
    manifest.write_text(
        manifest.read_text(encoding="utf-8").replace("seed = 0\n", "seed = 0\ntypical-p = 0.9\n"),
        encoding="utf-8",
    )
    assert cli("lock", "--endpoint", server, cwd=project).code == 0
    result = cli("record", "--endpoint", server, cwd=project)
    assert result.code == 3
    assert "cannot be given sampler.typical_p = 0.9" in result.err
