"""`stacklock inspect`: what a GGUF file says about itself, for people and for scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stacklock.gguf.reader import GGUFArray, read_gguf, value_type_name
from stacklock.gguf.tokenizer import fingerprint_tokenizer

NO_TEMPLATE = (
    "this GGUF carries no chat template (tokenizer.chat_template is absent): engines fall back to a default "
    "format (llama.cpp: chatml, llama-cpp-python: llama-2); pin one with template.source in llmstack.toml"
)


def inspect_gguf(path: Path) -> dict[str, Any]:
    """A JSON-ready summary: identity, tensors, every scalar metadata key, templates and the tokenizer."""
    gguf = read_gguf(path)
    metadata: dict[str, Any] = {}
    for key in sorted(gguf.metadata):
        value = gguf.metadata[key]
        if key.startswith("tokenizer.chat_template"):
            continue
        if isinstance(value, GGUFArray):
            metadata[key] = f"<{value_type_name(value.item_type)}[{value.count}]>"
        else:
            metadata[key] = value
    tokenizer = fingerprint_tokenizer(gguf) if "tokenizer.ggml.tokens" in gguf.metadata else None
    return {
        "path": str(path),
        "parts": [str(p) for p in gguf.parts],
        "gguf-version": gguf.version,
        "architecture": gguf.architecture,
        "name": gguf.name,
        "parameter-count": gguf.parameter_count,
        "quantization": gguf.quantization,
        "tensor-types": gguf.tensor_type_counts,
        "context-length": gguf.context_length,
        "chat-template": gguf.chat_template,
        "named-chat-templates": gguf.named_chat_templates,
        "tokenizer": tokenizer.model_dump(mode="json", by_alias=True) if tokenizer else None,
        "metadata": metadata,
    }


def render_inspection(report: dict[str, Any]) -> str:
    lines = [
        f"file          {report['path']}"
        + (f" ({len(report['parts'])} parts)" if len(report["parts"]) > 1 else ""),
        f"gguf version  {report['gguf-version']}",
        f"architecture  {report['architecture'] or '(not set)'}",
        f"name          {report['name'] or '(not set)'}",
        f"parameters    {report['parameter-count']:,}",
        f"quantization  {report['quantization']}",
        "tensor types  " + ", ".join(f"{k} x{v}" for k, v in report["tensor-types"].items()),
        f"context       {report['context-length'] or '(not set)'}",
    ]
    tok = report["tokenizer"]
    if tok is None:
        lines.append("tokenizer     none in this file")
    else:
        lines += [
            f"tokenizer     {tok['kind']}" + (f" (pre: {tok['pre']})" if tok.get("pre") else ""),
            f"  vocabulary  {tok['vocab-size']:,} tokens, sha256 {tok['tokens-sha256'][:16]}…",
            f"  bos / eos   {_special(tok, 'bos')} / {_special(tok, 'eos')}",
            f"  add-bos {tok.get('add-bos')}, add-eos {tok.get('add-eos')}, add-space-prefix {tok.get('add-space-prefix')}",
        ]
    template = report["chat-template"]
    if template is None:
        lines.append(f"chat template none: {NO_TEMPLATE}")
    else:
        lines += ["chat template", *("  " + line for line in template.splitlines())]
    for name, text in report["named-chat-templates"].items():
        lines += [f"chat template '{name}'", *("  " + line for line in text.splitlines())]
    lines.append("metadata")
    lines += [f"  {key} = {_short(value)}" for key, value in report["metadata"].items()]
    return "\n".join(lines)


def _special(tok: dict[str, Any], which: str) -> str:
    token_id = tok.get(f"{which}-id")
    if token_id is None:
        return "(none)"
    text = tok.get(f"{which}-text")
    return f"{token_id} {text!r}" if text is not None else str(token_id)


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 100 else text[:97] + "..."
