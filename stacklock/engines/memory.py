"""Whether a model's KV cache fits in this machine's memory, judged from its GGUF header before an engine loads it.

``backend.context-size`` is bounded in the manifest by the largest trained context there is (16M tokens), but the
memory it costs depends on the model: 16M tokens of Gemma 3 270M ask llama.cpp for a 288 GiB KV cache, which
dies in the allocator, or, just below what the machine has, is zeroed page by page until the OOM killer ends
the run. The KV cache is sized from the header exactly as llama.cpp sizes it (every layer at the full context:
llama-cpp-python keeps llama.cpp's full-size sliding-window cache), and a context whose cache alone exceeds the
machine's available memory is refused in one line before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from stacklock.engines.base import BackendSettings
from stacklock.engines.machine import read_available_memory
from stacklock.errors import EngineError, StacklockError
from stacklock.gguf.reader import GGUFArray, read_gguf

KV_BYTES_PER_ELEMENT = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}
"""Bytes per cached element of each KV-cache type llama.cpp accepts (quantized types store blocks of 32)."""
GIB = 1 << 30


def _per_layer(value: object, layers: int) -> list[int] | None:
    """A hyperparameter for each layer: one integer for all, or an array with one per layer."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return [value] * layers
    if isinstance(value, GGUFArray) and len(value) == layers:
        items = value.values()
        if all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in items):
            return [int(item) for item in items]
    return None


def estimate_kv_cache_bytes(
    metadata: Mapping[str, object], context: int, cache_type_k: str | None, cache_type_v: str | None
) -> int | None:
    """The KV cache's size for ``context`` tokens, from a GGUF header's metadata; None when the header does not
    describe a plain attention cache (recurrent models, multi-head latent attention, missing keys)."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or f"{arch}.attention.kv_lora_rank" in metadata:
        return None  # MLA (DeepSeek 2/3) caches a compressed latent, sized by other keys.
    layers = metadata.get(f"{arch}.block_count")
    embedding = metadata.get(f"{arch}.embedding_length")
    if not isinstance(layers, int) or not isinstance(embedding, int) or layers <= 0:
        return None
    heads = _per_layer(metadata.get(f"{arch}.attention.head_count"), layers)
    if heads is None:
        return None  # No attention heads: a recurrent model, whose state does not grow with the context.
    kv_heads = _per_layer(metadata.get(f"{arch}.attention.head_count_kv", heads[0]), layers) or heads
    head = embedding // max(heads[0], 1)
    key = _per_layer(metadata.get(f"{arch}.attention.key_length", head), layers)
    value = _per_layer(metadata.get(f"{arch}.attention.value_length", head), layers)
    if key is None or value is None:
        return None
    k_bytes = KV_BYTES_PER_ELEMENT.get(cache_type_k or "f16", 2.0)
    v_bytes = KV_BYTES_PER_ELEMENT.get(cache_type_v or "f16", 2.0)
    per_token = sum(n * (k * k_bytes + v * v_bytes) for n, k, v in zip(kv_heads, key, value, strict=True))
    return int(per_token * context)


def check_kv_cache_fits(model_path: Path, backend: BackendSettings) -> None:
    """Refuse (EngineError, exit 3) a context whose KV cache exceeds the memory this machine has available.

    Headers that cannot be read or that describe no attention cache are left to the engine, which reports
    them itself; so is a machine whose OS does not say how much memory is available.
    """
    context = backend.context_size
    if context is None:
        return
    try:
        metadata = read_gguf(model_path).metadata
    except StacklockError:
        return
    needed = estimate_kv_cache_bytes(metadata, context, backend.cache_type_k, backend.cache_type_v)
    available = read_available_memory()
    if needed is None or available is None or needed <= available:
        return
    raise EngineError(
        f"backend.context-size = {context} needs a KV cache of {needed / GIB:.1f} GiB for {model_path.name}, "
        f"more than the {available / GIB:.1f} GiB of memory this machine has available",
        hint="lower backend.context-size in llmstack.toml (or quantize the cache with backend.cache-type-k "
        "and cache-type-v) and re-lock",
    )
