"""The engine adapter seam: what stacklock asks of an inference engine, and the data an adapter returns.

An adapter observes and translates; it never decides pass or fail (:mod:`stacklock.verify.compare` does).
The two settings objects an adapter reads, the sampler and the backend of the lock, are described here as
read-only protocols (:class:`SamplerSettings`, :class:`BackendSettings`), so that the frozen models of
:mod:`stacklock.model` satisfy them structurally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import Field

from stacklock.files.digest import sha256_text
from stacklock.model.base import Model

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

StopReason = Literal["eos", "stop-string", "max-tokens"]


class EngineIdentity(Model):
    """Exactly which engine produced an observation, and on what."""

    name: str = Field(description="The adapter's engine name, as registered (e.g. llama-cpp-python).")
    version: str = Field(description="The installed engine package version (e.g. 0.3.36).")
    build: str | None = Field(
        description="The llama.cpp build or commit compiled into the engine, when the engine exposes it."
    )
    ggml_version: str | None = Field(default=None, description="The ggml library version, when exposed.")
    backend: str = Field(
        description="The backend actually used for the model's layers: cpu, cuda, metal, ..."
    )
    devices: tuple[str, ...] = Field(
        default=(), description="The devices the engine reports, as 'name: description'."
    )
    gpu_offload: bool = Field(
        default=False, description="Whether this engine build can offload layers to a GPU."
    )
    system_info: str = Field(
        description="The engine's own system report (llama_print_system_info: CPU features)."
    )
    python: str = Field(description="The Python implementation and version running the engine.")
    platform: str = Field(description="The operating system and machine (platform.platform()).")
    cpu: str = Field(description="The CPU model name, or the machine architecture when it cannot be read.")


class Environment(Model):
    """The machine a recording was made on."""

    os: str = Field(description="Operating system and release, e.g. 'Linux 6.8.0'.")
    machine: str = Field(description="Machine architecture, e.g. x86_64 or arm64.")
    python: str = Field(description="Python version, e.g. 3.11.9.")


class StepLogprobs(Model):
    """One generation step: the chosen token and the top-k alternatives of the model's distribution."""

    token: int = Field(description="The token chosen at this step.")
    logprob: float = Field(description="The natural-log probability of the chosen token (raw model logits).")
    top: tuple[tuple[int, float], ...] = Field(
        description="The k most likely (token id, logprob) pairs, most likely first."
    )


class Generation(Model):
    """What the engine generated for one prompt."""

    prompt_tokens: tuple[int, ...] = Field(description="The token ids fed to the engine.")
    tokens: tuple[int, ...] = Field(
        description="The generated token ids, an end-of-generation token included."
    )
    pieces: tuple[str, ...] = Field(description="Each generated token as text, special tokens shown.")
    steps: tuple[StepLogprobs, ...] = Field(description="Top-k logprobs per generated token.")
    text: str = Field(description="The output after post-processing: cut at the first stop string.")
    stop_reason: StopReason = Field(description="Why generation stopped.")


class Observation(Model):
    """Everything verify compares for one smoke prompt, observed on a running engine."""

    rendered: str = Field(description="The rendered prompt text that was tokenized.")
    rendered_sha256: str = Field(description="sha256 of the rendered prompt, UTF-8.")
    generation: Generation = Field(description="The tokenization and generation.")
    top_k: int = Field(description="How many alternatives were recorded per step.")


class SamplerSettings(Protocol):
    """The sampler settings an adapter reads (the lock's ``EffectiveSampler`` satisfies this).

    None is a value whose origin the lock gives as unknown (an engine whose defaults stacklock does not know):
    an adapter leaves it to the engine when it can say so, or refuses to run with an :class:`EngineError`.
    """

    @property
    def temperature(self) -> float | None: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def min_p(self) -> float | None: ...
    @property
    def typical_p(self) -> float | None: ...
    @property
    def repeat_penalty(self) -> float | None: ...
    @property
    def repeat_last_n(self) -> int | None: ...
    @property
    def frequency_penalty(self) -> float | None: ...
    @property
    def presence_penalty(self) -> float | None: ...
    @property
    def mirostat(self) -> int | None: ...
    @property
    def mirostat_tau(self) -> float | None: ...
    @property
    def mirostat_eta(self) -> float | None: ...
    @property
    def seed(self) -> int | None: ...


class BackendSettings(Protocol):
    """The backend settings an adapter reads (``stacklock.manifest.Backend`` satisfies this)."""

    @property
    def kind(self) -> str: ...
    @property
    def gpu_layers(self) -> int | None: ...
    @property
    def flash_attention(self) -> bool | str | None: ...
    @property
    def cache_type_k(self) -> str | None: ...
    @property
    def cache_type_v(self) -> str | None: ...
    @property
    def threads(self) -> int | str | None: ...
    @property
    def batch_size(self) -> int | None: ...
    @property
    def context_size(self) -> int | None: ...


