"""Registry rules: a declarative ``when`` predicate over the facts of a stack, and what to say when it holds.

A rule file (``registry/rules/<id>.toml``) is data, never code::

    id = "arch-gemma2-softcap"
    title = "Gemma 2 runs without logit soft-capping before llama.cpp b3266"
    severity = "error"
    links = ["engine", "model"]
    explanation = "..."
    fix = "..."
    references = ["ggml-org/llama.cpp#8197"]

    [when]
    all = [
      { fact = "model.architecture", equals = "gemma2" },
      { fact = "engine.build", build-range = "<b3266" },
    ]

A predicate is either a *test* — ``fact`` plus exactly one operator — or a *combinator*: ``all = [...]``,
``any = [...]`` or ``not = {...}``. Operators: ``present``, ``absent``, ``equals``, ``not-equals``, ``in``,
``not-in``, ``contains``, ``regex``, ``sha256``, ``version`` (a PEP 440 specifier set), ``build-range``
(llama.cpp ``bNNNN`` clauses), ``less-than`` and ``greater-than``. Regexes, specifiers and build ranges are
compiled once, when the rule is parsed.

Unknown facts: a fact that is missing from the fact set, or whose value is None, is *unknown*, and every test
on it is false except ``absent``. So ``not-equals`` and ``not-in`` are false for an unknown fact too; write
``not = { fact = ..., in = [...] }`` to make a rule fire when the fact is unknown.

Equality is strict about booleans (``true`` never equals ``1``); integers and floats compare as numbers.

Numbers known only from below: a fact whose value is :class:`AtLeast` (the llama.cpp build of a wrapper release
between two rows of its engine table) is neither guessed low nor high. A rule that tests it is evaluated at
every build where one of its comparisons can change its answer (each bound ``b`` and ``b + 1`` at or above the
known minimum, and the minimum itself); the answer is piecewise constant between those points, so when all
agree the rule's answer is known, and when they differ :func:`evaluate` reports an info finding, "cannot tell
for llama.cpp build >= bN", instead of a silent match or miss.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Protocol

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import (
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from stacklock.errors import RegistryError
from stacklock.files.digest import sha256_text
from stacklock.model.base import Model
from stacklock.model.findings import Allowance, Finding, Link, Severity
from stacklock.model.pattern import PatternTimeoutError, compile_pattern, search_pattern
from stacklock.model.toml import describe_validation_error, parse_toml
from stacklock.rules.versions import parse_build, parse_build_range, parse_version

#: The flat, read-only facts of one stack, built from its lock. A missing key is an unknown fact.
Facts = Mapping[str, object]

#: Facts the resolver provides, with what they hold. ``gguf.<key>`` and ``sampler.<name>`` are open families.
KNOWN_FACTS: Final[Mapping[str, str]] = {
    "model.architecture": "general.architecture of the model file (str).",
    "model.quantization": "The quantization name, e.g. 'Q4_K_M' (str).",
    "model.parameter-count": "Parameters (int).",
    "model.context-length": "The trained context length, <arch>.context_length (int).",
    "model.block-count": "Layers, <arch>.block_count (int).",
    "model.tensor-types": "Distinct tensor types, e.g. ('F32', 'Q4_K', 'Q6_K') (tuple of str).",
    "tokenizer.kind": "tokenizer.ggml.model: 'llama' (SentencePiece), 'gpt2' (BPE), ... (str).",
    "tokenizer.pre": "tokenizer.ggml.pre, the BPE pre-tokenizer name (str or unknown).",
    "tokenizer.vocab-size": "Tokens in the vocabulary (int).",
    "tokenizer.add-bos": "Whether the tokenizer adds BOS (bool or unknown).",
    "tokenizer.add-eos": "Whether the tokenizer adds EOS (bool or unknown).",
    "tokenizer.bos-id": "BOS token id (int).",
    "tokenizer.eos-id": "EOS token id (int).",
    "tokenizer.eot-id": "EOT token id (int).",
    "tokenizer.eom-id": "EOM token id (int).",
    "tokenizer.bos-text": "BOS token text (str).",
    "tokenizer.eos-text": "EOS token text (str).",
    "tokenizer.special-texts": "Texts of well-known control tokens found in the vocabulary (tuple of str).",
    "model.has-chat-template": "Whether the model file embeds tokenizer.chat_template (bool).",
    "template.present": "Whether the stack has a chat template (bool).",
    "template.source": "Where the template comes from: 'gguf', 'file', 'registry' or 'none' (str).",
    "template.text": "The template text (str).",
    "template.sha256": "sha256 of the template text (str).",
    "template.dialect": "'jinja2', 'go-template' or 'empty' (str).",
    "template.features": "Template features, from stacklock.template.template_features (tuple of str).",
    "engine.name": "'llama-cpp-python', 'llama.cpp', 'ollama', 'vllm', ... (str).",
    "engine.version": "The exact engine version (str).",
    "engine.build": "The llama.cpp build the engine runs, own or vendored (int; AtLeast when only known from "
    "below).",
    "backend.kind": "'cpu', 'cuda', 'metal', 'vulkan', 'rocm' or 'sycl' (str).",
    "backend.flash-attention": "'on', 'off' or 'auto' (str).",
    "backend.cache-type-k": "KV-cache type of K, e.g. 'f16', 'q8_0' (str).",
    "backend.cache-type-v": "KV-cache type of V (str).",
    "backend.gpu-layers": "Layers offloaded to the GPU, -1 for all (int).",
    "backend.context-size": "The context window the engine is given (int).",
    "smoke.has-system-message": "Whether any smoke prompt has a system message (bool).",
}

#: Fact families whose members are not listed one by one.
OPEN_FACT_PREFIXES: Final = ("gguf.", "sampler.")

OPERATORS: Final = (
    "absent",
    "build-range",
    "contains",
    "equals",
    "greater-than",
    "in",
    "less-than",
    "not-equals",
    "not-in",
    "present",
    "regex",
    "sha256",
    "version",
)
COMBINATORS: Final = ("all", "any", "not")

Scalar = str | int | float | bool


@dataclass(frozen=True, slots=True)
class AtLeast:
    """A fact value known only from below: the true value is ``minimum`` or more (see the module docstring)."""

    minimum: int


class PredicateSyntaxError(ValueError):
    """A malformed predicate, with the TOML key path where it is malformed."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


