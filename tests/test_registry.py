"""Registries from a local directory, a real git repository and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import subprocess
import tarfile
import threading
import tomllib
from typing import TYPE_CHECKING

import pytest

from stacklock.errors import NetworkError, RegistryError
from stacklock.model.findings import RegistryPin, RegistrySource
from stacklock.registry.export import export_stack_entry, render_stack_meta
from stacklock.registry.fetch import compare_pins, resolve_registries
from stacklock.registry.files import (
    StackMeta,
    json_schemas,
    load_bundled_registry,
    read_registry,
    registry_digest,
)
from stacklock.registry.query import find_stack, find_template, list_entries, search_entries, show_entry
from stacklock.rules.predicates import evaluate, rules_for
from tests.conftest import run_fresh

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

RULE = """id = "{rid}"
title = "Community rule {rid}"
severity = "warning"
links = ["engine"]
explanation = "Explained."
fix = "Fixed."
references = ["https://example.org/{rid}"]

[when]
fact = "engine.name"
equals = "{engine}"
"""


def make_registry(root: Path, rule_ids: tuple[str, ...] = ("community-one",), engine: str = "vllm") -> Path:
    (root / "rules").mkdir(parents=True)
    (root / "registry.toml").write_text('format-version = 1\nname = "community"\n')
    for rid in rule_ids:
        (root / "rules" / f"{rid}.toml").write_text(RULE.format(rid=rid, engine=engine))
    return root


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
            "-c",
            "init.defaultBranch=main",
            *args,
        ],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def tar_gz(root: Path, prefix: str = "community-main") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(root, arcname=prefix)
    return buffer.getvalue()


class Server:
    """A real HTTP server on 127.0.0.1 serving a directory, in a thread."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt: str, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    public = tmp_path / "public"
    public.mkdir()
    server = Server(public)
    try:
        yield server, public
    finally:
        server.stop()


def test_bundled_registry_loads_and_its_digest_is_stable() -> None:
    first = load_bundled_registry()
    # Stable means: the same in another process, with another hash seed, from another directory.
    again = run_fresh(
        "from stacklock.registry.files import load_bundled_registry as load; print(load().pin.digest)"
    )
    assert again.strip() == first.pin.digest
    assert first.pin.name == "bundled"
    assert len(first.pin.digest) == 64
    assert len(first.rules) >= 30
    assert {t.id for t in first.templates} >= {"gemma3-it"}
    assert "llama-cpp-python" in first.engines.tables


def test_digest_covers_paths_and_contents() -> None:
    base = {"registry.toml": b"a", "rules/x.toml": b"b"}
    # Known value: hashlib on the literal stream b"registry.toml\0" b"1\0" b"a" b"rules/x.toml\0" b"1\0" b"b".
    assert registry_digest(base) == "4caeaab80ab3b7d9c91e3a104653de34ec254d9883d6228f40d120567a3083f8"
    assert registry_digest(base) == registry_digest(dict(reversed(base.items())))
    assert registry_digest(base) != registry_digest({**base, "rules/x.toml": b"c"})
    assert registry_digest(base) != registry_digest({"registry.toml": b"a", "rules/y.toml": b"b"})
    assert registry_digest({"ab": b"c"}) != registry_digest({"a": b"bc"})


def test_local_directory_registry(tmp_path: Path) -> None:
    make_registry(tmp_path / "reg")
    (tmp_path / "reg" / ".git").mkdir()
    (tmp_path / "reg" / ".git" / "junk").write_text("ignored")
    loaded = resolve_registries([RegistrySource(name="local", url="reg")], base_dir=tmp_path)
    assert [r.name for r in loaded] == ["bundled", "local"]
    assert loaded[1].revision is None
    findings = evaluate(rules_for(loaded), {"engine.name": "vllm", "engine.version": "0.8.2"})
    assert ("community-one", "local") in {(f.rule, f.registry) for f in findings}
    before = loaded[1].digest
    (tmp_path / "reg" / "rules" / "community-one.toml").write_text(
        RULE.format(rid="community-one", engine="ollama")
    )
    after = resolve_registries([RegistrySource(name="local", url="reg")], base_dir=tmp_path)[1]
    assert after.digest != before
    assert compare_pins([loaded[0].pin, loaded[1].pin], [loaded[0], after]) == (
        f"registry 'local' changed: digest {before[:12]} → {after.digest[:12]}; re-lock to accept the new rules",
    )


