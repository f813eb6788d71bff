"""Faults of a served engine, over real HTTP on 127.0.0.1: each is one line and exit 3, never a hang."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from stacklock.engines.http import ServedClient, ServedSettings
from stacklock.engines.llama_server import LlamaServerEngine
from stacklock.errors import EngineError, ExitCode
from tests.conftest import Result
from tests.servers import Reply, free_port, replay_server

Cli = Callable[..., Result]


@dataclass(frozen=True)
class Greedy:
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None


@dataclass(frozen=True)
class BackendDefaults:
    kind: str = "cpu"
    gpu_layers: int | None = None
    flash_attention: bool | str | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    threads: int | str | None = None
    batch_size: int | None = None
    context_size: int | None = None


PROPS = {
    "build_info": "b11434-0123abcd",
    "model_path": "/models/tiny.gguf",
    "chat_template": "{{ messages }}",
    "default_generation_settings": {"n_ctx": 1024, "params": {"temperature": 0.8, "top_k": 40, "seed": -1}},
}


def _client(url: str, **settings: object) -> ServedClient:
    return ServedClient("llama-server", ServedSettings(endpoint=url, **settings))  # type: ignore[arg-type]


def test_connection_refused_is_one_line() -> None:
    client = _client(f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(EngineError) as info:
        client.get("/props")
    assert "cannot connect" in info.value.message
    assert "\n" not in info.value.one_line()
    assert info.value.exit_code == ExitCode.UNAVAILABLE


def test_a_slow_server_times_out_instead_of_hanging() -> None:
    with replay_server({"GET /props": Reply(PROPS, delay=3)}) as (url, _):
        client = _client(url, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(EngineError, match=r"timed out .*limit 0\.5 s"):
            client.get("/props")
        assert time.monotonic() - started < 2.5


def test_5xx_is_retried_with_backoff_then_succeeds() -> None:
    with replay_server({"GET /props": [Reply({"error": "busy"}, status=503), Reply(PROPS)]}) as (url, replay):
        assert _client(url)._request("GET", "/props", None)["build_info"] == "b11434-0123abcd"
    assert [key for key, _ in replay.requests] == ["GET /props", "GET /props"]


def test_5xx_that_persists_names_the_status_and_the_body() -> None:
    with (
        replay_server({"GET /health": Reply({"error": {"message": "Loading model"}}, status=503)}) as (
            url,
            replay,
        ),
        pytest.raises(EngineError, match=r"GET /health answered HTTP 503: .*Loading model"),
    ):
        _client(url, retries=2).get("/health")
    assert len(replay.requests) == 3


def test_401_names_the_key_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SERVER_KEY", "wrong")
    with (
        replay_server({"GET /props": Reply({"error": "unauthorized"}, status=401)}) as (url, _),
        pytest.raises(EngineError) as info,
    ):
        _client(url, api_key_env="MY_SERVER_KEY").get("/props")
    assert "refused with HTTP 401" in info.value.message
    assert info.value.hint == "check the key in MY_SERVER_KEY"
    assert "wrong" not in info.value.one_line()


def test_the_key_is_sent_as_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SERVER_KEY", "s3cret")
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(200, json=PROPS)

    # The client is injected: a user's proxies or certificates, here a transport that records the header.
    injected = httpx.Client(transport=httpx.MockTransport(handler))
    client = ServedClient(
        "llama-server", ServedSettings("http://server", api_key_env="MY_SERVER_KEY"), injected
    )
    client.get("/props")
    assert seen == ["Bearer s3cret"]


def test_a_missing_key_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ABSENT_KEY", raising=False)
    with pytest.raises(EngineError, match="the API key variable ABSENT_KEY is not set"):
        _client("http://127.0.0.1:1", api_key_env="ABSENT_KEY")


@pytest.mark.parametrize("raw", [b"<html>proxy error</html>", b'{"build_info": "b1', b""])
def test_a_body_that_is_not_json_is_one_line(raw: bytes) -> None:
    with (
        replay_server({"GET /props": Reply(raw=raw)}) as (url, _),
        pytest.raises(EngineError, match="answered with a body that is not JSON"),
    ):
        _client(url).get("/props")


def test_an_answer_of_another_shape_names_the_missing_field() -> None:
    props = {k: v for k, v in PROPS.items() if k != "build_info"}
    with replay_server({"GET /health": Reply({"status": "ok"}), "GET /props": Reply(props)}) as (url, _):
        engine = LlamaServerEngine(ServedSettings(endpoint=url))
        with pytest.raises(EngineError, match=r"/props: the answer has no \['build_info'\]"):
            engine.identity()


def test_an_endpoint_that_is_not_a_url_is_refused() -> None:
    with pytest.raises(EngineError, match="is not an http:// or https:// URL"):
        _client("127.0.0.1:8080")


def test_cli_lock_against_a_server_that_is_down_exits_3(tiny_project: Path, cli: Cli) -> None:
    (tiny_project / "llmstack.toml").write_text(
        '[stack]\nname = "tiny"\n[model]\nsource = "tiny.gguf"\n[engine]\nname = "llama-server"\nversion = "==b11434"\n'
        'endpoint = "http://127.0.0.1:9"\n',
        encoding="utf-8",
    )
    result = cli("lock", "--endpoint", f"http://127.0.0.1:{free_port()}", cwd=tiny_project)
    assert result.code == ExitCode.UNAVAILABLE, result.err
    # The reporter's step lines come first; the error is one line, the last.
    error = result.err.strip().splitlines()
    assert error[-1].startswith("error: llama-server at http://127.0.0.1:")
    assert "cannot connect" in error[-1]
    assert not any(line.startswith("error") or "Traceback" in line for line in error[:-1])


def test_llama_server_requests_and_answers_of_the_documented_shapes() -> None:
    completion = {
        "content": " Paris",
        "tokens": [9079],
        "stop_type": "limit",
        "completion_probabilities": [
            {
                "id": 9079,
                "token": " Paris",
                "logprob": -0.1,
                "bytes": [32, 80],
                "top_logprobs": [
                    {"id": 9079, "token": " Paris", "logprob": -0.1, "bytes": [32]},
                    {"id": 17, "token": " the", "logprob": -2.5, "bytes": [32]},
                ],
            }
        ],
    }
    routes = {
        "GET /health": Reply({"status": "ok"}),
        "GET /props": Reply(PROPS),
        "POST /completion": Reply(completion),
        "POST /tokenize": Reply({"tokens": [2, 10, 11]}),
        "POST /apply-template": Reply({"prompt": "<start_of_turn>user\nHi<end_of_turn>\n"}),
    }
    with replay_server(routes) as (url, replay):
        engine = LlamaServerEngine(ServedSettings(endpoint=url))
        assert engine.identity().version == "b11434"
        loaded = engine.load(Path("unused.gguf"), BackendDefaults())
        assert loaded.tokenize("Hi", add_bos=True, parse_special=True) == (2, 10, 11)
        generation = loaded.generate(
            [2, 10, 11], sampler=Greedy(), max_tokens=1, stop=["\n"], top_k_logprobs=2
        )
        assert loaded.builtin_chat_render([{"role": "user", "content": "Hi"}]) == (
            "server",
            "<start_of_turn>user\nHi<end_of_turn>\n",
        )
    assert generation.tokens == (9079,)
    assert generation.steps[0].top == ((9079, -0.1), (17, -2.5))
    assert generation.stop_reason == "max-tokens"
    bodies = dict(replay.requests)
    assert bodies["POST /tokenize"] == {"content": "Hi", "add_special": True, "parse_special": True}
    sent = bodies["POST /completion"]
    assert sent["prompt"] == [2, 10, 11]
    assert sent["cache_prompt"] is False
    assert sent["n_probs"] == 2
    assert sent["temperature"] == 0.0
    assert sent["seed"] == 0
    assert {"top_k", "top_p", "min_p", "repeat_penalty", "mirostat"} <= set(sent)


def test_a_bad_timeout_setting_is_one_line(
    tiny_project: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tiny_project / "llmstack.toml").write_text(
        '[stack]\nname = "tiny"\n[model]\nsource = "tiny.gguf"\n[engine]\nname = "llama-server"\n'
        'version = "==b11434"\nendpoint = "http://127.0.0.1:9"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("STACKLOCK_TIMEOUT", "soon")
    result = cli("lock", cwd=tiny_project)
    assert result.code == ExitCode.UNAVAILABLE
    assert (
        result.err.splitlines()[-1]
        == "error: STACKLOCK_TIMEOUT='soon' is not a number of seconds; e.g. STACKLOCK_TIMEOUT=300"
    )


def test_a_connection_reset_mid_response_is_retried_then_one_line(tiny_project: Path, cli: Cli) -> None:
    (tiny_project / "llmstack.toml").write_text(
        '[stack]\nname = "tiny"\n[model]\nsource = "tiny.gguf"\n[engine]\nname = "llama-server"\n'
        'version = "==b11434"\nendpoint = "http://127.0.0.1:9"\n',
        encoding="utf-8",
    )
    routes = {"GET /health": Reply({"status": "ok"}), "GET /props": Reply(PROPS, reset=True)}
    with replay_server(routes) as (url, replay):
        result = cli("lock", "--endpoint", url, cwd=tiny_project)
    assert result.code == ExitCode.UNAVAILABLE, result.err
    error = result.err.strip().splitlines()[-1]
    assert error.startswith(f"error: llama-server at {url}: GET /props failed: "), error
    assert "Traceback" not in result.err
    # Dropped connections are retried (3 times by default) before the one line.
    assert [key for key, _ in replay.requests].count("GET /props") == 4
