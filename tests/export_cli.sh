#!/bin/sh
# tests/export_cli.sh — `mill export` (a model in HF transformers' layout) on the CPU:
#   - tiny-a (one file, mtp.* tensors) in fp32 and bf16, tiny-b (sharded) in fp32 with a shard size
#     that splits it, a training checkpoint of dsv4-tiny written by `mill sft --dp 2` (sharded):
#     names, shapes, dtypes, config.json and generation_config.json against HF's own lists
#     (tests/data/hf-keys-*.json, from tests/reference/check_export.py on the GPU machine), every value
#     the source's bit for bit in fp32 (rounded to nearest even in bf16), the index against the files
#     (tests/export_check.py);
#   - tokenizer files, a generation_config.json and an encoding/ folder copied from the source;
#   - bad input fails on one line and leaves nothing at --out: a missing directory, a checkpoint
#     missing a shard, an unwritable --out, an existing non-empty --out without --force (--force
#     replaces it), a config HF cannot hold, bad options.
# usage: tests/export_cli.sh PATH/TO/mill SOURCE_DIR
MILL=$1
SRC=$2
DATA=$SRC/tests/data
T=$(mktemp -d "${TMPDIR:-/tmp}/export_cli.XXXXXX") || exit 2
trap 'rm -rf "$T"' EXIT
trap 'exit 130' INT TERM
. "$SRC/tests/expect.sh"
cd "$SRC" || exit 2

# exp CASE OUT ARGS...: mill export must succeed
exp() {
    name=$1 out=$2
    shift 2
    if "$MILL" export --out "$out" "$@" >"$T/stdout" 2>"$T/stderr"; then ok "$name: $(cat "$T/stdout")"
    else not_ok "$name" "$(first_err)"; fi
}
# check CASE EXPORT SOURCE KEYS [ARGS]: the export against HF's lists and its source
check() {
    name=$1
    shift
    if out=$(python3 "$SRC/tests/export_check.py" "$@" 2>&1); then ok "$name:$(printf '%s' "$out" | tr '\n' ' ')"
    else not_ok "$name" "$(printf '%s' "$out" | tr '\n' ' ' | cut -c 1-600)"; fi
}

exp "tiny-a fp32" "$T/a32" --model "$DATA/tiny-a" --dtype fp32
check "tiny-a fp32 = HF's names, config, the source's values" "$T/a32" "$DATA/tiny-a" "$DATA/hf-keys-tiny-a.json"
exp "tiny-a bf16 (the default)" "$T/a16" --model "$DATA/tiny-a"
check "tiny-a bf16: HF's bf16 dtypes (fp32 modules kept), values rounded to nearest even" "$T/a16" "$DATA/tiny-a" \
    "$DATA/hf-keys-tiny-a.json"
exp "tiny-b fp32 in shards of at most 1MB" "$T/b32" --model "$DATA/tiny-b" --dtype fp32 --max-shard-size 1MB
check "tiny-b fp32 sharded: index, files, names, values" "$T/b32" "$DATA/tiny-b" "$DATA/hf-keys-tiny-b.json" \
    --max-shard 1000000
[ -f "$T/b32/model-00003-of-00003.safetensors" ] && ok "tiny-b (2.4 MB) in 3 files" ||
    not_ok "tiny-b shards" "$(ls "$T/b32" | tr '\n' ' ')"
exp "tiny-a bf16 in shards of 20KB (most tensors larger: a file each)" "$T/a16s" --model "$DATA/tiny-a" \
    --max-shard-size 20KB
check "tiny-a bf16, 20KB shards: an oversize tensor alone in its file, the rest within 20KB" "$T/a16s" \
    "$DATA/tiny-a" "$DATA/hf-keys-tiny-a.json" --max-shard 20000
# Tied embeddings: no lm_head (HF ties it to the embedding), the whole model read as one stage.
mkdir -p "$T/tied-cfg"
sed 's/"tie_word_embeddings": false/"tie_word_embeddings": true/' "$DATA/tiny-a/config.json" >"$T/tied-cfg/config.json"
if "$MILL" init --config "$T/tied-cfg/config.json" --out "$T/tied" --seed 3 >"$T/stdout" 2>"$T/stderr" &&
    python3 "$SRC/tests/reference/hf_keys_derived.py" "$T/hf-keys-tied.json" "$T/tied" >"$T/stdout" 2>"$T/stderr"; then
    exp "a model with tied embeddings" "$T/tiedx" --model "$T/tied" --dtype fp32
    check "tied embeddings: no lm_head, the rest HF's" "$T/tiedx" "$T/tied" "$T/hf-keys-tied.json"
else
    not_ok "mill init (tied embeddings)" "$(first_err)"
fi

# A training checkpoint: mill sft --dp 2 writes model and optimizer shards, an index and state.json.
sed -e 's/^  steps: 20/  steps: 2/' -e 's/^  every: 10/  every: 2/' -e "s|^  dir: runs/sft-dist|  dir: $T/run|" \
    "$DATA/sft-dist.yaml" >"$T/sft.yaml"
if "$MILL" sft "$T/sft.yaml" --dp 2 >"$T/stdout" 2>"$T/stderr" && [ -f "$T/run/step-000002/state.json" ]; then
    ok "mill sft --dp 2 wrote a sharded checkpoint ($(ls "$T/run/step-000002" | tr '\n' ' '))"
