#!/usr/bin/env python3
"""HF transformers' training-step throughput (DeepseekV4ForCausalLM, random init, bf16, eager
attention and experts, AdamW) on a mill config.json at the batch bench_train uses, for the ratio
tests/bench/README.md reports. Run in the same device call as bench_train:
    ./build/bin/bench_train --device cuda --config configs/models/dsv4-small.json --batch 8 --seq 1024
    python3 tests/bench/hf_train.py configs/models/dsv4-small.json 8 1024 [MILL_TOKENS_PER_S]
A step: forward with labels (HF's shifted next-token loss), backward, AdamW step, zero_grad; two
untimed steps first, then the mean of 3 timed ones between torch.cuda.synchronize() calls.
"""
import sys
import time

import torch

from hf_common import build_model, sync


def main():
    if len(sys.argv) < 4:
        sys.exit("usage: hf_train.py CONFIG_JSON B T [MILL_TOKENS_PER_S]")
    path, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mill_tps = float(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] else None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = build_model(path, dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = ((torch.arange(B * T) * 7919 + 13) % cfg.vocab_size).reshape(B, T).to(dev)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):  # warm-up: AdamW state, allocator, cuBLAS heuristics
        step()
    sync(dev)
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        loss = step()
    sync(dev)
    dt = (time.perf_counter() - t0) / reps
    tps = B * T / dt
    print(f"HF train step B={B} T={T} ({dev}, bf16, eager, AdamW): {tps:.0f} tokens/s, {dt:.3f} s/step, "
          f"loss {loss.item():.4f}", flush=True)
    if dev == "cuda":
        print(f"HF peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    if mill_tps:
        print(f"mill / HF train: {mill_tps / tps:.2f}x ({mill_tps:.0f} / {tps:.0f} tokens/s)", flush=True)


if __name__ == "__main__":
    main()
