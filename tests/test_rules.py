from __future__ import annotations

import hashlib

import pytest

from stacklock.errors import RegistryError
from stacklock.model.findings import Allowance, Severity
from stacklock.rules.predicates import Rule, compile_predicate, evaluate, judge, parse_rule

HEAD = """id = "x"
title = "t"
severity = "error"
links = ["engine"]
explanation = "e"
fix = "f"
references = ["ggml-org/llama.cpp#8197"]
"""
ORIGIN = "registry/rules/x.toml"


def rule(when: str, *, rid: str = "x", severity: str = "error") -> Rule:
    text = HEAD.replace('id = "x"', f'id = "{rid}"').replace('"error"', f'"{severity}"')
    return parse_rule(f"{text}[when]\n{when}\n", f"registry/rules/{rid}.toml")


def holds(test: str, facts: dict[str, object]) -> bool:
    return rule(f"all = [{test}]").matches(facts)


TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.mark.parametrize(
    ("test", "facts", "expected"),
    [
        ('{ fact = "model.architecture", equals = "gemma2" }', {"model.architecture": "gemma2"}, True),
        ('{ fact = "model.architecture", equals = "gemma2" }', {"model.architecture": "gemma3"}, False),
        ('{ fact = "tokenizer.add-bos", equals = true }', {"tokenizer.add-bos": 1}, False),
        ('{ fact = "tokenizer.add-bos", equals = true }', {"tokenizer.add-bos": True}, True),
        ('{ fact = "model.block-count", equals = 42 }', {"model.block-count": 42}, True),
        ('{ fact = "model.block-count", equals = 42 }', {"model.block-count": 42.0}, True),
        ('{ fact = "model.architecture", not-equals = "gemma2" }', {"model.architecture": "llama"}, True),
        ('{ fact = "model.architecture", not-equals = "gemma2" }', {}, False),
        ('{ fact = "backend.kind", in = ["cuda", "rocm"] }', {"backend.kind": "rocm"}, True),
        ('{ fact = "backend.kind", in = ["cuda", "rocm"] }', {"backend.kind": "cpu"}, False),
        ('{ fact = "backend.kind", not-in = ["cuda", "rocm"] }', {"backend.kind": "cpu"}, True),
        ('{ fact = "backend.kind", not-in = ["cuda", "rocm"] }', {}, False),
        ('{ fact = "template.text", contains = "bos_token" }', {"template.text": TEMPLATE}, True),
        ('{ fact = "template.features", contains = "tojson" }', {"template.features": ("bos-token",)}, False),
        ('{ fact = "template.features", contains = "tojson" }', {"template.features": ("tojson",)}, True),
        ('{ fact = "model.block-count", contains = "4" }', {"model.block-count": 42}, False),
        ("{ fact = \"template.text\", regex = '\\{%-?\\s*for\\b' }", {"template.text": TEMPLATE}, True),
        ("{ fact = \"template.text\", regex = 'break' }", {"template.text": TEMPLATE}, False),
        ("{ fact = \"template.text\", regex = 'x' }", {"template.text": 3}, False),
        (
            f'{{ fact = "template.text", sha256 = "{hashlib.sha256(TEMPLATE.encode()).hexdigest()}" }}',
            {"template.text": TEMPLATE},
            True,
        ),
        (f'{{ fact = "template.text", sha256 = "{"0" * 64}" }}', {"template.text": TEMPLATE}, False),
        ('{ fact = "engine.version", version = "<0.2.72" }', {"engine.version": "0.2.70"}, True),
        ('{ fact = "engine.version", version = "<0.2.72" }', {"engine.version": "0.2.72"}, False),
        ('{ fact = "engine.version", version = "<0.2.72" }', {"engine.version": "0.2.71rc1"}, True),
        # PEP 440: '<V' excludes pre-releases of V itself.
        ('{ fact = "engine.version", version = "<0.2.72" }', {"engine.version": "0.2.72rc1"}, False),
        ('{ fact = "engine.version", version = "<0.2.72" }', {"engine.version": "b4628"}, False),
        ('{ fact = "engine.build", build-range = ">=b3259,<b3266" }', {"engine.build": 3265}, True),
        ('{ fact = "engine.build", build-range = ">=b3259,<b3266" }', {"engine.build": 3266}, False),
        ('{ fact = "engine.build", build-range = ">=b3259,<b3266" }', {"engine.build": 3258}, False),
        ('{ fact = "engine.build", build-range = "==b3620" }', {"engine.build": "b3620"}, True),
        ('{ fact = "engine.build", build-range = "<b3266" }', {"engine.build": True}, False),
        ('{ fact = "backend.context-size", greater-than = 4096 }', {"backend.context-size": 8192}, True),
        ('{ fact = "backend.context-size", greater-than = 4096 }', {"backend.context-size": 4096}, False),
        ('{ fact = "sampler.temperature", less-than = 0.5 }', {"sampler.temperature": 0.2}, True),
        ('{ fact = "sampler.temperature", less-than = 0.5 }', {"sampler.temperature": "0.2"}, False),
        ('{ fact = "tokenizer.pre", present = true }', {"tokenizer.pre": "qwen2"}, True),
        ('{ fact = "tokenizer.pre", present = true }', {"tokenizer.pre": None}, False),
        ('{ fact = "tokenizer.pre", absent = true }', {"tokenizer.pre": None}, True),
        ('{ fact = "tokenizer.pre", absent = true }', {}, True),
        (
            '{ fact = "gguf.gemma2.attn_logit_softcapping", equals = 50.0 }',
            {"gguf.gemma2.attn_logit_softcapping": 50.0},
            True,
        ),
    ],
)
def test_operators(test: str, facts: dict[str, object], expected: bool) -> None:
    assert holds(test, facts) is expected


