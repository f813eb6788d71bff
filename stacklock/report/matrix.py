"""Reporting: a :class:`~stacklock.explore.matrix.MatrixReport` as text, JSON, markdown or self-contained HTML.

Pure: the renderers return strings. The HTML needs no network: its style is inline and its charts are SVG
written here (a heat map of token agreement, cells by prompts, and a logprob-drift line per cell), so the report
opens from a CI artifact or an e-mail as it is.
"""

from __future__ import annotations

import difflib
import html
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from stacklock.explore.matrix import AxisValue, CellComparison, MatrixReport, PromptComparison

__all__ = ["FORMATS", "agreement_colour", "render"]

FORMATS = ("text", "json", "markdown", "html")


def render(report: MatrixReport, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False)
    if fmt == "markdown":
        return render_markdown(report)
    if fmt == "html":
        return render_html(report)
    return render_text(report)


def _value(value: AxisValue) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _label(cell: CellComparison) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in cell.cell.values.items())


def _rows(report: MatrixReport) -> tuple[list[str], list[list[str]]]:
    header = ["cell", *report.axes, "render", "changed", "agreement", "first div.", "max drift", "pass"]
    rows = [
        [
            "ref" if cell.cell.index == 0 else str(cell.cell.index),
            *(_value(cell.cell.values[a]) for a in report.axes),
            "same" if cell.rendered_equal else "differs",
            f"{cell.changed}/{len(report.prompts)}",
            f"{cell.token_agreement:.0%}",
            "-" if cell.first_divergence is None else str(cell.first_divergence),
            f"{cell.max_drift:.3f}",
            "-" if cell.pass_rate is None else f"{cell.pass_rate:.0%}",
        ]
        for cell in report.cells
    ]
    return header, rows


def _attribution_rows(report: MatrixReport) -> list[list[str]]:
    return [[s.axis, f"{s.changed}/{s.pairs}", f"{s.rate:.0%}"] for s in report.attribution]


def render_text(report: MatrixReport) -> str:
    header, rows = _rows(report)
    lines = [
        (
            f"matrix: {len(report.cells)} cells x {len(report.prompts)} prompts "
            f"({report.executed} run now, {len(report.cells) - report.executed} from cache); reference: cell 0"
        ),
        *_table(header, rows),
        "",
        "how often changing only one axis changes an output:",
        *_table(["axis", "changed", "rate"], _attribution_rows(report)),
    ]
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def render_markdown(report: MatrixReport) -> str:
    header, rows = _rows(report)
    lines = [
        f"### stacklock matrix: {len(report.cells)} cells x {len(report.prompts)} prompts",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "How often changing only one axis changes an output:",
        "",
        "| axis | changed | rate |",
        "|---|---|---|",
        *("| " + " | ".join(r) + " |" for r in _attribution_rows(report)),
    ]
    return "\n".join(lines)


