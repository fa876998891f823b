#!/usr/bin/env bash
# The one command that checks the project: set-up (idempotent), lint, types, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
echo "== pytest"
python3 -m pytest tests "$@"
