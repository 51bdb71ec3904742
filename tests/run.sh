#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: set-up, lint, types, layers, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash softhsm/bootstrap.sh test
export PATH="$PWD/.venv/bin:$PATH"
ruff check hsmbridge tests
ruff format --check hsmbridge tests
mypy
lint-imports
python -m pytest "$@"