# -- Compiled predicates ------------------------------------------------------------------------------------


class Predicate:
    """A compiled predicate. ``data`` is what the rule file said, for round trips and display."""

    __slots__ = ("data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    def test(self, facts: Facts) -> bool:
        raise NotImplementedError

    def fact_names(self) -> frozenset[str]:
        raise NotImplementedError

    def change_points(self, fact: str) -> frozenset[int]:
        """The integers at which the answer can change as the number ``fact`` grows (see :class:`AtLeast`)."""
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Predicate) and self.data == other.data

    def __hash__(self) -> int:
        return hash(repr(self.data))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.data!r})"


class _Test(Predicate):
    __slots__ = ("check", "fact", "on_unknown", "points")

    def __init__(
        self,
        data: Mapping[str, Any],
        fact: str,
        check: Callable[[object], bool],
        on_unknown: bool,
        points: tuple[int, ...] = (),
    ) -> None:
        super().__init__(data)
        self.fact = fact
        self.check = check
        self.on_unknown = on_unknown
        # The integers at which this test's answer on a number can change (see AtLeast).
        self.points = points

    def test(self, facts: Facts) -> bool:
        value = facts.get(self.fact)
        if value is None:
            return self.on_unknown
        return self.check(value)

    def fact_names(self) -> frozenset[str]:
        return frozenset((self.fact,))

    def change_points(self, fact: str) -> frozenset[int]:
        return frozenset(self.points) if fact == self.fact else frozenset()


class _All(Predicate):
    __slots__ = ("children",)

    def __init__(self, data: Mapping[str, Any], children: tuple[Predicate, ...]) -> None:
        super().__init__(data)
        self.children = children

    def test(self, facts: Facts) -> bool:
        return all(child.test(facts) for child in self.children)

    def fact_names(self) -> frozenset[str]:
        return frozenset().union(*(c.fact_names() for c in self.children))

    def change_points(self, fact: str) -> frozenset[int]:
        return frozenset().union(*(c.change_points(fact) for c in self.children))


class _Any(_All):
    __slots__ = ()

    def test(self, facts: Facts) -> bool:
        return any(child.test(facts) for child in self.children)


class _Not(Predicate):
    __slots__ = ("child",)

    def __init__(self, data: Mapping[str, Any], child: Predicate) -> None:
        super().__init__(data)
        self.child = child

    def test(self, facts: Facts) -> bool:
        return not self.child.test(facts)

    def fact_names(self) -> frozenset[str]:
        return self.child.fact_names()

    def change_points(self, fact: str) -> frozenset[int]:
        return self.child.change_points(fact)


