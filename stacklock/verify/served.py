"""Record and verify through a served engine (llama-server...): over HTTP, in this process.

A served engine already runs out of process, so no child process is needed. Verify goes through the
engine's own chat path: the template stage compares the server's own rendering of each chat with the locked
render, the tokenization stage the server's tokenization of the locked render with the golden tokens, and
generation then runs from the locked token ids, so an engine-numerics difference is told apart from a
template or tokenizer difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from stacklock.engines.base import Observation, observe, sha256_tokens
from stacklock.engines.runner import EngineRun
from stacklock.engines.served import TextPrompts
from stacklock.errors import EngineError
from stacklock.files.digest import sha256_text
from stacklock.verify.compare import SmokeResult, Stage, StageResult, not_checked, smoke_result

if TYPE_CHECKING:
    from collections.abc import Sequence

    from stacklock.engines.base import Capabilities, Generation, LoadedModel
    from stacklock.engines.runner import RenderedSmoke
    from stacklock.engines.served import ServedEngine
    from stacklock.model.lock import Lock, SmokePin

__all__ = ["ANOTHER_MODEL", "hide_unobservable", "run_served", "served_artifacts", "unobservable_stages"]

#: How the artifacts stage of a served stack starts when the server holds another model than the lock's.
ANOTHER_MODEL = "the server has another model loaded"


class _Pieces(Mapping[int, str]):
    """Token pieces for a report, asked of the server only for the ids a report shows (a difference, its
    alternatives): a reproduced stack costs no request, where decoding every id cost one request per id."""

    def __init__(self, loaded: LoadedModel, known: dict[int, str], vocab: int, *, ask: bool) -> None:
        self._loaded = loaded
        self._known = known
        self._vocab = vocab
        self._ask = ask

    def __getitem__(self, token: int) -> str:
        if token not in self._known:
            # A hand-edited golden may name an id the vocabulary lacks; the server would refuse it.
            if not self._ask or not 0 <= token < self._vocab:
                raise KeyError(token)
            try:
                self._known[token] = self._loaded.detokenize([token], special=True)
            except EngineError:
                raise KeyError(token) from None
        return self._known[token]

    def __iter__(self) -> Iterator[int]:
        return iter(self._known)

    def __len__(self) -> int:
        return len(self._known)


@contextmanager
def run_served(
    lock: Lock, engine: ServedEngine, prompts: Sequence[RenderedSmoke], *, top_k: int, from_golden: bool
) -> Iterator[EngineRun]:
    """Observe every prompt on the served engine; with ``from_golden``, through the engine's own chat path.

    The connection stays open while the caller compares, so that the pieces a report shows are decoded then.
    """
    caps = engine.capabilities()
    loaded = engine.load(None, lock.backend)
    try:
        observations: dict[str, Observation] = {}
        known: dict[int, str] = {}
        pins = {pin.name: pin for pin in lock.smoke}
        for prompt in prompts:
            pin = pins[prompt.name]
            golden = pin.golden if from_golden else None
            if not caps.tokenize or not caps.token_id_prompts:
                seen = _from_text(lock, pin, loaded, prompt, caps, top_k=top_k)
            elif golden is None or golden.prompt_tokens is None:
                seen = observe(
                    loaded,
                    prompt.rendered,
                    add_bos=prompt.add_bos,
                    sampler=prompt.sampler,
                    max_tokens=prompt.max_tokens,
                    stop=prompt.sampler.stop or (),
                    top_k=top_k,
                )
            else:
                seen = _through_chat_path(lock, pin, loaded, prompt, golden.prompt_tokens, top_k=top_k)
            observations[prompt.name] = seen
            generation = seen.generation
            if len(generation.pieces) == len(generation.tokens):
                known.update(zip(generation.tokens, generation.pieces, strict=True))
        pieces = _Pieces(loaded, known, lock.tokenizer.vocab_size, ask=caps.detokenize)
        yield EngineRun(identity=loaded.identity(), builtin=None, observations=observations, decoded=pieces)
    finally:
        loaded.close()


def _own_render(pin: SmokePin, loaded: LoadedModel, prompt: RenderedSmoke, lock: Lock) -> str:
    """The engine's own rendering of a chat smoke prompt (BOS restored), else the locked render."""
    if pin.kind == "chat" and pin.messages:
        own = loaded.builtin_chat_render([m.model_dump() for m in pin.messages])
        if own is not None:
            return _with_bos(own[1], prompt.rendered, lock)
    return prompt.rendered


