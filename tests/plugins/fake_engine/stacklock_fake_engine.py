"""A fake inference engine for stacklock's tests, registered like any third-party adapter.

Its distribution (``stacklock_fake_engine-0.dist-info`` next to this module) declares the entry point
``fake = stacklock_fake_engine:FakeEngine`` in the ``stacklock.engines`` group; a test puts this directory on
``sys.path`` (and on ``PYTHONPATH`` for child processes) and ``importlib.metadata`` finds it for real.

The engine is deterministic and instant. It tokenizes by bytes (ids 0-2 are pad, BOS and EOS; byte ``b`` is
id ``b + 3``). Each step prefers one letter of ``ALPHABET`` picked from the context so far; its logits fall by
one per letter of distance from that choice, so the top-k alternatives are known exactly. After
``EOS_AFTER`` generated tokens EOS is the most likely token.

Behaviour for error tests, from the environment variable ``STACKLOCK_FAKE_ENGINE`` (one mode):

- ``abort-on-load`` / ``abort``: ``os.abort()`` while loading the model / while generating;
- ``hang``: generating never returns;
- ``error``: generating raises ``EngineError``;
- ``bug``: generating raises ``ZeroDivisionError`` (an adapter bug);
- ``malformed``: generating returns data that is not a generation;
- ``drift``: generation picks the next letter of the alphabet (a stack that no longer reproduces);
- ``tokenize-drift``: tokenizing adds a space (a tokenizer that changed).

A model file must start with the GGUF magic; any other file is refused with ``EngineError``.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, ClassVar

from stacklock.engines.base import (
    AdapterInfo,
    BackendSettings,
    Capabilities,
    EngineIdentity,
    Generation,
    SamplerSettings,
    StepLogprobs,
    StopReason,
)
from stacklock.errors import EngineError

NAME = "fake"
MODE_VARIABLE = "STACKLOCK_FAKE_ENGINE"
PAD, BOS, EOS = 0, 1, 2
OFFSET = 3
VOCAB_SIZE = 256 + OFFSET
ALPHABET = "abcdefghijklmnopqrstuvwxyz "
EOS_AFTER = 12


def _mode() -> str:
    return os.environ.get(MODE_VARIABLE, "")


def letter_id(char: str) -> int:
    return ord(char) + OFFSET


class FakeEngine:
    name = NAME
    info: ClassVar[AdapterInfo] = AdapterInfo(
        name=NAME,
        distribution="stacklock-fake-engine",
        build_scheme="none",
        sampler_defaults={
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
            "max_tokens": 16,
            "stop": (),
        },
        backend_defaults={
            "gpu_layers": 0,
            "flash_attention": "off",
            "cache_type_k": "f16",
            "cache_type_v": "f16",
            "threads": 1,
            "batch_size": 64,
            "context_size": 256,
        },
        capabilities=Capabilities(
            tokenize=True,
            detokenize=True,
            token_id_prompts=True,
            top_logprobs=True,
            chat_render=False,
            served=False,
        ),
    )

    def identity(self) -> EngineIdentity:
        return EngineIdentity(
            name=NAME,
            version=version("stacklock-fake-engine"),
            build=None,
            backend="cpu",
            system_info="fake",
            python="fake",
            platform="fake",
            cpu="fake",
        )

    def load(self, model_path: Path, backend: BackendSettings) -> FakeModel:
        if _mode() == "abort-on-load":
            os.abort()
        try:
            with model_path.open("rb") as file:
                magic = file.read(4)
        except OSError as exc:
            raise EngineError(f"fake engine: cannot read {model_path}: {exc.strerror}") from exc
        if magic != b"GGUF":
            raise EngineError(f"fake engine: {model_path} is not a GGUF file")
        return FakeModel(self, backend.context_size or 256)


class FakeModel:
    def __init__(self, engine: FakeEngine, context_size: int) -> None:
        self._engine = engine
        self._context_size = context_size
        self.closed = False

    def identity(self) -> EngineIdentity:
        return self._engine.identity()

    def bos_id(self) -> int | None:
        return BOS

    def tokenize(self, text: str, *, add_bos: bool, parse_special: bool) -> tuple[int, ...]:
        if _mode() == "tokenize-drift":
            text += " "
        ids = tuple(b + OFFSET for b in text.encode("utf-8"))
        return (BOS, *ids) if add_bos else ids

    def _piece(self, token: int, *, special: bool) -> bytes:
        if token >= OFFSET:
            return bytes([token - OFFSET])
        return {PAD: b"<pad>", BOS: b"<bos>", EOS: b"<eos>"}[token] if special else b""

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return b"".join(self._piece(t, special=special) for t in tokens).decode("utf-8", "replace")

    def _logits(self, context: Sequence[int], generated: int) -> list[float]:
        """Every token's logit after ``context``: the preferred letter highest, others by distance."""
        choice = (sum(context) * 7 + len(context)) % len(ALPHABET)
        if _mode() == "drift":
            choice = (choice + 1) % len(ALPHABET)
        logits = [-30.0] * VOCAB_SIZE
        for index, char in enumerate(ALPHABET):
            logits[letter_id(char)] = -float(abs(index - choice))
        logits[EOS] = 1.0 if generated >= EOS_AFTER else -20.0
        return logits

    def generate(
        self,
        prompt_tokens: Sequence[int],
        *,
        sampler: SamplerSettings,
        max_tokens: int,
        stop: Sequence[str],
        top_k_logprobs: int = 5,
    ) -> Generation:
        mode = _mode()
        if mode == "abort":
            os.abort()
        if mode == "hang":
            while True:
                time.sleep(60)
        if mode == "error":
            raise EngineError("fake engine: the backend refused the prompt", hint="this is a test")
        if mode == "bug":
            _ = 1 / 0
        if mode == "malformed":
            malformed: Any = {"prompt_tokens": "not tokens"}
            return malformed  # type: ignore[no-any-return]
        if len(prompt_tokens) + max_tokens > self._context_size:
            raise EngineError(
                f"fake engine: {len(prompt_tokens)} prompt tokens and {max_tokens} more exceed the context "
                f"({self._context_size})"
            )
        context = list(prompt_tokens)
        rng = random.Random(sampler.seed)
        tokens: list[int] = []
        steps: list[StepLogprobs] = []
        stop_reason: StopReason = "max-tokens"
        text = ""
        while len(tokens) < max_tokens:
            logits = self._logits(context, len(tokens))
            peak = max(logits)
            log_norm = peak + math.log(sum(math.exp(x - peak) for x in logits))
            ranked = sorted(range(VOCAB_SIZE), key=lambda t: (-logits[t], t))
            if not sampler.temperature:
                token = ranked[0]
            else:
                weights = [math.exp((logits[t] - peak) / sampler.temperature) for t in range(VOCAB_SIZE)]
                token = rng.choices(range(VOCAB_SIZE), weights)[0]
            top = tuple((t, logits[t] - log_norm) for t in ranked[: max(1, top_k_logprobs)])
            steps.append(StepLogprobs(token=token, logprob=logits[token] - log_norm, top=top))
            tokens.append(token)
            context.append(token)
            if token == EOS:
                stop_reason = "eos"
                break
            text = self.detokenize(tokens)
            cut = [i for i in (text.find(s) for s in stop if s) if i >= 0]
            if cut:
                text, stop_reason = text[: min(cut)], "stop-string"
                break
        return Generation(
            prompt_tokens=tuple(prompt_tokens),
            tokens=tuple(tokens),
            pieces=tuple(self.detokenize([t], special=True) for t in tokens),
            steps=tuple(steps),
            text=text,
            stop_reason=stop_reason,
        )

    def builtin_chat_render(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str] | None:
        return None

    def close(self) -> None:
        self.closed = True
