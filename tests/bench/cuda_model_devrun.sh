#!/bin/bash
# Device run of the model-on-CUDA checks (issue 6): carried binaries, libraries and goldens.
# Layout of the carried folder: bin/ (mill, test_model_cuda, test_cuda_ops), lib/ (libraries the device may lack;
# libopenblas.so.0.xz compressed to fit the carry limit), data/tiny-a, data/tiny-b. Writes results under $OUT.
D=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/uselib
for f in "$D"/lib/*; do
  n=$(basename "$f" .xz)
  if ! ldconfig -p | awk '{print $1}' | grep -qx "$n"; then
    if [[ $f == *.xz ]]; then xz -dc "$f" > /tmp/uselib/$n; else cp "$f" /tmp/uselib/; fi
    echo "carried lib used: $n"
  fi
done
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/tmp/uselib:$LD_LIBRARY_PATH
export MILL_TEST_DATA_DIR=$D/data OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for b in mill test_model_cuda test_cuda_ops; do ldd $D/bin/$b | grep "not found"; done
echo "=== test_model_cuda"; t0=$(date +%s.%N)
timeout 200 $D/bin/test_model_cuda 2>&1 | tee $OUT/test_model_cuda.txt; echo "rc ${PIPESTATUS[0]} wall $(echo "$(date +%s.%N) - $t0" | bc)s"
echo "=== mill forward/grad --device cuda|cpu on tiny-a"
for dev in cuda cpu; do
  timeout 60 $D/bin/mill forward --model $D/data/tiny-a --input $D/data/tiny-a/input.json --output /tmp/fwd-$dev.safetensors --device $dev 2>&1 | tail -2
  timeout 60 $D/bin/mill grad --model $D/data/tiny-a --input $D/data/tiny-a/input.json --output /tmp/grad-$dev.safetensors --device $dev 2>&1 | tail -2
done
timeout 60 python3 - "$D" <<'PY' 2>&1 | tee $OUT/cli.txt
import sys, torch
from safetensors.torch import load_file
D = sys.argv[1]
def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm()).item()
ref = load_file(f"{D}/data/tiny-a/expected.safetensors")["logits"].reshape(-1)
fc, fp = load_file("/tmp/fwd-cuda.safetensors"), load_file("/tmp/fwd-cpu.safetensors")
print(f"mill forward --device cuda: logits vs HF {rel(fc['logits'].reshape(-1), ref):.3e}, vs --device cpu {rel(fc['logits'], fp['logits']):.3e}; routing ids differing from cpu: {(fc['routing'] != fp['routing']).sum().item()} of {fc['routing'].numel()}")
gr = load_file(f"{D}/data/tiny-a/grads.safetensors"); gc = load_file("/tmp/grad-cuda.safetensors"); gp = load_file("/tmp/grad-cpu.safetensors")
w = max((rel(gc[k], gr[k]), k) for k in gr if k.startswith("grad."))
print(f"mill grad --device cuda: loss {gc['loss'].item():.6f} (cpu {gp['loss'].item():.6f}, HF {gr['loss'].item():.6f}); {sum(k.startswith('grad.') for k in gc)} tensors; worst rel err vs HF {w[0]:.3e} ({w[1]})")
PY
echo "=== test_cuda_ops"; timeout 200 $D/bin/test_cuda_ops > $OUT/test_cuda_ops.txt 2>&1; echo "rc $?"; grep -E "token_logp|op_copy|op_zero|repeat_rows|gather_i32|FAIL|PASSED|FAILED" $OUT/test_cuda_ops.txt | tail -40
echo "=== compute-sanitizer memcheck, test_model_cuda"
timeout 150 compute-sanitizer --tool memcheck $D/bin/test_model_cuda > $OUT/memcheck.txt 2>&1; echo "rc $?"; tail -3 $OUT/memcheck.txt
