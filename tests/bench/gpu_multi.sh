#!/bin/bash
# Distributed runs on a machine of several GPUs (issue "Runs on several GPUs over NCCL"), in one
# device call. Not run yet: no kind with several GPUs was lent when it was written. Build here with
# CUDA, pack (tests/bench/gpu_pack.sh build-gpu mill st_diff bench_comm bench_pipeline), carry
# [".devpack"], then on the device, in the tree:
#   tar -xJf .devpack/pack.tar.xz && bash tests/bench/gpu_multi.sh
# Outputs go to stdout and $OUT. One rank per GPU (comm_world_init sets CUDA_VISIBLE_DEVICES per
# local rank); NVLink multicast off.
B=${MILL_BUILD:-build-gpu}/bin
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/.devlibs:/usr/local/cuda/lib64:$LD_LIBRARY_PATH PATH=$PWD/.devlibs/bin:$PATH
export NCCL_NVLS_ENABLE=0 MILL_MPIEXEC=mpiexec.hydra
G=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1
echo "$G GPUs"
[ "$G" -ge 2 ] || { echo "gpu_multi.sh: needs at least 2 GPUs"; exit 2; }
M=tests/data/tiny-a
IN="--model $M --input $M/input.json --device cuda"
echo "=== parity: grad over dp / pp / pp x dp on the GPUs against one GPU (bf16 operands: see test_model_cuda's header)"
"$B/mill" grad $IN --output /tmp/g1.st 2>&1 | tail -1
for lay in "--dp 2" "--pp 2" "--pp 2 --micro-batches 2" ; do
  "$B/mill" grad $IN --output /tmp/gl.st $lay 2>&1 | tail -1
  "$B/st_diff" /tmp/gl.st /tmp/g1.st 1 | sed "s/^/$lay: /"
done
if [ "$G" -ge 4 ]; then
  for lay in "--dp 4" "--pp 4" "--pp 2 --dp 2"; do
    "$B/mill" grad $IN --output /tmp/gl.st $lay 2>&1 | tail -1
    "$B/st_diff" /tmp/gl.st /tmp/g1.st 1 | sed "s/^/$lay: /"
  done
fi
echo "=== bus bandwidth through mill's communicator against NCCL's own calls"
mpiexec.hydra -n "$G" "$B/bench_comm" --device cuda --ops all_reduce,all_to_all --max-bytes 1073741824 2>&1 |
  tee "$OUT/bench_comm.txt" | tail -40
echo "=== sft on the GPUs, 20 steps: dp 2 and pp 2 against one GPU"
for lay in "" "--dp 2" "--pp 2"; do
  rm -rf runs/sft-dist
  "$B/mill" sft tests/data/sft-dist.yaml --device cuda $lay 2>&1 | grep -E "step +20|per rank|error"
  name=$(echo "x$lay" | tr -d ' -'); mv runs/sft-dist "/tmp/sft$name"
done
"$B/st_diff" /tmp/sftxdp2/step-000020 /tmp/sftx/step-000020 1
"$B/st_diff" /tmp/sftxpp2/step-000020 /tmp/sftx/step-000020 1
echo "=== the GRPO demo, trainer dp 2 on 2 GPUs (colocated engine on the first), 150 steps, against one GPU"
for dp in 1 2; do
  rm -rf "/tmp/demo$dp"
  /usr/bin/time -f "dp $dp: %e s" timeout 900 "$B/mill" run configs/runs/grpo-arith-demo.yaml --set name=demo$dp \
    --set ledger=/tmp/demo$dp/l.db --set checkpoint.dir=/tmp/demo$dp/ck --set train.parallel.dp=$dp \
    --set train.device=cuda --set rollout.device=cuda 2>&1 | grep -E "accuracy|error|: [0-9.]+ s$" | tail -4
  grep -h "publish:" /tmp/demo$dp/ck/logs/trainer.log | tail -1
done
