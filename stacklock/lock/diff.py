"""What differs between two locks, link by link: the review aid for a change to a lock, and drift explained.

Pure: :func:`diff_locks` takes two :class:`~stacklock.model.lock.Lock` models and returns a :class:`LockDiff`;
:func:`explain_model` says which parts of a model file changed ("the embedded chat template changed; tensor
data identical"), for ``lock --check``, ``verify``'s artifacts stage and ``stacklock diff`` alike.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import Field

from stacklock.model.base import Model
from stacklock.model.lock import (
    Lock,
    ModelPin,
    Recording,
    SmokeGolden,
    SmokePin,
    TemplatePin,
    pin_metadata_value,
)

__all__ = [
    "Change",
    "LinkDiff",
    "LockDiff",
    "diff_locks",
    "embedded_template",
    "explain_model",
    "template_diff",
]

T = TypeVar("T")

#: A template diff longer than this many lines is cut; the digests still say that the texts differ.
MAX_DIFF_LINES = 40
_SHORT = 80


class Change(Model):
    """One pin that differs: its key path in the lock and both values (absent: null)."""

    key: str = Field(description="The key path in the lock, e.g. model.metadata.general.name.")
    old: Any = Field(default=None, description="The value in the first lock (null: absent).")
    new: Any = Field(default=None, description="The value in the second lock (null: absent).")


class LinkDiff(Model):
    """What differs in one link (or one table) of the lock."""

    link: str = Field(description="The link or table: model, template, tokenizer, engine, backend, ...")
    summary: tuple[str, ...] = Field(default=(), description="What changed, in words.")
    changes: tuple[Change, ...] = Field(default=(), description="Every differing pin.")
    template_diff: str | None = Field(default=None, description="A unified diff of the template text.")


class LockDiff(Model):
    """Every difference between two locks, in chain order."""

    old: str = Field(description="The first lock.")
    new: str = Field(description="The second lock.")
    identical: bool = Field(description="True when every pin, finding and golden is the same.")
    links: tuple[LinkDiff, ...] = Field(default=(), description="Only the links that differ.")


# The model file -----------------------------------------------------------------------------------------


def embedded_template(lock: Lock) -> str | None:
    """The text of the model's embedded template as the lock knows it (only when it pins that source)."""
    # A named template (gguf:NAME) is not tokenizer.chat_template, whose digest the model pin keeps.
    return lock.template.text if lock.template.source == "gguf" else None


def explain_model(
    old: ModelPin, new: ModelPin, *, old_template: str | None = None, new_template: str | None = None
) -> tuple[str, ...]:
    """Which parts of a model file changed, in words; empty when the files are the same.

    ``old_template``/``new_template`` are the embedded template texts where known; without the old text the
    change is told by digest.
    """
    if old.sha256 == new.sha256 and old.parts == new.parts:
        return ()
    lines = []
    if old.chat_template_sha256 != new.chat_template_sha256:
        if old.chat_template_sha256 is None or new.chat_template_sha256 is None:
            state = "added" if old.chat_template_sha256 is None else "removed"
            lines.append(f"the embedded chat template was {state}")
        elif old_template is not None and new_template is not None:
            lines.append("the embedded chat template changed (diff below)")
        else:
            lines.append(
                "the embedded chat template changed "
                f"(sha256 {_digest(old.chat_template_sha256)} → {_digest(new.chat_template_sha256)})"
            )
    changed = sorted(
        key
        for key in {*old.metadata, *new.metadata, *old.arrays, *new.arrays}
        if _meta(old, key) != _meta(new, key)
    )
    if changed:
        named = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        lines.append(f"metadata changed: {named}")
    elif old.header_sha256 and new.header_sha256 and old.header_sha256 != new.header_sha256 and not lines:
        lines.append("the header changed (tensor infos or metadata layout)")
    lines.append(_data_line(old, new))
    return tuple(lines)


def _meta(pin: ModelPin, key: str) -> Any:
    value = pin.metadata.get(key, pin.arrays.get(key))
    # A lock written before long strings were bounded holds them verbatim; compare them by digest.
    return pin_metadata_value(value) if isinstance(value, str) else value


