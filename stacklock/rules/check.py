"""`stacklock check`: evaluate a lock, and the engine installed here, against the registries' rules.

No model runs. The lock's facts are evaluated as locked; when the installed engine differs from the locked one,
they are evaluated again with the installed engine, so a rule that only the installed version trips is found.
The template probes run again from the lock's pinned template text and tokenizer fingerprint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from stacklock.model.findings import Allowance, Finding, Link, Severity
from stacklock.model.lock import Lock
from stacklock.rules.builtin import all_checks, carried_findings, run_checks
from stacklock.rules.facts import build_fact, facts_from_lock
from stacklock.rules.predicates import HasRules, Rule, evaluate, judge, rules_for
from stacklock.rules.pretokenizers import HasPreTokenizers
from stacklock.rules.versions import EngineTables, HasEngineTables, vendored_build


class Registry(HasRules, HasEngineTables, HasPreTokenizers, Protocol):
    """What check needs of a loaded registry: its rules, engine tables and pre-tokenizer table."""


ENGINE_MISMATCH = "stacklock-engine-mismatch"


@dataclass(frozen=True)
class Coverage:
    """What ``check`` looked at: the rules evaluated and the built-in checks that ran or could not, and why."""

    rules: tuple[str, ...]
    #: Rules that read facts this lock does not have (an engine without a known build, a model without a
    #: context length): they were evaluated, but could not fire on what they need, by rule id.
    missing_facts: dict[str, tuple[str, ...]]
    checks_ran: tuple[str, ...]
    checks_skipped: dict[str, str]


@dataclass(frozen=True)
class CheckResult:
    findings: tuple[Finding, ...]
    allowances: tuple[Allowance, ...]
    blocking: tuple[Finding, ...]
    coverage: Coverage
    stale: tuple[Allowance, ...] = ()
    """The lock's allowances that match no error finding any more; ``stacklock lock`` would drop them."""

    @property
    def ok(self) -> bool:
        return not self.blocking


def check_stack(lock: Lock, registries: Sequence[Registry], installed_engine: str | None) -> CheckResult:
    rules = rules_for(registries)
    facts = facts_from_lock(lock)
    # Built-in checks computed at lock time from the model file (structure) are carried from the lock.
    findings = {f.rule: f for f in carried_findings(lock.findings)}
    findings.update({f.rule: f for f in evaluate(rules, facts)})
    if installed_engine is not None and installed_engine != lock.engine.version:
        findings[ENGINE_MISMATCH] = _engine_mismatch(lock, installed_engine)
        here = dict(facts)
        here["engine.version"] = installed_engine
        build = vendored_build(lock.engine.name, installed_engine, EngineTables.merged(registries))
        here["engine.build"] = None if build is None else build_fact(build.build, exact=build.exact)
        installed = lock.engine.model_copy(
            update={
                "version": installed_engine,
                "build": build and build.build,
                "build_exact": bool(build and build.exact),
                "commit": build and build.commit,
            }
        )
        for finding in (
            *evaluate(rules, here),
            *run_checks(lock.model_copy(update={"engine": installed}), registries).findings,
        ):
            findings.setdefault(finding.rule, finding)
    builtin = run_checks(lock, registries)
    for finding in builtin.findings:
        findings.setdefault(finding.rule, finding)
    ordered = tuple(sorted(findings.values(), key=lambda f: (_RANK[f.severity], f.rule)))
    judgement = judge(ordered, carried=lock.allowances)
    return CheckResult(
        ordered,
        lock.allowances,
        judgement.blocking,
        _coverage(rules, facts, builtin.skipped),
        judgement.stale,
    )


def _coverage(rules: Sequence[Rule], facts: Mapping[str, object], skipped: Mapping[str, str]) -> Coverage:
    missing = {
        rule.id: tuple(sorted(rule.when.fact_names() - facts.keys()))
        for rule in rules
        if rule.when.fact_names() - facts.keys()
    }
    return Coverage(
        rules=tuple(sorted(r.id for r in rules)),
        missing_facts=dict(sorted(missing.items())),
        checks_ran=tuple(c.id for c in all_checks() if c.id not in skipped),
        checks_skipped=dict(skipped),
    )


def check_catalog(registries: Sequence[HasRules]) -> tuple[Finding, ...]:
    """One finding per rule and built-in check that can fire, for SARIF's driver: registry rules, then checks."""
    return (
        *(rule.finding() for rule in rules_for(registries)),
        *(check.finding() for check in all_checks()),
    )


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
