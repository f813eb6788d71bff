"""Template probes: render the stack's chat template over the probe corpus and examine the renders.

A family of built-in checks (see :mod:`stacklock.rules.builtin`). Everything a probe needs is in the lock: the
pinned template text, its variables and pinned clock, the tokenizer fingerprint (BOS/EOS/EOT texts, add-bos),
the vocabulary's special-token texts and the locked engine. So ``lock`` and ``check`` run the same probes on
the same data, and no model file is read. Pure: renders happen in the sandbox.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jinja2 import nodes

from stacklock.errors import RenderLimitError, TemplateError
from stacklock.gguf.tokenizer import EOM_TEXTS, EOT_TEXTS
from stacklock.model.findings import Finding, Link, Severity
from stacklock.rules.builtin import BuiltinCheck, FamilyRun, register, register_family
from stacklock.rules.versions import parse_version
from stacklock.template.corpus import (
    ANSWERED,
    ASSISTANT_1,
    CORPUS,
    MULTI_TURN,
    SINGLE,
    Conversation,
)
from stacklock.template.sandbox import _parse_only_environment, render_chat_template

if TYPE_CHECKING:
    from stacklock.model.lock import EnginePin, Lock

FAMILY = "template-probes"
_T = (Link.TEMPLATE,)
_TT = (Link.TEMPLATE, Link.TOKENIZER)


def _check(
    id_: str,
    severity: Severity,
    title: str,
    explanation: str,
    fix: str,
    links: tuple[Link, ...] = _T,
    references: tuple[str, ...] = (),
) -> BuiltinCheck:
    return register(BuiltinCheck(id_, FAMILY, severity, title, links, explanation, fix, references))


GENERATION_PROMPT_IGNORED = _check(
    "tmpl-generation-prompt-ignored",
    Severity.ERROR,
    "The template ignores add_generation_prompt",
    "Rendered with add_generation_prompt on and off, the template gives the same text: no assistant header is "
    "written after the last user turn, so the model continues the user's text instead of answering.",
    "Use the model's own template, which writes the assistant header when add_generation_prompt is true.",
)
TERMINATOR_NOT_EOG = _check(
    "tmpl-turn-terminator-not-eog",
    Severity.ERROR,
    "The template ends assistant turns with a token that is not end-of-generation",
    "The text after an assistant message is the turn terminator the model was trained to emit; when it is not "
    "an end-of-generation token of the tokenizer (EOS, EOT, EOM, or a known end-of-turn text, as llama.cpp "
    "derives them) engines do not stop on it and the model runs on into the next turn.",
    "Use the template that matches this model's tokenizer, or fix the GGUF's tokenizer.ggml.eot_token_id.",
    _TT,
    ("ggml-org/llama.cpp#6745", "ollama/ollama#3759", "vllm-project/vllm#4180"),
)
TERMINATOR_NOT_EOT = _check(
    "tmpl-turn-terminator-not-locked-eot",
    Severity.INFO,
    "The template closes turns with another end-of-turn token than the lock's eot-text",
    "The lock infers its end-of-turn text from the vocabulary the way llama.cpp does (the first known text "
    "found), but the template closes assistant turns with another one. llama.cpp stops on both; engines and "
    "stop lists that use only the declared EOT or EOS token do not.",
    "Set tokenizer.ggml.eot_token_id in the GGUF to the template's terminator (gguf_new_metadata.py), or add it "
    "to the application's stop tokens.",
    _TT,
    ("ggml-org/llama.cpp#6745",),
)
MARKER_NOT_SPECIAL = _check(
    "tmpl-marker-not-special-token",
    Severity.ERROR,
    "The template emits special-token texts that are not special tokens of the vocabulary",
    "The render contains marker texts that are not special tokens of this model's vocabulary, so they are "
    "tokenized into several ordinary pieces: the model never sees the turn markers it was trained on. Usually "
    "the template belongs to another model family.",
    "Use the template written for this model (template.source), or a model whose vocabulary has these tokens.",
    _TT,
)
EMPTY_RENDER = _check(
    "tmpl-render-empty",
    Severity.ERROR,
    "The template renders a conversation to an empty prompt",
    "A single user message renders to nothing (or only whitespace): the model gets no prompt at all.",
    "Use the model's own template; check that it loops over `messages`.",
)
CONTENT_MISSING = _check(
    "tmpl-content-missing",
    Severity.WARNING,
    "The template drops a message's content",
    "A message's text does not appear in the render: the model never sees it.",
    "Use a template that renders every message (for a system prompt: one that accepts the system role).",
)
PREFIX_UNSTABLE = _check(
    "tmpl-multiturn-prefix-unstable",
    Severity.WARNING,
    "The render of a conversation is not a prefix of the render with one more turn",
    "Adding a turn rewrites earlier parts of the prompt, so engines cannot reuse their prompt cache and the "
    "model sees earlier turns differently from when it answered them.",
    "Prefer a template that appends turns without rewriting earlier ones; expect slower multi-turn prompts.",
)
DOUBLE_BOS = _check(
    "tok-double-bos",
    Severity.WARNING,
    "Double BOS: the template emits the BOS text and the engine adds BOS too",
    "The rendered prompt starts with the BOS text and the tokenizer adds BOS, so an engine that tokenizes the "
    "rendered text with special tokens added starts the prompt with two BOS tokens, which degrades output. "
    "llama.cpp strips the template's BOS since b4628 and llama-cpp-python since 0.2.77; stacklock's own smoke "
    "prompts are tokenized without adding another.",
    "Tokenize rendered prompts without adding special tokens, or use an engine version that strips the "
    "template's BOS.",
    _TT,
    (
        "ggml-org/llama.cpp#7332",
        "ggml-org/llama.cpp#11616",
        "https://huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Llama-8B/discussions/20",
    ),
)
ROLE_REJECTED = _check(
    "tmpl-role-rejected",
    Severity.INFO,
    "The template rejects a role",
    "Rendering a conversation with this role raises an error. Engines that render the template verbatim "
    "(transformers, vLLM, llama-cpp-python) fail such requests; llama.cpp merges system text into the first user "
    "turn instead.",
    "Merge system text into the first user message in the application, or use a template that accepts the role.",
    _T,
    ("abetlen/llama-cpp-python#1580", "huggingface/chat-ui#1386", "ollama/ollama#2636"),
)
USES_CLOCK = _check(
    "tmpl-uses-clock",
    Severity.WARNING,
    "The render depends on the date (strftime_now)",
    "The template writes today's date into the prompt. stacklock pins `template.now`, so smoke prompts "
    "reproduce; engines use the wall clock, so the same conversation renders differently from day to day.",
    "Set the date explicitly (e.g. a `date_string` variable) where the engine allows it, or accept that the "
    "prompt changes daily.",
    _T,
    ("abetlen/llama-cpp-python@af637928", "ggml-org/llama.cpp#12802"),
)
UNDEFINED_VARIABLE = _check(
    "tmpl-undefined-variable",
    Severity.WARNING,
    "The template reads variables that no engine passes",
    "The template reads variables that are neither standard chat-template inputs nor set in "
    "[template] variables, and does not test them with `is defined`; they render as empty text.",
    "Set them in [template] variables, or use a template that does not need them.",
)

#: What every engine passes a chat template, and the globals transformers defines.
_STANDARD = frozenset(
    {
        "messages",
        "tools",
        "documents",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "raise_exception",
        "strftime_now",
        "namespace",
        "range",
        "dict",
        "lipsum",
        "cycler",
        "joiner",
        "loop",
    }
)
#: Dates far apart in every field, to see whether a render depends on the clock.
_CLOCKS = (
    dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    dt.datetime(2031, 11, 29, 22, 58, 59, tzinfo=dt.UTC),
)
# A turn marker in a render: ``<|...|>`` (always a special token where it is meant), ``<s>``/``</s>``, and
# ``<start_of_turn>``-like words. XML-like tags (``<tool_response>``, ``<think>``) are left out: templates write
# them as plain text for vocabularies that have no such token (Qwen2.5's ``<tool_response>``).
_MARKER = re.compile(
    r"<\|[^<>|\s]{1,64}\|>|</?s>|</?(?:[a-z0-9]+_)*(?:start|end|turn|eot|bos|eos)(?:_[a-z0-9]+)*>"
)
# Engines that strip a template's leading BOS before tokenizing, from the version that does.
_STRIPS_BOS_SINCE: dict[str, tuple[str, str]] = {
    "llama-cpp-python": ("version", "0.2.77"),
    "llama.cpp": ("build", "4628"),
    "llama-server": ("build", "4628"),
}


@dataclass(frozen=True)
class ProbeRun:
    """What the probes found, which ran, and which could not run and why (the coverage of ``check``); the
    renders are those of :data:`~stacklock.template.corpus.CORPUS` at its ``CORPUS_VERSION``."""

    findings: tuple[Finding, ...]
    ran: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class _Renders:
    """Renders of the corpus, with the error of each conversation that failed."""

    lock: Lock
    ok: dict[tuple[str, bool], str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    #: Set once a render runs past its bounds: every other render would too, each taking the full deadline.
    runaway: str | None = None

    def render(self, conv: Conversation, *, prompt: bool, now: dt.datetime | None = None) -> str | None:
        if self.runaway is not None:
            self.failed[conv.name] = self.runaway
            return None
        key = (conv.name, prompt)
        if now is None and key in self.ok:
            return self.ok[key]
        template, tokenizer = self.lock.template, self.lock.tokenizer
        assert template.text is not None
        try:
            text = render_chat_template(
                template.text,
                list(conv.messages),
                add_generation_prompt=prompt,
                bos_token=tokenizer.bos_text,
                eos_token=tokenizer.eos_text,
                tools=list(conv.tools) if conv.tools is not None else None,
                extra_context=template.variables,
                now=now or template.now,
                origin=template.origin,
            )
        except TemplateError as exc:
            self.failed[conv.name] = exc.message
            if isinstance(exc, RenderLimitError):
                self.runaway = exc.message
            return None
        if now is None:
            self.ok[key] = text
        return text


def run_probes(lock: Lock) -> ProbeRun:
    """Render the lock's template over the corpus and report what the probes find."""
    ids = tuple(c.id for c in _ALL)
    if lock.template.text is None:
        return ProbeRun((), (), dict.fromkeys(ids, "the stack has no chat template"))
    if lock.template.dialect != "jinja2":
        return ProbeRun((), (), dict.fromkeys(ids, f"the template is {lock.template.dialect}, not Jinja"))
    renders = _Renders(lock)
    findings: list[Finding] = []
    skipped: dict[str, str] = {}
    for probe, check in _PROBES:
        try:
            found = probe(renders)
        except _Skip as skip:
            skipped[check.id] = skip.reason
            continue
        if found is not None:
            findings.append(found)
    ran = tuple(i for i in ids if i not in skipped)
    return ProbeRun(tuple(findings), ran, skipped)


