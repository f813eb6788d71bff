"""`stacklock init`: a starter manifest written from what a GGUF file says about itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

from stacklock.engines.machine import installed_engine_version
from stacklock.gguf.reader import read_gguf
from stacklock.registry.files import bundled_templates_for
from stacklock.template.sandbox import template_features

#: The engine version a starter manifest asks for when no engine is installed: the one stacklock is tested with.
TESTED_ENGINE_VERSION = "0.3.36"


def _toml_str(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


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
        template_note = "# The chat template embedded in the model file."
        system_ok = "system-role-rejected" not in template_features(gguf.chat_template)
    else:
        candidates = bundled_templates_for(arch)
        if candidates:
            template = f"registry:{candidates[0]}"
            template_note = (
                "# The model file has no chat template; this known-good one comes from the registry."
            )
            notes.append(
                f"{gguf_path.name} has no chat template; using the registry's '{candidates[0]}' for {arch}"
            )
        else:
            template = "none"
            # "none" is a decision the user must see: engines serving the file still format chats, wrongly.
            template_note = "\n".join(
                (
                    f"# The model file has no chat template and the registry knows none for '{arch}'.",
                    '# "none" locks raw prompts only. Engines serving this file would still format chats their',
                    "# own way: llama-cpp-python with its llama-2 format, llama-server with ChatML, Ollama with",
                    "# its Modelfile TEMPLATE ('{{ .Prompt }}' unless you write one). To test chats, set",
                    '# source = "file:TEMPLATE.jinja" with the model\'s own template.',
                )
            )
            notes.append(
                f"{gguf_path.name} has no chat template and the registry has none for '{arch}'; "
                "set template.source to 'file:TEMPLATE.jinja' to test chats"
            )

    installed = installed_engine_version("llama-cpp-python")
    engine_version = installed or TESTED_ENGINE_VERSION
    smoke = [
        "[[smoke]]",
        'name = "completion"',
        'prompt = "The capital of France is"',
        "max-tokens = 16",
    ]
    if template != "none":
        smoke = [
            "[[smoke]]",
            'name = "greeting"',
            'messages = [{ role = "user", content = "Say hello in one short sentence." }]',
            "",
            "[[smoke]]",
            'name = "arithmetic"',
            *(['system = "You are a terse assistant."'] if system_ok else []),
            'messages = [{ role = "user", content = "What is 2 + 3? Answer with one number." }]',
            "max-tokens = 8",
            "",
            *smoke,
        ]
    lines = [
        "# llmstack.toml: every link of one local LLM stack. `stacklock lock` pins it into llmstack.lock.",
        "",
        "[stack]",
        f"name = {_toml_str(name)}",
        f"description = {_toml_str(f'{gguf.name or stem} ({arch}, {gguf.quantization}) on CPU')}",
        "",
        "[model]",
        f"source = {_toml_str(source)}",
        "",
        "[template]",
        template_note,
        f"source = {_toml_str(template)}",
        "",
        "[tokenizer]",
        'source = "gguf"',
        "",
        "[engine]",
        'name = "llama-cpp-python"',
        f'version = "=={engine_version}"',
        "",
        "[backend]",
        'kind = "cpu"',
        "",
        "[sampler]",
        "# Greedy decoding with a fixed seed: the outputs reproduce exactly on one machine.",
        "temperature = 0.0",
        "seed = 0",
        "max-tokens = 32",
        "",
        *smoke,
        "",
    ]
    return "\n".join(lines), notes
