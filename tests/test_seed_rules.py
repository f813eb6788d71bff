"""Every bundled rule has a case that triggers it and variants that must not (tests/data/rules/<id>.toml).

A case file holds ``[positive]`` facts and ``[[negative]]`` variants; each variant is merged over the positive
facts (``drop = [...]`` removes facts), so a negative differs from the positive by exactly what it says.
Arrays become tuples, as in facts built from a lock.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from stacklock.registry.files import load_bundled_registry
from stacklock.registry.location import bundled_registry_path
from stacklock.rules.predicates import Rule, evaluate

CASES = Path(__file__).parent / "data" / "rules"
REGISTRY = load_bundled_registry()
RULES = {rule.id: rule for rule in REGISTRY.rules}
REFERENCE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+#\d+$|^https?://\S+$")


def _facts(table: dict[str, object]) -> dict[str, object]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}


def _case(rule_id: str) -> tuple[dict[str, object], list[tuple[str, dict[str, object]]]]:
    data = tomllib.loads((CASES / f"{rule_id}.toml").read_text(encoding="utf-8"))
    positive = _facts(data["positive"])
    negatives = []
    for index, variant in enumerate(data.get("negative", [])):
        facts = dict(positive)
        for key in variant.get("drop", ()):
            facts.pop(key)
        facts.update(_facts({k: v for k, v in variant.items() if k != "drop"}))
        negatives.append((f"negative[{index}]", facts))
    return positive, negatives


def test_at_least_thirty_rules_ship() -> None:
    assert len(RULES) >= 30
    assert len(list((bundled_registry_path() / "rules").glob("*.toml"))) == len(RULES)


def test_every_case_file_names_a_rule() -> None:
    orphans = sorted(p.stem for p in CASES.glob("*.toml") if p.stem not in RULES)
    assert orphans == []


@pytest.mark.parametrize("rule_id", sorted(RULES))
def test_rule_has_a_case(rule_id: str) -> None:
    assert (CASES / f"{rule_id}.toml").is_file(), f"add tests/data/rules/{rule_id}.toml"


@pytest.mark.parametrize("rule_id", sorted(RULES))
def test_positive_case_triggers_the_rule(rule_id: str) -> None:
    positive, _ = _case(rule_id)
    fired = [f for f in evaluate(REGISTRY.rules, positive) if f.rule == rule_id]
    assert len(fired) == 1
    assert fired[0].severity is RULES[rule_id].severity
    assert fired[0].registry == "bundled"


@pytest.mark.parametrize("rule_id", sorted(RULES))
def test_negative_cases_do_not_trigger_the_rule(rule_id: str) -> None:
    _, negatives = _case(rule_id)
    assert negatives, f"{rule_id}: add at least one [[negative]] variant"
    for name, facts in negatives:
        assert not RULES[rule_id].matches(facts), f"{rule_id}: {name} must not fire"


@pytest.mark.parametrize("rule_id", sorted(RULES))
def test_rule_is_referenced(rule_id: str) -> None:
    rule: Rule = RULES[rule_id]
    assert any(REFERENCE.match(ref) for ref in rule.references)
    assert rule.fix.strip()
    assert rule.explanation.strip()


def test_gemma3_270m_without_template_reports_the_no_template_rule_with_its_fix() -> None:
    # The facts of a lock of the Gemma 3 270M GGUF (no embedded template) on the embedded engine.
    facts = {
        "model.architecture": "gemma3",
        "model.quantization": "Q4_K_M",
        "model.has-chat-template": False,
        "template.present": False,
        "template.source": "gguf",
        "tokenizer.kind": "llama",
        "tokenizer.add-bos": True,
        "engine.name": "llama-cpp-python",
        "engine.version": "0.3.36",
        "engine.build": 10454,
        "backend.kind": "cpu",
        "sampler.repeat-penalty": 1.0,
    }
    findings = evaluate(REGISTRY.rules, facts)
    assert [f.rule for f in findings] == ["tmpl-gguf-missing-template-llama-cpp-python"]
    assert findings[0].severity.value == "error"
    assert 'source = "registry:<id>"' in findings[0].fix


def test_rule_files_round_trip_through_the_model() -> None:
    for rule in REGISTRY.rules:
        again = Rule.model_validate(rule.model_dump(by_alias=True))
        assert again == rule.model_copy() or again.model_dump() == rule.model_dump()
