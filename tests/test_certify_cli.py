"""`stacklock record` and `stacklock verify`, end to end on the real engine with tiny GGUF models.

Each perturbation test records a stack, then breaks exactly one link of it, by hand, the way a user or an
upstream change would, and checks that verify names the right stage with a message a user can act on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest

from stacklock.model.lock import Lock, parse_lock, render_lock
from stacklock.verify.compare import STAGES
from tests.conftest import CHATML, Result
from tests.gguf_builder import build_tiny_gguf

pytest.importorskip("llama_cpp", reason="the 'llama' extra (llama-cpp-python) is not installed")

pytestmark = pytest.mark.engine

Cli = Callable[..., Result]

MANIFEST = """\
[stack]
name = "tiny-certify"

[model]
source = "tiny.gguf"

[template]
source = "gguf"

[engine]
name = "llama-cpp-python"
version = "==0.3.36"

[backend]
kind = "cpu"
threads = 2
context-size = 256

[sampler]
temperature = {temperature}
seed = 7
stop = ["<|im_end|>"]

[[smoke]]
name = "hello"
system = "Be brief."
messages = [{{ role = "user", content = "Hello" }}]
max-tokens = 8

[[smoke]]
name = "raw"
prompt = "Once upon a time"
max-tokens = 8
"""


def _project(path: Path, *, temperature: float = 0.0, **model: Any) -> Path:
    build_tiny_gguf(path / "tiny.gguf", chat_template=CHATML, **model)
    (path / "llmstack.toml").write_text(MANIFEST.format(temperature=temperature))
    return path


def _lock(project: Path) -> Lock:
    return parse_lock((project / "llmstack.lock").read_text(encoding="utf-8"))


def _edit(project: Path, old: str, new: str) -> None:
    """Edit the lock by hand: exactly one occurrence of ``old`` becomes ``new``."""
    path = project / "llmstack.lock"
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in the lock"
    path.write_text(text.replace(old, new), encoding="utf-8")


def _stage(report: Any, smoke: str, stage: str) -> Any:
    result = next(r for r in report["results"] if r["name"] == smoke)
    return next(s for s in result["stages"] if s["stage"] == stage)


def _result(report: Any, smoke: str) -> Any:
    return next(r for r in report["results"] if r["name"] == smoke)


@pytest.fixture
def recorded(tmp_path: Path, cli: Cli) -> Path:
    """A tiny stack, locked and recorded."""
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    result = cli("record", cwd=project)
    assert result.code == 0, result.err
    return project


def _verify_json(cli: Cli, project: Path, *args: str) -> tuple[int, Any]:
    result = cli("verify", "--format", "json", *args, cwd=project)
    return result.code, json.loads(result.out)


def _steps(names: list[str]) -> list[str]:
    """The lines a piped record or verify of the tiny model prints, one per step of the engine's run."""
    return [
        "loading the engine",
        "loading the model tiny.gguf",
        "asking the engine how it would render a chat",
        *(f"running the smoke prompt '{name}'" for name in names),
    ]


# The whole chain ------------------------------------------------------------------------------------------


