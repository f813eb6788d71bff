"""The command line: a thin typer layer that parses arguments, calls the library, renders and exits.

User mistakes are :class:`~stacklock.errors.StacklockError`: printed as one ``error:`` line with the exit code
from the table in :mod:`stacklock.errors`. Anything else is a bug and keeps its traceback. Heavy modules are
imported inside the commands so that ``stacklock inspect`` starts fast.
"""

from __future__ import annotations

import enum
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from stacklock.errors import ExitCode, StacklockError, UsageError

# Plain click help and error formatting: typer's rich formatter costs more to import than the rest of a
# `--help` run, and the plain layout reads as well in a terminal, a CI log or a pre-commit hook.
app = typer.Typer(
    name="stacklock",
    help="Lock and certify local LLM stacks: model file, chat template, tokenizer, engine, backend, sampler.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ManifestOption = Annotated[
    Path, typer.Option("--manifest", "-m", help="The manifest; the lock sits beside it.", show_default=True)
]
DEFAULT_MANIFEST = Path("llmstack.toml")


@app.callback()
def _options(
    allow_outside_paths: Annotated[
        bool,
        typer.Option(
            "--allow-outside-paths",
            help="Let the manifest name local files outside its directory (never set from the manifest).",
        ),
    ] = False,
) -> None:
    if allow_outside_paths:
        from stacklock.sources.local import ALLOW_ENV  # noqa: PLC0415

        # The environment carries the choice to every reader, the engine's child process included.
        os.environ[ALLOW_ENV] = os.pathsep.join(filter(None, [os.environ.get(ALLOW_ENV), "/"]))


def _lock_path(manifest: Path) -> Path:
    return manifest.with_name("llmstack.lock")


def _echo(text: str) -> None:
    typer.echo(text)


def _note(text: str) -> None:
    typer.echo(text, err=True)


@app.command()
def init(
    gguf: Annotated[Path | None, typer.Argument(help="A GGUF model file to start from.")] = None,
    manifest: ManifestOption = DEFAULT_MANIFEST,
    from_stack: Annotated[
        str | None, typer.Option("--from", help="Start from a known-good stack of the registry.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing manifest.")] = False,
    registry: Annotated[
        list[str] | None, typer.Option("--registry", help="Another registry to find --from stacks in.")
    ] = None,
) -> None:
    """Write a starter llmstack.toml from a GGUF file (or a registry stack)."""
    from stacklock.cli.init import starter_manifest  # noqa: PLC0415
    from stacklock.files.atomic import write_text_atomic  # noqa: PLC0415

    if manifest.exists() and not force:
        raise UsageError(f"{manifest} already exists", hint="pass --force to overwrite it")
    if (gguf is None) == (from_stack is None):
        raise UsageError(
            "give a GGUF file or --from STACK (one of them)", hint="e.g. stacklock init model.gguf"
        )
    if from_stack is not None:
        from stacklock.registry.share import init_from_stack  # noqa: PLC0415

        written, notes = init_from_stack(
            from_stack, manifest.parent, registries=tuple(registry or ()), force=force
        )
        for note in notes:
            _note(f"note: {note}")
        _note(f"wrote {', '.join(str(p) for p in written)} from stack '{from_stack}'")
        return
    assert gguf is not None
    text, notes = starter_manifest(gguf, manifest.parent)
    write_text_atomic(manifest, text)
    for note in notes:
        _note(f"note: {note}")
    _note(f"wrote {manifest}; next: stacklock lock")


EndpointOption = Annotated[
    str | None,
    typer.Option(
        "--endpoint", help="A served engine's URL, e.g. http://127.0.0.1:8080 (overrides engine.endpoint)."
    ),
]


