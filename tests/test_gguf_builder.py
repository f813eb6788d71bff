"""The tiny-model factory: byte-identical output, a coherent vocabulary, and models llama.cpp runs."""

from __future__ import annotations

import importlib.util
import time
from typing import TYPE_CHECKING

import gguf
import pytest

from stacklock.gguf.reader import read_gguf
from tests.gguf_builder import CONTROL_TOKENS, bpe_vocab, build_tiny_gguf, spm_vocab

if TYPE_CHECKING:
    from pathlib import Path

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    first = build_tiny_gguf(tmp_path / "a.gguf", chat_template="x", named_templates={"b": "1", "a": "2"})
    second = build_tiny_gguf(tmp_path / "b.gguf", chat_template="x", named_templates={"a": "2", "b": "1"})
    other_seed = build_tiny_gguf(tmp_path / "c.gguf", chat_template="x", seed=1)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other_seed.read_bytes()


def test_spm_vocabulary_layout() -> None:
    tokens, scores, types = spm_vocab()
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[3:259]) == {gguf.TokenType.BYTE}
    for text in CONTROL_TOKENS:
        assert types[tokens.index(text)] == gguf.TokenType.CONTROL
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types)
    # Pairwise merges can only grow a word if every prefix is itself a piece.
    assert all(("▁hello"[:n] in tokens) for n in range(2, 7))


def test_bpe_merges_only_join_known_tokens() -> None:
    tokens, types, merges, eos = bpe_vocab()
    known = set(tokens)
    assert len(tokens) == len(known) == len(types)
    assert all(
        left + right in known and left in known and right in known
        for left, right in (m.split(" ") for m in merges)
    )
    assert "Ġhello" in known
    assert types[tokens.index(eos)] == gguf.TokenType.CONTROL


def test_split_and_big_endian_options(tmp_path: Path) -> None:
    first = build_tiny_gguf(tmp_path / "m.gguf", split_max_tensors=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert len(read_gguf(first).tensors) == 21
    assert read_gguf(build_tiny_gguf(tmp_path / "be.gguf", big_endian=True)).byte_order == "big"


@pytest.mark.engine
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (the 'llama' extra)")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_llama_cpp_loads_and_runs_the_model(tmp_path: Path, kind: str) -> None:
    llama = pytest.importorskip("llama_cpp").Llama
    path = build_tiny_gguf(tmp_path / f"{kind}.gguf", tokenizer=kind)  # type: ignore[arg-type]
    vocab = spm_vocab()[0] if kind == "llama" else bpe_vocab()[0]
    start = time.perf_counter()
    model = llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)
    assert model.n_vocab() == len(vocab)
    ids = model.tokenize(b"hello world", add_bos=False)
    assert len(ids) == 2, [vocab[i] for i in ids]
    assert model.detokenize(ids).strip() == b"hello world"
    special = model.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert special == [vocab.index("<|im_start|>")]
    first = model.create_completion("hello world", max_tokens=8, temperature=0)["choices"][0]["text"]
    second = model.create_completion("hello world", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert first == second
    assert first
    assert time.perf_counter() - start < 30
