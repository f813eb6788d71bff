"""Ollama as a served engine, through its native API (``/api/...``), never its OpenAI-compatible one.

What each endpoint gives stacklock:

- ``/api/version``: the version, pinned exactly; it also decides what this server can show (below).
- ``/api/show`` for the model named by ``engine.model``: its Go ``template`` (pinned by sha256), its
  ``parameters`` (the defaults a request that sets nothing gets: temperature, stop strings, num_ctx...),
  ``model_info`` (the GGUF metadata: architecture, vocabulary, trained context, parameter count) and the
  ``modelfile``, whose ``FROM`` line names the GGUF blob Ollama stores under its sha256. That blob digest is
  the strongest identity a served engine gives: the artifacts stage checks it against the locked file's hash.
  (``/api/tags``'s ``digest`` is the sha256 of Ollama's manifest, not of the GGUF, and changes with every
  template or parameter edit, so it is not used as the model's identity.)
- ``/api/generate`` with ``raw: true``: generation from the locked render as text, bypassing Ollama's template.
  Ollama takes no token ids, so this is the only way to feed it the locked prompt. ``options`` carries every
  sampler value the lock knows, the seed, ``num_predict`` and the stop strings. A value the lock leaves to the
  engine (unknown origin) is not sent: Ollama then applies the model's parameters (pinned under
  ``[engine.served]`` and checked by verify) over its version's built-ins (pinned by the exact version; they
  changed across releases, e.g. repeat_penalty 1.1 to 1.0 in 0.17.5, so no table of them is kept here).
- ``/api/chat`` with ``_debug_render_only`` (since 0.11.5): Ollama's own rendering of a chat with its Go
  template, for the template stage. Older servers ignore the flag and would generate, so it is not sent to them.

What Ollama does not let stacklock observe, declared in :meth:`OllamaEngine.capabilities`: it has no tokenize
endpoint (tokenization: not checked) and its logprobs (since 0.12.11) carry token text without ids, which the
generation stage compares by id (generation: not checked; the output stage still compares the text).

This adapter was built from Ollama's documented API and source and tested against a server replaying responses
of those shapes; it has not been run against a real Ollama.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, ClassVar

from packaging.version import InvalidVersion, Version

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
from stacklock.engines.llama_server import SAMPLER_PARAMS, ServedModel, served_identity
from stacklock.errors import EngineError, NotFoundError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    import httpx

__all__ = ["ENGINE_NAME", "OllamaEngine", "OllamaModel", "parse_parameters"]

ENGINE_NAME = "ollama"
#: The first version whose /api/chat and /api/generate accept ``_debug_render_only`` (ollama/ollama 8de1da4).
DEBUG_RENDER_SINCE = Version("0.11.5")
#: The first version that returns logprobs (ollama/ollama 59241c5).
LOGPROBS_SINCE = Version("0.12.11")
#: Ollama accepts 0 to 20 alternatives per step.
_MAX_TOP_LOGPROBS = 20
# The GGUF blob in the modelfile's FROM line: blobs/sha256-HEX (blobs/sha256:HEX before 0.1.x renamed them).
_BLOB = re.compile(r"^FROM\s+\S*blobs[/\\]sha256[-:]([0-9a-f]{64})\s*$", re.MULTILINE)


class OllamaEngine:
    """An Ollama server at an endpoint, asked about the model ``engine.model`` names; registered as ``ollama``."""

    name = ENGINE_NAME
    info: ClassVar[AdapterInfo] = AdapterInfo(
        name=ENGINE_NAME,
        distribution=None,
        # Ollama vendors llama.cpp; registry/engines/ollama.toml maps its releases to builds.
        build_scheme="vendored",
        # Its defaults are its version's built-ins overlaid by each model's parameters: lock reads /api/show.
        sampler_defaults=None,
        backend_defaults=None,
        capabilities=Capabilities(
            tokenize=False,
            detokenize=False,
            token_id_prompts=False,
            top_logprobs=False,
            chat_render=True,
            served=True,
        ),
    )

    #: What Ollama applies but no endpoint reports: server environment and runner options (pinned in the lock,
    #: named in verify's notes).
    unobservable: ClassVar[tuple[str, ...]] = (
        "OLLAMA_FLASH_ATTENTION",
        "OLLAMA_KV_CACHE_TYPE",
        "OLLAMA_CONTEXT_LENGTH (num_ctx where the model sets none)",
        "OLLAMA_NEW_ENGINE (versions that have it)",
        "num_gpu",
        "num_thread",
        "num_batch",
    )

    def __init__(self, settings: ServedSettings | None = None, *, client: httpx.Client | None = None) -> None:
        if settings is None:
            raise EngineError(
                f"{ENGINE_NAME} is a served engine and needs an endpoint",
                hint="set engine.endpoint in llmstack.toml or pass --endpoint http://HOST:11434",
            )
        if not settings.model:
            raise EngineError(
                f"{ENGINE_NAME} serves many models and engine.model does not name one",
                hint="set engine.model in llmstack.toml to the name `ollama list` shows, e.g. 'gemma3:270m'",
            )
        self.model = settings.model
        self._http = ServedClient(ENGINE_NAME, settings, client)
        self._version: str | None = None
        self._show: dict[str, Any] | None = None
        self._vocab: list[Any] | None = None

    @property
    def http(self) -> ServedClient:
        return self._http

    def version(self) -> str:
        """``/api/version``, asked once."""
        if self._version is None:
            answer = self._http.get("/api/version")
            self._version = str(field(f"{ENGINE_NAME} /api/version", answer, "version"))
        return self._version

    def show(self) -> dict[str, Any]:
        """``/api/show`` for the model, asked once; a model the server has not pulled is one line."""
        if self._show is None:
            answer = self._ask_show(verbose=False)
            for key in ("template", "model_info"):
                field(f"{ENGINE_NAME} /api/show", answer, key)
            self._show = answer
        return self._show

    def _ask_show(self, *, verbose: bool) -> dict[str, Any]:
        try:
            answer = self._http.post("/api/show", {"model": self.model, "verbose": verbose})
        except NotFoundError:
            raise EngineError(
                f"{ENGINE_NAME} at {self._http.endpoint} has no model '{self.model}' (engine.model)",
                hint=f"pull it there: ollama pull {self.model}",
            ) from None
        if not isinstance(answer, dict):
            raise EngineError(f"{ENGINE_NAME} at {self._http.endpoint}: /api/show is not a JSON object")
        return answer

    def vocabulary(self) -> list[Any]:
        """The model's token texts: only a verbose /api/show lists them (it can be megabytes), asked once."""
        if self._vocab is None:
            tokens = self._ask_show(verbose=True).get("model_info", {}).get("tokenizer.ggml.tokens")
            self._vocab = tokens if isinstance(tokens, list) else []
        return self._vocab

    def identity(self) -> EngineIdentity:
        return served_identity(ENGINE_NAME, self.version(), None)

    def served_model(self) -> ServedModel:
        """The model as /api/show describes it: its GGUF blob's sha256 and its GGUF metadata."""
        show = self.show()
        info: dict[str, Any] = show["model_info"]
        arch = info.get("general.architecture")
        vocab = info.get(f"{arch}.vocab_size") or len(self.vocabulary()) or None
        blob = _BLOB.search(str(show.get("modelfile", "")))
        return ServedModel(
            {
                "path": self.model,
                "sha256": blob.group(1) if blob else None,
                "architecture": arch,
                "vocab-size": vocab,
                "parameter-count": info.get("general.parameter_count"),
                "context-length": info.get(f"{arch}.context_length"),
            }
        )

    def chat_template(self) -> str | None:
        """Ollama's Go template for the model (not Jinja: Ollama renders chats with it)."""
        template = self.show().get("template")
        return template if isinstance(template, str) else None

    def sampler_defaults(self) -> dict[str, Any]:
        """The model's parameters: what a request that sets nothing gets on top of Ollama's built-ins."""
        parameters = parse_parameters(str(self.show().get("parameters") or ""))
        names = {name: key for key, name in SAMPLER_PARAMS.items()}
        return {names.get(name, name): value for name, value in parameters.items()}

    def capabilities(self) -> Capabilities:
        """Ollama's own chat rendering is observable from 0.11.5 on; token ids never are."""
        return self.info.capabilities.model_copy(update={"chat_render": self.at_least(DEBUG_RENDER_SINCE)})

    def at_least(self, since: Version) -> bool:
        """Whether the server runs ``since`` or later (a version that does not parse: assume not)."""
        try:
            return Version(self.version()) >= since
        except InvalidVersion:
            return False

    def load(self, model_path: Path | None, backend: BackendSettings) -> OllamaModel:  # noqa: ARG002 - Ollama reads its own blob
        """The model the server holds (pulled, not necessarily in memory: the first request loads it)."""
        self.show()
        return OllamaModel(self, context_size=backend.context_size)

    def leading_bos(self) -> str | None:
        """The BOS text Ollama's tokenizer puts before every prompt itself, when it does."""
        info = self.show()["model_info"]
        # Ollama adds BOS unless the GGUF says not to (its tokenizer's default is true).
        if info.get("tokenizer.ggml.add_bos_token") is False:
            return None
        bos = info.get("tokenizer.ggml.bos_token_id")
        tokens = self.vocabulary()
        if not isinstance(bos, int) or not 0 <= bos < len(tokens):
            return None
        text = tokens[bos]
        return text if isinstance(text, str) and text else None


