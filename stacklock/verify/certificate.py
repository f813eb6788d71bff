"""The certificate that `verify --certificate` writes: what was verified, where, with what result."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from stacklock.engines.machine import current_environment
from stacklock.files.digest import sha256_text
from stacklock.model.lock import Lock
from stacklock.verify.compare import (
    VerifyReport,
)

CERTIFICATE_VERSION = 1


def certificate(lock_text: str, lock: Lock, report: VerifyReport) -> dict[str, Any]:
    """The JSON certificate `verify --certificate` writes: what was verified, where, with what result."""
    return {
        "certificate-version": CERTIFICATE_VERSION,
        "stack": lock.stack.name,
        "reproduced": report.reproduced,
        "tolerated": report.tolerated,
        "lock-sha256": sha256_text(lock_text),
        "model-sha256": lock.model.sha256,
        "template-sha256": lock.template.sha256,
        "tokenizer-sha256": lock.tokenizer.sha256,
        "engine": report.engine.model_dump(mode="json", by_alias=True) if report.engine else None,
        "environment": current_environment().model_dump(mode="json", by_alias=True),
        "recorded-on": _recorded_on(lock, report.recording),
        "results": [r.model_dump(mode="json", by_alias=True) for r in report.results],
        "notes": list(report.notes),
    }


def _recorded_on(lock: Lock, name: str | None) -> dict[str, Any] | None:
    """The recording the run was compared with: its id, engine, machine and top-k (its goldens are in the lock,
    whose sha256 the certificate pins)."""
    recording = lock.recording(name) if name is not None else None
    if recording is None:
        return None
    return recording.model_dump(mode="json", by_alias=True, exclude={"goldens"})


def render_certificate(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
