"""Effective settings: every sampler and backend value written out, so that no default stays implicit.

Sampler values merge in this order, later wins: the engine's defaults < the GGUF's ``general.sampling.*``
recommendations < the manifest. stacklock passes every effective value to the engine explicitly, so an engine
upgrade that changes a default cannot change a locked stack's behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field

from stacklock.model.base import Model, kebab
from stacklock.model.manifest import (
    MAX_CONTEXT_SIZE,
    MAX_NEW_TOKENS,
    MAX_STOP_STRINGS,
    BackendKind,
    BackendSpec,
    SamplerSpec,
)

Origin = Literal["manifest", "gguf", "engine-default"]

#: Defaults of the engines stacklock knows, read from their sources:
#: llama-cpp-python 0.3.x ``Llama.__init__`` and ``Llama.create_completion`` keyword defaults.
ENGINE_SAMPLER_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "llama-cpp-python": {
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
        "min_p": 0.05,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
        "repeat_last_n": 64,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "mirostat": 0,
        "mirostat_tau": 5.0,
        "mirostat_eta": 0.1,
        "seed": 0xFFFFFFFF,
        "max_tokens": 16,
        "stop": (),
    },
}
ENGINE_BACKEND_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "llama-cpp-python": {
        "gpu_layers": 0,
        "flash_attention": "off",
        "cache_type_k": "f16",
        "cache_type_v": "f16",
        "threads": "auto",
        "batch_size": 512,
        "context_size": 512,
    },
}
#: Engines whose defaults stacklock has not tabulated yet get llama.cpp's common defaults.
FALLBACK_ENGINE = "llama-cpp-python"

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


class EffectiveSampler(Model):
    """Every sampler value the engine will be given, and where each one came from."""

    temperature: float = Field(ge=0, description="0 is greedy.")
    top_k: int = Field(ge=0, description="Top-k cut-off (0: off).")
    top_p: float = Field(ge=0, le=1, description="Nucleus cut-off (1: off).")
    min_p: float = Field(ge=0, le=1, description="Min-p cut-off (0: off).")
    typical_p: float = Field(ge=0, le=1, description="Locally typical sampling (1: off).")
    repeat_penalty: float = Field(ge=0, description="Repetition penalty (1: off).")
    repeat_last_n: int = Field(ge=-1, description="Tokens the penalty looks back over.")
    frequency_penalty: float = Field(description="Frequency penalty (0: off).")
    presence_penalty: float = Field(description="Presence penalty (0: off).")
    mirostat: Literal[0, 1, 2] = Field(description="Mirostat mode (0: off).")
    mirostat_tau: float = Field(ge=0, description="Mirostat target entropy.")
    mirostat_eta: float = Field(ge=0, description="Mirostat learning rate.")
    seed: int = Field(ge=0, le=2**32 - 1, description="Sampling seed (4294967295 is llama.cpp's 'random').")
    max_tokens: int = Field(
        ge=1, le=MAX_NEW_TOKENS, description="Default maximum new tokens per smoke prompt."
    )
    stop: tuple[str, ...] = Field(
        max_length=MAX_STOP_STRINGS, description="Stop strings; the output is cut before them."
    )
    origin: dict[str, Origin] = Field(
        description="Where each value came from: manifest, gguf or engine-default."
    )


class EffectiveBackend(Model):
    """Every load option the engine will be given."""

    kind: BackendKind = Field(description="Where the model runs.")
    gpu_layers: int = Field(ge=-1, description="Layers offloaded to the GPU (-1: all).")
    flash_attention: Literal["on", "off", "auto"] = Field(description="Flash attention.")
    cache_type_k: str = Field(description="KV-cache type for K.")
    cache_type_v: str = Field(description="KV-cache type for V.")
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        description="CPU threads ('auto': the engine picks per machine)."
    )
    batch_size: int = Field(ge=1, description="Prompt-processing batch size.")
    context_size: int = Field(ge=1, le=MAX_CONTEXT_SIZE, description="Context window in tokens.")


def effective_sampler(engine: str, gguf_metadata: Mapping[str, Any], spec: SamplerSpec) -> EffectiveSampler:
    """Merge engine defaults < GGUF recommendations < manifest, recording each value's origin."""
    values: dict[str, Any] = dict(
        ENGINE_SAMPLER_DEFAULTS.get(engine, ENGINE_SAMPLER_DEFAULTS[FALLBACK_ENGINE])
    )
    origin: dict[str, Origin] = dict.fromkeys(values, "engine-default")
    for key, field in GGUF_SAMPLING_KEYS.items():
        if key in gguf_metadata and isinstance(gguf_metadata[key], int | float):
            values[field] = gguf_metadata[key]
            origin[field] = "gguf"
    for field, value in spec.model_dump(exclude_none=True).items():
        values[field] = value
        origin[field] = "manifest"
    values["stop"] = tuple(values["stop"])
    origins = {kebab(field): where for field, where in sorted(origin.items())}
    return EffectiveSampler.model_validate({**values, "origin": origins})


def effective_backend(engine: str, spec: BackendSpec) -> EffectiveBackend:
    values: dict[str, Any] = dict(
        ENGINE_BACKEND_DEFAULTS.get(engine, ENGINE_BACKEND_DEFAULTS[FALLBACK_ENGINE])
    )
    values.update(spec.model_dump(exclude_none=True))
    return EffectiveBackend.model_validate(values)
