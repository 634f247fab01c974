#!/bin/sh
# Quick-start command 1: install what is missing, build, and run the main job.
# Until the GRPO loop lands, the main job is a forward pass of the bundled tiny
# DeepSeek-V4 model (tests/data/tiny-a) on its bundled prompt batch.
set -eu
cd "$(dirname "$0")/.."
sh scripts/build.sh >/dev/null
mkdir -p runs
./build/bin/mill info --model tests/data/tiny-a
./build/bin/mill forward --model tests/data/tiny-a --input tests/data/tiny-a/input.json --output runs/demo-logits.safetensors
echo "logits written to runs/demo-logits.safetensors"
