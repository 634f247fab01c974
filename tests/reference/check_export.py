#!/usr/bin/env python3
"""`mill export` against HF transformers' DeepseekV4ForCausalLM (run on the GPU machine: torch, transformers 5.17).

    python3 tests/reference/check_export.py keys OUTDIR NAME=CONFIG ...
        For each config (a model directory or a config.json with the original release keys), what HF
        itself holds and writes: DeepseekV4ForCausalLM(config).state_dict()'s names, shapes and dtypes
        (in fp32, and loaded in bf16 through from_pretrained, where _keep_in_fp32_modules_strict keeps
        some fp32), DeepseekV4Config.save_pretrained's config.json and the model's
        generation_config.json -> OUTDIR/hf-keys-NAME.json (committed as tests/data/hf-keys-*.json;
        tests/export_cli.sh checks mill's exports against them on the CPU).

    python3 tests/reference/check_export.py check EXPORTED=ORIGINAL ...
        EXPORTED (mill export's directory) must load with DeepseekV4ForCausalLM.from_pretrained with no
        missing, unexpected or mismatched keys and without a cast (every tensor in the dtype HF's own
        model holds it in), equal tensor for tensor the model HF loads from ORIGINAL (the source, under
        the release names, through HF's own conversion mapping) and give its logits. Where ORIGINAL has
        input.json and expected.safetensors (make_goldens.py: HF's float64 logits), the logits are
        compared with those: in float64 (the same weights as the goldens' model: expected to match to
        rounding, tolerance 1e-12 relative) and float32 (tolerance 1e-5 relative, as mill's own check).
        A bf16 export is loaded in bf16 and compared with ORIGINAL's model cast as HF casts it.
"""
import copy
import json
import os
import sys
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, DeepseekV4Config, DeepseekV4ForCausalLM

DT = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.float64: "F64"}


def eager(model):
    # torch's grouped_mm (HF's default experts kernel) has no float64; the eager loop is the plain oracle
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    else:
        model.config._experts_implementation = "eager"
    return model


def load_config(src):
    if os.path.isdir(src):
        return AutoConfig.from_pretrained(src)
    return DeepseekV4Config.from_json_file(src)


