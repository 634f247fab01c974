#!/usr/bin/env python3
"""Writes the hand-made seeds of the fuzz corpora (tests/fuzz/corpus/<target>/seed-*) and the small
tokenizer fuzz_tokenize uses when tests/data/bpe-tiny is absent (tests/fuzz/data/tok/).
Standard library only; run from anywhere: python3 tests/fuzz/make_seeds.py
Seeds taken as they are from tests/data and configs/ are copied too, so the corpora stand alone.
Files other than seed-* (libFuzzer's additions merged in, crash-* regression cases) are left alone.
corpus/wire/seed-* are not made here: wire_builder (common/wire.c) made them, laid out as
fuzz_wire.c reads its input (a generate request with three frames, a ping, a result, weights)."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SEP = b"\n=====\n"  # fuzz_common.h's FUZZ_SEP

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def copy(target, name, path):
    with open(os.path.join(ROOT, path), "rb") as f:
        put(target, name, f.read())


# ---- safetensors

def st_file(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes)] laid out in order."""
    hdr, data = {}, b""
    if metadata is not None:
        hdr["__metadata__"] = metadata
    for name, dt, shape, raw in tensors:
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    f32 = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    put("safetensors", "small", st_file([("embed.weight", "F32", [2, 3], f32), ("head.weight", "BF16", [4], b"\x80\x3f" * 4),
                                         ("step", "I64", [], struct.pack("<q", 7))], {"format": "pt", "mill": "1"}))
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E8M0": 1, "I64": 8, "I32": 4, "U8": 1, "U16": 2, "I8": 1}
    put("safetensors", "dtypes", st_file([(f"layers.0.t_{dt.lower()}", dt, [2, 2], bytes(range(4 * n)))
                                          for dt, n in sizes.items()] + [("empty", "F32", [0, 5], b"")]))
    put("safetensors", "release-names", st_file([
        ("layers.0.attn.wq_a.weight", "F8_E4M3", [4, 8], bytes(32)),
        ("layers.0.attn.wq_a.scale", "F8_E8M0", [1, 1], b"\x7f"),
        ("layers.0.ffn.experts.0.w1.weight", "I8", [4, 4], bytes(16)),
        ("layers.0.hc_attn_fn", "F32", [2], bytes(8))]))
    index = {"metadata": {"total_size": 40}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors",
                                                            "c": "s1.safetensors"}}
    s1 = st_file([("a", "F32", [2], bytes(8)), ("c", "U8", [3], b"xyz")], {"format": "pt"})
    s2 = st_file([("b", "I32", [1, 2], bytes(8))])
    put("safetensors", "sharded", json.dumps(index).encode() + SEP + s1 + SEP + s2)


# ---- the tokenizer

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


CRLF = "\r\n"
DS_WORD_RE = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^""" + CRLF + r"""\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
              r"""| ?[\p{P}\p{S}]+[""" + CRLF + r"""]*|\s*[""" + CRLF + r"""]+|\s+(?!\S)|\s+""")


def split(pattern, behavior="Isolated", literal=False, invert=False):
    return {"type": "Split", "pattern": {"String" if literal else "Regex": pattern}, "behavior": behavior, "invert": invert}


