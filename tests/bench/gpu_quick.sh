#!/bin/bash
# The lead's quick GPU round: parity tests, decode (with and without CUDA graphs), training, and
# MILL_PROFILE tables of op-by-op decode and of a training step. OUT: logs.
B=${MILL_BUILD:-build-gpu}/bin; OUT=${OUT:-/tmp/out}; mkdir -p $OUT; C=configs/models/dsv4-small.json
export LD_LIBRARY_PATH=$PWD/.devlibs:$LD_LIBRARY_PATH MILL_TEST_DATA_DIR=$PWD/tests/data OMP_NUM_THREADS=8
timeout 200 $B/test_cuda_ops > $OUT/test_cuda_ops.txt 2>&1; echo "test_cuda_ops rc $?"
grep -E "FAIL|PASSED|moe|sumsq_seg|hc_pre.*N1024" $OUT/test_cuda_ops.txt | head -24
timeout 300 $B/test_model_cuda > $OUT/test_model_cuda.txt 2>&1; echo "test_model_cuda rc $?"
grep -E "FAIL|PASSED|Error|error|engine on GPU" $OUT/test_model_cuda.txt | head -20
timeout 200 $B/bench_decode --device cuda --config $C --batches ${DEC_BATCHES:-1,32,128} --prompt 128 --steps 64 2>&1 | grep -v "^\s*$"
timeout 120 $B/bench_train --device cuda --config $C --batch 8 --seq 1024 2>&1 | tail -1
for b in 1 32; do
  MILL_PROFILE=1 timeout 100 $B/bench_decode --device cuda --config $C --batches $b --prompt 128 --steps 32 2>&1 | grep "mill profile" | head -14
done
MILL_PROFILE=1 timeout 120 $B/bench_train --device cuda --config $C --batch 8 --seq 1024 --reps 2 2>&1 | grep "mill profile" | head -16