@app.command()
def lock(
    manifest: ManifestOption = DEFAULT_MANIFEST,
    check: Annotated[
        bool, typer.Option("--check", help="Only check that the lock is present and fresh.")
    ] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Re-hash model files, ignoring the cache.")
    ] = False,
    allow: Annotated[
        list[str] | None, typer.Option("--allow", help="Accept an error finding by rule id (with --reason).")
    ] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why the allowed findings are accepted.")
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Use only cached registries and models.")
    ] = False,
    upgrade: Annotated[
        bool,
        typer.Option(
            "--upgrade", help="Re-resolve hub branches and tags instead of keeping the locked commits."
        ),
    ] = False,
    upgrade_link: Annotated[
        list[str] | None,
        typer.Option(
            "--upgrade-link", help="Re-resolve one link only: model, template or tokenizer (repeatable)."
        ),
    ] = None,
    endpoint: EndpointOption = None,
) -> None:
    """Resolve llmstack.toml into llmstack.lock (or, with --check, fail when the lock is stale)."""
    from stacklock.cli.progress import cli_reporter  # noqa: PLC0415
    from stacklock.lock.fresh import check_lock, moved_revisions  # noqa: PLC0415
    from stacklock.lock.project import (  # noqa: PLC0415
        project_lock,
    )

    lock_path = _lock_path(manifest)
    if check:
        if allow:
            raise UsageError("--allow goes with `stacklock lock`, not with --check")
        with cli_reporter() as reporter:
            locked = check_lock(manifest, lock_path, offline=offline, reporter=reporter)
        _note(f"{lock_path} is fresh ({len(locked.findings)} finding(s) recorded)")
        for moved in moved_revisions(locked, offline=offline):
            _note(f"info: {moved}")
        return
    if allow and not reason:
        raise UsageError(
            "--allow needs --reason TEXT", hint="say why the finding is acceptable; it goes in the lock"
        )
    with project_lock(lock_path):
        _lock_once(
            manifest,
            lock_path,
            allow or [],
            reason,
            no_cache=no_cache,
            offline=offline,
            upgrade=upgrade,
            upgrade_link=upgrade_link or [],
            endpoint=endpoint,
        )


def _lock_once(
    manifest: Path,
    lock_path: Path,
    allow: list[str],
    reason: str | None,
    *,
    no_cache: bool,
    offline: bool,
    upgrade: bool,
    upgrade_link: list[str],
    endpoint: str | None,
) -> None:
    from stacklock.cli.progress import cli_reporter  # noqa: PLC0415
    from stacklock.errors import LockError, NewerLockError  # noqa: PLC0415
    from stacklock.lock.api import HUB_LINKS, kept_revisions, lock_stack, merge_goldens  # noqa: PLC0415
    from stacklock.lock.project import read_lock, read_manifest, write_lock  # noqa: PLC0415
    from stacklock.model.findings import Allowance  # noqa: PLC0415

    previous = None
    if lock_path.exists():
        try:
            previous = read_lock(lock_path)
        except NewerLockError:
            raise
        except LockError as exc:
            # The new lock replaces it either way; only its goldens and allowances cannot be carried over.
            _note(f"note: the previous lock is unreadable ({exc.one_line()}); writing a fresh one")
    unknown = sorted(set(upgrade_link or ()) - set(HUB_LINKS))
    if unknown:
        raise UsageError(
            f"--upgrade-link {unknown[0]}: not a hub link", hint=f"use one of {', '.join(HUB_LINKS)}"
        )
    upgrading = set(HUB_LINKS) if upgrade else set(upgrade_link or ())
    given = tuple(Allowance(rule=r, reason=reason or "") for r in allow or ())
    with cli_reporter() as reporter:
        new = lock_stack(
            manifest,
            allow=given,
            carried=previous.allowances if previous else (),
            use_cache=not no_cache,
            reporter=reporter,
            offline=offline,
            revisions=kept_revisions(read_manifest(manifest)[0], previous, upgrading),
            endpoint=endpoint,
        )
    new = merge_goldens(new, previous)
    changed = write_lock(lock_path, new)
    accepted = {a.rule for a in new.allowances}
    for finding in new.findings:
        allowed = " (allowed)" if finding.rule in accepted else ""
        _note(f"{finding.severity.value}: {finding.rule}: {finding.title}{allowed}")
    kept_goldens = previous is not None and any(s.golden for s in previous.smoke)
    if kept_goldens and not any(s.golden for s in new.smoke):
        _note("note: the stack changed, so the recorded goldens were dropped; run `stacklock record`")
    _note(f"{'wrote' if changed else 'unchanged:'} {lock_path}")


