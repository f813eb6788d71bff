"""`stacklock lock`: load the inputs, resolve them, and refuse on error findings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stacklock.errors import RuleViolation
from stacklock.lock.load import load_inputs
from stacklock.lock.resolve import resolve
from stacklock.model.findings import Allowance
from stacklock.model.lock import Lock
from stacklock.reporter import NO_REPORTER, Reporter


def lock_stack(
    manifest_path: Path,
    *,
    allow: Sequence[Allowance] = (),
    carried: Sequence[Allowance] = (),
    use_cache: bool = True,
    reporter: Reporter = NO_REPORTER,
    offline: bool = False,
) -> Lock:
    inputs = load_inputs(manifest_path, use_cache=use_cache, reporter=reporter, offline=offline)
    resolution = resolve(inputs, allow, carried)
    for allowance in resolution.stale:
        reporter.event(
            f"note: dropped the allowance for rule {allowance.rule}: it matches no error finding now"
        )
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
