"""`stacklock lock`: load the inputs, resolve them, and refuse on error findings."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from stacklock.engines.served import UNVERIFIED, served_engine, served_pin
from stacklock.errors import ManifestError, RuleViolation
from stacklock.lock.load import load_inputs
from stacklock.lock.resolve import resolve
from stacklock.model.findings import Allowance
from stacklock.model.lock import Lock
from stacklock.model.manifest import Manifest
from stacklock.reporter import NO_REPORTER, Reporter


def lock_stack(
    manifest_path: Path,
    *,
    allow: Sequence[Allowance] = (),
    carried: Sequence[Allowance] = (),
    use_cache: bool = True,
    reporter: Reporter = NO_REPORTER,
    offline: bool = False,
    revisions: Mapping[str, str] | None = None,
    endpoint: str | None = None,
) -> Lock:
    """Lock the stack; ``revisions`` keeps hub links at commits locked before (see :func:`kept_revisions`).

    A served engine is asked what it serves, at ``endpoint`` (``--endpoint``) or the manifest's.
    """
    inputs = load_inputs(
        manifest_path, use_cache=use_cache, reporter=reporter, offline=offline, revisions=revisions
    )
    spec = inputs.manifest.engine
    served = served_engine(spec.name, spec.endpoint, spec.api_key_env, override=endpoint, model=spec.model)
    if served is not None:
        # The server's own build or version is what the stack runs; resolution checks it against the manifest.
        version = served.identity().version
        if version == UNVERIFIED:
            # No request tells the version: the manifest must pin one, which the lock keeps, unverified.
            if not spec.version.strip().startswith("=="):
                raise ManifestError(
                    f"engine.version: {spec.name} servers do not report their version, so "
                    f"'{spec.version or '(any)'}' cannot be checked",
                    hint="pin the version the server runs exactly (e.g. version = '==0.3.31'); "
                    "it is locked as unverified",
                )
            reporter.event(
                f"note: {spec.name} does not report its version; {spec.version} is locked unverified"
            )
        else:
            inputs = replace(inputs, installed_engine_version=version)
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
    lock = resolution.lock
    if served is None:
        return lock
    # What the server says about itself (its build, loaded model and defaults) is pinned beside the manifest's.
    pin = served_pin(served)
    served_sha256 = pin.model.get("sha256")
    if served_sha256 is not None and served_sha256 != lock.model.sha256:
        # A server that names its model file's hash (Ollama) serves another file than the one locked: the
        # template and tokenizer locked from the manifest's file would not be the server's.
        raise ManifestError(
            f"model.source: {lock.model.path} has sha256 {lock.model.sha256}, but the {spec.name} server's "
            f"model{f' {spec.model!r}' if spec.model else ''} is the file with sha256 {served_sha256}",
            hint="point model.source at the file the server serves, or the server (engine.model) at this one",
        )
    return lock.model_copy(update={"engine": lock.engine.model_copy(update={"served": pin})})


def merge_goldens(new: Lock, previous: Lock | None) -> Lock:
    """Keep recorded goldens across a re-lock when every pin is unchanged; they no longer apply otherwise."""
    if previous is None or previous.behaviour() != new.behaviour():
        return new
    return new.model_copy(update={"smoke": previous.smoke, "recording": previous.recording})


#: The links whose hub sources resolve branches and tags to commits.
HUB_LINKS = ("model", "template", "tokenizer")


def locked_revisions(lock: Lock) -> dict[str, str]:
    """The commit each hub link of a lock was resolved to, with the source it was resolved from."""
    found = {}
    if lock.model.revision:
        found["model"] = lock.model.revision
    if lock.template.source.startswith("hf://") and lock.template.revision:
        found["template"] = lock.template.revision
    if lock.upstream_tokenizer is not None:
        found["tokenizer"] = lock.upstream_tokenizer.revision
    return found


def kept_revisions(manifest: Manifest, previous: Lock | None, upgrade: Collection[str]) -> dict[str, str]:
    """The commits a re-lock keeps: the locked ones, except for links being upgraded or whose source changed.

    Like ``uv lock``: a branch or tag is resolved once and stays pinned until ``lock --upgrade`` re-resolves it.
    """
    if previous is None:
        return {}
    sources = {
        "model": (manifest.model.source, previous.model.source),
        "template": (manifest.template.source, previous.template.source),
        "tokenizer": (
            manifest.tokenizer.source,
            previous.upstream_tokenizer.source if previous.upstream_tokenizer else None,
        ),
    }
    return {
        link: commit
        for link, commit in locked_revisions(previous).items()
        if link not in upgrade and sources[link][0] == sources[link][1]
    }
