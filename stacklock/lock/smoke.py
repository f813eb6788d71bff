"""Smoke prompts as the lock pins them: the exact rendered text, and whether tokenization adds BOS."""

from __future__ import annotations

from stacklock.errors import TemplateError
from stacklock.files.digest import sha256_text
from stacklock.model.lock import (
    SmokePin,
    TemplatePin,
)
from stacklock.model.manifest import Message, Smoke
from stacklock.model.tokenizer import TokenizerFingerprint
from stacklock.template.sandbox import render_chat_template


def render_smoke(smoke: SmokePin, template: TemplatePin, tokenizer: TokenizerFingerprint) -> str:
    """The exact prompt text of a smoke prompt: the raw prompt, or the conversation rendered by the template."""
    if smoke.kind == "raw":
        return smoke.prompt or ""
    if template.text is None:
        raise TemplateError(
            f"smoke '{smoke.name}': a chat needs a chat template, and the stack has none ({template.origin})",
            hint="set template.source (e.g. 'registry:gemma3-it' or 'file:template.jinja') or use a raw prompt",
        )
    return render_chat_template(
        template.text,
        [m.model_dump() for m in smoke.messages or ()],
        add_generation_prompt=smoke.add_generation_prompt,
        bos_token=tokenizer.bos_text,
        eos_token=tokenizer.eos_text,
        extra_context=template.variables,
        now=template.now,
        origin=template.origin,
    )


def effective_add_bos(smoke: SmokePin, rendered: str, tokenizer: TokenizerFingerprint) -> bool:
    """Whether tokenization adds BOS to a rendered prompt.

    Raw prompts get the tokenizer's add-bos. A chat whose render already starts with the BOS text (the template
    emits ``bos_token``) is tokenized without adding another, as transformers' ``apply_chat_template`` does;
    otherwise the prompt would start with two BOS tokens, a classic cause of degraded output.
    """
    add_bos = tokenizer.add_bos is not False
    if smoke.kind == "chat" and tokenizer.bos_text and rendered.startswith(tokenizer.bos_text):
        return False
    return add_bos


def _smoke_pin(smoke: Smoke, default_max_tokens: int) -> SmokePin:
    """A smoke prompt as the lock pins it, before its render is known."""
    conversation = smoke.conversation()
    return SmokePin(
        name=smoke.name,
        kind="raw" if smoke.prompt is not None else "chat",
        messages=tuple(Message.model_validate(m) for m in conversation)
        if smoke.messages is not None
        else None,
        add_generation_prompt=smoke.add_generation_prompt,
        prompt=smoke.prompt,
        max_tokens=smoke.max_tokens or default_max_tokens,
        expect=smoke.expect,
        rendered_sha256="",
    )


def _rendered(pin: SmokePin, template: TemplatePin, tokenizer: TokenizerFingerprint) -> SmokePin:
    rendered = render_smoke(pin, template, tokenizer)
    digest = sha256_text(rendered)
    add_bos = effective_add_bos(pin, rendered, tokenizer)
    return pin.model_copy(update={"rendered": rendered, "rendered_sha256": digest, "add_bos": add_bos})