def parse_parameters(text: str) -> dict[str, Any]:
    """/api/show's ``parameters``: one ``name value`` a line, values in Go syntax; repeated names (stop)
    collect into a tuple."""
    found: dict[str, Any] = {}
    for line in text.splitlines():
        name, _, raw = line.strip().partition(" ")
        if not name:
            continue
        value = _parameter_value(raw.strip())
        if name == "stop":
            found[name] = (*found.get(name, ()), value)
        else:
            found[name] = value
    return found


def _parameter_value(raw: str) -> Any:
    if raw in {"true", "false"}:
        return raw == "true"
    try:
        # Go's %#v writes numbers as JSON does and quotes strings as JSON does for the printable ones.
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw.strip('"')
    return value if isinstance(value, str | int | float) else raw


class OllamaModel:
    """The model an Ollama server holds; it generates from text only (``TextPrompts``)."""

    def __init__(self, engine: OllamaEngine, *, context_size: int | None) -> None:
        self._engine = engine
        self._http = engine.http
        self._context_size = context_size

    def identity(self) -> EngineIdentity:
        return self._engine.identity()

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> tuple[int, ...]:  # noqa: ARG002 - declared unobservable
        raise EngineError(
            f"{ENGINE_NAME} has no tokenize endpoint", hint="tokenization is reported not checked"
        )

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:  # noqa: ARG002 - declared unobservable
        raise EngineError(f"{ENGINE_NAME} has no detokenize endpoint", hint="decoding is left to the lock")

    def bos_id(self) -> int | None:
        return None

    def generate(
        self,
        prompt_tokens: Sequence[int],  # noqa: ARG002 - declared unobservable
        *,
        sampler: SamplerSettings,  # noqa: ARG002
        max_tokens: int,  # noqa: ARG002
        stop: Sequence[str],  # noqa: ARG002
        top_k_logprobs: int = 5,  # noqa: ARG002
    ) -> Generation:
        raise EngineError(
            f"{ENGINE_NAME} takes no token-id prompts", hint="it is given the locked render as text (raw)"
        )

    def generate_from_text(
        self,
        prompt: str,
        *,
        sampler: SamplerSettings,
        max_tokens: int,
        stop: Sequence[str],
        top_k_logprobs: int = 5,
    ) -> Generation:
        """``/api/generate`` with ``raw: true`` from the locked render, every option set explicitly."""
        options: dict[str, Any] = {
            name: getattr(sampler, key)
            for key, name in SAMPLER_PARAMS.items()
            if getattr(sampler, key) is not None
        }
        options.setdefault("seed", 0)
        options.update(num_predict=max_tokens, stop=list(stop))
        if self._context_size is not None:
            options["num_ctx"] = self._context_size
        # Ollama's tokenizer adds BOS itself: a render that starts with it would be fed two.
        bos = self._engine.leading_bos()
        text = prompt.removeprefix(bos) if bos else prompt
        request: dict[str, Any] = {
            "model": self._engine.model,
            "prompt": text,
            "raw": True,
            "stream": False,
            "options": options,
        }
        logprobs = self._engine.at_least(LOGPROBS_SINCE)
        if logprobs:
            request.update(logprobs=True, top_logprobs=min(top_k_logprobs, _MAX_TOP_LOGPROBS))
        answer = self._http.post("/api/generate", request)
        what = f"{ENGINE_NAME} /api/generate"
        output = str(field(what, answer, "response"))
        pieces = (
            tuple(str(field(what, step, "token")) for step in field(what, answer, "logprobs"))
            if logprobs
            else ()
        )
        return Generation(
            prompt_tokens=(),
            tokens=(),
            pieces=pieces,
            steps=(),
            text=output,
            stop_reason=_stop_reason(str(answer.get("done_reason", "")), output, pieces, stop),
        )

    def builtin_chat_render(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str] | None:
        """Ollama's own rendering of a chat with its Go template (``_debug_render_only``, since 0.11.5)."""
        if not self._engine.capabilities().chat_render:
            return None
        answer = self._http.post(
            "/api/chat",
            {
                "model": self._engine.model,
                "messages": [dict(m) for m in messages],
                "stream": False,
                "_debug_render_only": True,
            },
        )
        return ("ollama", str(field(f"{ENGINE_NAME} /api/chat", answer, "_debug_info", "rendered_template")))

    def close(self) -> None:
        self._http.close()


def _stop_reason(done: str, text: str, pieces: Sequence[str], stop: Sequence[str]) -> StopReason:
    """Ollama says "length" or "stop"; a stop string it cut off shows in the token pieces past the text."""
    if done == "length":
        return "max-tokens"
    joined = "".join(pieces)
    cut = joined[len(text) :] if joined.startswith(text) else ""
    return "stop-string" if any(s and s in cut for s in stop) else "eos"
