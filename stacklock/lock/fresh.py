"""Freshness: `stacklock lock --check`, which names the first pin that no longer matches its inputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from stacklock.engines.served import is_served
from stacklock.errors import StaleLockError
from stacklock.lock.api import locked_revisions
from stacklock.lock.diff import embedded_template, explain_model, template_diff
from stacklock.lock.load import load_inputs
from stacklock.lock.project import read_lock, read_manifest
from stacklock.lock.resolve import resolve
from stacklock.model.lock import (
    Lock,
    manifest_hash,
    pin_metadata_value,
)
from stacklock.registry.fetch import compare_pins
from stacklock.reporter import NO_REPORTER, Reporter
from stacklock.sources.hub import is_commit, stat_hub_file
from stacklock.sources.model import HubSource, parse_model_source
from stacklock.template.upstream import HubTemplateSource, parse_hub_template_source


def check_lock(
    manifest_path: Path, lock_path: Path, *, offline: bool = False, reporter: Reporter = NO_REPORTER
) -> Lock:
    """Raise StaleLockError with one reason when the lock is missing or no longer matches its inputs."""
    if not lock_path.exists():
        raise StaleLockError(f"{lock_path}: missing", hint="run `stacklock lock` and commit the lock")
    locked = read_lock(lock_path)
    _manifest, data = read_manifest(manifest_path)
    if locked.manifest_hash != manifest_hash(data):
        raise StaleLockError(
            f"{lock_path} is stale: {manifest_path.name} changed since it was locked",
            hint="run `stacklock lock`",
        )
    # Registries are re-read (not served from the cache by their pinned digest) so that a changed one shows.
    inputs = load_inputs(
        manifest_path,
        offline=offline,
        registry_pins=locked.registries,
        refresh_registries=not offline,
        revisions=locked_revisions(locked),
        reporter=reporter,
    )
    if is_served(inputs.manifest.engine.name):
        # The server is not asked again here: the build it served at lock time stands for the installed one.
        inputs = replace(inputs, installed_engine_version=locked.engine.version)
    changed = compare_pins(locked.registries, inputs.registries)
    if changed:
        raise StaleLockError(f"{lock_path} is stale: {changed[0]}", hint="run `stacklock lock` to re-pin")
    fresh = resolve(inputs, carried=locked.allowances).lock
    # What a served engine said at lock time is not an input; the server is not asked again here.
    fresh = fresh.model_copy(
        update={"engine": fresh.engine.model_copy(update={"served": locked.engine.served})}
    )
    if locked.model.sha256 != fresh.model.sha256:
        raise _model_changed(lock_path, locked, fresh, inputs.header.chat_template)
    difference = first_difference(_comparable(locked).pins(), _comparable_to(fresh, locked).pins())
    if difference is not None:
        where, old, new = difference
        raise StaleLockError(
            f"{lock_path} is stale: {where} is {_short(old)} in the lock but {_short(new)} now",
            hint="run `stacklock lock` to re-pin, or restore the input that changed",
        )
    return locked


def _model_changed(lock_path: Path, locked: Lock, fresh: Lock, embedded: str | None) -> StaleLockError:
    """The model file changed: say which parts of it did, with the template's diff when it is known."""
    old_text = embedded_template(locked)
    lines = explain_model(locked.model, fresh.model, old_template=old_text, new_template=embedded)
    message = f"{lock_path} is stale: {locked.model.path} changed ({locked.model.sha256[:12]}… → "
    message += f"{fresh.model.sha256[:12]}…): " + "; ".join(lines)
    hint = "run `stacklock lock` to re-pin (and `stacklock record`), or restore the locked file"
    if old_text is not None and embedded is not None and old_text != embedded:
        # The diff follows the one-line reason, so that the reason and its fix stay on the first line.
        message += f"; {hint}\n" + template_diff(old_text, embedded, name="tokenizer.chat_template")
        hint = ""
    return StaleLockError(message, hint=hint or None)


def _comparable(locked: Lock) -> Lock:
    """A lock written before long metadata strings were bounded, with them pinned as now (by digest)."""
    metadata = {
        k: pin_metadata_value(v) if isinstance(v, str) else v for k, v in locked.model.metadata.items()
    }
    return locked.model_copy(update={"model": locked.model.model_copy(update={"metadata": metadata})})


def _comparable_to(fresh: Lock, locked: Lock) -> Lock:
    """The fresh lock without the pins an older lock did not have yet (region digests): not a change."""
    absent = {k: None for k in ("header_sha256", "data_xxh3") if getattr(locked.model, k) is None}
    return fresh.model_copy(update={"model": fresh.model.model_copy(update=absent)})


def first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first key path at which two dumped locks differ, in lock order."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            found = first_difference(a, b, f"{path}[{index}]")
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def moved_revisions(lock: Lock, *, offline: bool = False) -> tuple[str, ...]:
    """Hub branches and tags that now name another commit than the locked one: information, not staleness.

    One ``HEAD`` per hub link; nothing offline.
    """
    if offline:
        return ()
    moved = []
    for link, (source, path) in _hub_links(lock).items():
        locked = locked_revisions(lock)[link]
        if is_commit(source.revision):
            continue
        now = stat_hub_file(source.repo, source.revision, path, link=f"{link}.source").commit
        if now != locked:
            moved.append(
                f"{link}: hf://{source.repo}@{source.revision} has moved to {now[:12]} since the lock "
                f"(locked at {locked[:12]}); `stacklock lock --upgrade` re-pins it"
            )
    return tuple(moved)


def _hub_links(lock: Lock) -> dict[str, tuple[HubTemplateSource, str]]:
    """Each hub link's source and a file of it to ask the hub about."""
    links: dict[str, tuple[HubTemplateSource, str]] = {}
    model = parse_model_source(lock.model.source)
    if isinstance(model, HubSource) and lock.model.revision:
        links["model"] = (HubTemplateSource(model.repo, model.revision, model.path, None), model.path)
    template = parse_hub_template_source(lock.template.source)
    if template is not None and lock.template.revision:
        # The file the template was read from: the origin's path after the commit, without #NAME.
        links["template"] = (template, lock.template.origin.split("/", 4)[-1].split("#")[0])
    if lock.upstream_tokenizer is not None:
        tokenizer = parse_hub_template_source(lock.upstream_tokenizer.source)
        if tokenizer is not None:
            links["tokenizer"] = (tokenizer, "tokenizer.json")
    return links
