"""Any OpenAI-compatible server (LM Studio and others) as a served engine: the least stacklock can ask.

Only ``/v1/models`` and ``/v1/completions`` are used. Such a server shows neither its tokenization (no tokenize
endpoint), nor generated token ids with their logprobs (LM Studio gives neither over HTTP), nor its own
rendering of a chat, so the template stage of a chat, the tokenization and the generation stages are reported
``not checked``, never passed, and the output stage compares the generated text with the recording.

Nor does it report its version: the version is the one the manifest pins exactly (``==X``), which no
request can confirm; the lock pins it with ``[engine.served] build = "unverified"``, and verify says so.
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
    first_stop,
)
from stacklock.engines.http import ServedClient, ServedSettings, field
from stacklock.engines.llama_server import NOT_REPORTED, ServedModel
from stacklock.engines.served import UNVERIFIED
from stacklock.errors import EngineError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    import httpx

__all__ = ["ENGINE_NAME", "OpenAICompatibleEngine", "OpenAICompatibleModel"]

ENGINE_NAME = "openai-compatible"
# OpenAI's completion fields, and the llama.cpp ones LM Studio documents beside them (top_k, repeat_penalty).
_SAMPLER_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repeat_penalty": "repeat_penalty",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "seed": "seed",
}


class OpenAICompatibleEngine:
    """An OpenAI-compatible server at an endpoint; registered as the ``openai-compatible`` engine."""

    name = ENGINE_NAME
    info: ClassVar[AdapterInfo] = AdapterInfo(
        name=ENGINE_NAME,
        distribution=None,
        build_scheme="none",
        sampler_defaults=None,
        backend_defaults=None,
        capabilities=Capabilities(
            tokenize=False,
            detokenize=False,
            token_id_prompts=False,
            top_logprobs=False,
            chat_render=False,
            served=True,
        ),
    )

    def __init__(self, settings: ServedSettings | None = None, *, client: httpx.Client | None = None) -> None:
        self._http = ServedClient.for_adapter(ENGINE_NAME, settings, client)
        self._model: str | None = None

    def model_id(self) -> str:
        """The served model every request names (``engine.model``, else the one the server lists first)."""
        if self._model is None:
            self._model = listed_model(ENGINE_NAME, self._http, self._http.get("/v1/models"))
        return self._model

    def identity(self) -> EngineIdentity:
        self.model_id()
        return _identity()

    def served_model(self) -> ServedModel:
        """The model's id, all such a server tells about it."""
        return ServedModel({"model-id": self.model_id()})

    def chat_template(self) -> str | None:
        return None

    def sampler_defaults(self) -> dict[str, Any]:
        """Unknown: no endpoint reports them (every request sets every value the manifest gives)."""
        return {}

    def capabilities(self) -> Capabilities:
        return self.info.capabilities

    def load(self, model_path: Path | None, backend: BackendSettings) -> OpenAICompatibleModel:  # noqa: ARG002 - the server loaded its model
        return OpenAICompatibleModel(self._http, self.model_id())


def _identity() -> EngineIdentity:
    return EngineIdentity(
        name=ENGINE_NAME,
        version=UNVERIFIED,
        build=None,
        backend=NOT_REPORTED,
        system_info=NOT_REPORTED,
        python=NOT_REPORTED,
        platform=NOT_REPORTED,
        cpu=NOT_REPORTED,
    )


class OpenAICompatibleModel:
    """The model an OpenAI-compatible server serves: text in, text out."""

    def __init__(self, http: ServedClient, model: str) -> None:
        self._http = http
        self._model = model

    def identity(self) -> EngineIdentity:
        return _identity()

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> tuple[int, ...]:  # noqa: ARG002
        raise EngineError(f"{ENGINE_NAME} has no tokenize endpoint")

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:  # noqa: ARG002
        raise EngineError(f"{ENGINE_NAME} has no detokenize endpoint")

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
        raise EngineError(f"{ENGINE_NAME} takes no token-id prompts")

    def generate_from_text(
        self,
        prompt: str,
        *,
        sampler: SamplerSettings,
        max_tokens: int,
        stop: Sequence[str],
        top_k_logprobs: int = 5,  # noqa: ARG002 - no token ids come back to key them by
    ) -> Generation:
        """One ``/v1/completions`` request setting every sampler value it has a field for.

        Stop strings are applied here, not sent: a server's 'stop' cannot tell a stop string from the end of
        generation without token texts, and a greedy run generates the same text up to the stop string either
        way, so the text and the reason are exact (the server's own stop-string handling is not checked)."""
        request = completion_request(ENGINE_NAME, sampler, _SAMPLER_PARAMS, fixed={})
        request.update(model=self._model, prompt=prompt, max_tokens=max_tokens, stream=False)
        answer = self._http.post("/v1/completions", request)
        what = f"{ENGINE_NAME} /v1/completions"
        choice = field(what, answer, "choices", 0)
        text = str(field(what, choice, "text"))
        cut = first_stop(text, stop)
        finish = field(what, choice, "finish_reason")
        reason: StopReason = (
            "stop-string" if cut is not None else "max-tokens" if finish == "length" else "eos"
        )
        return Generation(
            prompt_tokens=(),
            tokens=(),
            pieces=(),
            steps=(),
            text=text if cut is None else cut,
            stop_reason=reason,
        )

    def builtin_chat_render(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str] | None:  # noqa: ARG002
        return None

    def close(self) -> None:
        self._http.close()


def completion_request(
    engine: str, sampler: SamplerSettings, names: Mapping[str, str], *, fixed: Mapping[str, Any]
) -> dict[str, Any]:
    """Every sampler value the server reads, by its request name (seed 0 when none is locked); a locked value
    the server cannot be given, other than the one it applies, is refused rather than silently dropped."""
    for key, applied in fixed.items():
        value = getattr(sampler, key)
        if value is not None and value != applied:
            raise EngineError(
                f"{engine} cannot be given sampler.{key} = {value!r}: its requests have no such field and it "
                f"applies {applied!r}",
                hint=f"set sampler.{key} = {applied!r} in llmstack.toml, or use an engine that takes it",
            )
    request: dict[str, Any] = {
        name: getattr(sampler, key) for key, name in names.items() if getattr(sampler, key) is not None
    }
    request.setdefault("seed", 0)
    return request


def listed_model(engine: str, http: ServedClient, answer: Any) -> str:
    """The model id to ask for: the one ``engine.model`` names, which ``/v1/models`` must list, else the first
    one listed."""
    what = f"{engine} /v1/models"
    listed = [str(field(what, entry, "id")) for entry in field(what, answer, "data")]
    wanted = http.settings.model
    if wanted is None:
        if not listed:
            raise EngineError(
                f"{engine} at {http.endpoint} serves no model", hint="load a model in the server"
            )
        return listed[0]
    if wanted not in listed:
        raise EngineError(
            f"{engine} at {http.endpoint} serves no model named {wanted!r} (it serves: {', '.join(listed) or 'none'})",
            hint="load that model in the server, or set engine.model in llmstack.toml to the id it serves",
        )
    return wanted
