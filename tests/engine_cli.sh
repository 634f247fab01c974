#!/bin/sh
# tests/engine_cli.sh — the rollout engine over several CPU ranks (rollout/group.h), through the CLI
# as a user runs it (mill generate starts its own ranks with mpiexec):
#   - mill generate --ep 2, --tp 2, --ep 2 --tp 2, --ep 4 (four attention groups, two of them idle
#     with two prompts), --tp 2 --ep 4 on the golden models: greedy tokens equal HF's, and tokens,
#     logprobs and routing bit for bit the single-process engine's;
#   - sampled (temperature, top-k, top-p) the same;
#   - --ep 3 --tp 3 and --tp 3, --ep 3 on a model of 6 heads, 3 output groups, 9 experts and a
#     250-row vocabulary (slices of 80, 80, 90: model_vocab_split);
#   - bad layouts fail on one line before any rank starts.
# usage: tests/engine_cli.sh PATH/TO/mill SOURCE_DIR
# Prints "ok - CASE" or "not ok - CASE: REASON" per case, then "N passed, M failed".

if [ $# -ne 2 ]; then
    echo "usage: $0 PATH/TO/mill SOURCE_DIR" >&2
    exit 2
fi
MILL=$1
SRC=$2
DATA=$SRC/tests/data
T=$(mktemp -d "${TMPDIR:-/tmp}/engine_cli.XXXXXX") || exit 2
trap 'rm -rf "$T"' EXIT
trap 'exit 130' INT TERM
. "$SRC/tests/expect.sh"
cd "$SRC" || exit 2
export OMP_NUM_THREADS=1 MILL_COMM_TIMEOUT_S=120

# gen NAME MODEL IN [OPTIONS...]: mill generate into $T/NAME.json and $T/NAME.routing
gen() {
    name=$1 model=$2 in=$3
    shift 3
    "$MILL" generate --model "$model" --input "$in" --device cpu --output "$T/$name.json" --routing "$T/$name.routing" \
        "$@" 2>"$T/stderr" || { not_ok "generate $* ($name)" "$(first_err)"; return 1; }
}

# same CASE A B: A's tokens, logprobs and routing are B's bit for bit
same() {
    if out=$(python3 - "$T/$2.json" "$T/$3.json" 2>&1 <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
for k in ("output_ids", "logprobs", "finish_reason"):
    if a[k] != b[k]:
        sys.exit(f"{k} differ: {a[k]} vs {b[k]}")
print(f"{sum(len(r) for r in a['output_ids'])} tokens")
PY
    ) && cmp -s "$T/$2.routing" "$T/$3.routing"; then ok "$1 ($out, routing too)"; else not_ok "$1" "${out:-routing differs}"; fi
}

for m in tiny-a tiny-b; do
    python3 -c "import json; g = json.load(open('$DATA/$m/generate.json')); json.dump({'input_ids': g['input_ids']}, open('$T/in.json', 'w'))"
    G="$DATA/$m $T/in.json --max-new-tokens 24"
    # shellcheck disable=SC2086
    gen one $G --temperature 0 || continue
    if out=$(python3 - "$T/one.json" "$DATA/$m/generate.json" 2>&1 <<'PY'
import json, sys
a, g = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
for r, (x, y) in enumerate(zip(a["output_ids"], g["output_ids"])):
    n = min(len(x), len(y))
    if x[:n] != y[:n]:
        sys.exit(f"row {r}: {x} vs HF {y}")
print(f"{len(a['output_ids'])} rows, HF's {n} tokens each")
PY
    ); then ok "one process = HF's greedy tokens on $m ($out)"; else not_ok "one process = HF on $m" "$out"; fi
    for lay in "--ep 2" "--tp 2" "--ep 2 --tp 2" "--ep 4" "--tp 2 --ep 4"; do
        # shellcheck disable=SC2086
        gen par $G --temperature 0 $lay && same "generate $lay = one process on $m (greedy, = HF)" par one
    done
    # shellcheck disable=SC2086
    gen sone $G --temperature 0.9 --top-k 40 --top-p 0.95 --seed 3 || continue
    for lay in "--ep 2 --tp 2" "--ep 4"; do
        # shellcheck disable=SC2086
        gen spar $G --temperature 0.9 --top-k 40 --top-p 0.95 --seed 3 $lay &&
            same "generate $lay = one process on $m (sampled)" spar sone
    done
done

# any divisor: 6 heads and 3 output groups over tp 3, 9 experts over ep 3, 250 vocabulary rows in 3
"$MILL" init --config tests/data/engine3-config.json --out "$T/e3" --seed 9 >/dev/null 2>"$T/stderr" ||
    not_ok "init the 3-way model" "$(first_err)"
printf '{"input_ids": [[5, 77, 130, 2, 249, 9, 40, 13, 8], [18, 0, 201], [7, 7, 7, 7, 100]]}\n' >"$T/in3.json"
G3="$T/e3 $T/in3.json --max-new-tokens 20 --temperature 0.7 --seed 11"
# shellcheck disable=SC2086
gen e1 $G3 && for lay in "--ep 3 --tp 3" "--tp 3" "--ep 3"; do
    # shellcheck disable=SC2086
    gen e3 $G3 $lay && same "generate $lay = one process (6 heads, 3 groups, 9 experts, 250 rows)" e3 e1
done

# bad layouts: one line, before any rank starts
bad() {
    "$MILL" generate --model "$DATA/tiny-a" --input "$T/in.json" --max-new-tokens 4 --temperature 0 --device cpu \
        --output "$T/bad.json" "$@" 2>"$T/stderr"
    st=$?
    if one_error_line "generate $*" "$st"; then
        if grep -q "$want" "$T/stderr"; then ok "generate $* refused: $(first_err)"; else not_ok "generate $*" "$(first_err)"; fi
    fi
}
want="must both divide its 3 ranks" bad --tp 2 --ep 3
want="by --tp and --ep only" bad --pp 2
want="tp 3 must divide num_attention_heads" bad --tp 3
want="ep 3 must divide n_routed_experts" bad --ep 3

echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
