"""Sharing a stack, end to end: lock, record, verify, `share` into a registry, serve that registry over HTTP
on 127.0.0.1, `init --from` it in an empty directory, and verify there. Also what `share` refuses, and
`lock --check` on a registry that changed."""

from __future__ import annotations

import functools
import http.server
import shutil
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stacklock.engines.machine import installed_engine_version
from stacklock.model.lock import parse_lock, render_lock
from stacklock.registry.files import load_bundled_registry, read_registry
from stacklock.registry.location import bundled_registry_path
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

Cli = Callable[..., Result]

LCP_VERSION = installed_engine_version("llama-cpp-python") or "0.3.36"
STACK = "tiny-shared"

MANIFEST = f"""\
[stack]
name = "{STACK}"
description = "A tiny ChatML stack, shared"

[model]
source = "tiny.gguf"

[template]
source = "gguf"

[engine]
name = "llama-cpp-python"
version = "=={LCP_VERSION}"

[backend]
kind = "cpu"
threads = 1

[sampler]
temperature = 0.0
seed = 0

[[smoke]]
name = "hello"
messages = [{{ role = "user", content = "Hello" }}]
max-tokens = 4
"""


def _registry(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "registry.toml").write_text(f'format-version = 1\nname = "{name}"\n')
    return directory


