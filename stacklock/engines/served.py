"""What stacklock asks of a served engine (reached over HTTP at an endpoint), and how it finds one."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from stacklock.engines.plugins import adapter_class, adapter_info
from stacklock.errors import EngineError, UsageError
from stacklock.files.digest import sha256_text
from stacklock.model.lock import ServedPin

if TYPE_CHECKING:
    from collections.abc import Sequence

    from stacklock.engines.base import Capabilities, EngineIdentity, Generation, LoadedModel, SamplerSettings
    from stacklock.model.lock import EnginePin

__all__ = [
    "UNOBSERVABLE",
    "UNVERIFIED",
    "ServedEngine",
    "TextPrompts",
    "check_served_version",
    "is_served",
    "open_served",
    "served_engine",
    "served_pin",
]


@runtime_checkable
class ServedEngine(Protocol):
    """What stacklock asks of a served engine beyond the Engine protocol: what it serves, and its defaults."""

    def identity(self) -> EngineIdentity: ...
    def served_model(self) -> dict[str, Any]: ...
    def chat_template(self) -> str | None: ...
    def sampler_defaults(self) -> dict[str, Any]: ...
    def capabilities(self) -> Capabilities: ...
    def load(self, model_path: Any, backend: Any) -> LoadedModel: ...


@runtime_checkable
class TextPrompts(Protocol):
    """A served engine's loaded model that generates from a text prompt only (no token-id prompts): it
    tokenizes the prompt itself, as its clients' requests do."""

    def generate_from_text(
        self,
        prompt: str,
        *,
        sampler: SamplerSettings,
        max_tokens: int,
        stop: Sequence[str],
        top_k_logprobs: int = 5,
    ) -> Generation: ...


#: Backend options a served engine applies but no endpoint reports (llama-server's; an adapter whose server
#: has others declares its own as an ``unobservable`` class attribute).
UNOBSERVABLE = (
    "backend.flash-attention",
    "backend.cache-type-k",
    "backend.cache-type-v",
    "backend.gpu-layers",
    "backend.threads",
    "backend.batch-size",
    "the server's --swa-full",
)


#: The version of a served engine that reports none (an OpenAI-compatible server): the manifest's exact pin
#: stands for it, and no request can confirm it.
UNVERIFIED = "unverified"


def is_served(engine_name: str) -> bool:
    """Whether the engine registered as ``engine_name`` is reached over HTTP (an unregistered one is not)."""
    info = adapter_info(engine_name)
    return info is not None and info.capabilities.served


def open_served(
    engine_name: str, endpoint: str | None, api_key_env: str | None, model: str | None = None
) -> ServedEngine:
    """The served engine's adapter, pointed at its endpoint (``--endpoint`` wins over the manifest's) and, for
    an engine that serves several models, at the one named ``model`` (``engine.model``).

    ``STACKLOCK_TIMEOUT`` sets the seconds one request may take (default 120): never unbounded.
    """
    if not endpoint:
        raise EngineError(
            f"{engine_name} is a served engine and no endpoint is set",
            hint="set engine.endpoint in llmstack.toml or pass --endpoint http://HOST:PORT",
        )
    # httpx is imported only when a served engine is used: `lock --check` and `check` never need it.
    from stacklock.engines.http import DEFAULT_TIMEOUT, ServedSettings  # noqa: PLC0415

    raw = os.environ.get("STACKLOCK_TIMEOUT", "")
    try:
        timeout = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        timeout = -1.0
    if not 0 < timeout < math.inf:
        raise EngineError(
            f"STACKLOCK_TIMEOUT={raw!r} is not a number of seconds", hint="e.g. STACKLOCK_TIMEOUT=300"
        )
    settings = ServedSettings(endpoint=endpoint, api_key_env=api_key_env, timeout=timeout, model=model)
    # A served adapter is constructed with its endpoint settings, which the Engine protocol does not declare.
    cls: Any = adapter_class(engine_name)
    engine = cls(settings)
    if not isinstance(engine, ServedEngine):
        raise EngineError(
            f"engine {engine_name!r} declares itself served but lacks what stacklock asks of a served engine",
            hint="upgrade the package that provides it",
        )
    return engine


def served_engine(
    name: str,
    endpoint: str | None,
    api_key_env: str | None,
    *,
    override: str | None = None,
    model: str | None = None,
) -> ServedEngine | None:
    """The served engine ``name`` at ``override`` (``--endpoint``) or ``endpoint``; None for an engine that
    runs in process (where ``--endpoint`` is a usage error)."""
    if not is_served(name):
        if override is not None:
            raise UsageError(
                f"--endpoint is for served engines; {name} runs in process",
                hint="drop --endpoint, add --engine NAME to run the locked stack on a served engine "
                "(llama-server...), or set engine.name to one",
            )
        return None
    return open_served(name, override or endpoint, api_key_env, model)


def check_served_version(pin: EnginePin, served: ServedEngine) -> None:
    """The served engine must run the locked build or version."""
    version = served.identity().version
    if version not in {pin.version, UNVERIFIED}:
        raise EngineError(
            f"the {pin.name} at the endpoint runs {version}, not the locked {pin.version}",
            hint="point --endpoint at a server of the locked build, or re-lock and re-record against this one",
        )


def served_pin(engine: ServedEngine) -> ServedPin:
    """What the served engine says about itself, for the lock."""
    template = engine.chat_template()
    identity = engine.identity()
    return ServedPin(
        build=identity.build or identity.version,
        # TOML has no null: what the server does not report is left out.
        model={k: v for k, v in engine.served_model().items() if v is not None},
        chat_template_sha256=None if template is None else sha256_text(template),
        sampler_defaults={k: v for k, v in engine.sampler_defaults().items() if v is not None},
        # An adapter may name what its engine hides (vLLM's are not llama.cpp's); llama.cpp's list otherwise.
        unobservable=tuple(getattr(engine, "unobservable", UNOBSERVABLE)),
    )
