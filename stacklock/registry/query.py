"""Questions asked of loaded registries: list, search and show entries, find a stack or a template."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from pydantic import Field

from stacklock.errors import RegistryError
from stacklock.model.base import Model
from stacklock.model.findings import Severity
from stacklock.registry.files import LoadedRegistry, StackEntry, TemplateEntry
from stacklock.rules.predicates import Rule

# -- list / show / search ------------------------------------------------------------------------------------

EntryKind = Literal["rule", "template", "stack"]
ENTRY_KINDS: Final[tuple[EntryKind, ...]] = ("rule", "template", "stack")


class EntrySummary(Model):
    """One line of ``stacklock registry list`` or ``search``."""

    kind: EntryKind = Field(description="rule, template or stack.")
    id: str = Field(description="The rule or template id, or the stack name.")
    title: str = Field(description="One line.")
    registry: str = Field(description="The registry holding it.")
    severity: Severity | None = Field(default=None, description="For rules: error, warning or info.")


@dataclass(frozen=True, slots=True)
class ShownEntry:
    """One entry in full, for ``stacklock registry show``: the model and the file text it came from."""

    kind: EntryKind
    registry: str
    entry: Rule | TemplateEntry | StackEntry
    text: str


def _summaries(registry: LoadedRegistry) -> Iterable[tuple[EntrySummary, str]]:
    for rule in registry.rules:
        haystack = " ".join(
            [
                rule.id,
                rule.title,
                rule.explanation,
                rule.fix,
                *rule.references,
                *sorted(rule.when.fact_names()),
                json.dumps(rule.when.data),
            ]
        )
        yield (
            EntrySummary(
                kind="rule", id=rule.id, title=rule.title, registry=registry.name, severity=rule.severity
            ),
            haystack,
        )
    for template in registry.templates:
        haystack = " ".join(
            [
                template.id,
                template.title,
                template.reproduces,
                template.source_repo,
                template.notes,
                *template.architectures,
            ]
        )
        yield (
            EntrySummary(kind="template", id=template.id, title=template.title, registry=registry.name),
            haystack,
        )
    for stack in registry.stacks:
        haystack = " ".join([stack.name, stack.meta.title, stack.meta.description, *stack.meta.tags])
        yield (
            EntrySummary(kind="stack", id=stack.name, title=stack.meta.title, registry=registry.name),
            haystack,
        )


def _order(summary: EntrySummary) -> tuple[int, str, str]:
    return ENTRY_KINDS.index(summary.kind), summary.id, summary.registry


def list_entries(
    registries: Iterable[LoadedRegistry], kind: EntryKind | None = None
) -> tuple[EntrySummary, ...]:
    found = [s for r in registries for s, _ in _summaries(r) if kind is None or s.kind == kind]
    return tuple(sorted(found, key=_order))


def search_entries(
    registries: Iterable[LoadedRegistry], query: str, kind: EntryKind | None = None
) -> tuple[EntrySummary, ...]:
    """Entries whose id, title, text, references or facts contain every word of ``query`` (any case)."""
    words = query.casefold().split()
    found = [
        s
        for r in registries
        for s, haystack in _summaries(r)
        if (kind is None or s.kind == kind) and all(w in haystack.casefold() for w in words)
    ]
    return tuple(sorted(found, key=_order))


def show_entry(
    registries: Sequence[LoadedRegistry], entry_id: str, kind: EntryKind | None = None
) -> ShownEntry:
    """The entry named ``entry_id``. Raises RegistryError when none or several kinds match."""
    matches: list[ShownEntry] = []
    for registry in registries:
        if kind in (None, "rule"):
            matches.extend(
                ShownEntry("rule", registry.name, r, registry.sources.get(f"rule:{r.id}", ""))
                for r in registry.rules
                if r.id == entry_id
            )
        if kind in (None, "template"):
            matches.extend(
                ShownEntry("template", registry.name, t, registry.template_texts.get(t.id, ""))
                for t in registry.templates
                if t.id == entry_id
            )
        if kind in (None, "stack"):
            matches.extend(
                ShownEntry("stack", registry.name, s, s.manifest_text)
                for s in registry.stacks
                if s.name == entry_id
            )
    if not matches:
        what = kind or "rule, template or stack"
        names = ", ".join(r.name for r in registries) or "none"
        raise RegistryError(
            f"no {what} named '{entry_id}' in the registries ({names}); `stacklock registry search` finds "
            "entries"
        )
    kinds = sorted({m.kind for m in matches})
    if len(kinds) > 1:
        raise RegistryError(f"'{entry_id}' names a {' and a '.join(kinds)}; say which kind to show")
    return matches[0]


def find_stack(registries: Sequence[LoadedRegistry], name: str) -> StackEntry:
    """The known-good stack ``name`` (``stacklock init --from NAME``); the first registry that has it wins."""
    for registry in registries:
        for stack in registry.stacks:
            if stack.name == name:
                return stack
    known = sorted({s.name for r in registries for s in r.stacks})
    listing = ", ".join(known) if known else "none"
    raise RegistryError(
        f"no stack named '{name}' in the registries (known stacks: {listing}); check the name"
    )


@dataclass(frozen=True, slots=True)
class RegistryTemplate:
    """A known-good template found in a registry, with its text."""

    entry: TemplateEntry
    registry: str
    text: str

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def digest(self) -> str:
        """sha256 of the template file (checked against the entry when the registry was read)."""
        return self.entry.sha256


def find_template(registries: Sequence[LoadedRegistry], template_id: str) -> RegistryTemplate:
    """A known-good template and its text (``template.source = 'registry:ID'``); the first registry wins."""
    for registry in registries:
        for template in registry.templates:
            if template.id == template_id:
                return RegistryTemplate(template, registry.name, registry.template_texts[template.id])
    known = ", ".join(sorted({t.id for r in registries for t in r.templates})) or "none"
    raise RegistryError(
        f"no template named '{template_id}' in the registries (known templates: {known}); check the id"
    )
