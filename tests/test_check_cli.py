"""`stacklock check`, end to end: a locked stack against the registries' rules and the engine installed here."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stacklock.engines.machine import installed_engine_version
from stacklock.lock.load import load_inputs
from stacklock.lock.resolve import resolve
from stacklock.model.findings import Allowance
from stacklock.model.lock import parse_lock, render_lock
from stacklock.registry.files import load_bundled_registry
from stacklock.rules.check import ENGINE_MISMATCH, check_stack
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf, gemma_model_path

Cli = Callable[..., Result]

RULES = {rule.id: rule for rule in load_bundled_registry().rules}
NO_TEMPLATE = RULES["tmpl-gguf-missing-template-llama-cpp-python"]
LCP_VERSION = installed_engine_version("llama-cpp-python") or "0.3.36"
REASON = "raw prompts only until the template is in the registry"

# Gemma 3 270M's GGUF carries no chat template; a manifest that takes the template from the file has none.
MANIFEST = f"""\
[stack]
name = "gemma-like"

[model]
source = "model.gguf"

[template]
source = "gguf"

[engine]
name = "llama-cpp-python"
version = "=={LCP_VERSION}"

[sampler]
temperature = 0.0

[backend]
kind = "cpu"

[[smoke]]
name = "capital"
prompt = "The capital of France is"
max-tokens = 4
"""

TEAM_REGISTRY = """\
[[registry]]
name = "team"
url = "team-registry"
"""

TEAM_RULE = """\
id = "team-no-tiny-models"
title = "Tiny models are not for production"
severity = "error"
links = ["model"]
explanation = "Added to the team's registry after the stack was locked."
fix = "Use a real model."
references = ["https://example.org/team/rules/1"]

