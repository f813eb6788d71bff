"""llama.cpp's own HTTP server, ``llama-server``, as a served engine.

Everything goes through the server's native endpoints, which say more than its OpenAI-compatible ones:
``/props`` (build, loaded model, chat template, default generation settings), ``/v1/models`` (the model's
vocabulary size, parameter count and trained context), ``/apply-template`` (the server's own rendering of a
chat), ``/tokenize`` and ``/detokenize``, and ``/completion`` from token ids with ``n_probs`` (top-k with ids).

Every completion request sets every sampler value, a seed, and ``cache_prompt: false``: a reused prompt cache
moves logprobs (by 0.03 on Gemma 3 270M), so each smoke prompt starts from an empty cache, as in process.
The backend options the server was started with (``-fa``, ``--swa-full``, cache types) are reported by no
endpoint; they must be pinned where the server is started, and verify says they could not be observed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from stacklock.engines.base import (
    AdapterInfo,
    BackendSettings,
    Capabilities,
    EngineIdentity,
    Generation,
    SamplerSettings,
    StepLogprobs,
    StopReason,
)
from stacklock.engines.http import ServedClient, ServedSettings, field
from stacklock.errors import EngineError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    import httpx

__all__ = [
    "ENGINE_NAME",
    "SAMPLER_PARAMS",
    "LlamaServerEngine",
    "LlamaServerModel",
    "ServedModel",
    "served_identity",
]

ENGINE_NAME = "llama-server"
NOT_REPORTED = "not reported over HTTP"
_BUILD = re.compile(r"b(\d+)")
_STOP_REASONS: dict[str, StopReason] = {"eos": "eos", "word": "stop-string", "limit": "max-tokens"}


def served_identity(name: str, version: str, build: str | None) -> EngineIdentity:
    """A served engine's identity: its name, version and build; the machine it runs on no endpoint reports."""
    return EngineIdentity(
        name=name,
        version=version,
        build=build,
        ggml_version=NOT_REPORTED,
        backend=NOT_REPORTED,
        system_info=NOT_REPORTED,
        python=NOT_REPORTED,
        platform=NOT_REPORTED,
        cpu=NOT_REPORTED,
    )


class ServedModel(dict[str, Any]):
    """What a served engine says about the model it has loaded (keys: path, vocab-size, parameter-count...)."""


class LlamaServerEngine:
    """llama.cpp's ``llama-server`` at an endpoint; registered as the ``llama-server`` engine."""

    name = ENGINE_NAME
    info: ClassVar[AdapterInfo] = AdapterInfo(
        name=ENGINE_NAME,
        distribution=None,
        build_scheme="build-number",
        # The server's defaults depend on its command line; lock reads them from /props instead.
        sampler_defaults=None,
        backend_defaults=None,
        capabilities=Capabilities(
            tokenize=True,
            detokenize=True,
            token_id_prompts=True,
            top_logprobs=True,
            chat_render=True,
            served=True,
        ),
    )

    def __init__(self, settings: ServedSettings | None = None, *, client: httpx.Client | None = None) -> None:
        self._http = ServedClient.for_adapter(ENGINE_NAME, settings, client)
        self._props: dict[str, Any] | None = None

    @property
    def http(self) -> ServedClient:
        return self._http

    def props(self) -> dict[str, Any]:
        """``/props``, asked once: the server's build, model, chat template and default settings."""
        if self._props is None:
            health = self._http.get("/health")
            if isinstance(health, dict) and health.get("status") not in {None, "ok"}:
                raise EngineError(
                    f"{ENGINE_NAME} at {self._http.endpoint} is not ready: {health}",
                    hint="wait until the server has loaded its model",
                )
            props = self._http.get("/props")
            if not isinstance(props, dict):
                raise EngineError(f"{ENGINE_NAME} at {self._http.endpoint}: /props is not a JSON object")
            self._props = props
        return self._props

    def identity(self) -> EngineIdentity:
        build_info = str(field(f"{ENGINE_NAME} /props", self.props(), "build_info"))
        match = _BUILD.match(build_info)
        return served_identity(ENGINE_NAME, f"b{match.group(1)}" if match else build_info, build_info)

    def served_model(self) -> ServedModel:
        """The model the server has loaded, as far as its endpoints tell."""
        props = self.props()
        models = self._http.get("/v1/models")
        meta = field(f"{ENGINE_NAME} /v1/models", models, "data", 0, "meta")
        return ServedModel(
            {
                "path": props.get("model_path"),
                "vocab-size": meta.get("n_vocab"),
                "parameter-count": meta.get("n_params"),
                "context-length": meta.get("n_ctx_train"),
                "context-size": field(f"{ENGINE_NAME} /props", props, "default_generation_settings", "n_ctx"),
            }
        )

    def chat_template(self) -> str | None:
        """The chat template the server renders with (its ChatML fallback when the GGUF has none)."""
        value = self.props().get("chat_template")
        return value if isinstance(value, str) else None

    def sampler_defaults(self) -> dict[str, Any]:
        """What a request that sets nothing gets: the server's default generation settings."""
        params = field(f"{ENGINE_NAME} /props", self.props(), "default_generation_settings", "params")
        return {key: params[name] for key, name in SAMPLER_PARAMS.items() if name in params}

    def capabilities(self) -> Capabilities:
        """What this server lets stacklock observe (the class's declaration)."""
        return self.info.capabilities

    def load(self, model_path: Path, backend: BackendSettings) -> LlamaServerModel:  # noqa: ARG002 - the server loaded its model
        """The model the server has already loaded (the server, not stacklock, reads the file)."""
        self.props()
        return LlamaServerModel(self)


