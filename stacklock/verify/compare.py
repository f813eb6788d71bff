"""Verification: compare what a locked stack produced when it was recorded with what it produces now.

Pure: every function takes models and returns models; the engine is run elsewhere (``stacklock.engines``) and
its observations are passed in. The stages follow the chain an answer flows through, and the first stage that
fails names the link that broke:

``artifacts`` (file hashes) → ``template`` (the rendered prompt) → ``tokenization`` (the prompt's token ids) →
``generation`` (the generated token ids) → ``output`` (the post-processed text and the expectations).

Later stages are still compared after a failure, because a later stage that still matches narrows the cause;
the report names the first failure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from stacklock.engines.base import EngineIdentity, Generation, Observation, StopReason, sha256_tokens
from stacklock.files.digest import sha256_text
from stacklock.model.base import Model
from stacklock.model.lock import Recording, SmokeGolden
from stacklock.model.pattern import PatternTimeoutError, compile_pattern, search_pattern

if TYPE_CHECKING:
    from stacklock.model.manifest import Expectation

__all__ = [
    "MAX_STORED_PROMPT_TOKENS",
    "STAGES",
    "Candidate",
    "Decode",
    "SmokeResult",
    "Stage",
    "StageResult",
    "Status",
    "Tolerance",
    "VerifyReport",
    "build_report",
    "compare_artifacts",
    "compare_generation",
    "compare_output",
    "compare_render",
    "compare_smoke",
    "compare_tokens",
    "engine_differences",
    "expectation_failure",
    "first_difference",
    "golden_from_observation",
    "is_certified",
    "recording_from",
    "round_logprob",
    "skipped",
    "smoke_result",
]

Stage = Literal["artifacts", "template", "tokenization", "generation", "output"]
Status = Literal["pass", "fail", "skip", "tolerated", "not-checked"]
STAGES: tuple[Stage, ...] = ("artifacts", "template", "tokenization", "generation", "output")

#: Prompts up to this many tokens keep their ids in the golden; longer ones keep only count and digest.
MAX_STORED_PROMPT_TOKENS = 512
LOGPROB_DECIMALS = 4
_SNIPPET = 24

#: Turns token ids into text for explanations (special tokens shown), e.g. ``LoadedModel.detokenize``.
Decode = Callable[[Sequence[int]], str]


class Tolerance(Model):
    """Opt-in acceptance of a divergence at a near-tie, for a backend or machine unlike the recording's."""

    margin: float = Field(
        default=0.5,
        gt=0,
        description=(
            "The largest logprob gap (nats) between the token chosen now and the recorded token, both read "
            "from the current step's top-k, at which a divergence is accepted as a near-tie."
        ),
    )


class Candidate(Model):
    """One alternative the model weighed at a step."""

    token: int = Field(description="The token id.")
    piece: str = Field(description="The token as text, special tokens shown.")
    logprob: float = Field(description="Its natural-log probability.")


class StageResult(Model):
    """One stage of one smoke prompt."""

    stage: Stage = Field(description="The stage of the chain.")
    status: Status = Field(
        description="pass, fail, skip, tolerated (a near-tie accepted under --tolerance), or not-checked (the "
        "engine does not let stacklock observe this stage; never counted as a pass)."
    )
    detail: str = Field(description="One line: what matched, or what differs and where.")
    position: int | None = Field(
        default=None, description="Where the first difference is: a character offset or a token index."
    )
    expected: str | None = Field(default=None, description="The recorded value at that position.")
    observed: str | None = Field(default=None, description="The value observed now at that position.")
    candidates: tuple[Candidate, ...] = Field(
        default=(),
        description="At a differing token: the alternatives the model weighed now, most likely first.",
    )
    changes: tuple[str, ...] = Field(
        default=(),
        description="At a changed model file: which parts of it changed (template, metadata, tensor data).",
    )
    diff: str | None = Field(
        default=None, description="At a changed embedded template: a unified diff of its text."
    )


class SmokeResult(Model):
    """Every stage of one smoke prompt, and the first that failed."""

    name: str = Field(description="The smoke prompt.")
    stages: tuple[StageResult, ...] = Field(description="One result per stage, in chain order.")
    first_failure: Stage | None = Field(description="The first stage that failed, or none.")
    tolerated: bool = Field(description="Whether a stage passed only under the tolerance.")
    explanation: str = Field(description="The first failure's detail, or a one-line summary.")


