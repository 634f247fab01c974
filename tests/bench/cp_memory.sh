#!/bin/bash
# Context parallelism's activation memory on a model too big for CI: `mill grad` on one row of T tokens,
# at cp 1 and at cp N (mpiexec ranks on this machine's CPU), each printing its largest rank's arena peak,
# and the two gradients compared. Needs about 100 GB for dsv4-small at T = 8192 (the GPU machine's CPU).
# usage: bash tests/bench/cp_memory.sh [CONFIG [T [N]]]   (MILL_BUILD: the build, default build-dist)
set -eu
B=${MILL_BUILD:-build-dist}/bin
CFG=${1:-configs/models/dsv4-small.json} T=${2:-8192} N=${3:-4}
W=${TMPDIR:-/tmp}/cp_memory
rm -rf "$W" && mkdir -p "$W"
$B/mill init --config "$CFG" --out "$W/model" --seed 1 > /dev/null
python3 - "$W/model/config.json" "$T" > "$W/input.json" <<'PY'
import json, random, sys
V = json.load(open(sys.argv[1]))["vocab_size"]
random.seed(7)
print(json.dumps({"input_ids": [[random.randrange(V) for _ in range(int(sys.argv[2]))]]}))
PY
cores=$(nproc)
echo "$CFG, 1 x $T tokens, $cores cores"
/usr/bin/time -f "cp 1: %e s, max RSS %M KiB" env OMP_NUM_THREADS=$cores \
  $B/mill grad --model "$W/model" --input "$W/input.json" --device cpu --output "$W/cp1.st" 2>&1 | grep -E "activations|cp 1|error"
/usr/bin/time -f "cp $N: %e s, max RSS of the launcher %M KiB" env OMP_NUM_THREADS=$((cores / N)) \
  mpiexec.hydra -n "$N" $B/mill grad --model "$W/model" --input "$W/input.json" --device cpu --cp "$N" \
  --output "$W/cp$N.st" 2>&1 | grep -E "activations|cp $N|error"
$B/st_diff "$W/cp1.st" "$W/cp$N.st" 1 | tail -2
