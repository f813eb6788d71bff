"""Pre-tokenizers the engine knows: tiny BPE GGUFs whose tokenizer.ggml.pre the locked llama.cpp build does or
does not accept, against the bundled registry's pretokenizers.toml."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from stacklock.errors import RegistryError
from stacklock.lock.load import load_inputs
from stacklock.lock.resolve import resolve
from stacklock.model.lock import Lock
from stacklock.registry.files import load_bundled_registry
from stacklock.rules.pretokenizers import parse_pretokenizer_table
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

Cli = Callable[..., Result]

IDS = {"tok-pre-tokenizer-unknown-to-engine", "tok-pre-tokenizer-unknown"}


def manifest(build: str) -> str:
    return (
        '[stack]\nname = "pre"\n\n[model]\nsource = "tiny.gguf"\n\n[template]\nsource = "gguf"\n\n'
        f'[engine]\nname = "llama.cpp"\nversion = "=={build}"\n\n[backend]\nkind = "cpu"\n\n[sampler]\ntemperature = 0.0\nmax-tokens = 4\n\n'
        '[[smoke]]\nname = "raw"\nprompt = "Hello"\n'
    )


def lock_of(directory: Path, pre: str | None, build: str, tokenizer: str = "gpt2") -> tuple[Lock, set[str]]:
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_gguf(directory / "tiny.gguf", tokenizer=tokenizer, pre=pre, chat_template=CHATML)  # type: ignore[arg-type]
    (directory / "llmstack.toml").write_text(manifest(build))
    resolution = resolve(load_inputs(directory / "llmstack.toml"))
    return resolution.lock, {f.rule for f in resolution.lock.findings} & IDS


def test_the_bundled_registry_lists_the_pre_tokenizers() -> None:
    table = load_bundled_registry().pretokenizers
    assert table is not None
    known = table.by_name()
    assert known["qwen2"].since == "b2813"
    assert known["deepseek-r1-qwen"].references == ("ggml-org/llama.cpp#11310",)
    assert "lfm2" in known
    assert known["lfm2"].since is None


def test_a_build_that_predates_the_pre_tokenizer_is_an_error(tmp_path: Path) -> None:
    lock, fired = lock_of(tmp_path, "qwen2", "b2800")
    assert fired == {"tok-pre-tokenizer-unknown-to-engine"}
    (finding,) = (f for f in lock.findings if f.rule == "tok-pre-tokenizer-unknown-to-engine")
    assert finding.severity.value == "error"
    assert finding.title == (
        "llama.cpp b2800 predates tokenizer.ggml.pre 'qwen2' (accepted since b2813) and "
        "refuses to load the model"
    )


def test_the_first_build_that_knows_it_is_clean(tmp_path: Path) -> None:
    assert lock_of(tmp_path, "qwen2", "b2813")[1] == set()


def test_a_value_no_build_knows_is_a_warning(tmp_path: Path) -> None:
    lock, fired = lock_of(tmp_path, "mistral-bpe", "b5000")
    assert fired == {"tok-pre-tokenizer-unknown"}
    (finding,) = (f for f in lock.findings if f.rule == "tok-pre-tokenizer-unknown")
    assert finding.severity.value == "warning"
    assert "'mistral-bpe'" in finding.title


@pytest.mark.parametrize(
    ("pre", "build", "tokenizer"),
    [
        ("lfm2", "b2000", "gpt2"),  # known, first build not recorded: no claim about old builds
        ("gpt-2", "b5000", "gpt2"),
        (None, "b5000", "gpt2"),  # no key: another rule's business (tok-bpe-pretokenizer-missing)
        ("no-such-pre", "b5000", "llama"),  # SentencePiece ignores the key
    ],
)
def test_no_finding(tmp_path: Path, pre: str | None, build: str, tokenizer: str) -> None:
    assert lock_of(tmp_path, pre, build, tokenizer)[1] == set()


def test_lock_refuses_and_check_reports_it(tmp_path: Path, cli: Cli) -> None:
    lock_of(tmp_path, "deepseek-r1-qwen", "b4400")
    refused = cli("lock", cwd=tmp_path)
    assert refused.code == 1
    assert refused.err.startswith("error: rule tok-pre-tokenizer-unknown-to-engine: llama.cpp b4400")
    checked = cli("check", cwd=tmp_path)
    assert checked.code == 1
    assert "error: tok-pre-tokenizer-unknown-to-engine: " in checked.out
    allowed = cli(
        "lock", "--allow", "tok-pre-tokenizer-unknown-to-engine", "--reason", "tested", cwd=tmp_path
    )
    assert allowed.code == 0, allowed.err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'source = "x"\n[[pre-tokenizer]]\nname = "a"\n[[pre-tokenizer]]\nname = "a"\n',
            "pretokenizers.toml: pre-tokenizer 'a' is listed twice; keep one",
        ),
        ('source = "x"\n[[pre-tokenizer]]\nname = "a"\nsince = "2813"\n', "since"),
    ],
)
def test_a_bad_table_is_one_line(text: str, message: str) -> None:
    with pytest.raises(RegistryError) as error:
        parse_pretokenizer_table(text, "pretokenizers.toml")
    assert message in str(error.value)
    assert "\n" not in str(error.value)
