"""Seed rules fire on the facts of real locks of tiny GGUF files, and stay quiet on the fixed variant.

The rule cases in tests/data/rules exercise each rule's predicate on hand-written facts; these tests close the
gap between those facts and the lock: a rule whose fact the resolver never produces, or produces under
another name or type, fires in the data tests and never for a user.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from stacklock.engines.machine import installed_engine_version
from stacklock.lock.load import load_inputs
from stacklock.lock.resolve import resolve
from stacklock.model.lock import Lock, parse_lock, render_lock
from stacklock.registry.files import load_bundled_registry
from stacklock.rules.facts import facts_from_lock
from stacklock.rules.predicates import KNOWN_FACTS, OPEN_FACT_PREFIXES
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

Cli = Callable[..., Result]

RULES = {rule.id: rule for rule in load_bundled_registry().rules}
# The engine lock resolves against: the installed llama-cpp-python when there is one, else a pinned version.
LCP_VERSION = installed_engine_version("llama-cpp-python") or "0.3.36"

RAW_SMOKE = """
[[smoke]]
name = "raw"
prompt = "Once upon a time"
max-tokens = 4
"""

CHAT_SMOKE = """
[[smoke]]
name = "hello"
messages = [{ role = "user", content = "Hello" }]
max-tokens = 4
"""

SYSTEM_SMOKE = """
[[smoke]]
name = "hello"
system = "Be brief."
messages = [{ role = "user", content = "Hello" }]
"""

# Gemma 1/2's template: it raises on a system message instead of rendering it.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
BOS_CHATML = "{{ bos_token }}" + CHATML

MISSING_TEMPLATE_LCP = "tmpl-gguf-missing-template-llama-cpp-python"


def manifest(
    *,
    template: str = "gguf",
    engine: str = "llama-cpp-python",
    version: str = f"=={LCP_VERSION}",
    backend: str = "",
    sampler: str = "temperature = 0.0",
    smoke: str = RAW_SMOKE,
) -> str:
    return (
        f'[stack]\nname = "facts"\n\n[model]\nsource = "tiny.gguf"\n\n[template]\nsource = "{template}"\n\n'
        f'[engine]\nname = "{engine}"\nversion = "{version}"\n\n[backend]\nkind = "cpu"\n{backend}\n'
        f"[sampler]\n{sampler}\n{smoke}"
    )


def lock_of(directory: Path, manifest_text: str, **gguf: Any) -> Lock:
    """Resolve a real tiny GGUF; the lock goes through its text form, as `check` reads it."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_gguf(directory / "tiny.gguf", **gguf)
    (directory / "llmstack.toml").write_text(manifest_text)
    lock = resolve(load_inputs(directory / "llmstack.toml")).lock
    return parse_lock(render_lock(lock))


def fired(lock: Lock) -> set[str]:
    return {f.rule for f in lock.findings}


def rule_facts(data: object) -> Iterator[str]:
    """Every fact a rule's ``when`` data names, however deeply nested."""
    if isinstance(data, Mapping):
        if "fact" in data:
            yield str(data["fact"])
        for value in data.values():
            yield from rule_facts(value)
    elif isinstance(data, list | tuple):
        for item in data:
            yield from rule_facts(item)


def assert_fires_on_lock_facts(lock: Lock, rule_id: str) -> None:
    """The rule fires on ``facts_from_lock``, what `check` evaluates, not only on what resolution saw."""
    facts = facts_from_lock(lock)
    assert set(rule_facts(RULES[rule_id].when.data)) <= set(facts) | {
        # Facts a rule tests for absence, or in a branch for another engine, need not be there.
        "tokenizer.pre",
        "engine.build",
        "engine.version",
    }
    assert RULES[rule_id].matches(facts)


# -- Every fact the seed rules use is one the lock produces ---------------------------------------------------