def test_unknown_facts_make_every_test_false_except_absent() -> None:
    for test in [
        '{ fact = "engine.build", build-range = "<b1" }',
        '{ fact = "engine.version", version = ">=0" }',
        '{ fact = "model.architecture", regex = "" }',
        '{ fact = "model.context-length", less-than = 1e9 }',
    ]:
        assert holds(test, {}) is False


def test_combinators() -> None:
    r = rule(
        """any = [
  { all = [{ fact = "engine.name", equals = "ollama" }, { fact = "engine.version", version = "<0.1.42" }] },
  { not = { fact = "backend.flash-attention", equals = "on" } },
]"""
    )
    assert r.matches({"engine.name": "ollama", "engine.version": "0.1.41", "backend.flash-attention": "on"})
    assert not r.matches(
        {"engine.name": "ollama", "engine.version": "0.1.42", "backend.flash-attention": "on"}
    )
    assert r.matches({})  # the flash-attention setting is unknown, so "not on" holds
    assert r.when.fact_names() == {"engine.name", "engine.version", "backend.flash-attention"}


def test_a_single_test_may_be_the_whole_when_table() -> None:
    r = rule('fact = "engine.name"\nequals = "vllm"')
    assert r.matches({"engine.name": "vllm"})
    assert r.model_dump(by_alias=True)["when"] == {"fact": "engine.name", "equals": "vllm"}


OPS = "absent, build-range, contains, equals, greater-than, in, less-than, not-equals, not-in, present, regex, sha256, version"


@pytest.mark.parametrize(
    ("when", "message"),
    [
        (
            'all = [{ fact = "engine.build", present = true }, { fact = "model.architecture", equal = "gemma2" }]',
            f"{ORIGIN}: when.all[1]: unknown operator 'equal'; did you mean 'equals'? use one of: {OPS}",
        ),
        (
            'all = [{ fact = "model.architecture", equals = "a", in = ["b"] }]',
            f"{ORIGIN}: when.all[0]: one operator per test, got equals, in; split them into an 'all' array",
        ),
        (
            'all = [{ fact = "model.architecture" }]',
            f"{ORIGIN}: when.all[0]: fact 'model.architecture' has no operator; add one of: {OPS}",
        ),
        (
            'all = [{ fact = "model.arch", equals = "a" }]',
            f"{ORIGIN}: when.all[0].fact: unknown fact 'model.arch'; did you mean 'model.architecture'?",
        ),
        (
            'all = [{ fact = "template.text", regex = "(" }]',
            (
                f"{ORIGIN}: when.all[0].regex: '(' is an invalid regular expression: missing ) at position 1; "
                "fix the pattern"
            ),
        ),
        (
            'all = [{ fact = "engine.version", version = "<<1" }]',
            (
                f"{ORIGIN}: when.all[0].version: bad version specifier '<<1'; write PEP 440 specifiers like "
                "'>=0.2.32,<0.3.24'"
            ),
        ),
        (
            'all = [{ fact = "engine.build", build-range = "<3266" }]',
            (
                f"{ORIGIN}: when.all[0].build-range: bad build range: '<3266' is not a llama.cpp build clause; "
                "write e.g. '<b3266' or '>=b3259,<b3266'"
            ),
        ),
        (
            'all = [{ fact = "tokenizer.pre", present = false }]',
            f"{ORIGIN}: when.all[0].present: must be true; to negate it write 'absent = true'",
        ),
        ("all = []", f"{ORIGIN}: when.all: 'all' needs a non-empty array of predicates"),
        (
            'all = [{ fact = "a.b", equals = 1 }]',
            f"{ORIGIN}: when.all[0].fact: unknown fact 'a.b'; see stacklock.rules.KNOWN_FACTS, or use 'gguf.<key>'",
        ),
        (
            'all = [{ not = { fact = "engine.name", in = [] } }]',
            f"{ORIGIN}: when.all[0].not.in: 'in' needs a non-empty array of values",
        ),
        (
            'all = [{ any = [{ fact = "engine.name", equals = "x" }], fact = "engine.name" }]',
            f"{ORIGIN}: when.all[0]: 'any' cannot be combined with 'fact' in one table; nest them in 'all'",
        ),
        (
            'all = [{ fact = "engine.name", equals = ["x"] }]',
            f"{ORIGIN}: when.all[0].equals: 'equals' needs a string, number or boolean, got an array",
        ),
        (
            'all = [{ fact = "template.text", sha256 = "ABC" }]',
            f"{ORIGIN}: when.all[0].sha256: 'sha256' needs 64 lowercase hexadecimal characters",
        ),
    ],
)
def test_malformed_predicates_name_file_and_key_path(when: str, message: str) -> None:
    with pytest.raises(RegistryError) as caught:
        rule(when)
    assert str(caught.value) == message