def test_init_lock_record_verify_certifies_the_stack(tmp_path: Path, cli: Cli) -> None:
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML)
    assert cli("init", "tiny.gguf", cwd=tmp_path).code == 0
    assert cli("lock", cwd=tmp_path).code == 0
    record = cli("record", cwd=tmp_path)
    assert record.code == 0, record.err
    lock = _lock(tmp_path)
    names = [pin.name for pin in lock.smoke]
    assert names == ["greeting", "arithmetic", "completion"]
    (recording,) = lock.recordings
    assert all(recording.goldens[pin.name].tokens for pin in lock.smoke)
    assert record.err.splitlines()[-1] == (
        f"wrote the recording {recording.id} to llmstack.lock; commit it, then run `stacklock verify` in CI"
    )

    text = cli("verify", cwd=tmp_path)
    assert text.code == 0, text.out + text.err
    lines = text.out.splitlines()
    assert lines[0].startswith("engine: llama-cpp-python 0.3.36")
    for name in names:
        assert f"{name}: reproduced" in lines
    for stage in STAGES:
        assert sum(1 for line in lines if re.match(rf"    {stage} +ok +", line)) == len(names)
    assert lines[-1] == "reproduced: 3 smoke prompt(s), every stage identical to the recording"

    code, report = _verify_json(cli, tmp_path)
    assert code == 0
    assert report["reproduced"] is True
    assert report["tolerated"] is False
    assert [r["name"] for r in report["results"]] == names
    assert report["engine"]["version"] == "0.3.36"

    junit = cli("verify", "--format", "junit", cwd=tmp_path)
    assert junit.code == 0
    root = ET.fromstring(junit.out)
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("15", "0", "0")
    cases = [(case.get("classname"), case.get("name")) for case in suite.iter("testcase")]
    assert cases == [(name, stage) for name in names for stage in STAGES]
    assert not any(case.find("failure") is not None for case in suite.iter("testcase"))

    certified = cli("verify", "--certificate", "cert.json", cwd=tmp_path)
    assert certified.code == 0
    assert certified.err.splitlines() == [*_steps(names), "wrote cert.json"]
    certificate = json.loads((tmp_path / "cert.json").read_text(encoding="utf-8"))
    lock_bytes = (tmp_path / "llmstack.lock").read_bytes()
    assert certificate["lock-sha256"] == hashlib.sha256(lock_bytes).hexdigest()
    assert certificate["model-sha256"] == lock.model.sha256
    assert certificate["model-sha256"] == hashlib.sha256((tmp_path / "tiny.gguf").read_bytes()).hexdigest()
    assert certificate["reproduced"] is True
    assert certificate["stack"] == "tiny"
    assert [r["name"] for r in certificate["results"]] == names
    assert certificate["engine"]["name"] == "llama-cpp-python"


def test_record_then_verify_leaves_the_lock_unchanged(recorded: Path, cli: Cli) -> None:
    before = (recorded / "llmstack.lock").read_bytes()
    assert cli("verify", cwd=recorded).code == 0
    assert (recorded / "llmstack.lock").read_bytes() == before
    # Recording again on the same engine writes the same goldens, byte for byte.
    assert cli("record", cwd=recorded).code == 0
    assert (recorded / "llmstack.lock").read_bytes() == before


# One broken link at a time --------------------------------------------------------------------------------


def test_an_edited_template_fails_at_template_naming_the_character(recorded: Path, cli: Cli) -> None:
    _edit(recorded, "<|im_end|>\n{% endfor %}", "<|im_emd|>\n{% endfor %}")
    code, report = _verify_json(cli, recorded)
    assert code == 1
    assert report["reproduced"] is False
    hello = _result(report, "hello")
    assert hello["first-failure"] == "template"
    index = CHATML.index("<|im_end|>") + len("<|im_e")
    column = index - CHATML.rindex("\n", 0, index)
    detail = _stage(report, "hello", "template")["detail"]
    assert detail == (
        f"the locked template differs at character {index} (line 2, column {column}): "
        'expected "…ntent\'] }}<|im_end|>\\n{% endfor %}{% if a…", '
        'got "…ntent\'] }}<|im_emd|>\\n{% endfor %}{% if a…"; restore the template or re-lock and re-record'
    )
    text = cli("verify", cwd=recorded)
    assert text.code == 1
    assert "hello: FAILED at template" in text.out.splitlines()
    assert text.out.splitlines()[-1] == "not reproduced: 2 of 2 smoke prompt(s) failed"


def test_a_changed_add_bos_flag_fails_at_tokenization(recorded: Path, cli: Cli) -> None:
    _edit(recorded, "add-bos = true\nadd-eos = false", "add-bos = false\nadd-eos = false")
    code, report = _verify_json(cli, recorded)
    assert code == 1
    for name, count in (("raw", 10), ("hello", 27)):
        assert _result(report, name)["first-failure"] == "tokenization"
        assert _stage(report, name, "template")["status"] == "pass"
        assert _stage(report, name, "tokenization")["detail"] == (
            f"the BOS token (1 '<s>') is missing at the start of the prompt ({count - 1} tokens now, "
            f"{count} recorded): the tokenizer's add-bos setting changed"
        )


