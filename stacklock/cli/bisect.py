"""`stacklock bisect GOOD.lock BAD.lock`: which link changed the output (exit 0 none, 1 found)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stacklock.errors import ExitCode


def bisect(
    good: Annotated[Path, typer.Argument(help="The lock of the stack that behaved.")],
    bad: Annotated[Path, typer.Argument(help="The lock of the stack that does not.")],
    fmt: Annotated[str, typer.Option("--format", help="text, json or markdown.")] = "text",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Alternatives observed per token.")] = 5,
) -> None:
    """Find the smallest set of links whose change from GOOD to BAD changes the output; exit 1 when one does."""
    from stacklock.errors import UsageError  # noqa: PLC0415
    from stacklock.explore.bisect import run_bisect  # noqa: PLC0415
    from stacklock.report.bisect import FORMATS, render  # noqa: PLC0415

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    report = run_bisect(good, bad, top_k=top_k, progress=lambda text: typer.echo(text, err=True))
    typer.echo(render(report, fmt))
    if report.verdict != "no-change" and report.links:
        raise typer.Exit(int(ExitCode.STACK_WRONG))
