"""The manifest, ``llmstack.toml``: what the user asks for, one table per link of the stack.

The manifest holds intent (sources, requirements, settings the user cares about); the lock holds what was
chosen (exact pins, digests, every effective default). This module never touches the file system.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from typing import Annotated, Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import AfterValidator, Field, field_validator, model_validator

from stacklock.errors import ManifestError
from stacklock.model.base import Model
from stacklock.model.findings import RegistrySource
from stacklock.model.pattern import compile_pattern
from stacklock.model.toml import parse_toml, validate

MANIFEST_NAME = "llmstack.toml"

_BUILD_CLAUSE = re.compile(r"^\s*(==|!=|<=|>=|<|>)\s*b(\d+)\s*$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            "must be lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


#: A name users type and directories carry: stacks, smoke prompts, registry stack entries.
Name = Annotated[str, AfterValidator(_check_name)]


class Stack(Model):
    name: Name = Field(description="A short name for the stack: lowercase letters, digits, '.', '_' and '-'.")
    description: str = Field(default="", description="What the stack is for.")


class ModelSpec(Model):
    source: str = Field(
        description=(
            "Where the model file comes from: a local path (relative to the manifest), "
            "'hf://owner/repo@revision/path.gguf' or 'registry://name'. For split files, the first part."
        )
    )
    sha256: str | None = Field(
        default=None, description="The expected sha256 of the file; the lock fails if the file differs."
    )

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hexadecimal characters")
        return value


class TemplateSpec(Model):
    source: str = Field(
        default="gguf",
        description=(
            "The chat template: 'gguf' (the one embedded in the model file), 'gguf:NAME' (a named embedded "
            "template), 'file:PATH' (a Jinja file relative to the manifest), 'registry:ID' (a known-good "
            "template from the registry), 'hf://OWNER/REPO@REV[/FILE][#NAME]' (the upstream template of a hub "
            "repository: chat_template.jinja, chat_template.json or tokenizer_config.json; #NAME picks a named "
            "one) or 'none' (raw prompts only)."
        ),
    )
    now: dt.datetime = Field(
        default=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        description="The pinned clock for templates that call strftime_now, so that renders reproduce.",
    )
    variables: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Extra template variables, as transformers passes template kwargs (enable_thinking...).",
    )

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value in ("gguf", "none") or re.match(r"^(gguf|file|registry):.+|^hf://[^/]+/[^/@#]+", value):
            return value
        raise ValueError(
            "must be 'gguf', 'gguf:NAME', 'file:PATH', 'registry:ID', 'hf://OWNER/REPO@REV' or 'none'"
        )


class TokenizerSpec(Model):
    source: str = Field(
        default="gguf",
        description=(
            "The tokenizer: 'gguf' (the vocabulary embedded in the model file), or 'hf://OWNER/REPO@REV' to "
            "compare it with the upstream tokenizer.json (and tokenizer_config.json's special tokens)."
        ),
    )

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value == "gguf" or re.match(r"^hf://[^/]+/[^/@#]+", value):
            return value
        raise ValueError("must be 'gguf' or 'hf://OWNER/REPO@REV'")


class EngineSpec(Model):
    name: str = Field(
        default="llama-cpp-python",
        description="The inference engine: llama-cpp-python (embedded), llama.cpp, ollama, vllm...",
    )
    version: str = Field(
        default="",
        description=(
            "A version requirement: PEP 440 specifiers for Python packages ('==0.3.36', '>=0.3.24'), "
            "llama.cpp build numbers for llama.cpp ('>=b4628,<b7756'). Empty: any."
        ),
    )
    endpoint: str | None = Field(
        default=None,
        description="A served engine's URL (llama-server, ollama, vllm...), e.g. http://127.0.0.1:8080; "
        "--endpoint overrides it.",
    )
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The NAME of the environment variable holding a served engine's API key (never the key).",
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        description="The name a served engine knows the model by, for engines that serve several: the Ollama "
        "model name ('gemma3:270m'), vLLM's served-model-name, an OpenAI-compatible model id.",
    )

    @model_validator(mode="after")
    def _version(self) -> EngineSpec:
        check_requirement(self.version)
        return self


MAX_NEW_TOKENS = 4096
"""Smoke prompts are short checks; a bound keeps a golden (and the lock that holds it) small to write and read."""
MAX_STOP_STRINGS = 1000
MAX_CONTEXT_SIZE = 1 << 24
"""16M tokens: above any model's trained context; a larger window would only allocate a runaway KV cache."""