@app.command()
def inspect(
    gguf: Annotated[Path, typer.Argument(help="A GGUF model file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a GGUF file's metadata, chat template and tokenizer summary."""
    from stacklock.cli.inspect import inspect_gguf, render_inspection  # noqa: PLC0415

    report = inspect_gguf(gguf)
    if as_json:
        _echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        _echo(render_inspection(report))


@app.command()
def record(
    manifest: ManifestOption = DEFAULT_MANIFEST,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=50, help="Alternatives stored per token.")] = 5,
    offline: Annotated[
        bool, typer.Option("--offline", help="Use only the hub cache; download nothing.")
    ] = False,
    endpoint: EndpointOption = None,
) -> None:
    """Run every smoke prompt on the locked stack and store the goldens in llmstack.lock."""
    from stacklock.cli.progress import cli_reporter  # noqa: PLC0415
    from stacklock.verify.compare import expectation_failure  # noqa: PLC0415
    from stacklock.verify.session import record as record_goldens  # noqa: PLC0415

    lock_path = _lock_path(manifest)
    with cli_reporter() as reporter:
        recorded = record_goldens(
            lock_path, top_k=top_k, reporter=reporter, offline=offline, endpoint=endpoint
        )
    for pin in recorded.smoke:
        assert pin.golden is not None
        _note(f"recorded {pin.name}: {len(pin.golden.tokens)} token(s), {pin.golden.text!r}")
        failure = expectation_failure(pin.expect, pin.golden.text)
        if failure is not None:
            # The golden is what the stack does; an expectation it misses will fail every verify.
            _note(f"warning: smoke '{pin.name}': {failure}; fix the prompt or the expectation and re-record")
    _note(f"wrote goldens to {lock_path}; commit it, then run `stacklock verify` in CI")


class VerifyFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"
    JUNIT = "junit"
    MARKDOWN = "markdown"


@app.command()
def verify(
    manifest: ManifestOption = DEFAULT_MANIFEST,
    fmt: Annotated[VerifyFormat, typer.Option("--format", help="Output format.")] = VerifyFormat.TEXT,
    certificate: Annotated[
        Path | None, typer.Option("--certificate", help="Write a JSON certificate of the run here.")
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance",
            min=0.0,
            help="Accept a divergence at a near-tie: the golden token is in the top-k and within this logprob gap.",
        ),
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Use only the hub cache; download nothing.")
    ] = False,
    endpoint: EndpointOption = None,
    summary: Annotated[
        Path | None,
        typer.Option(
            "--summary",
            help="Also append a Markdown summary to this file (in GitHub Actions: $GITHUB_STEP_SUMMARY).",
        ),
    ] = None,
) -> None:
    """Re-run the smoke prompts and certify that the locked stack reproduces; name the stage that broke."""
    from stacklock.cli.progress import cli_reporter  # noqa: PLC0415
    from stacklock.files.atomic import file_error, read_text, write_text_atomic  # noqa: PLC0415
    from stacklock.report.verify import render  # noqa: PLC0415
    from stacklock.verify.certificate import certificate as make_certificate  # noqa: PLC0415
    from stacklock.verify.certificate import render_certificate  # noqa: PLC0415
    from stacklock.verify.compare import Tolerance  # noqa: PLC0415
    from stacklock.verify.session import verify as verify_stack  # noqa: PLC0415

    if tolerance is not None and tolerance <= 0:
        raise UsageError("--tolerance must be greater than 0", hint="e.g. --tolerance 0.5")
    if certificate is not None:
        # Fail before the engine runs, not after, when the certificate cannot be written.
        try:
            certificate.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise file_error("create", certificate.parent, exc) from None
        if certificate.is_dir():
            raise UsageError(f"--certificate {certificate}: is a directory", hint="give the path of a file")
    lock_path = _lock_path(manifest)
    with cli_reporter() as reporter:
        margin = None if tolerance is None else Tolerance(margin=tolerance)
        report = verify_stack(
            lock_path, tolerance=margin, reporter=reporter, offline=offline, endpoint=endpoint
        )
    _echo(render(report, fmt.value).rstrip("\n"))
    if summary is not None:
        from stacklock.report.verify import render_markdown  # noqa: PLC0415

        # A step summary is appended to, as GitHub Actions expects: several steps may write to one file.
        try:
            with summary.open("a", encoding="utf-8") as handle:
                handle.write(render_markdown(report))
        except OSError as exc:
            raise UsageError(
                f"--summary {summary}: cannot append to it ({exc.strerror or exc})",
                hint="give a writable file path",
            ) from None
    if certificate is not None:
        from stacklock.lock.project import read_lock  # noqa: PLC0415

        lock_text = read_text(lock_path)
        data = make_certificate(lock_text, read_lock(lock_path), report)
        write_text_atomic(certificate, render_certificate(data))
        _note(f"wrote {certificate}")
    if not report.reproduced:
        raise typer.Exit(int(ExitCode.STACK_WRONG))


