"""The tokenizer fingerprint: what a model file declares about its tokenizer, with digests of its arrays."""

from __future__ import annotations

from pydantic import Field

from stacklock.model.base import Model

_SHA256 = r"^[0-9a-f]{64}$"


class TokenizerFingerprint(Model):
    """What a GGUF file declares about its tokenizer, with digests of the vocabulary arrays."""

    kind: str = Field(description="The tokenizer model, `tokenizer.ggml.model`: llama, gpt2, bert, t5, ...")
    pre: str | None = Field(
        default=None, description="The pre-tokenizer, `tokenizer.ggml.pre`, when the file names one."
    )
    vocab_size: int = Field(ge=0, description="The number of tokens in `tokenizer.ggml.tokens`.")
    tokens_sha256: str = Field(
        pattern=_SHA256,
        description="SHA-256 of the token texts: per token a u64 little-endian length, then its UTF-8 bytes.",
    )
    token_types_sha256: str | None = Field(
        default=None,
        pattern=_SHA256,
        description="SHA-256 of `tokenizer.ggml.token_type` as int32 little-endian, if present.",
    )
    scores_sha256: str | None = Field(
        default=None,
        pattern=_SHA256,
        description="SHA-256 of `tokenizer.ggml.scores` as float32 little-endian, if present.",
    )
    merges_sha256: str | None = Field(
        default=None,
        pattern=_SHA256,
        description="SHA-256 of `tokenizer.ggml.merges`, encoded like the tokens, if present (BPE).",
    )
    merges_count: int | None = Field(
        default=None, ge=0, description="The number of BPE merges, if the file has merges."
    )
    bos_id: int | None = Field(
        default=None, description="`tokenizer.ggml.bos_token_id`: the beginning-of-sequence token."
    )
    eos_id: int | None = Field(
        default=None, description="`tokenizer.ggml.eos_token_id`: the end-of-sequence token."
    )
    eot_id: int | None = Field(
        default=None,
        description="`tokenizer.ggml.eot_token_id`, else the end-of-turn token llama.cpp infers by text.",
    )
    eom_id: int | None = Field(
        default=None,
        description="`tokenizer.ggml.eom_token_id`, else the end-of-message token llama.cpp infers by text.",
    )
    pad_id: int | None = Field(
        default=None, description="`tokenizer.ggml.padding_token_id`: the padding token."
    )
    unk_id: int | None = Field(
        default=None, description="`tokenizer.ggml.unknown_token_id`: the unknown-text token."
    )
    bos_text: str | None = Field(
        default=None, description="The text of the BOS token, as chat templates see `bos_token`."
    )
    eos_text: str | None = Field(
        default=None, description="The text of the EOS token, as chat templates see `eos_token`."
    )
    eot_text: str | None = Field(default=None, description="The text of the end-of-turn token.")
    add_bos: bool | None = Field(
        default=None, description="`tokenizer.ggml.add_bos_token`: whether the engine prepends BOS."
    )
    add_eos: bool | None = Field(
        default=None, description="`tokenizer.ggml.add_eos_token`: whether the engine appends EOS."
    )
    add_space_prefix: bool | None = Field(
        default=None,
        description="`tokenizer.ggml.add_space_prefix`: whether a space is put before the first word.",
    )
    sha256: str = Field(
        pattern=_SHA256,
        description="SHA-256 over every other field as sorted, compact JSON: one value for quick comparison.",
    )
