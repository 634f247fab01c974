#!/bin/sh
# tests/tokenize_cli.sh — `mill tokenize` on the trained test tokenizer (tests/data/bpe-tiny, whose
# encode/decode goldens against HF tokenizers test_tokenizer checks): text -> ids -> the same text,
# HF's defaults per line (the post-processor's BOS on text, specials kept on decode), chat messages
# -> the DeepSeek-V4 text and the ids of that text encoded without the post-processor (its markers
# one token each), per-line thinking_mode / reasoning_effort against the options, and bad input:
# one error line naming file:line, no output file left behind.
# usage: tests/tokenize_cli.sh PATH/TO/mill SOURCE_DIR
MILL=$1
TOK=$2/tests/data/bpe-tiny
T=$(mktemp -d "${TMPDIR:-/tmp}/tokenize_cli.XXXXXX") || exit 2
trap 'rm -rf "$T"' EXIT
. "$2/tests/expect.sh"

cat >"$T/in.jsonl" <<'EOF'
{"text": "Hello, world! 12345 \u00e9t\u00e9 \u4e2d\u6587 \ud83d\ude00\n\tx"}
{"text": "Hello, world! 12345", "add_special_tokens": false}
{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}], "add_generation_prompt": true}

{"messages": [{"role": "user", "content": "What is 2+2?"}], "add_generation_prompt": true, "thinking_mode": "thinking"}
{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"}]}
EOF
if "$MILL" tokenize --tokenizer "$TOK" --input "$T/in.jsonl" --output "$T/out.jsonl" >"$T/stdout" 2>"$T/stderr"; then
    ok "mill tokenize runs: $(cat "$T/stdout")"
else
    not_ok "mill tokenize" "$(first_err)"
fi
# the ids of line 1 decode back to its text; line 3's text, encoded without the post-processor,
# gives line 3's ids
python3 - "$T" "$TOK" >"$T/py1" 2>&1 <<'PY'
import json, sys
T, tok = sys.argv[1], sys.argv[2]
out = [json.loads(l) for l in open(T + "/out.jsonl")]
cfg = json.load(open(tok + "/tokenizer_config.json"))
name = lambda v: v["content"] if isinstance(v, dict) else v
added = {a["content"]: a["id"] for a in json.load(open(tok + "/tokenizer.json"))["added_tokens"]}
bos = added[name(cfg["bos_token"])]
assert len(out) == 5, len(out)
assert out[0]["ids"][0] == bos, "text: no BOS from the post-processor"
assert out[1]["ids"][0] != bos, "add_special_tokens false: BOS"
with open(T + "/back.jsonl", "w") as f:
    f.write(json.dumps({"ids": out[0]["ids"], "skip_special_tokens": True}) + "\n")
    f.write(json.dumps({"text": out[2]["text"], "add_special_tokens": False}) + "\n")
    f.write(json.dumps({"ids": out[2]["ids"]}) + "\n")
U, A, B = "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>", "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
E = "<\uff5cend\u2581of\u2581sentence\uff5c>"
assert out[2]["text"] == B + "Be brief." + U + "What is 2+2?" + A + "</think>", out[2]["text"]
assert out[3]["text"] == B + U + "What is 2+2?" + A + "<think>", out[3]["text"]
assert out[4]["text"] == B + U + "q" + A + "</think>4" + E, out[4]["text"]
for m in (B, U, A, E, "<think>", "</think>"):
    assert m in added, m + " is not an added token"
for k, m in ((2, B), (2, U), (2, A), (3, "<think>"), (4, E)):
    assert added[m] in out[k]["ids"], m + " is not one token in line %d" % (k + 1)
print("ok")
PY
[ "$(tail -n 1 "$T/py1")" = ok ] && ok "line by line as HF's defaults; chat texts and their markers" ||
    not_ok "outputs" "$(tail -n 3 "$T/py1")"
if "$MILL" tokenize --tokenizer "$TOK/tokenizer.json" --input "$T/back.jsonl" --output "$T/back.out" >"$T/stdout" 2>"$T/stderr"; then
    python3 - "$T" >"$T/py2" 2>&1 <<'PY'
import json, sys
T = sys.argv[1]
out = [json.loads(l) for l in open(T + "/out.jsonl")]
back = [json.loads(l) for l in open(T + "/back.out")]
src = json.loads(open(T + "/in.jsonl").readline())["text"]
assert back[0]["text"] == src, (back[0]["text"], src)
assert back[1]["ids"] == out[2]["ids"], "chat ids != the ids of its text"
assert back[2]["text"] == out[2]["text"], "chat ids do not decode to its text"
print("ok")
PY
    [ "$(tail -n 1 "$T/py2")" = ok ] && ok "round trips: ids -> text, chat text -> its ids (tokenizer.json named directly)" ||
        not_ok "round trips" "$(tail -n 3 "$T/py2")"
else
    not_ok "round trips" "$(first_err)"
fi
# the options set the defaults a line can override
printf '%s\n' '{"messages": [{"role": "user", "content": "q"}], "add_generation_prompt": true}' \
    '{"messages": [{"role": "user", "content": "q"}], "add_generation_prompt": true, "thinking_mode": "chat"}' >"$T/opt.jsonl"
"$MILL" tokenize --tokenizer "$TOK" --input "$T/opt.jsonl" --output "$T/opt.out" --thinking --reasoning-effort max \
    >"$T/stdout" 2>"$T/stderr" && grep -q 'Reasoning Effort: Absolute maximum' "$T/opt.out" &&
    [ "$(sed -n 1p "$T/opt.out" | grep -c '<think>\"')" = 1 ] && [ "$(sed -n 2p "$T/opt.out" | grep -c 'Reasoning')" = 0 ] &&
    ok "--thinking --reasoning-effort max; a line's thinking_mode overrides" || not_ok "options" "$(cat "$T/opt.out" "$T/stderr" | head -c 300)"

bad() { # bad CASE PATTERN FILE [OPTIONS...]
    c=$1 p=$2 f=$3
    shift 3
    rm -f "$T/bad.jsonl"
    "$MILL" tokenize --tokenizer "$TOK" --input "$f" --output "$T/bad.jsonl" "$@" >"$T/stdout" 2>"$T/stderr"
    st=$?
    if one_error_line "$c" "$st"; then
        if ! grep -q -- "$p" "$T/stderr"; then not_ok "$c" "expected \"$p\": $(first_err)"
        elif [ -e "$T/bad.jsonl" ] || [ -e "$T/bad.jsonl.tmp" ]; then not_ok "$c" "an output file was left"
        else ok "$c"; fi
    fi
}
printf '{"text": "a"}\n{"text": "b"\n' >"$T/broken.jsonl"
bad "a line that is not JSON" "broken.jsonl:2: not JSON" "$T/broken.jsonl"
printf '{"ids": [1, 99999999]}\n' >"$T/ids.jsonl"
bad "an id past the vocabulary" 'ids.jsonl:1: "ids"\[1\] must be an integer in \[0, ' "$T/ids.jsonl"
printf '{"text": "a", "ids": [1]}\n' >"$T/both.jsonl"
bad "two kinds in one line" 'both.jsonl:1: expected exactly one of' "$T/both.jsonl"
printf '{"messages": [{"role": "tool", "content": "x"}]}\n' >"$T/tool.jsonl"
bad "a tool message" 'tool.jsonl:1: messages\[0\].role: "tool" is not supported' "$T/tool.jsonl"
printf '{"messages": [{"role": "user", "content": "x"}], "thinking_mode": "deep"}\n' >"$T/mode.jsonl"
bad "a bad thinking_mode" 'mode.jsonl:1: "thinking_mode" must be "chat" or "thinking"' "$T/mode.jsonl"
printf '{"messages": [{"role": "user", "content": "x"}]}\n' >"$T/nochat.jsonl"
bad "messages without a chat format" 'needs a chat format' "$T/nochat.jsonl" --chat none
bad "a missing input" "nope.jsonl: cannot open" "$T/nope.jsonl"
"$MILL" tokenize --tokenizer "$T/none" --input "$T/in.jsonl" --output "$T/bad.jsonl" >"$T/stdout" 2>"$T/stderr"
st=$?
if one_error_line "a missing tokenizer" "$st"; then
    grep -q "$T/none" "$T/stderr" && ok "a missing tokenizer" || not_ok "a missing tokenizer" "$(first_err)"
fi
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
