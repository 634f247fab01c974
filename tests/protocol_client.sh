#!/bin/sh
# tests/protocol_client.sh — issue 21 item 4: "a client written from the protocol documents alone
# agrees with the servers". Starts `mill rollout-server` on tests/data/tiny-a (ipc://, --queue-mb 1
# for the backpressure check), a second one with --curve (a `mill keys` file) and a
# `mill trainer-worker` (and a second one to resume from the first's checkpoint), runs tests/protocol_client.c (libzmq + msgpack-c only, written from
# rollout/PROTOCOL.md and trainer/PROTOCOL.md) against them, and checks that each server exits
# cleanly after its `bye`. Every process it started is killed on exit.
# usage: tests/protocol_client.sh PATH/TO/mill PATH/TO/protocol_client SOURCE_DIR
# Prints "ok - CASE", "not ok - CASE: REASON" (and "KNOWN - CASE: REASON" for reported
# disagreements, not counted as failures), then "N passed, M failed".
if [ $# -ne 3 ]; then
    echo "usage: $0 PATH/TO/mill PATH/TO/protocol_client SOURCE_DIR" >&2
    exit 2
fi
MILL=$1
CLIENT=$2
SRC=$3
DATA=$SRC/tests/data/tiny-a
T=$(mktemp -d "${TMPDIR:-/tmp}/protocol_client.XXXXXX") || exit 2
PIDS=""
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null; done
    for p in $PIDS; do wait "$p" 2>/dev/null; done
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
. "$SRC/tests/expect.sh"
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE

"$MILL" keys --out "$T/curve.keys" >/dev/null 2>"$T/stderr" || not_ok "mill keys" "$(first_err)"
# the reference for "sampling, logprobs and routing are those of mill generate"
"$MILL" generate --model "$DATA" --input "$DATA/generate.json" --device cpu --max-new-tokens 16 --temperature 0.8 \
    --top-p 0.9 --top-k 50 --seed 5 --output "$T/gen.json" --routing "$T/gen.routing" 2>"$T/stderr" ||
    not_ok "mill generate (the sampled reference)" "$(first_err)"

"$MILL" rollout-server --model "$DATA" --bind "ipc://$T/rollout.sock" --device cpu --queue-mb 1 >"$T/rollout.log" 2>&1 &
ROLLOUT=$!
PIDS="$PIDS $ROLLOUT"
"$MILL" rollout-server --model "$DATA" --bind "ipc://$T/curve.sock" --device cpu --curve "$T/curve.keys" >"$T/curve.log" 2>&1 &
CURVE=$!
PIDS="$PIDS $CURVE"
"$MILL" trainer-worker --bind "ipc://$T/trainer.sock" >"$T/trainer.log" 2>&1 &
TRAINER=$!
PIDS="$PIDS $TRAINER"
"$MILL" trainer-worker --bind "ipc://$T/trainer2.sock" >"$T/trainer2.log" 2>&1 &
TRAINER2=$!
PIDS="$PIDS $TRAINER2"

"$CLIENT" --rollout "ipc://$T/rollout.sock" --trainer "ipc://$T/trainer.sock" --trainer2 "ipc://$T/trainer2.sock" --curve-addr "ipc://$T/curve.sock" \
    --keys "$T/curve.keys" --data "$DATA" --gen "$T/gen.json" --routing "$T/gen.routing" --tmp "$T" >"$T/client.out" 2>&1
st=$?
cat "$T/client.out"
PASS=$((PASS + $(grep -c '^ok - ' "$T/client.out")))
FAIL=$((FAIL + $(grep -c '^not ok - ' "$T/client.out")))
KNOWN=$(grep -c '^KNOWN - ' "$T/client.out")
if [ "$st" -ne 0 ] && ! grep -q '^not ok - ' "$T/client.out"; then
    not_ok "protocol_client" "exit status $st: $(tail -n 1 "$T/client.out")"
fi

# exited_after_bye NAME PID LOG: the server exits by itself, status 0, within 10 s of its bye
exited_after_bye() {
    i=0
    while kill -0 "$2" 2>/dev/null && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if kill -0 "$2" 2>/dev/null; then
        not_ok "$1 exits after bye" "still running 10 s later"
        return
    fi
    wait "$2"
    s=$?
    PIDS=$(echo "$PIDS" | sed "s/ $2\b//")
    if [ "$s" -eq 0 ]; then ok "$1 exits after bye (status 0)"; else not_ok "$1 exits after bye" "status $s: $(tail -n 1 "$3")"; fi
}
exited_after_bye "rollout-server" "$ROLLOUT" "$T/rollout.log"
exited_after_bye "rollout-server --curve" "$CURVE" "$T/curve.log"
exited_after_bye "trainer-worker" "$TRAINER" "$T/trainer.log"
exited_after_bye "trainer-worker (resumed)" "$TRAINER2" "$T/trainer2.log"
if [ "$FAIL" -ne 0 ]; then
    for f in rollout curve trainer trainer2; do
        echo "--- $f log (last 5 lines)"
        tail -n 5 "$T/$f.log"
    done
fi
echo "$PASS passed, $FAIL failed ($KNOWN known disagreements reported, not counted)"
[ "$FAIL" -eq 0 ]
