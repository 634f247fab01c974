#!/usr/bin/env python3
"""HF transformers' decode throughput (DeepseekV4ForCausalLM, random init, bf16, eager attention and
experts, greedy `generate` with its own cache) on a mill config.json, for the ratio to
bench_decode's figure at the same batch:
    python3 tests/bench/hf_decode.py CONFIG_JSON B [P] [STEPS] [MILL_TOKS]
B may be a comma list (1,32,128: one model build for all) with MILL_TOKS a matching comma list
(an empty entry skips that ratio). Defaults P = 128 prompt tokens, STEPS = 32 new tokens.

How the figure is computed: per batch B, random prompts of P tokens (all-ones attention mask), a
warm-up generate first, then between torch.cuda.synchronize() calls
    t_prefill = generate(max_new_tokens=1)      (one forward over the prompts: the prefill)
    t_full    = generate(max_new_tokens=STEPS)  (min_new_tokens=STEPS, do_sample=False)
The first new token comes from the prefill's logits, so t_full - t_prefill is STEPS - 1 cached
single-token forwards of the batch (plus generate's per-step overhead, which is part of HF's cost):
    decode tokens/s = B * (STEPS - 1) / (t_full - t_prefill).
The end-to-end rate B * STEPS / t_full (prefill included) is printed beside it.
HF eager decode of dsv4-small is slow (about 16 tokens/s at batch 1): keep STEPS small.
"""
import sys
import time

import torch

from hf_common import build_model, sync


def timed_generate(model, ids, n, dev):
    sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0)
    sync(dev)
    dt = time.perf_counter() - t0
    if out.shape[1] != ids.shape[1] + n:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {n}")
    return dt


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: hf_decode.py CONFIG_JSON B[,B...] [P] [STEPS] [MILL_TOKS[,MILL_TOKS...]]")
    path = sys.argv[1]
    batches = [int(b) for b in sys.argv[2].split(",")]
    P = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    mill = [float(x) if x else None for x in sys.argv[5].split(",")] if len(sys.argv) > 5 else []
    if steps < 2 or P < 1 or any(b < 1 for b in batches):
        sys.exit("hf_decode.py: needs B >= 1, P >= 1 and STEPS >= 2")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = build_model(path, dev)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    for i, B in enumerate(batches):
        ids = torch.randint(0, cfg.vocab_size, (B, P), generator=gen).to(dev)
        timed_generate(model, ids, 2, dev)  # warm-up: prefill and one cached step
        t_pre = min(timed_generate(model, ids, 1, dev) for _ in range(2))
        t_full = timed_generate(model, ids, steps, dev)
        rate = B * (steps - 1) / (t_full - t_pre) if t_full > t_pre else float("nan")
        print(f"HF decode B={B}: {rate:.1f} tok/s (P={P}, {steps} new tokens: B*(STEPS-1) / (t_generate "
              f"{t_full:.3f} s - t_prefill {t_pre:.3f} s); end to end {B * steps / t_full:.1f} tok/s "
              f"({dev}, bf16, eager)", flush=True)
        m = mill[i] if i < len(mill) else None
        if m:
            print(f"mill / HF decode B={B}: {m / rate:.2f}x ({m:.1f} / {rate:.1f} tok/s)", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