def _from_text(
    lock: Lock, pin: SmokePin, loaded: LoadedModel, prompt: RenderedSmoke, caps: Capabilities, *, top_k: int
) -> Observation:
    """An engine that takes text prompts only: it is given the locked render and tokenizes it itself."""
    rendered = _own_render(pin, loaded, prompt, lock) if caps.chat_render else prompt.rendered
    if not isinstance(loaded, TextPrompts):
        raise EngineError(
            f"the {lock.engine.name} adapter takes no token-id prompts and no text prompts",
            hint="upgrade the package that provides the adapter",
        )
    generation: Generation = loaded.generate_from_text(
        _without_bos(prompt, lock),
        sampler=prompt.sampler,
        max_tokens=prompt.max_tokens,
        stop=prompt.sampler.stop or (),
        top_k_logprobs=top_k,
    )
    # An engine that reports what it tokenized the prompt into is believed over a second tokenization.
    if caps.tokenize and not generation.prompt_tokens:
        tokens = loaded.tokenize(prompt.rendered, add_bos=prompt.add_bos, parse_special=True)
        generation = generation.model_copy(update={"prompt_tokens": tokens})
    return Observation(
        rendered=rendered, rendered_sha256=sha256_text(rendered), generation=generation, top_k=top_k
    )


def unobservable_stages(engine: str, caps: Capabilities) -> dict[Stage, str]:
    """The stages a served engine does not let stacklock observe, each with why."""
    hidden: dict[Stage, str] = {}
    if not caps.chat_render:
        hidden["template"] = f"{engine} does not show its own rendering of a chat"
    if not caps.tokenize:
        hidden["tokenization"] = f"{engine} does not report the token ids of a prompt"
    if not caps.top_logprobs:
        hidden["generation"] = f"{engine} does not report generated token ids with their logprobs"
    return hidden


def hide_unobservable(
    lock: Lock, results: Sequence[SmokeResult], hidden: Mapping[Stage, str]
) -> list[SmokeResult]:
    """Each stage the engine hides becomes ``not checked (why)``; a chat's template stage only (a raw
    prompt's render is stacklock's own, compared with the lock whatever the engine)."""
    chats = {pin.name for pin in lock.smoke if pin.kind == "chat"}
    shown = []
    for result in results:
        stages = [
            not_checked(stage.stage, hidden[stage.stage])
            if stage.stage in hidden
            and stage.status != "skip"
            and (stage.stage != "template" or result.name in chats)
            else stage
            for stage in result.stages
        ]
        shown.append(smoke_result(result.name, stages))
    return shown


def _through_chat_path(
    lock: Lock,
    pin: SmokePin,
    loaded: LoadedModel,
    prompt: RenderedSmoke,
    locked_tokens: Sequence[int],
    *,
    top_k: int,
) -> Observation:
    rendered = _own_render(pin, loaded, prompt, lock)
    tokens = loaded.tokenize(prompt.rendered, add_bos=prompt.add_bos, parse_special=True)
    generation = loaded.generate(
        locked_tokens,
        sampler=prompt.sampler,
        max_tokens=prompt.max_tokens,
        stop=prompt.sampler.stop or (),
        top_k_logprobs=top_k,
    )
    # The tokenization stage compares what the engine makes of the locked render; generation ran from the
    # locked ids whatever it made of it, so a tokenizer difference is not also reported as a numerics one.
    same = sha256_tokens(tokens) == sha256_tokens(locked_tokens)
    observed = generation if same else generation.model_copy(update={"prompt_tokens": tokens})
    return Observation(
        rendered=rendered, rendered_sha256=sha256_text(rendered), generation=observed, top_k=top_k
    )