class VerifyReport(Model):
    """The outcome of `stacklock verify`."""

    results: tuple[SmokeResult, ...] = Field(description="One result per smoke prompt.")
    reproduced: bool = Field(
        description="True when every stage of every smoke prompt was compared and none failed."
    )
    tolerated: bool = Field(description="True when reproduction needed the tolerance somewhere.")
    not_checked: tuple[str, ...] = Field(
        default=(),
        description="The stages the engine does not let stacklock observe, each with why: reproduction is "
        "certified for the other stages only.",
    )
    engine: EngineIdentity | None = Field(default=None, description="The engine observed now.")
    tolerance: Tolerance | None = Field(default=None, description="The tolerance in force, if any.")
    notes: tuple[str, ...] = Field(
        default=(), description="How the engine and machine differ from the recording's."
    )


# Building goldens -------------------------------------------------------------------------------------------


def round_logprob(value: float) -> float:
    """Logprobs are stored to 4 decimals, so the lock's TOML is stable and diffs stay readable."""
    return round(value, LOGPROB_DECIMALS)


def golden_from_observation(observation: Observation) -> SmokeGolden:
    """What `stacklock record` stores for one smoke prompt."""
    generation = observation.generation
    prompt = generation.prompt_tokens
    return SmokeGolden(
        prompt_token_count=len(prompt),
        prompt_tokens_sha256=sha256_tokens(prompt),
        prompt_tokens=prompt if len(prompt) <= MAX_STORED_PROMPT_TOKENS else None,
        tokens=generation.tokens,
        top_logprobs=tuple(
            tuple((token, round_logprob(logprob)) for token, logprob in step.top) for step in generation.steps
        ),
        text=generation.text,
        stop_reason=generation.stop_reason,
    )


def recording_from(engine: EngineIdentity, environment: Mapping[str, str], top_k: int) -> Recording:
    """Where and how goldens were recorded, in the lock's shape."""
    return Recording(
        # TOML has no null: what the engine does not report (a build, a ggml version) is left out.
        engine=engine.model_dump(by_alias=True, exclude_none=True),
        environment=dict(environment),
        top_k=top_k,
    )


# Helpers ----------------------------------------------------------------------------------------------------


def first_difference(expected: Sequence[object], observed: Sequence[object]) -> int | None:
    """The index of the first element that differs (a shorter sequence differs where it ends), or None."""
    for index, (left, right) in enumerate(zip(expected, observed, strict=False)):
        if left != right:
            return index
    if len(expected) != len(observed):
        return min(len(expected), len(observed))
    return None


def _snippet(text: str, index: int) -> str:
    start = max(0, index - 16)
    return (
        ("…" if start else "")
        + text[start : index + _SNIPPET]
        + ("…" if index + _SNIPPET < len(text) else "")
    )