else
    not_ok "mill sft --dp 2" "$(first_err)"
fi
CK=$T/run/step-000002
exp "a training checkpoint (dp 2 shards)" "$T/ck" --model "$CK" --dtype fp32
grep -q "training checkpoint" "$T/stdout" && ok "recognised as a training checkpoint" ||
    not_ok "checkpoint recognised" "$(cat "$T/stdout")"
check "checkpoint fp32 = HF's names (dsv4-tiny), the master weights bit for bit" "$T/ck" "$CK" \
    "$DATA/hf-keys-dsv4-tiny.json"

# Tokenizer and generation files beside the weights travel with them.
mkdir -p "$T/tok/encoding/tests"
cp "$DATA/tiny-a/config.json" "$DATA/tiny-a/model.safetensors" "$T/tok/"
printf '{"version": "1.0", "model": {"type": "BPE"}}\n' >"$T/tok/tokenizer.json"
printf '{"bos_token": "<|bos|>", "model_max_length": 256}\n' >"$T/tok/tokenizer_config.json"
printf '{"bos_token": "<|bos|>"}\n' >"$T/tok/special_tokens_map.json"
printf '{"bos_token_id": 0, "eos_token_id": 1, "temperature": 0.6, "top_p": 0.95}\n' >"$T/tok/generation_config.json"
printf 'def encode_messages(m): return m\n' >"$T/tok/encoding/encoding_dsv4.py"
printf 'x\n' >"$T/tok/encoding/tests/case.txt"
exp "tiny-a with tokenizer files" "$T/tokx" --model "$T/tok" --dtype fp32
check "tokenizer, generation config and encoding/ copied byte for byte" "$T/tokx" "$T/tok" \
    "$DATA/hf-keys-tiny-a.json" --copied tokenizer.json tokenizer_config.json special_tokens_map.json \
    generation_config.json encoding/encoding_dsv4.py encoding/tests/case.txt

# bad CASE PATTERN OUT ARGS...: one error line naming the fault, nothing left at OUT or beside it
bad() {
    name=$1 pat=$2 out=$3
    shift 3
    "$MILL" export --out "$out" "$@" >"$T/stdout" 2>"$T/stderr"
    st=$?
    if one_error_line "$name" "$st"; then
        if ! grep -q -- "$pat" "$T/stderr"; then not_ok "$name" "expected \"$pat\": $(first_err)"
        elif ls -d "$out".tmp-* >/dev/null 2>&1; then not_ok "$name" "a temporary directory was left: $(ls -d "$out".tmp-*)"
        else ok "$name: $(first_err)"; fi
    fi
}
bad "a missing model directory" "$T/nope: cannot open the model directory" "$T/o1" --model "$T/nope"
[ ! -e "$T/o1" ] && ok "nothing written for a missing model" || not_ok "missing model" "$T/o1 exists"
cp -r "$CK" "$T/ck-broken"
rm "$T/ck-broken/model-00002-of-00002.safetensors"
bad "a checkpoint missing a shard" "model-00002-of-00002.safetensors" "$T/o2" --model "$T/ck-broken"
[ ! -e "$T/o2" ] && ok "nothing written at --out for a checkpoint missing a shard" || not_ok "missing shard" "$T/o2 exists"
: >"$T/afile"
bad "an unwritable --out (under a file)" "$T/afile/hf" "$T/afile/hf" --model "$DATA/tiny-a"
mkdir -p "$T/full" && : >"$T/full/keep.txt"
bad "an existing non-empty --out without --force" "exists and is not an empty directory (--force replaces it)" \
    "$T/full" --model "$DATA/tiny-a"
[ -f "$T/full/keep.txt" ] && ok "the existing --out is untouched" || not_ok "existing --out" "keep.txt is gone"
exp "--force replaces a non-empty --out" "$T/full" --model "$DATA/tiny-a" --dtype fp32 --force
[ ! -e "$T/full/keep.txt" ] && [ -f "$T/full/model.safetensors" ] && ! ls -d "$T"/full.old-* >/dev/null 2>&1 &&
    ok "--force: the old contents gone, the export in place" || not_ok "--force" "$(ls "$T/full" "$T")"
mkdir -p "$T/empty"
exp "an existing empty --out is taken" "$T/empty" --model "$DATA/tiny-a"
bad "--out inside the source" "holds the source model" "$DATA" --model "$DATA/tiny-a" --force
mkdir -p "$T/two"
sed 's/"n_shared_experts": 1/"n_shared_experts": 2/' "$DATA/tiny-a/config.json" >"$T/two/config.json"
bad "a config HF cannot hold (two shared experts)" "n_shared_experts = 2" "$T/o3" --model "$T/two"
bad "a bad --dtype" "--dtype must be bf16 or fp32" "$T/o4" --model "$DATA/tiny-a" --dtype fp16
bad "a bad --max-shard-size" "--max-shard-size must be a positive size" "$T/o4" --model "$DATA/tiny-a" \
    --max-shard-size 5XB
bad "an unknown option" "unknown option --shards" "$T/o4" --model "$DATA/tiny-a" --shards 2
bad "no --model" "needs --model DIR --out HFDIR" "$T/o4"
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
