"""Matrix and bisect costs on a tiny GGUF run by the real llama.cpp.

1. A matrix of 16 cells x 4 prompts (2 templates x 2 temperatures x 2 top-k x 2 thread counts): its wall time
   against the raw engine runs it needs, timed in the same run: one engine session per backend combination
   (started, then observing each cell's prompts). Target: <= 1.3x.
2. Bisect across 4 differing links with one culprit: engine runs against 1 + 2*log2(4) = 5.

    .venv/bin/python benchmarks/bench_matrix.py
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stacklock.engines.runner import EngineSession  # noqa: E402
from stacklock.explore.bisect import run_bisect  # noqa: E402
from stacklock.explore.matrix import load_cell_locks, read_matrix_spec, run_matrix  # noqa: E402
from stacklock.lock.api import lock_stack  # noqa: E402
from stacklock.lock.project import write_lock  # noqa: E402
from stacklock.verify.session import rendered_smoke  # noqa: E402
from tests.gguf_builder import build_tiny_gguf  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SMOKE = "".join(
    f'[[smoke]]\nname = "{name}"\n{body}\nmax-tokens = 16\n\n'
    for name, body in [
        ("hello", 'messages = [{ role = "user", content = "Hello" }]'),
        ("two", 'messages = [{ role = "user", content = "Count to three" }]'),
        ("raw", 'prompt = "Once upon a time"'),
        ("story", 'prompt = "The quick brown fox"'),
    ]
)
MANIFEST = """[stack]
name = "bench"
[model]
source = "tiny.gguf"
[engine]
name = "llama-cpp-python"
version = "==0.3.36"
[backend]
context-size = 256
[sampler]
{sampler}
"""
SPEC = """[matrix]
manifest = "llmstack.toml"
[matrix.axes]
template = ["gguf", "file:other.jinja"]
"sampler.temperature" = [0.0, 1.0]
"sampler.top-k" = [40, 2]
"backend.threads" = [1, 2]
"""


def bench_matrix(directory: Path) -> float:
    build_tiny_gguf(directory / "tiny.gguf", chat_template=CHATML, n_layer=4, n_embd=128, n_ff=256)
    (directory / "other.jinja").write_text(CHATML.replace("assistant\n", "assistant\n\n"), encoding="utf-8")
    (directory / "llmstack.toml").write_text(MANIFEST.format(sampler="seed = 1") + SMOKE, encoding="utf-8")
    (directory / "matrix.toml").write_text(SPEC, encoding="utf-8")
    spec = read_matrix_spec(directory / "matrix.toml")
    base, cells = load_cell_locks(spec, directory / "matrix.toml")
    # The baseline: the engine work the matrix cannot avoid, one session per backend combination.
    start = time.perf_counter()
    by_backend: dict[str, list[int]] = {}
    for index, (_, lock) in enumerate(cells):
        by_backend.setdefault(lock.backend.model_dump_json(), []).append(index)
    for group in by_backend.values():
        first = cells[group[0]][1]
        with EngineSession.start(first.engine.name, base / first.model.path, first.backend) as session:
            for index in group:
                lock = cells[index][1]
                session.observe([rendered_smoke(lock, pin) for pin in lock.smoke], top_k=spec.top_k)
    raw = time.perf_counter() - start
    start = time.perf_counter()
    run = run_matrix(directory / "matrix.toml", cache_dir=directory / "cache")
    total = time.perf_counter() - start
    assert run.executed == len(cells) == 16
    ratio = total / raw
    print(
        f"matrix 16 cells x 4 prompts: {total:.2f} s; raw engine runs {raw:.2f} s; ratio {ratio:.2f} (target <= 1.3)"
    )
    start = time.perf_counter()
    again = run_matrix(directory / "matrix.toml", cache_dir=directory / "cache")
    print(f"second run (all cached, {again.executed} cells executed): {time.perf_counter() - start:.2f} s")
    return ratio


def bench_bisect(directory: Path) -> int:
    build_tiny_gguf(directory / "tiny.gguf", chat_template=CHATML)
    locks = []
    for name, sampler in [
        ("good", "temperature = 0.0\nseed = 0\nrepeat-last-n = 64"),
        ("bad", 'temperature = 1.0\nseed = 3\nrepeat-last-n = 32\nstop = ["never written"]'),
    ]:
        (directory / name).mkdir()
        (directory / name / "tiny.gguf").symlink_to(directory / "tiny.gguf")
        (directory / name / "llmstack.toml").write_text(
            MANIFEST.format(sampler=sampler) + SMOKE, encoding="utf-8"
        )
        write_lock(directory / name / "llmstack.lock", lock_stack(directory / name / "llmstack.toml"))
        locks.append(directory / name / "llmstack.lock")
    report = run_bisect(locks[0], locks[1])
    bound = 1 + 2 * math.log2(len(report.links))
    print(
        f"bisect across {len(report.links)} links: culprit {', '.join(report.culprit)}; "
        f"{report.engine_runs} engine runs (bound {bound:.0f})"
    )
    return report.engine_runs if report.engine_runs <= bound else -1


def main() -> int:
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        ratio = bench_matrix(Path(one))
        runs = bench_bisect(Path(two))
    return 0 if ratio <= 1.3 and runs >= 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
