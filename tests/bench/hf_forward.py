#!/usr/bin/env python3
"""HF transformers' forward throughput on the same tiny models and shapes as bench_forward.c,
on the CPU in fp32 (and on the GPU when one is present), for the ratio bench/README.md reports.
Run where torch + transformers 5.17 are installed (the GPU machine):
    python3 tests/bench/hf_forward.py tests/data
"""
import sys
import time

import torch
from transformers import DeepseekV4ForCausalLM


def bench(model, ids, reps=3):
    with torch.no_grad():
        model(ids)  # warm-up
        if ids.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            model(ids)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return ids.numel() * reps / (time.perf_counter() - t0)


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/data"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for cfg in ("tiny-a", "tiny-b"):
        model = DeepseekV4ForCausalLM.from_pretrained(f"{root}/{cfg}", dtype=torch.float32).eval()
        model.set_experts_implementation("eager")
        V = model.config.vocab_size
        ids = (torch.arange(4 * 512) * 7919 + 13) % V
        ids = ids.reshape(4, 512)
        print(f"{cfg:7s} HF forward B=4 T=512 cpu fp32: {bench(model, ids):8.0f} tokens/s", flush=True)
        if torch.cuda.is_available():
            m = model.cuda()
            print(f"{cfg:7s} HF forward B=4 T=512 gpu fp32: {bench(m, ids.cuda()):8.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
