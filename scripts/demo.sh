#!/bin/sh
# Quick-start command 1: install what is missing, build, and run the main job: a colocated GRPO run
# of the bundled tiny DeepSeek-V4 on synthetic arithmetic, from its SFT warm start, on CPU (about
# ten minutes on 2 cores). It prints held-out greedy accuracy before and during the run, records
# everything in runs/ledger.db (see `mill runs`, `mill show NAME`) and draws runs/NAME.png.
set -eu
cd "$(dirname "$0")/.."
sh scripts/build.sh >/dev/null
name="demo-$(date +%Y%m%d-%H%M%S)"
./build/bin/mill run configs/runs/grpo-arith-demo.yaml --set name="$name" --set checkpoint.dir="runs/$name" "$@"
./build/bin/mill plot "$name" --out "runs/$name.png"
