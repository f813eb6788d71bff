"""Pre-tokenizers the engine knows: the ``tokenizer.ggml.pre`` values llama.cpp's vocabulary loader accepts.

A family of built-in checks (see :mod:`stacklock.rules.builtin`) over registry data: ``pretokenizers.toml``
lists each value llama.cpp's ``src/llama-vocab.cpp`` accepts, with the first build that accepts it where that is
known. llama.cpp throws ``unknown pre-tokenizer type`` for any other value of a BPE vocabulary, so a value the
locked engine's build predates is an error at lock (not an exit 3 at ``record``); a value no build knows is a
warning (a fork's converter, a typo, or a build newer than the registry). Only BPE vocabularies (``gpt2``) have a
pre-tokenizer; llama.cpp ignores the key for the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from pydantic import Field

from stacklock.errors import RegistryError
from stacklock.model.base import Model
from stacklock.model.findings import Finding, Link, Severity
from stacklock.model.toml import parse_toml, validate
from stacklock.rules.builtin import BuiltinCheck, FamilyRun, register, register_family
from stacklock.rules.versions import parse_build

if TYPE_CHECKING:
    from stacklock.model.lock import Lock

FAMILY = "pre-tokenizers"
#: The registry file that holds the table.
PRETOKENIZERS_FILE = "pretokenizers.toml"


class PreTokenizer(Model):
    """One ``tokenizer.ggml.pre`` value llama.cpp's vocabulary loader accepts."""

    name: str = Field(min_length=1, description="The value of tokenizer.ggml.pre, e.g. 'qwen2'.")
    since: str | None = Field(
        default=None,
        pattern=r"^b\d+$",
        description="The first llama.cpp build whose loader accepts it, e.g. 'b2813'; absent when not recorded.",
    )
    references: tuple[str, ...] = Field(
        default=(), description="The pull request that added it: 'owner/repo#N' or a URL."
    )


class PreTokenizerTable(Model):
    """``pretokenizers.toml``: the values llama.cpp accepts, and where the list was read."""

    source: str = Field(min_length=1, description="Where the list was read (file, builds).")
    references: tuple[str, ...] = Field(default=(), description="Where to check the list.")
    pre_tokenizers: tuple[PreTokenizer, ...] = Field(
        alias="pre-tokenizer", description="Every accepted value, each once."
    )

    def by_name(self) -> Mapping[str, PreTokenizer]:
        return {entry.name: entry for entry in self.pre_tokenizers}


def parse_pretokenizer_table(text: str, origin: str) -> PreTokenizerTable:
    table = validate(PreTokenizerTable, parse_toml(text, origin, RegistryError), origin, text, RegistryError)
    seen: set[str] = set()
    for entry in table.pre_tokenizers:
        if entry.name in seen:
            raise RegistryError(f"{origin}: pre-tokenizer '{entry.name}' is listed twice; keep one")
        seen.add(entry.name)
    return table


class HasPreTokenizers(Protocol):
    @property
    def pretokenizers(self) -> PreTokenizerTable | None: ...


UNKNOWN_TO_ENGINE = register(
    BuiltinCheck(
        "tok-pre-tokenizer-unknown-to-engine",
        FAMILY,
        Severity.ERROR,
        "The engine build predates the model's tokenizer.ggml.pre and refuses to load it",
        (Link.TOKENIZER, Link.ENGINE),
        "llama.cpp's vocabulary loader accepts a fixed list of pre-tokenizer names, growing with each model "
        'family; an older build, and any wrapper vendoring it, fails with "unknown pre-tokenizer type".',
        "Upgrade the engine to a build (or wrapper release) that vendors at least the build for this "
        "pre-tokenizer.",
        (
            "ggml-org/llama.cpp#6920",
            "ggml-org/llama.cpp#11341",
            "ggml-org/llama.cpp#12021",
            "ollama/ollama#4529",
        ),
    )
)
UNKNOWN = register(
    BuiltinCheck(
        "tok-pre-tokenizer-unknown",
        FAMILY,
        Severity.WARNING,
        "No known llama.cpp build accepts the model's tokenizer.ggml.pre",
        (Link.TOKENIZER, Link.MODEL),
        "The value is not in the registry's list of pre-tokenizers llama.cpp accepts: the file comes from a "
        "fork's converter or was edited, or names a pre-tokenizer newer than the registry. llama.cpp refuses to "
        "load a BPE vocabulary with an unknown pre-tokenizer.",
        "Re-convert the model with upstream llama.cpp's convert_hf_to_gguf.py, or update the registry.",
        ("ggml-org/llama.cpp#12021", "https://github.com/mozilla-ai/llamafile/issues/493"),
    )
)


def merged_table(registries: Iterable[HasPreTokenizers]) -> dict[str, PreTokenizer]:
    """Every registry's pre-tokenizers; for a name in more than one, the first registry's entry wins."""
    merged: dict[str, PreTokenizer] = {}
    for registry in registries:
        table = registry.pretokenizers
        for name, entry in (table.by_name() if table else {}).items():
            merged.setdefault(name, entry)
    return merged


def pretokenizer_skipped(lock: Lock, known: Mapping[str, PreTokenizer]) -> str | None:
    """Why the pre-tokenizer checks cannot look at this lock, or None when they can."""
    if not known:
        return f"no registry has a {PRETOKENIZERS_FILE}"
    if lock.tokenizer.kind != "gpt2":
        return f"the '{lock.tokenizer.kind}' tokenizer has no pre-tokenizer (only BPE vocabularies do)"
    if lock.tokenizer.pre is None:
        return "the model file names no tokenizer.ggml.pre"
    return None


def check_pretokenizer(lock: Lock, known: Mapping[str, PreTokenizer]) -> tuple[Finding, ...]:
    """The findings for the lock's ``tokenizer.ggml.pre`` against the accepted values."""
    pre = lock.tokenizer.pre
    if pretokenizer_skipped(lock, known) is not None or pre is None:
        return ()
    entry = known.get(pre)
    if entry is None:
        return (UNKNOWN.finding(title=f"No known llama.cpp build accepts tokenizer.ggml.pre '{pre}'"),)
    build = lock.engine.build
    since = parse_build(entry.since) if entry.since else None
    if build is None or since is None or build >= since:
        return ()
    engine = f"{lock.engine.name} {lock.engine.version}"
    if lock.engine.version != f"b{build}":
        engine += f" (llama.cpp b{build})"
    return (
        UNKNOWN_TO_ENGINE.finding(
            title=(
                f"{engine} predates tokenizer.ggml.pre '{pre}' (accepted since {entry.since}) and refuses to "
                "load the model"
            ),
            fix=f"Upgrade {lock.engine.name} to a release that vendors llama.cpp {entry.since} or later.",
        ),
    )


def _run(lock: Lock, registries: Sequence[HasPreTokenizers]) -> FamilyRun:
    known = merged_table(registries)
    reason = pretokenizer_skipped(lock, known)
    if reason is not None:
        return FamilyRun((), dict.fromkeys((UNKNOWN_TO_ENGINE.id, UNKNOWN.id), reason))
    return FamilyRun(check_pretokenizer(lock, known))


register_family(FAMILY, _run)