def _without_bos(prompt: RenderedSmoke, lock: Lock) -> str:
    """The text to send an engine that takes text prompts: llama.cpp-based servers (llama-cpp-python's, LM
    Studio) add the BOS their tokenizer wants to every text prompt, so a render that carries its BOS in its
    text (add-bos = false) is sent without it, and the engine's own BOS takes its place instead of doubling."""
    bos = lock.tokenizer.bos_text
    if bos and not prompt.add_bos and lock.tokenizer.add_bos is not False and prompt.rendered.startswith(bos):
        return prompt.rendered[len(bos) :]
    return prompt.rendered


def _with_bos(own: str, locked: str, lock: Lock) -> str:
    """llama.cpp strips a leading BOS from its render when its tokenizer adds one; put it back to compare."""
    bos = lock.tokenizer.bos_text
    if bos and locked.startswith(bos) and not own.startswith(bos) and lock.tokenizer.add_bos is not False:
        return bos + own
    return own


def served_artifacts(lock: Lock, engine: ServedEngine) -> StageResult:
    """The artifacts stage of a served stack: the model the server has loaded, and its defaults, against the lock.

    The server, not stacklock, reads the model file: a server that names the file's sha256 (Ollama stores the
    GGUF by it) must name the locked one; what any server says about the model (vocabulary size, parameter
    count, trained context) must match the locked GGUF header, and everything it said at lock time (its loaded
    model, its default sampler settings) must still hold.
    """
    model = engine.served_model()
    expected: dict[str, Any] = {
        "sha256": lock.model.sha256,
        "vocab-size": lock.tokenizer.vocab_size,
        "parameter-count": lock.model.parameter_count,
        "context-length": lock.model.context_length,
    }
    if lock.engine.served is not None:
        expected |= {k: v for k, v in lock.engine.served.model.items() if k != "path"}
    compared = [key for key, value in expected.items() if value is not None and model.get(key) is not None]
    wrong = [
        f"{key} {model.get(key)!r} (locked {expected[key]!r})"
        for key in compared
        if model.get(key) != expected[key]
    ]
    if wrong:
        return StageResult(
            stage="artifacts",
            status="fail",
            detail=f"{ANOTHER_MODEL} than the lock's {lock.model.path}: {', '.join(wrong)}",
        )
    if lock.engine.served is not None:
        defaults = engine.sampler_defaults()
        locked = lock.engine.served.sampler_defaults
        changed = [
            f"{key} {defaults.get(key)!r} (locked {value!r})"
            for key, value in locked.items()
            if _as_locked(defaults.get(key)) != value
        ]
        # A default the server did not set when the stack was locked (an Ollama parameter added since).
        changed += [
            f"{key} {value!r} (not set when locked)"
            for key, value in defaults.items()
            if key not in locked and value is not None
        ]
        if changed:
            return StageResult(
                stage="artifacts",
                status="fail",
                detail="the server's default sampler settings changed (a client that sets nothing gets "
                f"them): {', '.join(changed)}",
            )
    hashed = model.get("sha256") is not None
    return StageResult(
        stage="artifacts",
        status="pass",
        detail=f"the server's loaded model matches {lock.model.path} ({', '.join(compared) or 'it tells nothing'})"
        + ("" if hashed else "; its file hash is not checked (the server reads the file)"),
    )


def _as_locked(value: Any) -> Any:
    """A default as the lock holds it: lists (Ollama's stop strings) as tuples."""
    return tuple(value) if isinstance(value, list) else value