def test_git_registry_is_pinned_to_a_commit_and_cached_for_offline_use(tmp_path: Path) -> None:
    repo = make_registry(tmp_path / "repo")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    first_commit = git(repo, "rev-parse", "HEAD")
    cache = tmp_path / "cache"
    source = RegistrySource(name="community", url=f"git+file://{repo}")
    (loaded,) = resolve_registries([source], cache_dir=cache, include_bundled=False)
    assert loaded.revision == first_commit
    assert loaded.rules[0].registry == "community"
    assert (cache / "registries" / loaded.digest / "rules" / "community-one.toml").is_file()

    # A new commit on the branch: the pinned resolve keeps the pinned commit, a refresh sees the new one.
    (repo / "rules" / "community-two.toml").write_text(RULE.format(rid="community-two", engine="vllm"))
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "two")
    pinned = resolve_registries([source], pins=[loaded.pin], cache_dir=cache, include_bundled=False)[0]
    assert pinned.pin == loaded.pin
    fresh = resolve_registries(
        [source], pins=[loaded.pin], refresh=True, cache_dir=cache, include_bundled=False
    )[0]
    assert fresh.revision == git(repo, "rev-parse", "HEAD")
    assert fresh.digest != loaded.digest
    assert [r.id for r in fresh.rules] == ["community-one", "community-two"]

    # The repository is gone: offline with the pin still resolves from the cache.
    (repo / ".git").rename(tmp_path / "moved.git")
    offline = resolve_registries(
        [source], pins=[loaded.pin], offline=True, cache_dir=cache, include_bundled=False
    )
    assert offline[0].pin == loaded.pin
    with pytest.raises(NetworkError) as caught:
        resolve_registries([source], cache_dir=cache, include_bundled=False)
    assert str(caught.value).startswith(f"registry 'community': cannot clone git+file://{repo}: ")


def test_git_registry_at_a_tag_and_an_unknown_revision(tmp_path: Path) -> None:
    repo = make_registry(tmp_path / "repo")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    git(repo, "tag", "v1")
    commit = git(repo, "rev-parse", "HEAD")
    tagged = RegistrySource(name="c", url=f"git+file://{repo}", revision="v1")
    assert resolve_registries([tagged], cache_dir=tmp_path / "c", include_bundled=False)[0].revision == commit
    missing = RegistrySource(name="c", url=f"git+file://{repo}", revision="nope")
    with pytest.raises(RegistryError) as caught:
        resolve_registries([missing], cache_dir=tmp_path / "c", include_bundled=False)
    assert str(caught.value) == (
        f"registry 'c': revision 'nope' is not in git+file://{repo}; use a branch, tag or commit that exists"
    )


def test_archive_over_http_is_cached_and_read_offline_when_pinned(
    tmp_path: Path, served: tuple[Server, Path]
) -> None:
    server, public = served
    (public / "community.tar.gz").write_bytes(tar_gz(make_registry(tmp_path / "src")))
    source = RegistrySource(name="community", url=f"{server.url}/community.tar.gz")
    cache = tmp_path / "cache"
    (loaded,) = resolve_registries([source], cache_dir=cache, include_bundled=False)
    assert [r.id for r in loaded.rules] == ["community-one"]
    assert loaded.digest == registry_digest(
        {
            "registry.toml": (tmp_path / "src" / "registry.toml").read_bytes(),
            "rules/community-one.toml": (tmp_path / "src" / "rules" / "community-one.toml").read_bytes(),
        }
    )

    # A changed archive: a refresh reports a different digest.
    (tmp_path / "src" / "rules" / "community-one.toml").write_text(
        RULE.format(rid="community-one", engine="ollama")
    )
    (public / "community.tar.gz").write_bytes(tar_gz(tmp_path / "src"))
    changed = resolve_registries(
        [source], pins=[loaded.pin], refresh=True, cache_dir=cache, include_bundled=False
    )
    assert changed[0].digest != loaded.digest
    assert compare_pins([loaded.pin], changed)[0].startswith("registry 'community' changed: digest ")

    server.stop()
    again = resolve_registries([source], pins=[loaded.pin], cache_dir=cache, include_bundled=False)
    assert again[0].pin == loaded.pin
    with pytest.raises(NetworkError) as caught:
        resolve_registries([source], pins=[loaded.pin], refresh=True, cache_dir=cache, include_bundled=False)
    assert str(caught.value).startswith(f"registry 'community': cannot reach {source.url}: ")
    unpinned = RegistryPin(name="community", url=source.url, digest="0" * 64)
    with pytest.raises(NetworkError) as caught:
        resolve_registries([source], pins=[unpinned], offline=True, cache_dir=cache, include_bundled=False)
    assert str(caught.value) == (
        f"registry 'community' ({source.url}) cannot be read offline: its pinned digest is not cached; "
        "run once without --offline to fill the cache"
    )


