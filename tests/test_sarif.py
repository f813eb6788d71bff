from __future__ import annotations

import json

from stacklock.model.findings import Allowance, Finding, Link, Severity
from stacklock.report.sarif import reference_url, render_sarif


def finding(rule: str, severity: Severity, refs: tuple[str, ...] = ("ggml-org/llama.cpp#8197",)) -> Finding:
    return Finding(
        rule=rule,
        severity=severity,
        title=f"{rule} title",
        links=(Link.MODEL, Link.ENGINE),
        explanation="why",
        fix="how",
        references=refs,
    )


def test_sarif_document_shape_levels_and_suppressions() -> None:
    findings = [finding("a", Severity.ERROR), finding("b", Severity.WARNING, ()), finding("c", Severity.INFO)]
    text = render_sarif(
        findings, allowances=[Allowance(rule="a", reason="accepted for the demo")], tool_version="0.1.0"
    )
    assert text == render_sarif(
        findings, allowances=[Allowance(rule="a", reason="accepted for the demo")], tool_version="0.1.0"
    )
    doc = json.loads(text)
    assert doc["version"] == "2.1.0"
    assert doc["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    run = doc["runs"][0]
    assert run["tool"]["driver"]["name"] == "stacklock"
    assert run["tool"]["driver"]["version"] == "0.1.0"
    assert [r["id"] for r in run["tool"]["driver"]["rules"]] == ["a", "b", "c"]
    assert run["tool"]["driver"]["rules"][0]["helpUri"] == "https://github.com/ggml-org/llama.cpp/issues/8197"
    assert "helpUri" not in run["tool"]["driver"]["rules"][1]
    assert [(r["ruleId"], r["ruleIndex"], r["level"]) for r in run["results"]] == [
        ("a", 0, "error"),
        ("b", 1, "warning"),
        ("c", 2, "note"),
    ]
    assert run["results"][0]["suppressions"] == [
        {"kind": "external", "justification": "accepted for the demo"}
    ]
    assert "suppressions" not in run["results"][1]
    location = run["results"][0]["locations"][0]["physicalLocation"]
    assert location == {"artifactLocation": {"uri": "llmstack.lock"}, "region": {"startLine": 1}}
    assert run["results"][0]["message"]["text"] == "a title. Fix: how"


def test_reference_urls() -> None:
    assert reference_url("ollama/ollama#5341") == "https://github.com/ollama/ollama/issues/5341"
    assert reference_url("abetlen/llama-cpp-python@af637928") == (
        "https://github.com/abetlen/llama-cpp-python/commit/af637928"
    )
    assert reference_url("https://example.org/x") == "https://example.org/x"


def test_no_findings_is_an_empty_run() -> None:
    doc = json.loads(render_sarif([]))
    assert doc["runs"][0]["results"] == []
    assert doc["runs"][0]["tool"]["driver"]["rules"] == []
