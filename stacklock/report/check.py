"""Renderers of `stacklock check` results: text and JSON (SARIF is in :mod:`stacklock.report.sarif`)."""

from __future__ import annotations

import json
from typing import Any

from stacklock.model.findings import Severity
from stacklock.model.lock import Lock
from stacklock.rules.check import CheckResult
from stacklock.template.corpus import CORPUS_VERSION

#: The version of ``check --format json``'s document; bumped when a key changes meaning or goes away.
CHECK_JSON_SCHEMA_VERSION = 1


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


def render_check_json(result: CheckResult, lock: Lock, *, lock_sha256: str | None, tool_version: str) -> str:
    """The document tools read: what was checked (digests), what ran (coverage) and what was found.

    ``lock_sha256`` is the digest of the lock file's bytes, or ``None`` when there is no lock (the lock was
    refused): then ``locked`` is false and the findings are those of the manifest's resolution.
    """
    covered = result.coverage
    coverage: dict[str, Any] = {
        "rules": {
            "evaluated": list(covered.rules),
            "missing-facts": [
                {"id": key, "facts": list(names)} for key, names in covered.missing_facts.items()
            ],
        },
        "checks": {
            "ran": list(covered.checks_ran),
            "skipped": [{"id": key, "reason": reason} for key, reason in covered.checks_skipped.items()],
        },
        "probe-corpus-version": CORPUS_VERSION,
    }
    return json.dumps(
        {
            "schema-version": CHECK_JSON_SCHEMA_VERSION,
            "stacklock-version": tool_version,
            "ok": result.ok,
            "locked": lock_sha256 is not None,
            "lock": {"sha256": lock_sha256, "manifest-hash": lock.manifest_hash},
            "model": {"path": lock.model.path, "sha256": lock.model.sha256, "size": lock.model.size},
            "registries": [r.model_dump(mode="json", by_alias=True) for r in lock.registries],
            "coverage": coverage,
            "findings": [f.model_dump(mode="json", by_alias=True) for f in result.findings],
            "allowances": [a.model_dump(mode="json", by_alias=True) for a in result.allowances],
            "blocking": [f.rule for f in result.blocking],
            "stale-allowances": [a.rule for a in result.stale],
        },
        indent=2,
        ensure_ascii=False,
    )
