#!/bin/sh
# tests/reference/export_devrun.sh — `mill export` against HF transformers 5.17, in two steps:
#   here:            tests/reference/export_devrun.sh prep build/bin/mill
#                    (exports into export-check/, untracked and not ignored, so it travels with a call)
#   GPU machine:     sh tests/reference/export_devrun.sh run 2>&1 | tee $OUT/export-check.log
#                    (HF's own key lists into $OUT/hf-keys-*.json: commit them over tests/data/'s derived
#                    ones; then every export loaded with from_pretrained and its logits compared)
#   here, after:     rm -rf export-check
set -e
case "$1" in
prep)
    MILL=$2
    rm -rf export-check
    mkdir -p export-check
    "$MILL" export --model tests/data/tiny-a --out export-check/a32 --dtype fp32
    "$MILL" export --model tests/data/tiny-a --out export-check/a16
    "$MILL" export --model tests/data/tiny-b --out export-check/b32 --dtype fp32 --max-shard-size 1MB
    sed -e 's/^  steps: 20/  steps: 2/' -e 's/^  every: 10/  every: 2/' \
        -e "s|^  dir: runs/sft-dist|  dir: export-check/run|" tests/data/sft-dist.yaml >export-check/sft.yaml
    "$MILL" sft export-check/sft.yaml --dp 2 --device cpu >/dev/null
    mv export-check/run/step-000002 export-check/ck-src
    rm -rf export-check/run export-check/sft.yaml
    "$MILL" export --model export-check/ck-src --out export-check/ck --dtype fp32
    du -sh export-check
    ;;
run)
    export PYTHONUNBUFFERED=1
    python3 tests/reference/check_export.py keys "${OUT:-/tmp}" tiny-a=tests/data/tiny-a tiny-b=tests/data/tiny-b \
        dsv4-tiny=configs/models/dsv4-tiny.json || echo "keys: FAILED"
    python3 tests/reference/check_export.py check export-check/a32=tests/data/tiny-a export-check/a16=tests/data/tiny-a \
        export-check/b32=tests/data/tiny-b export-check/ck=export-check/ck-src
    ;;
*)
    echo "usage: $0 prep PATH/TO/mill | run" >&2
    exit 2
    ;;
esac
