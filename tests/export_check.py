#!/usr/bin/env python3
"""tests/export_check.py — one `mill export` directory against its source and HF's own lists (stdlib
only: the CPU test machine has no torch). Used by tests/export_cli.sh.

    export_check.py EXPORT SOURCE KEYS.json [--max-shard BYTES] [--copied FILE...]

- names, shapes and dtypes are those of DeepseekV4ForCausalLM.state_dict() in KEYS.json (written by
  tests/reference/check_export.py on the GPU machine with transformers 5.17; the bf16 dtypes are HF's
  after from_pretrained(dtype=bfloat16), where _keep_in_fp32_modules_strict keeps some fp32);
- config.json holds every key of DeepseekV4Config.save_pretrained's config.json with its value, and
  no other; generation_config.json likewise (or is the source's, copied byte for byte);
- every value is the source's: bit for bit in F32 and I64, round to nearest even in BF16 (HF names
  back to release names through make_goldens.py's table, which HF itself checked; not mill's);
- sharded: the index's weight_map and total_size describe the files, each file within BYTES unless
  it holds one tensor alone;
- every source tensor is in the export, except mtp.* (HF drops it).
Prints one line per finding and exits 1 on any.
"""
import json
import os
import re
import struct
import sys
from array import array

# HF name -> release name: make_goldens.py's table (HF made the goldens through it), not a copy
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference"))
from hf_keys_derived import goldens_table  # noqa: E402

TOP, LAYER = goldens_table()
SIZE = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4}
bad = []


def fail(msg):
    bad.append(msg)
    print("  FAIL", msg)


def read_file(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        data = f.read()
    head.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in head.items()}


def read_dir(d):
    """{name: (dtype, shape, bytes)}, {name: file}"""
    idx = os.path.join(d, "model.safetensors.index.json")
    if not os.path.exists(idx):
        t = read_file(os.path.join(d, "model.safetensors"))
        return t, {k: "model.safetensors" for k in t}
    with open(idx) as f:
        wm = json.load(f)["weight_map"]
    out, where = {}, {}
    for fn in sorted(set(wm.values())):
        t = read_file(os.path.join(d, fn))
        out.update(t)
        where.update({k: fn for k in t})
    return out, where


def as_f32_words(dtype, raw):
    """The source tensor's values as fp32 bit patterns."""
    if dtype == "F32":
        return array("I", raw)
    if dtype == "BF16":
        return array("I", (h << 16 for h in array("H", raw)))
    raise ValueError(f"source dtype {dtype}")


def bf16_rne(words):
    out = array("H")
    for u in words:
        if (u & 0x7FFFFFFF) > 0x7F800000:
            out.append((u >> 16) | 0x40)
        else:
            out.append(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)
    return out


def sources(hf, n_experts):
    short = hf[len("model."):] if hf.startswith("model.") else hf
    if short in TOP:
        return [TOP[short]]
    m = re.match(r"model\.layers\.(\d+)\.(.*)$", hf)
    if not m:
        return None
    L, rest = m.group(1), m.group(2)
    if rest == "mlp.experts.gate_up_proj":
        return [f"layers.{L}.ffn.experts.{e}.w{w}.weight" for e in range(n_experts) for w in (1, 3)]
    if rest == "mlp.experts.down_proj":
        return [f"layers.{L}.ffn.experts.{e}.w2.weight" for e in range(n_experts)]
    return [f"layers.{L}." + LAYER[rest]] if rest in LAYER else None


