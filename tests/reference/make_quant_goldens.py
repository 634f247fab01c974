#!/usr/bin/env python3
"""Goldens for mill's loading of the released FP8/FP4 DeepSeek-V4 format (dequantized on load).

Run on the GPU machine (torch, transformers 5.17, safetensors; no network), then copy
OUTDIR/quant-tiny-* into tests/data/ (tests/test_quant.c checks them when present):
    python3 tests/reference/make_quant_goldens.py OUTDIR [FACTS.txt]
For each tiny config below it
  1. builds a random DeepseekV4ForCausalLM (make_goldens.py's configs and init rules);
  2. stores it as the release does: FP8 e4m3 weights with one e8m0 scale per 128x128 block
     (`<name>.scale`, F8_E8M0 [ceil(out/128), ceil(in/128)]) for the attention projections, the
     indexer's wq_b and the shared experts; routed experts as packed FP4 e2m1 (I8 [out, in/2], the
     even column in the low nibble) with one e8m0 scale per 32 input columns (F8_E8M0 [out, in/32]);
     norms, router, compressor / indexer projections, embeddings and head BF16; HC parameters,
     sinks, ape and the router bias F32; tid2eid I64; config.json carries the release's
     quantization_config. quant-tiny-wide has dims above 128 (full and partial blocks), is sharded
     with every scale in the other shard from its weight, and keeps its shared experts' scales in
     F32 (the uniform-FP8 Base variants' scale dtype), amax / 448 with no rounding to a power of 2;
  3. writes dequant.safetensors: torch's dequantization (fp32) of every quantized weight, under the
     weight's name: q.float() * scale.float() per element, the scale of the weight's block;
  4. loads the quantized checkpoint with transformers (FineGrainedFP8Config(dequantize=True)) and
     compares its weights with torch's dequantization, bit for bit;
  5. writes input.json and expected.safetensors: logits of a float64 copy of the model that holds
     exactly the checkpoint's values (HF's dequantize-on-load model when its weights are torch's bit
     for bit, else torch's dequantized weights loaded into DeepseekV4ForCausalLM; the log says which).
The checkpoint files are written here byte by byte (header JSON + raw data), so the dtype strings
are exactly the release's whatever the installed safetensors package can write.
"""
import copy
import inspect
import json
import os
import re
import struct
import sys
import tempfile
import traceback

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_goldens as mg  # noqa: E402  (configs, init rules, the HF <-> release renaming)
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

FP8_BLOCK = 128
FP4_GROUP = 32
FP8_MAX = 448.0
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # codes 0..7; 8..15 are the same with the sign set
QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}

CONFIGS = {
    "quant-tiny-a": copy.deepcopy(mg.CONFIGS["tiny-a"]),
    # Dims above 128: wq_a [160, 192] is 2x2 blocks with partial ones on both sides, wo_a [144, 128]
    # partial rows / one full column block, the indexer's wq_b [512, 160]; experts' in dims 192 and 96
    # are 6 and 3 FP4 groups. CSA (indexer top-k active) then HCA; one hash layer.
    "quant-tiny-wide": dict(
        vocab_size=256, hidden_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=64, qk_rope_head_dim=16, q_lora_rank=160, o_groups=2, o_lora_rank=72,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=96,
        scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=2.0, num_hash_layers=1,
        swiglu_limit=10.0, hc_mult=3, hc_sinkhorn_iters=20, hc_eps=1e-6, sliding_window=16,
        compress_ratios=[4, 128, 0], index_n_heads=16, index_head_dim=32, index_topk=4,
        rope_theta=10000.0, compress_rope_theta=160000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=256, rms_norm_eps=1e-6, num_nextn_predict_layers=1,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    ),
}
SEQ = {"quant-tiny-a": (2, 160), "quant-tiny-wide": (2, 144)}
SHARDED = {"quant-tiny-a": False, "quant-tiny-wide": True}
F32_SCALES = {"quant-tiny-a": (), "quant-tiny-wide": (".ffn.shared_experts.",)}

FP8_NAMES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
             "attn.indexer.wq_b.weight", "ffn.shared_experts.w1.weight", "ffn.shared_experts.w2.weight",
             "ffn.shared_experts.w3.weight", "e_proj.weight")


