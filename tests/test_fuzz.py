"""Property-based tests (hypothesis) for the GGUF reader, the manifest and lock parsers and the template
renderer, and a bounded run of the atheris fuzz target for the GGUF reader. Example counts are bounded so the
suite stays fast; any exception other than stacklock's own is a failure."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stacklock.errors import GGUFError, LockError, ManifestError, TemplateError
from stacklock.gguf.header import header_from_gguf
from stacklock.gguf.reader import read_gguf
from stacklock.model.lock import parse_lock
from stacklock.model.manifest import parse_manifest
from stacklock.template.sandbox import render_chat_template
from tests.conftest import CHATML
from tests.gguf_builder import build_tiny_gguf
from tests.hardening_cases import manifest

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    build_tiny_gguf(path, chat_template=CHATML, n_layer=1, n_embd=32, n_ff=32)
    return path.read_bytes()


def _mutated(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for at, value in edits:
        out[at % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


@SETTINGS
@given(
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 1 << 16)),
)
def test_the_gguf_reader_parses_or_raises_gguf_error(
    tiny_bytes: bytes, tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[int, int]], cut: int | None
) -> None:
    path = tmp_path_factory.mktemp("mutant") / "m.gguf"
    path.write_bytes(_mutated(tiny_bytes, edits, cut))
    failure = ""
    try:
        header_from_gguf(read_gguf(path))
    except GGUFError as exc:
        failure = str(exc)
    assert "\n" not in failure


_TOML_PIECES = st.sampled_from(
    [
        "[",
        "]",
        "{",
        "}",
        "=",
        '"',
        "'",
        "\n",
        "#",
        ",",
        ".",
        "x",
        "1",
        "nan",
        "inf",
        "-",
        "[[smoke]]",
        "\\u0000",
    ]
)


@SETTINGS
@given(
    line=st.integers(0, 40),
    junk=st.lists(_TOML_PIECES, max_size=30).map("".join),
)
def test_the_manifest_parser_accepts_or_raises_manifest_error(line: int, junk: str) -> None:
    lines = manifest().splitlines()
    lines.insert(line % (len(lines) + 1), junk)
    failure = ""
    try:
        parse_manifest("\n".join(lines))
    except ManifestError as exc:
        failure = str(exc)
    assert "\n" not in failure


@SETTINGS
@given(
    position=st.integers(0, 1 << 20),
    junk=st.lists(_TOML_PIECES, max_size=20).map("".join),
)
def test_the_lock_parser_accepts_or_raises_lock_error(position: int, junk: str) -> None:
    text = (ROOT / "examples" / "gemma3-270m" / "llmstack.lock").read_text(encoding="utf-8")
    at = position % len(text)
    failure = ""
    try:
        parse_lock(text[:at] + junk + text[at:])
    except LockError as exc:
        failure = str(exc)
    assert "\n" not in failure


_JINJA_PIECES = st.sampled_from(
    [
        "{{ ",
        " }}",
        "{% for m in messages %}",
        "{% endfor %}",
        "{% if ",
        "{% endif %}",
        "{% set x = ",
        " %}",
        "m['content']",
        "messages",
        "|join",
        "|wordwrap(1)",
        " * 1000",
        "(",
        ")",
        "[",
        "]",
        "'{0:{1}}'.format('a', '99999999')",
        "range(100000)",
        "loop.index",
        "x",
        "1",
        " + ",
        "raise_exception('no')",
        "{% break %}",
        "{% generation %}",
        "{% endgeneration %}",
    ]
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_JINJA_PIECES, max_size=12).map("".join))
def test_the_template_renderer_renders_or_raises_template_error(template: str) -> None:
    try:
        out = render_chat_template(
            template,
            [{"role": "user", "content": "hi"}],
            add_generation_prompt=True,
            bos_token="<s>",
            eos_token="</s>",
            now=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        )
    except TemplateError as exc:
        failure = str(exc)
        assert "\n" not in failure
        return
    assert isinstance(out, str)


FUZZ_SECONDS = int(os.environ.get("STACKLOCK_FUZZ_SECONDS", "20"))


def test_the_gguf_fuzz_target_finds_no_crash(tiny_bytes: bytes, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "tiny.gguf").write_bytes(tiny_bytes)
    (corpus / "head.gguf").write_bytes(tiny_bytes[:4096])
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "fuzz" / "fuzz_gguf.py"),
            f"-max_total_time={FUZZ_SECONDS}",
            "-max_len=8192",
            "-rss_limit_mb=1024",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done" in done.stderr
