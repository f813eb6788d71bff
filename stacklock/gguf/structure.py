"""Structural checks of a GGUF file, from its header and tensor infos alone (no tensor data is read).

llama.cpp refuses to load a file whose hyperparameters disagree with its tensor shapes, that lacks a layer's
tensors or holds tensors it does not expect; stacklock reports such a file at ``lock`` as an error finding that
names the field, instead of an engine crash (exit 3) at ``record``. What llama.cpp loads but gets wrong (a
special-token id outside the vocabulary, overlapping tensor data, a quantization label that does not match the
tensors) is a warning.

The checks are pure: :func:`check_structure` takes the cached header summary and returns findings.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping, Sequence

from stacklock.gguf.header import ModelHeader, TensorEntry
from stacklock.model.findings import Finding, Link, Severity
from stacklock.rules.builtin import BuiltinCheck, register

__all__ = ["check_structure"]

_LLAMA_LOADER = "https://github.com/ggml-org/llama.cpp/blob/master/src/llama-model-loader.cpp"
_LLAMA_VOCAB = "https://github.com/ggml-org/llama.cpp/blob/master/src/llama-vocab.cpp"
_GGUF_SPEC = "https://github.com/ggml-org/ggml/blob/master/docs/gguf.md"
_RECONVERT = "convert the model again with a current llama.cpp, or download an intact copy"


def _check(
    check_id: str, severity: Severity, title: str, explanation: str, fix: str, *refs: str
) -> BuiltinCheck:
    return register(
        BuiltinCheck(
            id=check_id,
            family="structure",
            severity=severity,
            title=title,
            links=(Link.MODEL,),
            explanation=explanation,
            fix=fix,
            references=refs or (_LLAMA_LOADER,),
        )
    )


EMBEDDING_SHAPE = _check(
    "gguf-embedding-shape",
    Severity.ERROR,
    "the embedding length disagrees with a tensor's shape",
    "llama.cpp checks every tensor's shape against the hyperparameters and refuses to load a file where they "
    "disagree ('tensor has wrong shape').",
    _RECONVERT,
)
VOCAB_SHAPE = _check(
    "gguf-vocab-shape",
    Severity.ERROR,
    "the vocabulary size disagrees with the embedding tensor",
    "The token embedding (and output) tensor has one row per token; llama.cpp refuses a file whose vocabulary "
    "has another size.",
    _RECONVERT,
)
HEAD_COUNT = _check(
    "gguf-head-count",
    Severity.ERROR,
    "the attention head counts are inconsistent",
    "The head count must be positive, divide the embedding length (unless the head size is given), and be a "
    "multiple of the key/value head count (grouped-query attention); llama.cpp cannot build the model otherwise.",
    _RECONVERT,
)
ATTENTION_SHAPE = _check(
    "gguf-attention-shape",
    Severity.ERROR,
    "an attention tensor's shape disagrees with the head counts",
    "The query, key, value and output projections are sized by head count times head size; llama.cpp refuses "
    "a file where they disagree ('tensor has wrong shape').",
    _RECONVERT,
)
FEED_FORWARD_SHAPE = _check(
    "gguf-feed-forward-shape",
    Severity.ERROR,
    "the feed-forward length disagrees with a tensor's shape",
    "The feed-forward tensors are sized by <arch>.feed_forward_length; llama.cpp refuses a file where they "
    "disagree ('tensor has wrong shape').",
    _RECONVERT,
)
MISSING_LAYER = _check(
    "gguf-missing-layer-tensor",
    Severity.ERROR,
    "a layer's tensor is missing",
    "Every layer below <arch>.block_count needs its tensors; llama.cpp refuses the file ('missing tensor').",
    "download the file again (it may be a partial conversion), or convert the model again",
)
EXTRA_LAYER = _check(
    "gguf-extra-layer-tensor",
    Severity.ERROR,
    "a tensor belongs to a layer beyond the block count",
    "llama.cpp creates tensors for <arch>.block_count layers only and refuses a file with tensors it did not "
    "use ('wrong number of tensors').",
    "fix <arch>.block_count or convert the model again",
)
SPECIAL_TOKEN_ID = _check(
    "gguf-special-token-id",
    Severity.WARNING,
    "a special-token id is outside the vocabulary",
    "llama.cpp ignores an out-of-range special-token id ('bad special token') and falls back to its default, "
    "so BOS, EOS or the end-of-turn token is not the one the model was trained with.",
    "set the id to a token of the vocabulary (gguf-py's gguf_set_metadata.py) or convert the model again",
    _LLAMA_VOCAB,
)
TOKENIZER_ARRAYS = _check(
    "gguf-tokenizer-arrays",
    Severity.ERROR,
    "the tokenizer's parallel arrays have different lengths",
    "tokenizer.ggml.tokens, .scores and .token_type describe the same tokens; llama.cpp reads one entry of each "
    "per token and fails (or reads past the array) when their lengths differ.",
    _RECONVERT,
    _LLAMA_VOCAB,
)
TENSOR_OVERLAP = _check(
    "gguf-tensor-overlap",
    Severity.WARNING,
    "two tensors' data overlap",
    "Each tensor's bytes should lie apart in the data region; overlapping tensors load, but share weights, "
    "which no converter writes: the file is corrupt or crafted.",
    "download the file again from a trusted source",
    _GGUF_SPEC,
)
QUANTIZATION_LABEL = _check(
    "gguf-quantization-label",
    Severity.WARNING,
    "general.file_type does not match the tensor types",
    "The quantization the file is labelled with (general.file_type, what the lock pins as 'quantization') is "
    "not among its tensors' types, so the label misleads whoever picks the file by it.",
    "check which quantization you downloaded; fix general.file_type or the file name",
    _GGUF_SPEC,
)

#: Architectures whose layers all hold the same tensors and whose projections are sized as below.
_DENSE = frozenset(
    {
        "llama",
        "mistral",
        "gemma",
        "gemma2",
        "gemma3",
        "qwen2",
        "qwen3",
        "granite",
        "olmo",
        "olmo2",
        "stablelm",
    }
)
_SPECIAL_IDS = ("bos", "eos", "eot", "eom", "unknown", "padding", "sep", "cls", "mask")
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_K_MIX = re.compile(r"(?<=_K)_(XS|S|M|L)$")
_IQ_MIX = re.compile(r"(?<=^IQ\d)_M$")


def check_structure(header: ModelHeader) -> tuple[Finding, ...]:
    """Every structural finding of a GGUF header; pure."""
    checks = (_shapes, _layers, _special_ids, _tokenizer_arrays, _overlaps, _quantization)
    # One finding per check: the first instance names the field, the count says how many more there are.
    found: dict[str, list[Finding]] = {}
    for check in checks:
        for finding in check(header):
            found.setdefault(finding.rule, []).append(finding)
    return tuple(
        first if not more else first.model_copy(update={"title": f"{first.title} (and {len(more)} more)"})
        for first, *more in found.values()
    )


def _int(metadata: Mapping[str, object], key: str) -> int | None:
    value = metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _tensors(header: ModelHeader) -> dict[str, TensorEntry]:
    return {t.name: t for t in header.tensors}


def _shape_finding(check: BuiltinCheck, tensor: TensorEntry, expected: Sequence[int], why: str) -> Finding:
    return check.finding(
        title=f"tensor '{tensor.name}' has shape {list(tensor.shape)}, expected {list(expected)} ({why})",
    )


def _shapes(header: ModelHeader) -> Iterator[Finding]:
    arch = header.architecture or ""
    meta = header.metadata
    tensors = _tensors(header)
    n_embd = _int(meta, f"{arch}.embedding_length")
    n_vocab = header.tokenizer.vocab_size
    for name in ("token_embd.weight", "output.weight"):
        tensor = tensors.get(name)
        if tensor is None or len(tensor.shape) != 2:
            continue
        if n_embd is not None and tensor.shape[0] != n_embd:
            yield _shape_finding(
                EMBEDDING_SHAPE, tensor, (n_embd, tensor.shape[1]), f"{arch}.embedding_length"
            )
        elif n_vocab and tensor.shape[1] != n_vocab:
            yield _shape_finding(
                VOCAB_SHAPE, tensor, (tensor.shape[0], n_vocab), f"tokenizer.ggml.tokens has {n_vocab} tokens"
            )
    if arch not in _DENSE or n_embd is None:
        return
    yield from _attention(header, tensors, n_embd)
    n_ff = _int(meta, f"{arch}.feed_forward_length")
    if n_ff is None:
        return
    for name, tensor in tensors.items():
        match = _LAYER.match(name)
        if match is None or len(tensor.shape) != 2:
            continue
        expected = {
            "ffn_up.weight": (n_embd, n_ff),
            "ffn_gate.weight": (n_embd, n_ff),
            "ffn_down.weight": (n_ff, n_embd),
        }.get(match[2])
        if expected is not None and tensor.shape != expected:
            yield _shape_finding(
                FEED_FORWARD_SHAPE, tensor, expected, f"{arch}.feed_forward_length {n_ff}, embedding {n_embd}"
            )


def _attention(header: ModelHeader, tensors: Mapping[str, TensorEntry], n_embd: int) -> Iterator[Finding]:
    arch = header.architecture
    meta = header.metadata
    n_head = _int(meta, f"{arch}.attention.head_count")
    if n_head is None:
        return
    n_head_kv = _int(meta, f"{arch}.attention.head_count_kv") or n_head
    key_length = _int(meta, f"{arch}.attention.key_length")
    value_length = _int(meta, f"{arch}.attention.value_length")
    problem = None
    if n_head <= 0:
        problem = f"{arch}.attention.head_count is {n_head}"
    elif n_head_kv > n_head or n_head % n_head_kv:
        problem = f"{arch}.attention.head_count {n_head} is not a multiple of head_count_kv {n_head_kv}"
    elif key_length is None and n_embd % n_head:
        problem = f"{arch}.embedding_length {n_embd} is not divisible by {arch}.attention.head_count {n_head}"
    if problem is not None:
        yield HEAD_COUNT.finding(title=problem)
        return
    head_k = key_length or n_embd // n_head
    head_v = value_length or head_k
    expected_shapes = {
        "attn_q.weight": (n_embd, n_head * head_k),
        "attn_k.weight": (n_embd, n_head_kv * head_k),
        "attn_v.weight": (n_embd, n_head_kv * head_v),
        "attn_output.weight": (n_head * head_v, n_embd),
    }
    why = f"{n_head} heads, {n_head_kv} key/value heads of size {head_k}"
    for name, tensor in tensors.items():
        match = _LAYER.match(name)
        expected = expected_shapes.get(match[2]) if match else None
        if expected is not None and tensor.shape != expected:
            yield _shape_finding(ATTENTION_SHAPE, tensor, expected, why)


def _layers(header: ModelHeader) -> Iterator[Finding]:
    arch = header.architecture or ""
    blocks = _int(header.metadata, f"{arch}.block_count")
    if blocks is None:
        return
    layers: dict[int, set[str]] = {}
    for tensor in header.tensors:
        match = _LAYER.match(tensor.name)
        if match:
            layers.setdefault(int(match[1]), set()).add(match[2])
    beyond = sorted(n for n in layers if n >= blocks)
    if beyond:
        yield EXTRA_LAYER.finding(
            title=f"tensors of layer {beyond[0]} exist but {arch}.block_count is {blocks}",
        )
    # Dense architectures hold the same tensors in every layer; others (hybrid, MoE) need only some tensor.
    every = set().union(*layers.values()) if arch in _DENSE and layers else set()
    # Past the highest layer present one more is enough to find a gap: the count itself is untrusted.
    for layer in range(min(blocks, max(layers, default=-1) + 2)):
        missing = sorted(every - layers.get(layer, set()))
        if missing:
            what = f"tensor 'blk.{layer}.{missing[0]}' is missing"
        elif layer not in layers:
            what = f"layer {layer} has no tensors"
        else:
            continue
        yield MISSING_LAYER.finding(title=f"{what} ({arch}.block_count is {blocks})")
        return


def _special_ids(header: ModelHeader) -> Iterator[Finding]:
    n_vocab = header.tokenizer.vocab_size
    for kind in _SPECIAL_IDS:
        key = f"tokenizer.ggml.{kind}_token_id"
        value = _int(header.metadata, key)
        if value is not None and not 0 <= value < n_vocab:
            yield SPECIAL_TOKEN_ID.finding(
                title=f"{key} is {value}, outside the vocabulary of {n_vocab} tokens"
            )


def _array_count(shape: str) -> int:
    return int(shape[shape.index("[") + 1 : -1])


def _tokenizer_arrays(header: ModelHeader) -> Iterator[Finding]:
    tokens = header.arrays.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    count = _array_count(tokens)
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        shape = header.arrays.get(key)
        if shape is not None and _array_count(shape) != count:
            yield TOKENIZER_ARRAYS.finding(
                title=f"{key} has {_array_count(shape)} entries but tokenizer.ggml.tokens has {count}",
            )


def _overlaps(header: ModelHeader) -> Iterator[Finding]:
    ordered = sorted(header.tensors, key=lambda t: (t.part, t.offset, t.size))
    for before, after in itertools.pairwise(ordered):
        if before.part == after.part and after.offset < before.offset + before.size:
            yield TENSOR_OVERLAP.finding(
                title=(
                    f"tensor '{after.name}' (data offset {after.offset}) overlaps '{before.name}' "
                    f"(bytes {before.offset} to {before.offset + before.size})"
                ),
            )
            return


def _quantization(header: ModelHeader) -> Iterator[Finding]:
    if _int(header.metadata, "general.file_type") is None or not header.tensor_type_counts:
        return
    label = header.quantization
    # A k-quant mix (Q4_K_M) is named after its main type (Q4_K); an i-quant mix IQ3_M after IQ3_S.
    accepted = {label, _K_MIX.sub("", label), _IQ_MIX.sub("_S", label)}
    if accepted & set(header.tensor_type_counts):
        return
    types = ", ".join(sorted(header.tensor_type_counts))
    yield QUANTIZATION_LABEL.finding(
        title=f"general.file_type says {label} but no tensor has that type (tensor types: {types})",
    )
