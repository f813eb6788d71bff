"""`stacklock check`: evaluate a lock, and the engine installed here, against the registries' rules.

No model runs. The lock's facts are evaluated as locked; when the installed engine differs from the locked one,
they are evaluated again with the installed engine, so a rule that only the installed version trips is found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from stacklock.model.findings import Allowance, Finding, Link, Severity
from stacklock.model.lock import Lock
from stacklock.rules.builtin import BUILTIN_REGISTRY
from stacklock.rules.facts import facts_from_lock
from stacklock.rules.predicates import HasRules, evaluate, rules_for, triage
from stacklock.rules.versions import EngineTables, HasEngineTables, vendored_build


class Registry(HasRules, HasEngineTables, Protocol):
    """What check needs of a loaded registry: its rules and its engine tables."""


ENGINE_MISMATCH = "stacklock-engine-mismatch"


@dataclass(frozen=True)
class CheckResult:
    findings: tuple[Finding, ...]
    allowances: tuple[Allowance, ...]
    blocking: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not self.blocking


def check_stack(lock: Lock, registries: Sequence[Registry], installed_engine: str | None) -> CheckResult:
    rules = rules_for(registries)
    facts = facts_from_lock(lock)
    findings = {f.rule: f for f in evaluate(rules, facts)}
    # Built-in checks computed at lock time (e.g. a stale embedded template, with its rendered difference).
    findings.update({f.rule: f for f in lock.findings if f.registry == BUILTIN_REGISTRY})
    if installed_engine is not None and installed_engine != lock.engine.version:
        findings[ENGINE_MISMATCH] = _engine_mismatch(lock, installed_engine)
        here = dict(facts)
        here["engine.version"] = installed_engine
        build = vendored_build(lock.engine.name, installed_engine, EngineTables.merged(registries))
        if build is None:
            here.pop("engine.build", None)
        else:
            here["engine.build"] = build
        for finding in evaluate(rules, here):
            findings.setdefault(finding.rule, finding)
    ordered = tuple(sorted(findings.values(), key=lambda f: (_RANK[f.severity], f.rule)))
    result = triage(ordered, lock.allowances)
    return CheckResult(ordered, lock.allowances, tuple(result.blocking))


_RANK = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


def _engine_mismatch(lock: Lock, installed: str) -> Finding:
    return Finding(
        rule=ENGINE_MISMATCH,
        severity=Severity.ERROR,
        title=f"installed {lock.engine.name} {installed} is not the locked {lock.engine.version}",
        links=(Link.ENGINE,),
        explanation="Goldens and rules apply to the locked engine version; another version can behave differently.",
        fix=f"install {lock.engine.name}=={lock.engine.version}, or re-lock and re-record on {installed}",
        registry="stacklock",
    )
