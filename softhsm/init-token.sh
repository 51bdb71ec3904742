#!/bin/sh
# Idempotent SoftHSM2 token provisioning, shared by CI, the Docker image and the pytest fixtures.
#
#   init-token.sh CONF LABEL [SO_PIN] [USER_PIN]
#
# CONF      path of the softhsm2.conf to use; written from softhsm2.conf.in (next to this
#           script) with its token directory set to "$(dirname CONF)/tokens" if it does not exist.
# LABEL     token label; a token with this label is initialised only if none exists yet.
# SO_PIN    or env HSMBRIDGE_SO_PIN   (WARNING: prefer the env vars; argv is visible in ps)
# USER_PIN  or env HSMBRIDGE_USER_PIN (the kmsuser password for the softhsm2 profile)
#
# PINs are never echoed. Exit status: 0 token present or created, 2 usage error, 1 other failure.
set -eu

usage() { echo "usage: $0 CONF LABEL [SO_PIN] [USER_PIN]" >&2; exit 2; }
[ $# -ge 2 ] && [ $# -le 4 ] || usage

conf=$1
label=$2
so_pin=${3:-${HSMBRIDGE_SO_PIN:-}}
user_pin=${4:-${HSMBRIDGE_USER_PIN:-}}
[ -n "$label" ] || usage
if [ -z "$so_pin" ] || [ -z "$user_pin" ]; then
    echo "$0: SO and user PINs are required (arguments or HSMBRIDGE_SO_PIN/HSMBRIDGE_USER_PIN)" >&2
    exit 2
fi

here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
if [ ! -f "$conf" ]; then
    confdir=$(CDPATH= cd -- "$(dirname -- "$conf")" && pwd)
    tokendir="$confdir/tokens"
    mkdir -p "$tokendir"
    sed "s|@TOKENDIR@|$tokendir|" "$here/softhsm2.conf.in" > "$conf"
fi
tokendir=$(sed -n 's/^directories\.tokendir *= *//p' "$conf")
[ -n "$tokendir" ] || { echo "$0: no directories.tokendir in $conf" >&2; exit 1; }
mkdir -p "$tokendir"

export SOFTHSM2_CONF="$conf"
# Exact match on the "Label:" line of every initialised slot; labels may contain spaces.
if softhsm2-util --show-slots 2>/dev/null \
        | sed -n 's/^ *Label: *//p' | sed 's/ *$//' | grep -Fxq -- "$label"; then
    echo "token '$label' already present"
    exit 0
fi
softhsm2-util --init-token --free --label "$label" --so-pin "$so_pin" --pin "$user_pin" >/dev/null
echo "token '$label' initialised"