def _data_line(old: ModelPin, new: ModelPin) -> str:
    if old.data_xxh3 is None or new.data_xxh3 is None:
        return "tensor data: not pinned by region in the lock (re-lock to pin it)"
    if old.data_xxh3 != new.data_xxh3 or old.parts != new.parts:
        return "tensor data changed"
    return "tensor data identical"


def _digest(value: str | None) -> str:
    return "none" if value is None else value[:12] + "…"


def template_diff(old: str, new: str, *, name: str = "template", limit: int = MAX_DIFF_LINES) -> str:
    """A unified diff of two template texts, at most ``limit`` lines."""
    lines = list(
        difflib.unified_diff(old.splitlines(), new.splitlines(), f"a/{name}", f"b/{name}", n=1, lineterm="")
    )
    if len(lines) > limit:
        lines = [*lines[:limit], f"... ({len(lines) - limit} more diff lines)"]
    return "\n".join(lines)


# Two locks ----------------------------------------------------------------------------------------------


def diff_locks(old: Lock, new: Lock, *, old_name: str = "a", new_name: str = "b") -> LockDiff:
    """Every difference between two locks, link by link; pure."""
    a = old.model_dump(mode="json", by_alias=True, exclude={"created_by"})
    b = new.model_dump(mode="json", by_alias=True, exclude={"created_by"})
    links: list[LinkDiff] = []
    for table in _ordered_tables(a, b):
        if a.get(table) == b.get(table):
            continue
        if table == "model":
            links.append(_model_diff(old, new))
        elif table == "template":
            links.append(_template_link(old.template, new.template))
        elif table == "smoke":
            links.append(_smoke_diff(old.smoke, new.smoke))
        elif table == "recording":
            links.append(_recordings_diff(old.recordings, new.recordings))
        elif table in ("findings", "allowances", "registries"):
            links.append(_keyed_diff(table, a.get(table) or [], b.get(table) or []))
        elif a.get(table) is None or b.get(table) is None:
            links.append(LinkDiff(link=table, summary=(f"only in the {_side(a.get(table))} lock",)))
        else:
            links.append(LinkDiff(link=table, changes=tuple(_changes(table, a.get(table), b.get(table)))))
    return LockDiff(old=old_name, new=new_name, identical=not links, links=tuple(links))


def _side(old: object) -> str:
    return "second" if old is None else "first"


