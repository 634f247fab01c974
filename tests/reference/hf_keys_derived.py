#!/usr/bin/env python3
"""HF's expected state dict and config.json for a DeepSeek-V4 config, DERIVED on a machine without torch
(stdlib only), in the format `check_export.py keys` writes on the GPU machine (which supersedes it:
rerun that there and commit its files over these).

    python3 tests/reference/hf_keys_derived.py OUT.json CONFIG [GOLDEN_DIR]

What it rests on, each a fact of transformers 5.17:
- names: the inverse of make_goldens.py's hf_to_orig table (read from that file, not copied): HF made
  the goldens from DeepseekV4ForCausalLM.state_dict() through it (a KeyError for any name it lacks)
  and loaded them back with no missing or unexpected keys (tests/data/make_goldens.log);
- which tensors exist: modeling_deepseek_v4.py's modules (a compressor on ratio-4 and ratio-128
  layers, an indexer inside the compressor on ratio-4 layers, e_score_correction_bias on "moe"
  layers and an int64 tid2eid on "hash_moe" ones, the experts fused as gate_up_proj [E, 2I, D] and
  down_proj [E, D, I]); with GOLDEN_DIR (a make_goldens.py model) the derived list must name
  exactly the goldens' tensors (mtp.* aside), the goldens' shapes included;
- bf16 dtypes: DeepseekV4PreTrainedModel._keep_in_fp32_modules_strict, matched as modeling_utils
  matches it (re.search of "(^|\\.)MODULE($|\\.)" on the name) when loading in bfloat16;
- config.json: PreTrainedConfig.to_diff_dict keeps every attribute a DeepseekV4Config has beyond the
  base class's (its dataclass fields and qk_rope_head_dim, set in __post_init__) plus model_type,
  architectures and dtype; the values follow DeepseekV4Config.__post_init__ (compress_ratios ->
  layer_types, num_hash_layers -> mlp_layer_types, qk_rope_head_dim -> partial_rotary_factor,
  rope_theta / compress_rope_theta / rope_scaling -> rope_parameters {main, compress});
- generation_config.json: GenerationConfig.from_model_config keeps the token ids that differ from
  its defaults and marks _from_model_config; save_pretrained adds output_attentions,
  output_hidden_states (false) and use_cache (true) (seen in HF 5.17's own files, 2026-12-08).
"""
import ast
import json
import os
import re
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KEEP_FP32 = ["attn_hc", "ffn_hc", "hc_head", "sinks", "position_bias", "e_score_correction_bias", "q_a_norm",
             "kv_norm", "input_layernorm", "post_attention_layernorm", "norm"]
LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
# DeepseekV4Config's fields that mill's config has no value for: HF's defaults
HF_DEFAULTS = {"output_router_logits": False, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
               "hidden_act": "silu", "initializer_range": 0.02, "use_cache": True, "pad_token_id": None,
               "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0}


def goldens_table():
    """make_goldens.py's hf_to_orig dicts (top, simple), HF name -> release name."""
    with open(os.path.join(HERE, "make_goldens.py")) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "hf_to_orig")
    found = {}
    for n in ast.walk(fn):
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict) and n.targets[0].id in ("top", "simple"):
            found[n.targets[0].id] = ast.literal_eval(n.value)
    return found["top"], found["simple"]


