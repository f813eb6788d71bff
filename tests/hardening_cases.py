"""Hostile inputs found by a fuzz run (issue 13), as data: each case builds a project and names a command.

Every case runs the real CLI in a child process and must end with exit 2 or 3 (or the exit it states) and one
``error:`` line, no traceback, within :data:`TIME_LIMIT_S`, and within :data:`MEMORY_LIMIT_MB` of a baseline run.
``tests/test_hardening.py`` runs them as regression tests; ``benchmarks/bench_reliability.py`` prints figures.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import CHATML
from tests.gguf_builder import VT, RawGGUF, TypedValue, build_tiny_gguf, spm_vocab

TIME_LIMIT_S = 20.0
MEMORY_LIMIT_MB = 300.0

MANIFEST = """\
[stack]
name = "hostile"

[model]
source = "{model}"

[template]
source = "{template}"

[engine]
name = "llama-cpp-python"
version = "==0.3.36"

[backend]
kind = "cpu"
threads = 1
context-size = 256
{backend}
[sampler]
temperature = 0.0
seed = 1
{sampler}
[[smoke]]
name = "hello"
messages = [{{ role = "user", content = "Hello" }}]
max-tokens = 4
{smoke}"""


def manifest(
    model: str = "tiny.gguf", template: str = "gguf", *, backend: str = "", sampler: str = "", smoke: str = ""
) -> str:
    return MANIFEST.format(model=model, template=template, backend=backend, sampler=sampler, smoke=smoke)


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    setup: Callable[[Path], None]
    """Writes the project into the directory."""
    args: tuple[str, ...]
    codes: frozenset[int] = frozenset({2})
    needle: str = ""
    """Text the error line must contain."""
    env: dict[str, str] = field(default_factory=dict)
    engine: bool = False
    """Needs llama-cpp-python."""


@dataclass(frozen=True)
class Outcome:
    code: int
    stderr: str
    stdout: str
    seconds: float
    max_rss_mb: float
    hung: bool

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr


def measure(args: tuple[str, ...], cwd: Path, env: dict[str, str] | None = None) -> Outcome:
    """The CLI in a child process, with its own peak RSS from wait4 (Linux ru_maxrss is in KiB)."""
    full = {k: v for k, v in os.environ.items() if k != "STACKLOCK_ALLOW_PATHS"} | (env or {})
    err_path = cwd / ".stderr.capture"
    start = time.monotonic()
    with err_path.open("w") as err_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "stacklock", *args],
            cwd=cwd,
            env=full,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            stdin=subprocess.DEVNULL,
        )
    hung = False
    deadline = start + TIME_LIMIT_S * 2
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            hung = True
            process.kill()
            pid, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.02)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - start
    err = err_path.read_text(errors="replace")
    err_path.unlink()
    return Outcome(
        process.returncode, err, "", seconds, usage.ru_maxrss / 1024, hung or seconds > TIME_LIMIT_S
    )


def baseline_rss_mb(cwd: Path) -> float:
    return measure(("--help",), cwd).max_rss_mb


# ---------------------------------------------------------------------------------------------- builders


def _tiny(path: Path, **kwargs: object) -> None:
    kwargs.setdefault("chat_template", CHATML)
    build_tiny_gguf(path / "tiny.gguf", **kwargs)  # type: ignore[arg-type]


def _project(template: str = "gguf", **kwargs: str) -> Callable[[Path], None]:
    def setup(path: Path) -> None:
        _tiny(path)
        (path / "llmstack.toml").write_text(manifest(template=template, **kwargs))

    return setup


def _template(text: str) -> Callable[[Path], None]:
    def setup(path: Path) -> None:
        _project("file:chat.jinja")(path)
        (path / "chat.jinja").write_text(text)

    return setup


def _nested_gguf(depth: int) -> Callable[[Path], None]:
    def setup(path: Path) -> None:
        value = struct.pack("<IQ", int(VT.UINT32), 0)
        for _ in range(depth - 1):
            value = struct.pack("<IQ", int(VT.ARRAY), 1) + value
        raw = RawGGUF()
        raw.add("general.architecture", VT.STRING, "llama")
        raw.kv.append(("general.nested", int(VT.ARRAY), value))
        (path / "tiny.gguf").write_bytes(raw.to_bytes())
        (path / "llmstack.toml").write_text(manifest())

    return setup


def _zero_tensors(path: Path) -> None:
    tokens, scores, types = spm_vocab()
    raw = RawGGUF()
    raw.add("general.architecture", VT.STRING, "llama")
    raw.add("llama.context_length", VT.UINT32, 256)
    raw.add("tokenizer.ggml.model", VT.STRING, "llama")
    raw.add("tokenizer.ggml.tokens", VT.ARRAY, tokens, VT.STRING)
    raw.add("tokenizer.ggml.scores", VT.ARRAY, scores, VT.FLOAT32)
    raw.add("tokenizer.ggml.token_type", VT.ARRAY, types, VT.INT32)
    raw.add("tokenizer.chat_template", VT.STRING, CHATML)
    (path / "tiny.gguf").write_bytes(raw.to_bytes())
    (path / "llmstack.toml").write_text(manifest())


def _bit_flips(seed: int) -> Callable[[Path], None]:
    def setup(path: Path) -> None:
        _project()(path)
        data = bytearray((path / "tiny.gguf").read_bytes())
        rng = random.Random(seed)
        for _ in range(8):
            at = rng.randrange(0, 4096)
            data[at] ^= 1 << rng.randrange(8)
        (path / "tiny.gguf").write_bytes(bytes(data))

    return setup


def _special(kind: str, name: str) -> Callable[[Path], None]:
    """``name`` (the manifest or the lock) replaced by a directory, a FIFO, a socket or a device link."""

    def setup(path: Path) -> None:
        _project()(path)
        if name == "llmstack.lock":
            (path / name).write_text("lock-version = 1\n")
        target = path / name
        target.unlink()
        if kind == "directory":
            target.mkdir()
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "socket":
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(target))
            sock.close()
        else:
            target.symlink_to(kind)

    return setup


def _nested_toml(depth: int, name: str) -> Callable[[Path], None]:
    def setup(path: Path) -> None:
        _project()(path)
        (path / name).write_text("x = " + "[" * depth + "]" * depth + "\n")

    return setup


def _locked(path: Path, project: Callable[[Path], None] | None = None) -> Path:
    """A locked stack, the tiny one unless ``project`` writes another (locked in-process, to save a CLI start);
    returns the lock's path."""
    from stacklock.lock.api import lock_stack  # noqa: PLC0415
    from stacklock.lock.project import write_lock  # noqa: PLC0415

    (project or _project())(path)
    write_lock(path / "llmstack.lock", lock_stack(path / "llmstack.toml"))
    return path / "llmstack.lock"