def _ordered_tables(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return list(a) + [key for key in b if key not in a]


def _model_diff(old: Lock, new: Lock) -> LinkDiff:
    a = old.model.model_dump(mode="json", by_alias=True)
    b = new.model.model_dump(mode="json", by_alias=True)
    summary = explain_model(
        old.model, new.model, old_template=embedded_template(old), new_template=embedded_template(new)
    )
    return LinkDiff(link="model", summary=summary, changes=tuple(_changes("model", a, b)))


def _template_link(old: TemplatePin, new: TemplatePin) -> LinkDiff:
    a = old.model_dump(mode="json", by_alias=True, exclude={"text"})
    b = new.model_dump(mode="json", by_alias=True, exclude={"text"})
    diff = None
    summary = []
    if old.text != new.text:
        if old.text is not None and new.text is not None:
            diff = template_diff(old.text, new.text)
            summary.append("the template text changed (diff below)")
        else:
            summary.append("the template was " + ("added" if old.text is None else "removed"))
    return LinkDiff(
        link="template",
        summary=tuple(summary),
        changes=tuple(_changes("template", a, b)),
        template_diff=diff,
    )


def _keyed_diff(table: str, old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> LinkDiff:
    key = "name" if table == "registries" else "rule"
    a = {str(entry.get(key)): entry for entry in old}
    b = {str(entry.get(key)): entry for entry in new}
    summary = []
    changes: list[Change] = []
    for name in list(a) + [n for n in b if n not in a]:
        if name not in a or name not in b:
            summary.append(f"{name}: only in the {_side(a.get(name))} lock")
        elif a[name] != b[name]:
            changes.extend(_changes(f"{table}.{name}", a[name], b[name]))
    return LinkDiff(link=table, summary=tuple(summary), changes=tuple(changes))


def _pairs(old: Mapping[str, T], new: Mapping[str, T], summary: list[str]) -> Iterator[tuple[str, T, T]]:
    """The entries both locks have, by name, in lock order; one only in one lock is said so in ``summary``."""
    for name in list(old) + [n for n in new if n not in old]:
        if name not in new or name not in old:
            summary.append(f"{name}: only in the {_side(old.get(name))} lock")
        else:
            yield name, old[name], new[name]


def _smoke_diff(old: Sequence[SmokePin], new: Sequence[SmokePin]) -> LinkDiff:
    summary: list[str] = []
    changes: list[Change] = []
    for name, x, y in _pairs({pin.name: pin for pin in old}, {pin.name: pin for pin in new}, summary):
        if x == y:
            continue
        if x.rendered_sha256 != y.rendered_sha256:
            summary.append(f"{name}: the rendered prompt changed" + _first_char(x.rendered, y.rendered))
        dump_a = x.model_dump(mode="json", by_alias=True, exclude={"rendered"})
        dump_b = y.model_dump(mode="json", by_alias=True, exclude={"rendered"})
        changes.extend(_changes(f"smoke.{name}", dump_a, dump_b))
    return LinkDiff(link="smoke", summary=tuple(summary), changes=tuple(changes))


def _first_char(old: str | None, new: str | None) -> str:
    if old is None or new is None:
        return ""
    index = next(
        (i for i, (p, q) in enumerate(zip(old, new, strict=False)) if p != q), min(len(old), len(new))
    )
    return f" at character {index}: {old[index : index + 20]!r} → {new[index : index + 20]!r}"


def _recordings_diff(old: Sequence[Recording], new: Sequence[Recording]) -> LinkDiff:
    """Recordings by id: one only in one lock, else what differs in where it was made and in each golden."""
    summary: list[str] = []
    changes: list[Change] = []
    for name, x, y in _pairs({r.id: r for r in old}, {r.id: r for r in new}, summary):
        for smoke in list(x.goldens) + [n for n in y.goldens if n not in x.goldens]:
            summary.extend(
                f"{name} {smoke}: {line}"
                for line in _golden_lines(x.goldens.get(smoke), y.goldens.get(smoke))
            )
        dump_a = x.model_dump(mode="json", by_alias=True, exclude={"goldens"})
        dump_b = y.model_dump(mode="json", by_alias=True, exclude={"goldens"})
        changes.extend(_changes(f"recording.{name}", dump_a, dump_b))
    return LinkDiff(link="recording", summary=tuple(summary), changes=tuple(changes))


def _golden_lines(x: SmokeGolden | None, y: SmokeGolden | None) -> Iterator[str]:
    if x == y:
        return
    if x is None or y is None:
        yield f"golden recorded only in the {_side(x)} lock"
        return
    if x.prompt_tokens_sha256 != y.prompt_tokens_sha256:
        yield _token_line("prompt tokens", x.prompt_tokens or (), y.prompt_tokens or ())
    if x.tokens != y.tokens:
        yield _token_line("generated tokens", x.tokens, y.tokens)
    if x.text != y.text:
        yield f"output text {_short(x.text)} → {_short(y.text)}"
    if x.tokens == y.tokens and x.top_logprobs != y.top_logprobs:
        yield "top-k logprobs differ (same tokens)"


def _token_line(what: str, old: Sequence[int], new: Sequence[int]) -> str:
    index = next((i for i, (p, q) in enumerate(zip(old, new, strict=False)) if p != q), None)
    if index is None:
        return f"{what}: lengths differ ({len(old)} → {len(new)})"
    return f"{what}: first difference at token {index}: {old[index]} → {new[index]}"


def _changes(path: str, old: Any, new: Any) -> Iterator[Change]:
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            yield from _changes(f"{path}.{key}", old.get(key), new.get(key))
        return
    yield Change(key=path, old=_compact(old), new=_compact(new))


def _compact(value: Any) -> Any:
    text = json.dumps(value, ensure_ascii=False)
    return value if len(text) <= _SHORT * 4 else _short(text)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return repr(text) if len(text) <= _SHORT else repr(text[: _SHORT - 3] + "...")
