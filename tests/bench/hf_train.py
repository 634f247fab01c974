#!/usr/bin/env python3
"""HF transformers' training-step throughput (DeepseekV4ForCausalLM, eager, bf16, AdamW) on a
config.json with the original release keys, at the batch bench_train uses, for the ratio
tests/bench/README.md reports. Run in the same device call as bench_train:
    ./build/bin/bench_train --device cuda --config configs/models/dsv4-small.json --batch 8 --seq 1024
    python3 tests/bench/hf_train.py configs/models/dsv4-small.json 8 1024 [MILL_TOKENS_PER_S]
"""
import json
import sys
import time

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM


def main():
    path, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mill_tps = float(sys.argv[4]) if len(sys.argv) > 4 else None
    orig = json.load(open(path))
    for k in ("architectures", "model_type", "torch_dtype"):
        orig.pop(k, None)
    cfg = DeepseekV4Config(**orig)
    cfg._experts_implementation = "eager"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = DeepseekV4ForCausalLM(cfg).to(device=dev, dtype=torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = ((torch.arange(B * T) * 7919 + 13) % cfg.vocab_size).reshape(B, T).to(dev)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up
    if dev == "cuda":
        torch.cuda.synchronize()
    reps = 3
    t0 = time.perf_counter()
    for _ in range(reps):
        loss = step()
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    tps = B * T / dt
    print(f"HF train step B={B} T={T} ({dev}, bf16, eager, AdamW): {tps:.0f} tokens/s, {dt:.3f} s/step, "
          f"loss {loss.item():.4f}", flush=True)
    if mill_tps:
        print(f"mill / HF: {mill_tps / tps:.2f}x", flush=True)


if __name__ == "__main__":
    main()
