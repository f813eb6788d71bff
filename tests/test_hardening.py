"""Regression tests for every hostile input of issue 13: one `error:` line, the right exit code, no traceback,
no hang, bounded memory. The cases are data, in ``tests/hardening_cases.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hardening_cases import CASES, MEMORY_LIMIT_MB, Case, baseline_rss_mb, measure


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> float:
    return baseline_rss_mb(tmp_path_factory.mktemp("baseline"))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category}-{c.name}" for c in CASES])
def test_hostile_input(case: Case, tmp_path: Path, baseline: float) -> None:
    case.setup(tmp_path)
    outcome = measure(case.args, tmp_path, case.env)
    assert not outcome.hung, f"took {outcome.seconds:.1f} s"
    assert not outcome.traceback, outcome.stderr
    assert outcome.code in case.codes, outcome.stderr
    if outcome.code != 0:
        errors = [line for line in outcome.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, outcome.stderr
        assert case.needle in errors[0]
        assert "_ArraySpan" not in errors[0]
        assert "<memory at" not in errors[0]
    assert outcome.max_rss_mb - baseline < MEMORY_LIMIT_MB
