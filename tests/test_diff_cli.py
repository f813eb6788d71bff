"""`stacklock diff A.lock B.lock`: what differs between two locks, link by link."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from stacklock.lock.diff import diff_locks
from stacklock.lock.project import read_lock
from stacklock.model.lock import render_lock
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

Cli = Callable[..., Result]

MANIFEST = """[stack]
name = "diff"

[model]
source = "tiny.gguf"

[template]
source = "file:chat.jinja"

[engine]
name = "llama-cpp-python"

[sampler]
temperature = {temperature}
seed = 0

[[smoke]]
name = "hi"
max-tokens = 3
messages = [{{ role = "user", content = "hello" }}]
"""


def _locked(directory: Path, cli: Cli, *, template: str = CHATML, temperature: float = 0.0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_gguf(directory / "tiny.gguf", chat_template=CHATML)
    (directory / "chat.jinja").write_text(template)
    (directory / "llmstack.toml").write_text(MANIFEST.format(temperature=temperature))
    result = cli("lock", cwd=directory)
    assert result.code == 0, result.err
    return directory / "llmstack.lock"


def test_identical_locks_exit_0(tmp_path: Path, cli: Cli) -> None:
    a = _locked(tmp_path / "a", cli)
    b = _locked(tmp_path / "b", cli)
    result = cli("diff", str(a), str(b), cwd=tmp_path)
    assert result.code == 0
    assert "pin the same stack" in result.out


def test_a_changed_template_and_sampler_are_shown_link_by_link(tmp_path: Path, cli: Cli) -> None:
    a = _locked(tmp_path / "a", cli)
    b = _locked(tmp_path / "b", cli, template=CHATML.replace("assistant\n", "model\n"), temperature=0.7)
    result = cli("diff", str(a), str(b), cwd=tmp_path)
    assert result.code == 1
    out = result.out
    assert "template:\n  the template text changed (diff below)" in out
    assert "    +{% endfor %}{% if add_generation_prompt %}<|im_start|>model\n" in out
    assert "sampler.temperature: 0.0 → 0.7" in out
    assert "hi: the rendered prompt changed at character" in out
    # The manifest changed too, and the links come in chain order.
    assert out.index("template:") < out.index("sampler:") < out.index("smoke:")
    data = json.loads(cli("diff", "--format", "json", str(a), str(b), cwd=tmp_path).out)
    assert data["identical"] is False
    template = next(link for link in data["links"] if link["link"] == "template")
    assert template["template-diff"].startswith("--- a/template\n+++ b/template")


def test_goldens_are_compared_at_the_first_differing_token(tmp_path: Path, cli: Cli) -> None:
    a = _locked(tmp_path / "a", cli)
    assert cli("record", cwd=a.parent).code == 0
    b = tmp_path / "b.lock"
    lock = read_lock(a)
    (recording,) = lock.recordings
    golden = recording.goldens["hi"]
    tokens = (*golden.tokens[:1], golden.tokens[1] + 1, *golden.tokens[2:])
    changed = recording.model_copy(update={"goldens": {"hi": golden.model_copy(update={"tokens": tokens})}})
    b.write_text(render_lock(lock.with_recording(changed)))
    result = cli("diff", str(a), str(b), cwd=tmp_path)
    assert result.code == 1
    assert (
        f"{recording.id} hi: generated tokens: first difference at token 1: {golden.tokens[1]} → "
        f"{golden.tokens[1] + 1}" in result.out
    )
    # A recording made on another engine or backend is named as one lock's only.
    other = recording.model_copy(update={"id": recording.id.replace("-cpu", "-cuda")})
    b.write_text(render_lock(lock.with_recording(other)))
    result = cli("diff", str(a), str(b), cwd=tmp_path)
    assert result.code == 1
    assert f"recording:\n  {other.id}: only in the second lock" in result.out


def test_model_drift_is_explained(tmp_path: Path, cli: Cli) -> None:
    a = _locked(tmp_path / "a", cli)
    shutil.copytree(a.parent, tmp_path / "b")
    build_tiny_gguf(tmp_path / "b" / "tiny.gguf", chat_template=CHATML, name="renamed")
    assert cli("lock", cwd=tmp_path / "b").code == 0
    found = diff_locks(read_lock(a), read_lock(tmp_path / "b" / "llmstack.lock"))
    model = next(link for link in found.links if link.link == "model")
    assert model.summary == ("metadata changed: general.name", "tensor data identical")
    assert {c.key for c in model.changes} >= {"model.sha256", "model.name", "model.metadata.general.name"}


def test_a_bad_lock_is_exit_2(tmp_path: Path, cli: Cli) -> None:
    a = _locked(tmp_path / "a", cli)
    (tmp_path / "bad.lock").write_text("lock-version = [")
    assert cli("diff", str(a), str(tmp_path / "bad.lock"), cwd=tmp_path).code == 2
    missing = cli("diff", str(a), str(tmp_path / "none.lock"), cwd=tmp_path)
    assert missing.code == 2
    assert missing.err.startswith("error: ")