@runtime_checkable
class LoadedModel(Protocol):
    """A model loaded once in an engine, used for many prompts; ``close`` releases it."""

    def identity(self) -> EngineIdentity:
        """The engine's identity with the backend and devices this model actually runs on."""
        ...

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> tuple[int, ...]: ...

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str: ...

    def bos_id(self) -> int | None: ...

    def generate(
        self,
        prompt_tokens: Sequence[int],
        *,
        sampler: SamplerSettings,
        max_tokens: int,
        stop: Sequence[str],
        top_k_logprobs: int = 5,
    ) -> Generation: ...

    def builtin_chat_render(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str] | None:
        """What the engine would render on its own: (chat format name, text), or None without an opinion."""
        ...

    def close(self) -> None: ...


BuildScheme = Literal["build-number", "vendored", "none"]


class Capabilities(Model):
    """What an engine lets stacklock observe; a stage it cannot observe is reported as not checked, never ok."""

    tokenize: bool = Field(description="The engine tokenizes text and reports the token ids.")
    detokenize: bool = Field(description="The engine turns token ids back into text.")
    token_id_prompts: bool = Field(description="Generation can start from token ids rather than text.")
    top_logprobs: bool = Field(
        description="Each generated token comes with the top-k alternatives and their ids."
    )
    chat_render: bool = Field(description="The engine's own rendering of chat messages can be observed.")
    served: bool = Field(description="The engine is reached over HTTP at an endpoint, not loaded in process.")


class AdapterInfo(Model):
    """What stacklock knows about one engine, declared by its adapter class (a third-party adapter supplies all of it).

    Read from the adapter class without instantiating it, so ``lock`` and ``check`` never import the engine.
    """

    name: str = Field(description="The engine name in llmstack.toml's [engine] name.")
    distribution: str | None = Field(
        description="The Python distribution whose installed version is the engine version; None when the "
        "engine is not a Python package (a server binary, a remote endpoint)."
    )
    build_scheme: BuildScheme = Field(
        description="How a version maps to a llama.cpp build: 'build-number' (the version is the build, "
        "llama.cpp's bNNNN), 'vendored' (a wrapper release vendors one build, looked up in the registry's "
        "engine tables), 'none' (not llama.cpp-based)."
    )
    sampler_defaults: dict[str, Any] | None = Field(
        description="The value the engine uses for each sampler setting a request leaves out; None when "
        "stacklock does not know them (the lock then says 'unknown' instead of inventing values)."
    )
    backend_defaults: dict[str, Any] | None = Field(
        description="The engine's load options when the manifest sets none; None when unknown."
    )
    capabilities: Capabilities = Field(description="What the engine lets stacklock observe.")
    builds_of: str | None = Field(
        default=None,
        description="The engine whose registry table maps this engine's versions to llama.cpp builds, when it "
        "is not the engine itself (llama-cpp-python's server runs the builds llama-cpp-python vendors).",
    )
    tested_version: str | None = Field(
        default=None,
        description="The engine version stacklock's own tests run (what `init` asks for when none is installed).",
    )


@runtime_checkable
class Engine(Protocol):
    """An inference engine: who it is, and how to load a model in it.

    The class carries the engine's knowledge (:attr:`info`); instances talk to the engine.
    """

    name: str
    info: ClassVar[AdapterInfo]

    def identity(self) -> EngineIdentity: ...

    def load(self, model_path: Path, backend: BackendSettings) -> LoadedModel: ...


def sha256_tokens(tokens: Sequence[int]) -> str:
    """The digest of a token sequence: sha256 of the ids written in decimal, joined by commas."""
    return sha256_text(",".join(str(t) for t in tokens))


def observe(
    loaded: LoadedModel,
    rendered_prompt: str,
    *,
    add_bos: bool,
    parse_special: bool = True,
    sampler: SamplerSettings,
    max_tokens: int,
    stop: Sequence[str],
    top_k: int = 5,
) -> Observation:
    """Tokenize a rendered prompt and generate from it: the one engine call that record and verify make."""
    prompt_tokens = loaded.tokenize(rendered_prompt, add_bos=add_bos, parse_special=parse_special)
    generation = loaded.generate(
        prompt_tokens, sampler=sampler, max_tokens=max_tokens, stop=stop, top_k_logprobs=top_k
    )
    return Observation(
        rendered=rendered_prompt,
        rendered_sha256=sha256_text(rendered_prompt),
        generation=generation,
        top_k=top_k,
    )


def first_stop(text: str, stop: Sequence[str]) -> str | None:
    """The text cut before the earliest stop string it contains, or None when it contains none."""
    positions = [index for index in (text.find(s) for s in stop if s) if index >= 0]
    return text[: min(positions)] if positions else None
