#!/usr/bin/env python3
"""Golden files for mill, made with HF transformers' DeepseekV4ForCausalLM (the independent oracle).

Run on the GPU machine (it has torch and transformers 5.17):
    python3 tests/reference/make_goldens.py OUTDIR
For each tiny config below it
  1. builds DeepseekV4Config from a config.json written with the ORIGINAL DeepSeek release keys
     (compress_ratios, num_hash_layers, qk_rope_head_dim, rope_scaling, ...) and checks how HF read them;
  2. fills every parameter and buffer with random nonzero values (norm weights, HC scales, sinks,
     position biases, router bias and tid2eid included);
  3. saves the checkpoint under the original release names (the reverse of transformers'
     conversion_mapping for deepseek_v4), sharded for some configs, plus a few mtp.* tensors;
  4. proves the renaming: from_pretrained on the saved directory gives identical logits;
  5. writes input.json, expected.safetensors (logits from a float64 copy of the model),
     grads.safetensors (loss and grad.<original name> from float64 autograd, labels = inputs),
     generate.json (greedy generate with HF's cache), and debug tensors (not committed).
"""
import copy
import json
import os
import re
import sys

import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

CONFIGS = {
    # sliding (0), CSA (4), HCA (128) and CSA again; 2 hash layers; top-k selection active (index_topk 8 < 75).
    # Enough indexer heads that a score is rarely exactly 0 (all heads ReLU'd off): ties at the top-k
    # boundary have no defined winner, so goldens are checked to have none (see selection_margins).
    "tiny-a": dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
        scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5, num_hash_layers=2,
        swiglu_limit=1.5, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, sliding_window=16,
        compress_ratios=[0, 4, 128, 4, 0], index_n_heads=16, index_head_dim=32, index_topk=8,
        rope_theta=10000.0, compress_rope_theta=160000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=256, rms_norm_eps=1e-6, num_nextn_predict_layers=1,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    ),
    # HCA first, then sliding, then CSA; hc_mult 3, 4 output groups, k=4 of 16 experts, other RoPE/YaRN knobs.
    "tiny-b": dict(
        vocab_size=320, hidden_size=96, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=1,
        head_dim=48, qk_rope_head_dim=8, q_lora_rank=40, o_groups=4, o_lora_rank=12,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=24,
        scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=2.5, num_hash_layers=1,
        swiglu_limit=10.0, hc_mult=3, hc_sinkhorn_iters=7, hc_eps=1e-5, sliding_window=40,
        compress_ratios=[128, 0, 4, 4], index_n_heads=12, index_head_dim=24, index_topk=48,
        rope_theta=5000.0, compress_rope_theta=40000.0,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                      "beta_fast": 16, "beta_slow": 2},
        max_position_embeddings=1024, rms_norm_eps=1e-5, num_nextn_predict_layers=1,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    ),
}
SEQ = {"tiny-a": (2, 300), "tiny-b": (2, 280)}
SHARDED = {"tiny-a": False, "tiny-b": True}
GEN = {"tiny-a": (120, 16), "tiny-b": (124, 12)}  # (prompt length, new tokens): crosses an HCA window


def check_config(cfg, orig):
    n = orig["num_hidden_layers"]
    want_types = [{0: "sliding_attention", 4: "compressed_sparse_attention",
                   128: "heavily_compressed_attention"}[r] for r in orig["compress_ratios"][:n]]
    assert cfg.layer_types == want_types, (cfg.layer_types, want_types)
    h = orig["num_hash_layers"]
    assert cfg.mlp_layer_types == ["hash_moe"] * h + ["moe"] * (n - h), cfg.mlp_layer_types
    assert cfg.qk_rope_head_dim == orig["qk_rope_head_dim"], cfg.qk_rope_head_dim
    comp = cfg.rope_parameters["compress"]
    rs = orig["rope_scaling"]
    assert comp["rope_type"] == "yarn", comp
    assert comp["factor"] == rs["factor"], comp
    assert comp["original_max_position_embeddings"] == rs["original_max_position_embeddings"], comp
    assert comp["rope_theta"] == orig["compress_rope_theta"], comp
    assert cfg.rope_parameters["main"]["rope_type"] == "default"
    assert cfg.rope_parameters["main"]["rope_theta"] == orig["rope_theta"]
    print("  HF read the original keys as", cfg.layer_types, cfg.mlp_layer_types, comp, flush=True)


def randomize(model, cfg, gen):
    E, k, V = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.vocab_size
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("tid2eid"):
                continue
            if re.search(r"(norm\.weight|layernorm\.weight)$", name) or name == "model.norm.weight":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("hc.scale", "hc_scale")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("hc.base", "hc_base")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("hc.fn", "hc_fn")):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("position_bias"):
                p.copy_(0.7 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
    for name, b in model.named_buffers():
        with torch.no_grad():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
            elif name.endswith("tid2eid"):
                ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(V)])
                b.copy_(ids)