def test_a_changed_temperature_fails_at_generation_naming_the_token(recorded: Path, cli: Cli) -> None:
    _edit(recorded, "temperature = 0.0\n", "temperature = 0.8\n")
    code, report = _verify_json(cli, recorded)
    assert code == 1
    raw = _result(report, "raw")
    assert raw["first-failure"] == "generation"
    assert _stage(report, "raw", "tokenization")["status"] == "pass"
    generation = _stage(report, "raw", "generation")
    golden = _lock(recorded).recordings[0].goldens["raw"]
    index = generation["position"]
    assert isinstance(index, int)
    recorded_token = golden.tokens[index]
    assert generation["expected"].startswith(f"{recorded_token} '")
    assert re.fullmatch(
        rf"token {index} differs: recorded {recorded_token} '.*', now \d+ '.*' \(logprob -\d+\.\d{{4}}\); "
        r"the recorded token (is at logprob -\d+\.\d{4}, -?\d+\.\d{4} below|is not in the top 5); "
        r"alternatives now: .+; recorded: .+",
        generation["detail"],
    )
    assert len(generation["candidates"]) == 5
    assert all(c["piece"] for c in generation["candidates"])
    text = cli("verify", cwd=recorded).out.splitlines()
    assert "raw: FAILED at generation" in text
    assert any(line.startswith("    → alternatives now: ") for line in text)


def test_a_changed_seed_fails_at_generation(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path, temperature=0.8)
    assert cli("lock", cwd=project).code == 0
    assert cli("record", cwd=project).code == 0
    # Sampling with a fixed seed reproduces...
    assert cli("verify", cwd=project).code == 0
    # ...and another seed does not, at the generation stage.
    _edit(project, "seed = 7\n", "seed = 8\n")
    code, report = _verify_json(cli, project)
    assert code == 1
    for name in ("hello", "raw"):
        assert _result(report, name)["first-failure"] == "generation"
        assert _stage(report, name, "generation")["detail"].startswith("token ")


def test_a_flipped_model_byte_fails_at_artifacts(recorded: Path, cli: Cli) -> None:
    model = recorded / "tiny.gguf"
    data = bytearray(model.read_bytes())
    # A byte of the last tensor (output.weight): the header still parses, only the weights change.
    data[-100] ^= 0x01
    model.write_bytes(bytes(data))
    code, report = _verify_json(cli, recorded)
    assert code == 1
    locked = _lock(recorded).model.sha256
    now = hashlib.sha256(bytes(data)).hexdigest()
    for name in ("hello", "raw"):
        assert _result(report, name)["first-failure"] == "artifacts"
        assert _stage(report, name, "artifacts")["detail"] == (
            f"tiny.gguf changed: sha256 {now[:12]}… where the lock has {locked[:12]}… (tensor data changed); "
            "restore the locked file or re-lock and re-record"
        )


def test_a_truncated_model_fails_at_artifacts_before_the_engine_loads_it(recorded: Path, cli: Cli) -> None:
    model = recorded / "tiny.gguf"
    model.write_bytes(model.read_bytes()[:4096])
    code, report = _verify_json(cli, recorded)
    # Exit 1 (the stack changed), not exit 3 from an engine that cannot load half a file.
    assert code == 1
    for name in ("hello", "raw"):
        assert _result(report, name)["first-failure"] == "artifacts"
        assert _stage(report, name, "generation")["status"] == "skip"


def test_a_stop_string_that_cuts_the_output_fails_at_output(recorded: Path, cli: Cli) -> None:
    golden = _lock(recorded).recordings[0].goldens["hello"]
    # Three letters from inside the recorded text: generation now stops there, and the output is cut.
    start = next(i for i in range(2, len(golden.text)) if golden.text[i : i + 3].isalpha())
    stop = golden.text[start : start + 3]
    _edit(recorded, 'stop = ["<|im_end|>"]', f'stop = ["<|im_end|>", "{stop}"]')
    code, report = _verify_json(cli, recorded)
    assert code == 1
    hello = _result(report, "hello")
    assert hello["first-failure"] == "output"
    generation = _stage(report, "hello", "generation")
    assert generation["status"] == "pass"
    assert generation["detail"].endswith("generation stopped at a stop string now after that (see output)")
    cut = golden.text.index(stop)
    output = _stage(report, "hello", "output")
    assert output["position"] == cut
    assert output["detail"].startswith(f"the output differs at character {cut} ")
    assert output["detail"].endswith(
        "; generation ended by stop-string now, by max-tokens in the recording: the stop strings or "
        "max-tokens changed"
    )


# No false alarms ------------------------------------------------------------------------------------------


def test_an_untouched_stack_verifies_20_times_out_of_20(recorded: Path, cli: Cli) -> None:
    outcomes = [cli("verify", cwd=recorded) for _ in range(20)]
    assert [o.code for o in outcomes] == [0] * 20
    assert len({o.out for o in outcomes}) == 1


# Errors ---------------------------------------------------------------------------------------------------


