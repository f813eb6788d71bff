"""llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``) as a served engine.

What it lets stacklock observe, and what it does not:

- its version: ``/openapi.json`` ``info.version`` is ``llama_cpp.__version__`` (the llama.cpp build is the one
  that release vendors, from the registry's llama-cpp-python table: the server reports no build);
- its loaded model: ``/v1/models`` gives the model's alias only (its path unless started with
  ``--model_alias``): no vocabulary size, parameter count or context;
- its defaults: the defaults of its completion request schema in ``/openapi.json``;
- tokenization: ``/extras/tokenize`` always parses special tokens and always adds the BOS (and EOS) the model's
  tokenizer wants, exactly as ``/v1/completions`` does to a text prompt; a tokenization without them is that
  answer without the tokens the server adds to an empty text;
- generation: ``/v1/completions`` takes text prompts only (no token ids) and keys its logprobs by token text,
  without ids: the generated ids cannot be observed, so the generation stage is not checked and the output
  stage compares the text;
- its chat rendering is not shown by any endpoint: the template stage of a chat is not checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from stacklock.engines.base import (
    AdapterInfo,
    BackendSettings,
    Capabilities,
    EngineIdentity,
    Generation,
    SamplerSettings,
    StopReason,
)
from stacklock.engines.http import ServedClient, ServedSettings, field
from stacklock.engines.llama_cpp import RANDOM_SEED
from stacklock.engines.llama_server import NOT_REPORTED, ServedModel
from stacklock.engines.openai_compat import completion_request, listed_model
from stacklock.errors import EngineError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    import httpx

__all__ = ["ENGINE_NAME", "LlamaCppServerEngine", "LlamaCppServerModel"]

ENGINE_NAME = "llama-cpp-python-server"
_TITLE = "llama.cpp Python API"
# The manifest's sampler keys and the names the server's completion request uses for them.
_SAMPLER_PARAMS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "mirostat": "mirostat_mode",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "seed": "seed",
}
# What the server applies but no request can set (Llama.__call__'s typical_p, the model's last_n_tokens_size).
_FIXED = {"typical_p": 1.0, "repeat_last_n": 64}


class LlamaCppServerEngine:
    """``python -m llama_cpp.server`` at an endpoint; registered as the ``llama-cpp-python-server`` engine."""

    name = ENGINE_NAME
    info: ClassVar[AdapterInfo] = AdapterInfo(
        name=ENGINE_NAME,
        distribution=None,
        build_scheme="vendored",
        builds_of="llama-cpp-python",
        # Its completion request's defaults in 0.3.36 (repeat_penalty 1.1, where llama-cpp-python in process
        # has 1.0); lock also reads the running server's from /openapi.json, and every request sets them all.
        sampler_defaults={
            "temperature": 0.8,
            "top_k": 40,
            "top_p": 0.95,
            "min_p": 0.05,
            "typical_p": 1.0,
            "repeat_penalty": 1.1,
            "repeat_last_n": 64,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "mirostat": 0,
            "mirostat_tau": 5.0,
            "mirostat_eta": 0.1,
            "seed": RANDOM_SEED,
            "max_tokens": 16,
            "stop": (),
        },
        backend_defaults=None,
        capabilities=Capabilities(
            tokenize=True,
            detokenize=True,
            token_id_prompts=False,
            top_logprobs=False,
            chat_render=False,
            served=True,
        ),
        tested_version="0.3.36",
    )

    def __init__(self, settings: ServedSettings | None = None, *, client: httpx.Client | None = None) -> None:
        self._http = ServedClient.for_adapter(ENGINE_NAME, settings, client)
        self._openapi: dict[str, Any] | None = None
        self._model: str | None = None

    @property
    def http(self) -> ServedClient:
        return self._http

    def openapi(self) -> dict[str, Any]:
        """``/openapi.json``, asked once: the server's version and its request defaults."""
        if self._openapi is None:
            answer = self._http.get("/openapi.json")
            title = str(field(f"{ENGINE_NAME} /openapi.json", answer, "info", "title"))
            if _TITLE not in title:
                raise EngineError(
                    f"{ENGINE_NAME} at {self._http.endpoint} is another server ({title!r})",
                    hint="point --endpoint at `python -m llama_cpp.server`, or set engine.name to the engine there",
                )
            self._openapi = answer
        return self._openapi

    def identity(self) -> EngineIdentity:
        version = str(field(f"{ENGINE_NAME} /openapi.json", self.openapi(), "info", "version"))
        return EngineIdentity(
            name=ENGINE_NAME,
            version=version,
            build=None,
            ggml_version=NOT_REPORTED,
            backend=NOT_REPORTED,
            system_info=NOT_REPORTED,
            python=NOT_REPORTED,
            platform=NOT_REPORTED,
            cpu=NOT_REPORTED,
        )

    def served_model(self) -> ServedModel:
        """The model's alias, all the server tells about it (its path unless started with --model_alias)."""
        return ServedModel({"model-id": self.model_id()})

    def model_id(self) -> str:
        """The served model every request names (``engine.model``, else the one the server lists first)."""
        if self._model is None:
            self._model = listed_model(ENGINE_NAME, self._http, self._http.get("/v1/models"))
        return self._model

    def chat_template(self) -> str | None:
        """No endpoint shows the template the server renders chats with."""
        return None

    def sampler_defaults(self) -> dict[str, Any]:
        """What a request that sets nothing gets: the defaults of the server's completion request schema."""
        what = f"{ENGINE_NAME} /openapi.json"
        schema = field(what, self.openapi(), "components", "schemas", "CreateCompletionRequest", "properties")
        if not isinstance(schema, dict):
            raise EngineError(f"{what}: the completion request's properties are not a JSON object")
        found = {
            key: schema[name].get("default")
            for key, name in _SAMPLER_PARAMS.items()
            if isinstance(schema.get(name), dict)
        }
        return found | _FIXED

    def capabilities(self) -> Capabilities:
        return self.info.capabilities

    def load(self, model_path: Path | None, backend: BackendSettings) -> LlamaCppServerModel:  # noqa: ARG002 - the server loaded its model
        """The model the server has already loaded (the server, not stacklock, reads the file)."""
        self.openapi()
        return LlamaCppServerModel(self)