def _edited_lock(old: str, new: str) -> Callable[[Path], None]:
    """A locked tiny stack whose lock is then edited by hand."""

    def setup(path: Path) -> None:
        lock = _locked(path)
        text = lock.read_text()
        assert old in text, old
        lock.write_text(text.replace(old, new, 1))

    return setup


def _large_kv_cache(path: Path) -> None:
    """A locked stack whose context needs a 256 GiB KV cache: 2 layers of width 1024, 16M tokens, f32 cache."""

    def project(path: Path) -> None:
        _tiny(path, n_embd=1024, n_head=1, n_ff=32, file_type=1)
        text = manifest(backend='cache-type-k = "f32"\ncache-type-v = "f32"\n')
        (path / "llmstack.toml").write_text(text.replace("context-size = 256", "context-size = 16777216"))

    _locked(path, project)


def _nan_weights(path: Path) -> None:
    """A locked tiny stack whose every weight is NaN (F32 tensors: the data region is NaN floats)."""

    def project(path: Path) -> None:
        from stacklock.gguf.reader import read_gguf  # noqa: PLC0415

        _project()(path)
        model = path / "tiny.gguf"
        start = read_gguf(model).data_offset
        data = bytearray(model.read_bytes())
        count = (len(data) - start) // 4
        data[start : start + 4 * count] = struct.pack("<f", float("nan")) * count
        model.write_bytes(bytes(data))

    _locked(path, project)