def _equal(a: object, b: object) -> bool:
    # Python says True == 1; a rule that says `equals = true` must not match a count of 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Rules compare the same template text many times; its digest is computed once.
_sha256_text = functools.lru_cache(maxsize=64)(sha256_text)


def _scalar(value: object, path: str, operator: str) -> Scalar:
    if isinstance(value, str | int | float | bool):
        return value
    raise PredicateSyntaxError(path, f"'{operator}' needs a string, number or boolean, got {_kind(value)}")


def _kind(value: object) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return f"{value!r}"


def _compile_check(operator: str, value: object, path: str) -> tuple[Callable[[object], bool], bool]:
    """The check a test applies to a known fact value, and its result for an unknown fact."""
    where = f"{path}.{operator}"
    if operator in ("present", "absent"):
        if value is not True:
            other = "absent" if operator == "present" else "present"
            raise PredicateSyntaxError(where, f"must be true; to negate it write '{other} = true'")
        return (lambda _v: True, False) if operator == "present" else (lambda _v: False, True)
    if operator in ("equals", "not-equals"):
        expected = _scalar(value, where, operator)
        if operator == "equals":
            return (lambda v: _equal(v, expected)), False
        return (lambda v: not _equal(v, expected)), False
    if operator in ("in", "not-in"):
        if not isinstance(value, list | tuple) or not value:
            raise PredicateSyntaxError(where, f"'{operator}' needs a non-empty array of values")
        options = tuple(_scalar(item, f"{where}[{i}]", operator) for i, item in enumerate(value))
        if operator == "in":
            return (lambda v: any(_equal(v, o) for o in options)), False
        return (lambda v: not any(_equal(v, o) for o in options)), False
    if operator == "contains":
        needle = _scalar(value, where, operator)

        def contains(v: object) -> bool:
            if isinstance(v, str):
                return isinstance(needle, str) and needle in v
            if isinstance(v, tuple | list | frozenset | set):
                return any(_equal(item, needle) for item in v)
            return False

        return contains, False
    if operator == "regex":
        if not isinstance(value, str):
            raise PredicateSyntaxError(where, "'regex' needs a string")
        try:
            pattern = compile_pattern(value)
        except ValueError as exc:
            raise PredicateSyntaxError(where, f"{value!r} is an {exc}; fix the pattern") from None
        return (lambda v: isinstance(v, str) and search_pattern(pattern, v)), False
    if operator == "sha256":
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
            raise PredicateSyntaxError(where, "'sha256' needs 64 lowercase hexadecimal characters")
        return (lambda v: isinstance(v, str) and _sha256_text(v) == value), False
    if operator == "version":
        if not isinstance(value, str):
            raise PredicateSyntaxError(where, "'version' needs a PEP 440 specifier string like '<0.2.72'")
        try:
            spec = SpecifierSet(value)
        except InvalidSpecifier:
            raise PredicateSyntaxError(
                where, f"bad version specifier {value!r}; write PEP 440 specifiers like '>=0.2.32,<0.3.24'"
            ) from None

        def in_spec(v: object) -> bool:
            parsed = parse_version(v) if isinstance(v, str) else None
            # Release candidates of an affected release are affected too.
            return parsed is not None and spec.contains(parsed, prereleases=True)

        return in_spec, False
    if operator == "build-range":
        if not isinstance(value, str):
            raise PredicateSyntaxError(where, "'build-range' needs a string like '>=b3259,<b3266'")
        try:
            builds = parse_build_range(value)
        except ValueError as exc:
            raise PredicateSyntaxError(where, f"bad build range: {exc}") from None

        def in_range(v: object) -> bool:
            if isinstance(v, str):
                try:
                    v = parse_build(v)
                except ValueError:
                    return False
            return v in builds

        return in_range, False
    if operator in ("less-than", "greater-than"):
        if not _is_number(value):
            raise PredicateSyntaxError(where, f"'{operator}' needs a number")
        bound: float = value  # type: ignore[assignment]
        if operator == "less-than":
            return (lambda v: _is_number(v) and v < bound), False
        return (lambda v: _is_number(v) and v > bound), False
    raise AssertionError(operator)  # pragma: no cover - callers check the operator first


