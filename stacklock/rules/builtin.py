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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stacklock.model.findings import Finding, Link, Severity

if TYPE_CHECKING:
    from stacklock.model.lock import Lock

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
FAMILIES: tuple[str, ...] = (
    "stacklock.gguf.structure",
    "stacklock.template.probes",
    "stacklock.rules.pretokenizers",
    "stacklock.rules.policy",
    "stacklock.template.upstream",
    "stacklock.rules.upstream",
)


def register(check: BuiltinCheck) -> BuiltinCheck:
    """Add a check to the catalog at import time; two checks with one id are a bug."""
    if check.id in CATALOG:
        msg = f"built-in check {check.id!r} is declared twice"
        raise ValueError(msg)
    CATALOG[check.id] = check
    return check


@dataclass(frozen=True)
class FamilyRun:
    """What a family's checks found on one lock, and the checks that could not look at it, with why."""

    findings: tuple[Finding, ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)


#: A family's entry point: the lock, and the loaded registries (for families that read registry data).
Runner = Callable[["Lock", Sequence[Any]], FamilyRun]

#: Each family's runner, by family name, filled by the family modules as they are imported.
RUNNERS: dict[str, Runner] = {}


def register_family(family: str, runner: Runner) -> Runner:
    """Declare how a family runs its checks on a lock, at import time."""
    if family in RUNNERS:
        msg = f"built-in check family {family!r} is declared twice"
        raise ValueError(msg)
    RUNNERS[family] = runner
    return runner


def _import_families() -> None:
    # The family modules sit in the packages of what they examine (the template probes in template/); they are
    # imported by name so that rules/ does not depend on those packages.
    for module in FAMILIES:
        importlib.import_module(module)


def all_checks() -> tuple[BuiltinCheck, ...]:
    """Every built-in check that can fire, by id (imports each family module once)."""
    _import_families()
    return tuple(CATALOG[key] for key in sorted(CATALOG))


def run_checks(lock: Lock, registries: Sequence[Any]) -> FamilyRun:
    """Every family's checks on a lock: the findings, and the checks that could not run with why."""
    _import_families()
    findings: list[Finding] = []
    skipped: dict[str, str] = {}
    for family in sorted(RUNNERS):
        run = RUNNERS[family](lock, registries)
        findings += run.findings
        skipped |= run.skipped
    return FamilyRun(tuple(findings), dict(sorted(skipped.items())))


def carried_findings(findings: Sequence[Finding]) -> tuple[Finding, ...]:
    """The findings of families that run only at lock time, from a lock's findings.

    A family without a runner (the GGUF structural checks) needs the model file, which ``check`` does not read:
    its findings are carried from the lock. Every other family runs again on the lock.
    """
    _import_families()
    return tuple(
        f
        for f in findings
        if f.registry == BUILTIN_REGISTRY and f.rule in CATALOG and CATALOG[f.rule].family not in RUNNERS
    )
