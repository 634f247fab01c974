#!/bin/sh
# tests/cli_bad_input.sh — `mill forward` on bad input: truncated and corrupt
# checkpoints, a missing shard, malformed config.json and input.json, bad
# options. Each must exit non-zero (not by a signal) with exactly one line on
# stderr, "mill forward: error: ...", naming the file, key or option at fault,
# and must not write the output file. A good run must succeed.
# Bad inputs are made with sh, cp, head, dd, printf and sed only (no python).
#
# usage: tests/cli_bad_input.sh PATH/TO/mill PATH/TO/tests/data
# Prints "ok - CASE" or "not ok - CASE: REASON" per case, then "N passed, M failed".

if [ $# -ne 2 ]; then
    echo "usage: $0 PATH/TO/mill PATH/TO/tests/data" >&2
    exit 2
fi
MILL=$1
DATA=$2
if [ ! -x "$MILL" ]; then
    echo "$0: $MILL is not an executable" >&2
    exit 2
fi
if [ ! -f "$DATA/tiny-a/config.json" ] || [ ! -f "$DATA/tiny-b/model.safetensors.index.json" ]; then
    echo "$0: $DATA does not hold tiny-a/ and tiny-b/" >&2
    exit 2
fi

T=$(mktemp -d "${TMPDIR:-/tmp}/cli_bad_input.XXXXXX") || exit 2
trap 'rm -rf "$T"' EXIT
trap 'exit 130' INT TERM

OUT=$T/out.safetensors
. "$(dirname "$0")/expect.sh"

# model NAME SRC: a fresh copy of the checkpoint in DATA/SRC (config.json and
# model*.safetensors*) as $T/NAME; prints the directory.
model() {
    d=$T/$1
    rm -rf "$d"
    mkdir "$d" || return 1
    cp "$DATA/$2/config.json" "$d/" || return 1
    for f in "$DATA/$2"/model*.safetensors*; do
        cp "$f" "$d/" || return 1
    done
    echo "$d"
}

# expect_fail CASE KEYWORD... :: ARGS...: runs `mill ARGS` and checks the failure.
expect_fail() {
    name=$1
    shift
    keys=
    while [ $# -gt 0 ] && [ "$1" != "::" ]; do
        keys="$keys$1
"
        shift
    done
    if [ $# -eq 0 ]; then
        not_ok "$name" "test bug: no :: before the arguments"
        return
    fi
    shift
    rm -f "$OUT" "$OUT.tmp"
    "$MILL" "$@" >"$T/stdout" 2>"$T/stderr" </dev/null
    one_error_line "$name" $? || return
    line=$(cat "$T/stderr")
    case $line in
    "mill forward: error:"*) ;;
    *)
        not_ok "$name" "stderr does not start with \"mill forward: error:\": $line"
        return
        ;;
    esac
    old_ifs=$IFS
    IFS='
'
    for k in $keys; do
        case $line in
        *"$k"*) ;;
        *)
            IFS=$old_ifs
            not_ok "$name" "stderr does not name \"$k\": $line"
            return
            ;;
        esac
    done
    IFS=$old_ifs
    if [ -e "$OUT" ] || [ -e "$OUT.tmp" ]; then
        not_ok "$name" "failed but left $OUT (or .tmp) behind"
        return
    fi
    ok "$name"
}

# expect_ok CASE MODEL_DIR INPUT: a good run writes a non-trivial output file.
expect_ok() {
    rm -f "$OUT"
    "$MILL" forward --model "$2" --input "$3" --output "$OUT" >"$T/stdout" 2>"$T/stderr" </dev/null
    st=$?
    if [ "$st" -ne 0 ]; then
        not_ok "$1" "exit status $st: $(first_err)"
    elif [ ! -s "$OUT" ]; then
        not_ok "$1" "exit status 0 but $OUT is missing or empty"
    elif [ "$(($(wc -c <"$OUT")))" -lt "$4" ]; then
        not_ok "$1" "$OUT has $(($(wc -c <"$OUT"))) bytes, expected at least $4"
    else
        ok "$1"
    fi
}

# setup_failed CASE WHAT: the bad input could not be made.
setup_failed() { not_ok "$1" "could not make the bad input ($2)"; }

