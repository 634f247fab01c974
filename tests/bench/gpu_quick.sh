#!/bin/bash
# The quick GPU round after a kernel change: gpu_devrun.sh's parity tests (ops, model), decode with
# and without CUDA graphs, a training step, and the MILL_PROFILE tables of op-by-op decode and of a
# training step. Same set-up as gpu_devrun.sh (build-gpu/bin and .devlibs carried); OUT: logs.
B=${MILL_BUILD:-build-gpu}/bin; C=configs/models/dsv4-small.json
export LD_LIBRARY_PATH=$PWD/.devlibs:$LD_LIBRARY_PATH OMP_NUM_THREADS=8
bash tests/bench/gpu_devrun.sh ops model
timeout 200 $B/bench_decode --device cuda --config $C --batches ${DEC_BATCHES:-1,32,128} --prompt 128 --steps 64 2>&1 | grep -v "^\s*$"
timeout 120 $B/bench_train --device cuda --config $C --batch 8 --seq 1024 2>&1 | tail -1
for b in 1 32; do
  MILL_PROFILE=1 timeout 100 $B/bench_decode --device cuda --config $C --batches $b --prompt 128 --steps 32 2>&1 | grep "mill profile" | head -14
done
MILL_PROFILE=1 timeout 120 $B/bench_train --device cuda --config $C --batch 8 --seq 1024 --reps 2 2>&1 | grep "mill profile" | head -16
