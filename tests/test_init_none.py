"""`stacklock init` on a GGUF without a chat template: "none" only with a comment that says what it means, and
an info finding at lock naming what each engine would do with chats; a registry template when there is one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stacklock.model.lock import parse_lock
from tests.conftest import Result
from tests.gguf_builder import build_tiny_gguf

Cli = Callable[..., Result]

FALLBACKS = "tmpl-none-engine-fallbacks"


def test_init_writes_none_with_a_comment_and_lock_says_what_engines_do(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "bare.gguf", chat_template=None)
    assert cli("init", "bare.gguf", cwd=tmp_path).code == 0
    lines = (tmp_path / "llmstack.toml").read_text().splitlines()
    source = lines.index('source = "none"')
    comment = "\n".join(lines[lines.index("[template]") + 1 : source])
    assert comment.startswith(
        "# The model file has no chat template and the registry knows none for 'llama'."
    )
    for engine in ("llama-cpp-python with its llama-2 format", "llama-server with ChatML", "Ollama"):
        assert engine in comment.replace("\n# ", " ")

    locked = cli("lock", cwd=tmp_path)
    assert locked.code == 0, locked.err
    lock = parse_lock((tmp_path / "llmstack.lock").read_text())
    (finding,) = (f for f in lock.findings if f.rule == FALLBACKS)
    assert finding.severity.value == "info"
    for said in ("'llama-2' chat format", "ChatML", "Modelfile"):
        assert said in finding.explanation
    assert FALLBACKS in locked.out + locked.err


def test_init_keeps_the_registry_template_for_a_known_architecture(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "bare.gguf", arch="gemma3", chat_template=None)
    result = cli("init", "bare.gguf", cwd=tmp_path)
    assert result.code == 0
    text = (tmp_path / "llmstack.toml").read_text()
    assert 'source = "registry:gemma3-it"' in text
    assert 'source = "none"' not in text


def test_no_fallback_finding_when_the_file_has_a_template(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "bare.gguf", chat_template=None)
    assert cli("init", "bare.gguf", cwd=tmp_path).code == 0
    build_tiny_gguf(tmp_path / "bare.gguf", chat_template="{{ messages[0]['content'] }}")
    assert cli("lock", cwd=tmp_path).code == 0
    lock = parse_lock((tmp_path / "llmstack.lock").read_text())
    assert FALLBACKS not in {f.rule for f in lock.findings}
