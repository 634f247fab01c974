"""Shared by the HF benchmarks (hf_train.py, hf_decode.py): HF transformers' DeepseekV4ForCausalLM
built from one of mill's config.json files (the original DeepSeek release keys, read the way
tests/reference/make_goldens.py reads them), randomly initialised, in bf16 on the device, with eager
attention (V4 ships eager only) and, unless HF_EXPERTS names another of HF's expert backends (e.g.
grouped_mm), the eager per-expert loop: the same configuration as the goldens' oracle.
"""
import json
import os

import torch
import transformers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM


def load_config(path):
    orig = json.load(open(path))
    for k in ("architectures", "model_type", "torch_dtype"):
        orig.pop(k, None)
    return DeepseekV4Config(**orig)


def build_model(path, dev):
    """Random init as HF's _init_weights does it (normal(0, 0.02) matrices), every parameter in bf16
    (built under a bf16 default dtype, so the fp32 RoPE tables HF computes explicitly stay fp32),
    on `dev` directly (no host copy of the fp32 weights). tid2eid, which HF leaves zero for a
    checkpoint to fill (every token would hit expert 0 k times), gets k distinct random experts per
    token, as mill's model_init_random does, so hash layers spread tokens like mill's."""
    cfg = load_config(path)
    experts = os.environ.get("HF_EXPERTS", "eager")
    cfg._experts_implementation = experts
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = DeepseekV4ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(experts)
    gen = torch.Generator(device=dev).manual_seed(1)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                V = buf.shape[0]
                buf.copy_(torch.rand(V, E, generator=gen, device=dev).argsort(dim=1)[:, :k])
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    n = sum(p.numel() for p in model.parameters())
    desc = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"HF transformers {transformers.__version__}, torch {torch.__version__} on {desc}: {path}, "
          f"{n / 1e6:.1f} M parameters ({'/'.join(dtypes)}), attention {model.config._attn_implementation}, "
          f"experts {experts}", flush=True)
    return model, cfg


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()