[when]
all = [{ fact = "model.parameter-count", less-than = 1000000 }]
"""


def _locked(project: Path, cli: Cli, manifest: str = MANIFEST) -> Path:
    """A Gemma-like stack (no embedded template) locked with the no-template error allowed."""
    project.mkdir(parents=True, exist_ok=True)
    build_tiny_gguf(project / "model.gguf", arch="gemma3", chat_template=None)
    (project / "llmstack.toml").write_text(manifest)
    result = cli("lock", "--allow", NO_TEMPLATE.id, "--reason", REASON, cwd=project)
    assert result.code == 0, result.err
    return project


def _edit_lock(project: Path, **update: Any) -> None:
    path = project / "llmstack.lock"
    lock = parse_lock(path.read_text())
    path.write_text(render_lock(lock.model_copy(update=update)))


# -- text -----------------------------------------------------------------------------------------------------


def test_check_reports_the_no_template_rule_with_its_fix(tmp_path: Path, cli: Cli) -> None:
    project = _locked(tmp_path, cli)
    result = cli("check", cwd=project)
    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert lines[0] == f"error: {NO_TEMPLATE.id}: {NO_TEMPLATE.title} (allowed: {REASON})"
    assert f"  why: {NO_TEMPLATE.explanation}" in lines
    assert f"  fix: {NO_TEMPLATE.fix}" in lines
    assert f"  see: {', '.join(NO_TEMPLATE.references)}" in lines
    assert lines[-1].endswith("error(s), 0 not allowed")


def test_check_without_findings(tmp_path: Path, cli: Cli) -> None:
    project = tmp_path
    build_tiny_gguf(project / "model.gguf", chat_template=CHATML)
    (project / "llmstack.toml").write_text(MANIFEST)
    assert cli("lock", cwd=project).code == 0
    result = cli("check", cwd=project)
    assert (result.code, result.out) == (0, "no findings\n")


def test_check_fails_when_the_lock_loses_its_allowance(tmp_path: Path, cli: Cli) -> None:
    project = _locked(tmp_path, cli)
    _edit_lock(project, allowances=())
    result = cli("check", cwd=project)
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines[0] == f"error: {NO_TEMPLATE.id}: {NO_TEMPLATE.title}"
    assert f"  fix: {NO_TEMPLATE.fix}" in lines
    assert lines[-1].endswith(", 1 not allowed")


def test_check_fails_on_a_rule_added_to_a_registry_after_locking(tmp_path: Path, cli: Cli) -> None:
    registry = tmp_path / "team-registry"
    (registry / "rules").mkdir(parents=True)
    (registry / "registry.toml").write_text('format-version = 1\nname = "team"\n')
    project = _locked(tmp_path, cli, MANIFEST + "\n" + TEAM_REGISTRY)
    assert cli("check", cwd=project).code == 0

    (registry / "rules" / "team-no-tiny-models.toml").write_text(TEAM_RULE)
    result = cli("check", cwd=project)
    assert result.code == 1
    lines = result.out.splitlines()
    assert "error: team-no-tiny-models: Tiny models are not for production" in lines
    assert "  fix: Use a real model." in lines

    report = json.loads(cli("check", "--format", "json", cwd=project).out)
    assert report["blocking"] == ["team-no-tiny-models"]
    team = next(f for f in report["findings"] if f["rule"] == "team-no-tiny-models")
    assert team["registry"] == "team"


def test_check_reports_an_installed_engine_that_differs_from_the_lock(tmp_path: Path, cli: Cli) -> None:
    installed = installed_engine_version("llama-cpp-python")
    if installed is None:
        pytest.skip("llama-cpp-python is not installed; there is no installed engine to differ")
    # A neighbouring release, so that no version-ranged rule fires beside the mismatch.
    locked = "0.3.34" if installed == "0.3.35" else "0.3.35"
    project = _locked(tmp_path, cli)
    lock = parse_lock((project / "llmstack.lock").read_text())
    _edit_lock(project, engine=lock.engine.model_copy(update={"version": locked}))
    result = cli("check", cwd=project)
    assert result.code == 1
    lines = result.out.splitlines()
    assert (
        f"error: {ENGINE_MISMATCH}: installed llama-cpp-python {installed} is not the locked {locked}"
        in lines
    )
    assert f"  fix: install llama-cpp-python=={locked}, or re-lock and re-record on {installed}" in lines
    report = json.loads(cli("check", "--format", "json", cwd=project).out)
    assert report["blocking"] == [ENGINE_MISMATCH]


# -- json and sarif -------------------------------------------------------------------------------------------


def test_check_json(tmp_path: Path, cli: Cli) -> None:
    project = _locked(tmp_path, cli)
    result = cli("check", "--format", "json", cwd=project)
    assert result.code == 0
    report = json.loads(result.out)
    assert report["ok"] is True
    assert report["blocking"] == []
    assert report["allowances"] == [{"rule": NO_TEMPLATE.id, "reason": REASON}]
    finding = report["findings"][0]
    assert (finding["rule"], finding["severity"], finding["registry"]) == (NO_TEMPLATE.id, "error", "bundled")
    assert finding["fix"] == NO_TEMPLATE.fix
    assert finding["references"] == list(NO_TEMPLATE.references)


def test_check_json_not_ok_without_the_allowance(tmp_path: Path, cli: Cli) -> None:
    project = _locked(tmp_path, cli)
    _edit_lock(project, allowances=())
    result = cli("check", "--format", "json", cwd=project)
    assert result.code == 1
    report = json.loads(result.out)
    assert (report["ok"], report["blocking"], report["allowances"]) == (False, [NO_TEMPLATE.id], [])


def _sarif_run(text: str) -> dict[str, Any]:
    document = json.loads(text)
    assert document["version"] == "2.1.0"
    assert document["$schema"].endswith("sarif-2.1.0.json")
    assert len(document["runs"]) == 1
    run: dict[str, Any] = document["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "stacklock"
    rule_ids = [r["id"] for r in driver["rules"]]
    assert len(rule_ids) == len(set(rule_ids))
    for result in run["results"]:
        assert result["level"] in ("error", "warning", "note")
        assert driver["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["message"]["text"]
        location = result["locations"][0]["physicalLocation"]
        assert location["artifactLocation"]["uri"] == "llmstack.lock"
    return run


def test_check_sarif_marks_allowed_findings_as_suppressed(tmp_path: Path, cli: Cli) -> None:
    project = _locked(tmp_path, cli)
    result = cli("check", "--format", "sarif", cwd=project)
    assert result.code == 0
    run = _sarif_run(result.out)
    descriptors = {d["id"]: d for d in run["tool"]["driver"]["rules"]}
    descriptor = descriptors[NO_TEMPLATE.id]
    assert descriptor["help"]["text"].startswith(NO_TEMPLATE.fix)
    assert descriptor["helpUri"] == "https://github.com/abetlen/llama-cpp-python/issues/1110"
    (finding,) = run["results"]
    assert (finding["ruleId"], finding["level"]) == (NO_TEMPLATE.id, "error")
    assert finding["message"]["text"] == f"{NO_TEMPLATE.title}. Fix: {NO_TEMPLATE.fix}"
    assert finding["suppressions"] == [{"kind": "external", "justification": REASON}]


def test_check_sarif_leaves_a_not_allowed_error_unsuppressed(tmp_path: Path, cli: Cli) -> None:
    project = _locked(tmp_path, cli)
    _edit_lock(project, allowances=())
    result = cli("check", "--format", "sarif", cwd=project)
    assert result.code == 1
    (finding,) = _sarif_run(result.out)["results"]
    assert finding["ruleId"] == NO_TEMPLATE.id
    assert "suppressions" not in finding


def test_check_sarif_is_deterministic(tmp_path: Path, cli: Cli) -> None:
    project = _locked(tmp_path, cli)
    first = cli("check", "--format", "sarif", cwd=project).out
    assert cli("check", "--format", "sarif", cwd=project).out == first


def test_check_without_a_lock_is_one_line(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "llmstack.toml").write_text(MANIFEST)
    result = cli("check", cwd=tmp_path)
    assert result.code == 2
    assert result.err == "error: llmstack.lock: no lock here; run `stacklock lock`\n"


# -- The real Gemma 3 270M GGUF -------------------------------------------------------------------------------


@pytest.fixture
def gemma(tmp_path: Path) -> Path:
    model = gemma_model_path()
    if model is None:
        pytest.skip("the Gemma 3 270M package is not installed (the 'example' extra)")
    project = tmp_path / "gemma"
    project.mkdir()
    # A copy, not a link: the lock pins the model's path relative to the manifest.
    shutil.copyfile(model, project / "model.gguf")
    (project / "llmstack.toml").write_text(MANIFEST.replace('name = "gemma-like"', 'name = "gemma3-270m"'))
    return project


@pytest.mark.gemma
def test_gemma_3_270m_without_its_template_is_refused_then_allowed_then_checked(
    gemma: Path, cli: Cli
) -> None:
    refused = cli("lock", cwd=gemma)
    assert refused.code == 1
    step, error = refused.err.splitlines()
    assert step == "hashing model.gguf"
    assert error.startswith(f"error: rule {NO_TEMPLATE.id}: {NO_TEMPLATE.title}; {NO_TEMPLATE.fix}")
    assert not (gemma / "llmstack.lock").exists()

    allowed = cli("lock", "--allow", NO_TEMPLATE.id, "--reason", REASON, cwd=gemma)
    assert allowed.code == 0, allowed.err
    lock = parse_lock((gemma / "llmstack.lock").read_text())
    assert (lock.model.architecture, lock.model.chat_template_sha256) == ("gemma3", None)
    assert [(a.rule, a.reason) for a in lock.allowances] == [(NO_TEMPLATE.id, REASON)]

    checked = cli("check", cwd=gemma)
    assert checked.code == 0, checked.out
    lines = checked.out.splitlines()
    assert f"error: {NO_TEMPLATE.id}: {NO_TEMPLATE.title} (allowed: {REASON})" in lines
    assert f"  fix: {NO_TEMPLATE.fix}" in lines


def test_lock_and_check_judge_allowances_alike(tmp_path: Path, cli: Cli) -> None:
    # One lock with an allowed error (no template), a missing allowance (a team rule added after locking) and
    # a stale allowance (for a rule that finds nothing): lock and check must agree on what blocks.
    registry = tmp_path / "team-registry"
    (registry / "rules").mkdir(parents=True)
    (registry / "registry.toml").write_text('format-version = 1\nname = "team"\n')
    project = _locked(tmp_path, cli, MANIFEST + "\n" + TEAM_REGISTRY)
    (registry / "rules" / "team-no-tiny-models.toml").write_text(TEAM_RULE)
    locked = parse_lock((project / "llmstack.lock").read_text())
    stale = Allowance(rule="tok-double-bos", reason="was needed once")
    _edit_lock(project, allowances=(*locked.allowances, stale))
    locked = parse_lock((project / "llmstack.lock").read_text())

    inputs = load_inputs(project / "llmstack.toml")
    relocked = resolve(inputs, carried=locked.allowances)
    checked = check_stack(locked, inputs.registries, locked.engine.version)
    assert (
        [f.rule for f in relocked.blocking] == [f.rule for f in checked.blocking] == ["team-no-tiny-models"]
    )
    assert relocked.stale == checked.stale == (stale,)
    assert relocked.lock.allowances == tuple(a for a in locked.allowances if a != stale)

    report = json.loads(cli("check", "--format", "json", cwd=project).out)
    assert (report["blocking"], report["stale-allowances"]) == (["team-no-tiny-models"], ["tok-double-bos"])
    text = cli("check", cwd=project).out.splitlines()
    assert (
        "note: the lock's allowance for rule tok-double-bos matches no error finding; `stacklock lock` drops it"
        in text
    )
    relock = cli("lock", cwd=project)
    assert relock.code == 1
    assert relock.err.splitlines()[-2:] == [
        "note: dropped the allowance for rule tok-double-bos: it matches no error finding now",
        (
            "error: rule team-no-tiny-models: Tiny models are not for production; Use a real model. — or accept "
            "it with --allow team-no-tiny-models --reason TEXT"
        ),
    ]