def _check_fact(name: object, path: str) -> str:
    if not isinstance(name, str):
        raise PredicateSyntaxError(f"{path}.fact", "must be a string such as 'model.architecture'")
    if name in KNOWN_FACTS:
        return name
    for prefix in OPEN_FACT_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name
    guess = difflib.get_close_matches(name, list(KNOWN_FACTS), n=1)
    hint = f"did you mean '{guess[0]}'?" if guess else "see stacklock.rules.KNOWN_FACTS, or use 'gguf.<key>'"
    raise PredicateSyntaxError(f"{path}.fact", f"unknown fact '{name}'; {hint}")


def compile_predicate(raw: object, path: str = "when") -> Predicate:
    """Compile the TOML form of a predicate. Raises :class:`PredicateSyntaxError` with the key path."""
    if not isinstance(raw, Mapping):
        raise PredicateSyntaxError(path, f"a predicate must be a table, got {_kind(raw)}")
    keys = list(raw)
    combinators = [k for k in keys if k in COMBINATORS]
    if combinators:
        if len(keys) != 1:
            others = ", ".join(repr(k) for k in keys if k != combinators[0])
            raise PredicateSyntaxError(
                path, f"'{combinators[0]}' cannot be combined with {others} in one table; nest them in 'all'"
            )
        name = combinators[0]
        value = raw[name]
        if name == "not":
            return _Not(raw, compile_predicate(value, f"{path}.not"))
        if not isinstance(value, list | tuple) or not value:
            raise PredicateSyntaxError(f"{path}.{name}", f"'{name}' needs a non-empty array of predicates")
        children = tuple(compile_predicate(child, f"{path}.{name}[{i}]") for i, child in enumerate(value))
        return _All(raw, children) if name == "all" else _Any(raw, children)
    if "fact" not in raw:
        raise PredicateSyntaxError(
            path, "a predicate needs 'fact' and one operator, or one of: all, any, not"
        )
    fact = _check_fact(raw["fact"], path)
    operators = [k for k in keys if k != "fact"]
    unknown = [k for k in operators if k not in OPERATORS]
    if unknown:
        guess = difflib.get_close_matches(unknown[0], OPERATORS, n=1)
        did = f"did you mean '{guess[0]}'? " if guess else ""
        raise PredicateSyntaxError(
            path, f"unknown operator '{unknown[0]}'; {did}use one of: {', '.join(OPERATORS)}"
        )
    if len(operators) != 1:
        if not operators:
            raise PredicateSyntaxError(
                path, f"fact '{fact}' has no operator; add one of: {', '.join(OPERATORS)}"
            )
        raise PredicateSyntaxError(
            path, f"one operator per test, got {', '.join(operators)}; split them into an 'all' array"
        )
    operator = operators[0]
    check, on_unknown = _compile_check(operator, raw[operator], path)
    return _Test(raw, fact, check, on_unknown, _change_points(operator, raw[operator]))


def _change_points(operator: str, value: object) -> tuple[int, ...]:
    """Where a comparison's answer on an integer can change: each bound ``b`` and ``b + 1`` covers every
    operator (``<b`` changes at b, ``<=b`` at b + 1, ``==b`` at both)."""
    bounds: list[float] = []
    if operator == "build-range" and isinstance(value, str):
        bounds = [bound for _, bound in parse_build_range(value).clauses]
    elif operator in ("less-than", "greater-than", "equals", "not-equals") and _is_number(value):
        bounds = [value]  # type: ignore[list-item]
    elif operator in ("in", "not-in") and isinstance(value, list | tuple):
        bounds = [item for item in value if _is_number(item)]
    points = {math.floor(bound) + step for bound in bounds for step in (0, 1)}
    return tuple(sorted(points))


def _validate_when(value: object) -> Predicate:
    if isinstance(value, Predicate):
        return value
    return compile_predicate(value, "when")


_PREDICATE_REF: Final = {"$ref": "#/$defs/Predicate"}

PredicateField = Annotated[
    Predicate,
    PlainValidator(_validate_when),
    PlainSerializer(lambda p: p.data, return_type=dict),
    # Pydantic cannot resolve a reference to a definition it did not make; the registry's schema writer
    # replaces this placeholder with a reference to the hand-written predicate schema.
    WithJsonSchema({"type": "object", "x-stacklock": "predicate"}),
]