class BackendKind(enum.StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    METAL = "metal"
    VULKAN = "vulkan"
    ROCM = "rocm"
    SYCL = "sycl"


class BackendSpec(Model):
    kind: BackendKind = Field(default=BackendKind.CPU, description="Where the model runs.")
    gpu_layers: int | None = Field(default=None, ge=-1, description="Layers offloaded to the GPU (-1: all).")
    flash_attention: Literal["on", "off", "auto"] | None = Field(default=None, description="Flash attention.")
    cache_type_k: str | None = Field(default=None, description="KV-cache type for K (f16, q8_0, q4_0...).")
    cache_type_v: str | None = Field(
        default=None, description="KV-cache type for V; quantized needs flash attention."
    )
    threads: int | None = Field(default=None, ge=1, description="CPU threads for generation.")
    batch_size: int | None = Field(default=None, ge=1, description="Prompt-processing batch size.")
    context_size: int | None = Field(
        default=None, ge=1, le=MAX_CONTEXT_SIZE, description="Context window in tokens."
    )


class SamplerValues(Model):
    """The sampler values, each optional: what a manifest sets, and what a lock knows (None: unknown)."""

    temperature: float | None = Field(default=None, ge=0, description="0 is greedy.")
    top_k: int | None = Field(default=None, ge=0, description="Top-k cut-off (0: off).")
    top_p: float | None = Field(default=None, ge=0, le=1, description="Nucleus cut-off (1: off).")
    min_p: float | None = Field(default=None, ge=0, le=1, description="Min-p cut-off (0: off).")
    typical_p: float | None = Field(
        default=None, ge=0, le=1, description="Locally typical sampling (1: off)."
    )
    repeat_penalty: float | None = Field(default=None, ge=0, description="Repetition penalty (1: off).")
    repeat_last_n: int | None = Field(default=None, ge=-1, description="Tokens the penalty looks back over.")
    frequency_penalty: float | None = Field(default=None, description="Frequency penalty (0: off).")
    presence_penalty: float | None = Field(default=None, description="Presence penalty (0: off).")
    mirostat: Literal[0, 1, 2] | None = Field(default=None, description="Mirostat mode (0: off).")
    mirostat_tau: float | None = Field(default=None, ge=0, description="Mirostat target entropy.")
    mirostat_eta: float | None = Field(default=None, ge=0, description="Mirostat learning rate.")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="Sampling seed.")
    max_tokens: int | None = Field(
        default=None, ge=1, le=MAX_NEW_TOKENS, description="Default maximum new tokens per smoke prompt."
    )
    stop: tuple[str, ...] | None = Field(
        max_length=MAX_STOP_STRINGS, default=None, description="Stop strings; the output is cut before them."
    )


class SamplerSpec(SamplerValues):
    """Sampler settings. Anything left out takes the GGUF's general.sampling.* value, then the engine default."""

    defaults: str | None = Field(
        default=None,
        description=(
            "'hf://OWNER/REPO@REV': take sampler defaults from the repository's generation_config.json "
            "(as vLLM does), above the GGUF's and below the values set here."
        ),
        pattern=r"^hf://[^/]+/[^/@#]+",
    )


class Message(Model):
    role: Literal["system", "user", "assistant", "tool"] = Field(description="Who speaks.")
    content: str = Field(description="What is said.")


