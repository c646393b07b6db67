#!/usr/bin/env bash
# The upstream patch series: applies to megatron-core 0.19.2's sources, its tests pass
# on the CPU, and the patched Megatron-Core alone reproduces the plugin's biases.
# Needs .venv (built by `make test`), git, and PyPI for the megatron-core wheel.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v git >/dev/null || { echo "20-patches: git is required" >&2; exit 1; }
PY=.venv/bin/python patches/tools/check.sh