def test_malformed_rule_fields_name_file_line_and_key() -> None:
    text = (
        HEAD.replace('severity = "error"', 'severity = "fatal"')
        + '[when]\nfact = "engine.name"\npresent = true\n'
    )
    with pytest.raises(RegistryError) as caught:
        parse_rule(text, ORIGIN)
    assert (
        str(caught.value)
        == f"{ORIGIN}:3: severity: Input should be 'error', 'warning' or 'info' (got 'fatal')"
    )
    text = HEAD + 'colour = "red"\n[when]\nfact = "engine.name"\npresent = true\n'
    with pytest.raises(RegistryError) as caught:
        parse_rule(text, ORIGIN)
    assert str(caught.value).startswith(f"{ORIGIN}:8: colour: unknown key;")
    text = (
        HEAD.replace('["ggml-org/llama.cpp#8197"]', '["see the forum"]')
        + '[when]\nfact = "engine.name"\npresent = true\n'
    )
    with pytest.raises(RegistryError) as caught:
        parse_rule(text, ORIGIN)
    assert "'see the forum' is not 'owner/repo#N', 'owner/repo@commit' or an http(s) URL" in str(caught.value)


def test_compile_predicate_accepts_python_data() -> None:
    predicate = compile_predicate({"all": [{"fact": "engine.build", "build-range": "<b10"}]})
    assert predicate.test({"engine.build": 9})
    assert not predicate.test({"engine.build": 10})


def test_evaluate_sorts_by_severity_then_id_and_names_the_registry() -> None:
    always = 'fact = "engine.name"\npresent = true'
    rules = [
        rule(always, rid="b-info", severity="info"),
        rule(always, rid="z-error"),
        rule(always, rid="a-warning", severity="warning"),
        rule(always, rid="a-error").in_registry("community"),
    ]
    found = evaluate(rules, {"engine.name": "llama.cpp"})
    assert [(f.rule, f.registry) for f in found] == [
        ("a-error", "community"),
        ("z-error", "bundled"),
        ("a-warning", "bundled"),
        ("b-info", "bundled"),
    ]
    assert evaluate(rules, {}) == ()


def test_allowances_given_now_must_match_an_error_and_carried_ones_go_stale() -> None:
    always = 'fact = "engine.name"\npresent = true'
    rules = [rule(always, rid="e1"), rule(always, rid="e2"), rule(always, rid="w1", severity="warning")]
    findings = evaluate(rules, {"engine.name": "x"})
    given = [
        Allowance(rule="e1", reason="known"),
        Allowance(rule="w1", reason="x"),
        Allowance(rule="gone", reason="y"),
    ]
    result = judge(findings, given=given)
    assert [f.rule for f in result.allowed] == ["e1"]
    assert [a.rule for a in result.allowances] == ["e1"]
    assert [(f.rule, f.registry, f.severity) for f in result.blocking] == [
        ("e2", "bundled", Severity.ERROR),
        ("w1", "lock", Severity.ERROR),
        ("gone", "lock", Severity.ERROR),
    ]
    assert [f.title for f in result.blocking[1:]] == [
        "--allow w1 matches no error finding (the rule is a warning, which never blocks)",
        "--allow gone matches no error finding (the rule found nothing)",
    ]
    assert (
        result.blocking[2].fix
        == "remove the allowance: re-lock without --allow gone, or delete it from the lock's allowances"
    )
    assert not result.ok
    # The same allowances carried in a lock: the unused ones are stale, not blocking; a given one wins.
    carried = judge(findings, given=[Allowance(rule="e2", reason="now")], carried=given)
    assert [f.rule for f in carried.blocking] == []
    assert [(a.rule, a.reason) for a in carried.allowances] == [("e2", "now"), ("e1", "known")]
    assert [a.rule for a in carried.stale] == ["w1", "gone"]
    assert carried.ok


def test_evaluate_turns_a_matching_rule_into_its_finding() -> None:
    r = rule('fact = "engine.name"\npresent = true')
    (finding,) = evaluate([r], {"engine.name": "x"})
    assert (finding.rule, finding.severity, finding.title, finding.registry) == (
        "x",
        Severity.ERROR,
        "t",
        "bundled",
    )
    assert (finding.explanation, finding.fix) == ("e", "f")
    assert finding.references == ("ggml-org/llama.cpp#8197",)
    assert evaluate([r], {"model.architecture": "llama"}) == ()