class _Skip(Exception):  # noqa: N818 - a signal, not an error.
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _needed(renders: _Renders, conv: Conversation, *, prompt: bool) -> str:
    text = renders.render(conv, prompt=prompt)
    if text is None:
        raise _Skip(f"the '{conv.name}' conversation does not render: {renders.failed[conv.name]}")
    return text


def _generation_prompt(renders: _Renders) -> Finding | None:
    with_prompt = _needed(renders, SINGLE, prompt=True)
    if with_prompt != _needed(renders, SINGLE, prompt=False):
        return None
    return GENERATION_PROMPT_IGNORED.finding()


def _eog_texts(lock: Lock) -> set[str]:
    tokenizer = lock.tokenizer
    declared = {t for t in (tokenizer.eos_text, tokenizer.eot_text) if t}
    known = set(EOT_TEXTS + EOM_TEXTS).intersection(lock.model.special_texts)
    return declared | known


def _specials(lock: Lock) -> set[str]:
    tokenizer = lock.tokenizer
    return set(lock.model.special_texts) | {
        t for t in (tokenizer.bos_text, tokenizer.eos_text, tokenizer.eot_text) if t
    }


def _terminator(renders: _Renders) -> str | None:
    text = _needed(renders, ANSWERED, prompt=False)
    end = text.rfind(ASSISTANT_1)
    if end < 0:
        raise _Skip("the assistant message does not appear in the render")
    after = text[end + len(ASSISTANT_1) :].lstrip()
    for special in sorted(_specials(renders.lock), key=len, reverse=True):
        if after.startswith(special):
            return special
    match = _MARKER.match(after)
    return match.group() if match else None


