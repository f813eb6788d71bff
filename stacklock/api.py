"""The Python API: what the `stacklock` commands do, as functions that take paths and return models.

Each function is a thin layer over the library functions its command calls, prints nothing and raises the
command's errors (:mod:`stacklock.errors`: ``StaleLockError`` and ``RuleViolation`` for a wrong stack,
``InputError`` for bad input, ``EngineError`` when the engine cannot run). They are importable from the package
top (``stacklock.lock_stack``) without loading anything else until called.

The names say what they act on (``lock_stack``, not ``lock``): ``stacklock.lock`` and ``stacklock.verify`` are
sub-packages, and importing one rebinds that attribute of the package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stacklock.errors import LockError, NewerLockError, UsageError
from stacklock.reporter import NO_REPORTER, Reporter

if TYPE_CHECKING:
    from stacklock.lock.diff import LockDiff
    from stacklock.model.lock import Lock
    from stacklock.rules.check import CheckResult
    from stacklock.verify.compare import VerifyReport

StrPath = str | os.PathLike[str]
MANIFEST = Path("llmstack.toml")
LOCK = Path("llmstack.lock")


def lock_stack(
    manifest: StrPath = MANIFEST,
    *,
    allow: Sequence[str] = (),
    reason: str | None = None,
    offline: bool = False,
    use_cache: bool = True,
    reporter: Reporter = NO_REPORTER,
) -> Lock:
    """`stacklock lock`: resolve the manifest and write ``llmstack.lock`` beside it; return the lock.

    ``allow`` accepts error findings by rule id, for ``reason`` (required with it). Allowances and recorded
    goldens of the previous lock are kept as the command keeps them. Raises ``RuleViolation`` on an error
    finding that is not allowed. ``reporter`` (:class:`stacklock.reporter.Reporter`) hears each step.
    """
    from stacklock.lock.api import lock_stack as resolve_stack  # noqa: PLC0415
    from stacklock.lock.api import merge_goldens  # noqa: PLC0415
    from stacklock.lock.project import read_lock, write_lock  # noqa: PLC0415
    from stacklock.model.findings import Allowance  # noqa: PLC0415

    if allow and not reason:
        raise UsageError(
            "allow needs a reason", hint="say why the finding is acceptable; it goes in the lock"
        )
    manifest = Path(manifest)
    lock_path = manifest.with_name(LOCK.name)
    previous = None
    if lock_path.exists():
        try:
            previous = read_lock(lock_path)
        except NewerLockError:
            raise  # A newer stacklock's lock is not replaced.
        except LockError:
            pass  # Replaced either way; only its goldens and allowances cannot be carried over.
    new = resolve_stack(
        manifest,
        allow=tuple(Allowance(rule=rule, reason=reason or "") for rule in allow),
        carried=previous.allowances if previous else (),
        use_cache=use_cache,
        reporter=reporter,
        offline=offline,
    )
    new = merge_goldens(new, previous)
    write_lock(lock_path, new)
    return new


def check_lock(
    manifest: StrPath = MANIFEST, *, offline: bool = False, reporter: Reporter = NO_REPORTER
) -> Lock:
    """`stacklock lock --check`: return the lock when it is fresh, raise ``StaleLockError`` naming what changed."""
    from stacklock.lock.fresh import check_lock as check_fresh  # noqa: PLC0415

    manifest = Path(manifest)
    return check_fresh(manifest, manifest.with_name(LOCK.name), offline=offline, reporter=reporter)


def check_stack(manifest: StrPath = MANIFEST, *, offline: bool = False) -> CheckResult:
    """`stacklock check` of a lock: its findings against the registries' rules and the template probes.

    ``result.ok`` is what the command's exit code says. No model runs; a missing lock is a ``LockError``.
    """
    from stacklock.cli.check import locked_registries  # noqa: PLC0415
    from stacklock.engines.machine import installed_engine_version  # noqa: PLC0415
    from stacklock.lock.project import read_lock  # noqa: PLC0415
    from stacklock.rules.check import check_stack as evaluate  # noqa: PLC0415

    manifest = Path(manifest)
    locked = read_lock(manifest.with_name(LOCK.name))
    registries = locked_registries(manifest, locked, offline=offline)
    return evaluate(locked, registries, installed_engine_version(locked.engine.name))


def record_goldens(lock: StrPath = LOCK, *, top_k: int = 5, reporter: Reporter = NO_REPORTER) -> Lock:
    """`stacklock record`: run every smoke prompt, store the goldens in the lock file and return the lock."""
    from stacklock.verify.session import record  # noqa: PLC0415

    recorded, _ = record(Path(lock), top_k=top_k, reporter=reporter)
    return recorded


def verify_stack(
    lock: StrPath = LOCK, *, tolerance: float | None = None, reporter: Reporter = NO_REPORTER
) -> VerifyReport:
    """`stacklock verify`: re-run the smoke prompts; ``report.reproduced`` is false when a stage broke.

    ``tolerance`` accepts a divergence at a near-tie within that logprob gap (as ``--tolerance``).
    """
    from stacklock.verify.compare import Tolerance  # noqa: PLC0415
    from stacklock.verify.session import verify  # noqa: PLC0415

    if tolerance is not None and tolerance <= 0:
        raise UsageError("tolerance must be greater than 0", hint="e.g. tolerance=0.5")
    margin = None if tolerance is None else Tolerance(margin=tolerance)
    return verify(Path(lock), tolerance=margin, reporter=reporter)


def diff_locks(old: StrPath, new: StrPath) -> LockDiff:
    """`stacklock diff`: what differs between two lock files, link by link (``result.identical``)."""
    from stacklock.cli.diff import diff_lock_files  # noqa: PLC0415

    return diff_lock_files(Path(old), Path(new))