def test_every_fact_the_bundled_rules_use_is_produced_by_a_lock(tmp_path: Path) -> None:
    # A lock with every optional fact filled: a BPE tokenizer with its pre-tokenizer, an embedded template, an
    # engine with a vendored build.
    lock = lock_of(
        tmp_path,
        manifest(smoke=CHAT_SMOKE),
        tokenizer="gpt2",
        chat_template=BOS_CHATML,
        eot_id=None,
        extra_metadata={"general.sampling.top_k": 20},
    )
    facts = facts_from_lock(lock)
    used = {fact for rule in RULES.values() for fact in rule_facts(rule.when.data)}
    # gguf.* facts name metadata keys that only some files have; they come from the file as they are.
    missing = sorted(f for f in used if not f.startswith(OPEN_FACT_PREFIXES[0]) and f not in facts)
    assert missing == []
    assert facts["gguf.general.sampling.top_k"] == 20
    assert facts["tokenizer.pre"] == "gpt-2"
    assert facts["template.dialect"] == "jinja2"
    assert "bos-token" in facts["template.features"]  # type: ignore[operator]


def test_every_known_fact_is_produced_by_a_lock(tmp_path: Path) -> None:
    # KNOWN_FACTS is what rule authors are told they can test; a name there that no lock produces makes a
    # rule that never fires. The SentencePiece vocabulary gets Llama 3.1's <|eom_id|> so that eom-id is set.
    lock = lock_of(
        tmp_path, manifest(smoke=CHAT_SMOKE), chat_template=BOS_CHATML, tokens_override={261: "<|eom_id|>"}
    )
    facts = facts_from_lock(lock)
    assert sorted(set(KNOWN_FACTS) - set(facts)) == ["tokenizer.pre"]  # SentencePiece has none.


def test_fact_types_match_what_the_rules_compare(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(), chat_template=CHATML)
    facts = facts_from_lock(lock)
    assert isinstance(facts["engine.build"], int)
    assert isinstance(facts["engine.version"], str)
    assert facts["template.present"] is True
    assert facts["model.has-chat-template"] is True
    assert facts["template.source"] == "gguf"
    assert isinstance(facts["tokenizer.special-texts"], tuple)
    assert isinstance(facts["template.features"], tuple)
    assert facts["backend.flash-attention"] in ("on", "off", "auto")
    assert facts["backend.cache-type-v"] == "f16"


# -- A GGUF without a chat template ---------------------------------------------------------------------------


def test_missing_template_on_llama_cpp_python_stops_the_lock(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "llmstack.toml").write_text(manifest())
    result = cli("lock", cwd=tmp_path)
    rule = RULES[MISSING_TEMPLATE_LCP]
    assert result.code == 1
    assert result.err == (
        "hashing tiny.gguf\n"  # The reporter's one line per step, on a pipe.
        f"error: rule {rule.id}: {rule.title}; {rule.fix} — or accept it with --allow {rule.id} --reason TEXT\n"
    )
    assert not (tmp_path / "llmstack.lock").exists()


def test_allowed_missing_template_is_locked_recorded_and_shown_by_check(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "llmstack.toml").write_text(manifest())
    reason = "raw prompts only; no chat"
    result = cli("lock", "--allow", MISSING_TEMPLATE_LCP, "--reason", reason, cwd=tmp_path)
    assert result.code == 0, result.err
    assert f"error: {MISSING_TEMPLATE_LCP}: {RULES[MISSING_TEMPLATE_LCP].title} (allowed)\n" in result.err
    lock = parse_lock((tmp_path / "llmstack.lock").read_text())
    assert [(a.rule, a.reason) for a in lock.allowances] == [(MISSING_TEMPLATE_LCP, reason)]
    assert MISSING_TEMPLATE_LCP in fired(lock)
    assert_fires_on_lock_facts(lock, MISSING_TEMPLATE_LCP)

    checked = cli("check", cwd=tmp_path)
    assert checked.code == 0, checked.out + checked.err
    assert f"error: {MISSING_TEMPLATE_LCP}: {RULES[MISSING_TEMPLATE_LCP].title} (allowed: {reason})" in (
        checked.out.splitlines()
    )


def test_missing_template_does_not_fire_with_an_explicit_template(tmp_path: Path) -> None:
    (tmp_path).mkdir(exist_ok=True)
    (tmp_path / "chat.jinja").write_text(CHATML)
    lock = lock_of(tmp_path, manifest(template="file:chat.jinja", smoke=CHAT_SMOKE))
    assert MISSING_TEMPLATE_LCP not in fired(lock)
    # The file alone still has no template, which the info rule says.
    assert "tmpl-gguf-missing-template-explicit" in fired(lock)


