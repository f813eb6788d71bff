"""Upstream chat templates (a hub repository's ``chat_template.jinja``, ``chat_template.json`` or
``tokenizer_config.json``) and the check that a GGUF's embedded template has gone stale against them.

A GGUF carries the template of the day it was converted; upstream fixes it later (tool calls, system prompts,
generation prompts), and the embedded copy silently keeps the old behaviour. Pure: the texts come in.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass

from stacklock.errors import TemplateError
from stacklock.model.findings import Finding, Link, Severity
from stacklock.rules.builtin import BuiltinCheck, register
from stacklock.template.sandbox import render_chat_template

#: Files a repository's chat template is read from, in the order transformers prefers them.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")

_SOURCE = re.compile(
    r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^/#]+))?(?:/(?P<path>[^#]+))?(?:#(?P<name>.+))?$"
)

STALE_EMBEDDED_TEMPLATE = register(
    BuiltinCheck(
        id="stale-embedded-template",
        family="upstream-template",
        severity=Severity.WARNING,
        title="The model file's embedded chat template differs from the upstream one",
        links=(Link.TEMPLATE, Link.MODEL),
        explanation=(
            "The GGUF carries the chat template of the day it was converted. Upstream has changed it since, and "
            "an engine that uses the embedded template (most do by default) renders prompts the old way."
        ),
        fix="serve the upstream template (template.source = 'hf://…', as locked) or re-convert the model",
    )
)


@dataclass(frozen=True)
class HubTemplateSource:
    repo: str
    revision: str
    path: str | None
    name: str | None


def parse_hub_template_source(text: str) -> HubTemplateSource | None:
    """``hf://OWNER/REPO[@REV][/FILE][#NAME]``, or None when ``text`` is not one."""
    match = _SOURCE.match(text)
    if match is None:
        return None
    return HubTemplateSource(match["repo"], match["rev"] or "main", match["path"], match["name"])


def parse_template_file(filename: str, raw: str, name: str | None, where: str) -> str:
    """The chat template in one of :data:`TEMPLATE_FILES`; ``name`` picks one of a named-template list."""
    if filename.endswith(".jinja"):
        if name is not None:
            raise TemplateError(
                f"{where}: a .jinja file holds one template, not '#{name}'", hint="drop #NAME"
            )
        return raw
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{where}: not JSON (line {exc.lineno}: {exc.msg})") from None
    value = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(value, str) and name is None:
        return value
    if isinstance(value, list):
        named = {
            t["name"]: t["template"]
            for t in value
            if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        }
        wanted = name or "default"
        if wanted in named:
            chosen: str = named[wanted]
            return chosen
        raise TemplateError(
            f"{where}: no chat template named '{wanted}'",
            hint=f"named templates: {', '.join(sorted(named)) or 'none'}; pick one with #NAME",
        )
    raise TemplateError(f"{where}: no 'chat_template' {'list' if name else 'string'} in {filename}")


_PROBE = (
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
)


def _render(text: str, bos: str | None, eos: str | None) -> str:
    try:
        return render_chat_template(
            text,
            list(_PROBE),
            add_generation_prompt=True,
            bos_token=bos,
            eos_token=eos,
            now=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        )
    except TemplateError as exc:
        return f"(does not render: {exc.one_line()})"


def stale_embedded_finding(
    embedded: str | None, upstream: str | None, *, bos: str | None, eos: str | None
) -> Finding | None:
    """A finding when both templates exist and differ, with the first difference of their renders."""
    if embedded is None or upstream is None or embedded == upstream:
        return None
    old, new = _render(embedded, bos, eos), _render(upstream, bos, eos)
    if old == new:
        detail = "The two texts differ but render this probe conversation identically."
    else:
        at = next(
            (i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new))
        )
        detail = (
            f"Rendering a system/user/assistant/user conversation, they first differ at character {at}: "
            f"embedded {old[at : at + 60]!r}, upstream {new[at : at + 60]!r}."
        )
    return STALE_EMBEDDED_TEMPLATE.finding(explanation=f"{STALE_EMBEDDED_TEMPLATE.explanation} {detail}")