A=$DATA/tiny-a
INA=$A/input.json

# ------------------------------------------------------------ good runs
# logits [2, 300, 256] f32 = 614400 bytes (+ routing)
expect_ok "good run (tiny-a, single file)" "$A" "$INA" 614400
# logits [2, 280, 320] f32 = 716800 bytes (+ routing)
expect_ok "good run (tiny-b, sharded)" "$DATA/tiny-b" "$DATA/tiny-b/input.json" 716800

# ------------------------------------------------------ bad checkpoints
c="truncated model.safetensors (half the file)"
if d=$(model trunc tiny-a); then
    size=$(($(wc -c <"$d/model.safetensors")))
    head -c $((size / 2)) "$d/model.safetensors" >"$d/half" && mv "$d/half" "$d/model.safetensors"
    expect_fail "$c" model.safetensors truncated :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" copy; fi

c="truncated model.safetensors (4 bytes)"
if d=$(model trunc4 tiny-a); then
    head -c 4 "$d/model.safetensors" >"$d/four" && mv "$d/four" "$d/model.safetensors"
    expect_fail "$c" model.safetensors :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" copy; fi

c="empty model.safetensors"
if d=$(model empty tiny-a); then
    : >"$d/model.safetensors"
    expect_fail "$c" model.safetensors :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" copy; fi

c="corrupt header JSON"
if d=$(model corrupt tiny-a) &&
    printf 'garbage!!!!!' | dd of="$d/model.safetensors" bs=1 seek=8 conv=notrunc 2>/dev/null; then
    expect_fail "$c" model.safetensors header :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" "copy or dd"; fi

c="header length beyond the file"
if d=$(model hdrlen tiny-a) &&
    printf '\377\377\377\377\377\377\377\177' | dd of="$d/model.safetensors" bs=1 seek=0 conv=notrunc 2>/dev/null; then
    expect_fail "$c" model.safetensors "header length" :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" "copy or dd"; fi

c="corrupt tensor dtype in the header"
if d=$(model dtype tiny-a) && LC_ALL=C grep -q '"dtype":"F32"' "$d/model.safetensors"; then
    # the first "F32" in the header (which comes first in the file, on sed's line 1)
    # becomes "Q32": same length, so the offsets stay valid
    LC_ALL=C sed '1s/"dtype":"F32"/"dtype":"Q32"/' "$d/model.safetensors" >"$d/x" && mv "$d/x" "$d/model.safetensors"
    expect_fail "$c" model.safetensors Q32 :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" "no \"dtype\":\"F32\" in the header"; fi

c="missing shard (tiny-b)"
if d=$(model noshard tiny-b) && rm "$d/model-00002-of-00002.safetensors"; then
    expect_fail "$c" model-00002-of-00002.safetensors :: forward --model "$d" --input "$DATA/tiny-b/input.json" --output "$OUT"
else setup_failed "$c" copy; fi

c="truncated shard (tiny-b)"
if d=$(model truncshard tiny-b); then
    f=$d/model-00001-of-00002.safetensors
    size=$(($(wc -c <"$f")))
    head -c $((size - 100)) "$f" >"$d/x" && mv "$d/x" "$f"
    expect_fail "$c" model-00001-of-00002.safetensors :: forward --model "$d" --input "$DATA/tiny-b/input.json" --output "$OUT"
else setup_failed "$c" copy; fi

c="malformed model.safetensors.index.json (tiny-b)"
if d=$(model badindex tiny-b); then
    head -c 100 "$d/model.safetensors.index.json" >"$d/x" && mv "$d/x" "$d/model.safetensors.index.json"
    expect_fail "$c" model.safetensors.index.json :: forward --model "$d" --input "$DATA/tiny-b/input.json" --output "$OUT"
else setup_failed "$c" copy; fi

c="no weights in the model directory"
if d=$(model noweights tiny-a) && rm "$d/model.safetensors"; then
    expect_fail "$c" "$d" :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" copy; fi

c="model directory does not exist"
expect_fail "$c" "$T/no-such-model" :: forward --model "$T/no-such-model" --input "$INA" --output "$OUT"

# -------------------------------------------------------- bad config.json
c="truncated config.json"
if d=$(model cfgtrunc tiny-a); then
    head -c 200 "$d/config.json" >"$d/x" && mv "$d/x" "$d/config.json"
    expect_fail "$c" config.json :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" copy; fi