def same_json(a, b, where):
    """a (the export's) against b (HF's): numbers by value (HF passes a release config's integer betas
    through where mill writes floats, as HF's YaRN check asks); "type" inside rope_parameters is the
    release's legacy spelling of rope_type, which HF carries along from a release config."""
    if isinstance(a, dict) and isinstance(b, dict):
        if ".rope_parameters." in where + ".":
            b = {k: v for k, v in b.items() if k != "type"}
        for k in sorted(set(a) | set(b)):
            if k not in a:
                fail(f"{where}: key {k} missing (HF writes {b[k]!r})")
            elif k not in b:
                fail(f"{where}: key {k} = {a[k]!r} is not one HF writes")
            else:
                same_json(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            same_json(x, y, f"{where}[{i}]")
    elif isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        if a != b or type(a) is not type(b):
            fail(f"{where}: {a!r}, HF writes {b!r}")
    elif a != b:
        fail(f"{where}: {a!r}, HF writes {b!r}")


def main():
    args = sys.argv[1:]
    exp, src, keys_path = args[:3]
    max_shard = int(args[args.index("--max-shard") + 1]) if "--max-shard" in args else None
    copied = args[args.index("--copied") + 1:] if "--copied" in args else []
    with open(keys_path) as f:
        keys = json.load(f)
    with open(os.path.join(exp, "config.json")) as f:
        cfg = json.load(f)
    bf16 = cfg.get("dtype") == "bfloat16"
    out, where = read_dir(exp)
    srct, _ = read_dir(src)
    hf = keys["state_dict"]
    # names, shapes, dtypes
    for k in sorted(set(hf) | set(out)):
        if k not in out:
            fail(f"{k}: in HF's state dict, not in the export")
        elif k not in hf:
            fail(f"{k}: in the export, not in HF's state dict")
        else:
            want = hf[k]["bf16_dtype" if bf16 else "dtype"]
            if out[k][1] != hf[k]["shape"] or out[k][0] != want:
                fail(f"{k}: {out[k][0]} {out[k][1]}, HF holds {want} {hf[k]['shape']}")
    # config.json and generation_config.json as HF writes them (its version stamp aside)
    want_cfg = {k: v for k, v in keys["config"].items() if k != "transformers_version"}
    want_cfg["dtype"] = "bfloat16" if bf16 else "float32"  # the export's own dtype, in HF's key
    same_json(cfg, want_cfg, "config.json")
    with open(os.path.join(exp, "generation_config.json"), "rb") as f:
        gen_raw = f.read()
    if "generation_config.json" in copied:
        with open(os.path.join(src, "generation_config.json"), "rb") as f:
            if f.read() != gen_raw:
                fail("generation_config.json: not the source's copy")
    else:
        same_json(json.loads(gen_raw), {k: v for k, v in keys["generation_config"].items() if k != "transformers_version"},
                  "generation_config.json")
    for c in copied:
        with open(os.path.join(src, c), "rb") as a, open(os.path.join(exp, c), "rb") as b:
            if a.read() != b.read():
                fail(f"{c}: not copied byte for byte")
    # values
    used = set()
    E = cfg["n_routed_experts"]
    nval = 0
    for k, (dt, shape, raw) in sorted(out.items()):
        names = sources(k, E)
        if names is None or any(n not in srct for n in names):
            fail(f"{k}: no source tensor(s) {names}")
            continue
        used.update(names)
        if dt == "I64":
            if raw != b"".join(srct[n][2] for n in names) or any(srct[n][0] != "I64" for n in names):
                fail(f"{k}: I64 values differ from the source's")
            continue
        words = array("I")
        for n in names:
            words.extend(as_f32_words(srct[n][0], srct[n][2]))
        want = words.tobytes() if dt == "F32" else bf16_rne(words).tobytes()
        if raw != want:
            fail(f"{k}: {dt} values differ from the source's ({'bit for bit' if dt == 'F32' else 'rounded to nearest even'})")
        nval += len(words)
    left = sorted(n for n in srct if n not in used and not n.startswith("mtp."))
    if left:
        fail(f"source tensors missing from the export: {left[:5]}")
    # files
    idx = os.path.join(exp, "model.safetensors.index.json")
    files = sorted(f for f in os.listdir(exp) if f.endswith(".safetensors"))
    if os.path.exists(idx):
        with open(idx) as f:
            index = json.load(f)
        total = sum(len(v[2]) for v in out.values())
        if index["metadata"]["total_size"] != total:
            fail(f"index total_size {index['metadata']['total_size']}, the tensors hold {total} bytes")
        if index["weight_map"] != where:
            fail("index weight_map does not say where each tensor is")
        n = len(files)
        if files != [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]:
            fail(f"shard files {files}")
        for fn in files:
            held = [k for k, v in where.items() if v == fn]
            size = sum(len(out[k][2]) for k in held)
            if max_shard and size > max_shard and len(held) > 1:
                fail(f"{fn}: {size} bytes in {len(held)} tensors, over --max-shard-size {max_shard}")
    elif files != ["model.safetensors"]:
        fail(f"files {files} without an index")
    print(f"  {len(out)} tensors ({nval} float values) in {len(files)} file(s), {'bf16' if bf16 else 'fp32'}; "
          f"{sum(1 for n in srct if n.startswith('mtp.'))} mtp.* dropped; config.json {len(cfg)} keys")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