def _tar_gz(directory: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        # Under one top-level directory, as forges publish archives.
        tar.add(directory, arcname=directory.name)
    return archive


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name.
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[Path], str]]:
    """Serve a directory over HTTP on 127.0.0.1; returns the base URL."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def certified(tmp_path: Path, cli: Cli) -> Path:
    """A tiny stack, locked, recorded and verified on the real engine, with its certificate in cert.json."""
    pytest.importorskip("llama_cpp")
    project = tmp_path / "project"
    project.mkdir()
    build_tiny_gguf(project / "tiny.gguf", chat_template=CHATML)
    (project / "llmstack.toml").write_text(MANIFEST)
    for args in (("lock",), ("record",), ("verify", "--certificate", "cert.json")):
        result = cli(*args, cwd=project)
        assert result.code == 0, f"{args}: {result.out}{result.err}"
    return project


# -- Share, serve, init --from, verify ------------------------------------------------------------------------


@pytest.mark.engine
def test_shared_stack_is_reused_through_a_registry_served_over_http(
    tmp_path: Path, certified: Path, cli: Cli, serve: Callable[[Path], str]
) -> None:
    registry = _registry(tmp_path / "community", "community")
    shared = cli("share", str(registry), "--certificate", "cert.json", "--tag", "tiny", cwd=certified)
    assert shared.code == 0, shared.err
    entry = registry / "stacks" / STACK
    assert shared.err == (f"wrote {entry}; commit it to the registry repository and open a pull request\n")
    assert sorted(p.name for p in entry.iterdir()) == [
        "certificate.json",
        "llmstack.lock",
        "llmstack.toml",
        "stack.toml",
    ]
    assert (entry / "llmstack.lock").read_bytes() == (certified / "llmstack.lock").read_bytes()
    assert (entry / "stack.toml").read_text() == (
        f'name = "{STACK}"\ntitle = "A tiny ChatML stack, shared"\n'
        'description = "A tiny ChatML stack, shared"\ntags = ["tiny"]\n'
    )
    # The registry as a consumer reads it.
    (loaded,) = read_registry(registry, name="community", url=str(registry)).stacks
    assert loaded.name == STACK

    site = tmp_path / "site"
    site.mkdir()
    _tar_gz(registry, site / "reg.tar.gz")
    url = f"{serve(site)}/reg.tar.gz"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    started = cli("init", "--from", STACK, "--registry", url, cwd=elsewhere)
    assert started.code == 0, started.err
    lock = parse_lock((elsewhere / "llmstack.lock").read_text())
    assert started.err.splitlines() == [
        (
            f"note: put the model at tiny.gguf (sha256 {lock.model.sha256}); "
            "then `stacklock verify` checks this machine reproduces the shared goldens"
        ),
        f"wrote llmstack.toml, llmstack.lock from stack '{STACK}'",
    ]
    assert (elsewhere / "llmstack.toml").read_text() == MANIFEST
    assert (elsewhere / "llmstack.lock").read_bytes() == (certified / "llmstack.lock").read_bytes()

    shutil.copyfile(certified / "tiny.gguf", elsewhere / "tiny.gguf")
    verified = cli("verify", cwd=elsewhere)
    assert verified.code == 0, verified.out + verified.err
    assert verified.out.splitlines()[-1].startswith("reproduced: 1 smoke prompt(s)")
    assert cli("lock", "--check", cwd=elsewhere).code == 0

    listed = cli("registry", "list", "--kind", "stack", "--registry", url, cwd=elsewhere)
    assert listed.code == 0, listed.err
    assert listed.out == f"{'stack':<8} {STACK:<48} {'extra-1':<10} A tiny ChatML stack, shared\n"
    assert listed.err == f"fetching registry 'extra-1' from {url}\n1 entry\n"


def test_init_from_a_stack_the_served_registry_lacks(
    tmp_path: Path, cli: Cli, serve: Callable[[Path], str]
) -> None:
    registry = _registry(tmp_path / "empty", "empty")
    site = tmp_path / "site"
    site.mkdir()
    _tar_gz(registry, site / "reg.tar.gz")
    url = f"{serve(site)}/reg.tar.gz"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = cli("init", "--from", "nope", "--registry", url, cwd=elsewhere)
    assert result.code == 2
    assert result.err.startswith("error: no stack named 'nope' in the registries (known stacks: ")
    assert result.err.count("\n") == 1
    assert list(elsewhere.iterdir()) == []


def test_init_from_an_unreachable_registry_is_a_network_error(tmp_path: Path, cli: Cli) -> None:
    # A port nothing listens on: bind one, then close it.
    server = http.server.HTTPServer(("127.0.0.1", 0), _QuietHandler)
    port = server.server_address[1]
    server.server_close()
    url = f"http://127.0.0.1:{port}/reg.tar.gz"
    result = cli("init", "--from", STACK, "--registry", url, cwd=tmp_path)
    assert result.code == 3
    assert result.err.startswith(f"error: registry 'extra-1': cannot reach {url}: ")
    assert result.err.count("\n") == 1


# -- What share refuses ---------------------------------------------------------------------------------------


@pytest.mark.engine
def test_share_refuses_a_certificate_of_another_lock(tmp_path: Path, certified: Path, cli: Cli) -> None:
    # Recording again with fewer alternatives per token changes the lock after it was certified.
    assert cli("record", "--top-k", "2", cwd=certified).code == 0
    registry = _registry(tmp_path / "community", "community")
    result = cli("share", str(registry), "--certificate", "cert.json", cwd=certified)
    assert result.code == 2
    assert result.err == (
        "error: cert.json: certifies another lock than llmstack.lock (lock-sha256 differs); "
        "run `stacklock verify --certificate FILE` on this lock again\n"
    )
    assert not (registry / "stacks").exists()


@pytest.mark.engine
def test_share_refuses_a_certificate_that_did_not_reproduce(
    tmp_path: Path, certified: Path, cli: Cli
) -> None:
    lock_path = certified / "llmstack.lock"
    lock = parse_lock(lock_path.read_text())
    (recording,) = lock.recordings
    name = lock.smoke[0].name
    golden = recording.goldens[name]
    # A golden this engine does not produce: the first generated token differs.
    wrong = golden.model_copy(update={"tokens": ((golden.tokens[0] + 1) % 900, *golden.tokens[1:])})
    goldens = {**recording.goldens, name: wrong}
    lock_path.write_text(render_lock(lock.with_recording(recording.model_copy(update={"goldens": goldens}))))
    failed = cli("verify", "--certificate", "failed.json", cwd=certified)
    assert failed.code == 1
    registry = _registry(tmp_path / "community", "community")
    result = cli("share", str(registry), "--certificate", "failed.json", cwd=certified)
    assert result.code == 2
    assert result.err == (
        "error: failed.json: the stack did not reproduce; "
        "only certified stacks are shared; make `stacklock verify` pass first\n"
    )
    assert not (registry / "stacks").exists()


@pytest.mark.engine
def test_share_refuses_a_lock_without_goldens(tmp_path: Path, certified: Path, cli: Cli) -> None:
    # The stack changed after it was certified: the re-lock drops the goldens.
    manifest = certified / "llmstack.toml"
    manifest.write_text(manifest.read_text().replace("seed = 0", "seed = 1"))
    relocked = cli("lock", cwd=certified)
    assert relocked.code == 0
    assert "the recorded goldens were dropped" in relocked.err
    registry = _registry(tmp_path / "community", "community")
    result = cli("share", str(registry), "--certificate", "cert.json", cwd=certified)
    assert result.code == 2
    assert result.err == (
        "error: llmstack.lock: no goldens recorded; "
        "run `stacklock record`, then `stacklock verify --certificate FILE`\n"
    )
    assert not (registry / "stacks").exists()


@pytest.mark.engine
def test_share_refuses_an_existing_entry_without_force(tmp_path: Path, certified: Path, cli: Cli) -> None:
    registry = _registry(tmp_path / "community", "community")
    assert cli("share", str(registry), "--certificate", "cert.json", cwd=certified).code == 0
    again = cli("share", str(registry), "--certificate", "cert.json", cwd=certified)
    assert again.code == 2
    assert again.err == (
        f"error: {registry}/stacks/{STACK}: a stack entry with this name exists; "
        "choose another name or overwrite it\n"
    )
    assert cli("share", str(registry), "--certificate", "cert.json", "--force", cwd=certified).code == 0


def test_share_refuses_a_directory_that_is_not_a_registry(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "plain").mkdir()
    result = cli("share", "plain", "--certificate", "cert.json", cwd=tmp_path)
    assert result.code == 2
    assert result.err == (
        "error: plain: not a registry (no registry.toml); give the path of a registry checkout, "
        "or create registry.toml with format-version = 1 and a name\n"
    )
    missing = cli("share", "nowhere", "--certificate", "cert.json", cwd=tmp_path)
    assert missing.code == 2
    assert missing.err == "error: nowhere: not a directory; give the path of a registry checkout\n"


# -- lock --check and a configured registry that changed -----------------------------------------------------


def test_lock_check_names_a_local_registry_whose_digest_changed(tmp_path: Path, cli: Cli) -> None:
    registry = _registry(tmp_path / "team-registry", "team")
    (registry / "rules").mkdir()
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML)
    (tmp_path / "llmstack.toml").write_text(
        MANIFEST + '\n[[registry]]\nname = "team"\nurl = "team-registry"\n'
    )
    assert cli("lock", cwd=tmp_path).code == 0
    assert cli("lock", "--check", cwd=tmp_path).code == 0
    (pin,) = [p for p in parse_lock((tmp_path / "llmstack.lock").read_text()).registries if p.name == "team"]

    (registry / "rules" / "team-note.toml").write_text(
        'id = "team-note"\ntitle = "A note"\nseverity = "info"\nlinks = ["model"]\n'
        'explanation = "Added after locking."\nfix = "Nothing to do."\n'
        'references = ["https://example.org/team/1"]\n\n[when]\nfact = "engine.name"\npresent = true\n'
    )
    now = read_registry(registry, name="team", url="team-registry").pin.digest
    assert now != pin.digest
    result = cli("lock", "--check", cwd=tmp_path)
    assert result.code == 1
    assert result.err == (
        f"error: llmstack.lock is stale: registry 'team' changed: digest {pin.digest[:12]} → {now[:12]}; "
        "re-lock to accept the new rules; run `stacklock lock` to re-pin\n"
    )
    assert cli("lock", cwd=tmp_path).code == 0
    assert cli("lock", "--check", cwd=tmp_path).code == 0


# -- Browsing the registries: registry list, show, search -----------------------------------------------------

BUNDLED = load_bundled_registry()


def _line(kind: str, entry_id: str, title: str, severity: str | None = None) -> str:
    suffix = f" [{severity}]" if severity else ""
    return f"{kind:<8} {entry_id:<48} {'bundled':<10} {title}{suffix}"


def test_registry_list(tmp_path: Path, cli: Cli) -> None:
    result = cli("registry", "list", cwd=tmp_path)
    assert result.code == 0, result.err
    first = min(BUNDLED.rules, key=lambda r: r.id)
    lines = result.out.splitlines()
    assert lines[0] == _line("rule", first.id, first.title, first.severity.value)
    total = len(BUNDLED.rules) + len(BUNDLED.templates) + len(BUNDLED.stacks)
    assert len(lines) == total
    assert result.err == f"{total} entries\n"


def test_registry_list_templates(tmp_path: Path, cli: Cli) -> None:
    result = cli("registry", "list", "--kind", "templates", cwd=tmp_path)
    assert result.code == 0, result.err
    first = min(BUNDLED.templates, key=lambda t: t.id)
    assert result.out.splitlines()[0] == _line("template", first.id, first.title)
    assert all(line.startswith("template ") for line in result.out.splitlines())


def test_registry_list_rejects_an_unknown_kind(tmp_path: Path, cli: Cli) -> None:
    result = cli("registry", "list", "--kind", "models", cwd=tmp_path)
    assert result.code == 2
    assert result.err == "error: --kind models: unknown kind; use rule, template or stack\n"


def test_registry_show_prints_the_rule_file(tmp_path: Path, cli: Cli) -> None:
    result = cli("registry", "show", "tok-double-bos-llama-cpp-python", cwd=tmp_path)
    assert result.code == 0, result.err
    assert result.err == "rule 'tok-double-bos-llama-cpp-python' from registry 'bundled'\n"
    path = bundled_registry_path() / "rules" / "tok-double-bos-llama-cpp-python.toml"
    assert result.out == path.read_text().rstrip("\n") + "\n"


def test_registry_show_an_unknown_entry(tmp_path: Path, cli: Cli) -> None:
    result = cli("registry", "show", "no-such-rule", cwd=tmp_path)
    assert result.code == 2
    assert result.err == (
        "error: no rule, template or stack named 'no-such-rule' in the registries (bundled); "
        "`stacklock registry search` finds entries\n"
    )


def test_registry_search(tmp_path: Path, cli: Cli) -> None:
    result = cli("registry", "search", "double", "BOS", cwd=tmp_path)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    rule = next(r for r in BUNDLED.rules if r.id == "tok-double-bos-llama-cpp-python")
    assert _line("rule", rule.id, rule.title, rule.severity.value) in lines
    assert "tok-double-bos-llamacpp-jinja" in result.out
    assert "arch-gemma2-softcap" not in result.out
    assert result.err == f"{len(lines)} entries\n"


def test_registry_search_without_matches(tmp_path: Path, cli: Cli) -> None:
    result = cli("registry", "search", "no-such-words-anywhere", cwd=tmp_path)
    assert (result.code, result.out, result.err) == (0, "", "0 entries\n")
