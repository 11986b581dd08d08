#!/usr/bin/env bash
# Set up (system and Python packages), then lint and run the whole test suite.
# The tests change this machine (as root: Debian packages for a test SLURM and sshd, /etc/slurm,
# the user sshtest): see the README; tests/infra/cleanup.sh removes what they added.
set -euo pipefail
cd "$(dirname "$0")"
envs/setup.sh --dev
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff";      ruff check . && ruff format --check .
echo "== mypy";      mypy
echo "== snakefmt";  snakefmt --check Snakefile rules/
echo "== snakemake --lint"; python tests/infra/workflow_lint.py  # the conda lint is expected: docs/development.md
# In parallel, one line per finished test; the tests that share the SLURM/sshd test servers or an
# expensive module fixture run in order on one worker (tests/conftest.py). Extra arguments go to
# pytest (e.g. ./test.sh tests/test_cli.py, or -n 0 for one process).
echo "== pytest (about 15 min on 2 cores)"
pytest -n auto --dist loadgroup -v --durations=10 "$@"
