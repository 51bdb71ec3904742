#!/usr/bin/env bash
# The benchmark, from a fresh Debian machine as root: installs SoftHSM2 and the .venv (via
# softhsm/bootstrap.sh), Debian's `wrk` (the C HTTP client of the wrk phase: the Python load
# generator's own CPU bounds the server's figure on 2 cores), the `bench` extra (moto[server],
# matplotlib, uvloop, py-spy, pyinstrument), then runs every phase and writes
# bench-results/<timestamp>/.
#
#   bash benchmarks/run.sh --quick          # < 3 minutes, for development
#   bash benchmarks/run.sh --docs           # full run; copies the report to docs/benchmarks.md
#   bash benchmarks/run.sh --keys 10,1000   # any python -m benchmarks.run option
set -euo pipefail
cd "$(dirname "$0")/.."
bash softhsm/bootstrap.sh
if ! command -v wrk >/dev/null 2>&1; then
    echo "run.sh: apt-get install wrk" >&2
    export DEBIAN_FRONTEND=noninteractive
    # The package lists are refreshed only when the install fails without them.
    apt-get install -y -q wrk </dev/null \
        || { apt-get update -q </dev/null && apt-get install -y -q wrk </dev/null; }
fi
# Same stamp idea as bootstrap.sh: reinstall the extra only when pyproject.toml changed.
stamp=".venv/.bench-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[bench]" </dev/null
    rm -f .venv/.bench-*
    touch "$stamp"
fi
exec .venv/bin/python -m benchmarks.run "$@"