def state_dict(c):
    """{HF name: (shape, fp32 dtype)} in module order."""
    D, V, L, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["hc_mult"]
    H, d, q, g, ol = c["num_attention_heads"], c["head_dim"], c["q_lora_rank"], c["o_groups"], c["o_lora_rank"]
    E, I, k = c["n_routed_experts"], c["moe_intermediate_size"], c["num_experts_per_tok"]
    nh, ih = c["index_n_heads"], c["index_head_dim"]
    mix = (2 + n) * n
    sd = {"model.embed_tokens.weight": [V, D]}
    for l in range(L):
        p = f"model.layers.{l}."
        ratio = c["compress_ratios"][l]
        sd.update({p + "self_attn.q_a_proj.weight": [q, D], p + "self_attn.q_a_norm.weight": [q],
                   p + "self_attn.q_b_proj.weight": [H * d, q], p + "self_attn.kv_proj.weight": [d, D],
                   p + "self_attn.kv_norm.weight": [d], p + "self_attn.o_a_proj.weight": [g * ol, H * d // g],
                   p + "self_attn.o_b_proj.weight": [D, g * ol], p + "self_attn.sinks": [H]})
        if ratio:
            cw = 2 * d if ratio == 4 else d
            sd.update({p + "self_attn.compressor.kv_proj.weight": [cw, D],
                       p + "self_attn.compressor.gate_proj.weight": [cw, D],
                       p + "self_attn.compressor.position_bias": [ratio, cw],
                       p + "self_attn.compressor.kv_norm.weight": [d]})
        if ratio == 4:
            x = p + "self_attn.compressor.indexer."
            sd.update({x + "q_b_proj.weight": [nh * ih, q], x + "scorer.weights_proj.weight": [nh, D],
                       x + "kv_proj.weight": [2 * ih, D], x + "gate_proj.weight": [2 * ih, D],
                       x + "position_bias": [4, 2 * ih], x + "kv_norm.weight": [ih]})
        sd[p + "mlp.gate.weight"] = [E, D]
        if l < c["num_hash_layers"]:
            sd[p + "mlp.gate.tid2eid"] = [V, k]
        else:
            sd[p + "mlp.gate.e_score_correction_bias"] = [E]
        sd.update({p + "mlp.experts.gate_up_proj": [E, 2 * I, D], p + "mlp.experts.down_proj": [E, D, I],
                   p + "mlp.shared_experts.gate_proj.weight": [I, D], p + "mlp.shared_experts.up_proj.weight": [I, D],
                   p + "mlp.shared_experts.down_proj.weight": [D, I],
                   p + "input_layernorm.weight": [D], p + "post_attention_layernorm.weight": [D],
                   p + "attn_hc.fn": [mix, n * D], p + "attn_hc.base": [mix], p + "attn_hc.scale": [3],
                   p + "ffn_hc.fn": [mix, n * D], p + "ffn_hc.base": [mix], p + "ffn_hc.scale": [3]})
    sd.update({"model.norm.weight": [D], "model.hc_head.hc_fn": [n, n * D], "model.hc_head.hc_base": [n],
               "model.hc_head.hc_scale": [1]})
    if not c.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = [V, D]
    keep = re.compile("|".join(rf"((^|\.){m}($|\.))" for m in KEEP_FP32))
    return {name: {"shape": shape, "dtype": "I64" if name.endswith("tid2eid") else "F32",
                   "bf16_dtype": "I64" if name.endswith("tid2eid") else "F32" if keep.search(name) else "BF16"}
            for name, shape in sd.items()}


def config(c):
    L, r, d = c["num_hidden_layers"], c["qk_rope_head_dim"], c["head_dim"]
    prf = r / d
    rs = c.get("rope_scaling") or {}
    comp = {k: v for k, v in rs.items() if k != "type"}
    comp.update({"rope_type": rs.get("type", rs.get("rope_type", "default")), "rope_theta": c["compress_rope_theta"],
                 "partial_rotary_factor": prf})
    if comp["rope_type"] == "yarn":
        comp.setdefault("attention_factor", 1.0)
        for b in ("beta_fast", "beta_slow"):  # HF's yarn validator wants floats
            comp[b] = float(comp[b])
    keep = ["vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts",
            "n_shared_experts", "scoring_func", "norm_topk_prob", "routed_scaling_factor", "max_position_embeddings",
            "rope_theta", "compress_rope_theta", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "swiglu_limit",
            "sliding_window", "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk",
            "num_nextn_predict_layers", "rms_norm_eps", "bos_token_id", "eos_token_id", "tie_word_embeddings",
            "qk_rope_head_dim"]
    out = {k: c[k] for k in keep}
    for k in ("routed_scaling_factor", "rope_theta", "compress_rope_theta", "hc_eps", "swiglu_limit", "rms_norm_eps"):
        out[k] = float(out[k])
    out.update(HF_DEFAULTS)
    out.update({
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "dtype": "float32",
        "layer_types": [LAYER_TYPE[x] for x in c["compress_ratios"][:L]],
        "mlp_layer_types": ["hash_moe"] * min(L, c["num_hash_layers"]) + ["moe"] * max(0, L - c["num_hash_layers"]),
        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        "partial_rotary_factor": prf,
        "rope_parameters": {"main": {"rope_type": "default", "rope_theta": float(c["rope_theta"]),
                                     "partial_rotary_factor": prf}, "compress": comp},
    })
    out["rope_parameters"]["compress"]["rope_theta"] = float(out["rope_parameters"]["compress"]["rope_theta"])
    return out


def golden_names(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    out = {}
    for fn in files:
        with open(os.path.join(d, fn), "rb") as f:
            head = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        head.pop("__metadata__", None)
        out.update({k: v["shape"] for k, v in head.items()})
    return out


def main():
    out_path, cfg_path = sys.argv[1], sys.argv[2]
    golden = sys.argv[3] if len(sys.argv) > 3 else None
    with open(cfg_path if cfg_path.endswith(".json") else os.path.join(cfg_path, "config.json")) as f:
        c = json.load(f)
    sd = state_dict(c)
    if golden:  # the derivation against a real HF state dict (renamed by make_goldens.py's table)
        top, simple = goldens_table()
        want = {}
        for name, shape in golden_names(golden).items():
            if name.startswith("mtp."):
                continue
            m = re.match(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.w([123])\.weight$", name)
            if m:
                L, I, D = m.group(1), c["moe_intermediate_size"], c["hidden_size"]
                E = c["n_routed_experts"]
                hf = f"model.layers.{L}.mlp.experts." + ("down_proj" if m.group(3) == "2" else "gate_up_proj")
                want[hf] = [E, D, I] if m.group(3) == "2" else [E, 2 * I, D]
                continue
            inv_top = {v: k for k, v in top.items()}
            if name in inv_top:
                hf = inv_top[name]
                want[hf if hf == "lm_head.weight" else "model." + hf] = shape
                continue
            L, rest = re.match(r"layers\.(\d+)\.(.*)$", name).groups()
            want[f"model.layers.{L}." + {v: k for k, v in simple.items()}[rest]] = shape
        got = {k: v["shape"] for k, v in sd.items()}
        if got != want:
            sys.exit(f"derived state dict differs from the goldens': names {sorted(set(got) ^ set(want))}, "
                     f"shapes {[k for k in got if k in want and got[k] != want[k]]}")
        print(f"{golden}: the derived {len(sd)} names and shapes are the goldens' (HF's state dict)")
    doc = {
        "transformers": "5.17 (derived, not generated: tests/reference/hf_keys_derived.py)",
        "source": cfg_path,
        "state_dict": sd,
        "config": config(c),
        "generation_config": {k: v for k, v in (("_from_model_config", True), ("bos_token_id", c.get("bos_token_id")),
                                                ("eos_token_id", c.get("eos_token_id")), ("output_attentions", False),
                                                ("output_hidden_states", False), ("use_cache", True))
                              if v is not None},
    }
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{out_path}: {len(sd)} tensors, {sum(1 for v in sd.values() if v['bf16_dtype'] == 'F32')} kept F32 in bf16, "
          f"config {len(doc['config'])} keys")


if __name__ == "__main__":
    main()