def _model_replaced(kind: str) -> Callable[[Path], None]:
    """A locked tiny stack whose model file became a directory or a link to a device."""

    def setup(path: Path) -> None:
        _locked(path)
        model = path / "tiny.gguf"
        model.unlink()
        if kind == "directory":
            model.mkdir()
        else:
            model.symlink_to(kind)

    return setup


def _catastrophic_regex(path: Path) -> None:
    """A locked tiny stack with a smoke prompt of 32 tokens whose expect.regex backtracks catastrophically."""
    smoke = (
        '\n[[smoke]]\nname = "long"\nprompt = "Once"\nmax-tokens = 32\n'
        f"expect = {{ regex = '{CATASTROPHIC_REGEX}' }}\n"
    )
    _locked(path, _project(smoke=smoke))


def _golden_tokens(count: int, logprob: str = "-0.1") -> Callable[[Path], None]:
    def setup(path: Path) -> None:
        tokens = ", ".join(["5"] * count)
        logprobs = ", ".join([f"[[5, {logprob}]]"] * count)
        golden = (
            "\n[smoke.golden]\nprompt-token-count = 1\nprompt-tokens-sha256 = "
            f'"{"0" * 64}"\ntokens = [{tokens}]\ntop-logprobs = [{logprobs}]\ntext = "x"\n'
            'stop-reason = "max-tokens"\n'
        )
        lock = _locked(path)
        # The last table of a lock without goldens is its last [[smoke]]: the golden attaches to it.
        lock.write_text(lock.read_text() + golden)

    return setup


def _model(path: Path, source: str = "tiny.gguf", **gguf: object) -> None:
    _tiny(path, **gguf)
    (path / "llmstack.toml").write_text(manifest(model=source))


_NAN = TypedValue(float("nan"), VT.FLOAT32)
_ARRAY = TypedValue([1, 2], VT.ARRAY, VT.UINT32)


def _replaced(old: str, new: str) -> Callable[[Path], None]:
    def setup(path: Path) -> None:
        _project()(path)
        text = (path / "llmstack.toml").read_text()
        assert old in text, old
        (path / "llmstack.toml").write_text(text.replace(old, new, 1))

    return setup


CATASTROPHIC_REGEX = "^(?:.|.)*(?!)"
"""Never matches, and tries every split of the text between two alternatives: 2^n steps on n characters."""

_HF_CLOSED = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}