def hf_to_orig(name, t):
    """One HF state-dict entry -> [(original release name, tensor)]."""
    n = name[len("model."):] if name.startswith("model.") else name
    top = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "norm.weight": "norm.weight",
           "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}
    if n in top:
        return [(top[n], t)]
    m = re.match(r"layers\.(\d+)\.(.*)$", n)
    if not m:
        raise KeyError(name)
    L, rest = m.group(1), m.group(2)
    pre = f"layers.{L}."
    simple = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
        "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
        "self_attn.q_a_proj.weight": "attn.wq_a.weight", "self_attn.q_a_norm.weight": "attn.q_norm.weight",
        "self_attn.q_b_proj.weight": "attn.wq_b.weight", "self_attn.kv_proj.weight": "attn.wkv.weight",
        "self_attn.kv_norm.weight": "attn.kv_norm.weight", "self_attn.o_a_proj.weight": "attn.wo_a.weight",
        "self_attn.o_b_proj.weight": "attn.wo_b.weight", "self_attn.sinks": "attn.attn_sink",
        "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
        "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
        "self_attn.compressor.position_bias": "attn.compressor.ape",
        "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
        "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
        "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
        "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
        "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
        "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
        "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
        "mlp.gate.weight": "ffn.gate.weight", "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
        "mlp.gate.tid2eid": "ffn.gate.tid2eid",
        "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
        "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
        "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    }
    if rest in simple:
        return [(pre + simple[rest], t)]
    if rest == "mlp.experts.gate_up_proj":
        inter = t.shape[1] // 2
        out = []
        for e in range(t.shape[0]):
            out.append((f"{pre}ffn.experts.{e}.w1.weight", t[e, :inter]))
            out.append((f"{pre}ffn.experts.{e}.w3.weight", t[e, inter:]))
        return out
    if rest == "mlp.experts.down_proj":
        return [(f"{pre}ffn.experts.{e}.w2.weight", t[e]) for e in range(t.shape[0])]
    raise KeyError(name)


def orig_state(model_or_grads):
    out = {}
    for name, t in model_or_grads.items():
        for on, ot in hf_to_orig(name, t):
            assert on not in out, on
            out[on] = ot.detach().contiguous().clone()
    return out