def predicate_json_schema_defs() -> dict[str, Any]:
    """The JSON Schema of predicates, written by hand because predicates are compiled, not modelled."""
    scalar = {"type": ["string", "number", "boolean"]}
    operator_schemas: dict[str, Any] = {
        "present": {"const": True, "description": "The fact is known."},
        "absent": {"const": True, "description": "The fact is unknown (missing or null)."},
        "equals": {**scalar, "description": "The fact equals the value (booleans compare strictly)."},
        "not-equals": {**scalar, "description": "The fact is known and differs from the value."},
        "in": {
            "type": "array",
            "items": scalar,
            "minItems": 1,
            "description": "The fact is one of the values.",
        },
        "not-in": {"type": "array", "items": scalar, "minItems": 1, "description": "Known and none of them."},
        "contains": {
            **scalar,
            "description": "A string fact contains the text; a tuple fact holds the item.",
        },
        "regex": {"type": "string", "description": "A Python regular expression searched in a string fact."},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "sha256 of a string fact."},
        "version": {
            "type": "string",
            "description": "A PEP 440 specifier set the (string) version satisfies.",
        },
        "build-range": {
            "type": "string",
            "pattern": r"^\s*(==|!=|<=|>=|<|>)\s*b\d+(\s*,\s*(==|!=|<=|>=|<|>)\s*b\d+)*\s*$",
            "description": "llama.cpp build clauses the (int) build satisfies, e.g. '>=b3259,<b3266'.",
        },
        "less-than": {"type": "number", "description": "A number fact is below the value."},
        "greater-than": {"type": "number", "description": "A number fact is above the value."},
    }
    tests = [
        {
            "type": "object",
            "properties": {
                "fact": {"type": "string", "description": "The fact to test, e.g. 'model.architecture'."},
                op: schema,
            },
            "required": ["fact", op],
            "additionalProperties": False,
        }
        for op, schema in operator_schemas.items()
    ]
    combinators = [
        {
            "type": "object",
            "properties": {"all": {"type": "array", "items": _PREDICATE_REF, "minItems": 1}},
            "required": ["all"],
            "additionalProperties": False,
            "description": "Every predicate holds.",
        },
        {
            "type": "object",
            "properties": {"any": {"type": "array", "items": _PREDICATE_REF, "minItems": 1}},
            "required": ["any"],
            "additionalProperties": False,
            "description": "At least one predicate holds.",
        },
        {
            "type": "object",
            "properties": {"not": _PREDICATE_REF},
            "required": ["not"],
            "additionalProperties": False,
            "description": "The predicate does not hold.",
        },
    ]
    return {
        "Predicate": {
            "description": "A test (a fact and one operator) or a combinator (all, any, not).",
            "oneOf": [*tests, *combinators],
        }
    }


# -- Rules --------------------------------------------------------------------------------------------------

_RULE_ID = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
#: ``owner/repo#123``, ``owner/repo@<commit>`` or an http(s) URL.
REFERENCE = re.compile(r"^([A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(#\d+|@[0-9a-f]{7,40})|https?://\S+)$")


class Rule(Model):
    """One registry rule: when its predicate holds for a stack, it yields a finding."""

    id: str = Field(
        description="A unique id: lowercase letters, digits, '.' and '-', e.g. 'arch-gemma2-softcap'."
    )
    title: str = Field(min_length=1, description="One line: what is wrong.")
    severity: Severity = Field(
        description="error stops the lock unless allowed; warning and info are recorded."
    )
    links: tuple[Link, ...] = Field(min_length=1, description="The links of the stack the rule concerns.")
    explanation: str = Field(
        min_length=1, description="Why it breaks: the mechanism, the versions, the symptom."
    )
    fix: str = Field(min_length=1, description="How to fix or work around it.")
    references: tuple[str, ...] = Field(
        min_length=1,
        description="Upstream issues, PRs or commits: 'owner/repo#N', 'owner/repo@commit' or a URL.",
    )
    when: PredicateField = Field(description="The predicate over the stack's facts that makes the rule fire.")
    # Which registry the rule came from is not the rule file's to say; the loader sets it.
    _registry: str = PrivateAttr(default="bundled")

    @property
    def registry(self) -> str:
        return self._registry

    def in_registry(self, name: str) -> Rule:
        """A copy of the rule attributed to registry ``name`` (findings name it)."""
        copy = self.model_copy()
        copy._registry = name
        return copy

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _RULE_ID.match(value):
            raise ValueError(
                "must be lowercase letters, digits, '.' and '-', starting with a letter or digit"
            )
        return value

    @field_validator("references")
    @classmethod
    def _references(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for ref in value:
            if not REFERENCE.match(ref):
                raise ValueError(f"'{ref}' is not 'owner/repo#N', 'owner/repo@commit' or an http(s) URL")
        return value

    def matches(self, facts: Facts) -> bool:
        return self.when.test(facts)

    def finding(self, registry: str | None = None) -> Finding:
        return Finding(
            rule=self.id,
            severity=self.severity,
            title=self.title,
            links=self.links,
            explanation=self.explanation,
            fix=self.fix,
            references=self.references,
            registry=registry or self._registry,
        )


def parse_rule(text: str, origin: str) -> Rule:
    """Parse one rule file. Errors name the file and the TOML key path, and say how to fix it."""
    data = parse_toml(text, origin, RegistryError)
    return rule_from_data(data, origin, text)


def rule_from_data(data: Mapping[str, Any], origin: str, text: str = "") -> Rule:
    try:
        return Rule.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, PredicateSyntaxError):
            raise RegistryError(f"{origin}: {cause.path}: {cause.message}") from None
        raise RegistryError(describe_validation_error(exc, Rule, origin, text)) from None


