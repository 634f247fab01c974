#!/bin/sh
# tests/download_cli.sh — `mill download` end to end against tests/hub_server.c (a stand-in hub on
# 127.0.0.1; nothing touches the network) serving a copy of tests/data/tiny-b (config.json, a
# 2-shard model.safetensors with its index; the shards as LFS files behind a redirect to another
# port) plus a tokenizer.json: --include filtering, the rest fetched and loadable by `mill info`,
# a re-run that asks for no file, a partial .incomplete file resumed by a Range request, a changed
# local file fetched again, a gated repo (no token, a wrong one, the right one, which never
# reaches the CDN), a 500 retried, a wrong sha256 refused with nothing left in place, and bad
# input on one line each.
# usage: tests/download_cli.sh PATH/TO/mill PATH/TO/hub_server SOURCE_DIR
MILL=$1
HUB=$2
SRC=$3
T=$(mktemp -d "${TMPDIR:-/tmp}/download_cli.XXXXXX") || exit 2
SRV=""
stop() {
    if [ -n "$SRV" ]; then
        kill "$SRV" 2>/dev/null
        wait "$SRV" 2>/dev/null
        SRV=""
    fi
}
trap 'stop; rm -rf "$T"' EXIT
. "$SRC/tests/expect.sh"

# the stand-in hub is on loopback: no proxy, no token or endpoint from the caller's environment
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY HF_TOKEN HF_TOKEN_PATH HF_HUB_DOWNLOAD_TIMEOUT
export no_proxy='*' HF_HOME="$T/hfhome"

R=$T/repo
mkdir -p "$R"
for f in config.json model-00001-of-00002.safetensors model-00002-of-00002.safetensors model.safetensors.index.json; do
    cp "$SRC/tests/data/tiny-b/$f" "$R/" || exit 2
done
printf '{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}\n' >"$R/tokenizer.json"
FILES="config.json model-00001-of-00002.safetensors model-00002-of-00002.safetensors model.safetensors.index.json tokenizer.json"

# serve LOGNAME [hub_server options]: a fresh stand-in hub; HF_ENDPOINT points at it
serve() {
    stop
    log=$1
    shift
    rm -f "$T/port"
    "$HUB" --dir "$R" --repo acme/tiny-b --lfs '*.safetensors' --port-file "$T/port" --log "$T/$log.log" "$@" &
    SRV=$!
    i=0
    while [ ! -s "$T/port" ] && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -s "$T/port" ] || { echo "hub_server did not start"; exit 2; }
    export HF_ENDPOINT="http://127.0.0.1:$(cat "$T/port")"
}

run() { "$MILL" download "$@" >"$T/stdout" 2>"$T/stderr"; }
same() { # same DIR FILE...: each file equals the served one
    d=$1
    shift
    for f in "$@"; do cmp -s "$R/$f" "$d/$f" || return 1; done
}
resolves() { grep -c "/resolve/" "$T/$1.log"; }

serve plain
# 1. only the JSON files
if run acme/tiny-b --include '*.json' --out "$T/a"; then
    if same "$T/a" config.json model.safetensors.index.json tokenizer.json && [ ! -e "$T/a/model-00001-of-00002.safetensors" ] &&
        grep -q "3 files, 3 fetched" "$T/stdout"; then
        ok "--include '*.json' fetches the three JSON files only"
    else
        not_ok "--include" "$(tail -n 1 "$T/stdout")"
    fi
else
    not_ok "--include" "$(first_err)"
fi
# 2. the rest; the model loads
if run acme/tiny-b --out "$T/a" && same "$T/a" $FILES && grep -q "5 files, 2 fetched" "$T/stdout" &&
    grep -q "3 already present" "$T/stdout" && [ ! -s "$T/stderr" ]; then
    ok "the rest fetched, every file equal to the hub's: $(tail -n 1 "$T/stdout")"
else
    not_ok "full download" "$(first_err) $(tail -n 1 "$T/stdout")"
fi
if "$MILL" info --model "$T/a" >"$T/info" 2>&1 && grep -q "parameters" "$T/info"; then
    ok "mill info reads the downloaded model"
else
    not_ok "mill info" "$(head -n 2 "$T/info")"
fi
[ -z "$(find "$T/a/.cache" -name '*.incomplete')" ] && ok "no partial file left" || not_ok "partial files" "$(find "$T/a/.cache")"
# 3. a re-run asks for no file
before=$(resolves plain)
if run acme/tiny-b --out "$T/a" && grep -q "5 files, 0 fetched" "$T/stdout" && [ "$(resolves plain)" -eq "$before" ]; then
    ok "a re-run fetches nothing and asks for no file"
else
    not_ok "re-run" "$(resolves plain) resolve requests, was $before: $(tail -n 1 "$T/stdout")"
fi
# 4. a partial file is resumed with a Range request
S1=model-00001-of-00002.safetensors
oid=$(sha256sum "$R/$S1" | cut -c 1-16)
mkdir -p "$T/b/.cache/mill/download"
head -c 500000 "$R/$S1" >"$T/b/.cache/mill/download/$S1.$oid.incomplete"
if run acme/tiny-b --include 'model-00001-*' --out "$T/b" && same "$T/b" "$S1" && grep -q "range=bytes=500000-" "$T/plain.log" &&
    grep -q "resumed after" "$T/stdout" && [ -z "$(find "$T/b/.cache" -name '*.incomplete')" ]; then
    ok "a partial .incomplete file resumed from byte 500000 ($(grep "^fetched" "$T/stdout"))"
