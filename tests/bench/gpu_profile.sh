#!/bin/bash
# Per-op device time of a training step and of decode (MILL_PROFILE=1: each op synced and timed;
# kctx_free prints the table). From the repository root on the GPU machine, build in $MILL_BUILD.
B=${MILL_BUILD:-build-gpu}/bin; C=${CONFIG:-configs/models/dsv4-small.json}
export LD_LIBRARY_PATH=$PWD/.devlibs:$LD_LIBRARY_PATH
MILL_PROFILE=1 $B/bench_train --device cuda --config $C --batch 8 --seq 1024 --reps 2 2>&1 | grep -v "^\[mill profile\].* 0\.0[0-9][0-9] s" | head -60
for b in 1 32; do
  MILL_PROFILE=1 $B/bench_decode --device cuda --config $C --batches $b --prompt 128 --steps 32 2>&1 | grep -v "^\[mill profile\].* 0\.00[0-9] s" | head -45
done
