#!/bin/sh
# tests/reward_cli.sh — `mill reward` on tests/data/reward-cases.jsonl: each line's reward equals its
# "expect" field (boxed, Answer: lines, fractions against decimals, a revised box, units, a list
# that must not read as one number, no answer), the extracted answers are reported, and bad input
# (a line that is not JSON, a response that is not a string) fails on one line naming file:line.
# usage: tests/reward_cli.sh PATH/TO/mill SOURCE_DIR
MILL=$1
DATA=$2/tests/data
T=$(mktemp -d "${TMPDIR:-/tmp}/reward_cli.XXXXXX") || exit 2
trap 'rm -rf "$T"' EXIT
. "$2/tests/expect.sh"

if "$MILL" reward --input "$DATA/reward-cases.jsonl" --output "$T/out.jsonl" >"$T/stdout" 2>"$T/stderr"; then
    ok "mill reward runs: $(cat "$T/stdout")"
else
    not_ok "mill reward" "$(first_err)"
fi
# the expected rewards, in order (blank lines skipped), against the output's
grep -o '"expect": [01]' "$DATA/reward-cases.jsonl" | sed 's/.*: //' >"$T/want"
sed 's/.*"reward": *\([0-9.]*\).*/\1/' "$T/out.jsonl" | sed 's/\.0*$//' >"$T/got"
if cmp -s "$T/want" "$T/got"; then ok "every reward as expected ($(wc -l <"$T/want") cases)"
else not_ok "rewards" "expected $(tr '\n' ' ' <"$T/want"), got $(tr '\n' ' ' <"$T/got")"; fi
grep -q '"extracted":"\\\\frac{1}{2}"' "$T/out.jsonl" && grep -q '"extracted":""' "$T/out.jsonl" &&
    ok "the extracted answers are reported" || not_ok "extracted" "$(cat "$T/out.jsonl")"

bad() { # bad CASE PATTERN FILE
    "$MILL" reward --input "$3" --output "$T/bad.jsonl" >"$T/stdout" 2>"$T/stderr"
    st=$?
    if one_error_line "$1" "$st"; then
        if grep -q "$2" "$T/stderr"; then ok "$1"; else not_ok "$1" "expected \"$2\": $(first_err)"; fi
    fi
}
printf '{"response": "x", "label": "1"}\n{"response": "x", "label"\n' >"$T/broken.jsonl"
bad "a line that is not JSON" "broken.jsonl:2: not JSON" "$T/broken.jsonl"
printf '{"response": 5, "label": "1"}\n' >"$T/num.jsonl"
bad "a response that is not a string" 'num.jsonl:1: "response" must be a string' "$T/num.jsonl"
bad "a missing file" "nope.jsonl: cannot open" "$T/nope.jsonl"
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
