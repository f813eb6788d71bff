"""Reporting: a :class:`~stacklock.explore.bisect.BisectReport` as text, JSON or markdown (pure)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stacklock.explore.bisect import BisectReport, Difference

__all__ = ["FORMATS", "render"]

FORMATS = ("text", "json", "markdown")


def render(report: BisectReport, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False)
    if fmt == "markdown":
        return render_markdown(report)
    return render_text(report)


def verdict_line(report: BisectReport) -> str:
    """The answer, in one line."""
    if not report.links:
        return "the locks pin the same links: nothing to bisect"
    names = ", ".join(report.culprit)
    if report.verdict == "culprit":
        return f"culprit: {names}"
    if report.verdict == "interaction":
        return f"interaction: {names} change the outcome only together (no one of them does alone)"
    if report.verdict == "unswappable":
        return (
            f"suspect: {names} (not swappable here); swapping every other link leaves the outcome unchanged"
        )
    return "no link changes the outcome: BAD produces what GOOD produces"


def difference_line(difference: Difference) -> str:
    where = f" at {difference.position}" if difference.position is not None else ""
    return (
        f"smoke '{difference.prompt}': first differs at the {difference.stage} stage{where}: "
        f"GOOD {difference.good!r}, changed {difference.other!r}"
    )


def render_text(report: BisectReport) -> str:
    lines = [f"bisect {report.good} → {report.bad}"]
    if report.links:
        lines.append(f"{len(report.links)} differing link(s):")
        for link in report.links:
            note = f"  [{link.reason}]" if link.reason else ""
            lines.append(f"  {link.name}: {link.good} → {link.bad}{note}")
    lines.append(verdict_line(report))
    if report.difference is not None:
        lines.append("  " + difference_line(report.difference))
        if report.difference.good_text is not None:
            lines.append(f"  GOOD output:    {report.difference.good_text!r}")
            lines.append(f"  changed output: {report.difference.other_text!r}")
    if report.trials:
        lines.append(f"{len(report.trials)} stack(s) judged, {report.engine_runs} engine run(s):")
        for trial in report.trials:
            result = "changed" if trial.changed else "same"
            stage = f" ({trial.difference.stage})" if trial.difference else ""
            how = "engine" if trial.engine_run else "render"
            lines.append(f"  {' + '.join(trial.links)}: {result}{stage} [{how}]")
    return "\n".join(lines)


def render_markdown(report: BisectReport) -> str:
    lines = [f"### stacklock bisect: {verdict_line(report)}", ""]
    if report.links:
        lines += ["| link | GOOD | BAD | |", "|---|---|---|---|"]
        for link in report.links:
            mark = "**culprit**" if link.name in report.culprit else (link.reason or "")
            lines.append(f"| `{link.name}` | `{link.good}` | `{link.bad}` | {mark} |")
        lines.append("")
    if report.difference is not None:
        lines += [difference_line(report.difference), ""]
    lines.append(f"{len(report.trials)} stack(s) judged, {report.engine_runs} engine run(s).")
    return "\n".join(lines)
