#!/bin/sh
# Quick-start command 2: install what is missing, build, run the whole test suite.
set -eu
cd "$(dirname "$0")/.."
sh scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)"
