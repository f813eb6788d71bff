"""The adapter conformance suite: what every engine adapter must do, whatever engine is behind it.

An adapter runs it against itself from a test module that imports these tests and defines a ``subject``
fixture yielding a :class:`Subject` (see ``test_conformance.py``, which runs it on every adapter stacklock
tests: llama-cpp-python on a tiny GGUF, and the fake engine)::

    from tests.engines.conformance import *  # noqa: F403

    @pytest.fixture(scope="module")
    def subject() -> Iterator[Subject]:
        ...

Each test states one part of the seam's contract (``stacklock.engines.base``): identity, tokenize and
detokenize, generation with top-k logprobs, determinism, errors, and the child-process session.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stacklock.engines.base import Engine, LoadedModel, observe
from stacklock.engines.plugins import adapter_class, adapter_info
from stacklock.engines.runner import EngineSession, RenderedSmoke
from stacklock.errors import EngineError, ExitCode, InputError
from stacklock.model.effective import EffectiveBackend, EffectiveSampler

__all__ = [
    "Subject",
    "backend_settings",
    "greedy_sampler",
    "test_a_model_file_the_engine_cannot_load_is_an_engine_error",
    "test_add_bos_is_honoured",
    "test_ascii_text_round_trips_through_tokenize_and_detokenize",
    "test_generation_is_deterministic",
    "test_greedy_generation_reports_sorted_top_k_logprobs",
    "test_identity_matches_the_registration",
    "test_max_tokens_is_honoured",
    "test_the_engine_session_observes_what_the_adapter_does_in_process",
]


@dataclass(frozen=True)
class Subject:
    """One adapter under test: its registered name, an engine, a model loaded in it, and what to feed it."""

    name: str
    engine: Engine
    loaded: LoadedModel
    model_path: Path
    broken_model: Path
    backend: EffectiveBackend
    text: str
    """ASCII text the model's vocabulary covers."""
    space_prefix: bool = False
    """The tokenizer adds a space before the text (SentencePiece), which detokenize gives back."""


def greedy_sampler(**changes: Any) -> EffectiveSampler:
    values: dict[str, Any] = {
        "temperature": 0.0,
        "top_k": 40,
        "top_p": 1.0,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
        "repeat_last_n": 64,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "mirostat": 0,
        "mirostat_tau": 5.0,
        "mirostat_eta": 0.1,
        "seed": 0,
        "max_tokens": 8,
        "stop": (),
        "origin": {},
    }
    return EffectiveSampler.model_validate({**values, **changes})


def backend_settings(**changes: Any) -> EffectiveBackend:
    values: dict[str, Any] = {
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


# Identity -----------------------------------------------------------------------------------------------------


def test_identity_matches_the_registration(subject: Subject) -> None:
    info = adapter_info(subject.name)
    assert info is not None
    assert info.name == subject.name
    assert adapter_class(subject.name).info == info
    assert isinstance(subject.engine, Engine)
    assert isinstance(subject.loaded, LoadedModel)
    identity = subject.loaded.identity()
    assert identity.name == subject.name
    assert identity.version
    assert identity.backend == subject.backend.kind
    # The engine's identity and the loaded model's agree on who the engine is.
    general = subject.engine.identity()
    assert (general.name, general.version, general.build) == (identity.name, identity.version, identity.build)


# Tokens -------------------------------------------------------------------------------------------------------


def test_ascii_text_round_trips_through_tokenize_and_detokenize(subject: Subject) -> None:
    tokens = subject.loaded.tokenize(subject.text, add_bos=False, parse_special=False)
    assert tokens
    assert all(isinstance(t, int) and t >= 0 for t in tokens)
    expected = f" {subject.text}" if subject.space_prefix else subject.text
    assert subject.loaded.detokenize(tokens) == expected


def test_add_bos_is_honoured(subject: Subject) -> None:
    bos = subject.loaded.bos_id()
    assert bos is not None, "the conformance model has a BOS token"
    plain = subject.loaded.tokenize(subject.text, add_bos=False, parse_special=True)
    with_bos = subject.loaded.tokenize(subject.text, add_bos=True, parse_special=True)
    assert with_bos == (bos, *plain)
    assert bos not in plain


# Generation ---------------------------------------------------------------------------------------------------


def _generate(subject: Subject, *, max_tokens: int = 8, top_k: int = 3) -> Any:
    return observe(
        subject.loaded,
        subject.text,
        add_bos=True,
        sampler=greedy_sampler(),
        max_tokens=max_tokens,
        stop=(),
        top_k=top_k,
    ).generation


def test_greedy_generation_reports_sorted_top_k_logprobs(subject: Subject) -> None:
    generation = _generate(subject, top_k=3)
    assert generation.tokens
    assert len(generation.steps) == len(generation.tokens) == len(generation.pieces)
    assert generation.prompt_tokens == subject.loaded.tokenize(subject.text, add_bos=True, parse_special=True)
    for step, token in zip(generation.steps, generation.tokens, strict=True):
        assert step.token == token
        assert len(step.top) == 3
        logprobs = [lp for _, lp in step.top]
        assert logprobs == sorted(logprobs, reverse=True)
        assert all(lp <= 0 for lp in logprobs)
        assert len({t for t, _ in step.top}) == 3
        # Greedy: the chosen token is the most likely one (or tied with it), at the logprob the top-k says.
        assert token in {t for t, _ in step.top}
        assert math.isclose(step.logprob, step.top[0][1], abs_tol=1e-4)
        assert math.isclose(step.logprob, dict(step.top)[token], abs_tol=1e-4)
    # Probabilities: the top-k of one step never add up to more than 1.
    assert all(sum(math.exp(lp) for _, lp in step.top) <= 1 + 1e-4 for step in generation.steps)


def test_max_tokens_is_honoured(subject: Subject) -> None:
    generation = _generate(subject, max_tokens=2)
    assert 1 <= len(generation.tokens) <= 2
    assert generation.stop_reason in {"eos", "max-tokens"}
    if generation.stop_reason == "max-tokens":
        assert len(generation.tokens) == 2


def test_generation_is_deterministic(subject: Subject) -> None:
    assert _generate(subject) == _generate(subject)


# Errors -------------------------------------------------------------------------------------------------------


def test_a_model_file_the_engine_cannot_load_is_an_engine_error(subject: Subject) -> None:
    with pytest.raises((EngineError, InputError)) as caught:
        subject.engine.load(subject.broken_model, subject.backend)
    assert caught.value.exit_code in {ExitCode.UNAVAILABLE, ExitCode.BAD_INPUT}
    assert "\n" not in caught.value.one_line()


# The child-process session ------------------------------------------------------------------------------------


def test_the_engine_session_observes_what_the_adapter_does_in_process(subject: Subject) -> None:
    prompt = RenderedSmoke(
        name="conformance", rendered=subject.text, max_tokens=8, add_bos=True, sampler=greedy_sampler()
    )
    with EngineSession.start(subject.name, subject.model_path, subject.backend, timeout=120) as session:
        run = session.observe([prompt], top_k=3)
    assert run.identity.name == subject.name
    assert run.observations["conformance"].generation == _generate(subject, top_k=3)
    bos = subject.loaded.bos_id()
    assert bos is not None
    assert run.decoded[bos] == subject.loaded.detokenize([bos], special=True)