@app.command()
def share(
    registry_dir: Annotated[Path, typer.Argument(help="A registry checkout to add the stack to.")],
    certificate: Annotated[
        Path, typer.Option("--certificate", help="The certificate from `stacklock verify --certificate`.")
    ],
    manifest: ManifestOption = DEFAULT_MANIFEST,
    name: Annotated[
        str | None, typer.Option("--name", help="The entry's name (default: the stack's).")
    ] = None,
    title: Annotated[str | None, typer.Option("--title", help="One line for `registry list`.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="A search tag (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing entry.")] = False,
) -> None:
    """Export this stack, its lock and its certificate as a registry entry, ready for a pull request."""
    from stacklock.registry.share import share_stack  # noqa: PLC0415

    target = share_stack(
        manifest, certificate, registry_dir, name=name, title=title, tags=tuple(tag or ()), overwrite=force
    )
    _note(f"wrote {target}; commit it to the registry repository and open a pull request")


class CheckFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"
    SARIF = "sarif"


@app.command()
def check(
    manifest: ManifestOption = DEFAULT_MANIFEST,
    fmt: Annotated[CheckFormat, typer.Option("--format", help="Output format.")] = CheckFormat.TEXT,
    offline: Annotated[bool, typer.Option("--offline", help="Use only cached registries.")] = False,
) -> None:
    """Evaluate the lock (or a refused manifest) against the registries' rules and the template probes.

    No model runs.
    """
    from stacklock.cli.check import run_check  # noqa: PLC0415

    output = run_check(manifest, _lock_path(manifest), fmt.value, offline=offline)
    _echo(output.text)
    if not output.ok:
        raise typer.Exit(int(ExitCode.STACK_WRONG))


class DiffFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


@app.command()
def diff(
    old: Annotated[Path, typer.Argument(help="The first lock.")],
    new: Annotated[Path, typer.Argument(help="The second lock.")],
    fmt: Annotated[DiffFormat, typer.Option("--format", help="Output format.")] = DiffFormat.TEXT,
) -> None:
    """Show what differs between two locks, link by link; exit 1 when they differ (like diff)."""
    from stacklock.cli.diff import diff_lock_files  # noqa: PLC0415
    from stacklock.report.diff import render  # noqa: PLC0415

    result = diff_lock_files(old, new)
    _echo(render(result, fmt.value))
    if not result.identical:
        raise typer.Exit(int(ExitCode.STACK_WRONG))


from stacklock.cli.bisect import bisect as _bisect  # noqa: E402 - registered beside the other commands.

app.command(name="bisect")(_bisect)
from stacklock.cli.matrix import matrix_app  # noqa: E402 - registered beside the other commands.

app.add_typer(matrix_app, name="matrix")


registry_app = typer.Typer(
    help="Browse the registries: rules, known-good templates and stacks.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(registry_app, name="registry")

KindOption = Annotated[str | None, typer.Option("--kind", help="Only rules, templates or stacks.")]


def _registries(manifest: Path, offline: bool, extra: list[str] | None = None) -> tuple[Any, ...]:
    from stacklock.cli.progress import cli_reporter  # noqa: PLC0415
    from stacklock.lock.project import read_lock, read_manifest  # noqa: PLC0415
    from stacklock.model.findings import RegistrySource  # noqa: PLC0415
    from stacklock.registry.fetch import resolve_registries  # noqa: PLC0415

    sources = list(read_manifest(manifest)[0].registries) if manifest.exists() else []
    given = [RegistrySource(name=f"extra-{i}", url=url) for i, url in enumerate(extra or (), start=1)]
    lock_path = _lock_path(manifest)
    pins = read_lock(lock_path).registries if lock_path.exists() else ()
    with cli_reporter() as reporter:
        found = resolve_registries(
            sources, pins=pins, offline=offline, base_dir=manifest.parent, reporter=reporter
        )
        # Registries given on the command line are the user's own choice: not confined to the project.
        return found + resolve_registries(
            given, pins=pins, offline=offline, include_bundled=False, reporter=reporter
        )


def _kind(kind: str | None) -> Any:
    kinds = {"rule": "rule", "rules": "rule", "template": "template", "templates": "template"}
    kinds |= {"stack": "stack", "stacks": "stack"}
    if kind is None:
        return None
    if kind not in kinds:
        raise UsageError(f"--kind {kind}: unknown kind", hint="use rule, template or stack")
    return kinds[kind]


def _print_entries(entries: Any) -> None:
    for e in entries:
        severity = f" [{e.severity.value}]" if e.severity else ""
        _echo(f"{e.kind:<8} {e.id:<48} {e.registry:<10} {e.title}{severity}")
    _note(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")


@registry_app.command("list")
def registry_list(
    kind: KindOption = None,
    manifest: ManifestOption = DEFAULT_MANIFEST,
    registry: Annotated[list[str] | None, typer.Option("--registry", help="Another registry URL.")] = None,
    offline: Annotated[bool, typer.Option("--offline")] = False,
) -> None:
    """List every rule, template and stack."""
    from stacklock.registry.query import list_entries  # noqa: PLC0415

    _print_entries(list_entries(_registries(manifest, offline, registry), _kind(kind)))


@registry_app.command("search")
def registry_search(
    query: Annotated[list[str], typer.Argument(help="Words that must all appear (any case).")],
    kind: KindOption = None,
    manifest: ManifestOption = DEFAULT_MANIFEST,
    registry: Annotated[list[str] | None, typer.Option("--registry", help="Another registry URL.")] = None,
    offline: Annotated[bool, typer.Option("--offline")] = False,
) -> None:
    """Find entries by id, title, text, references or the facts they test."""
    from stacklock.registry.query import search_entries  # noqa: PLC0415

    _print_entries(search_entries(_registries(manifest, offline, registry), " ".join(query), _kind(kind)))


@registry_app.command("show")
def registry_show(
    entry: Annotated[str, typer.Argument(help="A rule or template id, or a stack name.")],
    kind: KindOption = None,
    manifest: ManifestOption = DEFAULT_MANIFEST,
    registry: Annotated[list[str] | None, typer.Option("--registry", help="Another registry URL.")] = None,
    offline: Annotated[bool, typer.Option("--offline")] = False,
) -> None:
    """Print one entry as its registry holds it."""
    from stacklock.registry.query import show_entry  # noqa: PLC0415

    shown = show_entry(_registries(manifest, offline, registry), entry, _kind(kind))
    _note(f"{shown.kind} '{entry}' from registry '{shown.registry}'")
    _echo(shown.text.rstrip("\n"))


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning stacklock errors into one line and an exit code."""
    # Typer handles its own usage errors (exit 2, like ours); our errors pass through it untouched.
    try:
        app(args=argv, prog_name="stacklock")
    except StacklockError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        sys.exit(int(exc.exit_code))
