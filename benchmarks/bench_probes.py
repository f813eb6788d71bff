"""Template probes on the Gemma 3 template of the example stack; the target is 50 ms.

Runs :func:`stacklock.template.probes.run_probes` on the example lock (template ``registry:gemma3-it``, the
Gemma vocabulary's special texts), cold: the compiled-template cache is cleared before every run, as in a fresh
``stacklock check`` process. Prints the best and median of several runs, the ratio to the target, and, as the
baseline in the same run, one cold render of one conversation through the sandbox (what a smoke prompt costs).
Wall and CPU time are both printed; the verdict uses CPU time, which a loaded machine inflates far less (wall
time counts the time other processes hold the cores).
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import time
from pathlib import Path

from stacklock.lock.project import read_lock
from stacklock.template import sandbox
from stacklock.template.probes import run_probes

TARGET_S = 0.05
LOCK = Path(__file__).resolve().parent.parent / "examples" / "gemma3-270m" / "llmstack.lock"


def main() -> int:
    lock = read_lock(LOCK)
    # A lock written before the probes lists only known end-of-turn texts; those of Gemma's template are among
    # them, so every probe runs.
    lock = lock.model_copy(update={"model": lock.model.model_copy(update={"special_texts_complete": True})})
    text = lock.template.text
    assert text is not None
    probes, cpu, renders = [], [], []
    for _ in range(9):
        sandbox._compile_outcome.cache_clear()  # A cold run, as in a fresh process.
        start, start_cpu = time.perf_counter(), time.process_time()
        run = run_probes(lock)
        probes.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        sandbox._compile_outcome.cache_clear()
        start = time.perf_counter()
        sandbox.render_chat_template(
            text,
            [{"role": "user", "content": "Hello"}],
            add_generation_prompt=True,
            bos_token=lock.tokenizer.bos_text,
            eos_token=lock.tokenizer.eos_text,
            now=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        )
        renders.append(time.perf_counter() - start)
    best, median, median_cpu = min(probes), statistics.median(probes), statistics.median(cpu)
    print(f"template: {lock.template.source}, probes: {len(run.ran)} ran, {len(run.findings)} finding(s)")
    print(f"probes (cold), wall: best {best * 1000:.1f} ms, median {median * 1000:.1f} ms")
    print(f"probes (cold), CPU: median {median_cpu * 1000:.1f} ms (target {TARGET_S * 1000:.0f} ms)")
    print(f"ratio to target: {median_cpu / TARGET_S:.2f} ({'ok' if median_cpu <= TARGET_S else 'TOO SLOW'})")
    baseline = statistics.median(renders)
    print(
        f"baseline (one cold render, wall): {baseline * 1000:.1f} ms; probes/baseline: {median / baseline:.1f}x"
    )
    return 0 if median_cpu <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
