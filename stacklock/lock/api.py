"""`stacklock lock`: load the inputs, resolve them, and refuse on error findings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stacklock.engines.served import is_served, open_served, served_pin
from stacklock.errors import EngineError, RuleViolation, UsageError
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
    endpoint: str | None = None,
) -> Lock:
    """Resolve the manifest into a lock; a served engine is asked what it serves (``endpoint`` overrides)."""
    inputs = load_inputs(manifest_path, use_cache=use_cache, progress=progress, offline=offline)
    resolution = resolve(inputs, allow, carried)
    if resolution.blocking:
        first = resolution.blocking[0]
        more = f" (and {len(resolution.blocking) - 1} more)" if len(resolution.blocking) > 1 else ""
        raise RuleViolation(
            f"rule {first.rule}: {first.title}{more}",
            hint=f"{first.fix} — or accept it with --allow {first.rule} --reason TEXT",
        )
    return pin_served(resolution.lock, endpoint)


def pin_served(lock: Lock, endpoint: str | None) -> Lock:
    """Pin what a served engine says about itself: its build (it must be the locked one), model and defaults."""
    engine = lock.engine
    if not is_served(engine.name):
        if endpoint is not None:
            raise UsageError(
                f"--endpoint is for served engines; {engine.name} runs in process",
                hint="drop --endpoint, or set engine.name to a served engine (llama-server...)",
            )
        return lock
    url = endpoint or engine.endpoint
    served = open_served(engine.name, url, engine.api_key_env)
    version = served.identity().version
    if version != engine.version:
        raise EngineError(
            f"engine.version: the {engine.name} at {url} runs {version}, not '{engine.requirement}'",
            hint="point --endpoint at a server of that build, or change engine.version in llmstack.toml",
        )
    return lock.model_copy(update={"engine": engine.model_copy(update={"served": served_pin(served)})})


def merge_goldens(new: Lock, previous: Lock | None) -> Lock:
    """Keep recorded goldens across a re-lock when every pin is unchanged; they no longer apply otherwise."""
    if previous is None or previous.behaviour() != new.behaviour():
        return new
    return new.model_copy(update={"smoke": previous.smoke, "recording": previous.recording})