def save_checkpoint(d, orig_cfg, state, sharded):
    os.makedirs(d, exist_ok=True)
    cfg = dict(orig_cfg, architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", torch_dtype="float32")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if not sharded:
        save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fn, ns in shards.items():
        save_file({n: state[n] for n in ns}, os.path.join(d, fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in ns})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def debug_hooks(model, store):
    hooks = []

    def grab(name):
        def fn(mod, inp, out):
            outs = out if isinstance(out, tuple) else (out,)
            for i, o in enumerate(outs):
                if isinstance(o, torch.Tensor):
                    store[f"{name}.out{i}"] = o.detach().float().contiguous().clone()
        return fn

    for name, mod in model.named_modules():
        if re.search(r"layers\.\d+(\.(self_attn|mlp|attn_hc|ffn_hc|self_attn\.compressor|"
                     r"self_attn\.compressor\.indexer|mlp\.gate))?$", name) or name.endswith("hc_head"):
            hooks.append(mod.register_forward_hook(grab(name)))
    return hooks


def selection_margins(model, cfg, ids):
    """Smallest gap between the last chosen and the first rejected candidate of every top-k
    selection (indexer over visible compressed entries, routed MoE over s + bias) in a forward.
    A golden is only reproducible by an independent implementation if no gap is (near) zero."""
    gaps = []
    hooks = []
    T = ids.shape[1]

    def on_scorer(mod, inp, out):
        ratio = 4
        pos = torch.arange(T)
        visible = (pos + 1) // ratio
        for b in range(out.shape[0]):
            for t in range(T):
                v = int(visible[t])
                if v > cfg.index_topk:
                    s = out[b, t, :v].sort(descending=True).values
                    gaps.append(float(s[cfg.index_topk - 1] - s[cfg.index_topk]))

    def on_router(mod, inp, out):
        logits = out[0]
        s = mod.score_fn(logits) + mod.e_score_correction_bias
        top = s.sort(dim=-1, descending=True).values
        gaps.extend((top[:, mod.top_k - 1] - top[:, mod.top_k]).tolist())

    for name, mod in model.named_modules():
        if type(mod).__name__ == "DeepseekV4IndexerScorer":
            hooks.append(mod.register_forward_hook(on_scorer))
        if type(mod).__name__ == "DeepseekV4TopKRouter":
            hooks.append(mod.register_forward_hook(on_router))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return min(gaps) if gaps else float("inf")


def eager_experts(model):
    """torch's grouped_mm (HF's default experts kernel) has no float64; the eager loop is the plain oracle."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    else:
        model.config._experts_implementation = "eager"
    return model


def make(name, orig, outdir):
    print(f"== {name}", flush=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234 + len(name) * 7 + ord(name[-1]))
    cfg = DeepseekV4Config(**copy.deepcopy(orig))
    check_config(cfg, orig)
    cfg._experts_implementation = "eager"
    model = eager_experts(DeepseekV4ForCausalLM(cfg).float().eval())
    randomize(model, cfg, gen)
    sd = model.state_dict()
    state = orig_state(sd)
    # A few MTP tensors, as the release ships them: HF ignores mtp.*, mill must parse and load them.
    D = orig["hidden_size"]
    state["mtp.0.enorm.weight"] = 1.0 + 0.1 * torch.randn(D, generator=gen)
    state["mtp.0.hnorm.weight"] = 1.0 + 0.1 * torch.randn(D, generator=gen)
    state["mtp.0.e_proj.weight"] = torch.randn(D, D, generator=gen) / D ** 0.5
    mdir = os.path.join(outdir, name)
    save_checkpoint(mdir, orig, state, SHARDED[name])

    B, T = SEQ[name]
    probe = eager_experts(copy.deepcopy(model).double())
    for attempt in range(20):
        ids = torch.randint(0, orig["vocab_size"], (B, T), generator=gen)
        gap = selection_margins(probe, cfg, ids)
        if gap > 1e-5:
            break
        print(f"  inputs {attempt}: a top-k selection is decided by a gap of {gap:.2e}; drawing new inputs", flush=True)
    else:
        raise RuntimeError("no tie-free inputs found")
    print(f"  smallest top-k selection gap {gap:.2e} (no ties at any selection boundary)", flush=True)
    del probe
    with torch.no_grad():
        ref32 = model(ids).logits
    loaded, info = DeepseekV4ForCausalLM.from_pretrained(mdir, dtype=torch.float32, output_loading_info=True)
    eager_experts(loaded).eval()
    print("  loading info:", {k: v for k, v in info.items() if v}, flush=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    with torch.no_grad():
        back = loaded(ids).logits
    assert torch.equal(back, ref32), f"renaming round trip differs: {(back - ref32).abs().max()}"
    print("  original-format checkpoint reloads to identical logits", flush=True)

    m64 = eager_experts(copy.deepcopy(loaded).double())
    with torch.no_grad():
        ref64 = m64(ids).logits
    rel = ((ref32.double() - ref64).norm() / ref64.norm()).item()
    print(f"  fp32 vs fp64 logits: rel err {rel:.3e}", flush=True)

    with open(os.path.join(mdir, "input.json"), "w") as f:
        json.dump({"input_ids": ids.tolist()}, f)
    save_file({"logits": ref64.float().contiguous()}, os.path.join(mdir, "expected.safetensors"))

    # Gradients (for the backward issue): mean next-token CE over B*(T-1), labels = inputs.
    m64.train(False)
    out = m64(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in m64.named_parameters() if p.grad is not None}
    gstate = {"grad." + k: v.float() for k, v in orig_state(grads).items()}
    gstate["loss"] = out.loss.detach().float().reshape(1)
    save_file(gstate, os.path.join(mdir, "grads.safetensors"))
    print(f"  loss {out.loss.item():.6f}, {len(grads)} HF grads -> {len(gstate) - 1} original-name grads", flush=True)

    # Debug tensors: per-module outputs of the fp32 model (for locating a mismatch; not committed).
    store = {}
    hooks = debug_hooks(loaded, store)
    with torch.no_grad():
        loaded(ids)
    for h in hooks:
        h.remove()
    save_file(store, os.path.join(outdir, f"debug-{name}.safetensors"))

    # Greedy cached generation (for the rollout issue).
    P, N = GEN[name]
    try:
        with torch.no_grad():
            g = loaded.generate(ids[:, :P], attention_mask=torch.ones_like(ids[:, :P]), max_new_tokens=N,
                                do_sample=False, min_new_tokens=N, eos_token_id=None, pad_token_id=0)
        with open(os.path.join(mdir, "generate.json"), "w") as f:
            json.dump({"input_ids": ids[:, :P].tolist(), "max_new_tokens": N,
                       "output_ids": g[:, P:].tolist()}, f)
        print("  greedy generate ok", flush=True)
    except Exception as ex:  # keep the forward goldens even if generate breaks
        print("  generate failed:", repr(ex), flush=True)


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else "goldens"
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(8)
    names = sys.argv[2:] or list(CONFIGS)
    for name in names:
        make(name, CONFIGS[name], outdir)


if __name__ == "__main__":
    main()
