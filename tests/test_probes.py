"""Template probes on real tiny GGUFs: each probe fires on a model built to trigger it, and on no clean model.

Each model carries its chat template in the file (``template.source = "gguf"``), so the probes see exactly what
`stacklock lock` sees; the lock goes through its text form, as `check` reads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stacklock.engines.machine import installed_engine_version
from stacklock.lock.load import load_inputs
from stacklock.lock.resolve import resolve
from stacklock.model.findings import Severity
from stacklock.model.lock import Lock, parse_lock, render_lock
from stacklock.rules.builtin import BUILTIN_REGISTRY, all_checks
from stacklock.rules.check import check_stack
from stacklock.template.corpus import CORPUS
from stacklock.template.probes import run_probes
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf, gemma_model_path

Cli = Callable[..., Result]

LCP_VERSION = installed_engine_version("llama-cpp-python") or "0.3.36"
PROBES = {check.id for check in all_checks() if check.family == "template-probes"}

# Ids in the tiny SentencePiece vocabulary (tests/gguf_builder.py: <unk>, <s>, </s>, 256 bytes, then controls).
START_OF_TURN, END_OF_TURN, IM_START, IM_END = 259, 260, 261, 262

GEMMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML_TOOLS = CHATML.replace(
    "{% for m in messages %}",
    "{% if tools %}<|im_start|>system\ntools{{ tools | tojson }}<|im_end|>\n{% endif %}{% for m in messages %}",
)


def _chatml(**replace: str) -> str:
    text = CHATML
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def manifest(
    *, engine: str = "llama-cpp-python", version: str = f"=={LCP_VERSION}", variables: str = ""
) -> str:
    return (
        '[stack]\nname = "probes"\n\n[model]\nsource = "tiny.gguf"\n\n[template]\nsource = "gguf"\n'
        f'{variables}\n[engine]\nname = "{engine}"\nversion = "{version}"\n\n[backend]\nkind = "cpu"\n\n[sampler]\ntemperature = 0.0\nmax-tokens = 4\n\n'
        '[[smoke]]\nname = "hello"\nmessages = [{ role = "user", content = "Hello" }]\n'
    )


def lock_of(directory: Path, template: str, manifest_text: str | None = None, **gguf: Any) -> Lock:
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_gguf(directory / "tiny.gguf", chat_template=template, **gguf)
    (directory / "llmstack.toml").write_text(manifest_text or manifest())
    return parse_lock(render_lock(resolve(load_inputs(directory / "llmstack.toml")).lock))


def probe_ids(lock: Lock) -> set[str]:
    return {f.rule for f in lock.findings if f.registry == BUILTIN_REGISTRY and f.rule in PROBES}


def only(lock: Lock, probe: str) -> str:
    """The one probe finding of a lock, which must be ``probe``; its title."""
    assert probe_ids(lock) == {probe}
    (finding,) = (f for f in lock.findings if f.rule == probe)
    return finding.title


# -- Clean controls: no probe fires ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "gguf"),
    [
        (CHATML, {}),
        (CHATML, {"tokenizer": "gpt2"}),
        (CHATML_TOOLS, {}),
        (GEMMA_LIKE, {"eot_id": END_OF_TURN}),
        (_chatml(**{"{% for": "{% if persona is defined %}{{ persona }}{% endif %}{% for"}), {}),
    ],
    ids=["chatml-spm", "chatml-bpe", "chatml-tools", "gemma-like", "guarded-variable"],
)
def test_clean_templates_raise_no_probe(tmp_path: Path, template: str, gguf: dict[str, Any]) -> None:
    lock = lock_of(tmp_path, template, **gguf)
    assert probe_ids(lock) == set()
    assert not {f for f in lock.findings if f.registry == BUILTIN_REGISTRY}


def test_a_set_variable_is_not_undefined(tmp_path: Path) -> None:
    template = _chatml(**{"{% for": "{{ persona }}{% for"})
    lock = lock_of(tmp_path, template, manifest(variables='variables = { persona = "x" }\n'))
    assert probe_ids(lock) == set()


@pytest.mark.gemma
def test_the_gemma_stack_raises_no_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = gemma_model_path()
    if model is None:
        pytest.skip("the Gemma 3 270M package is not installed (the 'example' extra)")
    # The manifest names the installed model by its absolute path: the user allows its directory.
    monkeypatch.setenv("STACKLOCK_ALLOW_PATHS", str(model.parent))
    (tmp_path / "llmstack.toml").write_text(
        manifest()
        .replace('source = "tiny.gguf"', f'source = "{model.as_posix()}"')
        .replace('source = "gguf"', 'source = "registry:gemma3-it"')
    )
    lock = resolve(load_inputs(tmp_path / "llmstack.toml")).lock
    assert "<start_of_turn>" in lock.model.special_texts
    assert probe_ids(lock) == set()
    run = run_probes(lock)
    assert (set(run.ran), run.skipped) == (PROBES, {})


# -- Each probe fires on the model built to trigger it ---------------------------------------------------------


def test_generation_prompt_ignored(tmp_path: Path) -> None:
    template = _chatml(**{"{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}": ""})
    lock = lock_of(tmp_path, template)
    assert only(lock, "tmpl-generation-prompt-ignored") == "The template ignores add_generation_prompt"
    # An error: the lock refuses it until allowed.
    assert (
        resolve(load_inputs(tmp_path / "llmstack.toml")).blocking[0].rule == "tmpl-generation-prompt-ignored"
    )


def test_turn_terminator_not_end_of_generation(tmp_path: Path) -> None:
    # The vocabulary's <|im_end|> is renamed: the template closes turns with a control token that is no EOG.
    template = _chatml(**{"<|im_end|>": "<|turn_end|>"})
    lock = lock_of(tmp_path, template, tokens_override={IM_END: "<|turn_end|>"})
    title = only(lock, "tmpl-turn-terminator-not-eog")
    assert "'<|turn_end|>'" in title
    (finding,) = (f for f in lock.findings if f.rule == "tmpl-turn-terminator-not-eog")
    assert finding.severity is Severity.ERROR
    assert "<end_of_turn>" in finding.explanation  # The EOG texts of the vocabulary are named.


def test_turn_terminator_other_than_the_locked_eot_text(tmp_path: Path) -> None:
    # llama.cpp infers EOT as the first known text in the vocabulary (<|im_end|> here) while the template closes
    # turns with <end_of_turn>: both stop llama.cpp, but the lock's eot-text is not the template's.
    lock = lock_of(tmp_path, GEMMA_LIKE)
    assert lock.tokenizer.eot_text == "<|im_end|>"
    title = only(lock, "tmpl-turn-terminator-not-locked-eot")
    assert title == "The template closes turns with '<end_of_turn>' but the lock's eot-text is '<|im_end|>'"


def test_markers_that_are_not_special_tokens(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    lock = lock_of(tmp_path, template)
    title = only(lock, "tmpl-marker-not-special-token")
    assert title.startswith("The template emits <|assistant|>, <|system|>, <|tool|>, <|user|>,")


def test_empty_render(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, "{% for m in messages %}{% endfor %}")
    assert {"tmpl-render-empty", "tmpl-generation-prompt-ignored"} <= probe_ids(lock)


def test_content_missing(tmp_path: Path) -> None:
    template = _chatml(**{"{% for m in messages %}": "{% for m in messages if m['role'] != 'system' %}"})
    lock = lock_of(tmp_path, template)
    assert only(lock, "tmpl-content-missing") == (
        "The template drops a message's content: 'probe system instruction to be brief' (system-user)"
    )


def test_multiturn_prefix_unstable(tmp_path: Path) -> None:
    # The last message is rendered differently from earlier ones (as Mistral v1 does with the system prompt).
    template = _chatml(**{"{{ m['content'] }}": "{{ m['content'] }}{% if loop.last %} now{% endif %}"})
    lock = lock_of(tmp_path, template)
    assert only(lock, "tmpl-multiturn-prefix-unstable") == (
        "Adding an assistant turn rewrites the earlier render (not a prefix)"
    )


@pytest.mark.skipif(
    installed_engine_version("vllm") is not None, reason="the lock would pin the installed vllm"
)
def test_double_bos_on_an_engine_that_adds_it(tmp_path: Path) -> None:
    vllm = manifest(engine="vllm", version="==0.8.0")
    lock = lock_of(tmp_path / "vllm", "{{ bos_token }}" + CHATML, vllm)
    assert only(lock, "tok-double-bos") == "Double BOS: the template emits '<s>' and vllm adds BOS too"
    # Not when the tokenizer adds no BOS, nor on an engine that strips the template's BOS.
    assert probe_ids(lock_of(tmp_path / "no-add", "{{ bos_token }}" + CHATML, vllm, add_bos=False)) == set()
    assert probe_ids(lock_of(tmp_path / "lcp", "{{ bos_token }}" + CHATML)) == set()


def test_double_bos_on_a_llama_cpp_build_before_the_fix(tmp_path: Path) -> None:
    old = lock_of(
        tmp_path / "old", "{{ bos_token }}" + CHATML, manifest(engine="llama.cpp", version="==b4600")
    )
    new = lock_of(
        tmp_path / "new", "{{ bos_token }}" + CHATML, manifest(engine="llama.cpp", version="==b4628")
    )
    assert "tok-double-bos" in probe_ids(old)
    assert "tok-double-bos" not in probe_ids(new)


def test_roles_rejected_are_named_once(tmp_path: Path) -> None:
    raising = (
        "{% for m in messages %}{% if m['role'] in ['system', 'tool'] %}"
        "{{ raise_exception(m['role'] + ' role not supported') }}{% endif %}{% endfor %}"
    )
    lock = lock_of(tmp_path, raising + CHATML_TOOLS)
    title = only(lock, "tmpl-role-rejected")
    assert title == "The template rejects the system and tool role"
    (finding,) = (f for f in lock.findings if f.rule == "tmpl-role-rejected")
    assert "system role not supported" in finding.explanation


def test_tool_role_is_not_asked_of_a_template_without_tools(tmp_path: Path) -> None:
    raising = "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no') }}{% endif %}{% endfor %}"
    assert probe_ids(lock_of(tmp_path, raising + CHATML)) == set()


def test_clock(tmp_path: Path) -> None:
    template = _chatml(
        **{"{% for": "<|im_start|>system\nToday is {{ strftime_now('%d %b %Y') }}<|im_end|>\n{% for"}
    )
    assert (
        only(lock_of(tmp_path, template), "tmpl-uses-clock")
        == "The render depends on the date (strftime_now)"
    )


def test_undefined_variable(tmp_path: Path) -> None:
    template = _chatml(**{"{% for": "{{ persona }}{% for"})
    assert only(lock_of(tmp_path, template), "tmpl-undefined-variable") == (
        "The template reads undefined variables: persona"
    )


# -- The probes as a family ------------------------------------------------------------------------------------


def test_probes_without_a_template_are_skipped_with_a_reason(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, CHATML).model_copy(update={"findings": ()})
    bare = lock.model_copy(update={"template": lock.template.model_copy(update={"text": None})})
    run = run_probes(bare)
    assert run.findings == ()
    assert run.ran == ()
    assert set(run.skipped) == PROBES
    assert set(run.skipped.values()) == {"the stack has no chat template"}


def test_a_conversation_the_template_cannot_render_skips_its_probes(tmp_path: Path) -> None:
    # A template that renders nothing but assistant turns raises on every user-only conversation.
    template = "{% for m in messages %}{{ raise_exception('x') if m['role'] == 'user' }}{% endfor %}"
    lock = lock_of(tmp_path, CHATML)
    run = run_probes(
        lock.model_copy(update={"template": lock.template.model_copy(update={"text": template})})
    )
    assert "tmpl-generation-prompt-ignored" in run.skipped
    assert run.skipped["tmpl-generation-prompt-ignored"].startswith(
        "the 'single-user' conversation does not render"
    )


def test_check_runs_the_probes_from_the_lock(tmp_path: Path) -> None:
    template = _chatml(**{"{% for": "{{ persona }}{% for"})
    lock = lock_of(tmp_path, template).model_copy(update={"findings": ()})
    result = check_stack(lock, (), None)
    assert [f.rule for f in result.findings] == ["tmpl-undefined-variable"]
    assert "tmpl-undefined-variable" in result.coverage.checks_ran


def test_every_probe_is_catalogued_with_its_text() -> None:
    assert len(PROBES) == 11
    for check in all_checks():
        assert check.title
        assert check.explanation
        assert check.fix
    assert len({c.name for c in CORPUS}) == len(CORPUS)


def test_probes_are_fast_on_a_warm_template(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, GEMMA_LIKE, eot_id=END_OF_TURN)
    run_probes(lock)
    start = time.perf_counter()
    run_probes(lock)
    # The benchmark (benchmarks/bench_probes.py) measures the real figure; this only catches a pathology.
    assert time.perf_counter() - start < 5.0


def test_a_lock_from_before_the_probes_does_not_judge_markers(tmp_path: Path) -> None:
    # Such a lock lists only known end-of-turn texts (here not <|im_start|>): its markers are not judged.
    lock = lock_of(tmp_path, CHATML)
    old = lock.model.model_copy(update={"special_texts": ("<|im_end|>",), "special_texts_complete": False})
    run = run_probes(lock.model_copy(update={"model": old}))
    assert run.findings == ()
    assert run.skipped == {
        "tmpl-marker-not-special-token": (
            "the lock does not list every special token of the vocabulary; re-lock to probe markers"
        )
    }
