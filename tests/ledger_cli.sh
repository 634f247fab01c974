#!/bin/sh
# tests/ledger_cli.sh — `mill runs`, `mill show` and `mill plot` on a demo ledger that
# `test_ledger --populate` writes: the tables name the run and its metrics, --samples N prints N
# samples, the plot is a PNG (skipped with a message when gnuplot is absent), $MILL_LEDGER is the
# default ledger, and each error (unknown run, no ledger, no gnuplot, bad option) is one line on
# stderr, "mill CMD: error: ...", with a non-zero exit.
#
# usage: tests/ledger_cli.sh PATH/TO/mill PATH/TO/test_ledger
# Prints "ok - CASE" or "not ok - CASE: REASON" per case, then "N passed, M failed".

if [ $# -ne 2 ]; then
    echo "usage: $0 PATH/TO/mill PATH/TO/test_ledger" >&2
    exit 2
fi
for x in "$1" "$2"; do
    if [ ! -x "$x" ]; then
        echo "$0: $x is not an executable" >&2
        exit 2
    fi
done
# absolute paths: the cases run in a scratch directory, where runs/ledger.db does not exist
MILL=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
POP=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
SRC_TESTS=$(cd "$(dirname "$0")" && pwd)
unset MILL_LEDGER
RUN_ENV= # one VAR=VALUE for the next case's mill, or empty

T=$(mktemp -d "${TMPDIR:-/tmp}/ledger_cli.XXXXXX") || exit 2
trap 'rm -rf "$T"' EXIT
trap 'exit 130' INT TERM
cd "$T" || exit 2

. "$SRC_TESTS/expect.sh"

P=$T/ledger.db
if ! "$POP" --populate "$P" >"$T/stdout" 2>"$T/stderr"; then
    echo "$0: test_ledger --populate $P failed: $(first_err)" >&2
    exit 1
fi

# expect_ok CASE PATTERN... :: ARGS...: `mill ARGS` exits 0 and stdout holds every pattern (grep -E).
expect_ok() {
    name=$1
    shift
    pats=
    while [ $# -gt 0 ] && [ "$1" != "::" ]; do
        pats="$pats$1
"
        shift
    done
    shift
    env ${RUN_ENV:+"$RUN_ENV"} "$MILL" "$@" >"$T/stdout" 2>"$T/stderr" </dev/null
    st=$?
    if [ "$st" -ne 0 ]; then
        not_ok "$name" "exit status $st: $(first_err)"
        return
    fi
    old_ifs=$IFS
    IFS='
'
    for p in $pats; do
        if ! grep -Eq -- "$p" "$T/stdout"; then
            IFS=$old_ifs
            not_ok "$name" "stdout does not match \"$p\""
            return
        fi
    done
    IFS=$old_ifs
    ok "$name"
}

# expect_fail CASE CMD TEXT :: ARGS...: `mill ARGS` fails (not by a signal) with one stderr line
# "mill CMD: error: ..." that contains TEXT.
expect_fail() {
    name=$1
    cmd=$2
    text=$3
    shift 4
    env ${RUN_ENV:+"$RUN_ENV"} "$MILL" "$@" >"$T/stdout" 2>"$T/stderr" </dev/null
    one_error_line "$name" $? || return
    line=$(cat "$T/stderr")
    case $line in
    "mill $cmd: error: "*"$text"*) ok "$name" ;;
    *) not_ok "$name" "expected \"mill $cmd: error: ...$text...\", got: $line" ;;
    esac
}

# ------------------------------------------------------------------- runs
expect_ok "runs: both runs, the last reward and accuracy" \
    '^ +id +name +status +steps +reward +accuracy +created +out_dir' \
    '^ +1 +demo +finished +8 +0\.6000 +0\.4600 +[0-9-]+T[0-9:]+Z +runs/demo$' \
    '^ +2 +empty +running +- +- +- ' :: runs --ledger "$P"
