#!/usr/bin/env bash
# tests/bench/gpu_bench.sh — mill's GPU benchmarks for every benchmark config in one run, each figure
# with its floor, and HF transformers' rate on the same config and batch where HF can run it in the
# time (dsv4-small). Run from the repository root on the GPU machine, with binaries already built
# (cmake -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j):
#     bash tests/bench/gpu_bench.sh
# Everything goes to stdout. Each step is guarded (a failure or timeout is reported and the next
# step runs) and limited with `timeout`; every limit is also cut to what is left of a whole-script
# budget, so the script ends within GPU_BENCH_BUDGET seconds (default 580, under 10 minutes).
# CONFIGS: space-separated NAME:TRAIN_B:HF entries (HF 1: also HF's rate; default
# "dsv4-small:8:1 dsv4-flash-slice:4:0", configs/models/NAME.json). Other overrides (environment):
# BIN (./build/bin), PYTHON (python3), TRAIN_T (1024), DEC_BATCHES (1,32,128), DEC_P (128),
# MILL_STEPS (64), HF_STEPS (16), REFRESH (0; 1: the weight-refresh figures of the first config),
# GPU_BENCH_BUDGET (580).
# HF's eager decode of dsv4-small is slow (about 16 tokens/s at batch 1), so HF generates only
# HF_STEPS new tokens per batch; mill decodes MILL_STEPS from the same prompt length. The decode
# rate barely depends on the context length here (sliding window 128; compressed entries are few).
# flash-slice is DeepSeek-V4-Flash's widths with 2 layers and 16 experts (one rank's share under
# EP16): HF has no fast path for it and is not run there.
set -u
BIN=${BIN:-./build/bin}
PYTHON=${PYTHON:-python3}
CONFIGS=${CONFIGS:-dsv4-small:8:1 dsv4-flash-slice:4:0}
TRAIN_T=${TRAIN_T:-1024}
DEC_BATCHES=${DEC_BATCHES:-1,32,128}
DEC_P=${DEC_P:-128}
MILL_STEPS=${MILL_STEPS:-64}
HF_STEPS=${HF_STEPS:-16}
REFRESH=${REFRESH:-0}
BUDGET=${GPU_BENCH_BUDGET:-580}
START=$(date +%s)
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench-XXXXXX")
trap 'rm -rf "$OUT"' EXIT

# step NAME LIMIT_S CMD...: runs CMD under `timeout` (LIMIT_S, cut to the budget left less a
# margin for the kill), output to stdout and to $OUT/NAME.log; never stops the script.
step() {
    local name=$1 limit=$2 left
    shift 2
    left=$((BUDGET - ($(date +%s) - START) - 10))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped (the ${BUDGET} s budget is spent)"
        return 1
    fi
    echo "== $name (limit ${limit} s): $*"
    local t0=$(date +%s) rc
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        echo "== $name: ok in $(($(date +%s) - t0)) s"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "== $name: TIMED OUT after ${limit} s (partial output above)"
    else
        echo "== $name: FAILED with exit code $rc"
    fi
    return "$rc"
}

echo "== mill GPU benchmarks, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
timeout 20 nvidia-smi -L 2>&1 || echo "== nvidia-smi -L failed"

first=1
for entry in $CONFIGS; do
    IFS=: read -r name TRAIN_B HF <<<"$entry"
    CONFIG=configs/models/$name.json
    echo "== config $name: $CONFIG, train B=$TRAIN_B x T=$TRAIN_T, HF ${HF:-0}"
    # (a) training step: mill's tokens/s and MFU, then HF's rate on the same config and batch
    step "$name.bench_train" 120 "$BIN/bench_train" --device cuda --config "$CONFIG" --batch "$TRAIN_B" --seq "$TRAIN_T"
    MILL_TRAIN=$(sed -n 's/^mill train step B=[0-9]* T=[0-9]*: \([0-9.]*\) tokens\/s.*/\1/p' "$OUT/$name.bench_train.log" 2>/dev/null)
    if [ "${HF:-0}" = 1 ]; then
        echo "== mill train tokens/s for the ratio: ${MILL_TRAIN:-none}"
        step "$name.hf_train" 80 "$PYTHON" tests/bench/hf_train.py "$CONFIG" "$TRAIN_B" "$TRAIN_T" ${MILL_TRAIN:+"$MILL_TRAIN"}
    fi
    # (b) decode at each batch against the memory-bandwidth floor, then HF generate at the same batches
    step "$name.bench_decode" 110 "$BIN/bench_decode" --device cuda --config "$CONFIG" --batches "$DEC_BATCHES" \
        --prompt "$DEC_P" --steps "$MILL_STEPS"
    if [ "${HF:-0}" = 1 ]; then
        MILL_DEC="" sep=""
        for b in ${DEC_BATCHES//,/ }; do # one entry per batch, empty where mill printed none
            x=$(sed -n "s/^decode B=$b: \([0-9.]*\) tok\/s.*/\1/p" "$OUT/$name.bench_decode.log" 2>/dev/null)
            MILL_DEC="$MILL_DEC$sep$x"
            sep=","
        done
        echo "== mill decode tok/s for the ratios (batches $DEC_BATCHES): $MILL_DEC"
        step "$name.hf_decode" 90 "$PYTHON" tests/bench/hf_decode.py "$CONFIG" "$DEC_BATCHES" "$DEC_P" "$HF_STEPS" "$MILL_DEC"
    fi
    # (c) weight refresh through the GRPO loop's publish path against the device-copy floor
    if [ "$REFRESH" = 1 ] && [ $first = 1 ]; then
        step "$name.bench_refresh" 80 "$BIN/bench_refresh" --device cuda --config "$CONFIG" --reps 2
        step "$name.bench_refresh_ipc" 60 "$BIN/bench_refresh" --device cuda --config "$CONFIG" --reps 3 --ipc
    fi
    first=0
done

echo "== done in $(($(date +%s) - START)) s"