def tokenizer(merges_as_lists=False, normalizer=None, byte_fallback=False, extra_pretok=(), post=True):
    b2u = bytes_to_unicode()
    vocab = {BOS: 0, EOS: 1, PAD: 2}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    sp = b2u[ord(" ")]
    pairs = [(sp, "t"), ("h", "e"), (sp + "t", "he"), ("i", "n"), (sp, "a"), ("e", "r"), ("o", "n"), (sp, "w"),
             ("o", "r"), (sp + "w", "or"), ("l", "d"), (sp + "wor", "ld"), ("1", "2"), ("12", "3"), ("ä", "½")]
    merges = []
    for a, c in pairs:
        vocab.setdefault(a + c, len(vocab))
        merges.append([a, c] if merges_as_lists else f"{a} {c}")
    if byte_fallback:
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
    added = [(BOS, 0, True), (EOS, 1, True), (PAD, 2, True)]
    for s in ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜latest_reminder｜>"]:
        added.append((s, len(vocab) + len(added) - 3, s == "<｜latest_reminder｜>"))
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": not special, "special": special} for s, i, special in added],
        "normalizer": normalizer if normalizer is not None else {"type": "Sequence", "normalizers": []},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": list(extra_pretok) + [
            split(r"\p{N}{1,3}"), split("[一-龥぀-ゟ゠-ヿ]+"), split(DS_WORD_RE),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                                                                    {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [], "special_tokens": {BOS: {"id": BOS, "ids": [0], "tokens": [BOS]}}}
        if post else None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": byte_fallback,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    return json.dumps(tok, ensure_ascii=False, indent=1).encode()


TOK_CONFIG = json.dumps({"bos_token": {"content": BOS}, "eos_token": EOS, "pad_token": {"content": PAD},
                         "add_bos_token": True}, ensure_ascii=False).encode()


def tokenizer_seeds():
    d = os.path.join(HERE, "data", "tok")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "tokenizer.json"), "wb") as f:
        f.write(tokenizer())
    with open(os.path.join(d, "tokenizer_config.json"), "wb") as f:
        f.write(TOK_CONFIG)
    put("tokenizer", "ds-layout", tokenizer() + SEP + TOK_CONFIG)
    put("tokenizer", "no-config", tokenizer(merges_as_lists=True, post=False))
    put("tokenizer", "normalizers", tokenizer(normalizer={"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}, {"type": "Prepend", "prepend": "▁"},
        {"type": "Lowercase"}, {"type": "Strip", "strip_left": True, "strip_right": False}]}, byte_fallback=True)
        + SEP + TOK_CONFIG)
    bpe_tiny_seeds()
    put("tokenizer", "split-behaviors", tokenizer(extra_pretok=[
        split(",", "Removed", literal=True), split("x+", "MergedWithPrevious"), split(r"\d", "MergedWithNext", invert=True),
        split("ab", "Contiguous")]))
    # the encode/decode target: text, ids as int32, and `mill tokenize` lines
    put("tokenize", "text", "Hello world, the 12345 words!\n你好世界 <think>x</think> caf\u00e9")
    put("tokenize", "bad-utf8", b"ab\xff\xfe\xc3(\xed\xa0\x80 end")
    put("tokenize", "ids", struct.pack("<8i", 0, 3, 100, 259, 260, 1, -1, 1 << 20))
    put("tokenize", "line-text", '{"text": "Hello <｜User｜> world", "add_special_tokens": false}')
    put("tokenize", "line-ids", '{"ids": [0, 72, 101, 259, 1], "skip_special_tokens": true}')
    put("tokenize", "line-chat", json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "2+2?"}],
                                             "add_generation_prompt": True, "thinking_mode": "thinking",
                                             "reasoning_effort": "max", "drop_thinking": False}, ensure_ascii=False))


def patched(tok, patch):
    """A goldens.jsonl variant: dotted keys replaced (make_tokenizer_goldens.py's "patch")."""
    tok = json.loads(json.dumps(tok))
    for key, val in patch.items():
        node, parts = tok, key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = val
    return tok


