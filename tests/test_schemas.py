"""The JSON Schemas in schemas/: generated from the models, committed, and true of the shipped example."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stacklock.schemas import json_schemas, render_schema, write_schemas

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
EXAMPLE = ROOT / "examples" / "gemma3-270m"
REGENERATE = "run `python -m stacklock.schemas` and commit schemas/"

# Keywords that only describe; everything else must be understood by the validator below or the test fails,
# so that a schema feature it does not check can never pass silently.
_ANNOTATIONS = frozenset(
    {"$schema", "$defs", "title", "description", "default", "examples", "format", "discriminator"}
)


def test_every_committed_schema_is_fresh() -> None:
    expected = {name: render_schema(schema) for name, schema in json_schemas().items()}
    committed = {path.name: path.read_text(encoding="utf-8") for path in SCHEMAS.glob("*.json")}
    missing = sorted(set(expected) - set(committed))
    extra = sorted(set(committed) - set(expected))
    stale = sorted(name for name in set(expected) & set(committed) if committed[name] != expected[name])
    assert not missing, f"schemas/ lacks {', '.join(missing)}: {REGENERATE}"
    assert not stale, f"schemas/ is stale ({', '.join(stale)}): {REGENERATE}"
    assert not extra, f"schemas/ holds files no model generates ({', '.join(extra)}): delete them"


def test_the_manifest_and_lock_schemas_are_published() -> None:
    schemas = json_schemas()
    assert {"llmstack.schema.json", "llmstack-lock.schema.json"} <= set(schemas)
    manifest = schemas["llmstack.schema.json"]
    assert manifest["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert manifest["title"] == "llmstack.toml"
    assert manifest["additionalProperties"] is False  # Unknown keys are rejected, as the model does.
    assert {"stack", "model", "engine", "smoke"} <= set(manifest["properties"])
    lock = schemas["llmstack-lock.schema.json"]
    assert lock["title"] == "llmstack.lock"
    assert {"lock-version", "manifest-hash", "model", "engine"} <= set(lock["properties"])


def test_the_example_manifest_points_editors_at_the_schema() -> None:
    first = (EXAMPLE / "llmstack.toml").read_text(encoding="utf-8").splitlines()[0]
    assert first == "#:schema ../../schemas/llmstack.schema.json"
    assert (EXAMPLE / first.removeprefix("#:schema ")).resolve() == SCHEMAS / "llmstack.schema.json"


def test_write_schemas_is_deterministic(tmp_path: Path) -> None:
    written = write_schemas(tmp_path / "a")
    write_schemas(tmp_path / "b")
    assert sorted(p.name for p in written) == sorted(json_schemas())
    for path in written:
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()
        assert path.read_text(encoding="utf-8").endswith("}\n")


@pytest.mark.parametrize(
    ("document", "schema_name"),
    [("llmstack.toml", "llmstack.schema.json"), ("llmstack.lock", "llmstack-lock.schema.json")],
)
def test_the_example_stack_validates(document: str, schema_name: str) -> None:
    instance = tomllib.loads((EXAMPLE / document).read_text(encoding="utf-8"))
    schema = json.loads((SCHEMAS / schema_name).read_text(encoding="utf-8"))
    assert validate(instance, schema) == []
    _check_with_jsonschema(instance, schema)


def test_the_validator_rejects_what_the_schema_forbids() -> None:
    # The check above passes only if the validator can fail: a wrong manifest must give exact errors.
    schema = json.loads((SCHEMAS / "llmstack.schema.json").read_text(encoding="utf-8"))
    manifest = tomllib.loads((EXAMPLE / "llmstack.toml").read_text(encoding="utf-8"))
    manifest["backend"]["kind"] = "abacus"
    manifest["backend"]["threads"] = "two"
    manifest["sampler"]["temprature"] = 0.5
    del manifest["model"]["source"]
    errors = validate(manifest, schema)
    assert "backend.kind: 'abacus' is not one of ['cpu', 'cuda', 'metal', 'vulkan', 'rocm', 'sycl']" in errors
    assert any(e.startswith("backend.threads: 'two' matches none of") for e in errors)
    assert "sampler: unknown key 'temprature'" in errors
    assert "model: missing required key 'source'" in errors
    assert len(errors) == 4, errors


# ------------------------------------------------------------------------------------------ a small validator


def validate(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Errors of ``instance`` against a JSON Schema, for the keywords pydantic generates.

    ``jsonschema`` is not a dependency of stacklock; this covers the subset the committed schemas use and
    fails on any other keyword, so a schema it cannot check never passes by omission.
    """
    errors: list[str] = []
    _validate(instance, schema, schema, "", errors)
    return errors


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list, tuple),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[name])


