#!/bin/sh
# tests/bench/sft_gpu_check.sh — `mill sft --device cpu` against `--device cuda` on the GPU machine
# (not run by ctest): 20 steps of configs/runs/sft-arith-tiny.yaml (a temporary copy with
# train.steps 20, a loss line every step and checkpoints under a temp dir), then both final losses.
# The CUDA GEMMs take bf16 operands, so the two losses agree closely, not bit for bit.
#
# usage (from the repository root): tests/bench/sft_gpu_check.sh [PATH/TO/mill]   (default ./build/bin/mill)
MILL=${1:-./build/bin/mill}
RECIPE=configs/runs/sft-arith-tiny.yaml
if [ ! -x "$MILL" ] || [ ! -f "$RECIPE" ]; then
    echo "$0: run from the repository root with a built mill ($MILL) and $RECIPE" >&2
    exit 2
fi
T=$(mktemp -d "${TMPDIR:-/tmp}/sft_gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$T"' EXIT
trap 'exit 130' INT TERM

# the recipe's own keys, edited in place so a changed recipe shows up as a failed check
sed -e 's|^  steps: 300 .*|  steps: 20|' -e 's|^  log_every: 50$|  log_every: 1|' \
    -e "s|^  dir: runs/sft-arith-tiny\$|  dir: $T/ck|" "$RECIPE" >"$T/recipe.yaml"
if ! grep -q '^  steps: 20$' "$T/recipe.yaml" || ! grep -q '^  log_every: 1$' "$T/recipe.yaml" ||
    ! grep -q "^  dir: $T/ck\$" "$T/recipe.yaml"; then
    echo "$0: could not set train.steps, train.log_every and checkpoint.dir in a copy of $RECIPE" >&2
    exit 2
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
rc=0
for dev in cpu cuda; do
    sed "s|^  dir: $T/ck\$|  dir: $T/ck-$dev|" "$T/recipe.yaml" >"$T/recipe-$dev.yaml"
    t0=$(date +%s.%N)
    "$MILL" sft "$T/recipe-$dev.yaml" --device "$dev" >"$T/$dev.log" 2>"$T/$dev.err"
    st=$?
    wall=$(echo "$(date +%s.%N) - $t0" | bc)
    if [ "$st" -ne 0 ]; then
        echo "$dev: exit status $st: $(head -n 1 "$T/$dev.err")"
        rc=1
        continue
    fi
    loss=$(grep '^step  *20  loss' "$T/$dev.log" | awk '{print $4}')
    acc=$(grep 'held-out greedy accuracy' "$T/$dev.log" | tail -n 1 | awk '{print $6}')
    ck=$([ -f "$T/ck-$dev/step-000020/model.safetensors" ] && echo written || echo MISSING)
    echo "$dev: final loss (step 20) $loss  held-out accuracy $acc  checkpoint $ck  wall ${wall}s"
    eval "loss_$dev=\$loss"
    grep '^step' "$T/$dev.log" | head -n 3 | sed "s/^/  $dev | /"
    [ "$ck" = written ] || rc=1
done
if [ -n "$loss_cpu" ] && [ -n "$loss_cuda" ]; then
    echo "final loss cpu $loss_cpu  cuda $loss_cuda  |diff| $(echo "$loss_cpu $loss_cuda" | awk '{d = $1 - $2; print d < 0 ? -d : d}')"
fi
exit $rc
