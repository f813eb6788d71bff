"""Verify through llama-server against the same completions sent with a plain httpx client, and cross-engine
agreement on the Gemma stack: in-process llama-cpp-python 0.3.36 (llama.cpp b11312) against llama-cpp-python's
own server (the same build) and llama-server b11434 (another build).

Target: verify of the example stack through llama-server takes at most 1.15x the time of its completions sent
directly (same token-id prompts, same settings, one request each) in the same run.

    .venv/bin/python benchmarks/bench_served.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from stacklock.lock.api import lock_stack  # noqa: E402
from stacklock.lock.project import read_lock, write_lock  # noqa: E402
from stacklock.model.lock import Lock, SmokeGolden, SmokePin  # noqa: E402
from stacklock.verify.session import record, verify  # noqa: E402
from tests.gguf_builder import gemma_model_path  # noqa: E402
from tests.servers import llama_cpp_python_server, llama_server  # noqa: E402

EXAMPLE = ROOT / "examples" / "gemma3-270m"
TEMPLATE = ROOT / "registry" / "templates" / "gemma3-it.jinja"
TARGET = 1.15
IN_PROCESS = 'name = "llama-cpp-python"\nversion = "==0.3.36"'


def _project(directory: Path, gemma: Path, engine: str) -> Path:
    """The example stack on ``engine`` (its [engine] table rewritten), linking the shared model."""
    directory.mkdir()
    text = (EXAMPLE / "llmstack.toml").read_text(encoding="utf-8").replace(IN_PROCESS, engine)
    # llama_cpp.server's requests default to repeat_penalty 1.1, llama-cpp-python in process to 1.0: the stacks
    # compared set it, as a manifest that means the same stack on both would.
    text = text.replace("seed = 0\n", "seed = 0\nrepeat-penalty = 1.0\n")
    (directory / "llmstack.toml").write_text(text, encoding="utf-8")
    (directory / "models").mkdir()
    (directory / "models" / gemma.name).symlink_to(gemma)
    return directory / "llmstack.toml"


def _lock_and_record(manifest: Path, endpoint: str | None = None) -> Lock:
    write_lock(manifest.with_name("llmstack.lock"), lock_stack(manifest, endpoint=endpoint))
    record(manifest.with_name("llmstack.lock"), endpoint=endpoint)
    return read_lock(manifest.with_name("llmstack.lock"))


def _golden(lock: Lock, pin: SmokePin) -> SmokeGolden:
    """The golden of a lock recorded once (one recording)."""
    (recording,) = lock.recordings
    return recording.goldens[pin.name]


def _direct(client: httpx.Client, url: str, lock: Lock) -> None:
    """The same completions verify sends (the same request bodies), with a plain client: the baseline."""
    sampler = lock.sampler
    for pin in lock.smoke:
        golden = _golden(lock, pin)
        assert golden.prompt_tokens is not None
        client.post(
            f"{url}/completion",
            json={
                "prompt": list(golden.prompt_tokens),
                "n_predict": pin.max_tokens,
                "temperature": sampler.temperature,
                "top_k": sampler.top_k,
                "top_p": sampler.top_p,
                "min_p": sampler.min_p,
                "typical_p": sampler.typical_p,
                "repeat_penalty": sampler.repeat_penalty,
                "repeat_last_n": sampler.repeat_last_n,
                "frequency_penalty": sampler.frequency_penalty,
                "presence_penalty": sampler.presence_penalty,
                "mirostat": sampler.mirostat,
                "mirostat_tau": sampler.mirostat_tau,
                "mirostat_eta": sampler.mirostat_eta,
                "seed": sampler.seed or 0,
                "stop": list(sampler.stop or ()),
                "n_probs": 5,
                "cache_prompt": False,
                "return_tokens": True,
                "post_sampling_probs": False,
                "stream": False,
            },
        ).raise_for_status()


def _by_id(reference: Lock, other: Lock) -> None:
    for pin, other_pin in zip(reference.smoke, other.smoke, strict=True):
        a, b = _golden(reference, pin), _golden(other, other_pin)
        drift = max(
            (
                abs(logprob - dict(theirs)[token])
                for mine, theirs in zip(a.top_logprobs, b.top_logprobs, strict=False)
                for token, logprob in mine
                if token in dict(theirs)
            ),
            default=0.0,
        )
        print(
            f"  {pin.name:18} identical tokens: {a.tokens == b.tokens}; "
            f"largest top-5 logprob drift {drift:.4f}"
        )


def _sent_text(pin: SmokePin, lock: Lock) -> str:
    """The text stacklock sends a text-prompt server: the render without the BOS the server adds itself."""
    assert pin.rendered is not None
    bos = lock.tokenizer.bos_text
    return (
        pin.rendered[len(bos) :] if bos and not pin.add_bos and pin.rendered.startswith(bos) else pin.rendered
    )


def _by_text(client: httpx.Client, url: str, reference: Lock, served: Lock) -> None:
    """llama-cpp-python's server keys its logprobs by token text: the reference's top-5 ids are decoded by the
    server and matched by text (tokens with the same text cannot be told apart)."""
    sampler = reference.sampler
    for pin, their_pin in zip(reference.smoke, served.smoke, strict=True):
        golden, theirs = _golden(reference, pin), _golden(served, their_pin)
        request: dict[str, Any] = {
            "model": "gemma",
            "prompt": _sent_text(pin, reference),
            "max_tokens": pin.max_tokens,
            "temperature": sampler.temperature,
            "top_k": sampler.top_k,
            "top_p": sampler.top_p,
            "min_p": sampler.min_p,
            "repeat_penalty": sampler.repeat_penalty,
            "seed": sampler.seed or 0,
            "logprobs": 5,
        }
        choice = client.post(f"{url}/v1/completions", json=request).raise_for_status().json()["choices"][0]
        ids = {t for step in golden.top_logprobs for t, _ in step} | set(golden.tokens)
        text = {t: _detokenize(client, url, [t]) for t in ids}
        pieces: Sequence[str] = choice["logprobs"]["tokens"]
        # In process, an end of generation is a generated token; the server leaves it out of its pieces.
        wanted = [text[t] for t in golden.tokens[: len(pieces)]]
        drift = max(
            (
                abs(logprob - step[text[token]])
                for mine, step in zip(golden.top_logprobs, choice["logprobs"]["top_logprobs"], strict=False)
                for token, logprob in mine
                if text[token] in step
            ),
            default=0.0,
        )
        same_prompt = golden.prompt_tokens == theirs.prompt_tokens
        print(
            f"  {pin.name:18} identical tokens (by text): {list(pieces) == wanted}; same prompt tokens: "
            f"{same_prompt}; same output: {golden.text == theirs.text}; "
            f"largest top-5 logprob drift {drift:.4f}"
        )


def _detokenize(client: httpx.Client, url: str, tokens: list[int]) -> str:
    answer = client.post(f"{url}/extras/detokenize", json={"tokens": tokens, "model": "gemma"})
    return str(answer.raise_for_status().json()["text"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    gemma = gemma_model_path()
    if gemma is None:
        sys.exit("the Gemma model is not installed (the 'example' extra)")
    # The projects link the shared model file, which lies outside them: the user allows its directory.
    os.environ["STACKLOCK_ALLOW_PATHS"] = str(gemma.resolve().parent)
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(timeout=600) as client:
        base = Path(tmp)
        reference = _lock_and_record(_project(base / "inproc", gemma, IN_PROCESS))

        served = _project(base / "served", gemma, 'name = "llama-server"\nversion = "==b11434"')
        backend = ("-fa", "off", "--swa-full", "--jinja", "--chat-template-file", str(TEMPLATE))
        with llama_server(gemma, *backend, log=base / "server.log") as url:
            mine = _lock_and_record(served, endpoint=url)
            verify_times, direct_times = [], []
            for _ in range(args.repeat):
                started = time.perf_counter()
                report = verify(served.with_name("llmstack.lock"), endpoint=url)
                verify_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                _direct(client, url, read_lock(served.with_name("llmstack.lock")))
                direct_times.append(time.perf_counter() - started)
        assert report.reproduced, report
        ratio = statistics.median(verify_times) / statistics.median(direct_times)
        print(
            f"verify through llama-server: {statistics.median(verify_times) * 1000:.0f} ms (median of {args.repeat})"
        )
        print(f"the same completions with httpx: {statistics.median(direct_times) * 1000:.0f} ms")
        print(f"ratio {ratio:.3f} (target <= {TARGET})")

        print(
            "\ncross-engine on Gemma: in-process llama-cpp-python 0.3.36 vs llama-server b11434 (-fa off --swa-full)"
        )
        _by_id(reference, mine)
        chats = {pin.name for pin in mine.smoke if pin.kind == "chat"}
        for result in (r for r in report.results if r.name in chats):
            [template] = [stage for stage in result.stages if stage.stage == "template"]
            print(
                f"  {result.name:18} llama-server's own rendering (/apply-template): {template.status}: {template.detail}"
            )

        own = _project(
            base / "own", gemma, 'name = "llama-cpp-python-server"\nversion = "==0.3.36"\nmodel = "gemma"'
        )
        with llama_cpp_python_server(gemma, "--model_alias", "gemma", log=base / "lcs.log") as url:
            theirs = _lock_and_record(own, endpoint=url)
            print("\ncross-engine on Gemma: in-process llama-cpp-python 0.3.36 vs llama_cpp.server 0.3.36")
            _by_text(client, url, reference, theirs)
            report = verify(own.with_name("llmstack.lock"), endpoint=url)
            print(
                f"  verify through llama_cpp.server: reproduced={report.reproduced}, not checked: {report.not_checked}"
            )
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
