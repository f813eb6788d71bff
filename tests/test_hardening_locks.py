"""Regression tests for the lock-side gaps of issue 13 item 2: a lock stacklock writes always reads back (a GGUF
without tensors, NaN metadata, every control character in a text), and writing one is linear in its size."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from stacklock.model.lock import parse_lock, render_lock
from stacklock.model.toml import escape_basic_string
from tests.hardening_cases import _NAN, _locked, _model, _zero_tensors, measure


@pytest.mark.parametrize(
    "setup",
    [_zero_tensors, lambda p: _model(p, extra_metadata={"llama.attention.layer_norm_rms_epsilon": _NAN})],
    ids=["zero-tensors", "nan-metadata"],
)
def test_a_lock_written_for_an_odd_gguf_is_fresh_at_once(
    setup: Callable[[Path], None], tmp_path: Path
) -> None:
    setup(tmp_path)
    assert measure(("lock",), tmp_path).code == 0
    check = measure(("lock", "--check"), tmp_path)
    assert check.code == 0, check.stderr
    assert check.stderr.splitlines()[-1].startswith("llmstack.lock is fresh")


def test_every_character_of_a_text_reads_back(tmp_path: Path) -> None:
    lock = parse_lock(_locked(tmp_path).read_text())
    text = "".join(chr(c) for c in range(128)) + '"""' + '""""' + "\r\n\\u0000 é 𝄞\n" + '"'
    edited = lock.model_copy(
        update={
            "template": lock.template.model_copy(update={"text": text}),
            "stack": lock.stack.model_copy(update={"description": text.replace("\n", "")}),
        }
    )
    back = parse_lock(render_lock(edited))
    # A lone carriage return used to be written raw into the multiline string, and read back as a newline.
    assert back.template.text == text
    assert back.stack.description == text.replace("\n", "")


def test_escaping_matches_tomlkit_and_is_linear() -> None:
    import tomlkit  # noqa: PLC0415

    sample = 'tab\there \\ "q" """ """" \x1b \x00 \x7f \b\f end'
    for multiline in (False, True):
        quote = '"""' if multiline else '"'
        escaped = escape_basic_string(sample, multiline=multiline)
        assert tomlkit.string(sample, multiline=multiline).as_string() == f"{quote}{escaped}{quote}"
    # The same escapes, as one substitution over the text: 4 MiB of tabs and NULs is one pass, not 4M slices.
    big = "a\t\x00\n" * (1 << 20)
    assert escape_basic_string(big, multiline=True) == "a\\t\\u0000\n" * (1 << 20)
