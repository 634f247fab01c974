#!/bin/sh
# Bounded fuzzing of the wire decoder (common/wire.c), run by ctest.
# With clang and libFuzzer: a coverage-guided run under ASan/UBSan for FUZZ_SECONDS (default 20).
# Without them: the same target built with -DFUZZ_STANDALONE runs FUZZ_RUNS random mutations of
# valid messages. Usage: tests/run_fuzz.sh SOURCE_DIR BUILD_DIR
set -eu
src=$1
out=$2/fuzz
mkdir -p "$out"
files="$src/tests/fuzz_wire.c $src/common/wire.c $src/common/err.c $src/common/tensor.c"
libs="-lmsgpackc -lzmq -lm"
if command -v clang >/dev/null 2>&1 &&
    clang -fsanitize=fuzzer,address,undefined -I"$src" -D_GNU_SOURCE $files $libs -o "$out/fuzz_wire" 2>"$out/build.log"; then
    mkdir -p "$out/corpus"
    "$out/fuzz_wire" -max_total_time="${FUZZ_SECONDS:-20}" -print_final_stats=1 "$out/corpus" 2>"$out/fuzz.log" || {
        tail -40 "$out/fuzz.log"
        echo "0 passed, 1 failed"
        exit 1
    }
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/fuzz.log" | grep -o '[0-9]*$' || echo "?")
    echo "libFuzzer: $runs executions in ${FUZZ_SECONDS:-20} s, no crash"
else
    cc -std=c11 -D_GNU_SOURCE -DFUZZ_STANDALONE -O1 -g -fsanitize=address,undefined -I"$src" $files $libs \
        -o "$out/fuzz_wire_sa"
    "$out/fuzz_wire_sa" "${FUZZ_RUNS:-200000}"
    echo "standalone fuzz: ${FUZZ_RUNS:-200000} mutated messages, no crash"
fi
echo "1 passed, 0 failed"
