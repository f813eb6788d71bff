"""Built-in checks: computed check families next to the registry's declarative rules.

A registry rule is data (a predicate over a lock's facts). Some breakages can only be found by computing
something: rendering the chat template over a corpus of conversations (template probes), comparing a GGUF's
hyperparameters with its tensor shapes (structural checks). Those checks are code, but what they report is the
same :class:`~stacklock.model.findings.Finding` a rule reports, with a stable id, severity, explanation, fix and
references, so that text, JSON and SARIF output, ``--allow`` and ``check`` treat both alike.

Each family declares its checks here once, in :data:`CATALOG`, so that every check that can fire is known before
anything runs (SARIF lists them all in its driver; ``check --format json`` reports which ran). A family module
(e.g. ``stacklock.template.probes``) calls :meth:`BuiltinCheck.finding` to report one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from stacklock.model.findings import Finding, Link, Severity

#: The registry name findings of built-in checks carry.
BUILTIN_REGISTRY = "stacklock"


@dataclass(frozen=True, slots=True)
class BuiltinCheck:
    """One computed check: its stable id and what a finding of it says."""

    id: str
    family: str
    severity: Severity
    title: str
    links: tuple[Link, ...]
    explanation: str
    fix: str
    references: tuple[str, ...] = ()

    def finding(
        self, *, title: str | None = None, explanation: str | None = None, fix: str | None = None
    ) -> Finding:
        """A finding of this check; ``title``/``explanation``/``fix`` specialise the text for one stack."""
        return Finding(
            rule=self.id,
            severity=self.severity,
            title=title or self.title,
            links=self.links,
            explanation=explanation or self.explanation,
            fix=fix or self.fix,
            references=self.references,
            registry=BUILTIN_REGISTRY,
        )


#: Every built-in check, by id, filled by the family modules as they are imported (see :func:`all_checks`).
CATALOG: dict[str, BuiltinCheck] = {}

#: The modules that declare check families; each registers its checks when imported.
FAMILIES: tuple[str, ...] = ("stacklock.template.upstream", "stacklock.rules.upstream")


def register(check: BuiltinCheck) -> BuiltinCheck:
    """Add a check to the catalog at import time; two checks with one id are a bug."""
    if check.id in CATALOG:
        msg = f"built-in check {check.id!r} is declared twice"
        raise ValueError(msg)
    CATALOG[check.id] = check
    return check


def all_checks() -> tuple[BuiltinCheck, ...]:
    """Every built-in check that can fire, by id (imports each family module once)."""
    for module in FAMILIES:
        importlib.import_module(module)
    return tuple(CATALOG[key] for key in sorted(CATALOG))
