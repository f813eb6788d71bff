"""`stacklock lock`: load the inputs, resolve them, and refuse on error findings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stacklock.errors import RuleViolation
from stacklock.files.digest import HashProgress
from stacklock.lock.load import load_inputs
from stacklock.lock.resolve import resolve
from stacklock.model.findings import Allowance
from stacklock.model.lock import (
    Lock,
)


def lock_stack(
    manifest_path: Path,
    *,
    allow: Sequence[Allowance] = (),
    carried: Sequence[Allowance] = (),
    use_cache: bool = True,
    progress: HashProgress | None = None,
    offline: bool = False,
    model_revision: str | None = None,
) -> Lock:
    """Lock the stack; ``model_revision`` keeps a hub model at a commit locked before (see :func:`kept_revision`)."""
    inputs = load_inputs(
        manifest_path, use_cache=use_cache, progress=progress, offline=offline, model_revision=model_revision
    )
    resolution = resolve(inputs, allow, carried)
    if resolution.blocking:
        first = resolution.blocking[0]
        more = f" (and {len(resolution.blocking) - 1} more)" if len(resolution.blocking) > 1 else ""
        raise RuleViolation(
            f"rule {first.rule}: {first.title}{more}",
            hint=f"{first.fix} — or accept it with --allow {first.rule} --reason TEXT",
        )
    return resolution.lock


def merge_goldens(new: Lock, previous: Lock | None) -> Lock:
    """Keep recorded goldens across a re-lock when every pin is unchanged; they no longer apply otherwise."""
    if previous is None or previous.behaviour() != new.behaviour():
        return new
    return new.model_copy(update={"smoke": previous.smoke, "recording": previous.recording})


def kept_revision(manifest_source: str, previous: Lock | None, *, upgrade: bool) -> str | None:
    """The commit a re-lock keeps a hub model at: the locked one, unless upgrading or the source changed.

    Like ``uv lock``: a branch or tag is resolved once and stays pinned until ``lock --upgrade`` re-resolves it.
    """
    if upgrade or previous is None or previous.model.source != manifest_source:
        return None
    return previous.model.revision
