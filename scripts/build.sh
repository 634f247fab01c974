#!/bin/sh
# Configures and builds mill into build/ (CUDA too when nvcc is found).
set -eu
cd "$(dirname "$0")/.."
sh scripts/deps.sh
mkdir -p build
if ! cmake -B build -S . -DCMAKE_BUILD_TYPE=Release >build/configure.log 2>&1; then
    cat build/configure.log >&2
    exit 1
fi
grep "mill: CUDA" build/configure.log || true
cmake --build build -j"$(nproc)"