def bpe_tiny_seeds():
    """tests/data/bpe-tiny (DeepSeek's layout, HF-trained) and its goldens' variants, on a trimmed
    copy: the first 600 ids and the merges among them, the added tokens renumbered as HF does."""
    d = os.path.join(ROOT, "tests/data/bpe-tiny")
    if not os.path.exists(os.path.join(d, "tokenizer.json")):
        return
    with open(os.path.join(d, "tokenizer.json"), "rb") as f:
        whole = f.read()
    with open(os.path.join(d, "tokenizer_config.json"), "rb") as f:
        cfg = f.read()
    # not the whole file (184 KB) as a seed: libFuzzer would then grow inputs to that size, 10x slower
    tok = json.loads(whole)
    keep = 600
    vocab = {k: i for k, i in tok["model"]["vocab"].items() if i < keep}
    merges = []
    for m in tok["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    tok["model"]["vocab"], tok["model"]["merges"] = vocab, merges
    nxt = len(vocab)
    for t in tok["added_tokens"]:
        if t["content"] in vocab:
            t["id"] = vocab[t["content"]]
        else:
            t["id"], nxt = nxt, nxt + 1
    with open(os.path.join(d, "goldens.jsonl")) as f:
        variants = [json.loads(line) for line in f if line.startswith('{"variant"')]
    for v in variants:
        text = json.dumps(patched(tok, v["patch"]), ensure_ascii=False).encode()
        put("tokenizer", f"bpe-tiny-{v['name']}", text + (SEP + cfg if v["variant"] % 2 == 0 else b""))


# ---- chat messages and datasets

CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello.", "reasoning_content": "greet back"}, {"role": "user", "content": "Sum 2+3"},
     {"role": "user", "content": "and 4+4"}],
    [{"role": "developer", "content": "Rules"}, {"role": "user", "content": "Q"},
     {"role": "latest_reminder", "content": "be exact"}, {"role": "assistant", "content": "A", "wo_eos": True}],
    [{"role": "user", "content": "x", "tools": []}, {"role": "assistant", "content": None, "reasoning_content": None}],
]


def chat_seeds():
    for i, m in enumerate(CHATS):
        put("chat", f"messages{i}", json.dumps(m, ensure_ascii=False))
    put("chat", "tool-role", json.dumps([{"role": "tool", "content": "x"}]))


def put_cfg(target, name, data, k):
    """fuzz_dataset picks its configuration by the input's size mod 4: blank lines pad to k."""
    if isinstance(data, str):
        data = data.encode()
    put(target, name, data + b"\n" * ((k - len(data)) % 4))


def dataset_seeds():
    with open(os.path.join(ROOT, "tests/data/math-sample.jsonl"), "rb") as f:
        math = f.read()
    put_cfg("dataset", "math-sample-dapo", math, 1)
    put_cfg("dataset", "math-sample-chat", math, 2)
    rows = [{"prompt": [{"role": "user", "content": "What is 6*7?"}], "reward_model": {"ground_truth": "42"}},
            {"prompt": "Plain prompt", "label": 0.5, "reward_model": {"ground_truth": 34.0}},
            {"prompt": CHATS[1], "reward_model": {"ground_truth": "\\frac{3}{4}"}, "extra": {"question": "Why?"}},
            {"extra": {"question": [{"role": "user", "content": "nested key"}]}, "label": "7"}]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    for k in range(4):
        put_cfg("dataset", f"chat-rows-{k}", text + "\n   \n" + '{"prompt": ""}\n[1, 2]\nnot json\n', k)


# ---- recipes, configs, rewards, hub

def recipe_seeds():
    for p in ["configs/runs/grpo-arith-demo.yaml", "configs/runs/grpo-math-dapo.yaml", "configs/runs/sft-arith-tiny.yaml",
              "tests/data/grpo-smoke.yaml", "tests/data/bad-recipe.yaml", "tests/data/sft-dist.yaml"]:
        copy("recipe", os.path.basename(p)[:-5], p)
    with open(os.path.join(ROOT, "tests/data/grpo-smoke.yaml"), "rb") as f:
        smoke = f.read()
    put("recipe", "overrides", smoke + SEP + b"rollout.temperature=0.5\ntrain.parallel.dp=2\ndata.levels=[1, 2]\n"
        b"algorithm.kl_type=k2\nname=fuzzed")
    put("recipe", "as-recorded", json.dumps({
        "name": "r", "model": {"init_from": "tests/data/tiny-a"}, "train": {"steps": 2, "parallel": {"dp": 1}},
        "rollout": {"layout": "disaggregated", "engines": 2, "async": True, "addresses": None},
        "algorithm": {"loss_agg_mode": "seq-mean-token-sum-norm", "policy_loss": "gspo", "clip_ratio_c": 3},
        "data": {"kind": "jsonl", "path": "x.jsonl", "chat": "none"}, "reward": {"kind": "remote",
                                                                                  "url": "http://127.0.0.1:9/s"}},
        indent=1))
    put("recipe", "yaml-features", "a: {b: [1, 2.5, -3e4, .inf, ~, true, 'q', \"\\u00e9\"]}\nc: !!str 12\nd: |\n  block\n"
        "e: >-\n  folded\n? f\n: [g, {h: i}]\n")
    put("recipe", "yaml-alias", "a: &x {b: 1}\nc: *x\n---\nsecond: doc\n")