# HTML ---------------------------------------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1b1f24;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
th{background:#f6f8fa}code,pre{font:12px ui-monospace,monospace}pre{background:#f6f8fa;padding:8px;overflow:auto}
.tok{display:inline-block;padding:0 2px;margin:1px;border-radius:3px;background:#eaeef2}
.tok.div{background:#ffb3b3;font-weight:bold}.tok.after{background:#ffe3e3}
details{margin:6px 0;border:1px solid #d0d7de;border-radius:6px;padding:4px 10px}summary{cursor:pointer}
.legend span{display:inline-block;width:14px;height:14px;vertical-align:middle;margin:0 4px}
"""


def agreement_colour(agreement: float) -> str:
    """Green for full token agreement through yellow to red for none (the heat map's scale)."""
    a = max(0.0, min(1.0, agreement))
    if a >= 0.5:
        red, green = round(255 * (1 - a) * 2), 170
    else:
        red, green = 220, round(170 * a * 2)
    return f"#{red:02x}{green:02x}40"


def render_html(report: MatrixReport) -> str:
    header, rows = _rows(report)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>stacklock matrix</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>stacklock matrix: {len(report.cells)} cells x {len(report.prompts)} prompts</h1>",
        (
            "<p>Cell 0 (the first value of every axis) is the reference. Colour: token agreement with the "
            "reference (green: the same tokens; red: different from the first token); a dot: the rendered prompt "
            "differs; grey: the prompt could not be rendered.</p>"
        ),
        _heat_map(report),
        "<p>Rows: " + html.escape(" · ".join(report.axes)) + "</p>",
        "<h2>How often changing only one axis changes an output</h2>",
        _html_table(["axis", "changed", "rate"], _attribution_rows(report)),
        "<h2>Cells</h2>",
        _html_table(header, rows),
        "<h2>Per cell</h2>",
        *(_cell_details(report, cell) for cell in report.cells if cell.cell.index != 0),
        "</body></html>",
    ]
    return "\n".join(parts)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_CELL_W, _CELL_H, _LEFT, _TOP = 90, 22, 360, 80


def _heat_map(report: MatrixReport) -> str:
    width = _LEFT + _CELL_W * len(report.prompts) + 80
    height = _TOP + _CELL_H * len(report.cells) + 10
    out = [
        (
            f"<svg id='heatmap' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}' role='img' aria-label='token agreement heat map'>"
        )
    ]
    for column, name in enumerate(report.prompts):
        x = _LEFT + column * _CELL_W + _CELL_W / 2
        out.append(
            f"<text x='{x}' y='{_TOP - 8}' font-size='12' text-anchor='start' "
            f"transform='rotate(-30 {x} {_TOP - 8})'>{html.escape(name)}</text>"
        )
    for row, cell in enumerate(report.cells):
        y = _TOP + row * _CELL_H
        # The axis names head the cells table; the heat map's rows name the values only, so they fit.
        values = " · ".join(_value(v) for v in cell.cell.values.values())
        label = ("ref: " if cell.cell.index == 0 else f"{cell.cell.index}: ") + values
        out.append(
            f"<text x='{_LEFT - 6}' y='{y + 15}' font-size='11' text-anchor='end'>"
            f"<title>{html.escape(_label(cell))}</title>{html.escape(label[:56])}</text>"
        )
        for column, prompt in enumerate(cell.prompts):
            x = _LEFT + column * _CELL_W
            colour = "#9aa0a6" if prompt.render_error else agreement_colour(prompt.token_agreement)
            title = html.escape(f"{prompt.prompt}: {prompt.token_agreement:.0%} agreement")
            out.append(
                f"<rect class='heat' x='{x}' y='{y}' width='{_CELL_W - 2}' height='{_CELL_H - 2}' "
                f"fill='{colour}'><title>{title}</title></rect>"
            )
            if not prompt.rendered_equal:
                out.append(f"<circle cx='{x + 8}' cy='{y + 10}' r='3' fill='#1b1f24'/>")
    out.append("</svg>")
    return "".join(out)


def _tokens(prompt: PromptComparison, pieces: Sequence[str]) -> str:
    spans = []
    for position, token in enumerate(prompt.tokens):
        piece = pieces[position] if position < len(pieces) else f"<{token}>"
        kind = ""
        if prompt.first_divergence is not None:
            kind = (
                " div"
                if position == prompt.first_divergence
                else " after"
                if position > prompt.first_divergence
                else ""
            )
        spans.append(f"<span class='tok{kind}' title='{token}'>{html.escape(piece)}</span>")
    return "".join(spans)


def _drift_plot(drift: Sequence[float]) -> str:
    if not drift:
        return ""
    width, height, pad = 360, 90, 24
    top = max(*drift, 1e-3)
    step = (width - 2 * pad) / max(len(drift) - 1, 1)
    points = " ".join(
        f"{pad + i * step:.1f},{height - pad - (d / top) * (height - 2 * pad):.1f}"
        for i, d in enumerate(drift)
    )
    return (
        f"<svg class='drift' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>"
        f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#888'/>"
        f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{height - pad}' stroke='#888'/>"
        f"<polyline fill='none' stroke='#0969da' stroke-width='1.5' points='{points}'/>"
        f"<text x='{pad}' y='{pad - 6}' font-size='10'>max {top:.3f} nats</text>"
        f"<text x='{width - pad}' y='{height - 6}' font-size='10' text-anchor='end'>position</text></svg>"
    )


def _cell_details(report: MatrixReport, cell: CellComparison) -> str:
    reference = report.cells[0]
    body = []
    for prompt, ref in zip(cell.prompts, reference.prompts, strict=True):
        body.append(f"<h3>{html.escape(prompt.prompt)}</h3>")
        if prompt.render_error:
            body.append(f"<p>not rendered: {html.escape(prompt.render_error)}</p>")
            continue
        if not prompt.rendered_equal:
            diff = "\n".join(
                difflib.unified_diff(
                    (ref.rendered or "").splitlines(),
                    (prompt.rendered or "").splitlines(),
                    "reference",
                    "this cell",
                    lineterm="",
                )
            )
            body.append(f"<p>rendered prompt differs:</p><pre>{html.escape(diff)}</pre>")
        body.append(
            f"<p>reference: {_tokens(ref, ref.pieces)}</p><p>this cell: {_tokens(prompt, prompt.pieces)}</p>"
        )
        if prompt.alternatives:
            ref_alt, alt = prompt.alternatives
            body.append(
                "<p>alternatives at the divergence: reference "
                + html.escape(", ".join(f"{t} ({p:.2f})" for t, p in ref_alt))
                + "; this cell "
                + html.escape(", ".join(f"{t} ({p:.2f})" for t, p in alt))
                + "</p>"
            )
        body.append(_drift_plot(prompt.drift))
    status = "same output" if cell.changed == 0 else f"{cell.changed} prompt(s) changed"
    return f"<details><summary>cell {cell.cell.index}: {html.escape(_label(cell))} — {status}</summary>{''.join(body)}</details>"