def test_http_errors_and_plain_http_elsewhere(tmp_path: Path, served: tuple[Server, Path]) -> None:
    server, _ = served
    missing = RegistrySource(name="c", url=f"{server.url}/missing.tar.gz")
    with pytest.raises(NetworkError) as caught:
        resolve_registries([missing], cache_dir=tmp_path, include_bundled=False)
    assert str(caught.value) == f"registry 'c': {missing.url} answered HTTP 404 File not found; check the URL"
    remote = RegistrySource(name="c", url="http://example.org/r.tar.gz")
    with pytest.raises(RegistryError) as refused:
        resolve_registries([remote], cache_dir=tmp_path, include_bundled=False)
    assert str(refused.value) == (
        "registry 'c': http://example.org/r.tar.gz: plain http is only allowed for 127.0.0.1 and localhost; use https://"
    )


def test_archive_members_escaping_the_tree_are_refused(tmp_path: Path, served: tuple[Server, Path]) -> None:
    server, public = served
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = b"x"
        info = tarfile.TarInfo("../evil.toml")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    (public / "evil.tar.gz").write_bytes(buffer.getvalue())
    source = RegistrySource(name="c", url=f"{server.url}/evil.tar.gz")
    with pytest.raises(RegistryError) as caught:
        resolve_registries([source], cache_dir=tmp_path / "cache", include_bundled=False)
    assert (
        str(caught.value)
        == f"{source.url}: archive member '../evil.toml' escapes the archive; refusing to extract it"
    )
    assert not (tmp_path / "evil.toml").exists()


def test_malformed_registries_name_the_file(tmp_path: Path) -> None:
    root = make_registry(tmp_path / "a")
    (root / "rules" / "community-one.toml").rename(root / "rules" / "other.toml")
    with pytest.raises(RegistryError) as caught:
        read_registry(root, name="a", url=str(root))
    assert str(caught.value) == (
        f"{root}/rules/other.toml: id: 'community-one' differs from the file name; rename it community-one.toml"
    )
    root = make_registry(tmp_path / "b")
    (root / "registry.toml").write_text('format-version = 2\nname = "x"\n')
    with pytest.raises(RegistryError) as caught:
        read_registry(root, name="b", url=str(root))
    assert str(caught.value) == (
        f"{root}/registry.toml: format-version 2 is newer than this stacklock reads (1); upgrade stacklock"
    )
    (root / "registry.toml").unlink()
    with pytest.raises(RegistryError, match=r"registry\.toml: missing; a registry needs a registry\.toml"):
        read_registry(root, name="b", url=str(root))


def test_rule_ids_are_unique_across_registries(tmp_path: Path) -> None:
    make_registry(tmp_path / "one", ("shared",))
    make_registry(tmp_path / "two", ("shared",))
    sources = [
        RegistrySource(name="one", url=str(tmp_path / "one")),
        RegistrySource(name="two", url=str(tmp_path / "two")),
    ]
    with pytest.raises(RegistryError) as caught:
        resolve_registries(sources, include_bundled=False)
    assert str(caught.value) == (
        "rule 'shared' is defined by registry 'one' and by registry 'two'; rule ids must be unique, rename one"
    )
    with pytest.raises(RegistryError, match=r"^registry 'bundled': the name is reserved"):
        resolve_registries([RegistrySource(name="bundled", url=str(tmp_path / "one"))])


def test_template_entries_are_checked_against_their_file(tmp_path: Path) -> None:
    root = make_registry(tmp_path / "r")
    (root / "templates").mkdir()
    (root / "templates" / "t.jinja").write_text("{{ messages }}")
    entry = """id = "t"
title = "T"
sha256 = "{sha}"
source-repo = "owner/model"
source-revision = "0123456"
source-path = "chat_template.jinja"
reproduces = "transformers' apply_chat_template"
"""
    (root / "templates" / "t.toml").write_text(entry.format(sha="0" * 64))
    with pytest.raises(RegistryError) as caught:
        read_registry(root, name="r", url=str(root))
    assert str(caught.value).startswith(
        f"{root}/templates/t.toml: sha256: does not match templates/t.jinja (its sha256 is "
    )
    (root / "templates" / "t.toml").write_text(
        entry.format(sha=hashlib.sha256(b"{{ messages }}").hexdigest())
    )
    loaded = read_registry(root, name="r", url=str(root))
    found = find_template([loaded], "t")
    assert (found.text, found.registry, found.id) == ("{{ messages }}", "r", "t")
    with pytest.raises(
        RegistryError, match=r"^no template named 'u' in the registries \(known templates: t\)"
    ):
        find_template([loaded], "u")


CERTIFICATE = json.dumps({"certificate-version": 1, "verdict": "reproduced"})