# -- Evaluation ---------------------------------------------------------------------------------------------

SEVERITY_ORDER: Final[Mapping[Severity, int]] = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


def finding_sort_key(finding: Finding) -> tuple[int, str, str]:
    return SEVERITY_ORDER[finding.severity], finding.rule, finding.registry


def evaluate(rules: Iterable[Rule], facts: Facts, *, registry: str | None = None) -> tuple[Finding, ...]:
    """The findings of every rule whose predicate holds, errors first, then warnings, then info; by id within.

    Findings name the rule's registry, or ``registry`` when given.
    """
    bounded = {name: value.minimum for name, value in facts.items() if isinstance(value, AtLeast)}
    found = []
    for rule in rules:
        try:
            answer = _answer(rule.when, facts, bounded)
        except PatternTimeoutError as exc:
            # A shared registry is untrusted: a rule whose regex never ends is a broken rule, not a hang.
            raise RegistryError(f"rule '{rule.id}': {exc}", hint="fix or remove the rule") from None
        if answer is True:
            found.append(rule.finding(registry))
        elif answer is None:
            found.append(_cannot_tell(rule, bounded, registry))
    found.sort(key=finding_sort_key)
    return tuple(found)


def _answer(when: Predicate, facts: Facts, bounded: Mapping[str, int]) -> bool | None:
    """The predicate's answer for every value the bounded facts may have; None when it depends on them."""
    names = when.fact_names()
    tested = {name: minimum for name, minimum in bounded.items() if name in names}
    if not tested:
        return when.test(facts)
    candidates: list[dict[str, object]] = [dict(facts)]
    for name, minimum in tested.items():
        values = [minimum, *(p for p in sorted(when.change_points(name)) if p > minimum)]
        candidates = [{**candidate, name: value} for candidate in candidates for value in values]
    answers = {when.test(candidate) for candidate in candidates}
    return answers.pop() if len(answers) == 1 else None


def _cannot_tell(rule: Rule, bounded: Mapping[str, int], registry: str | None) -> Finding:
    below = ", ".join(
        f"llama.cpp build >= b{minimum}" if name == "engine.build" else f"{name} >= {minimum}"
        for name, minimum in sorted(bounded.items())
        if name in rule.when.fact_names()
    )
    finding = rule.finding(registry)
    return finding.model_copy(
        update={
            "severity": Severity.INFO,
            "title": f"Cannot tell for {below}: {rule.title}",
            "explanation": f"The rule's answer depends on the exact build, and the lock knows only that it is "
            f"{below.removeprefix('llama.cpp ')} (the engine's registry table has no row for this release). "
            f"If it applies: {rule.explanation}",
            "fix": "Pin an engine release that the registry's engine table lists exactly, or add a row for this "
            f"release to engines/<engine>.toml in a registry. If the rule applies: {rule.fix}",
        }
    )


