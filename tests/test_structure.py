"""Structural checks of a GGUF file: one broken tiny file per check, clean controls, and lock before record."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest

from stacklock.gguf.header import header_from_gguf
from stacklock.gguf.reader import read_gguf
from stacklock.gguf.structure import check_structure
from stacklock.rules.builtin import all_checks
from tests.conftest import CHATML, Result
from tests.gguf_builder import RawGGUF, TypedValue, build_tiny_gguf, gemma_model_path, spm_vocab

VT = gguf.GGUFValueType
F32 = int(gguf.GGMLQuantizationType.F32)
_TOKENS, _SCORES, _TYPES = spm_vocab()


def _u32(value: int) -> TypedValue:
    return TypedValue(value, VT.UINT32)


def _findings(path: Path) -> dict[str, str]:
    return {f.rule: f.title for f in check_structure(header_from_gguf(read_gguf(path)))}


BROKEN: dict[str, tuple[dict[str, Any], str, str]] = {
    # name: (build_tiny_gguf arguments, the finding id, a text its title must contain)
    "missing-layer": (
        {"extra_metadata": {"llama.block_count": _u32(3)}},
        "gguf-missing-layer-tensor",
        "'blk.2.attn_k.weight' is missing",
    ),
    "extra-layer": (
        {"extra_metadata": {"llama.block_count": _u32(1)}},
        "gguf-extra-layer-tensor",
        "layer 1",
    ),
    "embedding": (
        {"extra_metadata": {"llama.embedding_length": _u32(48)}},
        "gguf-embedding-shape",
        "llama.embedding_length",
    ),
    "heads-divide-embedding": (
        {
            "n_head": 4,
            "extra_metadata": {
                "llama.attention.head_count": _u32(3),
                "llama.attention.head_count_kv": _u32(3),
            },
        },
        "gguf-head-count",
        "not divisible by llama.attention.head_count 3",
    ),
    "kv-heads": (
        {"extra_metadata": {"llama.attention.head_count_kv": _u32(3)}},
        "gguf-head-count",
        "not a multiple of head_count_kv 3",
    ),
    "key-length": (
        {"extra_metadata": {"llama.attention.key_length": _u32(32)}},
        "gguf-attention-shape",
        "'blk.0.attn_q.weight'",
    ),
    "feed-forward": (
        {"extra_metadata": {"llama.feed_forward_length": _u32(100)}},
        "gguf-feed-forward-shape",
        "llama.feed_forward_length 100",
    ),
    "vocab": (
        {
            "extra_metadata": {
                "tokenizer.ggml.tokens": TypedValue(_TOKENS[:-1], VT.ARRAY, VT.STRING),
                "tokenizer.ggml.scores": TypedValue(_SCORES[:-1], VT.ARRAY, VT.FLOAT32),
                "tokenizer.ggml.token_type": TypedValue(_TYPES[:-1], VT.ARRAY, VT.INT32),
            }
        },
        "gguf-vocab-shape",
        f"tokenizer.ggml.tokens has {len(_TOKENS) - 1} tokens",
    ),
    "scores": (
        {"extra_metadata": {"tokenizer.ggml.scores": TypedValue(_SCORES[:-1], VT.ARRAY, VT.FLOAT32)}},
        "gguf-tokenizer-arrays",
        "tokenizer.ggml.scores has",
    ),
    "token-types": (
        {"extra_metadata": {"tokenizer.ggml.token_type": TypedValue(_TYPES[:-1], VT.ARRAY, VT.INT32)}},
        "gguf-tokenizer-arrays",
        "tokenizer.ggml.token_type has",
    ),
    "special-id": (
        {"eos_id": 100_000},
        "gguf-special-token-id",
        "tokenizer.ggml.eos_token_id is 100000",
    ),
    "quantization-label": (
        {"extra_metadata": {"general.file_type": _u32(15)}},
        "gguf-quantization-label",
        "says Q4_K_M",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_structural_check_fires_on_its_broken_file(tmp_path: Path, name: str) -> None:
    arguments, rule, text = BROKEN[name]
    found = _findings(build_tiny_gguf(tmp_path / f"{name}.gguf", **arguments))
    assert rule in found, found
    assert text in found[rule]


def _overlapping(path: Path, second_offset: int) -> Path:
    raw = RawGGUF()
    raw.add("general.architecture", VT.STRING, "llama")
    raw.add("tokenizer.ggml.model", VT.STRING, "llama")
    raw.add("tokenizer.ggml.tokens", VT.ARRAY, ["a", "b"], VT.STRING)
    raw.tensors = [("first.weight", (32,), F32, 0), ("second.weight", (32,), F32, second_offset)]
    return raw.write(path)


def test_overlapping_tensor_data_is_a_warning(tmp_path: Path) -> None:
    # The GGUF writer never lays tensors over each other, so the file is written byte by byte.
    found = _findings(_overlapping(tmp_path / "overlap.gguf", 64))
    assert (
        "'second.weight' (data offset 64) overlaps 'first.weight' (bytes 0 to 128)"
        in found["gguf-tensor-overlap"]
    )
    assert "gguf-tensor-overlap" not in _findings(_overlapping(tmp_path / "apart.gguf", 128))


def test_one_finding_per_check_counts_the_rest(tmp_path: Path) -> None:
    found = _findings(
        build_tiny_gguf(tmp_path / "ff.gguf", extra_metadata={"llama.feed_forward_length": _u32(100)})
    )
    # Three feed-forward tensors in each of two layers: the first is named, five more are counted.
    assert found["gguf-feed-forward-shape"].endswith("(and 5 more)")


CLEAN: dict[str, dict[str, Any]] = {
    "llama-spm": {},
    "gpt2-bpe": {"tokenizer": "gpt2"},
    "f16": {"file_type": 1},
    "f32-labelled": {"file_type": 0},
    "grouped-query": {"n_head": 8, "n_head_kv": 2},
    "one-layer": {"n_layer": 1},
    "split": {"split_max_tensors": 5},
    "big-endian": {"big_endian": True},
}


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_tiny_models_have_no_structural_finding(tmp_path: Path, name: str) -> None:
    assert _findings(build_tiny_gguf(tmp_path / f"{name}.gguf", **CLEAN[name])) == {}


def test_the_gemma_model_has_no_structural_finding() -> None:
    path = gemma_model_path()
    if path is None:
        pytest.skip("the Gemma example model is not installed")
    assert _findings(path) == {}


def test_every_structural_check_is_in_the_catalog() -> None:
    ids = {check.id for check in all_checks() if check.family == "structure"}
    assert {rule for _, rule, _ in BROKEN.values()} | {"gguf-tensor-overlap"} == ids


def _project(tmp_path: Path, **arguments: Any) -> Path:
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML, **arguments)
    (tmp_path / "llmstack.toml").write_text(
        '[stack]\nname = "broken"\n\n[model]\nsource = "tiny.gguf"\n\n[template]\nsource = "gguf"\n\n'
        '[engine]\nname = "llama-cpp-python"\n\n[sampler]\ntemperature = 0.0\n\n[[smoke]]\nname = "hi"\nmax-tokens = 2\n'
        'messages = [{ role = "user", content = "hello" }]\n'
    )
    return tmp_path


def test_lock_refuses_a_file_llama_cpp_refuses_naming_the_field(
    tmp_path: Path, cli: Callable[..., Result]
) -> None:
    project = _project(tmp_path, extra_metadata={"llama.block_count": _u32(3)})
    refused = cli("lock", cwd=project)
    assert refused.code == 1
    assert "gguf-missing-layer-tensor" in refused.err
    assert "'blk.2.attn_k.weight' is missing (llama.block_count is 3)" in refused.err
    assert not (project / "llmstack.lock").exists()
    # Accepted anyway, the lock records the finding; the engine then refuses the file, as lock said it would.
    allowed = cli("lock", "--allow", "gguf-missing-layer-tensor", "--reason", "test", cwd=project)
    assert allowed.code == 0, allowed.err
    checked = cli("check", cwd=project)
    assert "gguf-missing-layer-tensor" in checked.out
    assert cli("record", cwd=project).code == 3


def test_a_warning_is_recorded_and_the_lock_written(tmp_path: Path, cli: Callable[..., Result]) -> None:
    project = _project(tmp_path, extra_metadata={"general.file_type": _u32(15)})
    result = cli("lock", cwd=project)
    assert result.code == 0, result.err
    assert "warning: gguf-quantization-label" in result.err
    assert 'rule = "gguf-quantization-label"' in (project / "llmstack.lock").read_text()