CASES: tuple[Case, ...] = (
    # -- GGUF headers
    Case(
        "gguf", "arrays-nested-300-deep-inspect", _nested_gguf(300), ("inspect", "tiny.gguf"), needle="nests"
    ),
    Case("gguf", "arrays-nested-300-deep-lock", _nested_gguf(300), ("lock",), needle="nests"),
    Case(
        "gguf",
        "chat-template-2mb",
        lambda p: _model(p, chat_template=CHATML + "{# " + "x" * (2 << 20) + " #}"),
        ("lock",),
        codes=frozenset({0, 1, 2}),
    ),
    *(
        Case("gguf", f"header-bit-flips-{seed}", _bit_flips(seed), ("lock",), codes=frozenset({0, 1, 2}))
        for seed in range(6)
    ),
    Case("gguf", "zero-tensors-lock", _zero_tensors, ("lock",), codes=frozenset({0, 1, 2})),
    Case(
        "gguf",
        "nan-rms-epsilon-lock",
        lambda p: _model(p, extra_metadata={"llama.attention.layer_norm_rms_epsilon": _NAN}),
        ("lock",),
        codes=frozenset({0}),
    ),
    Case(
        "gguf",
        "token-id-is-an-array",
        lambda p: _model(p, extra_metadata={"tokenizer.ggml.bos_token_id": _ARRAY}),
        ("lock",),
        needle="an array of 2",
    ),
    # -- Templates
    Case("template", "break-outside-loop", _template("{% break %}"), ("lock",)),
    Case(
        "template",
        "21-nested-for",
        _template("{% for a in [1] %}" * 21 + "x" + "{% endfor %}" * 21),
        ("lock",),
        needle="does not compile",
    ),
    Case("template", "101-nested-if", _template("{% if 1 %}" * 101 + "x" + "{% endif %}" * 101), ("lock",)),
    Case(
        "template",
        "120-nested-generation",
        _template("{% generation %}" * 120 + "x" + "{% endgeneration %}" * 120),
        ("lock",),
    ),
    Case(
        "template",
        "2000-nested-parentheses",
        _template("{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}"),
        ("lock",),
    ),
    Case("template", "1000-nested-lists", _template("{{ " + "[" * 1000 + "]" * 1000 + " }}"), ("lock",)),
    Case(
        "template",
        "300-term-sum",
        _template("{{ " + " + ".join(["1"] * 300) + " }}"),
        ("lock",),
        codes=frozenset({0, 2}),
    ),
    Case(
        "template",
        "wordwrap-1-on-1mb",
        _template("{{ ('a' * 400000) | wordwrap(1) }}"),
        ("lock",),
        needle="exceeded",
    ),
    Case(
        "template",
        "sum-of-100000-lists",
        _template("{{ ([[1, 2]] * 100000) | sum(start=[]) | length }}"),
        ("lock",),
        needle="exceeded",
    ),
    Case(
        "template",
        "format-width-from-text",
        _template("{{ '{0:{1}}'.format('a', '1500000000') }}"),
        ("lock",),
    ),
    # -- Manifests, locks and sources
    *(
        Case(
            "files",
            f"manifest-is-{label}",
            _special(kind, "llmstack.toml"),
            (command,),
            needle="regular file",
        )
        for label, kind in (
            ("a-directory", "directory"),
            ("a-fifo", "fifo"),
            ("a-socket", "socket"),
            ("dev-zero", "/dev/zero"),
            ("dev-urandom", "/dev/urandom"),
        )
        for command in ("lock",)
    ),
    *(
        Case(
            "files",
            f"lock-is-{label}-{'-'.join(command)}",
            _special(kind, "llmstack.lock"),
            command,
            needle="regular file",
        )
        for label, kind in (("a-directory", "directory"), ("a-fifo", "fifo"), ("dev-zero", "/dev/zero"))
        for command in (("check",), ("lock", "--check"), ("verify",))
    ),
    Case(
        "files",
        "model-source-5000-chars",
        lambda p: _model(p, "m" * 5000),
        ("lock",),
        needle="5000 characters",
    ),
    Case(
        "sources",
        "hf-double-dash-owner",
        lambda p: _model(p, "hf://a--b/c@main/x.gguf"),
        ("lock",),
        needle="model.source",
    ),
    Case(
        "sources",
        "hf-dotdot-path",
        lambda p: _model(p, "hf://owner/repo@main/../../x.gguf"),
        ("lock",),
        needle="model.source",
    ),
    Case(
        "sources",
        "hf-no-network",
        lambda p: _model(p, "hf://owner/repo@main/x.gguf"),
        ("lock",),
        codes=frozenset({3}),
        env=_HF_CLOSED,
    ),
    Case(
        "manifest",
        "regex-repeat-overflow",
        _project(smoke='expect = { regex = "a{4294967296}" }\n'),
        ("lock",),
        needle="regex",
    ),
    Case("manifest", "toml-arrays-3000-deep", _nested_toml(3000, "llmstack.toml"), ("lock",), needle="nest"),
    Case(
        "lock", "lock-toml-arrays-3000-deep", _nested_toml(3000, "llmstack.lock"), ("check",), needle="nest"
    ),
    Case(
        "manifest",
        "100000-stop-strings",
        _project(sampler="stop = [" + ", ".join(f'"s{i}"' for i in range(100_000)) + "]\n"),
        ("lock",),
        needle="sampler.stop",
    ),
    Case("lock", "100000-golden-tokens", _golden_tokens(100_000), ("lock",), codes=frozenset({0})),
    Case("lock", "golden-logprob-nan", _golden_tokens(1, "nan"), ("verify",), needle="finite"),
    Case(
        "manifest",
        "context-size-2-pow-40",
        _replaced("context-size = 256", "context-size = 1099511627776"),
        ("lock",),
        needle="context-size",
    ),
    Case(
        "manifest", "mirostat-tau-inf", _project(sampler="mirostat-tau = inf\n"), ("lock",), needle="finite"
    ),
    Case(
        "manifest",
        "temperature-nan",
        _replaced("temperature = 0.0", "temperature = nan"),
        ("lock",),
        needle="finite",
    ),
    Case(
        "engine",
        "kv-cache-256-gib-verify",
        _large_kv_cache,
        ("verify",),
        codes=frozenset({3}),
        needle="KV cache",
    ),
    Case(
        "engine",
        "kv-cache-256-gib-record",
        _large_kv_cache,
        ("record",),
        codes=frozenset({3}),
        needle="KV cache",
    ),
    *(
        Case(
            "engine",
            f"all-nan-weights-{command}",
            _nan_weights,
            (command,),
            codes=frozenset({3}),
            needle="finite",
        )
        for command in ("record", "verify")
    ),
    Case(
        "template",
        "1gb-of-strings-built-in-a-loop",
        _template(
            "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}"
            "{% set ns.l = ns.l + [('x' * 999990) ~ i] %}{% endfor %}{{ ns.l | length }}"
        ),
        ("lock",),
        needle="out of memory",
    ),
    Case(
        "template",
        "1mb-template-with-tabs",
        _template("{# " + "a\t" * 500_000 + " #}" + CHATML),
        ("lock",),
        codes=frozenset({0, 1, 2}),
    ),
    Case(
        "template",
        "locked-template-no-longer-compiles-record",
        _edited_lock("{% for m in messages %}", "{% break %}{% for m in messages %}"),
        ("record",),
        needle="does not compile ('break' outside loop)",
    ),
    *(
        Case("files", f"model-is-{label}-{command}", _model_replaced(kind), (command,), needle=needle)
        for label, kind, needle in (
            ("a-directory", "directory", "regular file"),
            ("dev-zero", "/dev/zero", "never reads it"),
        )
        for command in ("verify", "record")
    ),
    Case(
        "manifest",
        "catastrophic-expect-regex-record",
        _catastrophic_regex,
        ("record",),
        codes=frozenset({0}),
        engine=True,
    ),
    *(
        Case("lock", f"lock-{label}", _edited_lock(old, new), ("verify",), needle=needle)
        for label, old, new, needle in (
            ("temperature-nan", "temperature = 0.0", "temperature = nan", "finite"),
            ("threads-0", "threads = 1", "threads = 0", "threads"),
            ("context-size-0", "context-size = 256", "context-size = 0", "context-size"),
            ("temperature-negative", "temperature = 0.0", "temperature = -1.0", "temperature"),
            ("seed-2-pow-64", "seed = 1", "seed = 18446744073709551615", "seed"),
            ("lock-version-string", "lock-version = 1", 'lock-version = "1"', "lock-version"),
            ("top-p-2", "top-p = 0.95", "top-p = 2.0", "top-p"),
            ("mirostat-tau-inf", "mirostat-tau = 5.0", "mirostat-tau = inf", "finite"),
        )
    ),
)
