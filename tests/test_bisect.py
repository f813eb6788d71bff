"""`stacklock bisect` on tiny GGUFs run by the real llama.cpp: pairs of locks differing in 1, 2 and 4 links."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stacklock.explore.bisect import BisectReport, Link, Trial, bisect_links, differing_links, run_bisect
from stacklock.lock.api import lock_stack
from stacklock.lock.project import write_lock
from stacklock.model.lock import Lock
from stacklock.report.bisect import render as render_bisect
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

MANIFEST = """\
[stack]
name = "tiny-bisect"

[model]
source = "tiny.gguf"

[template]
source = "{template}"

[engine]
name = "llama-cpp-python"
version = "==0.3.36"

[backend]
kind = "cpu"
threads = 1
context-size = 256

[sampler]
{sampler}

[[smoke]]
name = "hello"
messages = [{{ role = "user", content = "Hello" }}]
max-tokens = 8

[[smoke]]
name = "raw"
prompt = "Once upon a time"
max-tokens = 8
"""

GREEDY = {"temperature": 0.0, "seed": 0, "top-k": 40, "repeat-last-n": 64}
OTHER_TEMPLATE = CHATML.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n\n")


def _toml(values: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(f'"{x}"' for x in v) + "]"
        return str(v)

    return "\n".join(f"{k} = {value(v)}" for k, v in values.items())


def _lock(directory: Path, *, template: str = "gguf", sampler: dict[str, Any] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "tiny.gguf").exists():
        build_tiny_gguf(directory / "tiny.gguf", chat_template=CHATML)
    (directory / "other.jinja").write_text(OTHER_TEMPLATE, encoding="utf-8")
    (directory / "llmstack.toml").write_text(
        MANIFEST.format(template=template, sampler=_toml({**GREEDY, **(sampler or {})})), encoding="utf-8"
    )
    lock: Lock = lock_stack(directory / "llmstack.toml")
    write_lock(directory / "llmstack.lock", lock)
    return directory / "llmstack.lock"


def test_one_link_a_template_change_shows_at_the_template_stage_without_the_engine(tmp_path: Path) -> None:
    good = _lock(tmp_path / "good")
    bad = _lock(tmp_path / "bad", template="file:other.jinja")
    report = run_bisect(good, bad)
    assert [link.name for link in report.links] == ["template"]
    assert report.verdict == "culprit"
    assert report.culprit == ("template",)
    assert report.difference is not None
    assert report.difference.stage == "template"
    assert report.difference.prompt == "hello"
    # The renders differ, so no engine ever ran.
    assert report.engine_runs == 0


def test_two_links_the_sampler_temperature_is_named_and_the_seed_is_not(tmp_path: Path) -> None:
    good = _lock(tmp_path / "good")
    bad = _lock(tmp_path / "bad", sampler={"temperature": 1.0, "seed": 7})
    report = run_bisect(good, bad)
    assert [link.name for link in report.links] == ["sampler.temperature", "sampler.seed"]
    assert report.verdict == "culprit"
    assert report.culprit == ("sampler.temperature",)
    assert report.difference is not None
    assert report.difference.stage == "generation"
    assert report.difference.position is not None


def test_four_links_one_culprit_within_the_engine_run_budget(tmp_path: Path) -> None:
    good = _lock(tmp_path / "good")
    bad = _lock(
        tmp_path / "bad",
        sampler={"seed": 3, "stop": ["a phrase never written"], "repeat-last-n": 32, "temperature": 1.0},
    )
    report = run_bisect(good, bad)
    names = [link.name for link in report.links]
    assert sorted(names) == ["sampler.repeat-last-n", "sampler.seed", "sampler.stop", "sampler.temperature"]
    assert report.culprit == ("sampler.temperature",)
    assert report.engine_runs <= 1 + 2 * math.log2(len(names))


def test_two_links_that_only_change_the_output_together_are_an_interaction(tmp_path: Path) -> None:
    # temperature 1 with top-k 1 is still greedy, and top-k 40 at temperature 0 is greedy: only both sample.
    good = _lock(tmp_path / "good", sampler={"top-k": 1})
    bad = _lock(tmp_path / "bad", sampler={"temperature": 1.0, "seed": 11, "top-k": 40})
    report = run_bisect(good, bad)
    assert report.verdict == "interaction"
    assert set(report.culprit) == {"sampler.temperature", "sampler.top-k"}
    single = {t.links: t.changed for t in report.trials if len(t.links) == 1}
    assert single.get(("sampler.temperature",)) is False or single.get(("sampler.top-k",)) is False


def test_a_link_with_no_effect_changes_nothing(tmp_path: Path) -> None:
    good = _lock(tmp_path / "good")
    bad = _lock(tmp_path / "bad", sampler={"seed": 99})
    report = run_bisect(good, bad)
    assert [link.name for link in report.links] == ["sampler.seed"]
    assert report.verdict == "no-change"
    assert report.culprit == ()


def test_an_engine_version_not_installed_is_not_swappable_here(tmp_path: Path) -> None:
    good = _lock(tmp_path / "good")
    bad_path = _lock(tmp_path / "bad", sampler={"seed": 5})
    text = bad_path.read_text(encoding="utf-8").replace('version = "0.3.36"', 'version = "0.3.99"', 1)
    bad_path.write_text(text, encoding="utf-8")
    links = {link.name: link for link in run_bisect(good, bad_path).links}
    assert not links["engine"].swappable
    assert links["engine"].reason == (
        "not swappable here: BAD runs llama-cpp-python 0.3.99, 0.3.36 is installed"
    )
    report = run_bisect(good, bad_path)
    assert report.verdict == "unswappable"
    assert report.culprit == ("engine",)


def test_differing_links_ignore_where_a_value_came_from(tmp_path: Path) -> None:
    good = _lock(tmp_path / "good")
    from stacklock.lock.project import read_lock  # noqa: PLC0415

    lock = read_lock(good)
    origin = {**lock.sampler.origin, "seed": "gguf"}
    changed = lock.model_copy(update={"sampler": lock.sampler.model_copy(update={"origin": origin})})
    assert differing_links(lock, changed) == ()


def test_the_cli_names_the_culprit(tmp_path: Path, cli: Callable[..., Result]) -> None:
    _lock(tmp_path / "good")
    _lock(tmp_path / "bad", template="file:other.jinja")
    result = cli("bisect", "good/llmstack.lock", "bad/llmstack.lock", cwd=tmp_path)
    assert result.code == 1, result.err
    assert "culprit: template" in result.out
    result = cli("bisect", "good/llmstack.lock", "good/llmstack.lock", cwd=tmp_path)
    assert result.code == 0
    assert "the locks pin the same links" in result.out


# The search on its own: a judge that says which sets of links change the outcome -----------------------------

NAMES = [f"sampler.v{i}" for i in range(8)]


def _judged(changing: Callable[[frozenset[str]], bool], count: int) -> BisectReport:
    links = [Link(name=n, good="0", bad="1") for n in NAMES[:count]]

    def judge(names: tuple[str, ...]) -> Trial:
        return Trial(links=names, changed=changing(frozenset(names)), engine_run=True)

    return bisect_links("good", "bad", links, judge)


def _has(culprit: str, names: frozenset[str]) -> bool:
    return culprit in names


def _both(first: str, second: str, names: frozenset[str]) -> bool:
    return first in names and second in names


@pytest.mark.parametrize("count", [1, 2, 4, 8])
def test_every_single_culprit_is_found_within_the_bound(count: int) -> None:
    # GOOD's own run is not a trial of the pure search; the bound counts it. Two links can take one run more
    # than the formula (the second half is confirmed alone), from four on the formula holds.
    bound = 1 + 2 * math.log2(count) if count >= 4 else count + 2
    for culprit in NAMES[:count]:
        report = _judged(functools.partial(_has, culprit), count)
        assert report.culprit == (culprit,)
        assert 1 + report.engine_runs <= bound


def test_every_pair_that_only_changes_together_is_an_interaction() -> None:
    for first, second in itertools.combinations(NAMES[:4], 2):
        report = _judged(functools.partial(_both, first, second), 4)
        assert report.verdict == "interaction"
        assert set(report.culprit) == {first, second}


def test_the_markdown_report_marks_the_culprit() -> None:
    report = _judged(functools.partial(_has, "sampler.v2"), 4)
    text = render_bisect(report, "markdown")
    assert text.startswith("### stacklock bisect: culprit: sampler.v2")
    assert "| `sampler.v2` | `0` | `1` | **culprit** |" in text
    assert '"verdict": "culprit"' in render_bisect(report, "json")
