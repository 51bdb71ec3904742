#!/bin/sh
# Build the CloudHSM stand-in PKCS#11 module (cloudhsm_shim.c) into build/libcloudhsm-shim.so
# with Debian's C compiler and the PKCS#11 header of libp11-kit-dev. Run by softhsm/bootstrap.sh;
# rebuilds only when the source is newer than the library. Prints the library's path.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
out="$here/build/libcloudhsm-shim.so"
src="$here/cloudhsm_shim.c"
header=/usr/include/p11-kit-1/p11-kit/pkcs11.h
if [ ! -f "$out" ] || [ "$src" -nt "$out" ] || [ "$0" -nt "$out" ]; then
    command -v cc >/dev/null 2>&1 || { echo "$0: no C compiler: apt-get install gcc libc6-dev" >&2; exit 1; }
    [ -f "$header" ] || { echo "$0: $header missing: apt-get install libp11-kit-dev" >&2; exit 1; }
    mkdir -p "$here/build"
    cc -std=c11 -O2 -g -Wall -Wextra -Werror -fPIC -shared -fvisibility=hidden \
        -I/usr/include/p11-kit-1 -o "$out.tmp" "$src" -ldl -lpthread
    mv "$out.tmp" "$out"
fi
echo "$out"