def config_seeds():
    for name, p in [("dsv4-tiny", "configs/models/dsv4-tiny.json"), ("dsv4-small", "configs/models/dsv4-small.json"),
                    ("tiny-a", "tests/data/tiny-a/config.json"), ("tiny-b", "tests/data/tiny-b/config.json"),
                    ("tiny-arith", "configs/models/dsv4-tiny-arith/config.json")]:
        copy("config", name, p)
    with open(os.path.join(ROOT, "configs/models/dsv4-tiny.json")) as f:
        c = json.load(f)
    c.update(bos_token_id=[256, 3], eos_token_id=None, scoring_func="sigmoid",
             rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 256})
    put("config", "variant", json.dumps(c))


def reward_seeds():
    copy("reward", "cases", "tests/data/reward-cases.jsonl")
    rows = [{"response": "so \\boxed{\\frac{1}{2}}", "label": 0.5},
            {"response": "Answer: 1,000,000 dollars", "label": "1000000", "prompt": "p"},
            {"response": "\\boxed{x=\\dfrac12}", "label": "\\boxed{1/2}"},
            {"response": "\\fbox{12 square feet} and \\boxed 5", "label": 5}]
    put("reward", "rows-and-reply", "\n".join(json.dumps(r) for r in rows).encode() + SEP +
        b'{"rewards": [1, 0.5, -2]}')


def hub_seeds():
    listing = {"sha": "0123456789abcdef0123456789abcdef01234567", "siblings": [
        {"rfilename": "config.json", "size": 1215, "blobId": "89abcdef0123456789abcdef0123456789abcdef"},
        {"rfilename": "model.safetensors", "size": 2542236, "blobId": "0123456789abcdef0123456789abcdef01234567",
         "lfs": {"sha256": "ab" * 32, "size": 2542236, "pointerSize": 135}},
        {"rfilename": "sub/dir/tokenizer.json", "size": 0}]}
    headers = ("HTTP/1.1 206 Partial Content\r\nContent-Length: 100\r\nContent-Range: bytes 100-199/2542236\r\n"
               "ETag: W/\"abc\"\r\nX-Linked-Size: 2542236\r\nX-Linked-Etag: \"" + "ab" * 32 + "\"\r\n"
               "X-Error-Code: GatedRepo\r\nX-Error-Message: Access to model is restricted\r\nRetry-After: 3\r\n\r\n")
    put("hub", "listing", json.dumps(listing))
    put("hub", "listing-headers-body", json.dumps(listing).encode() + SEP + headers.encode() + SEP +
        b"<html>503 Service Unavailable</html>")
    put("hub", "redirect", b"{}" + SEP + b"HTTP/1.1 302 Found\r\nLocation: https://cdn/x\r\nContent-Range: bytes 5-9/*\r\n")


if __name__ == "__main__":
    safetensors_seeds()
    tokenizer_seeds()
    chat_seeds()
    dataset_seeds()
    recipe_seeds()
    config_seeds()
    reward_seeds()
    hub_seeds()
    print("seeds written under", os.path.join(HERE, "corpus"))
