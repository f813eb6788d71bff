"""TOML in and out: parse text into validated models with one-line errors that name the file, line and key path.

Used for every TOML file stacklock reads (manifest, lock, registry entries), so that a typo anywhere is reported
the same way: ``llmstack.toml:12: sampler.top-k: expected an integer, got 'abc'``.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from stacklock.errors import InputError

M = TypeVar("M", bound=BaseModel)

_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")


def parse_toml(text: str, origin: str, error: type[InputError]) -> dict[str, Any]:
    """Parse TOML text; a syntax error names the line, column and byte offset."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        # tomllib parses nested arrays recursively: 3,000 '[' exhaust the stack before any other limit.
        raise error(
            f"{origin}: invalid TOML: arrays or inline tables nest too deeply", hint="flatten the value"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION.search(message)
        if match is None:
            raise error(f"{origin}: invalid TOML: {message}", hint="fix the syntax") from None
        line, column = int(match[1]), int(match[2])
        offset = _byte_offset(text, line, column)
        what = _TOML_POSITION.sub("", message).strip()
        raise error(
            f"{origin}:{line}:{column}: invalid TOML (byte {offset}): {what}",
            hint="fix the syntax at that position",
        ) from None


def validate(model: type[M], data: Mapping[str, Any], origin: str, text: str, error: type[InputError]) -> M:
    """Validate parsed TOML against a model; the first error becomes one line with its key path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(describe_validation_error(exc, model, origin, text)) from None


def key_path(loc: Sequence[str | int]) -> str:
    """Render a pydantic location as a TOML key path: ``smoke[0].messages[1].role``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def describe_validation_error(exc: ValidationError, model: type[BaseModel], origin: str, text: str) -> str:
    err = exc.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
    path = key_path(loc)
    line = locate(text, loc)
    where = f"{origin}:{line}" if line else origin
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
        fix = f"did you mean '{guess[0]}'?" if guess else f"known keys here: {', '.join(known) or 'none'}"
        return f"{where}: {path}: unknown key; {fix}"
    if kind == "missing":
        return f"{where}: {path}: required key is missing; add it"
    got = err.get("input")
    shown = "" if isinstance(got, Mapping | list) else f" (got {got!r})"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {path}: {msg}{shown}" if path else f"{where}: {msg}"


def _is_union_tag(part: str | int) -> bool:
    # Pydantic adds the union member's name (e.g. 'ChatSmoke') to locations; users never wrote it.
    return isinstance(part, str) and part[:1].isupper()


def _known_keys(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = _field_by_alias(current, part)
        if field is None:
            return []
        current = _inner_model(field.annotation)
        if current is None:
            return []
    return sorted((f.alias or name) for name, f in current.model_fields.items())


def _field_by_alias(model: type[BaseModel], alias: str) -> Any:
    for name, field in model.model_fields.items():
        if (field.alias or name) == alias:
            return field
    return None


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def locate(text: str, loc: Sequence[str | int]) -> int | None:
    """Best-effort line number of a key path in TOML text, for error messages.

    It understands ``[table]``, ``[[array]]`` headers and ``key =`` lines, which covers what users write in a
    manifest. When it cannot tell, it returns the line of the nearest enclosing table, or None.
    """
    lines = text.splitlines()
    keys = [p for p in loc if isinstance(p, str)]
    if not keys:
        return None
    best: int | None = None
    # Find the header of the innermost table that is spelled as a header.
    header_line = 0
    index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    occurrence = -1
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if stripped in (f"[[{keys[0]}]]", f"[{keys[0]}]"):
            occurrence += 1
            if index is None or occurrence == index:
                header_line = number
                best = number
                break
    if header_line:
        rest = keys[1:]
        for number in range(header_line + 1, len(lines) + 1):
            stripped = lines[number - 1].strip()
            if stripped.startswith("[") and not stripped.startswith(f"[{keys[0]}."):
                break
            if rest and re.match(rf"{re.escape(rest[0])}\s*=", stripped):
                return number
        return best
    for number, raw in enumerate(lines, start=1):
        if re.match(rf"\s*{re.escape(keys[0])}\s*=", raw):
            return number
    return best


def _byte_offset(text: str, line: int, column: int) -> int:
    lines = text.split("\n")
    before = "\n".join(lines[: line - 1])
    head = lines[line - 1][: column - 1] if line - 1 < len(lines) else ""
    extra = 1 if line > 1 else 0
    return len(before.encode()) + extra + len(head.encode())


_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}
_ESCAPES['"""'] = '""\\"'
_SINGLE_LINE_ESCAPED = re.compile(r'[\x00-\x1f\x7f"\\]')
_MULTILINE_ESCAPED = re.compile(r'"""|[\x00-\x09\x0b-\x1f\x7f\\]')


def _escape(match: re.Match[str]) -> str:
    sequence = match.group()
    return _ESCAPES.get(sequence) or f"\\u{ord(sequence):04x}"


def escape_basic_string(value: str, *, multiline: bool) -> str:
    """``value`` escaped for a TOML basic string, as tomlkit escapes it, in one linear pass.

    tomlkit's own escaping slices the rest of the string at every character once the string holds anything to
    escape: quadratic, minutes for a long template with a tab or a NUL. A multiline string keeps its newlines
    and escapes ``\"\"\"``; a carriage return is always escaped, so the text reads back exactly.
    """
    return (_MULTILINE_ESCAPED if multiline else _SINGLE_LINE_ESCAPED).sub(_escape, value)
