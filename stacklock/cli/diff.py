"""`stacklock diff A.lock B.lock`: what differs between two locks, link by link (exit 0 same, 1 different)."""

from __future__ import annotations

from pathlib import Path

from stacklock.lock.diff import LockDiff, diff_locks
from stacklock.lock.project import read_lock


def diff_lock_files(old: Path, new: Path) -> LockDiff:
    """Read two locks (a bad one is a LockError, exit 2) and compare them."""
    return diff_locks(read_lock(old), read_lock(new), old_name=str(old), new_name=str(new))
