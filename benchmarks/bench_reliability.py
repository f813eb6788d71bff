"""Reliability report (issue 13): every hostile case of ``tests/hardening_cases.py`` run through the real CLI.

Usage: ``python benchmarks/bench_reliability.py``. Prints, per category, the cases tried, tracebacks, hangs
(past the time limit), the peak RSS above a ``stacklock --help`` baseline measured in the same run, and lost
files (a lock that existed before a failed run and differs or is gone after it). Then the cost of rendering in
the forked worker on the Gemma 3 template, against an in-process render in the same run.
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stacklock.template.sandbox import RenderLimits, _render_in_process, render_chat_template  # noqa: E402
from tests.hardening_cases import CASES, MEMORY_LIMIT_MB, TIME_LIMIT_S, baseline_rss_mb, measure  # noqa: E402


def reliability() -> int:
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    bad: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = baseline_rss_mb(Path(tmp))
        print(
            f"baseline (stacklock --help): {base:.0f} MB max RSS; limits {TIME_LIMIT_S:g} s, +{MEMORY_LIMIT_MB:g} MB"
        )
        for index, case in enumerate(CASES):
            project = Path(tmp) / f"case-{index}"
            project.mkdir()
            case.setup(project)
            lock = project / "llmstack.lock"
            before = lock.read_bytes() if lock.is_file() and not lock.is_symlink() else None
            outcome = measure(case.args, project, case.env)
            row = rows[case.category]
            row["cases"] += 1
            errors = [line for line in outcome.stderr.splitlines() if line.startswith("error: ")]
            ok = outcome.code in case.codes and (outcome.code == 0 or len(errors) == 1)
            row["tracebacks"] += outcome.traceback
            row["hangs"] += outcome.hung
            row["unexpected"] += not ok
            extra = outcome.max_rss_mb - base
            row["max_extra_rss_mb"] = max(row["max_extra_rss_mb"], extra)
            row["over_memory"] += extra > MEMORY_LIMIT_MB
            row["max_seconds"] = max(row["max_seconds"], outcome.seconds)
            lost = (
                before is not None
                and outcome.code != 0
                and (not lock.is_file() or lock.read_bytes() != before)
            )
            row["lost_files"] += lost
            if outcome.traceback or outcome.hung or not ok or lost or extra > MEMORY_LIMIT_MB:
                bad.append(f"{case.category}/{case.name}: exit {outcome.code}, {outcome.seconds:.1f} s")
    header = f"{'category':<10} {'cases':>5} {'tracebacks':>10} {'hangs':>5} {'unexpected':>10} {'>mem':>4} {'lost':>4} {'max s':>6} {'max +RSS MB':>11}"
    print(header)
    total: dict[str, float] = defaultdict(float)
    for category, row in sorted(rows.items()):
        print(
            f"{category:<10} {row['cases']:>5.0f} {row['tracebacks']:>10.0f} {row['hangs']:>5.0f} {row['unexpected']:>10.0f} "
            f"{row['over_memory']:>4.0f} {row['lost_files']:>4.0f} {row['max_seconds']:>6.1f} {row['max_extra_rss_mb']:>11.0f}"
        )
        for key, value in row.items():
            total[key] = max(total[key], value) if key.startswith("max") else total[key] + value
    print(
        f"{'total':<10} {total['cases']:>5.0f} {total['tracebacks']:>10.0f} {total['hangs']:>5.0f} {total['unexpected']:>10.0f} "
        f"{total['over_memory']:>4.0f} {total['lost_files']:>4.0f} {total['max_seconds']:>6.1f} {total['max_extra_rss_mb']:>11.0f}"
    )
    for line in bad:
        print(f"  FAILED {line}")
    return 1 if bad else 0


def render_overhead(repeat: int = 30) -> None:
    template = (ROOT / "registry" / "templates" / "gemma3-it.jinja").read_text(encoding="utf-8")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    now = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    options = {"add_generation_prompt": True, "bos_token": "<bos>", "eos_token": "<eos>", "now": now}
    inside, forked = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        _render_in_process(
            template,
            messages,
            **options,
            tools=None,
            documents=None,
            extra_context=None,
            limits=RenderLimits(),
            origin="gemma3-it",
        )
        inside.append(time.perf_counter() - start)
        start = time.perf_counter()
        render_chat_template(template, messages, **options)  # type: ignore[arg-type]
        forked.append(time.perf_counter() - start)
    a, b = statistics.median(inside) * 1000, statistics.median(forked) * 1000
    print(
        f"Gemma 3 template render: in-process {a:.1f} ms, forked worker {b:.1f} ms (median of {repeat}; +{b - a:.1f} ms)"
    )


if __name__ == "__main__":
    code = reliability()
    render_overhead()
    sys.exit(code)
