"""Policy: what makes a stack unreproducible or unrunnable on any engine, found at ``stacklock lock``.

These checks used to live inside the llama-cpp-python adapter, which refused at ``record`` what ``lock`` had
accepted. Here they are built-in checks (:mod:`stacklock.rules.builtin`) evaluated on the resolved lock, so the
user learns them at ``lock`` and every adapter shares them:

- ``engine-defaults-unknown``: values nobody gave (not the manifest, not the GGUF) for an engine whose defaults
  stacklock does not know. They are left unknown in the lock, never invented.
- ``policy-unseeded-sampling``: sampling (temperature above 0, or unknown) without a fixed seed draws different
  tokens on every run, so the smoke prompts' goldens cannot reproduce (only checked when there are smoke
  prompts).
- ``policy-context-overflow``: a smoke prompt whose tokens plus its max-tokens may exceed the context size.

The prompt's token count is not known at lock time (no engine runs), so the context check uses an upper bound
that can be proved from the tokenizer kind, and says "may": no finding means no overflow, never the reverse.

- Byte-level BPE (``gpt2``): every byte of the text is one symbol before merging, merges only join symbols, and
  a special token matched in the text stands for at least one byte, so tokens <= UTF-8 bytes (+ BOS, EOS).
- SentencePiece (``llama``): llama.cpp replaces each space by U+2581 (3 bytes) and prefixes a text fragment with
  one; symbols start as characters, merges only join them, and a character outside the vocabulary falls back to
  one token per byte, so a fragment costs at most its bytes after that replacement, plus 3 for its prefix.
  llama.cpp starts a new fragment after every special token; the bound counts the special tokens the lock knows
  (``model.special-texts``, BOS, EOS), so for SentencePiece it also assumes the render holds no special token
  that the lock does not name.
- Other tokenizers (WordPiece, Unigram, RWKV): no bound is claimed, and only the adapter's runtime guard (an
  :class:`~stacklock.errors.EngineError` when the real count overflows) stands.
"""

from __future__ import annotations

from collections.abc import Sequence

from stacklock.model.findings import Finding, Link, Severity
from stacklock.model.lock import Lock, SmokePin
from stacklock.rules.builtin import BuiltinCheck, FamilyRun, register, register_family

#: llama.cpp's "pick a random seed" sentinel (LLAMA_DEFAULT_SEED): a seed that fixes nothing.
RANDOM_SEED = 0xFFFFFFFF

FAMILY = "policy"

DEFAULTS_UNKNOWN = register(
    BuiltinCheck(
        id="engine-defaults-unknown",
        family=FAMILY,
        severity=Severity.WARNING,
        title="Values the engine chooses on its own are unknown to stacklock",
        links=(Link.ENGINE, Link.BACKEND, Link.SAMPLER),
        explanation="stacklock knows no defaults for this engine, so the values neither the manifest nor the "
        "GGUF gives are left unknown in the lock rather than invented; the engine picks them, and an engine "
        "upgrade can change them silently.",
        fix="Pin them in llmstack.toml (sampler.top-k is top-k = VALUE under [sampler], backend.* under "
        "[backend]) and re-lock.",
    )
)

UNSEEDED = register(
    BuiltinCheck(
        id="policy-unseeded-sampling",
        family=FAMILY,
        severity=Severity.ERROR,
        title="Sampling without a fixed seed cannot be reproduced",
        links=(Link.SAMPLER,),
        explanation="With a temperature above 0 the engine draws each token at random; without a fixed seed "
        "every run draws differently, so recorded goldens can never be verified.",
        fix="Set sampler.seed in llmstack.toml, or sampler.temperature = 0 for greedy decoding.",
    )
)

CONTEXT_OVERFLOW = register(
    BuiltinCheck(
        id="policy-context-overflow",
        family=FAMILY,
        severity=Severity.WARNING,
        title="A smoke prompt may not fit in the context window",
        links=(Link.BACKEND,),
        explanation="The prompt's tokens plus the tokens to generate may exceed the context size; the engine "
        "would then refuse the prompt at record or verify.",
        fix="Raise backend.context-size or lower max-tokens in llmstack.toml.",
    )
)


def policy_findings(lock: Lock, _registries: Sequence[object] = ()) -> FamilyRun:
    """Every policy finding of a resolved lock (pure); the family's runner, for ``lock`` and ``check`` alike."""
    found = [_defaults_unknown(lock), _unseeded(lock)]
    found += [_overflow(lock, pin) for pin in lock.smoke]
    return FamilyRun(tuple(f for f in found if f is not None))


register_family(FAMILY, policy_findings)


def _defaults_unknown(lock: Lock) -> Finding | None:
    unknown = [f"sampler.{key}" for key, origin in lock.sampler.origin.items() if origin == "unknown"]
    unknown += [f"backend.{key}" for key, origin in lock.backend.origin.items() if origin == "unknown"]
    if not unknown:
        return None
    return DEFAULTS_UNKNOWN.finding(
        title=f"{len(unknown)} values {lock.engine.name} chooses on its own are unknown to stacklock",
        explanation=f"stacklock knows no defaults for {lock.engine.name}, so these values are unknown in the "
        f"lock rather than invented: {', '.join(unknown)}. The engine picks them, and an engine upgrade can "
        "change them silently.",
        fix=f"Pin them in llmstack.toml ([sampler] and [backend], e.g. {_example(unknown[0])}) and re-lock.",
    )


def _example(key: str) -> str:
    table, _, name = key.partition(".")
    return f"{name} = ... under [{table}]"


def _unseeded(lock: Lock) -> Finding | None:
    sampler = lock.sampler
    # Without smoke prompts there is no golden to reproduce; random sampling in production is the user's call.
    if not lock.smoke or sampler.temperature == 0 or sampler.seed not in {None, RANDOM_SEED}:
        return None
    temperature = "unknown" if sampler.temperature is None else f"{sampler.temperature}"
    seed = "unknown" if sampler.seed is None else f"{sampler.seed} (random)"
    return UNSEEDED.finding(
        title=f"sampler.temperature = {temperature} with seed {seed} cannot be reproduced",
    )


def _overflow(lock: Lock, pin: SmokePin) -> Finding | None:
    context = lock.backend.context_size
    if context is None or pin.rendered is None:
        return None
    bound = token_upper_bound(lock, pin)
    if bound is None or bound + pin.max_tokens <= context:
        return None
    return CONTEXT_OVERFLOW.finding(
        title=f"smoke '{pin.name}' may need up to {bound} prompt tokens plus {pin.max_tokens} to generate, "
        f"more than backend.context-size = {context}",
    )


def token_upper_bound(lock: Lock, pin: SmokePin) -> int | None:
    """An upper bound on the tokens of a smoke prompt's render (see the module docstring); None: no bound."""
    text = pin.rendered or ""
    tokenizer = lock.tokenizer
    specials = int(pin.add_bos) + int(bool(tokenizer.add_eos))
    if tokenizer.kind == "gpt2":
        return len(text.encode("utf-8")) + specials
    if tokenizer.kind == "llama":
        known = {*lock.model.special_texts, tokenizer.bos_text, tokenizer.eos_text, tokenizer.eot_text}
        fragments = 1 + sum(text.count(special) for special in known if special)
        prefix = 3 if tokenizer.add_space_prefix is not False else 0
        return len(text.encode("utf-8")) + 2 * text.count(" ") + prefix * fragments + specials
    return None
