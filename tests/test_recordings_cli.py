"""One lock, several recordings: `record` adds the one for where it runs, `verify` picks it or `--against` one.

Through the real CLI, on a tiny GGUF with the real in-process engine (llama-cpp-python) and the fake engine
plugin as a second engine (``record --engine fake``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
import tomlkit

from stacklock.model.lock import Lock, parse_lock, render_lock
from tests import test_certify_cli
from tests.conftest import Result
from tests.test_certify_cli import _project

pytest.importorskip("llama_cpp", reason="the 'llama' extra (llama-cpp-python) is not installed")

pytestmark = pytest.mark.engine

Cli = Callable[..., Result]

#: The tiny stack, locked and recorded in process: the fixture the record/verify tests share.
recorded = test_certify_cli.recorded

HERE = "llama-cpp-python-0.3.36-cpu"
FAKE = "fake-0-cpu"


def _lock(project: Path) -> Lock:
    return parse_lock((project / "llmstack.lock").read_text(encoding="utf-8"))


def _verify(cli: Cli, project: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli("verify", "--format", "json", *args, cwd=project)
    assert result.code in {0, 1}, result.err
    report: dict[str, Any] = json.loads(result.out)
    return result.code, report


def test_record_on_another_engine_keeps_both_and_verify_picks_the_one_where_it_runs(
    recorded: Path, cli: Cli, fake_engine: str
) -> None:
    first = _lock(recorded).recording(HERE)
    assert first is not None
    other = cli("record", "--engine", fake_engine, cwd=recorded)
    assert other.code == 0, other.err
    assert other.err.splitlines()[-1] == (
        f"wrote the recording {FAKE} to llmstack.lock (kept: {HERE}); commit it, then run `stacklock verify` in CI"
    )
    lock = _lock(recorded)
    assert [r.id for r in lock.recordings] == [FAKE, HERE]
    # The in-process recording was kept as it was.
    assert lock.recording(HERE) == first
    assert lock.recording(FAKE) is not None
    assert lock.recording(FAKE).engine["name"] == "fake"  # type: ignore[union-attr]
    text = (recorded / "llmstack.lock").read_text(encoding="utf-8")
    assert text.count("[[recording]]") == 2
    assert f'id = "{FAKE}"' in text
    assert "[recording.goldens.hello]" in text

    code, report = _verify(cli, recorded)
    assert (code, report["reproduced"], report["recording"]) == (0, True, HERE)
    code, report = _verify(cli, recorded, "--engine", fake_engine)
    assert (code, report["reproduced"], report["recording"]) == (0, True, FAKE)
    assert report["engine"]["name"] == "fake"

    # Re-recording where it runs replaces that recording only.
    again = cli("record", cwd=recorded)
    assert again.code == 0, again.err
    assert _lock(recorded).recordings == lock.recordings

    # A re-lock that changes nothing keeps every recording; a changed stack drops them all.
    assert cli("lock", cwd=recorded).code == 0
    assert _lock(recorded).recordings == lock.recordings
    manifest = recorded / "llmstack.toml"
    manifest.write_text(manifest.read_text().replace("seed = 7", "seed = 8"))
    relocked = cli("lock", cwd=recorded)
    assert relocked.code == 0
    assert "the recorded goldens were dropped" in relocked.err
    assert _lock(recorded).recordings == ()


def test_every_report_and_the_certificate_name_the_recording(recorded: Path, cli: Cli) -> None:
    text = cli("verify", "--certificate", "cert.json", cwd=recorded)
    assert text.code == 0, text.err
    assert f"recording: {HERE}" in text.out.splitlines()
    certificate = json.loads((recorded / "cert.json").read_text(encoding="utf-8"))
    assert certificate["recorded-on"]["id"] == HERE
    assert "goldens" not in certificate["recorded-on"]
    junit = ET.fromstring(cli("verify", "--format", "junit", cwd=recorded).out)
    properties = {p.get("name"): p.get("value") for p in junit.iter("property")}
    assert properties["recording"] == HERE
    markdown = cli("verify", "--format", "markdown", cwd=recorded).out
    assert f"Recording: `{HERE}`" in markdown


def test_verify_without_a_recording_for_where_it_runs_is_one_line(
    tmp_path: Path, cli: Cli, fake_engine: str
) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    assert cli("record", "--engine", fake_engine, cwd=project).code == 0
    result = cli("verify", cwd=project)
    assert (result.code, result.out) == (2, "")
    assert result.err == (
        f"error: llmstack.lock has no recording for {HERE}, where verify runs (it has: {FAKE}); compare with one "
        f"of them (`stacklock verify --against {FAKE}`) or record one here with `stacklock record`\n"
    )
    unknown = cli("verify", "--against", "nope", cwd=project)
    assert unknown.code == 2
    assert unknown.err == (
        f"error: --against nope: llmstack.lock has no such recording (it has: {FAKE}); name one of them, or "
        "record one there with `stacklock record`\n"
    )
    # Against another engine's recording the comparison runs, and says how far it is.
    code, report = _verify(cli, project, "--against", FAKE)
    assert code == 1
    assert report["recording"] == FAKE
    assert report["notes"][0].startswith(f"against the recording {FAKE}: largest logprob drift ")
    assert "engine version: recorded '0', now '0.3.36'" in report["notes"]
    unknown_engine = cli("record", "--engine", "nope", cwd=project)
    assert unknown_engine.code == 2
    assert unknown_engine.err.startswith(
        "error: --engine nope: no such engine adapter is installed; name one of: "
    )


def test_against_a_recording_from_another_backend_reports_drift_and_near_tie_flips(
    recorded: Path, cli: Cli
) -> None:
    lock = _lock(recorded)
    (here,) = lock.recordings
    raw = here.goldens["raw"]
    (_, best), (second, runner_up) = raw.top_logprobs[0][:2]
    assert 0 < best - runner_up < 0.5, "the tiny model's first step is a near-tie"
    # As if another machine (a CUDA one) had recorded the runner-up at that near-tie, with logprobs moved a bit.
    moved = tuple(tuple((t, round(p - 0.01, 4)) for t, p in step) for step in raw.top_logprobs)
    cuda = here.model_copy(
        update={
            "id": "llama-cpp-python-0.3.36-cuda",
            "engine": {**here.engine, "backend": "cuda"},
            "goldens": {
                **here.goldens,
                "raw": raw.model_copy(update={"tokens": (second, *raw.tokens[1:]), "top_logprobs": moved}),
            },
        }
    )
    (recorded / "llmstack.lock").write_text(render_lock(lock.with_recording(cuda)), encoding="utf-8")

    # Where it runs (CPU), its own recording still reproduces.
    code, report = _verify(cli, recorded)
    assert (code, report["recording"]) == (0, HERE)
    code, report = _verify(cli, recorded, "--against", cuda.id)
    assert code == 1
    assert report["results"][1]["first-failure"] == "generation"
    assert report["notes"][0] == (
        f"against the recording {cuda.id}: largest logprob drift 0.0100 (before any divergence); "
        "near-tie flips: none"
    )
    assert "engine backend: recorded 'cuda', now 'cpu'" in report["notes"]
    code, report = _verify(cli, recorded, "--against", cuda.id, "--tolerance", "0.5")
    assert (code, report["reproduced"], report["tolerated"]) == (0, True, True)
    assert report["notes"][0] == (
        f"against the recording {cuda.id}: largest logprob drift 0.0100 (before any divergence); "
        "near-tie flips: raw at token 0"
    )


def _version_1(text: str) -> str:
    """A lock as stacklock wrote it before several recordings: one [recording], goldens under [smoke.golden]."""
    data = tomlkit.parse(text).unwrap()
    (recording,) = data.pop("recording")
    goldens = recording.pop("goldens")
    del recording["id"]
    for smoke in data["smoke"]:
        smoke["golden"] = goldens[smoke["name"]]
    data["lock-version"] = 1
    data["recording"] = recording
    return tomlkit.dumps(data)


def test_a_lock_with_one_recording_from_before_still_verifies(
    recorded: Path, cli: Cli, fake_engine: str
) -> None:
    path = recorded / "llmstack.lock"
    new = _lock(recorded)
    old = _version_1(path.read_text(encoding="utf-8"))
    assert "[smoke.golden]" in old
    assert "[[recording]]" not in old
    path.write_text(old, encoding="utf-8")
    assert parse_lock(old).recordings == new.recordings
    assert cli("lock", "--check", cwd=recorded).code == 0
    code, report = _verify(cli, recorded)
    assert (code, report["reproduced"], report["recording"]) == (0, True, HERE)
    # Recording on another engine writes the new layout, the old recording kept.
    assert cli("record", "--engine", fake_engine, cwd=recorded).code == 0
    assert [r.id for r in _lock(recorded).recordings] == [FAKE, HERE]
    assert "lock-version = 2" in path.read_text(encoding="utf-8")