def _validate(
    value: Any, schema: dict[str, Any], root: dict[str, Any], where: str, errors: list[str]
) -> None:
    at = where or "(document)"
    known = _ANNOTATIONS | {
        "$ref", "anyOf", "oneOf", "allOf", "type", "enum", "const", "properties", "required",
        "additionalProperties", "items", "prefixItems", "minItems", "maxItems", "minLength", "maxLength",
        "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    }  # fmt: skip
    unknown = set(schema) - known
    assert not unknown, f"the test's validator does not understand {sorted(unknown)} at {at}"
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), f"unsupported $ref {ref}"
        _validate(value, root["$defs"][ref.removeprefix("#/$defs/")], root, where, errors)
    for part in schema.get("allOf", ()):
        _validate(value, part, root, where, errors)
    for keyword in ("anyOf", "oneOf"):
        if keyword in schema:
            matches = sum(not validate_at(value, option, root) for option in schema[keyword])
            if matches == 0 or (keyword == "oneOf" and matches > 1):
                errors.append(
                    f"{at}: {value!r} matches {'none' if matches == 0 else matches} of the {keyword}"
                )
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, name) for name in names):
            errors.append(f"{at}: {value!r} is not of type {' or '.join(names)}")
            return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{at}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{at}: {value!r} is not {schema['const']!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{at}: a string of length {len(value)} is outside the allowed lengths")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{at}: {value!r} does not match {schema['pattern']!r}")
    if _is_type(value, "number"):
        bounds: tuple[tuple[str, Callable[[float], bool]], ...] = (
            ("minimum", lambda bound: value >= bound),
            ("maximum", lambda bound: value <= bound),
            ("exclusiveMinimum", lambda bound: value > bound),
            ("exclusiveMaximum", lambda bound: value < bound),
        )
        for keyword, ok in bounds:
            if keyword in schema and not ok(schema[keyword]):
                errors.append(f"{at}: {value!r} fails {keyword} {schema[keyword]}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors.extend(
            f"{at}: missing required key '{key}'" for key in schema.get("required", ()) if key not in value
        )
        for key, item in value.items():
            inner = f"{where}.{key}" if where else key
            if key in properties:
                _validate(item, properties[key], root, inner, errors)
            elif schema.get("additionalProperties") is False:
                errors.append(f"{at}: unknown key '{key}'")
            elif isinstance(schema.get("additionalProperties"), dict):
                _validate(item, schema["additionalProperties"], root, inner, errors)
    if isinstance(value, list | tuple):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{at}: {len(value)} items is outside the allowed counts")
        prefix = schema.get("prefixItems", [])
        for index, item in enumerate(value):
            if index < len(prefix):
                _validate(item, prefix[index], root, f"{where}[{index}]", errors)
            elif "items" in schema:
                _validate(item, schema["items"], root, f"{where}[{index}]", errors)


def validate_at(value: Any, schema: dict[str, Any], root: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    _validate(value, schema, root, "", errors)
    return errors


def _check_with_jsonschema(instance: Any, schema: dict[str, Any]) -> None:
    """Also run the reference validator when it happens to be installed (it is not a dependency)."""
    try:
        import jsonschema  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError:
        return
    jsonschema.Draft202012Validator(schema).validate(instance)
