"""Verify through llama-server against the same completions sent with a plain httpx client, and cross-engine
agreement on the Gemma stack (in-process llama-cpp-python against llama-server).

Target: verify of the example stack through llama-server takes at most 1.15x the time of its completions sent
directly (same token-id prompts, same settings, one request each) in the same run.

    .venv/bin/python benchmarks/bench_served.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from stacklock.lock.api import lock_stack  # noqa: E402
from stacklock.lock.project import read_lock, write_lock  # noqa: E402
from stacklock.model.lock import Lock  # noqa: E402
from stacklock.verify.session import record, verify  # noqa: E402
from tests.gguf_builder import gemma_model_path  # noqa: E402
from tests.servers import free_port, llama_server  # noqa: E402

EXAMPLE = ROOT / "examples" / "gemma3-270m"
TEMPLATE = ROOT / "registry" / "templates" / "gemma3-it.jinja"
TARGET = 1.15


def _project(directory: Path, gemma: Path, engine: str) -> Path:
    text = (EXAMPLE / "llmstack.toml").read_text(encoding="utf-8")
    if engine == "llama-server":
        text = text.replace(
            'name = "llama-cpp-python"\nversion = "==0.3.36"', 'name = "llama-server"\nversion = "==b11434"'
        )
    (directory / "llmstack.toml").write_text(text, encoding="utf-8")
    (directory / "models").mkdir()
    (directory / "models" / gemma.name).symlink_to(gemma)
    return directory / "llmstack.toml"


def _direct(url: str, lock_path: Path) -> None:
    """The same completions verify sends, with a plain client: the baseline."""
    lock = read_lock(lock_path)
    sampler = lock.sampler
    with httpx.Client(timeout=120) as client:
        for pin in lock.smoke:
            assert pin.golden is not None
            assert pin.golden.prompt_tokens is not None
            client.post(
                f"{url}/completion",
                json={
                    "prompt": list(pin.golden.prompt_tokens),
                    "n_predict": pin.max_tokens,
                    "temperature": sampler.temperature,
                    "top_k": sampler.top_k,
                    "top_p": sampler.top_p,
                    "min_p": sampler.min_p,
                    "seed": sampler.seed or 0,
                    "n_probs": 5,
                    "cache_prompt": False,
                    "return_tokens": True,
                },
            ).raise_for_status()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    gemma = gemma_model_path()
    if gemma is None:
        sys.exit("the Gemma model is not installed (the 'example' extra)")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "served").mkdir()
        (base / "inproc").mkdir()
        served = _project(base / "served", gemma, "llama-server")
        inproc = _project(base / "inproc", gemma, "llama-cpp-python")
        write_lock(inproc.with_name("llmstack.lock"), lock_stack(inproc))
        reference = record(inproc.with_name("llmstack.lock"))
        args_server = ("-fa", "off", "--swa-full", "--jinja", "--chat-template-file", str(TEMPLATE))
        with llama_server(gemma, *args_server, log=base / "server.log") as url:
            write_lock(served.with_name("llmstack.lock"), lock_stack(served, endpoint=url))
            mine = record(served.with_name("llmstack.lock"), endpoint=url)
            verify_times, direct_times = [], []
            for _ in range(args.repeat):
                started = time.perf_counter()
                report = verify(served.with_name("llmstack.lock"), endpoint=url)
                verify_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                _direct(url, served.with_name("llmstack.lock"))
                direct_times.append(time.perf_counter() - started)
            assert report.reproduced, report
        ratio = statistics.median(verify_times) / statistics.median(direct_times)
        print(
            f"verify through llama-server: {statistics.median(verify_times) * 1000:.0f} ms (median of {args.repeat})"
        )
        print(f"the same completions with httpx: {statistics.median(direct_times) * 1000:.0f} ms")
        print(f"ratio {ratio:.3f} (target <= {TARGET})")
        print("\ncross-engine on Gemma: in-process llama-cpp-python vs llama-server (-fa off --swa-full)")
        for a, b in zip(reference.smoke, mine.smoke, strict=True):
            assert a.golden is not None
            assert b.golden is not None
            same = a.golden.tokens == b.golden.tokens
            drift = max(
                (
                    abs(x[1] - dict(sb).get(x[0], float("inf")))
                    for sa, sb in zip(a.golden.top_logprobs, b.golden.top_logprobs, strict=False)
                    for x in sa
                    if x[0] in dict(sb)
                ),
                default=0.0,
            )
            print(f"  {a.name:18} identical tokens: {same}; largest top-k logprob drift {drift:.4f}")
        _llama_cpp_server(gemma, reference, base)
        shutil.rmtree(base / "served", ignore_errors=True)
    return 0 if ratio <= TARGET else 1


def _llama_cpp_server(gemma: Path, reference: Lock, base: Path) -> None:
    """llama-cpp-python's own server (same build as in process): OpenAI-compatible only, so raw prompts by text,
    and the chosen token's logprob compared (its top logprobs are keyed by text, not token id)."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gemma), "--n_ctx", "1024"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_threads", "2"]
    with (base / "lcs.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(f"{url}/v1/models", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        print(
            "\ncross-engine on Gemma: in-process llama-cpp-python vs llama_cpp.server (raw prompts, by text)"
        )
        for pin in reference.smoke:
            if pin.kind != "raw" or pin.golden is None:
                continue
            answer = httpx.post(
                f"{url}/v1/completions",
                json={
                    "prompt": pin.prompt,
                    "max_tokens": pin.max_tokens,
                    "temperature": 0.0,
                    "seed": 0,
                    "logprobs": 5,
                },
                timeout=600,
            ).json()
            choice = answer["choices"][0]
            chosen = [lp for lp in choice["logprobs"]["token_logprobs"] if lp is not None]
            golden = [step[0][1] for step in pin.golden.top_logprobs]
            drift = max((abs(a - b) for a, b in zip(chosen, golden, strict=False)), default=0.0)
            print(
                f"  {pin.name:18} identical text: {choice['text'].startswith(pin.golden.text)}; "
                f"largest chosen-token logprob drift {drift:.4f}"
            )
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
