#!/usr/bin/env bash
# The benchmark, from a fresh Debian machine as root: installs SoftHSM2, PostgreSQL, Debian's `wrk`
# (the C HTTP client of the wrk phase: the Python load generator's own CPU bounds the server's
# figure on 2 cores) and the .venv with the test tools (via `softhsm/bootstrap.sh test`), the
# `bench` extra (moto[server], matplotlib, uvloop, py-spy, pyinstrument), then runs every phase
# and writes bench-results/<timestamp>/.
#
#   bash benchmarks/run.sh --quick          # about 3 minutes, for development
#   bash benchmarks/run.sh --docs           # full run; copies the report to docs/benchmarks.md
#   bash benchmarks/run.sh --keys 10,1000   # any python -m benchmarks.run option
#   bash benchmarks/run.sh instances [--docs]   # 1-3 instances on PostgreSQL vs 1 on SQLite
set -euo pipefail
cd "$(dirname "$0")/.."
bash softhsm/bootstrap.sh test
# Same stamp idea as bootstrap.sh: reinstall the extra only when pyproject.toml changed.
stamp=".venv/.bench-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[bench]" </dev/null
    rm -f .venv/.bench-*
    touch "$stamp"
fi
if [ "${1:-}" = "instances" ]; then
    shift
    exec .venv/bin/python -m benchmarks.instances "$@"
fi
exec .venv/bin/python -m benchmarks.run "$@"
