"""`stacklock matrix` on a tiny GGUF run by the real llama.cpp: a 2x2x2 spec runs, caches, resumes, shards."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from stacklock.errors import ManifestError, UsageError
from stacklock.explore.matrix import (
    build_report,
    merge_runs,
    parse_matrix_spec,
    parse_prompts,
    read_matrix_spec,
    run_matrix,
)
from stacklock.report.matrix import agreement_colour, render
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

MANIFEST = """\
[stack]
name = "tiny-matrix"

[model]
source = "tiny.gguf"

[engine]
name = "llama-cpp-python"
version = "==0.3.36"

[backend]
context-size = 256

[sampler]
temperature = 0.0
seed = 3

[[smoke]]
name = "hello"
messages = [{ role = "user", content = "Hello" }]
max-tokens = 6

[[smoke]]
name = "raw"
prompt = "Once upon a time"
max-tokens = 6
"""

SPEC = """\
[matrix]
manifest = "llmstack.toml"
top-k = 3

[matrix.axes]
template = ["gguf", "file:other.jinja"]
"sampler.temperature" = [0.0, 1.0]
"backend.threads" = [1, 2]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML)
    (tmp_path / "other.jinja").write_text(CHATML.replace("assistant\n", "assistant\n\n"), encoding="utf-8")
    (tmp_path / "llmstack.toml").write_text(MANIFEST, encoding="utf-8")
    (tmp_path / "matrix.toml").write_text(SPEC, encoding="utf-8")
    return tmp_path


def test_a_2x2x2_matrix_runs_and_attributes_the_changes(project: Path) -> None:
    run = run_matrix(project / "matrix.toml")
    assert run.cell_count == 8
    assert run.executed == 8
    report = build_report(run)
    rates = {s.axis: s for s in report.attribution}
    # The template changes the chat's render (not the raw prompt's); sampling changes both outputs.
    assert (rates["template"].changed, rates["template"].pairs) == (4, 8)
    assert rates["sampler.temperature"].rate == 1.0
    reference = report.cells[0]
    assert reference.changed == 0
    assert reference.token_agreement == 1.0
    other_template = next(
        c
        for c in report.cells
        if c.cell.values == {"template": "file:other.jinja", "sampler.temperature": 0.0, "backend.threads": 1}
    )
    assert not other_template.rendered_equal
    assert [p.rendered_equal for p in other_template.prompts] == [False, True]
    sampled = next(c for c in report.cells if c.cell.values["sampler.temperature"] == 1.0)
    assert sampled.first_divergence is not None
    assert sampled.token_agreement < 1.0
    text = render(report, "text")
    assert "how often changing only one axis changes an output:" in text
    assert "sampler.temperature  " in text


def test_a_second_run_executes_no_cell(project: Path) -> None:
    first = run_matrix(project / "matrix.toml")
    second = run_matrix(project / "matrix.toml")
    assert second.executed == 0
    assert second.results == first.results


def test_an_interrupted_run_resumes(project: Path) -> None:
    done: list[str] = []

    def stop_after_three(text: str) -> None:
        if text.startswith("cell "):
            done.append(text)
            if len(done) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_matrix(project / "matrix.toml", progress=stop_after_three)
    resumed = run_matrix(project / "matrix.toml")
    assert resumed.executed == 5
    assert len(resumed.results) == 8


def test_shards_merge_to_the_single_run(project: Path) -> None:
    single = build_report(run_matrix(project / "matrix.toml", cache_dir=project / "c0"))
    shards = [run_matrix(project / "matrix.toml", shard=(i, 2), cache_dir=project / f"c{i}") for i in (1, 2)]
    assert all(0 < len(s.results) < 8 for s in shards)
    assert sum(s.executed for s in shards) == 8
    merged = build_report(merge_runs(shards))
    assert merged.model_copy(update={"executed": 0}) == single.model_copy(update={"executed": 0})
    with pytest.raises(UsageError, match=r"cells .* are in no shard"):
        merge_runs(shards[:1])


