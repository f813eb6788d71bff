"""A model file's header as the lock needs it, cached by content digest.

Re-locking an unchanged multi-GB model should cost neither a re-hash (see :mod:`stacklock.hashing`) nor a
re-parse of a 262,144-token vocabulary. The header summary is stored under the file's sha256, so a cached
entry can only ever describe the exact bytes it was made from; the GGUF reader (and numpy) is imported only on a
miss.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, ValidationError

from stacklock.errors import FileError
from stacklock.files.atomic import write_text_atomic
from stacklock.files.cache_dir import default_cache_dir
from stacklock.gguf.keys import named_chat_templates
from stacklock.model.base import Model
from stacklock.model.tokenizer import TokenizerFingerprint

if TYPE_CHECKING:
    from stacklock.gguf.reader import GGUFFile

#: Bump when the summary changes, so older cache entries are ignored rather than misread.
HEADER_CACHE_VERSION = 4

#: Token texts that engines treat as end of generation or turn markers; the lock records which ones exist.
KNOWN_SPECIAL_TEXTS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<start_of_turn>",
    "<|channel|>",
    "<|return|>",
    "</s>",
)


#: Token types that llama.cpp parses as one piece out of rendered text: CONTROL and USER_DEFINED.
_SPECIAL_TYPES = (3, 4)
#: A chat-template marker: ``<|im_start|>``, ``<start_of_turn>``, ``</s>``, ``[INST]``.
MARKER = re.compile(r"<\|[^<>|\s]{1,64}\|>|</?[A-Za-z][A-Za-z0-9_.-]{0,63}>|\[/?[A-Z_]{2,32}\]")
# Numbered placeholders (<unused12>, <|reserved_special_token_7|>, <extra_id_3>) are never in templates; a
# vocabulary may hold thousands, which the lock does not need to list.
_PLACEHOLDER = re.compile(r"\d+\|?>$|\d+\]$")
#: At most this many special texts are pinned; a vocabulary that declares more is cut (in id order).
MAX_SPECIAL_TEXTS = 512


def _special_texts(gguf: GGUFFile) -> tuple[str, ...]:
    """The marker-shaped texts of the vocabulary's special tokens, which templates may emit as one token each."""
    from stacklock.gguf.reader import GGUFArray  # noqa: PLC0415 - numpy only on a cache miss.

    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, GGUFArray):
        return ()
    found = [t for t in KNOWN_SPECIAL_TEXTS if tokens.index_of_string(t) is not None]
    types = gguf.metadata.get("tokenizer.ggml.token_type")
    if isinstance(types, GGUFArray) and types.count == tokens.count:
        kinds = types.values()
        for index, kind in enumerate(kinds):
            if kind in _SPECIAL_TYPES and len(found) < MAX_SPECIAL_TEXTS:
                text = tokens[index]
                if MARKER.fullmatch(text) and not _PLACEHOLDER.search(text) and text not in found:
                    found.append(text)
    return tuple(found)


class TensorEntry(Model):
    """One tensor's header entry, as the structural checks need it (no data is read)."""

    name: str = Field(description="The tensor's name.")
    shape: tuple[int, ...] = Field(description="Its shape in GGUF order (ne[0] first).")
    type: str = Field(description="Its ggml type.")
    offset: int = Field(description="Its data offset within its part's data region.")
    size: int = Field(description="Its data size in bytes, from the type's block size.")
    part: int = Field(default=0, description="The split part that holds it.")


class ModelHeader(Model):
    """What the lock pins from a GGUF header: identity, tensors summary, metadata, tokenizer."""

    cache_version: int = Field(default=HEADER_CACHE_VERSION, description="The summary format.")
    part_names: tuple[str, ...] = Field(description="File names of every split part, in order.")
    version: int = Field(description="GGUF format version.")
    architecture: str | None = Field(default=None, description="general.architecture.")
    name: str | None = Field(default=None, description="general.name.")
    context_length: int | None = Field(default=None, description="<arch>.context_length.")
    parameter_count: int = Field(description="Total elements over all tensors.")
    quantization: str = Field(description="The file type or the dominant tensor type.")
    tensor_type_counts: dict[str, int] = Field(description="Tensors per type.")
    metadata: dict[str, str | int | float | bool] = Field(description="Every scalar metadata key.")
    arrays: dict[str, str] = Field(description="Every array metadata key, as 'type[count]'.")
    part_sha256: tuple[str, ...] = Field(default=(), description="sha256 of every part after the first.")
    tokenizer: TokenizerFingerprint = Field(description="The tokenizer's fingerprint.")
    special_texts: tuple[str, ...] = Field(
        default=(),
        description=(
            "Marker-shaped texts of the vocabulary's special tokens (control and user-defined), "
            "numbered placeholders left out, at most 512."
        ),
    )
    # Required, so that a cache entry written without tensor infos is a miss whatever its version says.
    tensors: tuple[TensorEntry, ...] = Field(description="Every tensor's header entry.")

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def named_chat_templates(self) -> dict[str, str]:
        return named_chat_templates(self.metadata)


def header_from_gguf(gguf: GGUFFile) -> ModelHeader:
    """Summarise a parsed GGUF; pure."""
    from stacklock.gguf.reader import GGUFArray, value_type_name  # noqa: PLC0415
    from stacklock.gguf.tokenizer import fingerprint_tokenizer  # noqa: PLC0415

    scalars: dict[str, str | int | float | bool] = {}
    arrays: dict[str, str] = {}
    for key in sorted(gguf.metadata):
        value = gguf.metadata[key]
        if isinstance(value, GGUFArray):
            arrays[key] = f"{value_type_name(value.item_type)}[{value.count}]"
        elif isinstance(value, float) and not math.isfinite(value):
            # Pinned as text ('nan', 'inf', '-inf'): equal to itself, and representable in TOML and JSON alike.
            scalars[key] = str(value)
        else:
            scalars[key] = value
    special = _special_texts(gguf)
    return ModelHeader(
        part_names=tuple(p.name for p in gguf.parts),
        version=gguf.version,
        architecture=gguf.architecture,
        name=gguf.name,
        context_length=gguf.context_length,
        parameter_count=gguf.parameter_count,
        quantization=gguf.quantization,
        tensor_type_counts=dict(sorted(gguf.tensor_type_counts.items())),
        metadata=scalars,
        arrays=arrays,
        # A file without a vocabulary cannot be locked; the fingerprint says so in one line.
        tokenizer=fingerprint_tokenizer(gguf),
        special_texts=special,
        tensors=tuple(
            TensorEntry(
                name=t.name, shape=t.shape, type=t.type_name, offset=t.offset, size=t.n_bytes, part=t.part
            )
            for t in gguf.tensors
        ),
    )


class HeaderCache:
    """Header summaries stored by the sha256 of the model file they describe (its first part)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = (directory or default_cache_dir()) / "headers"

    def get(self, digest: str) -> ModelHeader | None:
        try:
            header = ModelHeader.model_validate_json((self.directory / f"{digest}.json").read_bytes())
        except (OSError, ValidationError):
            # A missing or damaged entry only costs a re-parse.
            return None
        return header if header.cache_version == HEADER_CACHE_VERSION else None

    def put(self, digest: str, header: ModelHeader) -> None:
        # A read-only cache directory is not an error: the next run parses again.
        with contextlib.suppress(OSError, FileError):
            self.directory.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.directory / f"{digest}.json", header.model_dump_json(by_alias=True))
