#!/bin/sh
# Installs the Debian/Ubuntu packages mill builds against, if any are missing.
# Needs root or sudo only when something is missing. The CUDA toolkit (nvcc,
# cuBLAS, NCCL) is expected from NVIDIA's packages; without nvcc mill builds CPU-only.
set -eu
pkgs="gcc make cmake pkg-config libopenblas-dev libjansson-dev libcmocka-dev libzmq3-dev libcurl4-openssl-dev
libsqlite3-dev sqlite3 libyaml-dev libpcre2-dev gnuplot-nox mpich libmpich-dev libmpfr-dev libgmp-dev"
# msgpack-c's development package was renamed in newer releases.
msgpack="libmsgpack-c-dev libmsgpack-dev"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=""
for p in $pkgs; do installed "$p" || missing="$missing $p"; done
have_msgpack=0
for p in $msgpack; do installed "$p" && have_msgpack=1; done
[ -z "$missing" ] && [ "$have_msgpack" = 1 ] && exit 0

if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "mill: missing packages:$missing (run as root or install sudo)" >&2; exit 1; fi
echo "mill: installing$missing ..." >&2
$SUDO apt-get update -qq
if [ "$have_msgpack" = 0 ]; then
    for p in $msgpack; do
        if apt-cache show "$p" >/dev/null 2>&1; then missing="$missing $p"; break; fi
    done
fi
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
# Optional: clang with libFuzzer for the coverage-guided fuzz test (tests/run_fuzz.sh falls back
# to a plain mutation loop without it).
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang >/dev/null 2>&1 || true
