# tests/expect.sh — sourced by the CLI shell tests: pass/fail counting and the check every bad
# input must pass (the command failed by itself, not by a signal, with exactly one line on stderr).
# The sourcing script sets T (its temp dir; commands write $T/stdout and $T/stderr).

PASS=0
FAIL=0
ok() {
    PASS=$((PASS + 1))
    echo "ok - $1"
}
not_ok() {
    FAIL=$((FAIL + 1))
    echo "not ok - $1: $2"
}
# first line of stderr, for reasons
first_err() { head -n 1 "$T/stderr" | cut -c 1-200; }

# one_error_line CASE STATUS: 0 when the command's status and $T/stderr show a clean one-line
# failure; otherwise reports the case as failed and returns 1.
one_error_line() {
    if [ "$2" -eq 0 ]; then
        not_ok "$1" "exit status 0, expected an error"
        return 1
    fi
    if [ "$2" -ge 128 ]; then
        not_ok "$1" "exit status $2 (killed by a signal?): $(first_err)"
        return 1
    fi
    lines=$(($(wc -l <"$T/stderr")))
    # a last line without its newline counts too
    if [ -s "$T/stderr" ] && [ "$(tail -c 1 "$T/stderr" | wc -l)" -eq 0 ]; then
        lines=$((lines + 1))
    fi
    if [ "$lines" -ne 1 ]; then
        not_ok "$1" "stderr has $lines lines, expected 1: $(first_err)"
        return 1
    fi
    return 0
}
