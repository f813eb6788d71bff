"""The openai-compatible engine (LM Studio and others) against a replay server of LM Studio's documented shapes.

LM Studio cannot run here: a real HTTP server on 127.0.0.1 answers ``/v1/models`` and ``/v1/completions`` as
LM Studio documents them (https://lmstudio.ai/docs/api/openai-api). The adapter was not run against LM Studio
itself; tests/test_llama_cpp_server.py runs it against a real llama-cpp-python server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stacklock.model.lock import parse_lock
from tests.conftest import Result
from tests.gguf_builder import build_tiny_gguf
from tests.servers import Replay, Reply, replay_server

Cli = Callable[..., Result]
MODEL_ID = "gemma-3-270m-it"
# A template that renders BOS in its text: the lock's chat prompt says add-bos = false.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MANIFEST = """
[stack]
name = "lm-studio"

[model]
source = "tiny.gguf"

[template]
source = "gguf"

[tokenizer]
source = "gguf"

[engine]
name = "openai-compatible"
version = "{version}"
model = "{model}"

[backend]
kind = "cpu"

[sampler]
temperature = 0.0
seed = 7
max-tokens = 8
stop = ["\\n"]

[[smoke]]
name = "capital"
prompt = "The capital of France is"
expect = {{ contains = "Paris" }}

[[smoke]]
name = "chat"
messages = [{{ role = "user", content = "hi" }}]
"""


def _models() -> dict[str, Any]:
    return {"data": [{"id": MODEL_ID, "object": "model", "owned_by": "organization_owner"}], "object": "list"}


def _completion(text: str, finish: str = "stop") -> Reply:
    return Reply(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1764000000,
            "model": MODEL_ID,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10},
        }
    )


def _project(path: Path, *, version: str = "==0.3.31", model: str = MODEL_ID) -> Path:
    build_tiny_gguf(path / "tiny.gguf", chat_template=TEMPLATE)
    (path / "llmstack.toml").write_text(MANIFEST.format(version=version, model=model), encoding="utf-8")
    return path


@pytest.fixture
def lm_studio() -> Iterator[tuple[str, Replay]]:
    # Past the stop string the server went on to max-tokens: stacklock cuts the text itself.
    routes = {
        "GET /v1/models": Reply(_models()),
        "POST /v1/completions": _completion(" Paris\nand more", "length"),
    }
    with replay_server(routes) as served:
        yield served


def _stages(out: str, smoke: str) -> dict[str, str]:
    [result] = [r for r in json.loads(out)["results"] if r["name"] == smoke]
    return {stage["stage"]: stage["status"] for stage in result["stages"]}


def test_lock_record_verify_checks_the_output_only(
    lm_studio: tuple[str, Replay], tmp_path: Path, cli: Cli
) -> None:
    url, replay = lm_studio
    project = _project(tmp_path)
    locked = cli("lock", "--endpoint", url, cwd=project)
    assert locked.code == 0, locked.err
    assert "does not report its version; ==0.3.31 is locked unverified" in locked.err
    assert cli("record", "--endpoint", url, cwd=project).code == 0
    lock = parse_lock((project / "llmstack.lock").read_text(encoding="utf-8"), "llmstack.lock")
    assert lock.engine.version == "0.3.31"
    assert lock.engine.served is not None
    assert lock.engine.served.build == "unverified"
    assert lock.engine.served.model == {"model-id": MODEL_ID}
    [capital] = [p for p in lock.smoke if p.name == "capital"]
    assert capital.golden is not None
    assert (capital.golden.text, capital.golden.stop_reason) == (" Paris", "stop-string")

    result = cli("verify", "--format", "json", "--endpoint", url, cwd=project)
    assert result.code == 0, result.err
    assert _stages(result.out, "chat") == {
        "artifacts": "pass",
        "template": "not-checked",
        "tokenization": "not-checked",
        "generation": "not-checked",
        "output": "pass",
    }
    # Every request names the model and sets the locked sampler; stop strings are applied by stacklock.
    bodies = [body for key, body in replay.requests if key == "POST /v1/completions"]
    assert all(b["model"] == MODEL_ID and b["temperature"] == 0.0 and b["seed"] == 7 for b in bodies)
    assert all("stop" not in b for b in bodies)
    # The chat's render carries BOS in its text; the server adds its own, so it is sent without it.
    [chat] = [p for p in lock.smoke if p.name == "chat"]
    assert chat.rendered is not None
    assert chat.rendered.startswith("<s>")
    assert {b["prompt"] for b in bodies} == {"The capital of France is", chat.rendered.removeprefix("<s>")}


def test_another_answer_fails_at_output(lm_studio: tuple[str, Replay], tmp_path: Path, cli: Cli) -> None:
    url, replay = lm_studio
    project = _project(tmp_path)
    for command in ("lock", "record"):
        assert cli(command, "--endpoint", url, cwd=project).code == 0
    replay.routes["POST /v1/completions"] = _completion(" Lyon")
    result = cli("verify", "--format", "json", "--endpoint", url, cwd=project)
    assert result.code == 1
    stages = _stages(result.out, "capital")
    assert (stages["generation"], stages["output"]) == ("not-checked", "fail")


def test_a_version_range_cannot_be_checked(lm_studio: tuple[str, Replay], tmp_path: Path, cli: Cli) -> None:
    url, _ = lm_studio
    result = cli("lock", "--endpoint", url, cwd=_project(tmp_path, version=">=0.3"))
    assert result.code == 2
    assert "openai-compatible servers do not report their version, so '>=0.3' cannot be checked" in result.err
    assert sum(line.startswith("error:") for line in result.err.splitlines()) == 1
    assert "Traceback" not in result.err


def test_a_model_it_does_not_serve(lm_studio: tuple[str, Replay], tmp_path: Path, cli: Cli) -> None:
    url, _ = lm_studio
    result = cli("lock", "--endpoint", url, cwd=_project(tmp_path, model="qwen3-8b"))
    assert result.code == 3
    assert f"serves no model named 'qwen3-8b' (it serves: {MODEL_ID})" in result.err


def test_an_answer_of_another_shape_is_one_line(
    lm_studio: tuple[str, Replay], tmp_path: Path, cli: Cli
) -> None:
    url, replay = lm_studio
    project = _project(tmp_path)
    assert cli("lock", "--endpoint", url, cwd=project).code == 0
    replay.routes["POST /v1/completions"] = Reply({"error": "model unloaded"})
    result = cli("record", "--endpoint", url, cwd=project)
    assert result.code == 3
    assert "openai-compatible /v1/completions: the answer has no ['choices'][0]" in result.err
    assert sum(line.startswith("error:") for line in result.err.splitlines()) == 1
    assert "Traceback" not in result.err
