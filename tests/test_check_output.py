"""`stacklock check` output tools can trust: JSON with digests and coverage, SARIF with every rule and real lines,
and the findings of a refused lock instead of "no lock here"."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stacklock import __version__
from stacklock.engines.machine import installed_engine_version
from stacklock.registry.files import load_bundled_registry
from stacklock.report.sarif import table_lines
from stacklock.rules.builtin import all_checks
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

Cli = Callable[..., Result]

LCP_VERSION = installed_engine_version("llama-cpp-python") or "0.3.36"
MANIFEST = f"""\
[stack]
name = "output"

[model]
source = "model.gguf"

[template]
source = "gguf"

[sampler]
temperature = 0.0

[engine]
name = "llama-cpp-python"
version = "=={LCP_VERSION}"

[backend]
kind = "cpu"

[[smoke]]
name = "hello"
messages = [{{ role = "user", content = "Hello" }}]
"""
# add_generation_prompt ignored: an error finding of the template probes, so `lock` refuses.
BROKEN = CHATML.replace("{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "")
UNDEFINED = "{{ persona }}" + CHATML  # A warning of the template probes: the lock is written.


def _project(tmp_path: Path, template: str) -> Path:
    build_tiny_gguf(tmp_path / "model.gguf", chat_template=template)
    (tmp_path / "llmstack.toml").write_text(MANIFEST)
    return tmp_path


def _sarif_run(text: str) -> dict[str, Any]:
    document = json.loads(text)
    assert document["version"] == "2.1.0"
    (run,) = document["runs"]
    return dict(run)


def test_check_reports_the_findings_of_a_refused_lock(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path, BROKEN)
    refused = cli("lock", cwd=project)
    assert refused.code == 1
    assert refused.err.startswith("hashing model.gguf\nerror: rule tmpl-generation-prompt-ignored: ")
    assert not (project / "llmstack.lock").exists()

    text = cli("check", cwd=project)
    assert text.code == 1
    lines = text.out.splitlines()
    assert lines[0] == "llmstack.lock: none (lock refused); findings of llmstack.toml's resolution"
    assert lines[1] == "error: tmpl-generation-prompt-ignored: The template ignores add_generation_prompt"

    as_json = cli("check", "--format", "json", cwd=project)
    assert as_json.code == 1
    document = json.loads(as_json.out)
    assert (document["locked"], document["lock"]["sha256"], document["ok"]) == (False, None, False)
    assert document["blocking"] == ["tmpl-generation-prompt-ignored"]

    sarif = cli("check", "--format", "sarif", cwd=project)
    assert sarif.code == 1
    run = _sarif_run(sarif.out)
    (result,) = run["results"]
    location = result["locations"][0]["physicalLocation"]
    # No lock: the result lands on the manifest's [template] table.
    assert location["artifactLocation"]["uri"] == "llmstack.toml"
    assert location["region"]["startLine"] == MANIFEST.splitlines().index("[template]") + 1


def test_check_without_a_lock_or_a_finding_still_says_so(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path, CHATML)
    result = cli("check", cwd=project)
    assert result.code == 2
    assert result.err == "error: llmstack.lock: no lock here; run `stacklock lock`\n"


def test_check_json_carries_versions_digests_and_coverage(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path, UNDEFINED)
    assert cli("lock", cwd=project).code == 0
    result = cli("check", "--format", "json", cwd=project)
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["schema-version"] == 1
    assert document["stacklock-version"] == __version__
    lock_bytes = (project / "llmstack.lock").read_bytes()
    assert document["lock"]["sha256"] == hashlib.sha256(lock_bytes).hexdigest()
    model = hashlib.sha256((project / "model.gguf").read_bytes()).hexdigest()
    assert document["model"] == {
        "path": "model.gguf",
        "sha256": model,
        "size": len((project / "model.gguf").read_bytes()),
    }
    (registry,) = document["registries"]
    assert registry["name"] == "bundled"
    assert len(registry["digest"]) == 64
    coverage = document["coverage"]
    assert set(coverage["rules"]["evaluated"]) == {r.id for r in load_bundled_registry().rules}
    assert all(set(entry) == {"id", "facts"} for entry in coverage["rules"]["missing-facts"])
    assert coverage["probe-corpus-version"] == 1
    assert "tmpl-undefined-variable" in coverage["checks"]["ran"]
    # The tiny SentencePiece vocabulary has no pre-tokenizer: those checks say why they did not run.
    assert {s["id"] for s in coverage["checks"]["skipped"]} == {
        "tok-pre-tokenizer-unknown",
        "tok-pre-tokenizer-unknown-to-engine",
    }
    assert [f["rule"] for f in document["findings"]] == ["tmpl-undefined-variable"]


def test_check_json_says_why_probes_could_not_run(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "model.gguf", chat_template=None)
    (tmp_path / "llmstack.toml").write_text(
        MANIFEST.replace('source = "gguf"', 'source = "none"').replace(
            'messages = [{ role = "user", content = "Hello" }]', 'prompt = "Hello"'
        )
    )
    assert cli("lock", cwd=tmp_path).code == 0
    document = json.loads(cli("check", "--format", "json", cwd=tmp_path).out)
    skipped = {s["id"]: s["reason"] for s in document["coverage"]["checks"]["skipped"]}
    probes = {c.id for c in all_checks() if c.family == "template-probes"}
    assert {skipped[p] for p in probes} == {"the stack has no chat template"}
    assert not probes & set(document["coverage"]["checks"]["ran"])


def test_sarif_lists_every_rule_and_probe_and_points_at_the_lock_line(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path, UNDEFINED)
    assert cli("lock", cwd=project).code == 0
    result = cli("check", "--format", "sarif", cwd=project)
    assert result.code == 0, result.err
    run = _sarif_run(result.out)
    ids = [d["id"] for d in run["tool"]["driver"]["rules"]]
    assert len(ids) == len(set(ids))
    assert set(ids) >= {r.id for r in load_bundled_registry().rules} | {c.id for c in all_checks()}
    (found,) = run["results"]
    assert ids[found["ruleIndex"]] == found["ruleId"] == "tmpl-undefined-variable"
    lock_text = (project / "llmstack.lock").read_text()
    line = found["locations"][0]["physicalLocation"]["region"]["startLine"]
    # A template finding lands on the pinned template text.
    assert lock_text.splitlines()[line - 1].startswith("text = ")
    assert table_lines(lock_text)["template"] == line


def test_table_lines() -> None:
    text = (
        '[stack]\nname = "x"\n\n[template]\nsource = "gguf"\ntext = """\n[model]\n"""\n[model]\npath = "m"\n'
    )
    # The template's text line wins over its table header; nothing inside the multi-line text is a header.
    assert table_lines(text) == {"stack": 1, "template": 6, "model": 9}