def test_a_missing_model_is_exit_3(recorded: Path, cli: Cli) -> None:
    (recorded / "tiny.gguf").unlink()
    result = cli("verify", cwd=recorded)
    assert result.code == 3
    assert result.out == ""
    assert result.err == (
        "error: model file tiny.gguf is missing, so the engine cannot run; put the locked file back "
        "(the lock pins its sha256) or re-lock\n"
    )


def test_another_installed_engine_version_is_exit_3_naming_both(recorded: Path, cli: Cli) -> None:
    _edit(
        recorded,
        'requirement = "==0.3.36"\nversion = "0.3.36"',
        'requirement = "==0.3.36"\nversion = "0.3.35"',
    )
    for command in ("verify", "record"):
        result = cli(command, cwd=recorded)
        assert result.code == 3
        assert result.err == (
            "error: installed llama-cpp-python 0.3.36 is not the locked 0.3.35; "
            "pip install 'llama-cpp-python==0.3.35', or re-lock and re-record on 0.3.36\n"
        )


def _quoted_log(err: str) -> Path:
    match = re.search(r"the engine's full output is in (\S+\.log)$", err.strip())
    assert match is not None, err
    return Path(match.group(1))


def test_an_engine_crash_is_exit_3_with_one_clear_line(tmp_path: Path, cli: Cli) -> None:
    # Without byte tokens, llama.cpp's SentencePiece tokenizer cannot fall back for the newline of a chat
    # prompt: std::out_of_range escapes through the C API and the process aborts.
    _project(tmp_path, tokens_override={3 + b: f"<byte{b:02X}>" for b in range(256)})
    assert cli("lock", cwd=tmp_path).code == 0
    for command in ("record", "verify"):
        result = cli(command, cwd=tmp_path)
        assert result.code == 3
        assert result.out == ""
        *steps, error = result.err.splitlines()
        assert steps == [
            "loading the engine",
            "loading the model tiny.gguf",
            "asking the engine how it would render a chat",
            "running the smoke prompt 'hello'",
        ]
        assert error.startswith(
            "error: the engine (llama-cpp-python) crashed (signal SIGABRT) while running the smoke prompt "
            "'hello': terminate called after throwing an instance of 'std::out_of_range' | "
            "what():  unordered_map::at"
        )
        log = _quoted_log(result.err)
        try:
            assert "unordered_map::at" in log.read_text(encoding="utf-8")
        finally:
            log.unlink()
    # The crash left the lock alone: nothing was recorded.
    assert not _lock(tmp_path).recordings


def test_a_model_the_engine_refuses_is_exit_3_quoting_llama_cpp(tmp_path: Path, cli: Cli) -> None:
    # llama.cpp reads its hyperparameters with exact types and refuses an INT32 where it wants UINT32.
    _project(tmp_path, extra_metadata={"llama.attention.head_count_kv": 4})
    assert cli("lock", cwd=tmp_path).code == 0
    result = cli("record", cwd=tmp_path)
    assert result.code == 3
    assert result.err == (
        "loading the engine\nloading the model tiny.gguf\n"
        "error: llama-cpp-python could not load tiny.gguf: Failed to load model from file: tiny.gguf "
        "(llama.cpp: llama_model_load: error loading model: error loading model hyperparameters: key "
        "llama.attention.head_count_kv has wrong type i32 but expected type u32 | "
        "llama_model_load_from_file_impl: failed to load model); check that the file is the locked GGUF "
        "(stacklock verify reports its hash) and that this engine version supports its architecture\n"
    )


def test_verify_without_goldens_certifies_nothing(tmp_path: Path, cli: Cli) -> None:
    project = _project(tmp_path)
    assert cli("lock", cwd=project).code == 0
    result = cli("verify", cwd=project)
    assert result.code == 1
    lines = result.out.splitlines()
    assert "hello: not certified" in lines
    assert (
        "    generation   skip      no golden recorded for this smoke prompt; run `stacklock record`" in lines
    )
    assert lines[-1] == (
        "not certified: 2 of 2 smoke prompt(s) have no golden to compare with; "
        "run `stacklock record` and commit the lock"
    )
    code, report = _verify_json(cli, project)
    assert code == 1
    assert report["reproduced"] is False
    assert _result(report, "raw")["explanation"] == (
        "not certified: tokenization: no golden recorded for this smoke prompt; run `stacklock record`"
    )


