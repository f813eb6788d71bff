"""The pure comparison core, on hand-built goldens and observations: every stage, pass and fail."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from stacklock.engines.base import (
    EngineIdentity,
    Generation,
    Observation,
    StepLogprobs,
    StopReason,
    sha256_tokens,
)
from stacklock.files.digest import sha256_text
from stacklock.model.lock import SmokeGolden
from stacklock.model.manifest import Expectation
from stacklock.verify.compare import (
    MAX_STORED_PROMPT_TOKENS,
    StageResult,
    Tolerance,
    build_report,
    compare_artifacts,
    compare_generation,
    compare_output,
    compare_render,
    compare_smoke,
    compare_tokens,
    engine_differences,
    first_difference,
    golden_from_observation,
    recording_from,
    skipped,
    smoke_result,
)

BOS, EOS = 2, 1
PIECES = {
    2: "<bos>",
    1: "<eos>",
    10: " The",
    11: " capital",
    12: " is",
    13: " Paris",
    14: " London",
    15: ".",
    16: " Rome",
}


def decode(tokens: Sequence[int]) -> str:
    return "".join(PIECES.get(t, f"<{t}>") for t in tokens)


def step(token: int, top: Sequence[tuple[int, float]]) -> StepLogprobs:
    return StepLogprobs(token=token, logprob=dict(top)[token], top=tuple(top))


def generation(
    tokens: tuple[int, ...] = (13, 15, EOS),
    *,
    prompt: tuple[int, ...] = (BOS, 10, 11, 12),
    text: str = " Paris.",
    stop_reason: StopReason = "eos",
    steps: tuple[StepLogprobs, ...] | None = None,
) -> Generation:
    if steps is None:
        steps = tuple(step(t, [(t, -0.1), (14, -2.5), (16, -3.0)]) for t in tokens)
    return Generation(
        prompt_tokens=prompt,
        tokens=tokens,
        pieces=tuple(decode([t]) for t in tokens),
        steps=steps,
        text=text,
        stop_reason=stop_reason,
    )


def observation(gen: Generation | None = None, rendered: str = "<bos>The capital is") -> Observation:
    gen = gen or generation()
    return Observation(rendered=rendered, rendered_sha256=sha256_text(rendered), generation=gen, top_k=3)


GOLDEN = golden_from_observation(observation())


def identity(**changes: Any) -> EngineIdentity:
    base = {
        "name": "llama-cpp-python",
        "version": "0.3.36",
        "build": "0c1e570",
        "backend": "cpu",
        "devices": ("CPU: AMD EPYC",),
        "system_info": "CPU : AVX2 = 1 |",
        "python": "CPython 3.11.7",
        "platform": "Linux-6.8-x86_64",
        "cpu": "AMD EPYC",
    }
    return EngineIdentity(**{**base, **changes})


# Goldens -----------------------------------------------------------------------------------------------------


def test_golden_from_observation_rounds_logprobs_and_stores_short_prompts() -> None:
    steps = (StepLogprobs(token=13, logprob=-0.123456, top=((13, -0.123456), (14, -2.0000449))),)
    golden = golden_from_observation(
        observation(generation((13,), text=" Paris", stop_reason="max-tokens", steps=steps))
    )
    assert golden.top_logprobs == (((13, -0.1235), (14, -2.0)),)
    assert golden.prompt_tokens == (BOS, 10, 11, 12)
    assert golden.prompt_token_count == 4
    assert golden.prompt_tokens_sha256 == "e58e0a447759fe987652c7da47241842136fd07d8df9d6b3f66bc119121b4852"
    assert golden.tokens == (13,)
    assert golden.stop_reason == "max-tokens"


def test_golden_keeps_only_the_digest_of_long_prompts() -> None:
    prompt = (BOS,) + (10,) * MAX_STORED_PROMPT_TOKENS
    golden = golden_from_observation(observation(generation(prompt=prompt)))
    assert golden.prompt_tokens is None
    assert golden.prompt_token_count == MAX_STORED_PROMPT_TOKENS + 1


def test_token_digest_is_fixed() -> None:
    # The digest format is part of the lock format: ids in decimal joined by commas. Known values, computed
    # once with hashlib on the literal bytes b"", b"1,22,333" and b"2,10,11,12"; a change would orphan every
    # golden ever recorded.
    assert sha256_tokens(()) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert sha256_tokens((1, 22, 333)) == "8915516745284e69425d3f566025a855f5a5718d6d44f09451fb19d0f61fc185"
    assert (
        sha256_tokens((BOS, 10, 11, 12)) == "e58e0a447759fe987652c7da47241842136fd07d8df9d6b3f66bc119121b4852"
    )


def test_recording_uses_kebab_case_identity_keys() -> None:
    environment = {"os": "Linux 6.8", "machine": "x86_64", "python": "3.11.7"}
    recording = recording_from(identity(), environment, 5, {"capital": GOLDEN}, backend="cuda")
    assert recording.engine["system-info"] == "CPU : AVX2 = 1 |"
    assert recording.engine["devices"] == ("CPU: AMD EPYC",)
    assert recording.top_k == 5
    assert recording.goldens == {"capital": GOLDEN}
    # Named by where it ran: the backend the engine reports, not the lock's kind.
    assert recording.id == f"llama-cpp-python-{identity().version}-cpu"


def test_a_served_engine_recording_is_named_by_the_locked_backend_kind() -> None:
    served = identity().model_copy(
        update={"name": "llama-server", "version": "b11434", "backend": "not reported"}
    )
    recording = recording_from(served, {}, 5, {}, backend="cuda")
    assert recording.id == "llama-server-b11434-cuda"


def test_first_difference() -> None:
    assert first_difference("abc", "abc") is None
    assert first_difference("abc", "abd") == 2
    assert first_difference((1, 2), (1, 2, 3)) == 2


# Artifacts ---------------------------------------------------------------------------------------------------


def test_artifacts_pass_and_fail() -> None:
    digest = "a" * 64
    assert compare_artifacts({"model gemma.gguf": digest}, {"model gemma.gguf": digest}).status == "pass"
    changed = compare_artifacts({"model gemma.gguf": digest}, {"model gemma.gguf": "b" * 64})
    assert changed.status == "fail"
    assert changed.detail == (
        "model gemma.gguf changed: sha256 bbbbbbbbbbbb… where the lock has aaaaaaaaaaaa…; "
        "restore the locked file or re-lock and re-record"
    )
    missing = compare_artifacts({"model gemma.gguf": digest}, {})
    assert missing.detail.startswith("model gemma.gguf is missing")


# Template ----------------------------------------------------------------------------------------------------

TEMPLATE = "{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"


def test_render_passes_on_equal_digest() -> None:
    rendered = "<start_of_turn>user\nhi<end_of_turn>\n"
    result = compare_render(
        sha256_text(rendered), rendered, template=TEMPLATE, template_sha256=sha256_text(TEMPLATE)
    )
    assert result.status == "pass"


def test_render_names_the_first_differing_character_of_an_edited_template() -> None:
    edited = TEMPLATE.replace("<start_of_turn>", "<start_of_turm>")
    result = compare_render(
        sha256_text("x"),
        "y",
        template=edited,
        template_sha256=sha256_text(TEMPLATE),
        reference_template=TEMPLATE,
    )
    assert result.status == "fail"
    assert result.position == TEMPLATE.index("<start_of_turn>") + len("<start_of_tur")
    assert result.detail.startswith(
        f"the locked template differs at character {result.position} (line 1, column "
    )
    assert "expected '… %}<start_of_turn>{{ m.role }}\\n{{ m.cont…'" in result.detail
    assert "got '… %}<start_of_turm>{{ m.role }}\\n{{ m.cont…'" in result.detail


def test_render_fails_on_an_edited_template_even_when_the_render_is_unchanged() -> None:
    rendered = "<start_of_turn>user\nhi<end_of_turn>\n"
    edited = TEMPLATE + "{# a comment #}"
    result = compare_render(
        sha256_text(rendered), rendered, template=edited, template_sha256=sha256_text(TEMPLATE)
    )
    assert result.status == "fail"
    assert result.detail.startswith("the locked template text was edited: its sha256 is ")


def test_render_diff_against_a_reference_render_gives_line_and_column() -> None:
    expected = "<start_of_turn>user\nhello<end_of_turn>\n"
    observed = "<start_of_turn>user\nHello<end_of_turn>\n"
    result = compare_render(sha256_text(expected), observed, expected_rendered=expected)
    assert result.position == 20
    assert result.detail.startswith("the rendered prompt differs at character 20 (line 2, column 1): ")


def test_render_with_unchanged_template_blames_the_renderer() -> None:
    result = compare_render(sha256_text("a"), "b", template=TEMPLATE, template_sha256=sha256_text(TEMPLATE))
    assert result.status == "fail"
    assert "with the template text unchanged: the renderer" in result.detail


# Tokenization ------------------------------------------------------------------------------------------------


def test_tokens_pass() -> None:
    result = compare_tokens(GOLDEN, (BOS, 10, 11, 12), bos_id=BOS)
    assert result.status == "pass"
    assert result.detail == "4 prompt tokens match the recording"


def test_double_bos_is_called_out() -> None:
    result = compare_tokens(GOLDEN, (BOS, BOS, 10, 11, 12), bos_id=BOS, decode=decode)
    assert result.status == "fail"
    assert result.detail == (
        "double BOS: the prompt now starts with two BOS tokens (2 '<bos>') (5 tokens now, 4 recorded): the "
        "rendered text begins with BOS and the tokenizer adds another; set add-bos = false or remove bos_token "
        "from the template"
    )
    assert result.position == 1


def test_missing_bos_is_called_out() -> None:
    result = compare_tokens(GOLDEN, (10, 11, 12), bos_id=BOS, decode=decode)
    assert result.detail.startswith("the BOS token (2 '<bos>') is missing at the start of the prompt")
    assert "add-bos setting changed" in result.detail


def test_extra_bos_is_called_out() -> None:
    golden = golden_from_observation(observation(generation(prompt=(10, 11, 12))))
    result = compare_tokens(golden, (BOS, 10, 11, 12), bos_id=BOS, decode=decode)
    assert result.detail.startswith(
        "an extra BOS token (2 '<bos>') starts the prompt (4 tokens now, 3 recorded)"
    )


def test_appended_eos_is_called_out() -> None:
    result = compare_tokens(GOLDEN, (BOS, 10, 11, 12, EOS), bos_id=BOS, eos_id=EOS, decode=decode)
    assert result.detail.startswith("an EOS token (1 '<eos>') now ends the prompt")


def test_first_differing_prompt_token() -> None:
    result = compare_tokens(GOLDEN, (BOS, 10, 16, 12), bos_id=BOS, decode=decode)
    assert result.position == 2
    assert result.detail.startswith(
        "prompt token 2 differs: recorded 11 ' capital', now 16 ' Rome' (4 tokens now"
    )


def test_long_prompt_difference_without_ids() -> None:
    prompt = (BOS,) + (10,) * MAX_STORED_PROMPT_TOKENS
    golden = golden_from_observation(observation(generation(prompt=prompt)))
    result = compare_tokens(golden, prompt[:-1], bos_id=BOS)
    assert result.status == "fail"
    assert "keeps only the digest" in result.detail


# Generation --------------------------------------------------------------------------------------------------


def test_generation_pass_reports_drift() -> None:
    steps = (
        step(13, [(13, -0.10004), (14, -2.5), (16, -3.0)]),
        step(15, [(15, -0.1), (14, -2.5), (16, -3.0)]),
        step(EOS, [(EOS, -0.1), (14, -2.5), (16, -3.01)]),
    )
    result = compare_generation(GOLDEN, generation(steps=steps))
    assert result.status == "pass"
    assert result.detail == "3 generated tokens match the recording (largest logprob drift 0.0100)"


def test_generation_names_the_first_differing_token_and_alternatives() -> None:
    steps = (step(14, [(14, -0.2), (16, -1.9), (17, -2.5)]), step(15, [(15, -0.1)]), step(EOS, [(EOS, -0.1)]))
    result = compare_generation(
        GOLDEN, generation((14, 15, EOS), steps=steps, text=" London."), decode=decode
    )
    assert result.status == "fail"
    assert result.position == 0
    assert result.expected == "13 ' Paris'"
    assert result.observed == "14 ' London'"
    assert [c.token for c in result.candidates] == [14, 16, 17]
    assert result.detail == (
        "token 0 differs: recorded 13 ' Paris', now 14 ' London' (logprob -0.2000); the recorded token is not in "
        "the top 3; alternatives now: ' London' -0.2000, ' Rome' -1.9000, '<17>' -2.5000; recorded: "
        "' Paris' -0.1000, ' London' -2.5000, ' Rome' -3.0000"
    )


def near_tie(gap: float) -> Generation:
    steps = (
        step(14, [(14, -0.6), (13, -0.6 - gap), (16, -3.0)]),
        step(15, [(15, -0.1)]),
        step(EOS, [(EOS, -0.1)]),
    )
    return generation((14, 15, EOS), steps=steps, text=" London.")


def test_near_tie_is_tolerated_only_when_asked() -> None:
    assert compare_generation(GOLDEN, near_tie(0.05), decode=decode).status == "fail"
    result = compare_generation(GOLDEN, near_tie(0.05), tolerance=Tolerance(margin=0.1), decode=decode)
    assert result.status == "tolerated"
    assert "a near-tie within the margin 0.1, accepted; the 0 tokens before it match" in result.detail


def test_gap_beyond_the_margin_is_not_tolerated() -> None:
    result = compare_generation(GOLDEN, near_tie(0.3), tolerance=Tolerance(margin=0.1), decode=decode)
    assert result.status == "fail"
    assert "the recorded token is at logprob -0.9000, 0.3000 below" in result.detail


def test_tolerance_needs_the_golden_token_in_the_top_k() -> None:
    steps = (step(14, [(14, -0.6), (16, -0.61)]), step(15, [(15, -0.1)]), step(EOS, [(EOS, -0.1)]))
    result = compare_generation(
        GOLDEN, generation((14, 15, EOS), steps=steps), tolerance=Tolerance(margin=5.0)
    )
    assert result.status == "fail"


def test_shorter_run_that_hit_a_stop_string_is_left_to_the_output_stage() -> None:
    observed = generation((13,), steps=GOLDEN_STEPS[:1], text=" Paris", stop_reason="stop-string")
    result = compare_generation(GOLDEN, observed)
    assert result.status == "pass"
    assert "stopped at a stop string now" in result.detail


def test_shorter_run_at_max_tokens_fails() -> None:
    observed = generation((13,), steps=GOLDEN_STEPS[:1], text=" Paris", stop_reason="max-tokens")
    result = compare_generation(GOLDEN, observed)
    assert result.status == "fail"
    assert result.detail == (
        "the first 1 tokens match, but generation stopped at token 1: 1 tokens now, 3 recorded; max-tokens changed"
    )


GOLDEN_STEPS = generation().steps


# Output ------------------------------------------------------------------------------------------------------


def test_output_pass_and_expectations() -> None:
    assert compare_output(GOLDEN, " Paris.", "eos", Expectation(contains="Paris")).status == "pass"
    unmet = compare_output(GOLDEN, " Paris.", "eos", Expectation(regex=r"^ Rome"))
    assert unmet.status == "fail"
    assert unmet.detail.startswith("the output does not match the regular expression '^ Rome'")
    assert compare_output(GOLDEN, " Paris.", "eos", Expectation(equals="Paris.")).status == "fail"


def test_output_difference_names_character_and_stop_reason_change() -> None:
    result = compare_output(GOLDEN, " Par", "stop-string")
    assert result.status == "fail"
    assert result.position == 4
    assert result.detail == (
        "the output differs at character 4 (line 1, column 5): expected ' Paris.', got ' Par'; generation ended by "
        "stop-string now, by eos in the recording: the stop strings or max-tokens changed"
    )


def test_output_after_a_tolerated_divergence() -> None:
    assert compare_output(GOLDEN, " London.", "eos", after_tolerated=True).status == "tolerated"
    result = compare_output(GOLDEN, " London.", "eos", Expectation(contains="Paris"), after_tolerated=True)
    assert result.status == "fail"


# Smoke results and the report --------------------------------------------------------------------------------

PASS_ARTIFACTS = StageResult(stage="artifacts", status="pass", detail="1 file hash(es) match the lock")


def test_compare_smoke_reproduces_an_identical_observation() -> None:
    obs = observation()
    result = compare_smoke(
        "capital", GOLDEN, obs, rendered_sha256=obs.rendered_sha256, artifacts=PASS_ARTIFACTS, bos_id=BOS
    )
    assert [s.stage for s in result.stages] == [
        "artifacts",
        "template",
        "tokenization",
        "generation",
        "output",
    ]
    assert all(s.status == "pass" for s in result.stages)
    assert result.first_failure is None
    assert result.explanation == "reproduced"


def test_compare_smoke_names_the_first_failing_stage() -> None:
    obs = observation(generation(prompt=(BOS, BOS, 10, 11, 12)))
    result = compare_smoke(
        "capital", GOLDEN, obs, rendered_sha256=obs.rendered_sha256, artifacts=PASS_ARTIFACTS, bos_id=BOS
    )
    assert result.first_failure == "tokenization"
    assert result.explanation.startswith("tokenization: double BOS")


def test_compare_smoke_without_golden_skips() -> None:
    obs = observation()
    result = compare_smoke(
        "capital", None, obs, rendered_sha256=obs.rendered_sha256, artifacts=PASS_ARTIFACTS, bos_id=BOS
    )
    assert [s.status for s in result.stages] == ["pass", "pass", "skip", "skip", "skip"]
    assert result.first_failure is None


def test_smoke_result_orders_stages_and_picks_the_earliest_failure() -> None:
    stages = [
        StageResult(stage="output", status="fail", detail="late"),
        StageResult(stage="template", status="fail", detail="early"),
        skipped("artifacts", "not checked"),
    ]
    result = smoke_result("x", stages)
    assert [s.stage for s in result.stages] == ["artifacts", "template", "output"]
    assert result.first_failure == "template"
    assert result.explanation == "template: early"


def test_build_report_and_engine_differences() -> None:
    ok = smoke_result("a", [PASS_ARTIFACTS])
    tolerated = smoke_result("b", [StageResult(stage="generation", status="tolerated", detail="near-tie")])
    failed = smoke_result("c", [StageResult(stage="output", status="fail", detail="differs")])
    recorded = identity().model_dump(by_alias=True)
    now = identity(backend="cuda", version="0.3.37")
    report = build_report([ok, tolerated], engine=now, recorded_engine=recorded, tolerance=Tolerance())
    assert report.reproduced
    assert report.tolerated
    assert report.notes == (
        "engine version: recorded '0.3.36', now '0.3.37'",
        "engine backend: recorded 'cpu', now 'cuda'",
    )
    assert not build_report([ok, failed]).reproduced
    assert engine_differences(recorded, identity()) == ()


@pytest.mark.parametrize("margin", [0, -1])
def test_tolerance_margin_must_be_positive(margin: float) -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        Tolerance(margin=margin)


def test_golden_round_trips_through_the_lock_model() -> None:
    assert SmokeGolden.model_validate(GOLDEN.model_dump(by_alias=True)) == GOLDEN
