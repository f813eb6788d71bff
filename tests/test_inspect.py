"""`stacklock inspect`, text and --json, through the real entry point on tiny GGUF files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from stacklock.cli.inspect import NO_TEMPLATE, inspect_gguf, render_inspection
from stacklock.gguf.reader import read_gguf
from tests.conftest import CHATML, Result, run_fresh
from tests.gguf_builder import RawGGUF, build_tiny_gguf

Cli = Callable[..., Result]

TOOL_TEMPLATE = "{% for tool in tools %}{{ tool }}{% endfor %}"
RAG_TEMPLATE = "{{ documents | length }}"


@pytest.fixture
def templated(tmp_path: Path) -> Path:
    return build_tiny_gguf(
        tmp_path / "tiny.gguf",
        chat_template=CHATML,
        named_templates={"tool_use": TOOL_TEMPLATE, "rag": RAG_TEMPLATE},
        extra_metadata={"general.name": "Tiny Chat"},
        context_length=512,
        eot_id=None,
    )


def test_json_key_fields(templated: Path, cli: Cli) -> None:
    result = cli("inspect", "tiny.gguf", "--json", cwd=templated.parent)
    assert (result.code, result.err) == (0, "")
    report = json.loads(result.out)
    expected_tokens = read_gguf(templated).metadata["tokenizer.ggml.tokens"]
    assert {k: report[k] for k in ("path", "parts", "gguf-version", "architecture", "name")} == {
        "path": "tiny.gguf",
        "parts": ["tiny.gguf"],
        "gguf-version": 3,
        "architecture": "llama",
        "name": "Tiny Chat",
    }
    assert report["quantization"] == "F32"
    assert report["tensor-types"] == {"F32": 21}
    assert report["context-length"] == 512
    assert report["parameter-count"] == sum(t.n_elements for t in read_gguf(templated).tensors)
    assert report["chat-template"] == CHATML
    assert report["named-chat-templates"] == {"rag": RAG_TEMPLATE, "tool_use": TOOL_TEMPLATE}
    tokenizer = report["tokenizer"]
    assert (tokenizer["kind"], tokenizer["vocab-size"]) == ("llama", expected_tokens.count)
    assert (tokenizer["bos-id"], tokenizer["bos-text"], tokenizer["eos-id"], tokenizer["eos-text"]) == (
        1,
        "<s>",
        2,
        "</s>",
    )
    assert (tokenizer["add-bos"], tokenizer["add-eos"]) == (True, False)
    # Scalars appear as values, arrays as a type and a count; templates only under their own keys.
    assert report["metadata"]["llama.context_length"] == 512
    assert report["metadata"]["tokenizer.ggml.model"] == "llama"
    assert report["metadata"]["tokenizer.ggml.tokens"] == f"<string[{expected_tokens.count}]>"
    assert report["metadata"]["tokenizer.ggml.scores"] == f"<float32[{expected_tokens.count}]>"
    assert not [key for key in report["metadata"] if key.startswith("tokenizer.chat_template")]
    assert list(report["metadata"]) == sorted(report["metadata"])


def test_json_is_the_library_report(templated: Path, cli: Cli) -> None:
    result = cli("inspect", str(templated), "--json", cwd=templated.parent)
    assert json.loads(result.out) == inspect_gguf(templated)
    # Same input, same bytes: scripts may diff the output.
    assert cli("inspect", str(templated), "--json", cwd=templated.parent).out == result.out


def test_text_key_fields(templated: Path, cli: Cli) -> None:
    result = cli("inspect", "tiny.gguf", cwd=templated.parent)
    assert (result.code, result.err) == (0, "")
    lines = result.out.splitlines()
    tokens_sha = inspect_gguf(templated)["tokenizer"]["tokens-sha256"]
    vocab = read_gguf(templated).metadata["tokenizer.ggml.tokens"].count
    assert lines[:12] == [
        "file          tiny.gguf",
        "gguf version  3",
        "architecture  llama",
        "name          Tiny Chat",
        f"parameters    {inspect_gguf(templated)['parameter-count']:,}",
        "quantization  F32",
        "tensor types  F32 x21",
        "context       512",
        "tokenizer     llama",
        f"  vocabulary  {vocab:,} tokens, sha256 {tokens_sha[:16]}…",
        "  bos / eos   1 '<s>' / 2 '</s>'",
        "  add-bos True, add-eos False, add-space-prefix None",
    ]
    template_at = lines.index("chat template")
    assert lines[template_at + 1 : template_at + 3] == [
        "  {% for m in messages %}<|im_start|>{{ m['role'] }}",
        "  {{ m['content'] }}<|im_end|>",
    ]
    # Named templates follow, sorted by name, each indented under its own heading.
    rag_at = lines.index("chat template 'rag'")
    tool_at = lines.index("chat template 'tool_use'")
    assert template_at < rag_at < tool_at
    assert lines[rag_at + 1] == f"  {RAG_TEMPLATE}"
    assert lines[tool_at + 1] == f"  {TOOL_TEMPLATE}"
    assert "  llama.context_length = 512" in lines
    assert "  general.name = 'Tiny Chat'" in lines
    assert "no chat template" not in result.out


def test_no_chat_template_is_said_plainly(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "bare.gguf")
    text = cli("inspect", "bare.gguf", cwd=tmp_path)
    assert text.code == 0
    assert f"chat template none: {NO_TEMPLATE}" in text.out.splitlines()
    assert NO_TEMPLATE.startswith("this GGUF carries no chat template (tokenizer.chat_template is absent)")
    report = json.loads(cli("inspect", "bare.gguf", "--json", cwd=tmp_path).out)
    assert (report["chat-template"], report["named-chat-templates"]) == (None, {})


def test_a_file_without_a_tokenizer(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "weights.gguf", tokenizer=None, name=None)
    result = cli("inspect", "weights.gguf", cwd=tmp_path)
    assert result.code == 0
    assert "tokenizer     none in this file" in result.out.splitlines()
    assert "name          (not set)" in result.out.splitlines()
    assert json.loads(cli("inspect", "weights.gguf", "--json", cwd=tmp_path).out)["tokenizer"] is None


def test_split_model(tmp_path: Path, cli: Cli) -> None:
    for folder in ("whole", "split"):
        (tmp_path / folder).mkdir()
    whole = build_tiny_gguf(tmp_path / "whole" / "tiny.gguf", chat_template=CHATML)
    first = build_tiny_gguf(tmp_path / "split" / "tiny.gguf", chat_template=CHATML, split_max_tensors=8)
    assert first.name == "tiny-00001-of-00003.gguf"
    result = cli("inspect", first.name, "--json", cwd=first.parent)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["parts"] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    # The parts together describe the same model as the unsplit file.
    reference = inspect_gguf(whole)
    for key in ("parameter-count", "tensor-types", "quantization", "chat-template", "tokenizer"):
        assert report[key] == reference[key], key
    text = cli("inspect", first.name, cwd=first.parent).out
    assert text.splitlines()[0] == "file          tiny-00001-of-00003.gguf (3 parts)"


def test_a_missing_split_part_is_one_line(tmp_path: Path, cli: Cli) -> None:
    first = build_tiny_gguf(tmp_path / "tiny.gguf", split_max_tensors=8)
    (tmp_path / "tiny-00002-of-00003.gguf").unlink()
    result = cli("inspect", first.name, cwd=tmp_path)
    assert result.code == 2
    assert result.out == ""
    assert result.err.startswith("error: ")
    assert "tiny-00002-of-00003.gguf" in result.err
    assert result.err.count("\n") == 1


@pytest.mark.parametrize("as_json", [False, True])
def test_wrong_magic_is_one_line(tmp_path: Path, cli: Cli, as_json: bool) -> None:
    raw = RawGGUF()
    raw.magic = b"<htm"
    raw.write(tmp_path / "page.gguf")
    result = cli("inspect", "page.gguf", *(["--json"] if as_json else []), cwd=tmp_path)
    assert (result.code, result.out) == (2, "")
    assert result.err == (
        "error: page.gguf: not a GGUF file: the magic number at byte 0 is b'<htm', expected b'GGUF'; "
        "check that the path points at a .gguf model and not an HTML page or a safetensors file\n"
    )


def test_truncated_file_is_one_line(tmp_path: Path, cli: Cli) -> None:
    data = build_tiny_gguf(tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:300])
    result = cli("inspect", "cut.gguf", cwd=tmp_path)
    assert (result.code, result.out) == (2, "")
    assert result.err.startswith("error: cut.gguf: truncated at byte 300 while reading ")
    assert result.err.endswith("; the file is incomplete, download it again\n")
    assert result.err.count("\n") == 1


def test_render_is_pure(templated: Path) -> None:
    report = inspect_gguf(templated)
    # The same text from a fresh interpreter (another hash seed, another directory): nothing in the output
    # depends on the process.
    code = (
        "from pathlib import Path; from stacklock.cli.inspect import inspect_gguf, render_inspection; "
        f"print(render_inspection(inspect_gguf(Path({str(templated)!r}))), end='')"
    )
    assert run_fresh(code) == render_inspection(report)
    assert not render_inspection(report).endswith("\n")  # The CLI adds the one newline.
