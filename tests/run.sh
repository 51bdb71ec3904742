#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: set-up, lint, types, layers, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash softhsm/bootstrap.sh test
export PATH="$PWD/.venv/bin:$PATH"
ruff check hsmbridge tests benchmarks
ruff format --check hsmbridge tests benchmarks
mypy
lint-imports
python -m pytest "$@"
