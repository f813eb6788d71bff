"""Read the header of a GGUF file: metadata, tensor infos and split parts, never the weights.

The reader maps the file, walks the header with :mod:`struct`, and keeps every array value as the raw bytes
of its items (:class:`GGUFArray`), so a 262,144-token vocabulary costs a few vectorised passes instead of a
Python object per token. ``gguf.GGUFReader`` is deliberately not used: it builds numpy objects per item and
takes tens of seconds on such vocabularies.

Every length and count is checked against the bytes left in the file before anything is allocated, and every
problem is a :class:`~stacklock.errors.GGUFError` that names the file, the key or field, and the byte offset.
"""

from __future__ import annotations

import functools
import importlib.util
import mmap
import os
import re
import stat
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from stacklock.errors import GGUFError
from stacklock.gguf.keys import named_chat_templates

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    import numpy.typing as npt

__all__ = [
    "GGML_MAX_DIMS",
    "GGUFArray",
    "GGUFFile",
    "HeaderBytes",
    "HeaderIncomplete",
    "TensorInfo",
    "parse_gguf_header",
    "read_gguf",
    "value_type_name",
]

GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
SUPPORTED_VERSIONS = (2, 3)

_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = range(10)
_UINT64, _INT64, _FLOAT64 = range(10, 13)

# Struct codes of the fixed-size value types; numpy accepts the same codes with a byte-order prefix.
_SCALAR_CODES: dict[int, str] = {
    _UINT8: "B",
    _INT8: "b",
    _UINT16: "H",
    _INT16: "h",
    _UINT32: "I",
    _INT32: "i",
    _FLOAT32: "f",
    _BOOL: "?",
    _UINT64: "Q",
    _INT64: "q",
    _FLOAT64: "d",
}
_SCALAR_SIZES: dict[int, int] = {t: struct.calcsize("<" + c) for t, c in _SCALAR_CODES.items()}

# The smallest possible encodings, used to reject absurd counts before walking or allocating anything.
_MIN_STRING = 8  # A u64 length and no bytes.
_MIN_ARRAY = 12  # A u32 item type and a u64 count.
_MIN_KV = 8 + 4 + 1  # A key length, a value type and the smallest value.
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # A name length, n_dims, a type and an offset (zero dimensions).

# Vocabularies larger than this are walked with numpy; smaller ones are not worth the set-up cost.
_VECTOR_WALK_MIN = 256

# Decoding in pieces that fit in the CPU cache is twice as fast as decoding a whole vocabulary at once.
_UTF8_CHUNK = 1 << 16

_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# ``general.file_type`` names carry a ``MOSTLY_``/``ALL_`` prefix in gguf-py that nobody types.
_FILE_TYPE_PREFIXES = ("MOSTLY_", "ALL_")


@functools.cache
def _gguf_constants() -> ModuleType:
    """The ``gguf.constants`` module, without importing the rest of the ``gguf`` package.

    ``import gguf`` also imports its reader, writer, vocabulary and metadata modules (yaml among them), which
    costs more than ``stacklock inspect`` spends reading a 262k-token vocabulary. The constants module
    imports only ``enum`` and ``typing``, so it is loaded on its own from the installed package. Where the
    package is already imported (the test suite writes fixtures with it), its module is reused.
    """
    loaded = sys.modules.get("gguf.constants")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("gguf")  # A top-level spec: finding it imports nothing.
    if package is None or not package.submodule_search_locations:  # pragma: no cover - a broken install
        raise ModuleNotFoundError("stacklock needs the gguf package: pip install gguf", name="gguf")
    location = Path(next(iter(package.submodule_search_locations))) / "constants.py"
    spec = importlib.util.spec_from_file_location("stacklock._gguf_constants", location)
    if spec is None or spec.loader is None:  # pragma: no cover - a broken install
        raise ModuleNotFoundError(f"stacklock cannot load {location}", name="gguf.constants")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def value_type_name(value_type: int) -> str:
    """The lower-case name of a GGUF value type (``string``, ``uint32``), or ``type N`` when unknown."""
    try:
        return str(_gguf_constants().GGUFValueType(value_type).name.lower())
    except ValueError:
        return f"type {value_type}"


def _file_type_name(file_type: int) -> str:
    """The ``LlamaFileType`` name of a ``general.file_type`` value (``MOSTLY_Q4_K_M``), or ``""``."""
    try:
        return str(_gguf_constants().LlamaFileType(file_type).name)
    except ValueError:
        return ""


@functools.cache
def _quant_sizes(ggml_type: int) -> tuple[str, int, int]:
    """A ggml tensor type's name, elements per block and bytes per block; ``KeyError`` when unknown."""
    constants = _gguf_constants()
    try:
        quant = constants.GGMLQuantizationType(ggml_type)
    except ValueError:
        raise KeyError(ggml_type) from None
    block, type_size = constants.GGML_QUANT_SIZES[quant]
    return str(quant.name), int(block), int(type_size)


