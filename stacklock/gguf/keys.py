"""GGUF metadata helpers that need no parsing, so that reading a cached header summary never imports numpy."""

from __future__ import annotations

from collections.abc import Mapping


def named_chat_templates(metadata: Mapping[str, object]) -> dict[str, str]:
    """The named templates of a GGUF (``tokenizer.chat_template.<name>``), by name."""
    prefix = "tokenizer.chat_template."
    return {
        key.removeprefix(prefix): value
        for key, value in sorted(metadata.items())
        if key.startswith(prefix) and isinstance(value, str)
    }