def storage(name):
    """How the release stores a tensor: fp8, fp4, bf16, f32 or i64."""
    if re.search(r"\.ffn\.experts\.\d+\.w[123]\.weight$", name):
        return "fp4"
    if any(name.endswith("." + s) for s in FP8_NAMES):
        return "fp8"
    if name.endswith("tid2eid"):
        return "i64"
    if name.endswith(("attn_sink", ".ape", "gate.bias")) or re.search(r"hc_(attn|ffn|head)_(fn|base|scale)$", name):
        return "f32"
    return "bf16"


def e8m0_decode(code):
    """uint8 codes -> float32 through torch's own float8_e8m0fnu conversion."""
    return code.view(torch.float8_e8m0fnu).to(torch.float32)


def pow2_code(x):
    """The e8m0 code of the smallest power of two >= x (x > 0), kept to codes 1..254."""
    e = torch.ceil(torch.log2(x.clamp(min=2.0 ** -120)))
    return (e + 127).clamp(1, 254).to(torch.uint8)


def expand(s, rows, cols, br, bc):
    return s.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]


def quant_fp8(w, f32_scale):
    """w [R, C] fp32 -> (q float8_e4m3fn [R, C], scale, scale dtype string, torch's dequantization)."""
    R, C = w.shape
    rb, cb = -(-R // FP8_BLOCK), -(-C // FP8_BLOCK)
    pad = torch.zeros(rb * FP8_BLOCK, cb * FP8_BLOCK, dtype=torch.float32)
    pad[:R, :C] = w
    amax = pad.reshape(rb, FP8_BLOCK, cb, FP8_BLOCK).abs().amax(dim=(1, 3))
    if f32_scale:
        scale = (amax / FP8_MAX).clamp(min=2.0 ** -100).contiguous()
        sf, sdt = scale, "F32"
    else:
        scale = pow2_code(amax / FP8_MAX)
        sf, sdt = e8m0_decode(scale), "F8_E8M0"
    sx = expand(sf, R, C, FP8_BLOCK, FP8_BLOCK)
    q = (w / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale, sdt, q.to(torch.float32) * sx


def unpack_fp4(packed):
    """I8 [R, W] -> e2m1 codes [R, 2W]: the low nibble is the even column."""
    u = packed.view(torch.uint8)
    return torch.stack([u & 15, u >> 4], dim=-1).reshape(u.shape[0], 2 * u.shape[1])


def quant_fp4(w):
    """w [R, C] fp32 -> (packed I8 [R, C/2], e8m0 codes [R, C/32], torch's dequantization)."""
    R, C = w.shape
    assert C % FP4_GROUP == 0, (R, C)
    g = w.reshape(R, C // FP4_GROUP, FP4_GROUP)
    code_s = pow2_code(g.abs().amax(-1) / 6.0)
    sf = e8m0_decode(code_s)
    x = g / sf[..., None]
    table = torch.tensor(E2M1, dtype=torch.float32)
    idx = (x.abs()[..., None] - table).abs().argmin(-1)
    nib = (idx | ((x < 0).to(torch.int64) << 3)).reshape(R, C).to(torch.uint8)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).view(torch.int8)
    lut = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float32)  # code 8 is -0.0
    deq = lut[unpack_fp4(packed).long()] * sf.repeat_interleave(FP4_GROUP, 1)
    return packed, code_s, deq


def raw(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_safetensors(path, entries):
    """entries: [(name, dtype string, shape, bytes)] in file order."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, shape, b in entries:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, _, b in entries:
            f.write(b)


def hf_dequant_op():
    """transformers' own dequantization (Fp8Dequantize._dequantize_one), or None."""
    try:
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize
        op = Fp8Dequantize.__new__(Fp8Dequantize)
        return lambda q, s: op._dequantize_one(q, s, output_dtype=torch.float32)
    except Exception as ex:
        print("  transformers has no Fp8Dequantize._dequantize_one:", repr(ex), flush=True)
        return None


def bits_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.int32),
                                                                     b.contiguous().view(torch.int32))


