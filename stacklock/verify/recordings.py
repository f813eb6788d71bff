"""Several recordings in one lock: which one verify compares against, and how far another engine drifts from it.

Pure: the lock, the names of where verify runs and the comparison's results in; a recording or a note out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stacklock.errors import LockError, UsageError
from stacklock.model.lock import LOCK_NAME, Recording, recording_id
from stacklock.verify.compare import logprob_drift

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from stacklock.engines.base import Observation
    from stacklock.model.lock import Lock
    from stacklock.verify.compare import SmokeResult

__all__ = ["choose_recording", "drift_note"]


def choose_recording(
    lock: Lock, *, engine: str, version: str, backend: str, against: str | None = None
) -> Recording | None:
    """The recording verify compares with: ``against`` (``--against ID``), else the one recorded where it runs.

    None when the lock has no recording yet (verify then certifies nothing: no goldens). A lock whose
    recordings were all made elsewhere is an error naming them: comparing with another engine's goldens is a
    choice (``--against``), not a default.
    """
    names = ", ".join(r.id for r in lock.recordings) or "none"
    if against is not None:
        found = lock.recording(against)
        if found is None:
            raise UsageError(
                f"--against {against}: {LOCK_NAME} has no such recording (it has: {names})",
                hint="name one of them, or record one there with `stacklock record`",
            )
        return found
    if not lock.recordings:
        return None
    here = recording_id(engine, version, backend)
    found = lock.recording(here)
    if found is None:
        raise LockError(
            f"{LOCK_NAME} has no recording for {here}, where verify runs (it has: {names})",
            hint=f"compare with one of them (`stacklock verify --against {lock.recordings[0].id}`) or record "
            "one here with `stacklock record`",
        )
    return found


def drift_note(
    recording: Recording, observations: Mapping[str, Observation], results: Sequence[SmokeResult]
) -> str:
    """How far the engine observed now is from another engine's recording: the largest logprob drift before
    any divergence, and the smoke prompts whose output flipped at a near-tie (tolerated under --tolerance)."""
    drift = max(
        (
            logprob_drift(golden, observations[name].generation)
            for name, golden in recording.goldens.items()
            if name in observations
        ),
        default=0.0,
    )
    flips = [
        f"{result.name} at token {stage.position}"
        for result in results
        for stage in result.stages
        if stage.stage == "generation" and stage.status == "tolerated"
    ]
    return (
        f"against the recording {recording.id}: largest logprob drift {drift:.4f} (before any divergence); "
        f"near-tie flips: {', '.join(flips) if flips else 'none'}"
    )
