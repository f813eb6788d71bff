"""Chat-template rendering: transformers goldens, the sandbox, the limits, dialect and features."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from stacklock.errors import TemplateError
from stacklock.template.sandbox import (
    FEATURES,
    RenderLimits,
    compile_check,
    render_chat_template,
    template_dialect,
    template_features,
)

ROOT = Path(__file__).parents[1]
DATA = Path(__file__).parent / "data" / "templates"
GEMMA = (ROOT / "registry" / "templates" / "gemma3-it.jinja").read_text(encoding="utf-8")
# Rendered by transformers 5.23.0 (render_jinja_template) with tests/data/templates/make_goldens.py.
GOLDEN = json.loads((DATA / "transformers-goldens.json").read_text(encoding="utf-8"))
NOW = dt.datetime(2025, 3, 1, 12, 30, tzinfo=dt.UTC)
ORIGIN = "x.jinja"
LABEL = "chat template (x.jinja)"
USER = [{"role": "user", "content": "hi"}]

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
    " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0"
    " == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if"
    " add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEN = (
    "{%- for m in messages -%}\n  {%- if m.role == 'assistant' -%}\n    {% generation %}{{ m.content }}"
    "{{ eos_token }}{% endgeneration %}\n  {%- else -%}\n    [{{ m.role }}] {{ m.content }}\n  {%- endif %}\n"
    "  {%- if loop.index >= 3 %}{% break %}{% endif %}\n{% endfor -%}"
)
TOJSON = (
    "{{ tools | tojson }}\n{{ tools[0] | tojson(indent=2) }}\n{{ tools[0] | tojson(sort_keys=true,"
    " separators=(',', ':')) }}\n{{ messages[0] | tojson }}|{{ unk_token }}|{{ enable_thinking }}"
)
GEMMA_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  Hello <b> & 'friends'  "},
    {"role": "assistant", "content": "Hi!"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "look "}, {"type": "image"}, {"type": "text", "text": " here"}],
    },
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo < 東京 >",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]] = USER,
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = "<bos>",
    eos_token: str | None = "<eos>",
    **kw: Any,
) -> str:
    return render_chat_template(
        template,
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        now=NOW,
        origin=ORIGIN,
        **kw,
    )


def error_of(template: str, messages: Sequence[Mapping[str, Any]] = USER, **kw: Any) -> str:
    with pytest.raises(TemplateError) as info:
        render(template, messages, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- The registry copy of the Gemma 3 template --------------------------------------------------------


def test_gemma3_registry_entry_matches_its_file() -> None:
    entry = tomllib.loads((ROOT / "registry" / "templates" / "gemma3-it.toml").read_text(encoding="utf-8"))
    digest = hashlib.sha256((ROOT / "registry" / "templates" / "gemma3-it.jinja").read_bytes()).hexdigest()
    assert entry["sha256"] == digest
    assert entry["dialect"] == "jinja2"
    assert entry["id"] == "gemma3-it"


# --- Goldens rendered by transformers -----------------------------------------------------------------


def test_gemma3_merges_system_into_first_user_turn() -> None:
    assert render(GEMMA, GEMMA_MESSAGES) == GOLDEN["gemma3"]
    assert GOLDEN["gemma3"].startswith(
        "<bos><start_of_turn>user\nBe brief.\n\nHello <b> & 'friends'<end_of_turn>"
    )


def test_gemma3_without_generation_prompt() -> None:
    assert render(GEMMA, GEMMA_MESSAGES[1:3], add_generation_prompt=False) == GOLDEN["gemma3-nogen"]


def test_gemma3_rejects_two_user_turns_in_a_row() -> None:
    assert (
        GOLDEN["gemma3-alt"]
        == "EXC TemplateError: Conversation roles must alternate user/assistant/user/assistant/..."
    )
    assert error_of(GEMMA, [GEMMA_MESSAGES[1], GEMMA_MESSAGES[1]]) == (
        f"{LABEL} raised: Conversation roles must alternate user/assistant/user/assistant/...; "
        "the messages do not fit what this template accepts"
    )


def test_chatml() -> None:
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
    ]
    assert render(CHATML, messages, bos_token=None, eos_token=None) == GOLDEN["chatml"]


def test_llama3_with_bos_token() -> None:
    messages = [{"role": "system", "content": " sys "}, {"role": "user", "content": "Hi"}]
    got = render(LLAMA3, messages, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert got == GOLDEN["llama3"]


def test_unset_bos_token_is_undefined_as_in_transformers() -> None:
    # transformers passes special_tokens_map, which leaves unset tokens out, so `bos_token + x` fails.
    assert GOLDEN["llama3-nobos"] == "EXC UndefinedError: 'bos_token' is undefined"
    assert error_of(LLAMA3, add_generation_prompt=False, bos_token=None) == (
        f"{LABEL} line 3 failed: UndefinedError: 'bos_token' is undefined; "
        "check the template against the messages it was given"
    )
    assert render("[{{ bos_token }}][{{ eos_token }}]", bos_token=None, eos_token=None) == "[][]"


def test_generation_tag_and_break() -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    got = render(GEN, messages, add_generation_prompt=False, eos_token="</s>")
    assert got == GOLDEN["gen"] == "[user] ab</s>[user] c"


def test_tojson_like_transformers_and_extra_context() -> None:
    messages = [{"role": "user", "content": "é<>&'", "thinking": "hmm"}]
    got = render(
        TOJSON, messages, add_generation_prompt=False, tools=TOOLS, extra_context={"enable_thinking": False}
    )
    assert got == GOLDEN["tojson"]
    # Non-ASCII and '<' are written as is, keys keep their order unless sort_keys is given.
    assert '"Météo < 東京 >"' in got
    assert '{"thinking": "hmm", "role": "user", "content": "é<>&\'", "reasoning_content": "hmm"}' in got


def test_none_values_are_dropped_and_extra_context_overrides_tokens() -> None:
    template = "{{ messages[0].content is defined }}|{{ bos_token }}|{{ tools }}|{{ documents }}"
    messages = [{"role": "user", "content": None}]
    assert render(template, messages, extra_context={"bos_token": "<B>"}) == "False|<B>|None|None"


def test_strftime_now_uses_the_pinned_clock() -> None:
    assert render("{{ strftime_now('%d %b %Y %H:%M') }}") == "01 Mar 2025 12:30"
    assert render("{{ strftime_now(format='%Y') }}") == "2025"


def test_undefined_renders_empty() -> None:
    assert render("a{{ nothing }}b{{ config }}{{ request }}c") == "abc"


def test_empty_conversation_is_refused() -> None:
    assert error_of(GEMMA, []) == (
        f"{LABEL}: cannot apply a chat template to an empty conversation; provide at least one message"
    )


def test_extra_context_cannot_replace_messages() -> None:
    assert error_of("x", extra_context={"messages": []}) == (
        f"{LABEL}: extra context may not set 'messages'; pass these as arguments of the render instead"
    )


def test_default_origin_label() -> None:
    with pytest.raises(TemplateError, match=r"^chat template raised: boom; "):
        render_chat_template(
            "{{ raise_exception('boom') }}",
            USER,
            add_generation_prompt=True,
            bos_token=None,
            eos_token=None,
            now=NOW,
        )


def test_raise_exception_message_is_one_line() -> None:
    assert error_of("{{ raise_exception('System role\nnot supported') }}") == (
        f"{LABEL} raised: System role not supported; the messages do not fit what this template accepts"
    )


# --- Syntax errors ------------------------------------------------------------------------------------


def test_syntax_error_names_the_line() -> None:
    text = "{{ bos_token }}\n{% if x %}\n{{ x }\n{% endif %}"
    with pytest.raises(TemplateError) as info:
        compile_check(text, "x.jinja")
    assert str(info.value) == f"{LABEL} line 3: unexpected '}}'; fix the template syntax"
    assert error_of(text) == str(info.value)


def test_compile_check_accepts_gemma_and_extension_tags() -> None:
    compile_check(GEMMA, "gemma3-it.jinja")
    compile_check(GEN, "gen.jinja")
    # The same extension tag, left open, is refused: the check parses, it does not just return.
    with pytest.raises(TemplateError, match=r"^chat template \(gen\.jinja\)"):
        compile_check("{% generation %}{{ m }}", "gen.jinja")


# --- The sandbox --------------------------------------------------------------------------------------

ESCAPE_HINT = "; this template is unsafe; do not use it"


@pytest.mark.parametrize(
    ("template", "detail"),
    [
        ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' is unsafe"),
        ("{{ ''.__class__ }}", "access to attribute '__class__' of 'str' is unsafe"),
        ("{{ lipsum.__globals__ }}", "access to attribute '__globals__' of 'function' is unsafe"),
        ("{{ cycler.__init__.__globals__ }}", "access to attribute '__init__' of 'type' is unsafe"),
        ("{{ self.__init__ }}", "access to attribute '__init__' of 'TemplateReference' is unsafe"),
        ("{{ namespace.__init__ }}", "access to attribute '__init__' of 'type' is unsafe"),
        (
            "{{ config.__class__.__init__.__globals__ }}",
            "access to attribute '__class__' of 'Undefined' is unsafe",
        ),
        ("{{ joiner.__init__.__globals__ }}", "access to attribute '__init__' of 'type' is unsafe"),
        ("{{ messages.append(1) }}", "access to attribute 'append' of 'list' is unsafe"),
        ("{{ messages[0].update({}) }}", "access to attribute 'update' of 'dict' is unsafe"),
        ("{{ '{0.__class__}'.format(1) }}", "access to attribute '__class__' of 'int' is unsafe"),
        ("{{ dict.__class__ }}", "access to attribute '__class__' of '_TemplateDict' is unsafe"),
        (
            "{% set ns = namespace() %}{% set ns._x = 1 %}",
            (
                "Chat templates cannot store underscore-prefixed attributes on a namespace, but got '_x'. "
                "Please rename the attribute."
            ),
        ),
    ],
)
def test_sandbox_escapes_fail_in_one_line(template: str, detail: str) -> None:
    assert error_of(template) == f"{LABEL} line 1 tried to escape the sandbox: {detail}{ESCAPE_HINT}"


# --- Runaway templates --------------------------------------------------------------------------------

FAST = RenderLimits(max_seconds=0.3)
TIME_ERROR = f"{LABEL}: rendering exceeded 0.3 s; the template loops too long; check its loops or raise RenderLimits.max_seconds"


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% for a in 'x' * 100000 %}{% for b in 'x' * 100000 %}{% endfor %}{% endfor %}",
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% if j > 0 %}{% continue %}{% endif %}"
            "{% endfor %}{% endfor %}"
        ),
        (
            "{% macro f(n) %}{% for i in range(100000) %}{{ f(n) if n < 0 }}{% endfor %}{% endmacro %}"
            "{% for i in range(100000) %}{{ f(1) }}{% endfor %}"
        ),
    ],
)
def test_long_loops_stop_at_the_deadline(template: str) -> None:
    started = time.monotonic()
    assert error_of(template, limits=FAST) == TIME_ERROR
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    "template",
    [
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    ],
)
def test_endless_recursion_is_translated(template: str) -> None:
    assert error_of(template) == (
        f"{LABEL}: recursion too deep; the template recurses without end; check its macros and recursive loops"
    )


SIZE_HINT = "; the template builds a runaway value; check its '*', '+', '~' and filters"


@pytest.mark.parametrize(
    ("template", "detail"),
    [
        ("{{ 'x' * 10**9 }}", "a '*' repetition of 1000000000 characters or items"),
        ("{{ [0] * 10**9 }}", "a '*' repetition of 1000000000 characters or items"),
        ("{{ ('%s' | format(1)) * 10**9 }}", "a '*' repetition of 1000000000 characters or items"),
        (
            "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "a '~' concatenation of 1048576 characters or items",
        ),
        (
            "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
            "a '+' result of 1048576 characters or items",
        ),
        (
            (
                "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s %}{{ ns.s }}{{ ns.s }}{% endset %}"
                "{% endfor %}"
            ),
            "a str of 1048576 characters or items",
        ),
        (
            "{% macro d(s) %}{{ s }}{{ s }}{% endmacro %}{{ " + "d(" * 21 + "'x'" + ")" * 21 + " }}",
            "a str of 1048576 characters or items",
        ),
        ("{{ (['x' * 100000] * 1000) | join }}", "a join result of 100000000 characters or items"),
        ("{{ ''.join(['x' * 100000] * 1000) }}", "a join result of 100000000 characters or items"),
        ("{{ 'x' | center(10**9) }}", "a width or count argument of 1000000000"),
        ("{{ 'x'.ljust(10**9) }}", "a width or count argument of 1000000000"),
        ("{{ '%999999999d' % 1 }}", "a width or count argument of 999999999"),
        ("{{ '%*d' % (10**9, 1) }}", "a width or count argument of 1000000000"),
        ("{{ '{:>999999999}'.format(1) }}", "a width or count argument of 999999999"),
        (
            "{{ ('x' * 1000) | replace('x', 'y' * 10000) }}",
            "a replace result of 10000000 characters or items",
        ),
        ("{{ lipsum(10**5) }}", "a lipsum result of 120000000 characters or items"),
        ("{{ messages | tojson(indent=10**5) }}", "a tojson indent of 100000"),
    ],
)
def test_size_bombs_fail_fast(template: str, detail: str) -> None:
    started = time.monotonic()
    assert error_of(template) == f"{LABEL} line 1: {detail} exceeds the limit of 1000000{SIZE_HINT}"
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    ("template", "bits"),
    [
        ("{{ 10 ** (10 ** 10) }}", 33219280949),
        (
            "{% set ns = namespace(x=2) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
            16386,
        ),
    ],
)
def test_huge_integers_fail_fast(template: str, bits: int) -> None:
    assert error_of(template) == (
        f"{LABEL} line 1: an integer of {bits} bits exceeds the limit of 10000 bits; "
        "the template computes a runaway number; check its arithmetic"
    )


def test_output_cap() -> None:
    template = "{% for i in range(100000) %}{{ 'x' * 64 }}{% endfor %}"
    assert error_of(template) == (
        f"{LABEL}: output exceeded 1000000 characters; "
        "the template writes runaway output; check its loops or raise RenderLimits.max_output_chars"
    )
    # A generous time budget: this asserts the output cap, not the speed of a loaded CI machine.
    limits = RenderLimits(max_output_chars=6_400_000, max_seconds=60.0)
    assert len(render(template, limits=limits)) == 6_400_000


def test_range_keeps_the_sandbox_cap() -> None:
    assert error_of("{{ range(10**6) | list }}") == (
        f"{LABEL} line 1 failed: OverflowError: Range too big. The sandbox blocks ranges larger than MAX_RANGE "
        "(100000).; check the template against the messages it was given"
    )


def test_guards_keep_jinja_semantics() -> None:
    template = (
        "{% for i in range(3) %}{{ loop.length }}{{ loop.last }}{% endfor %}|{{ range(3) }}|{{ range(3) | list }}"
        "|{{ 'a' ~ 1 ~ none }}|{% for k, v in {'a': 1}.items() %}{{ k }}{{ v }}{% else %}empty{% endfor %}"
        "|{% for x in [] %}x{% else %}empty{% endfor %}|{{ 2 ** 10 }}|{{ '%05d' % 42 }}|{{ '{:>4}'.format(7) }}"
    )
    assert render(template) == "3False3False3True|range(0, 3)|[0, 1, 2]|a1None|a1|empty|1024|00042|   7"


# --- Dialect and features -----------------------------------------------------------------------------


def test_dialect() -> None:
    assert (
        template_dialect((DATA / "ollama-gemma3-instruct.gotmpl").read_text(encoding="utf-8"))
        == "go-template"
    )
    assert template_dialect("{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}") == "go-template"
    assert template_dialect(GEMMA) == "jinja2"
    assert template_dialect(CHATML) == "jinja2"
    assert template_dialect("{{ bos_token }}hello") == "jinja2"
    assert template_dialect(" \n") == "empty"


def test_features_of_gemma3() -> None:
    assert template_features(GEMMA) == ("bos-token", "raise-exception", "role-alternation")


def test_features_found_on_the_ast() -> None:
    text = (
        "{{ bos_token }}{{ eos_token }}{% generation %}{% endgeneration %}{% for m in messages %}{% break %}"
        "{% endfor %}{{ strftime_now('%Y') }}{{ x | tojson }}{{ s[::-1] }}{{ s.startswith('a') }}{{ d.keys() }}"
        "{{ l | reject('in', k) }}{% set ns = namespace() %}{% macro f() %}{% endmacro %}"
        "{% for c in cs recursive %}{{ loop(c) }}{% endfor %}{{ tools }}{{ documents }}"
        "{{ raise_exception('System role not supported') }}{% if loop.index0 % 2 == 0 %}{% endif %}"
    )
    assert template_features(text) == FEATURES


def test_features_fall_back_to_regex_on_broken_text() -> None:
    assert template_features("{{ bos_token }}{% for x in y %}{{ x | tojson }}") == ("bos-token", "tojson")


def test_features_ignore_look_alikes() -> None:
    assert template_features("{{ 'tools and bos_token' }}{{ s[::1] }}") == ()


class _LimitsWithoutValueSize:
    """A caller's limits object that lacks a field the guard code reads: a programming error, not the template's."""

    max_seconds = 2.0
    max_output_chars = 1000
    max_int_bits = 64
    max_tojson_indent = 4


def test_a_bug_in_the_guard_code_is_not_blamed_on_the_template() -> None:
    # The guard code reads limits.max_value_size for every string the template builds: the AttributeError is
    # stacklock's (its caller's) bug and keeps its traceback instead of becoming the user's TemplateError. The
    # render runs in a forked worker, which reports the bug to the parent as a RuntimeError naming it.
    with pytest.raises(RuntimeError, match=r"the render worker failed: AttributeError: .*max_value_size"):
        render("{{ 'ab' ~ 'cd' }}", limits=_LimitsWithoutValueSize())


def test_a_template_that_fails_on_its_values_is_still_a_template_error() -> None:
    assert error_of("{{ 1 / 0 }}") == (
        f"chat template ({ORIGIN}) line 1 failed: ZeroDivisionError: division by zero; check the template against "
        "the messages it was given"
    )