def quantize_state(name, state):
    """state: release name -> fp32 tensor. Returns (file entries, effective fp32 state, dequant goldens)."""
    entries, eff, deq = [], {}, {}
    hf_op = hf_dequant_op()
    counts = {"fp8-e8m0": 0, "fp8-f32": 0, "fp4": 0, "partial": 0, "hf-op-equal": 0, "hf-op-differs": 0}
    for n in sorted(state):
        t = state[n]
        kind = storage(n)
        if kind == "fp8":
            f32s = any(s in n for s in F32_SCALES[name])
            q, s, sdt, d = quant_fp8(t, f32s)
            base = n[: -len(".weight")]
            entries.append((n, "F8_E4M3", q.shape, raw(q)))
            entries.append((base + ".scale", sdt, s.shape, raw(s)))
            eff[n] = deq[n] = d
            counts["fp8-f32" if f32s else "fp8-e8m0"] += 1
            counts["partial"] += t.shape[0] % FP8_BLOCK != 0 or t.shape[1] % FP8_BLOCK != 0
            if hf_op:
                try:
                    h = hf_op(q, s if f32s else s.view(torch.float8_e8m0fnu))
                    counts["hf-op-equal" if bits_equal(h, d) else "hf-op-differs"] += 1
                except Exception as ex:
                    counts["hf-op-differs"] += 1
                    print(f"  HF Fp8Dequantize on {n} {tuple(t.shape)}: {ex!r}", flush=True)
        elif kind == "fp4":
            packed, s, d = quant_fp4(t)
            base = n[: -len(".weight")]
            entries.append((n, "I8", packed.shape, raw(packed)))
            entries.append((base + ".scale", "F8_E8M0", s.shape, raw(s)))
            eff[n] = deq[n] = d
            counts["fp4"] += 1
            if hf_op:
                try:
                    h = hf_op(packed, s.view(torch.float8_e8m0fnu))
                    counts["hf-op-equal" if bits_equal(h, d) else "hf-op-differs"] += 1
                except Exception as ex:
                    counts["hf-op-differs"] += 1
                    print(f"  HF Fp8Dequantize on {n} {tuple(t.shape)}: {ex!r}", flush=True)
        elif kind == "bf16":
            b = t.to(torch.bfloat16)
            entries.append((n, "BF16", b.shape, raw(b)))
            eff[n] = b.to(torch.float32)
        elif kind == "f32":
            entries.append((n, "F32", t.shape, raw(t.float())))
            eff[n] = t.float()
        else:
            entries.append((n, "I64", t.shape, raw(t.to(torch.int64))))
            eff[n] = t
    print("  stored:", counts, flush=True)
    return entries, eff, deq


def save_quantized(d, orig_cfg, entries, sharded):
    os.makedirs(d, exist_ok=True)
    cfg = dict(orig_cfg, architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", torch_dtype="bfloat16",
               quantization_config=QUANT_CONFIG)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if not sharded:
        write_safetensors(os.path.join(d, "model.safetensors"), entries)
        return
    # Every scale in the other shard from its weight: the loader must pair them across files.
    shards = {"model-00001-of-00002.safetensors": [e for e in entries if not e[0].endswith(".scale")],
              "model-00002-of-00002.safetensors": [e for e in entries if e[0].endswith(".scale")]}
    weight_map = {}
    for fn, es in shards.items():
        write_safetensors(os.path.join(d, fn), es)
        weight_map.update({e[0]: fn for e in es})
    total = sum(len(e[3]) for e in entries)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def hf_load_dequantized(qdir):
    """from_pretrained with FineGrainedFP8Config(dequantize=True); (model, description) or (None, why)."""
    try:
        from transformers import FineGrainedFP8Config
        params = inspect.signature(FineGrainedFP8Config.__init__).parameters
        want = dict(dequantize=True, weight_block_size=(FP8_BLOCK, FP8_BLOCK), activation_scheme="dynamic",
                    scale_fmt="ue8m0")
        kw = {k: v for k, v in want.items() if k in params}
        qc = FineGrainedFP8Config(**kw)
        model, info = DeepseekV4ForCausalLM.from_pretrained(qdir, dtype=torch.float32, quantization_config=qc,
                                                            output_loading_info=True)
        model = mg.eager_experts(model.to("cpu").float()).eval()
        print(f"  HF from_pretrained(quantization_config=FineGrainedFP8Config({kw})) loaded; info:",
              {k: v for k, v in info.items() if v}, flush=True)
        return model, info
    except Exception as ex:
        print("  HF could not load the quantized checkpoint with dequantize=True:", repr(ex)[:2000], flush=True)
        traceback.print_exc(limit=6)
        return None, None