else
    not_ok "resume" "$(first_err) $(grep "$S1" "$T/plain.log" | tail -n 1)"
fi
# 5. a local file changed in place (same size) is fetched again
printf 'X' | dd of="$T/a/config.json" bs=1 seek=3 conv=notrunc 2>/dev/null
if run acme/tiny-b --out "$T/a" && same "$T/a" config.json && grep -q "5 files, 1 fetched" "$T/stdout" &&
    grep -q "replaced a copy" "$T/stdout"; then
    ok "a changed local file is fetched again"
else
    not_ok "changed file" "$(first_err) $(tail -n 1 "$T/stdout")"
fi
# 6. a progress bar on a terminal (when script(1) can give us one)
if command -v script >/dev/null 2>&1; then
    script -qec "'$MILL' download acme/tiny-b --out '$T/tty'" /dev/null >"$T/tty.out" 2>&1
    if grep -q "\[2/5\] .*total" "$T/tty.out" && same "$T/tty" $FILES; then
        ok "a progress bar on a terminal"
    else
        not_ok "progress bar" "$(tr '\r' '\n' <"$T/tty.out" | head -n 3)"
    fi
fi

# 7. bad input: one line each
bad() { # bad CASE PATTERN ARGS...
    name=$1
    pat=$2
    shift 2
    run "$@"
    st=$?
    if one_error_line "$name" "$st"; then
        if grep -q -- "$pat" "$T/stderr"; then ok "$name: $(first_err)"; else not_ok "$name" "expected \"$pat\": $(first_err)"; fi
    fi
}
bad "no --out" "needs --out DIR" acme/tiny-b
bad "no repository" "needs a repository" --out "$T/x"
bad "a bad --repo-type" "\-\-repo-type must be model or dataset" acme/tiny-b --repo-type space --out "$T/x"
bad "a bad repo id" 'repo id "acme tiny"' "acme tiny" --out "$T/x"
bad "an unknown option" "unknown option --dir" acme/tiny-b --dir "$T/x"
bad "an unknown repo" "404: no model repo acme/nope" acme/nope --out "$T/x"
bad "an unknown revision" '404: no revision "v2" in repo acme/tiny-b' acme/tiny-b --revision v2 --out "$T/x"
bad "an --include matching nothing" 'none of its 5 files matches --include "\*.bin"' acme/tiny-b --include '*.bin' --out "$T/x"
bad "--out naming a file" "exists and is not a directory" acme/tiny-b --out "$R/config.json"
ep=$HF_ENDPOINT
HF_ENDPOINT=ftp://example.org
bad "HF_ENDPOINT not http" "HF_ENDPOINT must be an http:// or https:// URL" acme/tiny-b --out "$T/x"
HF_ENDPOINT=$ep

# 8. a gated repo
serve gated --token hf_secret
bad "no token for a gated repo" "401: set HF_TOKEN for this gated/private repo acme/tiny-b" acme/tiny-b --out "$T/g"
export HF_TOKEN=hf_wrong
bad "a wrong token" "401: the hub refused the token" acme/tiny-b --out "$T/g"
grep -q hf_wrong "$T/stderr" && not_ok "token printed" "$(first_err)"
HF_TOKEN=hf_secret
if run acme/tiny-b --out "$T/g" && same "$T/g" $FILES; then
    ok "the right token fetches the gated repo"
else
    not_ok "gated" "$(first_err)"
fi
unset HF_TOKEN
if [ "$(grep -c '^cdn .*auth=1' "$T/gated.log")" -eq 0 ] && [ "$(grep -c '^cdn ' "$T/gated.log")" -eq 2 ] &&
    [ "$(grep -c '^hub .*auth=0' "$T/gated.log")" -eq 1 ]; then
    ok "the token went to the hub, never to the CDN's host"
else
    not_ok "Authorization on the CDN" "$(grep '^cdn' "$T/gated.log" | head -n 2)"
fi

# 9. faults: a 500 twice (retried), then a shard whose bytes do not hash to the listed sha256
serve faults --fault config.json=500:2 --fault model-00002-of-00002.safetensors=corrupt
bad "a wrong sha256" "model-00002-of-00002.safetensors: the downloaded bytes' sha256 is" acme/tiny-b --out "$T/c"
if same "$T/c" config.json "$S1" && grep -q "config.json.*3 attempts" "$T/stdout"; then
    ok "a 500 twice then the file; the files before the bad one kept"
else
    not_ok "500 retried" "$(grep config "$T/stdout")"
fi
if [ ! -e "$T/c/model-00002-of-00002.safetensors" ] && [ -z "$(find "$T/c/.cache" -name '*.incomplete')" ]; then
    ok "the bad shard left nothing in place"
else
    not_ok "bad shard" "$(ls "$T/c" "$T/c/.cache/mill/download")"
fi
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