RUN_ENV="MILL_LEDGER=$P"
expect_ok "runs: \$MILL_LEDGER is the default ledger" '^ +1 +demo ' :: runs
RUN_ENV=
expect_fail "runs: no ledger at the default path" runs "no ledger at runs/ledger.db" :: runs
expect_fail "runs: an unknown option" runs "--samples" :: runs --ledger "$P" --samples 2
printf 'not a database, just text\n' >"$T/text.db"
expect_fail "runs: a file that is not a ledger" runs "$T/text.db: not an SQLite database" :: runs --ledger "$T/text.db"

# ------------------------------------------------------------------- show
expect_ok "show: fields, steps, checkpoints, events" \
    '^run 1 +demo$' '^ +recipe +configs/runs/grpo-arith-demo\.yaml$' '^ +status +finished$' \
    '^ +step +att +weights +reward +accuracy +kl +entropy +clip_frac +response_len +step_s +loss$' \
    '^ +4 +1 +4 +0\.4 +0\.38 +0\.004 ' '^ +3 +1 +3 +0\.35 +- +0\.003 ' \
    '^ +4 +yes +fnv1a64:0123456789abcdef +123456 +runs/demo/step-000004$' '^ +8 +no +- +0 +runs/demo/step-000008$' \
    ' 6 +fault +rollout engine restarted$' :: show demo --ledger "$P"
expect_ok "show by id" '^run 1 +demo$' :: show 1 --ledger "$P"
if "$MILL" show demo --ledger "$P" --samples 2 >"$T/out" 2>&1 &&
    [ "$(grep -c '^ \+8 \+1 \+80[01] ' "$T/out")" -eq 2 ] && grep -q 'I think\\nit is 13' "$T/out"; then
    ok "show --samples 2: the two most recent samples, newlines escaped"
else
    not_ok "show --samples 2: the two most recent samples, newlines escaped" "$(tail -n 4 "$T/out" | tr '\n' '|')"
fi
expect_ok "show: a run without steps" '^steps: none$' '^checkpoints: none$' :: show empty --ledger "$P"
expect_fail "show: an unknown run" show "no run named nosuchrun in $P" :: show nosuchrun --ledger "$P"
expect_fail "show: an unknown run id" show "no run with id 77 in $P" :: show 77 --ledger "$P"
expect_fail "show: no run given" show "needs a run name or id" :: show --ledger "$P"
expect_fail "show: a bad --samples" show "--samples" :: show demo --ledger "$P" --samples many
expect_fail "show: no ledger" show "no ledger at $T/none.db" :: show demo --ledger "$T/none.db"

# ------------------------------------------------------------------- plot
if command -v gnuplot >/dev/null 2>&1; then
    rm -f "$T/demo.png"
    expect_ok "plot: writes the picture" "demo\.png: 8 steps of run demo" :: plot demo --out "$T/demo.png" --ledger "$P"
    if [ "$(head -c 8 "$T/demo.png" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ]; then
        ok "plot: the file is a PNG"
    else
        not_ok "plot: the file is a PNG" "no PNG signature in $T/demo.png"
    fi
    if [ -e "$T/demo.png.tmp" ]; then not_ok "plot: no temporary file left" "$T/demo.png.tmp"; else ok "plot: no temporary file left"; fi
else
    echo "skip - plot: gnuplot is not installed (apt-get install gnuplot-nox)"
fi
RUN_ENV="PATH=/nonexistent"
expect_fail "plot: gnuplot missing" plot "install gnuplot-nox" :: plot demo --out "$T/x.png" --ledger "$P"
RUN_ENV=
expect_fail "plot: a run without steps" plot "run empty has no steps" :: plot empty --out "$T/x.png" --ledger "$P"
expect_fail "plot: no --out" plot "--out" :: plot demo --ledger "$P"
expect_fail "plot: an unknown run" plot "no run named nosuchrun" :: plot nosuchrun --out "$T/x.png" --ledger "$P"
if [ -e "$T/x.png" ]; then not_ok "plot: failures write no file" "$T/x.png exists"; else ok "plot: failures write no file"; fi

echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
