"""Renderers of `stacklock check` results: text and JSON (SARIF is in :mod:`stacklock.report.sarif`)."""

from __future__ import annotations

import json

from stacklock.model.findings import Severity
from stacklock.rules.check import CheckResult


def render_check_text(result: CheckResult) -> str:
    allowed = {a.rule: a.reason for a in result.allowances}
    if not result.findings and not result.stale:
        return "no findings"
    lines = []
    for finding in result.findings:
        suffix = f" (allowed: {allowed[finding.rule]})" if finding.rule in allowed else ""
        lines.append(f"{finding.severity.value}: {finding.rule}: {finding.title}{suffix}")
        lines.append(f"  why: {finding.explanation}")
        lines.append(f"  fix: {finding.fix}")
        if finding.references:
            lines.append(f"  see: {', '.join(finding.references)}")
    lines.extend(
        f"note: the lock's allowance for rule {a.rule} matches no error finding; `stacklock lock` drops it"
        for a in result.stale
    )
    errors = sum(f.severity is Severity.ERROR for f in result.findings)
    lines.append(f"{len(result.findings)} finding(s): {errors} error(s), {len(result.blocking)} not allowed")
    return "\n".join(lines)


def render_check_json(result: CheckResult) -> str:
    return json.dumps(
        {
            "ok": result.ok,
            "findings": [f.model_dump(mode="json", by_alias=True) for f in result.findings],
            "allowances": [a.model_dump(mode="json", by_alias=True) for a in result.allowances],
            "blocking": [f.rule for f in result.blocking],
            "stale-allowances": [a.rule for a in result.stale],
        },
        indent=2,
        ensure_ascii=False,
    )