class LlamaCppServerModel:
    """The model loaded in a llama-cpp-python server; every call is one HTTP request."""

    def __init__(self, engine: LlamaCppServerEngine) -> None:
        self._engine = engine
        self._http = engine.http
        self._added: tuple[int, ...] | None = None
        self._model = engine.model_id()

    def identity(self) -> EngineIdentity:
        return self._engine.identity()

    def _tokenize(self, text: str) -> tuple[int, ...]:
        answer = self._http.post("/extras/tokenize", {"input": text, "model": self._model})
        return tuple(int(t) for t in field(f"{ENGINE_NAME} /extras/tokenize", answer, "tokens"))

    def added_tokens(self) -> tuple[int, ...]:
        """The tokens the server adds to every text (its tokenizer's BOS, and EOS where it adds one)."""
        if self._added is None:
            self._added = self._tokenize("")
        return self._added

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> tuple[int, ...]:
        if not parse_special:
            raise EngineError(
                f"{ENGINE_NAME} always parses special tokens in text; it cannot tokenize them as plain text"
            )
        tokens = self._tokenize(text)
        bos = self.added_tokens()[:1]
        if not add_bos and bos and tokens[:1] == bos:
            return tokens[1:]
        return tokens

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:  # noqa: ARG002 - the server never shows special tokens
        answer = self._http.post("/extras/detokenize", {"tokens": list(tokens), "model": self._model})
        return str(field(f"{ENGINE_NAME} /extras/detokenize", answer, "text"))

    def bos_id(self) -> int | None:
        return None

    def generate(
        self,
        prompt_tokens: Sequence[int],  # noqa: ARG002 - the Engine protocol's signature
        *,
        sampler: SamplerSettings,  # noqa: ARG002
        max_tokens: int,  # noqa: ARG002
        stop: Sequence[str],  # noqa: ARG002
        top_k_logprobs: int = 5,  # noqa: ARG002
    ) -> Generation:
        raise EngineError(f"{ENGINE_NAME} takes no token-id prompts (its /v1/completions takes text only)")

    def generate_from_text(
        self,
        prompt: str,
        *,
        sampler: SamplerSettings,
        max_tokens: int,
        stop: Sequence[str],
        top_k_logprobs: int = 5,  # noqa: ARG002 - its logprobs carry no token ids, so none are asked for
    ) -> Generation:
        """One ``/v1/completions`` request setting every sampler value; the prompt tokens are the server's own
        tokenization of the text (what the completion feeds the model); the generated ids are not observable."""
        request = completion_request(ENGINE_NAME, sampler, _SAMPLER_PARAMS, fixed=_FIXED)
        # One logprob per token gives each token's text, which tells a stop string from an end of generation.
        request.update(
            model=self._model, prompt=prompt, max_tokens=max_tokens, stop=list(stop), logprobs=1, stream=False
        )
        answer = self._http.post("/v1/completions", request)
        what = f"{ENGINE_NAME} /v1/completions"
        choice = field(what, answer, "choices", 0)
        text = str(field(what, choice, "text"))
        pieces = tuple(str(p) for p in field(what, choice, "logprobs", "tokens"))
        finish = field(what, choice, "finish_reason")
        return Generation(
            prompt_tokens=self._tokenize(prompt),
            tokens=(),
            pieces=pieces,
            steps=(),
            text=text,
            stop_reason=stop_reason(finish, text, pieces),
        )

    def builtin_chat_render(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str] | None:  # noqa: ARG002 - not shown
        return None

    def close(self) -> None:
        self._http.close()


def stop_reason(finish: object, text: str, pieces: Sequence[str]) -> StopReason:
    """OpenAI's finish reason, 'stop' told apart: a stop string cuts the text short of its tokens' text."""
    if finish == "length":
        return "max-tokens"
    return "stop-string" if "".join(pieces) != text else "eos"
