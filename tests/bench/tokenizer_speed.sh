#!/bin/sh
# mill's tokenizer.json BPE against HF tokenizers on the same corpus, in one run (tests/bench/README.md).
# The corpus: ~MB megabytes of multi-script documents from tests/reference/make_tokenizer_goldens.py
# (English and other Latin scripts, Cyrillic, Greek, Arabic, Hebrew, Devanagari, Thai, CJK, kana,
# Hangul, numbers, code, whitespace runs, emoji). HF is the Python package tokenizers, or its Node
# binding (MILL_NODE_TOKENIZERS=DIR, see make_tokenizer_goldens.py). Prints MB/s for mill (one
# thread, bench_tokenizer), HF one document at a time and batched on one thread, HF batched on every
# core, the ratio mill / best HF single thread, and whether mill's ids equal HF's (token count and
# CRC-32 of every id of the corpus).
# usage: sh tests/bench/tokenizer_speed.sh [BENCH_BIN] [TOKENIZER_DIR] [MB] [--english]
#   --english: a corpus of plain English prose instead
set -eu
cd "$(dirname "$0")/../.."
BIN=${1:-build/bin/bench_tokenizer}
TOK=${2:-tests/data/bpe-tiny}
MB=${3:-30}
KIND=${4:-}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
G=tests/reference/make_tokenizer_goldens.py
python3 "$G" --bench-corpus "$W/corpus.bin" --mb "$MB" $KIND
"$BIN" "$TOK" "$W/corpus.bin" 3 | tee "$W/mill.txt"
RAYON_NUM_THREADS=1 UV_THREADPOOL_SIZE=1 python3 "$G" --hf-bench "$W/corpus.bin" "$TOK" | tee "$W/hf1.txt"
python3 "$G" --hf-bench "$W/corpus.bin" "$TOK" | grep -v "ids:" | tee "$W/hfn.txt"
python3 - "$W" "$(nproc)" <<'PY'
import re, sys
w = sys.argv[1]
mill, hf1, hfn = (open(f"{w}/{n}.txt").read() for n in ("mill", "hf1", "hfn"))
m = max(float(x) for x in re.findall(r"([\d.]+) MB/s", mill))
h = max(float(x) for x in re.findall(r"([\d.]+) MB/s", hf1))
hn = max(float(x) for x in re.findall(r"([\d.]+) MB/s", hfn))
mt = re.findall(r"(\d+) tokens, crc32 (0x[0-9a-f]+)", mill)[-1]
ht = re.findall(r"(\d+) tokens, crc32 (0x[0-9a-f]+)", hf1)[-1]
print(f"summary: mill {m:.2f} MB/s one thread; HF {h:.2f} MB/s one thread (best of its calls), {hn:.2f} MB/s on "
      f"{sys.argv[2]} cores; mill / HF one thread {m / h:.2f}x; ids {'EQUAL' if mt == ht else 'DIFFER'} "
      f"(mill {mt[0]} tokens {mt[1]}, HF {ht[0]} tokens {ht[1]})")
PY
