#!/usr/bin/env bash
# The benchmark, from a fresh Debian machine as root: installs SoftHSM2 and the .venv (via
# softhsm/bootstrap.sh), the `bench` extra (moto[server], matplotlib, uvloop, py-spy,
# pyinstrument), then runs every phase and writes bench-results/<timestamp>/.
#
#   bash benchmarks/run.sh --quick          # < 3 minutes, for development
#   bash benchmarks/run.sh --docs           # full run; copies the report to docs/benchmarks.md
#   bash benchmarks/run.sh --keys 10,1000   # any python -m benchmarks.run option
set -euo pipefail
cd "$(dirname "$0")/.."
bash softhsm/bootstrap.sh
# Same stamp idea as bootstrap.sh: reinstall the extra only when pyproject.toml changed.
stamp=".venv/.bench-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[bench]" </dev/null
    rm -f .venv/.bench-*
    touch "$stamp"
fi
exec .venv/bin/python -m benchmarks.run "$@"