def test_missing_template_does_not_fire_when_the_gguf_embeds_one(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(smoke=CHAT_SMOKE), chat_template=CHATML)
    assert not {r for r in fired(lock) if r.startswith("tmpl-gguf-missing-template")}


# -- A BPE vocabulary without tokenizer.ggml.pre --------------------------------------------------------------


def test_bpe_without_pre_tokenizer_is_warned_about(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "tiny.gguf", tokenizer="gpt2", pre=None, chat_template=CHATML)
    (tmp_path / "llmstack.toml").write_text(manifest(smoke=CHAT_SMOKE))
    result = cli("lock", cwd=tmp_path)
    assert result.code == 0, result.err
    rule = RULES["tok-bpe-pretokenizer-missing"]
    assert f"warning: {rule.id}: {rule.title}\n" in result.err
    lock = parse_lock((tmp_path / "llmstack.lock").read_text())
    assert lock.tokenizer.pre is None
    assert rule.id in fired(lock)
    assert "tokenizer.pre" not in facts_from_lock(lock)


def test_bpe_with_pre_tokenizer_is_not_warned_about(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(smoke=CHAT_SMOKE), tokenizer="gpt2", chat_template=CHATML)
    assert lock.tokenizer.pre == "gpt-2"
    assert "tok-bpe-pretokenizer-missing" not in fired(lock)


# -- Double BOS -----------------------------------------------------------------------------------------------


@pytest.fixture
def vllm_absent() -> None:
    if installed_engine_version("vllm") is not None:
        pytest.skip("vllm is installed here; the lock would pin the installed version")


@pytest.mark.usefixtures("vllm_absent")
def test_double_bos_on_an_engine_without_the_fix(tmp_path: Path) -> None:
    lock = lock_of(
        tmp_path, manifest(engine="vllm", version="==0.8.0", smoke=CHAT_SMOKE), chat_template=BOS_CHATML
    )
    assert (lock.engine.name, lock.engine.version, lock.tokenizer.add_bos) == ("vllm", "0.8.0", True)
    # A template probe now (the render starts with the BOS text), no longer a rule over the template's features.
    assert "tok-double-bos" in fired(lock)


@pytest.mark.usefixtures("vllm_absent")
def test_no_double_bos_when_the_tokenizer_does_not_add_bos(tmp_path: Path) -> None:
    lock = lock_of(
        tmp_path,
        manifest(engine="vllm", version="==0.8.0", smoke=CHAT_SMOKE),
        chat_template=BOS_CHATML,
        add_bos=False,
    )
    assert "tok-double-bos" not in fired(lock)


def test_no_double_bos_on_llama_cpp_python_which_strips_it(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(smoke=CHAT_SMOKE), chat_template=BOS_CHATML)
    assert not {"tok-double-bos", "tok-double-bos-llama-cpp-python"} & fired(lock)


def test_double_bos_on_llama_cpp_builds_without_the_fix(tmp_path: Path) -> None:
    broken = lock_of(
        tmp_path / "broken",
        manifest(engine="llama.cpp", version="==b4600", smoke=CHAT_SMOKE),
        chat_template=BOS_CHATML,
    )
    fixed = lock_of(
        tmp_path / "fixed",
        manifest(engine="llama.cpp", version="==b4628", smoke=CHAT_SMOKE),
        chat_template=BOS_CHATML,
    )
    assert "tok-double-bos-llamacpp-jinja" in fired(broken)
    assert "tok-double-bos-llamacpp-jinja" not in fired(fixed)


# -- Gemma's system role --------------------------------------------------------------------------------------


def test_template_rejecting_system_role_without_a_system_smoke_is_info(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(smoke=CHAT_SMOKE), chat_template=GEMMA_TEMPLATE)
    assert "system-role-rejected" in lock.template.features
    assert "tmpl-role-rejected" in fired(lock)
    assert "tmpl-system-role-rejected-by-engine" not in fired(lock)