c="config.json hidden_size as a string"
if d=$(model cfgtype tiny-a) &&
    sed 's/"hidden_size": 64/"hidden_size": "64"/' "$A/config.json" >"$d/config.json" &&
    grep -q '"hidden_size": "64"' "$d/config.json"; then
    expect_fail "$c" config.json hidden_size :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" "sed did not change hidden_size"; fi

c="config.json without num_hidden_layers"
if d=$(model cfgmiss tiny-a) &&
    sed '/"num_hidden_layers"/d' "$A/config.json" >"$d/config.json" &&
    ! grep -q num_hidden_layers "$d/config.json"; then
    expect_fail "$c" config.json num_hidden_layers :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" "sed did not remove num_hidden_layers"; fi

c="config.json that does not match the weights (hidden_size 96)"
if d=$(model cfgshape tiny-a) &&
    sed 's/"hidden_size": 64/"hidden_size": 96/' "$A/config.json" >"$d/config.json" &&
    grep -q '"hidden_size": 96' "$d/config.json"; then
    expect_fail "$c" embed.weight :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" "sed did not change hidden_size"; fi

c="config.json missing"
if d=$(model cfgnone tiny-a) && rm "$d/config.json"; then
    expect_fail "$c" config.json :: forward --model "$d" --input "$INA" --output "$OUT"
else setup_failed "$c" copy; fi

# --------------------------------------------------------- bad input.json
IN=$T/in
mkdir "$IN"
printf '{"input_ids": [[1, 2, 3], [4, 5' >"$IN/malformed.json"
printf '{"input_ids": [[1, 2, 3], [4, 5]]}\n' >"$IN/unequal.json"
printf '{"input_ids": [[1, 256, 3]]}\n' >"$IN/range.json"
printf '{"input_ids": [[-1, 2, 3]]}\n' >"$IN/negative.json"
printf '{"input_ids": [[1, 2.5, 3]]}\n' >"$IN/float.json"
printf '{"ids": [[1, 2, 3]]}\n' >"$IN/noids.json"
printf '{"input_ids": []}\n' >"$IN/empty.json"
printf '[[1, 2, 3]]\n' >"$IN/toplist.json"

M=$A
expect_fail "input.json malformed" malformed.json :: forward --model "$M" --input "$IN/malformed.json" --output "$OUT"
expect_fail "input.json rows of unequal length" unequal.json "input_ids[1]" :: forward --model "$M" --input "$IN/unequal.json" --output "$OUT"
expect_fail "input.json token id out of range (256 >= vocab)" range.json "input_ids[0][1]" :: forward --model "$M" --input "$IN/range.json" --output "$OUT"
expect_fail "input.json negative token id" negative.json "input_ids[0][0]" :: forward --model "$M" --input "$IN/negative.json" --output "$OUT"
expect_fail "input.json non-integer token id" float.json "input_ids[0][1]" :: forward --model "$M" --input "$IN/float.json" --output "$OUT"
expect_fail "input.json missing input_ids" noids.json input_ids :: forward --model "$M" --input "$IN/noids.json" --output "$OUT"
expect_fail "input.json empty input_ids" empty.json input_ids :: forward --model "$M" --input "$IN/empty.json" --output "$OUT"
expect_fail "input.json a list at the top level" toplist.json input_ids :: forward --model "$M" --input "$IN/toplist.json" --output "$OUT"
expect_fail "input.json does not exist" no-such-input.json :: forward --model "$M" --input "$IN/no-such-input.json" --output "$OUT"

# ---------------------------------------------------------------- options
expect_fail "unknown option" --bogus :: forward --model "$M" --input "$INA" --output "$OUT" --bogus 1
expect_fail "missing --model" "--model" :: forward --input "$INA" --output "$OUT"
expect_fail "missing --output" "--output" :: forward --model "$M" --input "$INA"
expect_fail "option without a value" "--output" :: forward --model "$M" --input "$INA" --output
expect_fail "output directory does not exist" "$T/no-such-dir/out.safetensors" :: forward --model "$M" --input "$INA" --output "$T/no-such-dir/out.safetensors"

echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
