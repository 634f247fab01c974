#!/bin/bash
# The GPU checks of the CUDA backend in one device call (the GPU machine lacks ZeroMQ and msgpack-c
# and cannot build: carry a build and the libraries, ../shared/device/README.md):
#   cmake -B build-gpu -S . -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 && cmake --build build-gpu -j2
#   ../shared/device/pack-libs.sh
#   device run, carry ["build-gpu", ".devlibs"]: bash tests/bench/gpu_devrun.sh [PART...]
# PART: ops, model, cli, grpo, dist, memcheck (default: all of them), and exact (not in the default):
# the opt-in tensor-core attention against the CPU with memcheck, and rollout.exact's GRPO gap. The benchmarks are gpu_bench.sh's. Outputs go to stdout and $OUT.
B=${MILL_BUILD:-build-gpu}/bin
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.devlibs:/usr/local/cuda/lib64:$LD_LIBRARY_PATH
export MILL_TEST_DATA_DIR=$PWD/tests/data OMP_NUM_THREADS=8
parts=${*:-ops model cli grpo dist memcheck}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
ldd $B/mill | grep "not found"
has() { [[ " $parts " == *" $1 "* ]]; }
if has ops; then
  echo "=== test_cuda_ops"; timeout 200 $B/test_cuda_ops > $OUT/test_cuda_ops.txt 2>&1; echo "rc $?"
  grep -E "cache|FAIL|PASSED|FAILED" $OUT/test_cuda_ops.txt | tail -20
fi
if has model; then
  echo "=== test_model_cuda"; timeout 300 $B/test_model_cuda 2>&1 | tee $OUT/test_model_cuda.txt | grep -E "^#|OK|FAIL|PASSED"
fi
if has cli; then
  echo "=== mill generate --device cuda|cpu on tiny-a's golden prompts"
  python3 -c "import json; g=json.load(open('tests/data/tiny-a/generate.json')); json.dump({'input_ids': g['input_ids']}, open('/tmp/gen-in.json','w'))"
  for dev in cuda cpu; do
    /usr/bin/time -f "$dev: %e s" timeout 60 $B/mill generate --model tests/data/tiny-a --input /tmp/gen-in.json \
      --max-new-tokens 32 --temperature 0 --device $dev --output /tmp/gen-$dev.json 2>&1 | tail -1
  done
  python3 - <<'PY'
import json
a, b = json.load(open('/tmp/gen-cuda.json')), json.load(open('/tmp/gen-cpu.json'))
for r, (x, y) in enumerate(zip(a['output_ids'], b['output_ids'])):
    same = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
    print(f"row {r}: {same} of {len(x)} greedy tokens equal on cuda and cpu; max |logprob diff| over those "
          f"{max([abs(p - q) for p, q in zip(a['logprobs'][r][:same], b['logprobs'][r][:same])] or [0]):.2e}")
PY
fi
if has grpo; then
  echo "=== GRPO, colocated, trainer and engine on the GPU (6 steps) vs the same on CPU"
  for dev in cuda cpu; do
    rm -rf /tmp/grpo-$dev
    timeout 200 $B/mill run configs/runs/grpo-arith-demo.yaml --set name=gpu-$dev --set ledger=/tmp/grpo-$dev/ledger.db \
      --set checkpoint.dir=/tmp/grpo-$dev/ckpt --set train.steps=6 --set eval.every=3 --set eval.problems=64 \
      --set train.device=$dev --set rollout.device=$dev 2>&1 | grep -E "step|accuracy|error" | tail -12
    grep -rh "publish:" /tmp/grpo-$dev 2>/dev/null | tail -2 # the weight refresh path (CUDA IPC on the GPU)
  done
