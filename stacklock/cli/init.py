"""`stacklock init`: a starter manifest written from what a GGUF file says about itself."""

from __future__ import annotations

import os
from pathlib import Path

import tomlkit
from tomlkit.items import Table

from stacklock.engines.machine import installed_engine_version
from stacklock.engines.plugins import adapter_info
from stacklock.gguf.reader import read_gguf
from stacklock.registry.files import bundled_templates_for
from stacklock.template.sandbox import template_features

#: The engine a starter manifest names: the embedded one, which runs without a server.
STARTER_ENGINE = "llama-cpp-python"


def starter_manifest(gguf_path: Path, manifest_dir: Path) -> tuple[str, list[str]]:
    """The text of a starter llmstack.toml for a GGUF file, and notes for the user."""
    gguf = read_gguf(gguf_path)
    notes: list[str] = []
    arch = gguf.architecture or "unknown"
    try:
        source = Path(os.path.relpath(gguf_path.resolve(), manifest_dir.resolve())).as_posix()
    except ValueError:  # Another drive on Windows.
        source = gguf_path.resolve().as_posix()
    stem = gguf_path.name.removesuffix(".gguf").lower()
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-._") or "stack"

    system_ok = True
    if gguf.chat_template is not None:
        template = "gguf"
        template_note = "The chat template embedded in the model file."
        system_ok = "system-role-rejected" not in template_features(gguf.chat_template)
    else:
        candidates = bundled_templates_for(arch)
        if candidates:
            template = f"registry:{candidates[0]}"
            template_note = (
                "The model file has no chat template; this known-good one comes from the registry."
            )
            notes.append(
                f"{gguf_path.name} has no chat template; using the registry's '{candidates[0]}' for {arch}"
            )
        else:
            template = "none"
            # "none" is a decision the user must see: engines serving the file still format chats, wrongly.
            template_note = "\n".join(
                (
                    f"The model file has no chat template and the registry knows none for '{arch}'.",
                    '"none" locks raw prompts only. Engines serving this file would still format chats their',
                    "own way: llama-cpp-python with its llama-2 format, llama-server with ChatML, Ollama with",
                    "its Modelfile TEMPLATE ('{{ .Prompt }}' unless you write one). To test chats, set",
                    'source = "file:TEMPLATE.jinja" with the model\'s own template.',
                )
            )
            notes.append(
                f"{gguf_path.name} has no chat template and the registry has none for '{arch}'; "
                "set template.source to 'file:TEMPLATE.jinja' to test chats"
            )

    # Without the engine installed, the version its adapter says stacklock is tested with.
    info = adapter_info(STARTER_ENGINE)
    engine_version = installed_engine_version(STARTER_ENGINE) or (info and info.tested_version)
    smoke = tomlkit.aot()
    if template != "none":
        smoke.append(_smoke("greeting", "Say hello in one short sentence."))
        system = "You are a terse assistant." if system_ok else None
        smoke.append(
            _smoke("arithmetic", "What is 2 + 3? Answer with one number.", system=system, max_tokens=8)
        )
    completion = tomlkit.table()
    completion.update({"name": "completion", "prompt": "The capital of France is", "max-tokens": 16})
    smoke.append(completion)

    doc = tomlkit.document()
    doc.add(
        tomlkit.comment(
            "llmstack.toml: every link of one local LLM stack. `stacklock lock` pins it into llmstack.lock."
        )
    )
    doc.add(tomlkit.nl())
    doc["stack"] = _table(
        {"name": name, "description": f"{gguf.name or stem} ({arch}, {gguf.quantization}) on CPU"}
    )
    doc["model"] = _table({"source": source})
    doc["template"] = _table({"source": template}, note=template_note)
    doc["tokenizer"] = _table({"source": "gguf"})
    doc["engine"] = _table(
        {"name": STARTER_ENGINE, "version": f"=={engine_version}" if engine_version else ""}
    )
    doc["backend"] = _table({"kind": "cpu"})
    doc["sampler"] = _table(
        {"temperature": 0.0, "seed": 0, "max-tokens": 32},
        note="Greedy decoding with a fixed seed: the outputs reproduce exactly on one machine.",
    )
    doc["smoke"] = smoke
    return tomlkit.dumps(doc), notes


def _table(values: dict[str, object], *, note: str | None = None) -> Table:
    table = tomlkit.table()
    for line in (note or "").splitlines():
        table.add(tomlkit.comment(line))
    table.update(values)
    table.add(tomlkit.nl())
    return table


def _smoke(name: str, content: str, *, system: str | None = None, max_tokens: int | None = None) -> Table:
    table = tomlkit.table()
    table["name"] = name
    if system is not None:
        table["system"] = system
    message = tomlkit.inline_table()
    message.update({"role": "user", "content": content})
    messages = tomlkit.array()
    messages.append(message)
    table["messages"] = messages
    if max_tokens is not None:
        table["max-tokens"] = max_tokens
    return table