def _plural(value_type: int) -> str:
    name = value_type_name(value_type)
    return name + ("s" if value_type in (_STRING, _ARRAY) else " values")


# --------------------------------------------------------------------------------------------------- arrays


@dataclass(frozen=True, slots=True)
class GGUFArray:
    """An array metadata value, kept as the raw encoding of its items.

    ``raw`` is exactly the items' bytes as in the file (after the item type and count). For a little-endian
    file that is the canonical encoding hashed by fingerprints; :meth:`canonical_bytes` converts the rest.
    """

    item_type: int
    count: int
    raw: bytes | memoryview
    byte_order: Literal["little", "big"] = "little"
    # Start offsets (into ``raw``) of each string or nested array, built once on first use; ``_blob`` keeps
    # ``raw`` as bytes so repeated searches do not copy it again.
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        # Error messages show what the value is, not its bytes or a memoryview's address.
        return f"an array of {self.count} {_plural(self.item_type)}"

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values())

    @property
    def _order(self) -> str:
        return "<" if self.byte_order == "little" else ">"

    def offsets(self) -> npt.NDArray[np.int64]:
        """The start offset in ``raw`` of every item (strings and nested arrays: the start of its length)."""
        cached = self._cache.get("offsets")
        if cached is None:
            size = _SCALAR_SIZES.get(self.item_type)
            if size is not None:
                cached = np.arange(self.count, dtype=np.int64) * size
            else:
                cached, _ = _walk_items(
                    self.raw,
                    0,
                    item_type=self.item_type,
                    count=self.count,
                    order=self._order,
                    limit=len(self.raw),
                )
            self._cache["offsets"] = cached
        result: npt.NDArray[np.int64] = cached
        return result

    def __getitem__(self, index: int) -> Any:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for an array of {self.count} items")
        index %= self.count
        code = _SCALAR_CODES.get(self.item_type)
        if code is not None:
            return struct.unpack_from(self._order + code, self.raw, index * _SCALAR_SIZES[self.item_type])[0]
        start = int(self.offsets()[index])
        if self.item_type == _STRING:
            (length,) = struct.unpack_from(self._order + "Q", self.raw, start)
            return bytes(self.raw[start + 8 : start + 8 + length]).decode("utf-8")
        item_type, count = struct.unpack_from(self._order + "IQ", self.raw, start)
        end = self.offsets()[index + 1] if index + 1 < self.count else len(self.raw)
        return GGUFArray(item_type, count, self.raw[start + 12 : int(end)], self.byte_order)

    def values(self) -> tuple[Any, ...]:
        """Every item decoded: ints, floats, bools, strs, or nested :class:`GGUFArray` values."""
        code = _SCALAR_CODES.get(self.item_type)
        if code is not None:
            decoded: list[Any] = np.frombuffer(self.raw, dtype=self._order + code, count=self.count).tolist()
            return tuple(decoded)
        if self.item_type == _STRING:
            raw, order = self.raw, self._order + "Q"
            unpack = struct.unpack_from
            out = []
            for start in self.offsets().tolist():
                (length,) = unpack(order, raw, start)
                out.append(bytes(raw[start + 8 : start + 8 + length]).decode("utf-8"))
            return tuple(out)
        return tuple(self[i] for i in range(self.count))

    def to_python(self) -> list[Any]:
        """Every item decoded, nested arrays as nested lists."""
        return [v.to_python() if isinstance(v, GGUFArray) else v for v in self.values()]

    def _blob(self) -> bytes:
        blob = self._cache.get("blob")
        if blob is None:
            blob = self.raw if isinstance(self.raw, bytes) else self.raw.tobytes()
            self._cache["blob"] = blob
        result: bytes = blob
        return result

    def index_of_string(self, text: str) -> int | None:
        """The index of the first item equal to ``text`` in an array of strings, or ``None``.

        The length-prefixed encoding of ``text`` is searched as one byte pattern; a hit is accepted only where
        an item starts, so a pattern inside a longer token cannot match.
        """
        if self.item_type != _STRING:
            return None
        encoded = text.encode("utf-8")
        pattern = struct.pack(self._order + "Q", len(encoded)) + encoded
        blob = self._blob()
        offsets = self.offsets()
        hit = blob.find(pattern)
        while hit >= 0:
            index = int(np.searchsorted(offsets, hit))
            if index < self.count and offsets[index] == hit:
                return index
            hit = blob.find(pattern, hit + 1)
        return None

    def canonical_bytes(self) -> bytes:
        """The items encoded little-endian, whatever the file's byte order: the form fingerprints hash."""
        if self.byte_order == "little":
            return self._blob()
        code = _SCALAR_CODES.get(self.item_type)
        if code is not None:
            items = np.frombuffer(self.raw, dtype=">" + code, count=self.count)
            return items.astype("<" + code).tobytes()
        if self.item_type == _STRING:
            # Only the u64 length prefixes change; reversing their eight bytes in place converts them.
            data = np.frombuffer(self.raw, dtype=np.uint8).copy()
            prefix = self.offsets()[:, None] + np.arange(8, dtype=np.int64)
            data[prefix] = data[prefix[:, ::-1]]
            return data.tobytes()
        return b"".join(
            struct.pack("<IQ", item.item_type, item.count) + item.canonical_bytes() for item in self.values()
        )


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's header entry. ``shape`` is in GGUF order (``ne[0]`` first, the fastest-varying axis)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int  # From the start of its part's data section, as written in the file.
    n_elements: int
    n_bytes: int
    part: int = 0  # Index into ``GGUFFile.parts``.
    file_offset: int = 0  # Absolute byte offset of the data in its part.


