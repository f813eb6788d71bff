"""Reporting: a :class:`~stacklock.verify.compare.VerifyReport` as text, JSON, JUnit XML or Markdown.

Pure: every ``render_*`` function returns a string and never prints or writes.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING
from xml.etree import ElementTree as ET

from stacklock.verify.compare import is_certified

if TYPE_CHECKING:
    from stacklock.verify.compare import SmokeResult, StageResult, VerifyReport

__all__ = ["FORMATS", "render", "render_json", "render_junit", "render_markdown", "render_text"]

FORMATS = ("text", "json", "junit", "markdown")

_MARKS = {"pass": "ok", "fail": "FAIL", "skip": "skip", "tolerated": "tolerated", "not-checked": "-"}


def _stage_line(stage: StageResult, *, with_diff: bool = True) -> str:
    line = f"    {stage.stage:<13}{_MARKS[stage.status]:<10}{stage.detail}"
    if stage.diff and with_diff:
        line += "\n" + "\n".join(f"        {diff_line}" for diff_line in stage.diff.splitlines())
    return line


def _verdict(report: VerifyReport) -> str:
    failed = sum(1 for result in report.results if result.first_failure is not None)
    total = len(report.results)
    if not report.reproduced and failed:
        return f"not reproduced: {failed} of {total} smoke prompt(s) failed"
    if not report.reproduced:
        unchecked = sum(1 for result in report.results if not is_certified(result))
        return (
            f"not certified: {unchecked} of {total} smoke prompt(s) have no golden to compare with; "
            "run `stacklock record` and commit the lock"
        )
    if report.not_checked:
        # Never "every stage": the stages the engine hides are named in the verdict itself.
        stages = ", ".join(item.split(":", 1)[0] for item in report.not_checked)
        within = " within the tolerance" if report.tolerated else ""
        return (
            f"reproduced{within} on the stages this engine lets stacklock observe: {total} smoke prompt(s); "
            f"not checked: {stages}"
        )
    if report.tolerated:
        margin = report.tolerance.margin if report.tolerance else "?"
        return f"reproduced within the tolerance (margin {margin}): {total} smoke prompt(s)"
    return f"reproduced: {total} smoke prompt(s), every stage identical to the recording"


def _result_lines(result: SmokeResult, *, with_diff: bool = True) -> list[str]:
    if result.first_failure is not None:
        head = f"{result.name}: FAILED at {result.first_failure}"
    elif not is_certified(result):
        head = f"{result.name}: not certified"
    elif result.tolerated:
        head = f"{result.name}: reproduced within the tolerance"
    else:
        head = f"{result.name}: reproduced"
    lines = [head, *(_stage_line(stage, with_diff=with_diff) for stage in result.stages)]
    if result.first_failure is None and not is_certified(result):
        lines.append(f"    → {result.explanation}")
    if result.first_failure is not None:
        lines.append(f"    → {result.explanation}")
        failure = next(stage for stage in result.stages if stage.status == "fail")
        if failure.candidates:
            alternatives = ", ".join(f"{c.token} {c.piece!r} ({c.logprob:.4f})" for c in failure.candidates)
            lines.append(f"    → alternatives now: {alternatives}")
    return lines


def render_text(report: VerifyReport) -> str:
    """Every stage of every smoke prompt, the first failure named and explained, then a verdict."""
    lines: list[str] = []
    if report.engine is not None:
        engine = report.engine
        build = f", build {engine.build}" if engine.build else ""
        lines.append(f"engine: {engine.name} {engine.version}{build} on {engine.backend} ({engine.cpu})")
    lines.extend(f"note: {note}" for note in report.notes)
    if lines:
        lines.append("")
    for result in report.results:
        # A changed model file is the same for every smoke prompt: its template diff is shown once.
        lines.extend(_result_lines(result, with_diff=result is report.results[0]))
        lines.append("")
    lines.append(_verdict(report))
    return "\n".join(lines) + "\n"


def render_json(report: VerifyReport) -> str:
    """The report as JSON with the models' kebab-case keys; stable key order, one trailing newline."""
    return json.dumps(report.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False) + "\n"


