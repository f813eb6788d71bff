"""Reporting: a :class:`~stacklock.lock.diff.LockDiff` as text or JSON. Pure: the renderers return strings."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stacklock.lock.diff import LockDiff

__all__ = ["FORMATS", "render"]

FORMATS = ("text", "json")


def render(diff: LockDiff, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(diff.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False)
    return render_text(diff)


def render_text(diff: LockDiff) -> str:
    if diff.identical:
        return f"{diff.old} and {diff.new} pin the same stack"
    lines = [f"--- {diff.old}", f"+++ {diff.new}"]
    for link in diff.links:
        lines.append(f"{link.link}:")
        lines.extend(f"  {line}" for line in link.summary)
        lines.extend(f"  {c.key}: {_value(c.old)} → {_value(c.new)}" for c in link.changes)
        if link.template_diff:
            lines.extend(f"    {line}" for line in link.template_diff.splitlines())
    return "\n".join(lines)


def _value(value: object) -> str:
    return "(absent)" if value is None else json.dumps(value, ensure_ascii=False)
