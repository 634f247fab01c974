#!/bin/bash
# The rollout engine over CPU ranks (rollout/group.h): decode tokens/s (and a rank's share) and the
# bytes a decode step sends between the ranks, for one engine and engines of several ranks, each
# layout with the machine's cores shared out (OMP_NUM_THREADS = cores / ranks), on a model made by
# mill init (default dsv4-small), P prompts of T tokens, N new tokens sampled. Each layout's tokens
# and logprobs are checked against the one-rank engine's (they must be the same bits).
# usage: bash tests/bench/engine_ranks.sh [CONFIG [P [T [N]]]]   (MILL_BUILD: default build-dist)
set -eu
B=${MILL_BUILD:-build-dist}/bin
CFG=${1:-configs/models/dsv4-small.json} P=${2:-8} T=${3:-64} N=${4:-32}
W=${TMPDIR:-/tmp}/engine_ranks
rm -rf "$W" && mkdir -p "$W"
$B/mill init --config "$CFG" --out "$W/model" --seed 3 > /dev/null
python3 - "$W/model/config.json" "$P" "$T" > "$W/in.json" <<'PY'
import json, random, sys
V = json.load(open(sys.argv[1]))["vocab_size"]
random.seed(5)
print(json.dumps({"input_ids": [[random.randrange(V) for _ in range(int(sys.argv[3]))] for _ in range(int(sys.argv[2]))]}))
PY
cores=$(nproc)
echo "$CFG: $P prompts of $T tokens, $N new tokens (temperature 1), $cores cores"
for lay in "" "--ep 2" "--tp 2" "--ep 2 --tp 2" "--ep 4"; do
    w=1
    for x in $lay; do case "$x" in [0-9]*) [ "$x" -gt "$w" ] && w=$x ;; esac; done
    th=$((cores / w > 0 ? cores / w : 1))
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$th $B/mill generate --model "$W/model" --input "$W/in.json" --max-new-tokens "$N" --temperature 1 \
        --seed 7 --device cpu --output "$W/out$w.json" $lay 2> "$W/log" || { tail -3 "$W/log"; continue; }
    t1=$(date +%s.%N)
    line=$(grep "engine of" "$W/log" | sed 's/.*generate: //')
    same=$(python3 -c "import json,sys; a,b=(json.load(open(p)) for p in sys.argv[1:]); print('same bits as 1 rank' if a['output_ids']==b['output_ids'] and a['logprobs']==b['logprobs'] else 'DIFFERENT from 1 rank')" "$W/out$w.json" "$W/out1.json")
    printf '%-14s %3d thread(s) a rank, %.1f s in all: %s (%s)\n' "${lay:-1 rank}" "$th" "$(echo "$t1 - $t0" | bc)" "$line" "$same"
    cp "$W/out$w.json" "$W/last.json"
done