def _terminator_eog(renders: _Renders) -> Finding | None:
    terminator = _terminator(renders)
    lock = renders.lock
    if terminator is None or terminator in _eog_texts(lock):
        return None
    eog = ", ".join(sorted(_eog_texts(lock))) or "none"
    return TERMINATOR_NOT_EOG.finding(
        title=f"The template ends assistant turns with '{terminator}', which is not an end-of-generation token",
        explanation=f"{TERMINATOR_NOT_EOG.explanation} End-of-generation texts of this vocabulary: {eog}.",
    )


def _terminator_eot(renders: _Renders) -> Finding | None:
    terminator = _terminator(renders)
    tokenizer = renders.lock.tokenizer
    if (
        terminator is None
        or tokenizer.eot_text is None
        or terminator in (tokenizer.eot_text, tokenizer.eos_text)
        or terminator not in _eog_texts(renders.lock)
    ):
        return None
    return TERMINATOR_NOT_EOT.finding(
        title=(
            f"The template closes turns with '{terminator}' but the lock's eot-text is '{tokenizer.eot_text}'"
        )
    )


def _markers(renders: _Renders) -> Finding | None:
    specials = _specials(renders.lock)
    if not renders.lock.model.special_texts_complete:
        raise _Skip("the lock does not list every special token of the vocabulary; re-lock to probe markers")
    missing: set[str] = set()
    for conv in CORPUS:
        for prompt in (False, True):
            text = renders.render(conv, prompt=prompt)
            if text is not None:
                missing.update(m for m in _MARKER.findall(text) if m not in specials)
    if not missing:
        return None
    names = ", ".join(sorted(missing))
    return MARKER_NOT_SPECIAL.finding(
        title=f"The template emits {names}, not special tokens of this vocabulary"
    )