def test_share_a_stack_and_reuse_it_through_a_registry_served_over_http(
    tmp_path: Path, served: tuple[Server, Path]
) -> None:
    server, public = served
    repo = make_registry(tmp_path / "community")
    manifest = '[stack]\nname = "gemma3-cpu"\n'
    lock = 'lock-version = 1\n[stack]\nname = "gemma3-cpu"\n'
    checked: list[str] = []
    entry = export_stack_entry(
        manifest,
        lock,
        CERTIFICATE,
        repo,
        "gemma3-cpu",
        title="Gemma 3 270M on CPU",
        tags=("gemma3", "cpu"),
        check=lambda m, lk, c: checked.append(str(c["verdict"])),
    )
    assert entry == repo / "stacks" / "gemma3-cpu"
    assert checked == ["reproduced"]
    assert (entry / "stack.toml").read_text() == (
        'name = "gemma3-cpu"\ntitle = "Gemma 3 270M on CPU"\ntags = ["gemma3", "cpu"]\n'
    )
    with pytest.raises(RegistryError, match="a stack entry with this name exists"):
        export_stack_entry(manifest, lock, CERTIFICATE, repo, "gemma3-cpu")
    with pytest.raises(RegistryError) as caught:
        export_stack_entry(manifest, lock, "[1]", repo, "other")
    assert str(caught.value) == f"{repo}/stacks/other/certificate.json: a certificate must be a JSON object"
    assert not (repo / "stacks" / "other").exists()

    (public / "community.tar.gz").write_bytes(tar_gz(repo))
    registries = resolve_registries(
        [RegistrySource(name="community", url=f"{server.url}/community.tar.gz")], cache_dir=tmp_path / "cache"
    )
    stack = find_stack(registries, "gemma3-cpu")
    assert (stack.registry, stack.manifest_text, stack.lock_text) == ("community", manifest, lock)
    assert stack.certificate == {"certificate-version": 1, "verdict": "reproduced"}
    with pytest.raises(RegistryError) as caught:
        find_stack(registries, "nope")
    assert (
        str(caught.value)
        == "no stack named 'nope' in the registries (known stacks: gemma3-cpu); check the name"
    )


def test_list_show_and_search(tmp_path: Path) -> None:
    registries = resolve_registries(
        [RegistrySource(name="community", url=str(make_registry(tmp_path / "r")))]
    )
    everything = list_entries(registries)
    kinds = [e.kind for e in everything]
    assert kinds == sorted(kinds, key=["rule", "template", "stack"].index)
    rules = list_entries(registries, "rule")
    assert ("community-one", "community") in {(e.id, e.registry) for e in rules}
    assert [e.id for e in list_entries(registries, "template")] == ["gemma3-it"]
    hits = search_entries(registries, "gemma2 SOFT-CAPPING")
    assert "arch-gemma2-softcap" in [h.id for h in hits]
    assert all(h.kind == "rule" for h in hits)
    assert [h.id for h in search_entries(registries, "example.org/community-one")] == ["community-one"]
    assert search_entries(registries, "no-such-words-anywhere") == ()
    shown = show_entry(registries, "arch-gemma2-softcap")
    assert shown.kind == "rule"
    assert shown.registry == "bundled"
    assert 'id = "arch-gemma2-softcap"' in shown.text
    template = show_entry(registries, "gemma3-it")
    assert (template.kind, template.text) == ("template", find_template(registries, "gemma3-it").text)
    with pytest.raises(RegistryError) as caught:
        show_entry(registries, "nope")
    assert str(caught.value) == (
        "no rule, template or stack named 'nope' in the registries (bundled, community); "
        "`stacklock registry search` finds entries"
    )


def test_json_schemas_describe_the_registry_files() -> None:
    schemas = json_schemas()
    assert sorted(schemas) == [
        "registry-engine.schema.json",
        "registry-index.schema.json",
        "registry-pretokenizers.schema.json",
        "registry-rule.schema.json",
        "registry-stack.schema.json",
        "registry-template.schema.json",
    ]
    rule = schemas["registry-rule.schema.json"]
    assert rule["properties"]["when"] == {
        "$ref": "#/$defs/Predicate",
        "description": "The predicate over the stack's facts that makes the rule fire.",
    }
    assert "Predicate" in rule["$defs"]
    assert "format-version" in schemas["registry-index.schema.json"]["properties"]
    assert "source-revision" in schemas["registry-template.schema.json"]["properties"]


def test_stack_meta_is_written_as_valid_toml_whatever_its_text() -> None:
    # A DEL character is left raw by JSON string escaping but is not allowed in a TOML string.
    meta = StackMeta(name="tiny", title='Tiny "q" \\ \x7f ü', description="two\nlines", tags=("a\x7f", "b"))
    text = render_stack_meta(meta)
    assert StackMeta.model_validate(tomllib.loads(text)) == meta
    assert render_stack_meta(StackMeta(name="tiny", title="t")) == 'name = "tiny"\ntitle = "t"\n'
