"""Effective settings: every sampler and backend value written out, so that no default stays implicit.

Sampler values merge in this order, later wins: the engine's defaults < the GGUF's ``general.sampling.*``
recommendations < a Hub ``generation_config.json`` (``[sampler] defaults``) < the manifest. stacklock passes every effective value to the engine explicitly, so an engine
upgrade that changes a default cannot change a locked stack's behaviour.

The engine's defaults are what its adapter declares (:class:`stacklock.engines.base.AdapterInfo`), passed in by
the caller. An engine whose defaults stacklock does not know gets none invented: every value that neither the
manifest nor the GGUF gives is None, with origin ``unknown``, and the lock says which (a finding of
:mod:`stacklock.rules.policy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field

from stacklock.model.base import Model, kebab
from stacklock.model.manifest import (
    MAX_CONTEXT_SIZE,
    BackendKind,
    BackendSpec,
    SamplerSpec,
    SamplerValues,
)

#: Where an effective value came from; "unknown": nobody said, and stacklock does not know the engine's default
#: (the value is absent from the lock, and the engine is left to its own default or refuses to run).
Origin = Literal["manifest", "gguf", "generation-config", "engine-default", "unknown"]

#: GGUF ``general.sampling.*`` keys (llama.cpp b7151+) and the sampler field each one recommends.
GGUF_SAMPLING_KEYS: Mapping[str, str] = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_last_n": "repeat_last_n",
    "general.sampling.penalty_repeat": "repeat_penalty",
    "general.sampling.mirostat": "mirostat",
    "general.sampling.mirostat_tau": "mirostat_tau",
    "general.sampling.mirostat_eta": "mirostat_eta",
}


#: ``generation_config.json`` keys (transformers) and the sampler fields they set; vLLM applies them by default.
GENERATION_CONFIG_KEYS: Mapping[str, str] = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repetition_penalty": "repeat_penalty",
    "max_new_tokens": "max_tokens",
}


class EffectiveSampler(SamplerValues):
    """Every sampler value the engine will be given, and where each one came from; None: unknown."""

    origin: dict[str, Origin] = Field(
        description="Where each value came from: manifest, gguf, generation-config, engine-default or unknown (absent above)."
    )


class EffectiveBackend(Model):
    """Every load option the engine will be given, and where each one came from; None: unknown."""

    kind: BackendKind = Field(description="Where the model runs.")
    gpu_layers: int | None = Field(default=None, ge=-1, description="Layers offloaded to the GPU (-1: all).")
    flash_attention: Literal["on", "off", "auto"] | None = Field(default=None, description="Flash attention.")
    cache_type_k: str | None = Field(default=None, description="KV-cache type for K.")
    cache_type_v: str | None = Field(default=None, description="KV-cache type for V.")
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default=None, description="CPU threads ('auto': the engine picks per machine)."
    )
    batch_size: int | None = Field(default=None, ge=1, description="Prompt-processing batch size.")
    context_size: int | None = Field(
        default=None, ge=1, le=MAX_CONTEXT_SIZE, description="Context window in tokens."
    )
    origin: dict[str, Origin] = Field(
        default_factory=dict,
        description="Where each load option came from: manifest, engine-default or unknown (absent above). "
        "Locks written before this key have none.",
    )


def effective_sampler(
    defaults: Mapping[str, Any] | None,
    gguf_metadata: Mapping[str, Any],
    spec: SamplerSpec,
    generation_config: Mapping[str, Any] | None = None,
) -> EffectiveSampler:
    """Merge engine defaults < GGUF recommendations < generation_config.json < manifest, with each value's origin.

    ``defaults`` are the engine adapter's; None when stacklock does not know them.
    """
    # ``defaults`` names where defaults come from (a generation_config.json), not a sampler value.
    values: dict[str, Any] = dict.fromkeys(f for f in SamplerSpec.model_fields if f != "defaults")
    origin: dict[str, Origin] = dict.fromkeys(values, "unknown")
    for field, value in (defaults or {}).items():
        values[field] = value
        origin[field] = "engine-default"
    for key, field in GGUF_SAMPLING_KEYS.items():
        if key in gguf_metadata and isinstance(gguf_metadata[key], int | float):
            values[field] = gguf_metadata[key]
            origin[field] = "gguf"
    for key, field in GENERATION_CONFIG_KEYS.items():
        value = (generation_config or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            values[field] = value
            origin[field] = "generation-config"
    for field, value in spec.model_dump(exclude_none=True, exclude={"defaults"}).items():
        values[field] = value
        origin[field] = "manifest"
    if values["stop"] is not None:
        values["stop"] = tuple(values["stop"])
    origins = {kebab(field): where for field, where in sorted(origin.items())}
    return EffectiveSampler.model_validate({**values, "origin": origins})


def effective_backend(defaults: Mapping[str, Any] | None, spec: BackendSpec) -> EffectiveBackend:
    """The manifest's load options over the engine adapter's defaults (None: unknown), with their origins."""
    values: dict[str, Any] = dict.fromkeys(BackendSpec.model_fields)
    origin: dict[str, Origin] = dict.fromkeys(values, "unknown")
    for field, value in (defaults or {}).items():
        values[field] = value
        origin[field] = "engine-default"
    for field, value in spec.model_dump(exclude_none=True).items():
        values[field] = value
        origin[field] = "manifest"
    # The kind always comes from the manifest (it has a default there); only the load options have origins.
    origin.pop("kind")
    origins = {kebab(field): where for field, where in sorted(origin.items())}
    return EffectiveBackend.model_validate({**values, "origin": origins})
