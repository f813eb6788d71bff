"""A coverage-guided fuzz target for the GGUF reader (atheris/libFuzzer).

Every input must either parse or raise :class:`~stacklock.errors.GGUFError`; anything else is a crash that
libFuzzer reports with the input that caused it. Run: ``python tests/fuzz/fuzz_gguf.py -max_total_time=30``
(``tests/test_fuzz.py`` does, seeded with tiny models).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports():
    from stacklock.errors import GGUFError
    from stacklock.gguf.header import header_from_gguf
    from stacklock.gguf.reader import read_gguf

_PATH = Path(tempfile.mkdtemp(prefix="fuzz-gguf-")) / "model.gguf"


def test_one_input(data: bytes) -> None:
    _PATH.write_bytes(data)
    with contextlib.suppress(GGUFError):
        header_from_gguf(read_gguf(_PATH))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