#: The manifest's sampler keys and the names /props and /completion (and Ollama's options) use for them.
SAMPLER_PARAMS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "seed": "seed",
}


class LlamaServerModel:
    """The model loaded in a llama-server; every call is one HTTP request."""

    def __init__(self, engine: LlamaServerEngine) -> None:
        self._engine = engine
        self._http = engine.http

    def identity(self) -> EngineIdentity:
        return self._engine.identity()

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> tuple[int, ...]:
        answer = self._http.post(
            "/tokenize", {"content": text, "add_special": add_bos, "parse_special": parse_special}
        )
        return tuple(int(t) for t in field(f"{ENGINE_NAME} /tokenize", answer, "tokens"))

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:  # noqa: ARG002 - the server always shows special tokens
        answer = self._http.post("/detokenize", {"tokens": list(tokens)})
        return str(field(f"{ENGINE_NAME} /detokenize", answer, "content"))

    def bos_id(self) -> int | None:
        return None

    def generate(
        self,
        prompt_tokens: Sequence[int],
        *,
        sampler: SamplerSettings,
        max_tokens: int,
        stop: Sequence[str],
        top_k_logprobs: int = 5,
    ) -> Generation:
        request: dict[str, Any] = {name: getattr(sampler, key) for key, name in SAMPLER_PARAMS.items()}
        if request["seed"] is None:
            request["seed"] = 0
        request.update(
            prompt=list(prompt_tokens),
            n_predict=max_tokens,
            stop=list(stop),
            n_probs=top_k_logprobs,
            cache_prompt=False,
            return_tokens=True,
            post_sampling_probs=False,
            stream=False,
        )
        answer = self._http.post("/completion", request)
        what = f"{ENGINE_NAME} /completion"
        probabilities = field(what, answer, "completion_probabilities")
        steps = tuple(
            StepLogprobs(
                token=int(field(what, step, "id")),
                logprob=float(field(what, step, "logprob")),
                top=tuple(
                    (int(field(what, alt, "id")), float(field(what, alt, "logprob")))
                    for alt in field(what, step, "top_logprobs")
                ),
            )
            for step in probabilities
        )
        tokens = tuple(int(t) for t in field(what, answer, "tokens"))
        stop_type = str(field(what, answer, "stop_type"))
        pieces = tuple(str(field(what, step, "token")) for step in probabilities)
        return Generation(
            prompt_tokens=tuple(prompt_tokens),
            tokens=tokens,
            pieces=pieces,
            steps=steps,
            text=str(field(what, answer, "content")),
            stop_reason=_STOP_REASONS.get(stop_type, "max-tokens"),
        )

    def builtin_chat_render(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str] | None:
        """The server's own rendering of a chat, with the template it loaded (``/apply-template``)."""
        answer = self._http.post("/apply-template", {"messages": [dict(m) for m in messages]})
        return ("server", str(field(f"{ENGINE_NAME} /apply-template", answer, "prompt")))

    def close(self) -> None:
        self._http.close()
