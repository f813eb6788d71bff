"""Rendering a verify report as text, JSON and JUnit XML."""

from __future__ import annotations

import json
from xml.etree import ElementTree as ET

import pytest

from stacklock.engines.base import EngineIdentity
from stacklock.report.verify import render, render_json, render_junit, render_text
from stacklock.verify.compare import (
    Candidate,
    Stage,
    StageResult,
    Tolerance,
    VerifyReport,
    build_report,
    not_checked,
    skipped,
    smoke_result,
)
from tests.conftest import run_fresh

ENGINE = EngineIdentity(
    name="llama-cpp-python",
    version="0.3.36",
    build="0c1e570",
    backend="cpu",
    devices=("CPU: AMD EPYC",),
    system_info="CPU : AVX2 = 1 |",
    python="CPython 3.11.7",
    platform="Linux-6.8-x86_64",
    cpu="AMD EPYC",
)


def passing(stage: Stage) -> StageResult:
    return StageResult(stage=stage, status="pass", detail=f"{stage} matches")


def make_report() -> VerifyReport:
    good = smoke_result(
        "greeting", [passing(s) for s in ("artifacts", "template", "tokenization", "generation", "output")]
    )
    bad = smoke_result(
        "capital",
        [
            passing("artifacts"),
            passing("template"),
            passing("tokenization"),
            StageResult(
                stage="generation",
                status="fail",
                detail="token 3 differs: recorded 13 ' Paris', now 14 ' London'",
                position=3,
                candidates=(
                    Candidate(token=14, piece=" London", logprob=-0.2),
                    Candidate(token=13, piece=" Paris", logprob=-1.5),
                ),
            ),
            StageResult(stage="output", status="fail", detail="the output differs at character 4"),
        ],
    )
    unrecorded = smoke_result(
        "new", [passing("artifacts"), passing("template"), skipped("tokenization", "no golden")]
    )
    return build_report([good, bad, unrecorded], engine=ENGINE, recorded_engine={"backend": "cuda"})


def test_text_shows_every_stage_and_names_the_first_failure() -> None:
    text = render_text(make_report())
    lines = text.splitlines()
    assert lines[0] == "engine: llama-cpp-python 0.3.36, build 0c1e570 on cpu (AMD EPYC)"
    assert lines[1] == "note: engine backend: recorded 'cuda', now 'cpu'"
    assert "greeting: reproduced" in lines
    assert "capital: FAILED at generation" in lines
    assert sum(1 for line in lines if line.startswith("    generation")) == 2
    assert "    generation   FAIL      token 3 differs: recorded 13 ' Paris', now 14 ' London'" in lines
    assert "    tokenization skip      no golden" in lines
    assert "    → generation: token 3 differs: recorded 13 ' Paris', now 14 ' London'" in lines
    assert "    → alternatives now: 14 ' London' (-0.2000), 13 ' Paris' (-1.5000)" in lines
    assert lines[-1] == "not reproduced: 1 of 3 smoke prompt(s) failed"


def test_text_verdicts() -> None:
    ok = build_report([smoke_result("a", [passing("output")])])
    assert render_text(ok).endswith("reproduced: 1 smoke prompt(s), every stage identical to the recording\n")
    tolerated = build_report(
        [smoke_result("a", [StageResult(stage="generation", status="tolerated", detail="near-tie")])],
        tolerance=Tolerance(margin=0.25),
    )
    assert render_text(tolerated).endswith(
        "reproduced within the tolerance (margin 0.25): 1 smoke prompt(s)\n"
    )


def test_json_round_trips_and_uses_kebab_case() -> None:
    report = make_report()
    rendered = render_json(report)
    data = json.loads(rendered)
    assert data["results"][1]["first-failure"] == "generation"
    assert data["engine"]["system-info"] == "CPU : AVX2 = 1 |"
    assert VerifyReport.model_validate_json(rendered) == report


def test_junit_has_one_case_per_stage_with_failures_and_skips() -> None:
    root = ET.fromstring(render_junit(make_report()))
    suite = root.find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "13"
    assert suite.get("failures") == "2"
    assert suite.get("skipped") == "1"
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases[5:8]] == [
        ("capital", "artifacts"),
        ("capital", "template"),
        ("capital", "tokenization"),
    ]
    failure = cases[8].find("failure")
    assert failure is not None
    assert failure.get("type") == "stacklock.generation"
    assert failure.get("message") == "token 3 differs: recorded 13 ' Paris', now 14 ' London'"
    assert cases[12].find("skipped") is not None
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["engine.version"] == "0.3.36"
    assert properties["engine.devices"] == "CPU: AMD EPYC"


def test_rendering_is_deterministic() -> None:
    code = "from tests.test_report import make_report; from stacklock.report.verify import render_{0}; print(render_{0}(make_report()), end='')"
    assert run_fresh(code.format("junit")) == render_junit(make_report())
    assert run_fresh(code.format("json")) == render_json(make_report())


def test_render_dispatch() -> None:
    report = make_report()
    assert render(report, "text") == render_text(report)
    assert render(report, "junit") == render_junit(report)
    with pytest.raises(ValueError, match="unknown report format 'sarif'"):
        render(report, "sarif")


def test_a_stage_the_engine_hides_is_not_checked_never_ok() -> None:
    stages = [passing(s) for s in ("artifacts", "template", "generation", "output")]
    hidden = not_checked("tokenization", "ollama does not report the token ids of a prompt")
    report = build_report([smoke_result("greeting", [*stages, hidden])])
    assert report.reproduced
    assert report.not_checked == (
        "tokenization: not checked (ollama does not report the token ids of a prompt)",
    )
    assert report.results[0].explanation == "reproduced (not checked: tokenization)"
    text = render_text(report)
    assert "every stage identical" not in text
    assert text.splitlines()[-1] == (
        "reproduced on the stages this engine lets stacklock observe: 1 smoke prompt(s); not checked: tokenization"
    )
    assert "    tokenization -         not checked (ollama does not report" in text
    suite = ET.fromstring(render_junit(report)).find("testsuite")
    assert suite is not None
    assert suite.get("skipped") == "1"
    assert suite.get("failures") == "0"
    assert json.loads(render_json(report))["not-checked"] == list(report.not_checked)
