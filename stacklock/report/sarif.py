"""Findings as SARIF 2.1.0, so code-scanning interfaces (GitHub, GitLab, IDEs) show them on the lock file.

Pure: findings in, text out. Each distinct rule becomes a ``reportingDescriptor``; each finding a ``result``
located on the lock file. Error findings the user accepted with ``--allow`` keep their result, with an
``external`` suppression that carries the user's reason, so the interface shows them as dismissed.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any, Final

from stacklock.model.findings import Allowance, Finding, Severity

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

SARIF_VERSION: Final = "2.1.0"
SARIF_SCHEMA: Final = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI: Final = "https://github.com/stacklock/stacklock"

_LEVEL: Final = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
_GITHUB_REF = re.compile(r"^([A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)#(\d+)$")
_GITHUB_COMMIT = re.compile(r"^([A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)@([0-9a-f]{7,40})$")


def reference_url(reference: str) -> str:
    """``owner/repo#N`` → its GitHub URL (GitHub redirects issue numbers to pull requests); URLs stay."""
    match = _GITHUB_REF.match(reference)
    if match:
        return f"https://github.com/{match[1]}/issues/{match[2]}"
    match = _GITHUB_COMMIT.match(reference)
    if match:
        return f"https://github.com/{match[1]}/commit/{match[2]}"
    return reference


def _descriptor(finding: Finding) -> dict[str, Any]:
    urls = [reference_url(r) for r in finding.references]
    help_lines = [finding.fix, "", "References:", *(f"- {u}" for u in urls)] if urls else [finding.fix]
    descriptor: dict[str, Any] = {
        "id": finding.rule,
        "name": finding.rule,
        "shortDescription": {"text": finding.title},
        "fullDescription": {"text": finding.explanation},
        "help": {"text": "\n".join(help_lines)},
        "defaultConfiguration": {"level": _LEVEL[finding.severity]},
        "properties": {"tags": [link.value for link in finding.links], "registry": finding.registry},
    }
    if urls:
        descriptor["helpUri"] = urls[0]
    return descriptor


_TABLE = re.compile(r"^\[([a-z-]+)\]")
_KEY = re.compile(r"^([a-z-]+)\s*=")


def table_lines(text: str) -> dict[str, int]:
    """1-based line of each top-level ``[table]`` of a lock or manifest, by link name; ``template`` points at
    the pinned template text when the table has one, so that a template finding lands on the template."""
    lines: dict[str, int] = {}
    table = None
    quote: str | None = None  # Inside a multi-line string (the template text) nothing is a table header.
    for number, line in enumerate(text.splitlines(), start=1):
        if quote is not None:
            if line.count(quote) % 2:
                quote = None
            continue
        opened = next((q for q in ('"""', "'''") if line.count(q) % 2), None)
        header = None if opened else _TABLE.match(line)
        quote = opened
        if header:
            table = header[1]
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if table == "template" and key and key[1] == "text":
            lines["template"] = number
    return lines


def sarif_document(
    findings: Sequence[Finding],
    *,
    artifact_uri: str = "llmstack.lock",
    allowances: Sequence[Allowance] = (),
    tool_version: str = "0.0.0",
    line: int = 1,
    catalog: Sequence[Finding] = (),
    lines: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The SARIF log as a JSON-ready dict; see :func:`render_sarif`.

    ``catalog`` holds one finding per rule or check that can fire: all of them are listed in the driver, so
    that a code-scanning interface knows every rule, not only those that fired. ``lines`` maps a link to its
    line in the artifact (see :func:`table_lines`); a result lands on the line of its finding's first link
    found there, else on ``line``.
    """
    reasons = {a.rule: a.reason for a in allowances}
    rules: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    results: list[dict[str, Any]] = []
    for known in catalog:
        if known.rule not in index:
            index[known.rule] = len(rules)
            rules.append(_descriptor(known))
    for finding in findings:
        if finding.rule not in index:
            index[finding.rule] = len(rules)
            rules.append(_descriptor(finding))
        fingerprint = hashlib.sha256(
            f"{finding.registry}\0{finding.rule}\0{artifact_uri}".encode()
        ).hexdigest()
        result: dict[str, Any] = {
            "ruleId": finding.rule,
            "ruleIndex": index[finding.rule],
            "level": _LEVEL[finding.severity],
            "message": {"text": f"{finding.title}. Fix: {finding.fix}"},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": artifact_uri},
                        "region": {"startLine": _line_of(finding, lines or {}, line)},
                    }
                }
            ],
            "partialFingerprints": {"stacklockFinding/v1": fingerprint},
            "properties": {"links": [link.value for link in finding.links], "registry": finding.registry},
        }
        if finding.severity is Severity.ERROR and finding.rule in reasons:
            result["suppressions"] = [{"kind": "external", "justification": reasons[finding.rule]}]
        results.append(result)
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "stacklock",
                        "informationUri": INFORMATION_URI,
                        "version": tool_version,
                        "rules": rules,
                    }
                },
                "artifacts": [{"location": {"uri": artifact_uri}}],
                "results": results,
            }
        ],
    }


def _line_of(finding: Finding, lines: Mapping[str, int], default: int) -> int:
    return next((lines[link.value] for link in finding.links if link.value in lines), default)


def render_sarif(
    findings: Sequence[Finding],
    *,
    artifact_uri: str = "llmstack.lock",
    allowances: Sequence[Allowance] = (),
    tool_version: str = "0.0.0",
    line: int = 1,
    catalog: Sequence[Finding] = (),
    lines: Mapping[str, int] | None = None,
) -> str:
    """SARIF 2.1.0 text for ``stacklock check --format sarif``. Deterministic: same findings, same bytes."""
    document = sarif_document(
        findings,
        artifact_uri=artifact_uri,
        allowances=allowances,
        tool_version=tool_version,
        line=line,
        catalog=catalog,
        lines=lines,
    )
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


__all__ = ["SARIF_SCHEMA", "SARIF_VERSION", "reference_url", "render_sarif", "sarif_document", "table_lines"]