def test_tolerance_accepts_a_near_tie_and_only_with_the_flag(recorded: Path, cli: Cli) -> None:
    lock = _lock(recorded)
    (recording,) = lock.recordings
    raw = recording.goldens["raw"]
    (best, best_logprob), (second, second_logprob) = raw.top_logprobs[0][:2]
    gap = best_logprob - second_logprob
    assert 0 < gap < 0.5, "the tiny model's first step is a near-tie"
    # As if the recording machine had picked the runner-up at a near-tie.
    edited = raw.model_copy(update={"tokens": (second, *raw.tokens[1:])})
    goldens = {**recording.goldens, "raw": edited}
    edited_lock = lock.with_recording(recording.model_copy(update={"goldens": goldens}))
    (recorded / "llmstack.lock").write_text(render_lock(edited_lock))

    code, report = _verify_json(cli, recorded)
    assert code == 1
    assert _result(report, "raw")["first-failure"] == "generation"

    code, report = _verify_json(cli, recorded, "--tolerance", "0.5")
    assert code == 0
    assert report["reproduced"] is True
    assert report["tolerated"] is True
    assert report["tolerance"] == {"margin": 0.5}
    generation = _stage(report, "raw", "generation")
    assert generation["status"] == "tolerated"
    assert generation["detail"].startswith(f"token 0 differs: recorded {second} ")
    assert "a near-tie within the margin 0.5, accepted" in generation["detail"]
    # Only the golden's tokens were edited, not its text: the output still matches.
    assert _stage(report, "raw", "output")["status"] == "pass"
    assert _result(report, "hello")["tolerated"] is False

    # A margin below the gap does not accept it.
    code, _ = _verify_json(cli, recorded, "--tolerance", f"{gap / 2:.6f}")
    assert code == 1
    text = cli("verify", "--tolerance", "0.5", cwd=recorded)
    assert text.out.splitlines()[-1] == "reproduced within the tolerance (margin 0.5): 2 smoke prompt(s)"
    assert best != second


def test_a_certificate_goes_into_a_new_folder(recorded: Path, cli: Cli) -> None:
    result = cli("verify", "--certificate", "out/cert.json", cwd=recorded)
    assert result.code == 0
    assert json.loads((recorded / "out" / "cert.json").read_text(encoding="utf-8"))["reproduced"] is True


def test_a_zero_tolerance_is_a_usage_error(recorded: Path, cli: Cli) -> None:
    result = cli("verify", "--tolerance", "0", cwd=recorded)
    assert result.code == 2
    assert result.err == "error: --tolerance must be greater than 0; e.g. --tolerance 0.5\n"


# The engine stays quiet -----------------------------------------------------------------------------------


def test_record_and_verify_keep_the_engines_log_off_the_terminal(tmp_path: Path) -> None:
    # The default context (4096) exceeds the tiny model's 256, which llama.cpp warns about on every load.
    build_tiny_gguf(tmp_path / "tiny.gguf", chat_template=CHATML)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stacklock", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    assert run("init", "tiny.gguf").returncode == 0
    assert run("lock").returncode == 0
    record = run("record")
    assert record.returncode == 0, record.stderr
    # On a pipe, the reporter writes one plain line per step: no progress bars, no control codes.
    names = ["greeting", "arithmetic", "completion"]
    assert [line.split(" ", 1)[0] for line in record.stderr.splitlines()] == [
        *(line.split(" ", 1)[0] for line in _steps(names)),
        "recorded",
        "recorded",
        "recorded",
        "wrote",
    ]
    verify = run("verify")
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.splitlines() == _steps(names)
    assert "\x1b" not in record.stderr + verify.stderr + verify.stdout
    assert "n_ctx_train" not in verify.stdout + record.stderr


def test_record_warns_when_an_expectation_misses_the_recorded_output(tiny_project: Path, cli: Cli) -> None:
    pytest.importorskip("llama_cpp")
    manifest = (
        '[stack]\nname = "t"\n[model]\nsource = "tiny.gguf"\n[sampler]\ntemperature = 0.0\nseed = 0\n'
        '[[smoke]]\nname = "raw"\nprompt = "Once upon a time"\nmax-tokens = 4\n'
        'expect = { contains = "a phrase random weights never write" }\n'
    )
    (tiny_project / "llmstack.toml").write_text(manifest)
    assert cli("lock", cwd=tiny_project).code == 0
    result = cli("record", cwd=tiny_project)
    assert result.code == 0
    assert (
        "warning: smoke 'raw': the output does not contain 'a phrase random weights never write'; "
        "fix the prompt or the expectation and re-record\n"
    ) in result.err