def _empty(renders: _Renders) -> Finding | None:
    if _needed(renders, SINGLE, prompt=True).strip():
        return None
    return EMPTY_RENDER.finding()


def _content(renders: _Renders) -> Finding | None:
    dropped: list[str] = []
    for conv in CORPUS:
        text = renders.render(conv, prompt=False)
        if text is not None:
            dropped += [f"'{c}' ({conv.name})" for c in conv.contents if c not in text]
    if not dropped:
        return None
    return CONTENT_MISSING.finding(
        title=f"The template drops a message's content: {dropped[0]}",
        explanation=f"{CONTENT_MISSING.explanation} Missing: {', '.join(dropped)}.",
    )


def _prefix(renders: _Renders) -> Finding | None:
    single = _needed(renders, SINGLE, prompt=False)
    answered = _needed(renders, ANSWERED, prompt=False)
    longer = _needed(renders, MULTI_TURN, prompt=False)
    for short, long, what in ((single, answered, "an assistant"), (answered, longer, "a user")):
        if not long.startswith(short):
            return PREFIX_UNSTABLE.finding(
                title=f"Adding {what} turn rewrites the earlier render (not a prefix)"
            )
    return None


def _strips_bos(engine: EnginePin) -> bool:
    since = _STRIPS_BOS_SINCE.get(engine.name)
    if since is None:
        return False
    kind, first = since
    if kind == "build":
        return engine.build is not None and engine.build >= int(first)
    version, fixed = parse_version(engine.version), parse_version(first)
    return version is not None and fixed is not None and version >= fixed