@dataclass(frozen=True)
class GGUFFile:
    """The header of a GGUF model: every split part, metadata from the first part, tensors from all."""

    path: Path
    parts: tuple[Path, ...]
    version: int
    byte_order: Literal["little", "big"]
    alignment: int
    metadata: Mapping[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int = 0  # Where the first part's tensor data region starts: everything before is header.

    @property
    def architecture(self) -> str | None:
        return self._str("general.architecture")

    @property
    def name(self) -> str | None:
        return self._str("general.name")

    @property
    def context_length(self) -> int | None:
        arch = self.architecture
        value = self.metadata.get(f"{arch}.context_length") if arch else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def quantization(self) -> str:
        """The ``general.file_type`` name (``Q4_K_M``), else the type holding most weight elements."""
        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int) and not isinstance(file_type, bool):
            name = _file_type_name(file_type)
            for prefix in _FILE_TYPE_PREFIXES:
                name = name.removeprefix(prefix)
            if name:
                return name
        # Norms and biases stay F32 in every quantization, so only matrices say how the model was quantized.
        weights = [t for t in self.tensors if len(t.shape) >= 2] or list(self.tensors)
        if not weights:
            return "unknown"
        elements: dict[str, int] = {}
        for tensor in weights:
            elements[tensor.type_name] = elements.get(tensor.type_name, 0) + tensor.n_elements
        return max(sorted(elements), key=lambda name: elements[name])

    @property
    def chat_template(self) -> str | None:
        return self._str("tokenizer.chat_template")

    @property
    def named_chat_templates(self) -> dict[str, str]:
        return named_chat_templates(self.metadata)

    def _str(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------------- parsing


MAX_ARRAY_DEPTH: Final = 16
"""Arrays nest at most this deep. Real files nest one level (token merges); a bound keeps a crafted file from
exhausting the stack."""


def _walk_items(
    buf: Any, start: int, *, item_type: int, count: int, order: str, limit: int, depth: int = 1
) -> tuple[npt.NDArray[np.int64], int]:
    """Offsets (relative to ``start``) of ``count`` strings or nested arrays, and the end offset.

    Raises :class:`_Overrun` with the offending offset when an item runs past ``limit``, and
    :class:`_TooDeep` when arrays nest deeper than :data:`MAX_ARRAY_DEPTH`.
    """
    if item_type == _STRING and count >= _VECTOR_WALK_MIN:
        fast = _walk_strings_vectorised(buf, start, count, order, limit)
        if fast is not None:
            return fast
    offsets = np.empty(count, dtype=np.int64)
    pos = start
    unpack = struct.unpack_from
    if item_type == _STRING:
        fmt = order + "Q"
        for i in range(count):
            if pos + 8 > limit:
                raise _Overrun(pos, i)
            offsets[i] = pos - start
            (length,) = unpack(fmt, buf, pos)
            if pos + 8 + length > limit:
                raise _Overrun(pos, i, length)
            pos += 8 + length
        return offsets, pos
    fmt = order + "IQ"
    for i in range(count):
        if pos + 12 > limit:
            raise _Overrun(pos, i)
        offsets[i] = pos - start
        sub_type, sub_count = unpack(fmt, buf, pos)
        if depth >= MAX_ARRAY_DEPTH:
            raise _TooDeep(pos)
        pos = _skip_array_items(
            buf, pos + 12, item_type=sub_type, count=sub_count, order=order, limit=limit, index=i, depth=depth
        )
    return offsets, pos


def _skip_array_items(
    buf: Any, pos: int, *, item_type: int, count: int, order: str, limit: int, index: int, depth: int
) -> int:
    size = _SCALAR_SIZES.get(item_type)
    if size is not None:
        if count * size > limit - pos:
            raise _Overrun(pos, index, count * size)
        return pos + count * size
    if item_type == _STRING:
        minimum = _MIN_STRING
    elif item_type == _ARRAY:
        minimum = _MIN_ARRAY
    else:
        raise _BadType(pos - 12, item_type)
    if count * minimum > limit - pos:
        raise _Overrun(pos, index, count * minimum)
    _, end = _walk_items(
        buf, pos, item_type=item_type, count=count, order=order, limit=limit, depth=depth + 1
    )
    return end


def _walk_strings_vectorised(
    buf: Any, start: int, count: int, order: str, limit: int
) -> tuple[npt.NDArray[np.int64], int] | None:
    """Find string starts without a Python loop, or ``None`` when the shortcut does not apply.

    A token is short, so its u64 length is one non-zero low byte and seven zero bytes. Every position with
    that shape is a candidate; the candidates are accepted only if they form exactly the chain
    ``start, start + 8 + len, ...`` of ``count`` strings, which proves them right. Otherwise (an empty or a
    256-byte token, or stray zero bytes) the caller walks the strings one by one. The region is scanned in
    growing chunks because the array's end is not known yet.
    """
    available = limit - start
    found = _candidates(buf, start, count, order, available)
    n_found = sum(len(f) for f in found)
    if n_found < count:
        _raise_if_cut_short(buf, start, found, order, available)
        return None
    starts = np.concatenate(found)[:count] if len(found) > 1 else found[0][:count]
    if starts[0] != 0:
        return None
    low_byte = 0 if order == "<" else 7
    lengths = np.frombuffer(buf, dtype=np.uint8, count=available, offset=start)[starts + low_byte]
    ends = starts + 8 + lengths.astype(np.int64)
    if not np.array_equal(ends[:-1], starts[1:]) or ends[-1] > available:
        return None
    return starts, start + int(ends[-1])


def _candidates(buf: Any, start: int, count: int, order: str, available: int) -> list[npt.NDArray[np.int64]]:
    """Offsets of every position shaped like a short string's length prefix, in growing chunks.

    Its own function so that the numpy views of ``buf`` die with its frame: a traceback that kept them alive
    would stop the file's map from closing.
    """
    found: list[npt.NDArray[np.int64]] = []
    n_found = 0
    low = 0
    while n_found < count and low < available - 7:
        # Twelve bytes a token is a typical average; later chunks size themselves on what is left.
        high = min(available - 7, low + max(4096, (count - n_found) * 12))
        mask = np.zeros(high - low, dtype=bool)
        for shift in range(8):
            words = (high - low - shift + 7) // 8
            if words <= 0:
                continue
            word = np.frombuffer(buf, dtype=order + "u8", count=words, offset=start + low + shift)
            # One unsigned comparison: zero wraps round to the largest value, so only 1..255 pass.
            mask[shift::8] = (word - np.uint64(1)) < np.uint64(255)
        found.append(np.flatnonzero(mask) + low)
        n_found += len(found[-1])
        low = high
    return found


def _raise_if_cut_short(
    buf: Any, start: int, found: list[npt.NDArray[np.int64]], order: str, available: int
) -> None:
    """Raise :class:`_Overrun` when the strings found form one chain that runs past the end of the bytes.

    That is a prefix of a file (a remote header read in ranges) or a truncated one; finding it here spares the
    one-by-one walk. Anything else (a gap in the chain: an empty or a long token) is left to that walk.
    """
    if not found or not sum(len(f) for f in found):
        return
    starts = np.concatenate(found)
    if starts[0] != 0:
        return
    low_byte = 0 if order == "<" else 7
    lengths = np.frombuffer(buf, dtype=np.uint8, count=available, offset=start)[starts + low_byte].astype(
        np.int64
    )
    ends = starts + 8 + lengths
    if not np.array_equal(ends[:-1], starts[1:]):
        return
    last = int(ends[-1])
    if last > available:
        raise _Overrun(start + int(starts[-1]), len(starts) - 1, int(lengths[-1]))
    if last + 8 > available:
        raise _Overrun(start + last, len(starts))


class _Overrun(Exception):  # noqa: N818 -- Internal signal, converted to a GGUFError with context.
    def __init__(self, pos: int, index: int, needed: int = 0) -> None:
        super().__init__(pos)
        self.pos = pos
        self.index = index
        self.needed = needed


class _TooDeep(Exception):  # noqa: N818 -- Internal signal, converted to a GGUFError with context.
    def __init__(self, pos: int) -> None:
        super().__init__(pos)
        self.pos = pos


class _BadType(Exception):  # noqa: N818 -- Internal signal, converted to a GGUFError with context.
    def __init__(self, pos: int, value_type: int) -> None:
        super().__init__(pos)
        self.pos = pos
        self.value_type = value_type


@dataclass(frozen=True)
class _ArraySpan:
    """An array found while parsing: where its items lie, converted to a :class:`GGUFArray` at the end."""

    item_type: int
    count: int
    start: int
    end: int
    offsets: npt.NDArray[np.int64] | None

    def __repr__(self) -> str:
        return f"an array of {self.count} {_plural(self.item_type)}"


@dataclass(frozen=True)
class _Part:
    version: int
    byte_order: Literal["little", "big"]
    alignment: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int


_INCOMPLETE = "the file is incomplete, download it again"
_CORRUPT = "the file is corrupt or not a GGUF file, download it again"


class HeaderIncomplete(Exception):  # noqa: N818 -- A signal to the caller, not an error.
    """The buffer ended inside the header but the file goes on: read more of it (``at_least`` bytes) and retry.

    Raised only by :func:`parse_gguf_header`, whose buffer is a prefix of a remote file.
    """

    def __init__(self, at_least: int) -> None:
        super().__init__(at_least)
        self.at_least = at_least
        self.part = 0


class _Parser:
    def __init__(self, buf: Any, size: int, display: str, file_size: int | None = None) -> None:
        self.buf = buf
        self.size = size  # The bytes in ``buf``: a whole file, or a prefix of one (``file_size`` long).
        self.file_size = size if file_size is None else file_size
        self.display = display
        self.pos = 0
        self.order = "<"
        self.data_start = 0

    # ---- errors

    def truncated(self, what: str, needed: int = 0) -> GGUFError | HeaderIncomplete:
        if self.size < self.file_size:
            return HeaderIncomplete(min(self.file_size, max(self.pos + needed, self.size + 1)))
        return GGUFError(
            f"{self.display}: truncated at byte {self.size} while reading {what}", hint=_INCOMPLETE
        )

    def corrupt(self, message: str, hint: str = _CORRUPT) -> GGUFError:
        return GGUFError(f"{self.display}: {message}", hint=hint)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.truncated(what, n)

    def check_count(
        self, count: int, minimum: int, what: str, unit: str, *, at: int, reading: str | None = None
    ) -> None:
        """Reject a count whose smallest encoding cannot fit, before anything is walked or allocated."""
        needed = count * minimum
        if needed <= self.size - self.pos:
            return
        if needed > self.file_size:
            least = "" if minimum == 1 else f", which need at least {needed} bytes,"
            raise self.corrupt(
                f"{what} at byte {at} declares {count} {unit}{least} but the whole file has {self.file_size} bytes"
            )
        raise self.truncated(reading or f"{what} ({count} {unit})", needed)

    # ---- primitives

    def unpack(self, code: str, size: int, what: str) -> Any:
        self.need(size, what)
        value = struct.unpack_from(self.order + code, self.buf, self.pos)[0]
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        value: int = self.unpack("I", 4, what)
        return value

    def u64(self, what: str) -> int:
        value: int = self.unpack("Q", 8, what)
        return value

    def string(self, what: str) -> str:
        at = self.pos
        length = self.u64(what)
        self.check_count(length, 1, what, "bytes", at=at)
        raw = self.buf[self.pos : self.pos + length]
        try:
            text: str = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.corrupt(
                f"{what} at byte {at} is not valid UTF-8 ({exc.reason} at byte {self.pos + exc.start})"
            ) from None
        self.pos += length
        return text

    # ---- header

    def header(self) -> tuple[int, int, int]:
        self.need(4, "the magic number")
        magic = bytes(self.buf[0:4])
        if magic != GGUF_MAGIC:
            raise self.corrupt(
                f"not a GGUF file: the magic number at byte 0 is {magic!r}, expected b'GGUF'",
                hint="check that the path points at a .gguf model and not an HTML page or a safetensors file",
            )
        self.pos = 4
        self.need(4, "the version")
        (version,) = struct.unpack_from("<I", self.buf, 4)
        # A big-endian file stores a small version number byte-swapped, so its low half is zero.
        if version & 0xFFFF == 0 and version != 0:
            self.order = ">"
            (version,) = struct.unpack_from(">I", self.buf, 4)
        self.pos = 8
        if version == 1:
            raise self.corrupt(
                "GGUF version 1 is not supported (it predates August 2023)",
                hint="convert the model again with a current llama.cpp",
            )
        if version not in SUPPORTED_VERSIONS:
            raise self.corrupt(
                f"unsupported GGUF version {version} at byte 4 (stacklock reads versions 2 and 3)",
                hint="upgrade stacklock, or check that the file is a GGUF model",
            )
        n_tensors = self.u64("the tensor count")
        n_kv = self.u64("the metadata entry count")
        return version, n_tensors, n_kv

    # ---- metadata

    def metadata(self, n_kv: int) -> dict[str, Any]:
        self.check_count(
            n_kv,
            _MIN_KV,
            "the metadata entry count",
            "entries",
            at=16,
            reading=f"the metadata ({n_kv} entries)",
        )
        metadata: dict[str, Any] = {}
        key_offsets: dict[str, int] = {}
        for i in range(n_kv):
            at = self.pos
            key = self.string(f"the key of metadata entry {i + 1} of {n_kv}")
            if key in metadata:
                raise self.corrupt(
                    f"duplicate metadata key '{key}' at byte {at} (first at byte {key_offsets[key]})",
                    hint="the file is corrupt, convert the model again",
                )
            key_offsets[key] = at
            value_type = self.u32(f"the value type of '{key}'")
            metadata[key] = self.value(key, value_type)
        return metadata

    def value(self, key: str, value_type: int) -> Any:
        what = f"the value of '{key}'"
        code = _SCALAR_CODES.get(value_type)
        if code is not None:
            return self.unpack(code, _SCALAR_SIZES[value_type], what)
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            return self.array(key, what)
        raise self.corrupt(
            f"unknown value type {value_type} for '{key}' at byte {self.pos - 4}",
            hint="the file is corrupt or was written by a newer GGUF version; upgrade stacklock",
        )

    def array(self, key: str, what: str) -> _ArraySpan:
        type_at = self.pos
        item_type = self.u32(f"the item type of '{key}'")
        count = self.u64(f"the item count of '{key}'")
        unit = _plural(item_type)
        size = _SCALAR_SIZES.get(item_type)
        if size is None and item_type not in (_STRING, _ARRAY):
            raise self.corrupt(
                f"unknown item type {item_type} in the array '{key}' at byte {type_at}",
                hint="the file is corrupt or was written by a newer GGUF version; upgrade stacklock",
            )
        minimum = size if size is not None else (_MIN_STRING if item_type == _STRING else _MIN_ARRAY)
        described = f"{what} (array of {count} {unit})"
        self.check_count(count, minimum, what, unit, at=type_at, reading=described)
        start = self.pos
        if size is not None:
            self.pos += count * size
            return _ArraySpan(item_type, count, start, self.pos, None)
        try:
            offsets, end = _walk_items(
                self.buf, start, item_type=item_type, count=count, order=self.order, limit=self.size
            )
        except _Overrun as exc:
            if exc.needed > self.file_size:
                raise self.corrupt(
                    f"item {exc.index} of '{key}' at byte {exc.pos} declares {exc.needed} bytes, "
                    f"but the whole file has {self.file_size} bytes"
                ) from None
            # A prefix of a remote file: guess the array's end from the items walked so far, so that the
            # caller asks for the rest in one more read rather than many.
            guess = (exc.pos - start) * count // exc.index - (exc.pos - start) if exc.index else 0
            self.pos = exc.pos
            raise self.truncated(described, max(8 + exc.needed, guess)) from None
        except _TooDeep as exc:
            raise self.corrupt(
                f"'{key}' nests arrays more than {MAX_ARRAY_DEPTH} levels deep (at byte {exc.pos})"
            ) from None
        except _BadType as exc:
            raise self.corrupt(
                f"unknown item type {exc.value_type} in a nested array of '{key}' at byte {exc.pos}",
                hint="the file is corrupt or was written by a newer GGUF version; upgrade stacklock",
            ) from None
        if item_type == _STRING:
            self.check_strings_utf8(key, start, end, offsets)
        self.pos = end
        return _ArraySpan(item_type, count, start, end, offsets)

    def check_strings_utf8(self, key: str, start: int, end: int, offsets: npt.NDArray[np.int64]) -> None:
        """Validate every string of an array at once, without a Python object per string.

        The length prefixes are zeroed in a copy so that they read as ASCII and keep the strings apart; the
        copy is then decoded in cache-sized chunks cut where no multi-byte character can straddle the cut.
        """
        data = np.frombuffer(self.buf, dtype=np.uint8, count=end - start, offset=start).copy()
        lengths = np.diff(offsets, append=end - start) - 8
        data[offsets + (0 if self.order == "<" else 7)] = 0
        # Only a length of 256 bytes or more has a second non-zero prefix byte; such tokens are rare.
        long_items = offsets[lengths >= 256]
        if len(long_items):
            data[(long_items[:, None] + np.arange(8, dtype=np.int64)).ravel()] = 0
        view = data.data
        size = len(data)
        low = 0
        while low < size:
            high = min(size, low + _UTF8_CHUNK)
            while low < high < size and view[high] & 0xC0 == 0x80:
                high -= 1
            if high == low:
                high = min(size, low + _UTF8_CHUNK)
            try:
                str(view[low:high], "utf-8")
            except UnicodeDecodeError as exc:
                bad = low + exc.start
                index = int(np.searchsorted(offsets, bad, side="right")) - 1
                raise self.corrupt(
                    f"item {index} of '{key}' at byte {start + int(offsets[index])} is not valid UTF-8 "
                    f"({exc.reason} at byte {start + bad})"
                ) from None
            low = high

    # ---- tensors

    def tensor_infos(self, n_tensors: int, alignment: int, part: int) -> list[TensorInfo]:
        self.check_count(
            n_tensors,
            _MIN_TENSOR_INFO,
            "the tensor count",
            "tensors",
            at=8,
            reading=f"the tensor infos ({n_tensors} tensors)",
        )
        raw: list[tuple[str, tuple[int, ...], int, str, int, int, int]] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            at = self.pos
            name = self.string(f"the name of tensor {i + 1} of {n_tensors}")
            if name in seen:
                raise self.corrupt(
                    f"duplicate tensor name '{name}' at byte {at}",
                    hint="the file is corrupt, convert it again",
                )
            seen.add(name)
            label = f"tensor '{name}'"
            n_dims = self.u32(f"the dimension count of {label}")
            if n_dims > GGML_MAX_DIMS:
                raise self.corrupt(
                    f"{label} at byte {at} has {n_dims} dimensions, "
                    f"more than GGML's maximum of {GGML_MAX_DIMS}"
                )
            shape = tuple(self.u64(f"the shape of {label}") for _ in range(n_dims))
            type_at = self.pos
            ggml_type = self.u32(f"the type of {label}")
            try:
                type_name, block, type_size = _quant_sizes(ggml_type)
            except KeyError:
                raise self.corrupt(
                    f"{label} has unknown ggml type {ggml_type} at byte {type_at}",
                    hint="the file is corrupt or needs a newer gguf package; upgrade stacklock and gguf",
                ) from None
            offset = self.u64(f"the data offset of {label}")
            n_elements = 1
            for dim in shape:
                n_elements *= dim
            if shape and shape[0] % block:
                raise self.corrupt(
                    f"{label} at byte {at} has a first dimension of {shape[0]}, "
                    f"not a multiple of the {type_name} block size {block}"
                )
            if offset % alignment:
                raise self.corrupt(
                    f"{label} at byte {at} has data offset {offset}, "
                    f"not a multiple of the alignment {alignment}"
                )
            raw.append(
                (name, shape, ggml_type, type_name, offset, n_elements, n_elements // block * type_size)
            )
        data_start = -(-self.pos // alignment) * alignment
        self.data_start = data_start
        tensors = []
        for name, shape, ggml_type, type_name, offset, n_elements, n_bytes in raw:
            if data_start + offset + n_bytes > self.file_size:
                begin = data_start + offset
                raise self.truncated(f"the data of tensor '{name}' (bytes {begin} to {begin + n_bytes})")
            tensors.append(
                TensorInfo(
                    name, shape, ggml_type, type_name, offset, n_elements, n_bytes, part, data_start + offset
                )
            )
        return tensors

    def alignment(self, metadata: dict[str, Any]) -> int:
        value = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value & (value - 1):
            raise self.corrupt(
                f"'general.alignment' is {value!r}, expected a power of two", hint="the file is corrupt"
            )
        return value


def _finish_metadata(
    metadata: dict[str, Any], header: bytes, order: Literal["little", "big"]
) -> dict[str, Any]:
    view = memoryview(header)
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, _ArraySpan):
            array = GGUFArray(value.item_type, value.count, view[value.start : value.end], order)
            if value.offsets is not None:
                array._cache["offsets"] = value.offsets
            out[key] = array
        else:
            out[key] = value
    return out


def _read_part(path: Path, display: str, part: int) -> _Part:
    try:
        # Non-blocking: a FIFO cannot hang the open; fstat then refuses anything but a regular file.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise GGUFError(f"{display}: not a regular file", hint="give the path of a .gguf file")
            size = info.st_size
            if size == 0:
                raise GGUFError(f"{display}: the file is empty", hint=_INCOMPLETE)
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_part(_Parser(buf, size, display), part)
    except (OSError, ValueError) as exc:
        # ValueError: a NUL byte in the path, or mmap of a file that shrank to nothing meanwhile.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise GGUFError(f"{display}: cannot read the file ({reason})", hint="check the path") from None


def _parse_part(parser: _Parser, part: int) -> _Part:
    version, n_tensors, n_kv = parser.header()
    metadata = parser.metadata(n_kv)
    alignment = parser.alignment(metadata)
    tensors = parser.tensor_infos(n_tensors, alignment, part)
    # Copying the header out lets a map close; array values then point into this copy.
    header = bytes(parser.buf[: parser.pos])
    order: Literal["little", "big"] = "little" if parser.order == "<" else "big"
    return _Part(
        version, order, alignment, _finish_metadata(metadata, header, order), tensors, parser.data_start
    )


@dataclass(frozen=True)
class HeaderBytes:
    """The first bytes of one part of a GGUF file held elsewhere (a hub): enough for its header, or not yet."""

    name: str
    """The part's file name (``NAME-00001-of-00003.gguf`` for split files)."""
    data: bytes
    """A prefix of the file."""
    file_size: int
    """The whole file's size."""
    display: str
    """How errors name the file (its hub location)."""


def parse_gguf_header(parts: Sequence[HeaderBytes]) -> GGUFFile:
    """Parse the headers of a GGUF model's parts from prefixes of the files; pure.

    Raises :class:`HeaderIncomplete` (with the part's index in ``part``) when a prefix ends inside its header.
    """
    parsed = []
    for index, item in enumerate(parts):
        if item.file_size == 0:
            raise GGUFError(f"{item.display}: the file is empty", hint=_INCOMPLETE)
        try:
            parsed.append(
                _parse_part(_Parser(item.data, len(item.data), item.display, item.file_size), index)
            )
        except HeaderIncomplete as exc:
            exc.part = index
            raise
    names = tuple(Path(item.name) for item in parts)
    displays = tuple(item.display for item in parts)
    return _combine(names[0], displays[0], names, displays, parsed)


def _split_parts(path: Path, display: str) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    match = _SPLIT_NAME.match(path.name)
    if match is None:
        return (path,), (display,)
    count = int(match["count"])
    if count == 0 or int(match["no"]) > count:
        raise GGUFError(
            f"{display}: the name says part {int(match['no'])} of {count}",
            hint="rename the file to NAME-00001-of-00003.gguf style with a valid part number",
        )
    paths = tuple(path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1))
    displays = tuple(display if p == path else os.fspath(p) for p in paths)
    for i, (part, shown) in enumerate(zip(paths, displays, strict=True), start=1):
        if not part.exists():
            raise GGUFError(
                f"{display}: split part {i} of {count} is missing: {shown}",
                hint="download every part into the same folder",
            )
    return paths, displays


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Read the header of a GGUF model, with every part of a split model (``NAME-00001-of-00003.gguf``)."""
    display = os.fspath(path)
    given = Path(path)
    paths, displays = _split_parts(given, display)
    parts = [_read_part(p, shown, i) for i, (p, shown) in enumerate(zip(paths, displays, strict=True))]
    return _combine(given, display, paths, displays, parts)


def _combine(
    given: Path, display: str, paths: tuple[Path, ...], displays: tuple[str, ...], parts: Sequence[_Part]
) -> GGUFFile:
    """One model from its parts: metadata from the first, tensors from all, checked to belong together."""
    first = parts[0]
    count = len(parts)
    tensors: list[TensorInfo] = []
    names: dict[str, str] = {}
    for i, (part, shown) in enumerate(zip(parts, displays, strict=True)):
        split_count = part.metadata.get("split.count")
        split_no = part.metadata.get("split.no")
        if count == 1:
            if isinstance(split_count, int) and split_count > 1:
                raise GGUFError(
                    f"{shown}: 'split.count' is {split_count} but the file name has no "
                    f"-00001-of-{split_count:05d} part number",
                    hint="keep the split parts' original names so that every part can be found",
                )
        elif split_count != count or split_no != i:
            raise GGUFError(
                f"{shown}: the name says part {i + 1} of {count} but the file says 'split.no' {split_no!r} "
                f"of 'split.count' {split_count!r}",
                hint="the parts belong to different models; download every part of one model again",
            )
        if part.byte_order != first.byte_order:
            raise GGUFError(
                f"{shown}: the part is {part.byte_order}-endian but part 1 is {first.byte_order}-endian",
                hint="download every part of one model again",
            )
        for tensor in part.tensors:
            if tensor.name in names:
                raise GGUFError(
                    f"{shown}: tensor '{tensor.name}' also appears in {names[tensor.name]}",
                    hint="the parts belong to different models; download every part of one model again",
                )
            names[tensor.name] = shown
            tensors.append(tensor)
    expected = first.metadata.get("split.tensors.count")
    if count > 1 and isinstance(expected, int) and expected != len(tensors):
        raise GGUFError(
            f"{display}: 'split.tensors.count' is {expected} "
            f"but the {count} parts hold {len(tensors)} tensors",
            hint="download every part of one model again",
        )
    return GGUFFile(
        path=given,
        parts=paths,
        version=first.version,
        byte_order=first.byte_order,
        alignment=first.alignment,
        metadata=MappingProxyType(first.metadata),
        tensors=tuple(tensors),
        data_offset=first.data_offset,
    )
