#!/usr/bin/env bash
# The test suite: lint, type-check, schemas, then pytest (engine and real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check stacklock tests benchmarks
.venv/bin/ruff format --check stacklock tests benchmarks
.venv/bin/mypy
# pytest exits 5 when it collects no test; that is a failure here like any other non-zero code.
.venv/bin/python -m pytest "$@"
