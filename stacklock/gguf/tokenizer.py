"""The tokenizer fingerprint: what a GGUF file says about how text becomes token ids.

Every digest is SHA-256 over the canonical little-endian GGUF encoding of an array's items, exactly the
bytes that follow the item type and count in a little-endian file:

* strings (``tokens_sha256``, ``merges_sha256``): for each item a u64 little-endian byte length, then its
  UTF-8 bytes;
* ``token_types_sha256``: each item as int32 little-endian;
* ``scores_sha256``: each item as IEEE float32 little-endian.

A big-endian file therefore gives the same fingerprint as its little-endian twin, and a digest can be checked
with nothing but the GGUF specification. ``sha256`` covers every other field: it is SHA-256 over the fields'
JSON (kebab-case keys, sorted, no spaces, ``sha256`` itself left out).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from stacklock.errors import GGUFError
from stacklock.files.digest import sha256_text
from stacklock.model.tokenizer import TokenizerFingerprint

if TYPE_CHECKING:
    from stacklock.gguf.reader import GGUFArray, GGUFFile

__all__ = ["EOM_TEXTS", "EOT_TEXTS", "TokenizerFingerprint", "fingerprint_tokenizer"]

_SHA256 = r"^[0-9a-f]{64}$"
_STRING, _INT32, _FLOAT32 = 8, 5, 6

# llama.cpp infers the end-of-turn token from these texts when the file does not name one; stacklock records
# the same token so that stop conditions and templates agree with the engine. The first one found wins.
EOT_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",  # noqa: RUF001 -- DeepSeek's token uses full-width bars on purpose.
    "<end_of_utterance>",
)
EOM_TEXTS = ("<|eom_id|>",)


def _where(gguf: GGUFFile, key: str) -> str:
    return f"{gguf.path}: '{key}'"


def _array(gguf: GGUFFile, key: str, item_type: int) -> GGUFArray | None:
    # Imported here: the reader needs numpy, and modules that only read a lock's fingerprint (`stacklock
    # check`) import this one without ever reading a GGUF file.
    from stacklock.gguf.reader import GGUFArray, value_type_name  # noqa: PLC0415

    value = gguf.metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, GGUFArray) or value.item_type != item_type:
        found = (
            f"an array of {value_type_name(value.item_type)}"
            if isinstance(value, GGUFArray)
            else type(value).__name__
        )
        raise GGUFError(
            f"{_where(gguf, key)} is {found}, expected an array of {value_type_name(item_type)}",
            hint="convert the model again with a current llama.cpp",
        )
    return value


def _optional(gguf: GGUFFile, key: str, kind: type[Any]) -> Any:
    value = gguf.metadata.get(key)
    if value is None:
        return None
    # A bool is an int in Python; an id stored as a bool is as wrong as one stored as a string.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GGUFError(
            f"{_where(gguf, key)} is {type(value).__name__} {value!r}, expected {kind.__name__}",
            hint="convert the model again with a current llama.cpp",
        )
    return value


def _digest(array: GGUFArray | None) -> str | None:
    if array is None:
        return None
    # A little-endian file already holds the canonical encoding; hashing it in place saves a copy.
    data = array.raw if array.byte_order == "little" else array.canonical_bytes()
    return hashlib.sha256(data).hexdigest()


def _text(tokens: GGUFArray, token_id: int | None) -> str | None:
    # An id outside the vocabulary is kept as declared, with no text, so that the lock shows it.
    if token_id is None or not 0 <= token_id < len(tokens):
        return None
    text: str = tokens[token_id]
    return text


def _inferred(gguf: GGUFFile, tokens: GGUFArray, key: str, texts: tuple[str, ...]) -> int | None:
    declared: int | None = _optional(gguf, key, int)
    if declared is not None:
        return declared
    for text in texts:
        index = tokens.index_of_string(text)
        if index is not None:
            return index
    return None


def fingerprint_tokenizer(gguf: GGUFFile) -> TokenizerFingerprint:
    """The fingerprint of the tokenizer embedded in a GGUF file; see the module docstring for the digests."""
    tokens = _array(gguf, "tokenizer.ggml.tokens", _STRING)
    if tokens is None:
        raise GGUFError(
            f"{gguf.path}: the file has no tokenizer ('tokenizer.ggml.tokens' is missing)",
            hint="convert the model again with llama.cpp's convert_hf_to_gguf.py, which embeds the tokenizer",
        )
    kind: str | None = _optional(gguf, "tokenizer.ggml.model", str)
    if kind is None:
        raise GGUFError(
            f"{gguf.path}: the file has tokens but no tokenizer model ('tokenizer.ggml.model' is missing)",
            hint="convert the model again with a current llama.cpp",
        )
    merges = _array(gguf, "tokenizer.ggml.merges", _STRING)
    bos_id: int | None = _optional(gguf, "tokenizer.ggml.bos_token_id", int)
    eos_id: int | None = _optional(gguf, "tokenizer.ggml.eos_token_id", int)
    eot_id = _inferred(gguf, tokens, "tokenizer.ggml.eot_token_id", EOT_TEXTS)
    fields: dict[str, Any] = {
        "kind": kind,
        "pre": _optional(gguf, "tokenizer.ggml.pre", str),
        "vocab_size": len(tokens),
        "tokens_sha256": _digest(tokens),
        "token_types_sha256": _digest(_array(gguf, "tokenizer.ggml.token_type", _INT32)),
        "scores_sha256": _digest(_array(gguf, "tokenizer.ggml.scores", _FLOAT32)),
        "merges_sha256": _digest(merges),
        "merges_count": None if merges is None else len(merges),
        "bos_id": bos_id,
        "eos_id": eos_id,
        "eot_id": eot_id,
        "eom_id": _inferred(gguf, tokens, "tokenizer.ggml.eom_token_id", EOM_TEXTS),
        "pad_id": _optional(gguf, "tokenizer.ggml.padding_token_id", int),
        "unk_id": _optional(gguf, "tokenizer.ggml.unknown_token_id", int),
        "bos_text": _text(tokens, bos_id),
        "eos_text": _text(tokens, eos_id),
        "eot_text": _text(tokens, eot_id),
        "add_bos": _optional(gguf, "tokenizer.ggml.add_bos_token", bool),
        "add_eos": _optional(gguf, "tokenizer.ggml.add_eos_token", bool),
        "add_space_prefix": _optional(gguf, "tokenizer.ggml.add_space_prefix", bool),
    }
    canonical = json.dumps(
        {key.replace("_", "-"): value for key, value in fields.items()},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return TokenizerFingerprint(**fields, sha256=sha256_text(canonical))