def _double_bos(renders: _Renders) -> Finding | None:
    lock = renders.lock
    bos = lock.tokenizer.bos_text
    if not bos or lock.tokenizer.add_bos is not True:
        return None
    if not _needed(renders, SINGLE, prompt=True).startswith(bos):
        return None
    if _strips_bos(lock.engine):
        return None
    return DOUBLE_BOS.finding(
        title=f"Double BOS: the template emits '{bos}' and {lock.engine.name} adds BOS too",
    )


def _roles(renders: _Renders) -> Finding | None:
    rejected = []
    template = renders.lock.template
    # A template that knows nothing of tools is not expected to take a tool result.
    knows_tools = "tools" in template.features or "tool_calls" in (template.text or "")
    for conv in CORPUS:
        if conv.roles == ("tool",) and not knows_tools:
            continue
        if conv.roles and renders.render(conv, prompt=True) is None:
            rejected += [f"{role} ({renders.failed[conv.name]})" for role in conv.roles]
    if not rejected:
        return None
    names = " and ".join(r.split(" ", 1)[0] for r in rejected)
    return ROLE_REJECTED.finding(
        title=f"The template rejects the {names} role",
        explanation=f"{ROLE_REJECTED.explanation} Raised: {'; '.join(rejected)}.",
    )


def _clock(renders: _Renders) -> Finding | None:
    first, second = (renders.render(SINGLE, prompt=True, now=now) for now in _CLOCKS)
    if first is None or second is None:
        raise _Skip(f"the '{SINGLE.name}' conversation does not render: {renders.failed[SINGLE.name]}")
    return None if first == second else USES_CLOCK.finding()


def _undefined(renders: _Renders) -> Finding | None:
    template = renders.lock.template
    try:
        tree = _parse_only_environment().parse(template.text or "")
    except Exception as exc:  # noqa: BLE001 - any parse failure means the probe cannot look.
        raise _Skip(f"the template does not parse: {exc}") from None
    unknown = _read_names(tree) - _STANDARD - set(template.variables) - _guarded_names(tree)
    if not unknown:
        return None
    names = ", ".join(sorted(unknown))
    return UNDEFINED_VARIABLE.finding(title=f"The template reads undefined variables: {names}")


def _read_names(tree: nodes.Template) -> set[str]:
    """Names read and never assigned anywhere (``set``, ``for`` targets, macro arguments)."""
    loads = {n.name for n in tree.find_all(nodes.Name) if n.ctx == "load"}
    stores = {n.name for n in tree.find_all(nodes.Name) if n.ctx in {"store", "param"}}
    return loads - stores


def _guarded_names(tree: nodes.Template) -> set[str]:
    """Names tested with ``is defined``/``is undefined``/``is none`` or given a ``default``."""
    guarded: set[str] = set()
    for test in tree.find_all(nodes.Test):
        if isinstance(test.node, nodes.Name) and test.name in {"defined", "undefined", "none"}:
            guarded.add(test.node.name)
    for filt in tree.find_all(nodes.Filter):
        if isinstance(filt.node, nodes.Name) and filt.name in {"default", "d"}:
            guarded.add(filt.node.name)
    return guarded


_PROBES: tuple[tuple[Any, BuiltinCheck], ...] = (
    (_empty, EMPTY_RENDER),
    (_generation_prompt, GENERATION_PROMPT_IGNORED),
    (_terminator_eog, TERMINATOR_NOT_EOG),
    (_terminator_eot, TERMINATOR_NOT_EOT),
    (_markers, MARKER_NOT_SPECIAL),
    (_content, CONTENT_MISSING),
    (_prefix, PREFIX_UNSTABLE),
    (_double_bos, DOUBLE_BOS),
    (_roles, ROLE_REJECTED),
    (_clock, USES_CLOCK),
    (_undefined, UNDEFINED_VARIABLE),
)
_ALL = tuple(check for _, check in _PROBES)


def _run(lock: Lock, _registries: Sequence[Any]) -> FamilyRun:
    run = run_probes(lock)
    return FamilyRun(run.findings, run.skipped)


register_family(FAMILY, _run)