def compare_states(hf, ref):
    """Bit-for-bit comparison of two models' float tensors (HF names)."""
    hs, rs = hf.state_dict(), ref.state_dict()
    equal, differ, missing = 0, [], []
    for k, r in rs.items():
        h = hs.get(k)
        if h is None:
            missing.append(k)
            continue
        if not r.is_floating_point():
            if torch.equal(h.cpu(), r):
                equal += 1
            else:
                differ.append((k, "integer tables differ"))
            continue
        h = h.detach().cpu()
        if h.dtype == r.dtype and bits_equal(h.float(), r.float()):
            equal += 1
        else:
            diff = (h.double() - r.double()).abs().max().item() if h.shape == r.shape else float("nan")
            differ.append((k, f"{h.dtype} {tuple(h.shape)} vs {r.dtype} {tuple(r.shape)}, max |diff| {diff:.3e}"))
    print(f"  HF dequantized weights vs torch's: {equal} tensors bit-equal, {len(differ)} differ, "
          f"{len(missing)} missing", flush=True)
    for k, why in differ[:12]:
        print(f"    differs: {k}: {why}", flush=True)
    for k in missing[:6]:
        print(f"    missing in HF's: {k}", flush=True)
    return not differ and not missing


def make(name, orig, outdir):
    print(f"== {name}", flush=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4321 + len(name) * 13 + ord(name[-1]))
    cfg = DeepseekV4Config(**copy.deepcopy(orig))
    mg.check_config(cfg, orig)
    cfg._experts_implementation = "eager"
    model = mg.eager_experts(DeepseekV4ForCausalLM(cfg).float().eval())
    mg.randomize(model, cfg, gen)
    state = mg.orig_state(model.state_dict())
    D, Q, I = orig["hidden_size"], orig["q_lora_rank"], orig["moe_intermediate_size"]
    # MTP tensors as the release stores them (HF ignores mtp.*; mill keeps them, dequantized).
    state["mtp.0.enorm.weight"] = 1.0 + 0.1 * torch.randn(D, generator=gen)
    state["mtp.0.e_proj.weight"] = torch.randn(D, D, generator=gen) / D ** 0.5
    state["mtp.0.attn.wq_a.weight"] = torch.randn(Q, D, generator=gen) / D ** 0.5
    state["mtp.0.ffn.experts.0.w1.weight"] = torch.randn(I, D, generator=gen) / D ** 0.5

    entries, eff, deq = quantize_state(name, state)
    qdir = os.path.join(outdir, name)
    save_quantized(qdir, orig, entries, SHARDED[name])
    save_file({k: v.contiguous() for k, v in sorted(deq.items())}, os.path.join(qdir, "dequant.safetensors"),
              metadata={"format": "pt"})
    print(f"  {len(deq)} quantized weights; dequant.safetensors written", flush=True)

    # The model that holds exactly the checkpoint's values (torch's dequantization, BF16 upcast).
    with tempfile.TemporaryDirectory() as tmp:
        mg.save_checkpoint(tmp, orig, {k: v for k, v in eff.items() if not k.startswith("mtp.")}, False)
        ref, info = DeepseekV4ForCausalLM.from_pretrained(tmp, dtype=torch.float32, output_loading_info=True)
    mg.eager_experts(ref).eval()
    assert not info["missing_keys"], info["missing_keys"]

    hf, _ = hf_load_dequantized(qdir)
    try:
        use_hf = hf is not None and compare_states(hf, ref)
    except Exception as ex:
        print("  comparing HF's weights failed:", repr(ex), flush=True)
        use_hf = False
    source = ref
    if use_hf:
        print("  logits from HF's dequantize-on-load model (its weights are torch's bit for bit)", flush=True)
        source = hf
    else:
        print("  logits from torch's dequantized weights loaded into DeepseekV4ForCausalLM "
              "(HF's dequantize-on-load model is not torch's dequantization bit for bit, or did not load)", flush=True)

    B, T = SEQ[name]
    probe = mg.eager_experts(copy.deepcopy(source).double())
    for attempt in range(20):
        ids = torch.randint(0, orig["vocab_size"], (B, T), generator=gen)
        gap = mg.selection_margins(probe, cfg, ids)
        if gap > 1e-5:
            break
        print(f"  inputs {attempt}: a top-k selection is decided by a gap of {gap:.2e}; drawing new inputs", flush=True)
    else:
        raise RuntimeError("no tie-free inputs found")
    print(f"  smallest top-k selection gap {gap:.2e}", flush=True)
    with torch.no_grad():
        ref64 = probe(ids).logits
        ref32 = source(ids).logits
    del probe
    rel = ((ref32.double() - ref64).norm() / ref64.norm()).item()
    print(f"  fp32 vs fp64 logits: rel err {rel:.3e}", flush=True)
    if hf is not None and not use_hf:
        try:
            with torch.no_grad():
                hl = hf(ids).logits.double()
            print(f"  HF dequantize-on-load logits vs these (fp32): rel diff "
                  f"{((hl - ref32.double()).norm() / ref32.double().norm()).item():.3e}", flush=True)
        except Exception as ex:
            print("  HF dequantize-on-load forward failed:", repr(ex), flush=True)
    with open(os.path.join(qdir, "input.json"), "w") as f:
        json.dump({"input_ids": ids.tolist()}, f)
    save_file({"logits": ref64.float().contiguous()}, os.path.join(qdir, "expected.safetensors"))
    for fn in sorted(os.listdir(qdir)):
        print(f"    {fn}: {os.path.getsize(os.path.join(qdir, fn))} bytes", flush=True)


