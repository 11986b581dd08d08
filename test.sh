#!/usr/bin/env bash
# Set up (system and Python packages), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
envs/setup.sh --dev
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff";      ruff check . && ruff format --check .
echo "== mypy";      mypy
echo "== snakefmt";  snakefmt --check Snakefile rules/
echo "== snakemake --lint"; snakemake --lint
echo "== pytest";    pytest "$@"
