"""`stacklock matrix run SPEC` and `stacklock matrix merge SHARD...`: one stack under every combination of a
few links' choices, with a report of which link changes the output how often."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from stacklock.errors import UsageError

matrix_app = typer.Typer(
    help="Run a stack under every combination of templates, backend options and sampler values.",
    no_args_is_help=True,
)

FormatOption = Annotated[str, typer.Option("--format", help="text, json, markdown or html.")]
OutputOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write the report here (atomically).")
]


def _emit(report_text: str, output: Path | None) -> None:
    from stacklock.files.atomic import write_text_atomic  # noqa: PLC0415

    if output is None:
        typer.echo(report_text)
    else:
        write_text_atomic(output, report_text + "\n")
        typer.echo(f"wrote {output}", err=True)


def _shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)/(\d+)", value)
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise UsageError(f"--shard {value!r} is not I/N with 1 <= I <= N", hint="e.g. --shard 1/4")
    return int(match[1]), int(match[2])


def _check_format(fmt: str) -> None:
    from stacklock.report.matrix import FORMATS  # noqa: PLC0415

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")


@matrix_app.command("run")
def run(
    spec: Annotated[Path, typer.Argument(help="The matrix TOML file.")],
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, help="Engine/backend combinations run at once.")
    ] = 1,
    shard: Annotated[
        str | None, typer.Option("--shard", help="Run only shard I of N (I/N); merge them later.")
    ] = None,
    results: Annotated[
        Path | None,
        typer.Option("--results", help="Write the cells' results (JSON) here, for `matrix merge`."),
    ] = None,
    cache: Annotated[
        Path | None, typer.Option("--cache", help="The cell cache (default .stacklock/matrix).")
    ] = None,
    fmt: FormatOption = "text",
    output: OutputOption = None,
) -> None:
    """Run every cell (cached cells are not run again) and report each against the reference cell."""
    from stacklock.explore.matrix import build_report, run_matrix  # noqa: PLC0415
    from stacklock.files.atomic import write_text_atomic  # noqa: PLC0415
    from stacklock.report.matrix import render  # noqa: PLC0415

    _check_format(fmt)
    part = _shard(shard)
    done = run_matrix(
        spec, jobs=jobs, shard=part, cache_dir=cache, progress=lambda t: typer.echo(t, err=True)
    )
    if results is not None:
        write_text_atomic(results, done.model_dump_json(by_alias=True, indent=1) + "\n")
        typer.echo(f"wrote {results}: {len(done.results)} of {done.cell_count} cells", err=True)
    if part is not None:
        return
    _emit(render(build_report(done), fmt), output)


@matrix_app.command("merge")
def merge(
    shards: Annotated[list[Path], typer.Argument(help="The --results files of every shard.")],
    fmt: FormatOption = "text",
    output: OutputOption = None,
) -> None:
    """Merge the shards of one matrix and report it as a single run would."""
    from stacklock.explore.matrix import MatrixRun, build_report, merge_runs  # noqa: PLC0415
    from stacklock.report.matrix import render  # noqa: PLC0415

    _check_format(fmt)
    runs = []
    for path in shards:
        try:
            runs.append(MatrixRun.model_validate_json(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise UsageError(f"shard results not found: {path}") from None
        except ValueError as exc:
            raise UsageError(f"{path}: not matrix results: {str(exc).splitlines()[0]}") from None
    _emit(render(build_report(merge_runs(runs)), fmt), output)