class Expectation(Model):
    equals: str | None = Field(default=None, description="The output must equal this exactly.")
    contains: str | None = Field(default=None, description="The output must contain this.")
    regex: str | None = Field(
        default=None, description="The output must match this Python regular expression."
    )

    @field_validator("regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            compile_pattern(value)
        return value


class Smoke(Model):
    """One smoke prompt: a chat conversation rendered by the template, or a raw prompt."""

    name: Name = Field(description="A unique name, used in reports and goldens.")
    messages: tuple[Message, ...] | None = Field(default=None, description="A chat conversation.")
    system: str | None = Field(default=None, description="A system prompt put before the messages.")
    add_generation_prompt: bool = Field(default=True, description="End the render with the assistant header.")
    prompt: str | None = Field(default=None, description="A raw prompt, tokenized as is (no template).")
    max_tokens: int | None = Field(
        default=None, ge=1, le=MAX_NEW_TOKENS, description="Maximum new tokens (default: the sampler's)."
    )
    expect: Expectation | None = Field(default=None, description="What the output must satisfy.")

    @model_validator(mode="after")
    def _one_kind(self) -> Smoke:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either 'messages' (a chat) or 'prompt' (raw text), not both or neither")
        if self.prompt is not None and self.system is not None:
            raise ValueError("'system' goes with 'messages', not with a raw 'prompt'")
        return self

    def conversation(self) -> tuple[dict[str, Any], ...]:
        """The messages as the template sees them, the system prompt first."""
        msgs = [{"role": m.role, "content": m.content} for m in self.messages or ()]
        if self.system is not None:
            msgs.insert(0, {"role": "system", "content": self.system})
        return tuple(msgs)


class Manifest(Model):
    """``llmstack.toml``: one stack, one table per link."""

    stack: Stack = Field(description="The stack's name and description.")
    model: ModelSpec = Field(description="The model file.")
    template: TemplateSpec = Field(default_factory=TemplateSpec, description="The chat template.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="The tokenizer.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="The inference engine.")
    backend: BackendSpec = Field(default_factory=BackendSpec, description="The backend and load options.")
    sampler: SamplerSpec = Field(default_factory=SamplerSpec, description="Sampler settings.")
    registries: tuple[RegistrySource, ...] = Field(
        default=(), alias="registry", description="Registries beside the bundled one ([[registry]] tables)."
    )
    smoke: tuple[Smoke, ...] = Field(default=(), description="Smoke prompts ([[smoke]]).")

    @model_validator(mode="after")
    def _unique(self) -> Manifest:
        names = [s.name for s in self.smoke]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"smoke prompt names must be unique; '{dupes[0]}' appears twice")
        regs = [r.name for r in self.registries]
        if len(set(regs)) != len(regs) or "bundled" in regs:
            raise ValueError("registry names must be unique and not 'bundled'")
        return self


def check_requirement(requirement: str) -> None:
    """Validate an engine version requirement: llama.cpp build clauses or PEP 440 specifiers.

    The syntax decides which, not the engine's name (``b4628`` is never a PEP 440 version); whether the engine
    takes builds is the adapter's knowledge, checked when the stack is locked.
    """
    if not requirement.strip():
        return
    clauses = requirement.split(",")
    if any(_BUILD_CLAUSE.match(clause) for clause in clauses):
        if not all(_BUILD_CLAUSE.match(clause) for clause in clauses):
            raise ValueError(
                f"'{requirement}' is not a llama.cpp build requirement; write e.g. '>=b4628' or '>=b4628,<b7756'"
            )
        return
    try:
        SpecifierSet(requirement)
    except InvalidSpecifier:
        raise ValueError(
            f"'{requirement}' is neither a PEP 440 version requirement ('==0.3.36') nor llama.cpp builds "
            "('>=b4628,<b7756')"
        ) from None


def parse_manifest(text: str, origin: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate manifest text. Errors name the file, line and TOML key path."""
    data = parse_toml(text, origin, ManifestError)
    return validate(Manifest, data, origin, text, ManifestError)