def test_system_smoke_on_a_template_rejecting_it_names_the_rule(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=GEMMA_TEMPLATE)
    (tmp_path / "llmstack.toml").write_text(manifest(smoke=SYSTEM_SMOKE))
    result = cli("lock", cwd=tmp_path)
    assert result.code == 1
    assert result.err.startswith("hashing tiny.gguf\nerror: rule tmpl-system-role-rejected-by-engine: ")


def test_system_smoke_on_a_template_rejecting_it_is_refused_in_one_line(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=GEMMA_TEMPLATE)
    (tmp_path / "llmstack.toml").write_text(manifest(smoke=SYSTEM_SMOKE))
    result = cli("lock", cwd=tmp_path)
    assert result.code != 0
    step, error = result.err.splitlines()
    assert step == "hashing tiny.gguf"
    assert error.startswith("error: ")
    assert not (tmp_path / "llmstack.lock").exists()


# -- A quantized V cache without flash attention --------------------------------------------------------------


def test_quantized_v_cache_without_flash_attention(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(backend='cache-type-v = "q8_0"'), chat_template=CHATML)
    assert (lock.backend.cache_type_v, lock.backend.flash_attention) == ("q8_0", "off")
    assert "be-kv-quant-v-requires-fa" in fired(lock)
    assert_fires_on_lock_facts(lock, "be-kv-quant-v-requires-fa")


def test_quantized_v_cache_with_flash_attention(tmp_path: Path) -> None:
    lock = lock_of(
        tmp_path, manifest(backend='cache-type-v = "q8_0"\nflash-attention = "on"'), chat_template=CHATML
    )
    assert "be-kv-quant-v-requires-fa" not in fired(lock)


# -- Llama 3 EOT vs EOS ---------------------------------------------------------------------------------------

# The tiny SentencePiece vocabulary: </s> is id 2 and <|im_end|> id 262; they become Llama 3's texts.
LLAMA3_TOKENS = {2: "<|end_of_text|>", 262: "<|eot_id|>"}


def test_llama3_eot_vs_eos_on_an_old_llama_cpp(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(engine="llama.cpp", version="==b2700"), tokens_override=LLAMA3_TOKENS)
    assert lock.tokenizer.eos_text == "<|end_of_text|>"
    assert "<|eot_id|>" in lock.model.special_texts
    assert "tok-llama3-eot-vs-eos" in fired(lock)
    assert_fires_on_lock_facts(lock, "tok-llama3-eot-vs-eos")


@pytest.mark.parametrize(
    ("version", "overrides"),
    [
        ("==b2702", LLAMA3_TOKENS),  # The build that stops on EOT.
        ("==b2700", {262: "<|eot_id|>"}),  # EOS is not <|end_of_text|>.
        ("==b2700", {2: "<|end_of_text|>"}),  # No <|eot_id|> in the vocabulary.
    ],
)
def test_llama3_eot_vs_eos_fixed_variants(tmp_path: Path, version: str, overrides: dict[int, str]) -> None:
    lock = lock_of(tmp_path, manifest(engine="llama.cpp", version=version), tokens_override=overrides)
    assert "tok-llama3-eot-vs-eos" not in fired(lock)


# -- An architecture on llama.cpp builds that predate its support ---------------------------------------------


def test_gemma2_on_a_build_without_soft_capping(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(engine="llama.cpp", version="==b3260"), arch="gemma2")
    assert (lock.model.architecture, lock.engine.build) == ("gemma2", 3260)
    rules = fired(lock)
    assert {"arch-gemma2-softcap", "arch-gemma2-sliding-window"} <= rules
    assert "arch-min-engine-build" not in rules  # b3259 loads Gemma 2.
    assert_fires_on_lock_facts(lock, "arch-gemma2-softcap")


def test_gemma2_on_a_build_without_the_architecture(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(engine="llama.cpp", version="==b3258"), arch="gemma2")
    assert "arch-min-engine-build" in fired(lock)


def test_gemma2_on_a_current_build(tmp_path: Path) -> None:
    lock = lock_of(tmp_path, manifest(engine="llama.cpp", version="==b3274"), arch="gemma2")
    assert not {"arch-gemma2-softcap", "arch-gemma2-sliding-window", "arch-min-engine-build"} & fired(lock)
