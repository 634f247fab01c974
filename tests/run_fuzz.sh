#!/bin/sh
# Fuzzing of every decoder of untrusted input (tests/fuzz/README.md lists the targets), run by ctest.
# Usage: tests/run_fuzz.sh SOURCE_DIR BUILD_DIR [TARGET...]       (default: every target)
# With clang's libFuzzer: each target, built with coverage under ASan+UBSan, first replays its
# committed corpus tests/fuzz/corpus/TARGET/ (seeds and every crash kept as a regression case),
# then fuzzes for FUZZ_SECONDS (default 8) with tests/fuzz/dict/TARGET.dict; what it finds goes to
# BUILD_DIR/fuzz/found/TARGET/, never into the source tree.
# Without clang: the same targets under gcc's ASan+UBSan with the standalone driver
# (tests/fuzz/fuzz_main.c): the corpus replayed, then FUZZ_RUNS (default 20000) random mutations,
# at most FUZZ_SECONDS.
# Other settings: FUZZ_ENGINE=libfuzzer|standalone (default: libfuzzer when clang can link it);
# FUZZ_EXECS=N runs N executions per target instead of a time (the long runs); FUZZ_MERGE=1
# re-minimises the committed corpus with what this run found (-merge=1 on edge coverage: seeds,
# crash cases, then any input that adds an edge), for a person to review and commit.
# A crash prints the sanitizer's report and the input's path; keep the input as
# tests/fuzz/corpus/TARGET/crash-WHAT once the fix is in.
set -eu
src=$(cd "$1" && pwd)
out=$2/fuzz
shift 2
targets=${*:-"wire safetensors config recipe dataset chat tokenizer tokenize hub reward"}
secs=${FUZZ_SECONDS:-8}
# a 16 MiB quarantine still outlives every input's allocations, and the smaller footprint faults
# fewer fresh pages: about 25% more executions on the loaders (use-after-free is caught as before)
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=16}
mkdir -p "$out"
out=$(cd "$out" && pwd)

engine=${FUZZ_ENGINE:-}
if [ -z "$engine" ]; then
    engine=standalone
    if command -v clang >/dev/null 2>&1; then
        printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' \
            >"$out/probe.c"
        clang -fsanitize=fuzzer,address,undefined "$out/probe.c" -o "$out/probe" >/dev/null 2>&1 && engine=libfuzzer
    fi
fi

# -j2: the machines that run this have two cores; make keeps the objects between runs
if ! make -s -f "$src/tests/fuzz/fuzz.mk" SRC="$src" OUT="$out" ENGINE="$engine" TARGETS="$targets" -j2 \
    >"$out/build-$engine.log" 2>&1; then
    grep -E "error|Error" "$out/build-$engine.log" | head -20
    echo "fuzz: building the $engine targets failed (log: $out/build-$engine.log)"
    echo "0 passed, 1 failed"
    exit 1
fi

passed=0
failed=0
for t in $targets; do
    bin=$out/$engine/fuzz_$t
    corpus=$src/tests/fuzz/corpus/$t
    dict=$src/tests/fuzz/dict/$t.dict
    found=$out/found/$t
    art=$out/artifacts/$t
    log=$out/$t.log
    rm -rf "$found"
    mkdir -p "$found" "$art" "$corpus"
    start=$(date +%s)
    if [ "$engine" = libfuzzer ]; then
        # the committed corpus is read, never written: new inputs land in $found (named first)
        if [ -n "${FUZZ_EXECS:-}" ]; then budget="-runs=$FUZZ_EXECS"; else budget="-max_total_time=$secs"; fi
        set +e
        "$bin" $budget -timeout=25 -print_final_stats=1 -dict="$dict" -artifact_prefix="$art/" "$found" "$corpus" \
            >"$log" 2>&1
        rc=$?
        set -e
    else
        set +e
        if [ -n "${FUZZ_EXECS:-}" ]; then budget="-runs=$FUZZ_EXECS"; else budget="-runs=${FUZZ_RUNS:-20000} -max_total_time=$secs"; fi
        (cd "$art" && "$bin" $budget -dict="$dict" "$corpus") >"$log" 2>&1
        rc=$?
        set -e
    fi
    took=$(($(date +%s) - start))
    # a crash skips the target's own cleanup: remove scratch directories whose process is gone
    for d in "${MILL_FUZZ_TMP:-/dev/shm}/mill-fuzz-$t-"* "/tmp/mill-fuzz-$t-"*; do
        [ -d "$d" ] && ! kill -0 "${d##*-}" 2>/dev/null && rm -rf "$d"
    done
    if [ $rc -ne 0 ]; then
        grep -E "ERROR|runtime error|invariant failed|SUMMARY|==[0-9]+==" "$log" | head -12
        tail -25 "$log"
        crash=$(ls -t "$art" 2>/dev/null | head -1)
        echo "fuzz_$t: CRASH after $took s; input: $art/${crash:-?} (log: $log)"
        echo "  keep it as $corpus/crash-<what> once fixed; replay: $bin $art/${crash:-?}"
        failed=$((failed + 1))
        continue
    fi
    if [ "$engine" = libfuzzer ]; then
        execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
        last=$(grep -E '^#[0-9]+' "$log" | tail -1)
        cov=$(echo "$last" | grep -o 'cov: [0-9]*' | grep -o '[0-9]*' || echo "?")
        ft=$(echo "$last" | grep -o 'ft: [0-9]*' | grep -o '[0-9]*' || echo "?")
        echo "fuzz_$t: $execs executions in $took s, cov $cov, ft $ft, $(ls "$corpus" | wc -l) corpus files replayed, no crash"
        if [ "${FUZZ_MERGE:-0}" = 1 ]; then
            # minimised anew each time: seeds and crash cases, then whatever adds an edge (counters
            # off: hit-count buckets would keep hundreds more files for little); libFuzzer's
            # earlier additions (hex names) are replaced by the result
            m=$out/merge/$t
            rm -rf "$m"
            mkdir -p "$m"
            cp "$corpus"/seed-* "$m"/ 2>/dev/null || true
            cp "$corpus"/crash-* "$m"/ 2>/dev/null || true
            if "$bin" -merge=1 -use_counters=0 "$m" "$corpus" "$found" >"$out/$t.merge.log" 2>&1; then
                ls "$corpus" | grep -E '^[0-9a-f]{40}$' | sed "s|^|$corpus/|" | xargs -r rm -f
                cp "$m"/* "$corpus"/
                echo "  merged: $(ls "$corpus" | wc -l) files, $(cat "$corpus"/* | wc -c) bytes in $corpus"
            else
                echo "  merge failed, corpus left as it was (log: $out/$t.merge.log)"
            fi
        fi
    else
        echo "fuzz_$t: $(tail -1 "$log") ($took s)"
    fi
    passed=$((passed + 1))
done
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