def _line_column(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _text_difference(what: str, expected: str, observed: str) -> tuple[int, str, str, str]:
    index = first_difference(expected, observed)
    assert index is not None
    line, column = _line_column(expected, index)
    expected_part, observed_part = _snippet(expected, index), _snippet(observed, index)
    detail = (
        f"{what} differs at character {index} (line {line}, column {column}): "
        f"expected {expected_part!r}, got {observed_part!r}"
    )
    return index, detail, expected_part, observed_part


def _piece(decode: Decode | None, token: int) -> str:
    if decode is None:
        return ""
    try:
        return decode([token])
    except Exception:  # noqa: BLE001 - an explanation must not fail because one token cannot be shown.
        return "?"


def _token(decode: Decode | None, token: int) -> str:
    piece = _piece(decode, token)
    return f"{token} {piece!r}" if decode is not None else str(token)


def skipped(stage: Stage, reason: str) -> StageResult:
    """A stage that was not compared, and why."""
    return StageResult(stage=stage, status="skip", detail=reason)


def not_checked(stage: Stage, why: str) -> StageResult:
    """A stage the engine does not let stacklock observe: reported as such, never as a pass."""
    return StageResult(stage=stage, status="not-checked", detail=f"not checked ({why})")


# The stages -------------------------------------------------------------------------------------------------


def compare_artifacts(
    expected: Mapping[str, str],
    observed: Mapping[str, str | None],
    *,
    changes: Sequence[str] = (),
    diff: str | None = None,
) -> StageResult:
    """Stage (a): every locked file's sha256 against the file found now (None: the file is missing).

    ``changes`` and ``diff`` explain a changed model file (see :func:`stacklock.lock.diff.explain_model`).
    """
    for label, digest in expected.items():
        found = observed.get(label)
        if found is None:
            return StageResult(
                stage="artifacts",
                status="fail",
                detail=f"{label} is missing; fetch it again with `stacklock lock` or restore the file",
                expected=digest,
            )
        if found != digest:
            what = f" ({'; '.join(changes)})" if changes else ""
            return StageResult(
                stage="artifacts",
                status="fail",
                detail=(
                    f"{label} changed: sha256 {found[:12]}… where the lock has {digest[:12]}…{what}; "
                    "restore the locked file or re-lock and re-record"
                ),
                expected=digest,
                observed=found,
                changes=tuple(changes),
                diff=diff,
            )
    return StageResult(
        stage="artifacts", status="pass", detail=f"{len(expected)} file hash(es) match the lock"
    )


def compare_render(
    expected_sha256: str,
    rendered: str,
    *,
    template: str | None = None,
    template_sha256: str | None = None,
    reference_template: str | None = None,
    expected_rendered: str | None = None,
) -> StageResult:
    """Stage (b): the prompt re-rendered from the locked template against the recorded render's sha256.

    The lock keeps the rendered prompt's digest, not its text, so a digest alone cannot point at a character.
    The explanation therefore uses what the caller can supply: the template text used now with the locked
    template's digest (an edited template is the commonest cause), a reference copy of the template (e.g.
    re-read from its source) to name the first differing character of the template, or a reference render to
    name the first differing character of the prompt.
    """
    template_changed = (
        template is not None and template_sha256 is not None and sha256_text(template) != template_sha256
    )
    observed_sha256 = sha256_text(rendered)
    if observed_sha256 == expected_sha256 and not template_changed:
        return StageResult(
            stage="template", status="pass", detail="the rendered prompt matches the recording"
        )
    if template_changed:
        assert template is not None
        assert template_sha256 is not None
        if reference_template is not None and reference_template != template:
            index, detail, expected_part, observed_part = _text_difference(
                "the locked template", reference_template, template
            )
            return StageResult(
                stage="template",
                status="fail",
                detail=f"{detail}; restore the template or re-lock and re-record",
                position=index,
                expected=expected_part,
                observed=observed_part,
            )
        return StageResult(
            stage="template",
            status="fail",
            detail=(
                f"the locked template text was edited: its sha256 is {sha256_text(template)[:12]}… where the "
                f"lock has {template_sha256[:12]}…; restore it or re-lock and re-record"
            ),
            expected=template_sha256,
            observed=sha256_text(template),
        )
    if expected_rendered is not None and expected_rendered != rendered:
        index, detail, expected_part, observed_part = _text_difference(
            "the rendered prompt", expected_rendered, rendered
        )
        return StageResult(
            stage="template",
            status="fail",
            detail=detail,
            position=index,
            expected=expected_part,
            observed=observed_part,
        )
    return StageResult(
        stage="template",
        status="fail",
        detail=(
            f"the rendered prompt's sha256 is {observed_sha256[:12]}… where the recording has "
            f"{expected_sha256[:12]}…, with the template text unchanged: the renderer (jinja2 version, "
            "variables, pinned clock) or the conversation changed"
        ),
        expected=expected_sha256,
        observed=observed_sha256,
    )


def compare_tokens(
    golden: SmokeGolden,
    observed: Sequence[int],
    *,
    bos_id: int | None,
    eos_id: int | None = None,
    decode: Decode | None = None,
) -> StageResult:
    """Stage (c): the engine's prompt tokens against the recorded ones, with BOS/EOS mistakes named."""
    observed = tuple(observed)
    if sha256_tokens(observed) == golden.prompt_tokens_sha256 and len(observed) == golden.prompt_token_count:
        return StageResult(
            stage="tokenization", status="pass", detail=f"{len(observed)} prompt tokens match the recording"
        )
    recorded = golden.prompt_tokens
    counts = f"{len(observed)} tokens now, {golden.prompt_token_count} recorded"

    def fail(
        detail: str, position: int | None = None, expected: str | None = None, seen: str | None = None
    ) -> StageResult:
        return StageResult(
            stage="tokenization",
            status="fail",
            detail=detail,
            position=position,
            expected=expected,
            observed=seen,
        )

    if bos_id is not None and len(observed) >= 2 and observed[0] == observed[1] == bos_id:
        recorded_double = recorded is not None and len(recorded) >= 2 and recorded[0] == recorded[1] == bos_id
        if not recorded_double:
            return fail(
                f"double BOS: the prompt now starts with two BOS tokens ({_token(decode, bos_id)}) "
                f"({counts}): the rendered text begins with BOS and the tokenizer adds another; set "
                "add-bos = false or remove bos_token from the template",
                1,
                None,
                _token(decode, bos_id),
            )
    if recorded is not None and bos_id is not None:
        recorded_bos = bool(recorded) and recorded[0] == bos_id
        observed_bos = bool(observed) and observed[0] == bos_id
        if recorded_bos and not observed_bos:
            return fail(
                f"the BOS token ({_token(decode, bos_id)}) is missing at the start of the prompt ({counts}): "
                "the tokenizer's add-bos setting changed",
                0,
                _token(decode, bos_id),
                _token(decode, observed[0]) if observed else None,
            )
        if observed_bos and not recorded_bos:
            return fail(
                f"an extra BOS token ({_token(decode, bos_id)}) starts the prompt ({counts}): the "
                "tokenizer's add-bos setting changed",
                0,
                _token(decode, recorded[0]) if recorded else None,
                _token(decode, bos_id),
            )
    if (
        recorded is not None
        and eos_id is not None
        and observed
        and observed[-1] == eos_id
        and (not recorded or recorded[-1] != eos_id)
    ):
        return fail(
            f"an EOS token ({_token(decode, eos_id)}) now ends the prompt ({counts}): the tokenizer adds EOS",
            len(observed) - 1,
            None,
            _token(decode, eos_id),
        )
    if recorded is None:
        return fail(
            f"the prompt tokens differ from the recording ({counts}); the recording keeps only the digest of "
            f"prompts over {MAX_STORED_PROMPT_TOKENS} tokens, so the first difference cannot be located"
        )
    index = first_difference(recorded, observed)
    assert index is not None
    want = _token(decode, recorded[index]) if index < len(recorded) else "the end of the prompt"
    got = _token(decode, observed[index]) if index < len(observed) else "the end of the prompt"
    return fail(
        f"prompt token {index} differs: recorded {want}, now {got} ({counts}); the tokenizer or its "
        "special-token parsing changed",
        index,
        want,
        got,
    )


def _candidates(top: Sequence[tuple[int, float]], decode: Decode | None) -> tuple[Candidate, ...]:
    return tuple(
        Candidate(token=token, piece=_piece(decode, token), logprob=logprob) for token, logprob in top
    )


def _alternatives(candidates: Sequence[Candidate]) -> str:
    return ", ".join(f"{c.piece!r} {c.logprob:.4f}" for c in candidates)


def compare_generation(
    golden: SmokeGolden,
    observed: Generation,
    *,
    tolerance: Tolerance | None = None,
    decode: Decode | None = None,
) -> StageResult:
    """Stage (d): the generated token ids against the goldens, stopping at the first divergence.

    A divergence is accepted ("tolerated") only under an explicit tolerance and only at a near-tie: the
    recorded token is among the current step's top-k and its logprob is within the margin of the chosen token.
    Tokens agreeing up to where one run stopped at a stop string is a post-processing difference, left to the
    output stage.
    """
    recorded, now = golden.tokens, observed.tokens
    index = first_difference(recorded, now)
    if index is None:
        drift = _max_drift(golden.top_logprobs, observed)
        return StageResult(
            stage="generation",
            status="pass",
            detail=f"{len(now)} generated tokens match the recording (largest logprob drift {drift:.4f})",
        )
    if index >= len(recorded) or index >= len(now):
        shorter_is_now = len(now) < len(recorded)
        reason = observed.stop_reason if shorter_is_now else golden.stop_reason
        who = "now" if shorter_is_now else "in the recording"
        if reason == "stop-string":
            return StageResult(
                stage="generation",
                status="pass",
                detail=(
                    f"the {index} tokens both runs generated match; generation stopped at a stop string "
                    f"{who} after that (see output)"
                ),
                position=index,
            )
        return StageResult(
            stage="generation",
            status="fail",
            detail=(
                f"the first {index} tokens match, but generation "
                f"{'stopped' if shorter_is_now else 'went on'} at token {index}: {len(now)} tokens now, "
                f"{len(recorded)} recorded; max-tokens changed"
            ),
            position=index,
            expected=str(len(recorded)),
            observed=str(len(now)),
        )
    step = observed.steps[index]
    candidates = _candidates(step.top, decode)
    golden_logprob = dict(step.top).get(recorded[index])
    want, got = _token(decode, recorded[index]), _token(decode, now[index])
    recorded_rank = (
        f"the recorded token is at logprob {golden_logprob:.4f}, {step.logprob - golden_logprob:.4f} below"
        if golden_logprob is not None
        else f"the recorded token is not in the top {len(step.top)}"
    )
    base = f"token {index} differs: recorded {want}, now {got} (logprob {step.logprob:.4f}); {recorded_rank}"
    if (
        tolerance is not None
        and golden_logprob is not None
        and step.logprob - golden_logprob <= tolerance.margin
    ):
        return StageResult(
            stage="generation",
            status="tolerated",
            detail=(
                f"{base}: a near-tie within the margin {tolerance.margin}, accepted; the {index} tokens "
                "before it match and the rest were not compared"
            ),
            position=index,
            expected=want,
            observed=got,
            candidates=candidates,
        )
    recorded_top = golden.top_logprobs[index] if index < len(golden.top_logprobs) else ()
    return StageResult(
        stage="generation",
        status="fail",
        detail=(
            f"{base}; alternatives now: {_alternatives(candidates)}"
            + (f"; recorded: {_alternatives(_candidates(recorded_top, decode))}" if recorded_top else "")
        ),
        position=index,
        expected=want,
        observed=got,
        candidates=candidates,
    )


def _max_drift(recorded: Sequence[Sequence[tuple[int, float]]], observed: Generation) -> float:
    """The largest logprob change of any token in both the recorded and the current top-k, over all steps."""
    drift = 0.0
    for recorded_top, step in zip(recorded, observed.steps, strict=False):
        now = dict(step.top)
        for token, logprob in recorded_top:
            if token in now:
                drift = max(drift, abs(round_logprob(now[token]) - logprob))
    return drift


def expectation_failure(expectation: Expectation | None, text: str) -> str | None:
    if expectation is None:
        return None
    if expectation.equals is not None and text != expectation.equals:
        return f"the output does not equal the expected {expectation.equals!r}"
    if expectation.contains is not None and expectation.contains not in text:
        return f"the output does not contain {expectation.contains!r}"
    if expectation.regex is not None:
        try:
            found = search_pattern(compile_pattern(expectation.regex), text)
        except PatternTimeoutError as exc:
            return str(exc)
        if not found:
            return f"the output does not match the regular expression {expectation.regex!r}"
    return None


def compare_output(
    golden: SmokeGolden,
    observed_text: str,
    observed_stop_reason: StopReason,
    expectation: Expectation | None = None,
    *,
    after_tolerated: bool = False,
) -> StageResult:
    """Stage (e): the post-processed text and stop reason against the recording, then the expectations.

    After a tolerated divergence the text is expected to differ, so only the expectations can fail it.
    """
    unmet = expectation_failure(expectation, observed_text)
    if observed_text == golden.text and observed_stop_reason == golden.stop_reason:
        if unmet is not None:
            return StageResult(
                stage="output",
                status="fail",
                detail=f"{unmet} (the output is the recorded one: the expectation failed when recorded too)",
                observed=observed_text,
            )
        return StageResult(stage="output", status="pass", detail="the output matches the recording")
    if unmet is not None:
        return StageResult(stage="output", status="fail", detail=unmet, observed=observed_text)
    if after_tolerated:
        return StageResult(
            stage="output",
            status="tolerated",
            detail="the output differs after a tolerated divergence; the expectations hold",
        )
    stop_note = (
        f"; generation ended by {observed_stop_reason} now, by {golden.stop_reason} in the recording: "
        "the stop strings or max-tokens changed"
        if observed_stop_reason != golden.stop_reason
        else ""
    )
    if observed_text == golden.text:
        return StageResult(
            stage="output",
            status="fail",
            detail=f"the output text matches but the stop reason differs{stop_note}",
            expected=golden.stop_reason,
            observed=observed_stop_reason,
        )
    index, detail, expected_part, observed_part = _text_difference("the output", golden.text, observed_text)
    return StageResult(
        stage="output",
        status="fail",
        detail=detail + stop_note,
        position=index,
        expected=expected_part,
        observed=observed_part,
    )


# Putting the stages together --------------------------------------------------------------------------------


def smoke_result(name: str, stages: Sequence[StageResult]) -> SmokeResult:
    """One smoke prompt's stages, in chain order, with the first failure named."""
    ordered = tuple(sorted(stages, key=lambda result: STAGES.index(result.stage)))
    failure = next((result for result in ordered if result.status == "fail"), None)
    tolerated = any(result.status == "tolerated" for result in ordered)
    skip = next((result for result in ordered if result.status == "skip"), None)
    unchecked = [result.stage for result in ordered if result.status == "not-checked"]
    if failure is not None:
        explanation = f"{failure.stage}: {failure.detail}"
    elif skip is not None:
        explanation = f"not certified: {skip.stage}: {skip.detail}"
    elif tolerated:
        explanation = "reproduced within the tolerance"
    else:
        explanation = "reproduced"
    if failure is None and skip is None and unchecked:
        explanation += f" (not checked: {', '.join(unchecked)})"
    return SmokeResult(
        name=name,
        stages=ordered,
        first_failure=failure.stage if failure is not None else None,
        tolerated=tolerated,
        explanation=explanation,
    )


def is_certified(result: SmokeResult) -> bool:
    """Whether every stage of a smoke prompt was compared and none failed.

    A smoke prompt without a golden fails nothing, but skips the stages that need one; it certifies nothing.
    """
    return result.first_failure is None and all(stage.status != "skip" for stage in result.stages)


def compare_smoke(
    name: str,
    golden: SmokeGolden | None,
    observation: Observation,
    *,
    rendered_sha256: str,
    artifacts: StageResult,
    bos_id: int | None,
    eos_id: int | None = None,
    template: str | None = None,
    template_sha256: str | None = None,
    reference_template: str | None = None,
    expected_rendered: str | None = None,
    expectation: Expectation | None = None,
    tolerance: Tolerance | None = None,
    decode: Decode | None = None,
) -> SmokeResult:
    """Every stage of one smoke prompt, from the lock's golden and one observation."""
    template_stage = compare_render(
        rendered_sha256,
        observation.rendered,
        template=template,
        template_sha256=template_sha256,
        reference_template=reference_template,
        expected_rendered=expected_rendered,
    )
    if golden is None:
        reason = "no golden recorded for this smoke prompt; run `stacklock record`"
        return smoke_result(
            name,
            (
                artifacts,
                template_stage,
                skipped("tokenization", reason),
                skipped("generation", reason),
                skipped("output", reason),
            ),
        )
    generation = observation.generation
    generation_stage = compare_generation(golden, generation, tolerance=tolerance, decode=decode)
    return smoke_result(
        name,
        (
            artifacts,
            template_stage,
            compare_tokens(golden, generation.prompt_tokens, bos_id=bos_id, eos_id=eos_id, decode=decode),
            generation_stage,
            compare_output(
                golden,
                generation.text,
                generation.stop_reason,
                expectation,
                after_tolerated=generation_stage.status == "tolerated",
            ),
        ),
    )


_IDENTITY_KEYS = ("version", "build", "backend", "devices", "cpu", "system-info", "platform", "python")


def engine_differences(recorded: Mapping[str, object], observed: EngineIdentity) -> tuple[str, ...]:
    """How the engine observed now differs from the one the goldens were recorded on, one line each."""
    now = observed.model_dump(by_alias=True)
    notes = []
    for key in _IDENTITY_KEYS:
        before, after = recorded.get(key), now.get(key)
        if isinstance(before, list):
            before = tuple(before)
        if before is not None and before != after:
            notes.append(f"engine {key}: recorded {before!r}, now {after!r}")
    return tuple(notes)


def build_report(
    results: Sequence[SmokeResult],
    *,
    engine: EngineIdentity | None = None,
    recorded_engine: Mapping[str, object] | None = None,
    tolerance: Tolerance | None = None,
) -> VerifyReport:
    """The verify report: reproduced when every smoke prompt was compared stage by stage and none failed."""
    notes = engine_differences(recorded_engine, engine) if engine is not None and recorded_engine else ()
    unchecked = {
        stage.stage: stage.detail
        for result in results
        for stage in result.stages
        if stage.status == "not-checked"
    }
    return VerifyReport(
        results=tuple(results),
        reproduced=bool(results) and all(is_certified(result) for result in results),
        tolerated=any(result.tolerated for result in results),
        not_checked=tuple(f"{stage}: {detail}" for stage, detail in unchecked.items()),
        engine=engine,
        tolerance=tolerance,
        notes=notes,
    )
