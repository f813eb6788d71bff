"""Benchmark: locking a remote multi-GB GGUF from its header alone, against the full download it replaces.

Usage: ``python benchmarks/bench_hub.py [--size-gb 4] [--baseline-mb 400]``. The local test hub
(:mod:`tests.hub_server`) serves a sparse file of ``--size-gb`` whose header is the real Gemma 3 270M header
(262,144-token vocabulary); the rest reads as zeros. Measured in the same run:

- ``stacklock lock`` of it (header cache off): wall time and bytes transferred, against the header's size;
- the baseline: ``hf_hub_download`` of a ``--baseline-mb`` file with the same header plus its sha256, which is
  what locking cost before, extrapolated linearly to the full size (loopback download of 4 GB takes long);
- verify's fetch of that stack with a warm hub cache: the requests it makes, online and with ``--offline``.

Exits 1 when a target is missed (bytes ≤ 1.1x the header, wall ≤ 1 s, no request with a warm cache).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stacklock.files.digest import sha256_file
from stacklock.gguf.reader import read_gguf
from stacklock.lock.api import lock_stack
from stacklock.sources.hub import read_remote_header, stat_hub_model
from stacklock.verify.session import model_files
from tests.gguf_builder import gemma_model_path
from tests.hub_server import Blob, running_hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "bench/remote-gguf"
MANIFEST = """\
[stack]
name = "remote"

[model]
source = "hf://{repo}/{name}"

[template]
source = "none"

[engine]
name = "llama.cpp"
version = "==b6000"
"""


def sparse_model(header: bytes, size: int, path: Path) -> Blob:
    with path.open("wb") as file:
        file.write(header)
        file.truncate(size)
    return Blob(path, sha256_file(path))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--baseline-mb", type=int, default=400)
    args = parser.parse_args()
    real = gemma_model_path()
    if real is None:
        print("the Gemma 3 270M model is needed (see benchmarks/README.md)")
        return 2
    gguf = read_gguf(real)
    header_size = min(t.file_offset for t in gguf.tensors)
    header = real.read_bytes()[:header_size]
    failed = False
    with tempfile.TemporaryDirectory() as tmp, running_hub() as hub:
        root = Path(tmp)
        os.environ.update(
            HF_ENDPOINT=hub.url,
            HF_HUB_CACHE=str(root / "hf-cache"),
            HF_HOME=str(root / "hf-home"),
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            STACKLOCK_CACHE_DIR=str(root / "cache"),
        )
        big_size = int(args.size_gb * (1 << 30))
        small_size = args.baseline_mb << 20
        started = time.perf_counter()
        big = sparse_model(header, big_size, root / "big.gguf")
        small = sparse_model(header, small_size, root / "small.gguf")
        setup = time.perf_counter() - started
        hub.add(REPO, COMMIT, {"big.gguf": big, "small.gguf": small})
        print(f"setup (sparse files and their sha256, not measured): {setup:.1f} s")
        print(f"header of the real model: {header_size:,} bytes")

        project = root / "project"
        project.mkdir()
        manifest = project / "llmstack.toml"
        manifest.write_text(MANIFEST.format(repo=REPO, name="big.gguf"), encoding="utf-8")
        hub.bytes_sent, hub.requests[:] = 0, []
        started = time.perf_counter()
        lock = lock_stack(manifest, use_cache=False)
        wall = time.perf_counter() - started
        ratio = hub.bytes_sent / header_size
        print(
            f"lock of a {args.size_gb:g} GB remote GGUF: {wall:.3f} s, {hub.bytes_sent:,} bytes transferred "
            f"({ratio:.3f}x the header; target <= 1.1x, wall <= 1 s), {len(hub.requests)} requests"
        )
        failed |= ratio > 1.1 or wall > 1.0
        assert lock.model.sha256 == big.sha256
        # Where the time goes: the hub part alone, against parsing the same header from the local file.
        started = time.perf_counter()
        read_remote_header(stat_hub_model(REPO, "main", "big.gguf"))
        remote = time.perf_counter() - started
        started = time.perf_counter()
        read_gguf(root / "big.gguf")
        local = time.perf_counter() - started
        print(
            f"  of which the hub part (HEAD + ranged header parse): {remote:.3f} s; local parse: {local:.3f} s"
        )

        from huggingface_hub import hf_hub_download  # noqa: PLC0415

        started = time.perf_counter()
        local = hf_hub_download(REPO, "small.gguf", revision=COMMIT, cache_dir=root / "baseline-cache")
        digest = hashlib.sha256(Path(local).read_bytes()).hexdigest()
        baseline = time.perf_counter() - started
        assert digest == small.sha256
        extrapolated = baseline * big_size / small_size
        print(
            f"baseline, download + sha256 of {args.baseline_mb} MB: {baseline:.2f} s; extrapolated to "
            f"{args.size_gb:g} GB: {extrapolated:.1f} s ({extrapolated / wall:.0f}x the header-only lock)"
        )

        manifest.write_text(MANIFEST.format(repo=REPO, name="small.gguf"), encoding="utf-8")
        small_lock = lock_stack(manifest, use_cache=False)
        model_files(small_lock, project, download=True)  # Warms the hub cache.
        hub.requests[:] = []
        files = model_files(small_lock, project, download=True)
        online = len(hub.requests)
        os.environ["HF_HUB_OFFLINE"] = "1"
        files_offline = model_files(small_lock, project, download=True)
        offline = len(hub.requests) - online
        del os.environ["HF_HUB_OFFLINE"]
        assert files == files_offline
        print(
            f"verify's fetch with a warm hub cache: {online} request(s) online, {offline} offline (target 0)"
        )
        failed |= online + offline > 0
    print("FAIL" if failed else "all targets met")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