def render_junit(report: VerifyReport, *, suite: str = "stacklock verify") -> str:
    """JUnit XML for CI: one test case per stage of each smoke prompt (class name: the smoke prompt)."""
    cases = [(result, stage) for result in report.results for stage in result.stages]
    root = ET.Element(
        "testsuites",
        name=suite,
        tests=str(len(cases)),
        failures=str(sum(1 for _, stage in cases if stage.status == "fail")),
    )
    testsuite = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(cases)),
        failures=str(sum(1 for _, stage in cases if stage.status == "fail")),
        errors="0",
        skipped=str(sum(1 for _, stage in cases if stage.status in {"skip", "not-checked"})),
    )
    if report.engine is not None or report.notes:
        properties = ET.SubElement(testsuite, "properties")
        if report.engine is not None:
            for key, value in report.engine.model_dump(by_alias=True).items():
                text = ", ".join(value) if isinstance(value, tuple) else str(value)
                ET.SubElement(properties, "property", name=f"engine.{key}", value=text)
        for index, note in enumerate(report.notes):
            ET.SubElement(properties, "property", name=f"note.{index}", value=note)
    for result, stage in cases:
        case = ET.SubElement(testsuite, "testcase", classname=result.name, name=stage.stage)
        if stage.status == "fail":
            failure = ET.SubElement(case, "failure", message=stage.detail, type=f"stacklock.{stage.stage}")
            failure.text = result.explanation if result.first_failure == stage.stage else stage.detail
        elif stage.status in {"skip", "not-checked"}:
            ET.SubElement(case, "skipped", message=stage.detail)
        elif stage.status == "tolerated":
            ET.SubElement(case, "system-out").text = f"tolerated: {stage.detail}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _markdown_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def render_markdown(report: VerifyReport, *, title: str = "stacklock verify") -> str:
    """A Markdown summary for CI step summaries and pull-request comments: the verdict, then one row per prompt."""
    icon = "✅" if report.reproduced else "❌"
    lines = [f"### {icon} {title}", "", _verdict(report), ""]
    if report.engine is not None:
        engine = report.engine
        build = f", build `{engine.build}`" if engine.build else ""
        lines += [f"Engine: `{engine.name}` {engine.version}{build} on {engine.backend} ({engine.cpu})", ""]
    lines += ["| smoke prompt | result | stage | detail |", "|---|---|---|---|"]
    for result in report.results:
        row: tuple[str, str, str]
        if result.first_failure is not None:
            stage = next(s for s in result.stages if s.status == "fail")
            row = ("❌ failed", stage.stage, f"{stage.detail}. {result.explanation}")
        elif not is_certified(result):
            row = ("⚠️ not certified", "", result.explanation)
        elif result.tolerated:
            stage = next(s for s in result.stages if s.status == "tolerated")
            row = ("✅ within tolerance", stage.stage, stage.detail)
        elif result.explanation != "reproduced":
            row = ("✅ reproduced", "", result.explanation)
        else:
            row = ("✅ reproduced", "", "every stage identical to the recording")
        cells = [f"`{result.name}`", *row]
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    lines.extend(f"\n> {_markdown_cell(note)}" for note in report.notes)
    return "\n".join(lines) + "\n"


def render(report: VerifyReport, fmt: str) -> str:
    """The report in one of :data:`FORMATS`."""
    if fmt == "json":
        return render_json(report)
    if fmt == "junit":
        return render_junit(report)
    if fmt == "text":
        return render_text(report)
    if fmt == "markdown":
        return render_markdown(report)
    raise ValueError(f"unknown report format {fmt!r}; use one of {', '.join(FORMATS)}")
