#!/usr/bin/env python3
"""Greedy-decoding goldens for mill's generation, from HF transformers' DeepseekV4ForCausalLM.

Run on the GPU machine from the repository root:  python3 tests/reference/make_generate_goldens.py OUTDIR
For each committed tests/data/<cfg>/ it decodes the prompts of generate.json greedily by re-running
the model's forward on the whole sequence at every step (float64 copy), and writes
OUTDIR/<cfg>-generate.json with output_ids, logprobs (log_softmax of the step's logits at the chosen
token) and the smallest top-1/top-2 logit gap seen, plus `hf_generate_output_ids`: what HF's own
`generate()` returns for the same prompts.

Both must agree; the test checks mill against output_ids and that hf_generate_output_ids equals them.
(An earlier version called generate() without an attention mask and pad_token_id=0: generate() then
took the prompts' token-0 occurrences for padding, shifted positions and diverged.)
"""
import json
import os
import sys

import torch
from transformers import DeepseekV4ForCausalLM


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "goldens"
    os.makedirs(out, exist_ok=True)
    for cfg in ("tiny-a", "tiny-b"):
        d = f"tests/data/{cfg}"
        g = json.load(open(f"{d}/generate.json"))
        m = DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        m.set_experts_implementation("eager")
        ids = torch.tensor(g["input_ids"])
        N = g["max_new_tokens"]
        with torch.no_grad():
            # An explicit all-ones mask: otherwise generate() infers padding from pad_token_id and
            # treats prompt tokens equal to it as padding (shifting positions).
            hf = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
            m64 = m.double()
            seq, lps, gap = ids.clone(), [], float("inf")
            for _ in range(N):
                logits = m64(seq).logits[:, -1]
                top = logits.topk(2, dim=-1).values
                gap = min(gap, float((top[:, 0] - top[:, 1]).min()))
                nxt = logits.argmax(-1, keepdim=True)
                lps.append(torch.log_softmax(logits, -1).gather(1, nxt))
                seq = torch.cat([seq, nxt], 1)
        res = {"input_ids": g["input_ids"], "max_new_tokens": N, "output_ids": seq[:, ids.shape[1]:].tolist(),
               "logprobs": torch.cat(lps, 1).tolist(), "min_top2_gap": gap,
               "hf_generate_output_ids": hf[:, ids.shape[1]:].tolist()}
        with open(f"{out}/{cfg}-generate.json", "w") as f:
            json.dump(res, f)
        print(cfg, "greedy", res["output_ids"], "min top-2 gap %.3e" % gap, "hf generate", res["hf_generate_output_ids"],
              flush=True)


if __name__ == "__main__":
    main()