def facts(path, outdir):
    """What this torch / transformers / safetensors do with these formats (printed, for the README)."""
    import safetensors
    import transformers
    out = [f"torch {torch.__version__}, transformers {transformers.__version__}, safetensors {safetensors.__version__}"]
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    tables = {"fp8_e4m3": codes.view(torch.float8_e4m3fn).to(torch.float32).contiguous(),
              "e8m0": codes.view(torch.float8_e8m0fnu).to(torch.float32).contiguous()}
    try:
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize
        out.append("Fp8Dequantize source:\n" + inspect.getsource(Fp8Dequantize))
        tables["e2m1_hf"] = torch.tensor(Fp8Dequantize._FP4_E2M1_LUT, dtype=torch.float32)
    except Exception as ex:
        out.append(f"Fp8Dequantize: {ex!r}")
    for mod, attr in (("transformers.quantizers.quantizer_finegrained_fp8", "FineGrainedFP8HfQuantizer"),
                      ("transformers.utils.quantization_config", "FineGrainedFP8Config")):
        try:
            obj = getattr(__import__(mod, fromlist=[attr]), attr)
            out.append(f"{attr} source:\n" + inspect.getsource(obj))
        except Exception as ex:
            out.append(f"{attr}: {ex!r}")
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        conv = get_checkpoint_conversion_mapping("deepseek_v4") or []
        out.append("conversion_mapping deepseek_v4:\n" + "\n".join(repr(c)[:400] for c in conv))
    except Exception as ex:
        out.append(f"conversion mapping: {ex!r}")
    # How the safetensors package writes torch's packed FP4 dtype (the release uses I8 instead).
    try:
        p = os.path.join(outdir, "f4probe.safetensors")
        save_file({"x": torch.zeros(2, 4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, p)
        with open(p, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            out.append("safetensors writes float4_e2m1fn_x2 [2, 4] as: " + f.read(n).decode())
    except Exception as ex:
        out.append(f"safetensors float4_e2m1fn_x2: {ex!r}")
    for k, v in tables.items():
        b = v.view(torch.int32)
        out.append(f"{k}: " + " ".join(f"{int(x) & 0xffffffff:08x}" for x in b.tolist()))
    with open(path, "w") as f:
        f.write("\n\n".join(out))
    print("  facts:", out[0], f"({len(out)} sections) ->", path, flush=True)
    return tables


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else "quant-goldens"
    facts_path = sys.argv[2] if len(sys.argv) > 2 else os.path.join(outdir, "hf_facts.txt")
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(8)
    tables = facts(facts_path, outdir)
    for name, orig in CONFIGS.items():
        make(name, orig, outdir)
    # torch's decode tables beside the first checkpoint: the test checks mill's against them too.
    save_file(tables, os.path.join(outdir, "quant-tiny-a", "decode_tables.safetensors"))


if __name__ == "__main__":
    main()