fi
if has dist; then
  # the communicators on this machine: NCCL with a world of one (two ranks on one GPU are refused
  # by NCCL), MPI over CPU ranks (mpiexec.hydra carried in .devlibs)
  export PATH=$PWD/.devlibs/bin:$PATH NCCL_NVLS_ENABLE=0
  echo "=== test_comm: a world of one (the NCCL backend's ops on this GPU), then 3 CPU ranks"
  timeout 120 $B/test_comm 2>&1 | grep -E "PASSED|FAILED|SKIPPED|nccl" | tail -4
  timeout 120 mpiexec.hydra -n 3 $B/test_comm 2>&1 | grep -E "PASSED|FAILED" | tail -2
  echo "=== mill grad --device cuda (the dp group over NCCL, one rank), alone and under mpiexec -n 1, vs HF"
  G="grad --model tests/data/tiny-a --input tests/data/tiny-a/input.json --device cuda"
  timeout 120 $B/mill $G --output /tmp/gc1.st 2>&1 | tail -1
  timeout 120 mpiexec.hydra -n 1 $B/mill $G --output /tmp/gc2.st 2>&1 | tail -1
  $B/st_diff /tmp/gc1.st tests/data/tiny-a/grads.safetensors 1 grad.; $B/st_diff /tmp/gc2.st /tmp/gc1.st 0
  echo "=== two ranks on one GPU: NCCL refuses, the job ends with an error (no hang)"
  /usr/bin/time -f "%e s" timeout 120 $B/mill $G --output /tmp/gc3.st --dp 2 2>&1 | grep -E "error|s$" | head -3
  echo "=== mill sft --device cuda, 20 steps (NCCL dp group of one) against the CPU"
  rm -rf runs/sft-dist; timeout 200 $B/mill sft tests/data/sft-dist.yaml --device cuda 2>&1 | grep -E "step +20|per rank"
  mv runs/sft-dist /tmp/sft-cuda; timeout 200 $B/mill sft tests/data/sft-dist.yaml --device cpu > /dev/null 2>&1
  $B/st_diff /tmp/sft-cuda/step-000020 runs/sft-dist/step-000020 1
  echo "=== GRPO on the GPU, disaggregated (buckets staged from the device weights; no host image), 3 steps"
  echo "    (micro-batches of 4 rows through dist_pipeline), then colocated (CUDA IPC)"
  rm -rf /tmp/gd; timeout 200 $B/mill run tests/data/grpo-smoke.yaml --set name=gd --set ledger=/tmp/gd/l.db \
    --set checkpoint.dir=/tmp/gd/ck --set train.steps=3 --set train.device=cuda --set rollout.device=cuda \
    --set rollout.layout=disaggregated --set train.micro_batch=4 2>&1 | grep -E "step +[0-9]/|checkpoint|error" | tail -5
  rm -rf /tmp/gc; timeout 200 $B/mill run tests/data/grpo-smoke.yaml --set name=gc --set ledger=/tmp/gc/l.db \
    --set checkpoint.dir=/tmp/gc/ck --set train.steps=3 --set train.device=cuda --set rollout.device=cuda \
    --set train.micro_batch=4 2>&1 | grep -E "step +[0-9]/|checkpoint|error" | tail -5
  grep -h "publish:" /tmp/gd/ck/logs/trainer.log | tail -1
  timeout 60 $B/mill forward --model /tmp/gd/ck/step-000003 --input tests/data/tiny-a/input.json --device cpu \
    --output /tmp/gd.st 2>&1 | tail -1
  echo "=== tests/dist_cli.sh on this machine's CPU ranks"
  OMP_NUM_THREADS=4 timeout 300 sh tests/dist_cli.sh $B/mill $B/st_diff $PWD 2>&1 | tail -3
fi
if has exact; then
  echo "=== the tensor-core sink attention against the CPU (both paths), then under memcheck"
  timeout 200 $B/test_cuda_ops test_attention > $OUT/attention.txt 2>&1; echo "rc $?"
  grep -E "FAIL|PASSED|FAILED|^  op_sink" $OUT/attention.txt | tail -12
  timeout 240 compute-sanitizer --tool memcheck $B/test_cuda_ops test_attention 2>&1 | grep -E "Invalid|ERROR SUMMARY" |
    sort | uniq -c | head
  echo "=== GRPO on the GPU with rollout.exact true, then false (3 steps): max|dlogp| and the rollout seconds (the cost)"
  for x in true false; do
    rm -rf /tmp/gx-$x; timeout 150 $B/mill run configs/runs/grpo-arith-demo.yaml --set name=gx-$x \
      --set ledger=/tmp/gx-$x/l.db --set checkpoint.dir=/tmp/gx-$x/ck --set train.steps=3 --set eval.problems=16 \
      --set train.device=cuda --set rollout.device=cuda --set rollout.exact=$x 2>&1 | grep -E "step +[0-9]/|error" | tail -4
  done
fi
if has memcheck; then
  echo "=== compute-sanitizer memcheck, test_cuda_ops"
  timeout 240 compute-sanitizer --tool memcheck $B/test_cuda_ops > $OUT/memcheck.txt 2>&1; echo "rc $?"
  grep -E "Invalid|ERROR SUMMARY" $OUT/memcheck.txt | sort | uniq -c | head
fi