class Judgement(Model):
    """Findings judged against allowances: the one algorithm ``stacklock lock`` and ``stacklock check`` share."""

    blocking: tuple[Finding, ...] = Field(
        description="Error findings no allowance covers, and one error (registry 'lock') per allowance given "
        "now that matches no error finding: the lock stops, check fails."
    )
    allowed: tuple[Finding, ...] = Field(description="Error findings an allowance covers.")
    allowances: tuple[Allowance, ...] = Field(
        description="The allowances that cover an error finding, given ones first: what the lock records."
    )
    stale: tuple[Allowance, ...] = Field(
        description="Carried allowances (from the lock) that match no error finding any more: a re-lock drops "
        "them, check reports them."
    )

    @property
    def ok(self) -> bool:
        return not self.blocking


#: Rules renamed to say what they detect: old id → new id. An allowance of the old id accepts the new one.
RENAMED_RULES: Final = {"tmpl-gemma-system-role-unsupported": "tmpl-system-role-rejected-by-engine"}


def current_allowances(allowances: Sequence[Allowance]) -> tuple[Allowance, ...]:
    """Allowances with renamed rule ids replaced by their current ids."""
    return tuple(
        a.model_copy(update={"rule": RENAMED_RULES[a.rule]}) if a.rule in RENAMED_RULES else a
        for a in allowances
    )


def judge(
    findings: Sequence[Finding], *, given: Sequence[Allowance] = (), carried: Sequence[Allowance] = ()
) -> Judgement:
    """Judge findings against the allowances given now (``--allow``) and those carried in a lock.

    An allowance accepts one error finding by rule id. Given now, an allowance that matches no error finding
    blocks: left in the lock, it would silently accept the rule the day it fires for a different reason, so
    the user must not add it. Carried from a lock, such an allowance is stale: it was right when it was given,
    and a re-lock drops it (check reports it, so the two agree on the same lock). A given allowance wins over a
    carried one for the same rule (its reason is newer).
    """
    given = current_allowances(given)
    carried = current_allowances(carried)
    errors = [f for f in findings if f.severity is Severity.ERROR]
    error_ids = {f.rule for f in errors}
    chosen: dict[str, Allowance] = {}
    for allowance in (*given, *carried):
        chosen.setdefault(allowance.rule, allowance)
    covering = {rule: a for rule, a in chosen.items() if rule in error_ids}
    given_ids = {a.rule for a in given}
    unused = {a.rule: a for a in given if a.rule not in error_ids}
    stale = tuple(
        {a.rule: a for a in carried if a.rule not in error_ids and a.rule not in given_ids}.values()
    )
    return Judgement(
        blocking=(
            *(f for f in errors if f.rule not in covering),
            *(_unused_allowance(a, findings) for a in unused.values()),
        ),
        allowed=tuple(f for f in errors if f.rule in covering),
        allowances=tuple(covering.values()),
        stale=stale,
    )


def _unused_allowance(allowance: Allowance, findings: Sequence[Finding]) -> Finding:
    severity = next((f.severity for f in findings if f.rule == allowance.rule), None)
    why = f"the rule is a {severity.value}, which never blocks" if severity else "the rule found nothing"
    return Finding(
        rule=allowance.rule,
        severity=Severity.ERROR,
        title=f"--allow {allowance.rule} matches no error finding ({why})",
        links=_links_of(findings, allowance.rule) if severity else (Link.ENGINE,),
        explanation=(
            "An allowance accepts one error finding. This one matches none (the rule did not fire, or "
            "is only a warning or info), and left in the lock it would silently accept the rule if it "
            "fired later."
        ),
        fix=(
            f"remove the allowance: re-lock without --allow {allowance.rule}, "
            "or delete it from the lock's allowances"
        ),
        registry="lock",
    )


def _links_of(findings: Sequence[Finding], rule: str) -> tuple[Link, ...]:
    return next(f.links for f in findings if f.rule == rule)


class HasRules(Protocol):
    @property
    def rules(self) -> tuple[Rule, ...]: ...


def rules_for(registries: Iterable[HasRules]) -> tuple[Rule, ...]:
    """Every rule of the loaded registries (each attributed to its registry), in registry order."""
    return tuple(rule for registry in registries for rule in registry.rules)


__all__ = [
    "COMBINATORS",
    "KNOWN_FACTS",
    "OPERATORS",
    "AtLeast",
    "Facts",
    "HasRules",
    "Judgement",
    "Predicate",
    "PredicateSyntaxError",
    "Rule",
    "compile_predicate",
    "evaluate",
    "finding_sort_key",
    "judge",
    "parse_rule",
    "predicate_json_schema_defs",
    "rule_from_data",
    "rules_for",
]