def keys(outdir, pairs):
    import transformers
    os.makedirs(outdir, exist_ok=True)
    for pair in pairs:
        name, src = pair.split("=", 1)
        cfg = load_config(src)
        torch.manual_seed(0)
        model = DeepseekV4ForCausalLM(cfg).float().eval()
        sd32 = model.state_dict()
        with tempfile.TemporaryDirectory() as d:
            cfg.save_pretrained(os.path.join(d, "cfg"))
            with open(os.path.join(d, "cfg", "config.json")) as f:
                saved_cfg = json.load(f)
            model.save_pretrained(os.path.join(d, "model"))
            files = sorted(os.listdir(os.path.join(d, "model")))
            gen = {}
            if "generation_config.json" in files:
                with open(os.path.join(d, "model", "generation_config.json")) as f:
                    gen = json.load(f)
            saved_names = []
            for fn in files:
                if fn.endswith(".safetensors"):
                    with safe_open(os.path.join(d, "model", fn), "pt") as f:
                        saved_names += list(f.keys())
            bf, info = DeepseekV4ForCausalLM.from_pretrained(os.path.join(d, "model"), dtype=torch.bfloat16,
                                                             output_loading_info=True)
            sd16 = bf.state_dict()
        out = {
            "transformers": transformers.__version__,
            "source": src,
            "state_dict": {k: {"shape": list(v.shape), "dtype": DT[v.dtype], "bf16_dtype": DT[sd16[k].dtype]}
                           for k, v in sd32.items()},
            "config": saved_cfg,
            "generation_config": gen,
            "save_pretrained_files": files,
            "save_pretrained_tensor_names": sorted(saved_names),
            "bf16_reload_info": {k: sorted(map(str, v)) for k, v in info.items() if v},
        }
        path = os.path.join(outdir, f"hf-keys-{name}.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
        kept = sorted(k for k, v in out["state_dict"].items() if v["bf16_dtype"] == "F32")
        print(f"{name}: {len(sd32)} state-dict tensors, config keys {len(saved_cfg)}, "
              f"save_pretrained writes {len(saved_names)} tensors (e.g. {sorted(saved_names)[:3]}), "
              f"{len(kept)} kept fp32 in bf16 -> {path}", flush=True)


def load_strict(d, dtype):
    model, info = DeepseekV4ForCausalLM.from_pretrained(d, dtype=dtype, output_loading_info=True)
    shown = {k: v for k, v in info.items() if v}
    print(f"  from_pretrained({d}, dtype={dtype}) loading info: {shown or 'no missing, unexpected or mismatched keys'}",
          flush=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    assert not bad, bad
    return eager(model).eval()


def file_dtypes(d):
    out = {}
    for fn in os.listdir(d):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(d, fn), "pt") as f:
                for k in f.keys():
                    out[k] = DT[f.get_tensor(k).dtype]
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(pairs):
    worst, failed = {}, []
    for pair in pairs:
        exp, orig = pair.split("=", 1)
        print(f"== {exp} (source {orig})", flush=True)
        try:
            check_one(exp, orig, worst)
        except Exception as ex:  # report and go on with the next directory
            import traceback
            traceback.print_exc()
            print(f"  FAIL {exp}: {ex!r}", flush=True)
            failed.append(exp)
    print("SUMMARY", json.dumps(worst), "failed:", failed, flush=True)
    return 1 if failed else 0


def check_one(exp, orig, worst):
    with open(os.path.join(exp, "config.json")) as f:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[json.load(f)["dtype"]]
    model = load_strict(exp, dtype)
    ref = load_strict(orig, torch.float32)
    # the same architecture from HF's config keys as from the release keys
    for k in ("layer_types", "mlp_layer_types", "rope_parameters", "qk_rope_head_dim", "partial_rotary_factor",
              "compress_rates", "num_hidden_layers", "hidden_size", "vocab_size", "hc_mult", "sliding_window",
              "index_topk", "swiglu_limit", "routed_scaling_factor", "rms_norm_eps", "hc_eps"):
        a, b = getattr(model.config, k), getattr(ref.config, k)
        if isinstance(a, dict):
            a = {kk: {x: y for x, y in vv.items() if x != "type"} if isinstance(vv, dict) else vv for kk, vv in a.items()}
            b = {kk: {x: y for x, y in vv.items() if x != "type"} if isinstance(vv, dict) else vv for kk, vv in b.items()}
        assert a == b, (k, a, b)
    da, db = model.config.to_dict(), ref.config.to_dict()
    diff = {k: (da.get(k), db.get(k)) for k in set(da) | set(db) if da.get(k) != db.get(k)}
    print(f"  config.to_dict() differences from HF's read of the release keys: {diff}", flush=True)
    # no cast on load: each tensor in the file has the dtype HF's model holds it in
    fd, sd = file_dtypes(exp), model.state_dict()
    assert set(fd) == set(sd), (sorted(set(fd) ^ set(sd)))[:10]
    casts = [k for k in sd if DT[sd[k].dtype] != fd[k]]
    assert not casts, [(k, fd[k], sd[k].dtype) for k in casts[:5]]
    # tensor for tensor the model HF builds from the release names (cast as HF casts it)
    rsd = {k: v.to(sd[k].dtype) for k, v in ref.state_dict().items()}  # HF keeps some modules fp32 in bf16
    diff = [k for k in sd if not torch.equal(sd[k], rsd[k])]
    assert not diff, diff[:5]
    print(f"  {len(sd)} tensors equal HF's own load of the source (dtype {dtype}); "
          f"{sum(1 for k in sd if sd[k].dtype == torch.float32)} F32", flush=True)
    inp = os.path.join(orig, "input.json")
    if os.path.exists(inp):
        with open(inp) as f:
            ids = torch.tensor(json.load(f)["input_ids"])
        want = load_file(os.path.join(orig, "expected.safetensors"))["logits"]
    else:
        ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            want = eager(copy.deepcopy(ref).double())(ids).logits
    with torch.no_grad():
        got = model(ids).logits
        refl = ref(ids).logits if dtype == torch.float32 else None
    r = rel(got, want)
    mx = (got.double() - want.double()).abs().max().item()
    print(f"  logits ({dtype}) against {'HF float64 goldens' if os.path.exists(inp) else 'HF float64 of the source'}:"
          f" rel {r:.3e}, max |diff| {mx:.3e} (max |logit| {want.abs().max().item():.2f})", flush=True)
    if dtype == torch.float32:
        assert torch.equal(got, refl), "the export's logits differ from HF's load of the source"
        print("  float32 logits bit-identical to HF's load of the source", flush=True)
        assert r < 1e-5, r
        with torch.no_grad():
            g64 = eager(copy.deepcopy(model).double())(ids).logits
            s64 = eager(copy.deepcopy(ref).double())(ids).logits
        # the export in float64 against the source in float64: the same values, the same logits (the
        # goldens are not HF float64 of the fp32 file: 2.5e-8 from it on an H100, 2026-12-08)
        r64, m64 = rel(g64, s64), (g64 - s64).abs().max().item()
        print(f"  logits (float64) against the source's in float64: rel {r64:.3e}, max |diff| {m64:.3e}; "
              f"against the goldens rel {rel(g64, want):.3e}", flush=True)
        assert r64 < 1e-12, r64
        worst[exp] = (r, mx, r64, m64)
    else:
        assert r < 3e-2, r  # bf16 weights and activations: a loose sanity bound
        worst[exp] = (r, mx)


if __name__ == "__main__":
    torch.set_num_threads(8)
    if len(sys.argv) < 3 or sys.argv[1] not in ("keys", "check"):
        sys.exit(__doc__)
    if sys.argv[1] == "keys":
        keys(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(check(sys.argv[2:]))