def test_jobs_run_combinations_in_parallel_with_the_same_result(project: Path) -> None:
    serial = build_report(run_matrix(project / "matrix.toml", cache_dir=project / "a"))
    parallel = build_report(run_matrix(project / "matrix.toml", jobs=2, cache_dir=project / "b"))
    assert parallel == serial


def test_the_html_report_is_self_contained_with_a_heat_map(project: Path) -> None:
    report = build_report(run_matrix(project / "matrix.toml"))
    page = render(report, "html")
    assert "<svg id='heatmap'" in page
    assert page.count("class='heat'") == 16
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page
    assert "rendered prompt differs:" in page
    assert agreement_colour(1.0) in page


def test_bad_specs_and_prompt_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^matrix spec not found: "):
        read_matrix_spec(tmp_path / "missing.toml")
    with pytest.raises(ManifestError, match=r"axis 'backend\.warp' is not 'template'"):
        parse_matrix_spec('[matrix.axes]\n"backend.warp" = [1]\n', "m.toml")
    with pytest.raises(ManifestError, match="needs one or more distinct values"):
        parse_matrix_spec('[matrix.axes]\n"backend.threads" = [1, 1]\n', "m.toml")
    with pytest.raises(ManifestError, match=r"^p.jsonl:2: not a smoke prompt"):
        parse_prompts('{"name": "a", "prompt": "x"}\n{"name": "b"}\n', "p.jsonl")
    assert [p.name for p in parse_prompts('{"name": "a", "prompt": "x"}\n\n', "p.jsonl")] == ["a"]


def test_the_cli_runs_shards_and_merges(project: Path, cli: Callable[..., Result]) -> None:
    for index in (1, 2):
        result = cli(
            "matrix",
            "run",
            "matrix.toml",
            "--shard",
            f"{index}/2",
            "--results",
            f"s{index}.json",
            cwd=project,
        )
        assert result.code == 0, result.err
    result = cli("matrix", "merge", "s1.json", "s2.json", "--format", "markdown", cwd=project)
    assert result.code == 0, result.err
    assert result.out.startswith("### stacklock matrix: 8 cells x 2 prompts")
    assert "| sampler.temperature | 8/8 | 100% |" in result.out
    result = cli("matrix", "run", "matrix.toml", "--format", "html", "-o", "report.html", cwd=project)
    assert result.code == 0, result.err
    assert (project / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert cli("matrix", "run", "matrix.toml", "--shard", "3/2", cwd=project).code == 2


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    # Not a skip: scripts/setup.sh installs Chromium, so a machine without it is set up wrongly.
    pytest.fail(
        "no Chromium found: run scripts/setup.sh (it installs the 'chromium' package), the HTML test needs it"
    )


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def test_the_html_report_opens_in_a_headless_browser_and_shows_the_heat_map(project: Path) -> None:
    from PIL import Image  # noqa: PLC0415 - only this test needs it.

    (project / "matrix.toml").write_text(
        '[matrix]\n[matrix.axes]\n"sampler.temperature" = [0.0, 1.0]\n', encoding="utf-8"
    )
    report = build_report(run_matrix(project / "matrix.toml"))
    (project / "report.html").write_text(render(report, "html"), encoding="utf-8")
    shot = project / "shot.png"
    done = subprocess.run(
        [
            _browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={project / 'profile'}",
            "--window-size=1000,700",
            f"--screenshot={shot}",
            (project / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    raw = image.tobytes()
    pixels = [(raw[i], raw[i + 1], raw[i + 2]) for i in range(0, len(raw), 3)]
    width = image.size[0]
    # Each heat-map rectangle is painted in its agreement colour: the reference row is full agreement (green),
    # the sampled row is not; both colours must appear as blocks of pixels where the heat map is drawn.
    expected = {agreement_colour(p.token_agreement) for cell in report.cells for p in cell.prompts}
    assert len(expected) >= 2
    for colour in expected:
        where = [i for i, rgb in enumerate(pixels) if rgb == _rgb(colour)]
        assert len(where) > 500, f"heat-map colour {colour} covers {len(where)} pixels"
        xs = [i % width for i in where]
        assert max(xs) - min(xs) >= 80
