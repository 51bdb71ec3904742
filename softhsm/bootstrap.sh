#!/usr/bin/env bash
# Install everything hsmbridge needs on a Debian machine, as root, with nothing prepared:
#   - Debian packages: softhsm2 (the HSM), opensc (pkcs11-tool), python3-venv; with `test` also
#     postgresql (the server the metadata tests start as the `postgres` user; the service itself
#     needs one only when `[metadata] url` names a PostgreSQL database, usually on another host)
#     and wrk (the benchmark's C load generator, whose phase the benchmark smoke test runs)
#     and chromium (the browser the web console's Playwright tests drive by its path);
#     with `test` or `shim` also gcc, libc6-dev and libp11-kit-dev (PKCS#11 header), to build
#   - the CloudHSM stand-in PKCS#11 module (softhsm/cloudhsm-shim/build.sh), with `test` or `shim`
#   - a virtualenv at .venv with hsmbridge installed editable (plus test tools with `test`)
# Idempotent and quiet when everything is already there; safe with no standard input (CI).
#
#   bash softhsm/bootstrap.sh          # runtime only
#   bash softhsm/bootstrap.sh test     # runtime + test/lint tools + the CloudHSM stand-in
#   bash softhsm/bootstrap.sh shim     # runtime + the CloudHSM stand-in (`init --hsm cloudhsm-shim`)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}

need_apt=()
command -v softhsm2-util >/dev/null 2>&1 || need_apt+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need_apt+=(opensc)
if [ "$extras" = "test" ] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    need_apt+=(postgresql)
fi
if [ "$extras" = "test" ] && ! command -v wrk >/dev/null 2>&1; then
    need_apt+=(wrk)  # the benchmark's C load generator; the smoke test runs its phase
fi
if [ "$extras" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
    need_apt+=(chromium)  # tests/console drive it with Playwright (no browser download)
fi
if [ "$extras" = "test" ] || [ "$extras" = "shim" ]; then
    command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
    [ -f /usr/include/p11-kit-1/p11-kit/pkcs11.h ] || need_apt+=(libp11-kit-dev)
fi
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "bootstrap: apt-get install ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null
    apt-get install -y -qq "${need_apt[@]}" </dev/null >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if [ "$extras" = "test" ] || [ "$extras" = "shim" ]; then
    sh softhsm/cloudhsm-shim/build.sh >/dev/null
fi
spec="."
[ "$extras" = "test" ] && spec=".[test]"
# Reinstall only when the dependency list changed: a stamp keyed on pyproject.toml and extras.
stamp=".venv/.hsmbridge-$( (cat pyproject.toml; echo "$extras") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip </dev/null
    .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec" </dev/null
    rm -f .venv/.hsmbridge-*
    touch "$stamp"
fi
