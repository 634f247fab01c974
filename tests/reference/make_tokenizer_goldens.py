#!/usr/bin/env python3
"""Goldens for mill's tokenizer.json byte-level BPE (common/bpe.c), made with HF `tokenizers`.

Builds a small byte-level BPE with DeepSeek-V3/V4's exact normalizer, pre-tokenizer, decoder and
post-processor (as their tokenizer.json ships them) and DeepSeek's added tokens, trained on a
multi-script corpus this script generates (no download), then writes into OUT (default
tests/data/bpe-tiny/):

  tokenizer.json, tokenizer_config.json   the tokenizer (DeepSeek's layout: bos/eos/pad are ids 0-2)
  goldens.jsonl                           one case per line:
    {"variant": k, "name": ..., "patch": {...}}     a variant: tokenizer.json with these dotted
                                                    keys replaced (k = 0 is the file itself)
    {"v": k, "in": b64, "ids": [...], "ids_sp": [...] or null, "plain": bool}
        HF encode(bytes.decode("utf-8", "replace"), add_special_tokens=False / True); ids_sp null:
        [0] + ids (the bos of DeepSeek's template); plain: the text holds no added token, so mill's
        tokenizer_encode must give "ids" too
    {"v": k, "dec": [...], "text": b64, "text_skip": b64}
        HF decode(ids, skip_special_tokens=False / True) as UTF-8

HF is the `tokenizers` Python package when it imports (the GPU machine has 0.23.2); otherwise the
same Rust library through its Node binding, the npm package `tokenizers` (0.23.2 ships prebuilt
linux-x64 binaries): `npm install --prefix /tmp/hf tokenizers@0.23.2`, then --node-tokenizers
/tmp/hf/node_modules/tokenizers (or MILL_NODE_TOKENIZERS). The Python package trains with
BpeTrainer(vocab_size); the Node binding exposes only the default trainer, so there the vocabulary
is the first merges of a default training, cut to the size asked.

  python3 tests/reference/make_tokenizer_goldens.py [--out DIR] [--node-tokenizers DIR]
  python3 tests/reference/make_tokenizer_goldens.py --bench-corpus FILE [--mb 30] [--english]
        (NUL-separated documents of the same generator, or plain English prose only, for
        tests/bench/tokenizer_speed.sh)
  python3 tests/reference/make_tokenizer_goldens.py --hf-bench CORPUS TOKENIZER_DIR   (HF's speed on
        it, and its ids' token count and CRC-32, for tests/bench/tokenizer_speed.sh)
"""
import argparse
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zlib

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"

# DeepSeek-V3's pre-tokenizer (V4 ships the same): digits in threes, CJK runs, then the word regex.
CRLF = "\r\n"
DS_WORD_RE = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^""" + CRLF + r"""\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
              r"""| ?[\p{P}\p{S}]+[""" + CRLF + r"""]*|\s*[""" + CRLF + r"""]+|\s+(?!\S)|\s+""")


def split(pattern, behavior="Isolated", invert=False, literal=False):
    return {"type": "Split", "pattern": {"String" if literal else "Regex": pattern}, "behavior": behavior, "invert": invert}


def bytelevel(add_prefix_space=False, use_regex=False):
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": use_regex}


DS_PRETOK = {"type": "Sequence", "pretokenizers": [
    split(r"\p{N}{1,3}"), split("[一-龥぀-ゟ゠-ヿ]+"), split(DS_WORD_RE), bytelevel()]}
DS_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}


def template(single, specials):
    return {"type": "TemplateProcessing", "single": single,
            "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {k: {"id": k, "ids": v, "tokens": [k] * len(v)} for k, v in specials.items()}}


def sp(name, type_id=0):
    return {"SpecialToken": {"id": name, "type_id": type_id}}


SEQ_A = {"Sequence": {"id": "A", "type_id": 0}}
DS_POST = template([sp(BOS), SEQ_A], {BOS: [0]})

# DeepSeek-V4's added tokens (after the vocabulary, as in the release; the flags follow V3's file:
# role and tool markers are not special), then test-only ones for HF's lstrip / rstrip / single_word
# matching. (content, special, normalized, lstrip, rstrip, single_word)
ADDED = [(f"<｜place▁holder▁no▁{i}｜>", True, False, False, False, False) for i in range(4)] + [
    ("<｜fim▁hole｜>", False, True, False, False, False),
    ("<｜fim▁begin｜>", False, True, False, False, False),
    ("<｜fim▁end｜>", False, True, False, False, False),
    ("<｜User｜>", False, True, False, False, False),
    ("<｜Assistant｜>", False, True, False, False, False),
    ("<|EOT|>", True, False, False, False, False),
    ("<｜tool▁calls▁begin｜>", False, True, False, False, False),
    ("<｜tool▁calls▁end｜>", False, True, False, False, False),
    ("<｜tool▁call▁begin｜>", False, True, False, False, False),
    ("<｜tool▁call▁end｜>", False, True, False, False, False),
    ("<｜tool▁outputs▁begin｜>", False, True, False, False, False),
    ("<｜tool▁outputs▁end｜>", False, True, False, False, False),
    ("<｜tool▁output▁begin｜>", False, True, False, False, False),
    ("<｜tool▁output▁end｜>", False, True, False, False, False),
    ("<｜tool▁sep｜>", False, True, False, False, False),
    ("<think>", False, True, False, False, False),
    ("</think>", False, True, False, False, False),
    ("<｜System｜>", False, True, False, False, False),
    ("<｜latest_reminder｜>", True, False, False, False, False),
    ("<｜deepseek_image｜>", True, False, False, False, False),
    ("｜DSML｜", False, True, False, False, False),
    ("<｜action｜>", True, False, False, False, False),
    ("<｜query｜>", True, False, False, False, False),
    ("<｜authority｜>", True, False, False, False, False),
    ("<｜domain｜>", True, False, False, False, False),
    ("<｜title｜>", True, False, False, False, False),
    ("<｜read_url｜>", True, False, False, False, False),
    # test-only, in strings no text holds by chance (DeepSeek's own tokens keep DeepSeek's behavior)
    ("<test_lstrip>", True, False, True, False, False),
    ("<test_rstrip>", False, False, False, True, False),
    ("<test_both>", True, False, True, True, False),
    ("xyzzy", False, True, False, False, True),   # single_word
    ("=~=", False, False, False, False, True),    # single_word, not normalized
    ("<test_no", False, False, False, False, False),  # raw: found before the normalized <test_norm>
    ("<test_norm>", False, True, False, False, False),
    ("qzq", False, True, False, False, False),    # inside words
]

# ------------------------------------------------------------------ the corpus

EN = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
      "but not what all were we when your can said there use an each which she do how their if will up other about out "
      "many then them these so some her would make like him into time has look two more write go see number no way could "
      "people my than first water been call who oil its now find long down day did get come made may part over new sound "
      "take only little work know place year live me back give most very after thing our just name good sentence man think "
      "say great where help through much before line right too mean old any same tell boy follow came want show also around "
      "form three small set put end does another well large must big even such because turn here why ask went men read need "
      "land different home us move try kind hand picture again change off play spell air away animal house point page letter "
      "mother answer found study still learn should America world tokenizer model training gradient reward policy sample "
      "DeepSeek mixture experts attention layer tensor kernel").split()
LATIN = ("Straße Größe Übermäßig schön Mädchen fünf café naïve façade œuvre élève crème brûlée Noël año niño "
         "¿Qué ¡Hola! mañana corazón São João ação Łódź żółć źdźbło Kraków İstanbul ılık şeker ğüz Việt Nam tiếng "
         "Nguyễn phở đường hạnh phúc Ærø Øresund Århus þorn ðæt fjörður").split()
CYR = "Привет мир как дела Москва Санкт-Петербург ёжик щука объявление подъезд Україна їжак ґанок Беларусь".split()
GREEK = "Καλημέρα κόσμε Ελλάδα ψυχή αλφάβητο ΑΒΓΔ ωμέγα φιλοσοφία ἀρχή ὕδωρ".split()
ARABIC = "مرحبا بالعالم السلام عليكم كتاب مَكْتَبَةٌ العربية اللغة مدرسة شُكْرًا".split()
HEBREW = "שלום עולם ספר תּוֹרָה ירושלים אהבה מִשְׁפָּט".split()
DEVA = "नमस्ते दुनिया हिन्दी भाषा विद्यालय क्षत्रिय संस्कृतम् प्रेम".split()
THAI = ["สวัสดีครับ", "ภาษาไทย", "ประเทศไทย", "ขอบคุณมาก", "กรุงเทพมหานคร"]
ZH = ["你好世界", "中华人民共和国", "机器学习是人工智能的一个分支", "今天天气很好", "我们一起学习吧", "深度求索",
      "大规模语言模型", "这是一个测试", "數據結構與算法", "龍龜鬱"]
JA = ["こんにちは世界", "東京タワー", "ひらがなとカタカナ", "日本語の文章です", "コンピューター", "ありがとうございます",
      "ｶﾀｶﾅ半角", "ゐゑヴ"]
KO = "안녕하세요 세계 한국어 대한민국 서울특별시 감사합니다 컴퓨터".split()
EMOJI = ["😀", "🎉", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🇺🇸", "🇯🇵", "🏳️\u200d🌈", "1️⃣", "❤️", "🤖", "🧑🏿\u200d💻",
         "✨", "🔥", "🙂", "🫠"]
SYMBOLS = ["∑", "∫", "√", "≈", "≠", "≤", "≥", "$", "€", "£", "¥", "₹", "→", "⇒", "─", "│", "。", "、", "「", "」",
           "『", "』", "【", "】", "！", "？", "（", "）", "–", "—", "…", "“", "”", "‘", "’", "«", "»", "•", "©",
           "®", "™", "°", "§", "¶", "†", "‰", "¬", "¦", "^", "`", "~", "|", "\\", "@", "#", "%", "&", "*", "_"]
SPACES = [" ", "  ", "   ", "\t", "\t\t", " \t ", "\n", "\n\n", "\r\n", "\r\n\r\n", "\r", "\x0b", "\x0c",
          "\u00a0", "\u3000", "\u2028", "\u2029", "\u0085", "\u200b", "\ufeff", "\u2003", "\u202f", "   \n", " \n ",
          "\n    ", "\n\t"]
COMBINING = ["e\u0301", "a\u0308", "n\u0303", "Z\u0351\u0352\u0353\u0354", " \u0301", "\u0301", "o\u0328\u0304",
             "\u0915\u094d\u0937", "\u05e9\u05c1"]
NUMS_OTHER = ["１２３", "٠١٢٣٤", "०१२३", "²", "³", "½", "¾", "Ⅻ", "ⅷ", "①", "𝟘𝟙"]
CODE = [
    "def f(x):\n    return x ** 2 + 1\n",
    "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}\n",
    'if __name__ == "__main__":\n    main()\n',
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "#include <stdio.h>\r\nint main(void) { printf(\"%d\\n\", 42); return 0; }\r\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "x => x.map(y => y * 2).filter(Boolean)",
    "std::vector<int> v{1, 2, 3}; auto it = v.begin(); // comment",
    "$ ls -la /usr/local/bin && echo $HOME | grep -v '^#'",
    "<div class=\"a\">Hello &amp; <b>world</b></div>",
    "a != b && c == d || e -> f :: g <=> h",
    "    \n        \n\t\n",
    "https://example.com/path?query=1&x=%20#frag",
    "user.name+tag@example.co.uk",
    "v1.2.3-rc.1 x86_64 arm64 sha256:0a1b2c3d4e5f",
    "@@ -1,3 +1,4 @@\n-old line\n+new line\n",
]


def r_number(rng):
    k = rng.randrange(8)
    if k == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 26)))
    if k == 1:
        return f"{rng.uniform(-1e6, 1e6):.{rng.randrange(0, 8)}f}"
    if k == 2:
        return f"{rng.randrange(10 ** 9):,}"
    if k == 3:
        return f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if k == 4:
        return f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
    if k == 5:
        return rng.choice(NUMS_OTHER)
    if k == 6:
        return f"+1 ({rng.randrange(100, 999)}) {rng.randrange(100, 999)}-{rng.randrange(1000, 9999)}"
    return "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 40)))


def r_words(rng, words, sep=" ", lo=1, hi=12):
    return sep.join(rng.choice(words) for _ in range(rng.randrange(lo, hi)))


def r_english(rng):
    ws = [rng.choice(EN) for _ in range(rng.randrange(3, 18))]
    for i in range(len(ws)):
        r = rng.random()
        if r < 0.05:
            ws[i] = ws[i] + rng.choice(["'s", "n't", "'re", "'ll", "'ve", "'d", "'m"])
        elif r < 0.1:
            ws[i] = ws[i].upper()
        elif r < 0.15:
            ws[i] = ws[i] + rng.choice([",", ";", ":", "!", "?", "...", ")", "\"", "-"]) + rng.choice(["", " "])
        elif r < 0.18:
            ws[i] = rng.choice(["(", "\"", "'", "[", "-", "--", "#", "@", "$"]) + ws[i]
        elif r < 0.2:
            ws[i] = r_number(rng)
    s = " ".join(ws)
    return s[:1].upper() + s[1:] + rng.choice([".", "!", "?", ".", "", ":\n", ".\n", ".\r\n"])


def r_segment(rng):
    k = rng.randrange(22)
    if k <= 5:
        return r_english(rng)
    if k == 6:
        return r_words(rng, LATIN)
    if k == 7:
        return r_words(rng, CYR) + rng.choice([".", ",", "!", ""])
    if k == 8:
        return r_words(rng, GREEK) + rng.choice([";", ".", ""])
    if k == 9:
        return r_words(rng, ARABIC) + rng.choice(["،", ".", "؟", ""])
    if k == 10:
        return r_words(rng, HEBREW)
    if k == 11:
        return r_words(rng, DEVA) + rng.choice(["।", ""])
    if k == 12:
        return r_words(rng, THAI, sep="")
    if k == 13:
        return r_words(rng, ZH, sep=rng.choice(["", "，", "。", "、", " "]))
    if k == 14:
        return r_words(rng, JA, sep=rng.choice(["", "、", "。", "「", "」"]))
    if k == 15:
        return r_words(rng, KO)
    if k == 16:
        return r_number(rng)
    if k == 17:
        return rng.choice(CODE)
    if k == 18:
        return "".join(rng.choice(SPACES) for _ in range(rng.randrange(1, 4)))
    if k == 19:
        return " ".join(rng.choice(EMOJI) * rng.randrange(1, 3) for _ in range(rng.randrange(1, 5)))
    if k == 20:
        return "".join(rng.choice(SYMBOLS + COMBINING) for _ in range(rng.randrange(1, 8)))
    # scripts and numbers glued together
    parts = [rng.choice(EN), rng.choice(ZH), r_number(rng), rng.choice(JA), rng.choice(KO), rng.choice(EMOJI),
             rng.choice(CYR), rng.choice(SYMBOLS), rng.choice(COMBINING)]
    rng.shuffle(parts)
    return "".join(parts[:rng.randrange(2, 6)])


def r_doc(rng, target):
    out, n = [], 0
    while n < target:
        s = r_segment(rng)
        s += rng.choice([" ", " ", " ", "\n", "", "\n\n", "\t", "\r\n"])
        out.append(s)
        n += len(s)
    return "".join(out)


# ------------------------------------------------------------------ the tokenizer


NODE_HELPER = r"""
const {Tokenizer} = require(process.argv[2]);
const fs = require('fs');
const readline = require('readline');
const toks = [], out = Number(process.argv[3]);
const table = new Int32Array(256).map((_, i) => { let c = i; for (let k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320 ^ (c >>> 1) : c >>> 1; return c; });
function crc32(crc, ids) {
  crc = ~crc;
  for (const v of ids) for (let k = 0; k < 4; k++) crc = table[(crc ^ (v >>> (8 * k))) & 0xFF] ^ (crc >>> 8);
  return ~crc >>> 0;
}
async function bench(t, docs) {
  const mb = docs.reduce((a, d) => a + Buffer.byteLength(d), 0) / 1e6, r = {};
  let crc = 0, n = 0;
  for (const d of docs) { const ids = (await t.encode(d, null, {addSpecialTokens: false})).getIds(); n += ids.length; crc = crc32(crc, ids); }
  r.tokens = n; r.crc = crc;
  for (const [name, f] of [['encode', async () => { for (const d of docs) await t.encode(d, null, {addSpecialTokens: false}); }],
                           ['encodeBatch', async () => { await t.encodeBatch(docs, {addSpecialTokens: false}); }]]) {
    let best = 1e9;
    for (let p = 0; p < 2; p++) { const t0 = process.hrtime.bigint(); await f(); best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e9); }
    r[name] = mb / best;
  }
  return r;
}
(async () => {
  for await (const line of readline.createInterface({input: process.stdin, crlfDelay: Infinity})) {
    const q = JSON.parse(line);
    let r;
    try {
      if (q.op === 'load') { toks.push(Tokenizer.fromString(q.json)); r = {h: toks.length - 1}; }
      else if (q.op === 'train') { const t = Tokenizer.fromString(q.json); t.train(q.files); t.save(q.out, false); r = {json: fs.readFileSync(q.out, 'utf8')}; }
      else if (q.op === 'save') { toks[q.h].save(q.out, false); r = {json: fs.readFileSync(q.out, 'utf8')}; }
      else if (q.op === 'enc') { const out = []; for (const s of q.texts) out.push(Array.from((await toks[q.h].encode(s, null, {addSpecialTokens: q.sp})).getIds())); r = {ids: out}; }
      else if (q.op === 'dec') { const out = []; for (const ids of q.ids) out.push(await toks[q.h].decode(ids, q.skip)); r = {texts: out}; }
      else if (q.op === 'tid') { r = {id: toks[q.h].tokenToId(q.tok)}; }
      else if (q.op === 'size') { r = {n: toks[q.h].getVocabSize(true)}; }
      else if (q.op === 'bench') { r = await bench(toks[q.h], fs.readFileSync(q.corpus).toString('utf8').split('\0')); }
    } catch (e) { r = {error: String(e && e.message || e)}; }
    fs.writeSync(out, JSON.stringify(r) + '\n'); /* stdout is the trainer's progress bar's */
  }
})();
"""


class PyHF:
    """HF tokenizers through its Python package."""
    name = "tokenizers (Python)"

    def __init__(self):
        import tokenizers
        self.tk = tokenizers
        self.name = f"tokenizers {tokenizers.__version__} (Python)"
        self.toks = []

    def load(self, obj):
        self.toks.append(self.tk.Tokenizer.from_str(json.dumps(obj)))
        return len(self.toks) - 1

    def serialize(self, h):
        return json.loads(self.toks[h].to_str())

    def encode(self, h, texts, sp):
        return [self.toks[h].encode(t, add_special_tokens=sp).ids for t in texts]

    def decode(self, h, ids, skip):
        return [self.toks[h].decode(x, skip_special_tokens=skip) for x in ids]

    def token_to_id(self, h, s):
        return self.toks[h].token_to_id(s)

    def vocab_size(self, h):
        return self.toks[h].get_vocab_size(with_added_tokens=True)

    def train(self, skel, docs, vocab_size, specials):
        tok = self.tk.Tokenizer.from_str(json.dumps(skel))
        trainer = self.tk.trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, show_progress=False,
            special_tokens=[self.tk.AddedToken(t, special=True, normalized=False) for t in specials],
            initial_alphabet=self.tk.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(docs, trainer=trainer)
        return json.loads(tok.to_str())


class NodeHF:
    """HF tokenizers (the same Rust library) through its Node binding, the npm package."""

    def __init__(self, pkg):
        self.tmp = tempfile.mkdtemp(prefix="mill-hf-")
        js = os.path.join(self.tmp, "helper.js")
        with open(js, "w") as f:
            f.write(NODE_HELPER)
        with open(os.path.join(pkg, "package.json")) as f:
            self.name = f"tokenizers {json.load(f)['version']} (the Node binding of the Rust library)"
        r, w = os.pipe()
        self.p = subprocess.Popen(["node", js, os.path.abspath(pkg), str(w)], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, pass_fds=(w,), text=True, encoding="utf-8")
        os.close(w)
        self.replies = os.fdopen(r, "r", encoding="utf-8")

    def ask(self, **q):
        self.p.stdin.write(json.dumps(q) + "\n")
        self.p.stdin.flush()
        line = self.replies.readline()
        if not line:
            raise RuntimeError("the Node helper ended")
        r = json.loads(line)
        if "error" in r:
            raise ValueError(r["error"])
        return r

    def load(self, obj):
        return self.ask(op="load", json=json.dumps(obj))["h"]

    def serialize(self, h):
        return json.loads(self.ask(op="save", h=h, out=os.path.join(self.tmp, "save.json"))["json"])

    def encode(self, h, texts, sp):
        return self.ask(op="enc", h=h, texts=list(texts), sp=bool(sp))["ids"]

    def decode(self, h, ids, skip):
        return self.ask(op="dec", h=h, ids=[list(x) for x in ids], skip=bool(skip))["texts"]

    def token_to_id(self, h, s):
        return self.ask(op="tid", h=h, tok=s)["id"]

    def vocab_size(self, h):
        return self.ask(op="size", h=h)["n"]

    def train(self, skel, docs, vocab_size, specials):
        """The default trainer (all the binding offers), then its first merges: byte characters at
        3..258 after the specials, each merge's token after them in rank order."""
        corpus = os.path.join(self.tmp, "train.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("\n".join(docs))
        full = json.loads(self.ask(op="train", json=json.dumps(skel), files=[corpus],
                                   out=os.path.join(self.tmp, "trained.json"))["json"])
        merges = [m if isinstance(m, list) else m.split(" ") for m in full["model"]["merges"]]
        vocab = {t: i for i, t in enumerate(specials)}
        for c in sorted(self.alphabet()):
            vocab[c] = len(vocab)
        kept = []
        for a, b in merges:
            if len(vocab) >= vocab_size:
                break
            if a in vocab and b in vocab and a + b not in vocab:
                vocab[a + b] = len(vocab)
                kept.append([a, b])
        out = json.loads(json.dumps(skel))
        out["model"]["vocab"] = vocab
        out["model"]["merges"] = kept
        out["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": True} for i, t in enumerate(specials)]
        return out

    @staticmethod
    def alphabet():
        bs = list(range(33, 127)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        cs, n = {b: b for b in bs}, 0
        for b in range(256):
            if b not in cs:
                cs[b] = 256 + n
                n += 1
        return [chr(c) for c in cs.values()]


def hf_backend(node_pkg):
    try:
        return PyHF()
    except ImportError:
        pass
    pkg = node_pkg or os.environ.get("MILL_NODE_TOKENIZERS")
    if not pkg:
        try:
            pkg = os.path.dirname(subprocess.run(["node", "-p", "require.resolve('tokenizers/package.json')"],
                                                 capture_output=True, text=True, check=True).stdout.strip())
        except Exception:
            sys.exit("HF tokenizers is needed: the Python package, or the npm package given by --node-tokenizers DIR")
    return NodeHF(pkg)


def train(hf, vocab_size, n_docs, seed):
    skel = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": {"type": "Sequence", "normalizers": []}, "pre_tokenizer": DS_PRETOK,
            "post_processor": None, "decoder": DS_DECODER,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {}, "merges": []}}
    rng = random.Random(seed)
    docs = [r_doc(rng, rng.randrange(200, 3000)) for _ in range(n_docs)]
    obj = hf.train(skel, docs, vocab_size, [BOS, EOS, PAD])
    # DeepSeek's file writes merges as "a b" strings (byte-level tokens never hold a space)
    merges = [m if isinstance(m, str) else " ".join(m) for m in obj["model"]["merges"]]
    obj["model"]["merges"] = merges
    nv = len(obj["model"]["vocab"])
    added = obj["added_tokens"]
    for k, (c, special, normalized, lstrip, rstrip, single_word) in enumerate(ADDED):
        added.append({"id": nv + k, "content": c, "single_word": single_word, "lstrip": lstrip, "rstrip": rstrip,
                      "normalized": normalized, "special": special})
    obj["post_processor"] = DS_POST
    final = hf.serialize(hf.load(obj))  # the ids HF really gave
    final["model"]["merges"] = merges
    for a, b in zip(final["added_tokens"], obj["added_tokens"]):
        if a["id"] != b["id"] or a["content"] != b["content"]:
            print(f"note: added token {b['content']} got id {a['id']} (asked {b['id']})", file=sys.stderr)
    return final


def config_json():
    def tok(c):
        return {"__type": "AddedToken", "content": c, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}
    return {"add_bos_token": True, "add_eos_token": False, "bos_token": tok(BOS), "clean_up_tokenization_spaces": False,
            "eos_token": tok(EOS), "legacy": True, "model_max_length": 1048576, "pad_token": tok(PAD),
            "sp_model_kwargs": {}, "unk_token": None, "tokenizer_class": "LlamaTokenizerFast"}


# ------------------------------------------------------------------ cases


def b64(b):
    return base64.b64encode(b).decode()


def invalid_utf8(rng):
    k = rng.randrange(9)
    valid = r_segment(rng).encode()
    if k == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30)))
    if k == 1:
        cut = rng.randrange(len(valid) + 1)
        return valid[:cut] + bytes([rng.randrange(0x80, 0x100)]) + valid[cut:]
    if k == 2:
        return valid[:-1] if len(valid) > 1 and valid[-1] >= 0x80 else valid + b"\xe4\xb8"
    if k == 3:
        return rng.choice([b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xf0\x80\x80\x80",
                           b"\xf0\x8f\xbf\xbf"]) + valid
    if k == 4:
        return valid + rng.choice([b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xed\xa0\x80\xed\xb0\x80"])
    if k == 5:
        return rng.choice([b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xfe", b"\xff"]) + valid
    if k == 6:
        return b"\x80" * rng.randrange(1, 4) + valid + b"\xbf"
    if k == 7:
        cut = rng.randrange(1, max(2, len(valid)))
        return valid[:cut] + valid[cut + 1:]  # a byte gone, often mid-character
    return b"".join(rng.choice([b"\xe4", b"\xb8", b"\xad", b"a", b" ", b"\xf0\x9f", b"\x98\x80", b"\xc3", b"\xa9"])
                    for _ in range(rng.randrange(1, 20)))


def with_added(rng, contents):
    parts = []
    for _ in range(rng.randrange(1, 6)):
        r = rng.random()
        if r < 0.4:
            parts.append(rng.choice(contents))
        elif r < 0.55:
            parts.append(rng.choice(["<｜User", "<｜", "｜>", "<think", "</think", "<THINK>", "<｜user｜>", "｜DSML",
                                     "xyzzy", "Xyzzy", "xyzzyx", "axyzzy", "xyzzy,", " xyzzy ", "=~=", "a=~=b",
                                     " =~= ", "aqzqb", "qzq", "QZQ", "<test_lstrip", "test_rstrip>", "<test_no",
                                     "<test_norm", "<test_nor"]))
        else:
            parts.append(r_segment(rng)[:rng.randrange(1, 40)])
        parts.append(rng.choice(["", "", " ", "  ", "\n", "\t", " \n "]))
    return "".join(parts)


def edge_texts():
    t = ["", " ", "  ", "\n", "\r\n", "\t", "a", "ab", "hello", " hello", "hello world", "Hello, World!",
         "0", "12", "123", "1234", "12345678901234567890", "3.14159", "-42", "1,000,000", "x = 1e-5",
         "中", "中文", "中文English混合123", "ありがとう", "カタカナ", "ｶﾀｶﾅ", "한국어", "😀", "👨\u200d👩\u200d👧",
         "🇺🇸🇯🇵", "e\u0301", "\u0301", " \u0301a", "Z\u0351\u0352\u0353", "a\u00a0b", "a\u3000b", "a\u2028b",
         "a\u0085b", "a\u200bb", "\ufeffhello", "a  \n  b", "a \r\n b", "\n\n\n", "   ", "\t\t\tx", "x   ",
         "!!!", "?!", "...", "—", "(a)", "[b]", "{c}", "'s", "don't", "I'm", "it's", "\"quote\"", "`code`",
         ".hidden", "#tag", "@user", "$100", "100%", "a/b/c", "C:\\path\\file", "<html>", "</html>",
         "<｜User｜>", "<｜Assistant｜>", BOS, EOS, PAD, "<think>", "</think>", "<think></think>",
         BOS + "hi" + EOS, "<｜User｜>hello<｜Assistant｜>", "｜DSML｜", "<｜DSML｜", "<test_lstrip>",
         "a   <test_lstrip>b", "a<test_rstrip>   b", "x  <test_both>  y", "xyzzy", "xyzzy!", "say xyzzy",
         "xyzzyworld", "Oxyzzy", "a =~= b", "a=~=b", "=~=", "aqzqb", "<test_norm>", "<test_norm", "x<test_no>",
         "<｜User", "<｜User｜", "<｜Use", "hello world", "a == b"]
    t += [chr(c) for c in range(0, 128)]
    t += ["x" + chr(c) + "y" for c in range(0, 128)]
    t += ["7" * n for n in range(1, 26)]
    t += [" " * n + "a" for n in range(1, 9)] + ["a" + " " * n for n in range(1, 9)]
    t += ["\n" * n + "x" for n in range(1, 5)] + ["x" + " " * n + "\n" for n in range(1, 5)]
    t += [s for s in SPACES] + ["a" + s + "b" for s in SPACES]
    t += EMOJI + SYMBOLS + COMBINING + NUMS_OTHER + CODE
    return t


def enc_cases(hf, h, v, raws, contents, normalizer=False):
    texts = [r.decode("utf-8", "replace") for r in raws]
    plain, sp = hf.encode(h, texts, False), hf.encode(h, texts, True)
    # DeepSeek's template is bos + text: then "ids_sp" is left out (null), to keep the file small
    return [{"v": v, "in": b64(r), "ids": a, "ids_sp": None if b == [0] + a else b,
             "plain": not normalizer and not any(c in t for c in contents)}  # a normalizer can make one
            for r, t, a, b in zip(raws, texts, plain, sp)]


def dec_cases(hf, h, v, idss):
    full, skip = hf.decode(h, idss, False), hf.decode(h, idss, True)
    return [{"v": v, "dec": ids, "text": b64(a.encode()), "text_skip": b64(b.encode())}
            for ids, a, b in zip(idss, full, skip)]


def variants(base):
    post_seq = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        template([sp(BOS), SEQ_A, sp(EOS)], {BOS: [0], EOS: [1]})]}
    return [
        ("gpt2_bytelevel", {"pre_tokenizer": bytelevel(True, True),
                            "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                               "use_regex": True}}),
        ("split_merged_prev", {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split("-", "MergedWithPrevious", literal=True), bytelevel(False, True)]}}),
        ("split_merged_next", {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split(r"\d+", "MergedWithNext"), bytelevel(False, True)]}}),
        ("split_contiguous_invert", {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split(r"\s", "Contiguous", invert=True), bytelevel(True, False)]}}),
        ("split_removed_word", {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split("[,.;:!?]", "Removed"), split(r"\w+"), split(r"\s+", "Removed"), bytelevel(False, False)]}}),
        ("split_empty_matches", {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split("x*"), split("(?=[A-Z])", "MergedWithNext"), bytelevel(False, False)]}}),
        ("split_anchors", {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            split("^ +| +$", "Removed"), split(r"\h+"), bytelevel(False, True)]}}),
        ("norm_lower_replace", {"normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Lowercase"}, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
            {"type": "Replace", "pattern": {"String": "\t"}, "content": "    "}]}}),
        ("norm_strip_prepend", {"normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Strip", "strip_left": True, "strip_right": True}, {"type": "Prepend", "prepend": "▁"}]}}),
        ("post_sequence_bos_eos", {"post_processor": post_seq}),
        ("post_repeat_multi", {"post_processor": template([sp("X"), SEQ_A, sp("X"), SEQ_A], {"X": [5, 6]})}),
        ("ignore_merges", {"model.ignore_merges": True}),
        ("no_decoder", {"decoder": None}),
    ]


def apply_patch(obj, patch):
    obj = json.loads(json.dumps(obj))
    for k, v in patch.items():
        d = obj
        keys = k.split(".")
        for kk in keys[:-1]:
            d = d[kk]
        d[keys[-1]] = v
    return obj


def make(out, hf):
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    obj = train(hf, vocab_size=4000, n_docs=6000, seed=1)
    path = os.path.join(out, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config_json(), f, ensure_ascii=False, indent=2)
        f.write("\n")
    with open(path, encoding="utf-8") as f:
        h = hf.load(json.load(f))
    contents = [a["content"] for a in obj["added_tokens"]]
    n_ids = hf.vocab_size(h)
    rng = random.Random(7)
    lines = [{"variant": 0, "name": "deepseek", "patch": {}}]
    raws = [t.encode() for t in edge_texts()]
    raws += [r_segment(rng)[:rng.randrange(1, 300)].encode() for _ in range(1500)]
    raws += [r_doc(rng, rng.randrange(50, 600)).encode() for _ in range(600)]
    raws += [with_added(rng, contents).encode() for _ in range(700)]
    raws += [invalid_utf8(rng) for _ in range(600)]
    lines += enc_cases(hf, h, 0, raws, contents)
    special_ids = [hf.token_to_id(h, c) for c in contents]
    idss = []
    for _ in range(1200):
        k = rng.randrange(4)
        if k == 0:
            ids = [rng.randrange(n_ids) for _ in range(rng.randrange(1, 30))]
        elif k == 1:
            ids = [rng.randrange(259) for _ in range(rng.randrange(1, 12))]  # lone bytes: broken UTF-8
        else:
            ids = hf.encode(h, [with_added(rng, contents) if k == 2 else r_segment(rng)], False)[0]
            for _ in range(rng.randrange(0, 3)):
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(special_ids + [0, 1, 2]))
        idss.append(ids)
    lines += dec_cases(hf, h, 0, idss)
    # the variants: the same trained model under other components
    sample = edge_texts()[:150] + [r_doc(random.Random(100 + i), 300) for i in range(40)] + \
        [with_added(random.Random(200 + i), contents) for i in range(40)]
    for k, (name, patch) in enumerate(variants(obj), start=1):
        try:
            vh = hf.load(apply_patch(obj, patch))
        except Exception as ex:  # HF refuses the variant: say so, make no cases
            print(f"variant {name}: HF refuses it: {ex}", file=sys.stderr)
            continue
        lines.append({"variant": k, "name": name, "patch": patch})
        lines += enc_cases(hf, vh, k, [t.encode() for t in sample], contents, "normalizer" in patch)
        vr = random.Random(300 + k)
        lines += dec_cases(hf, vh, k, [[vr.randrange(n_ids) for _ in range(vr.randrange(1, 20))] for _ in range(40)])
    with open(os.path.join(out, "goldens.jsonl"), "w", encoding="utf-8") as f:
        for c in lines:
            f.write(json.dumps(c, ensure_ascii=True, separators=(",", ":")) + "\n")
    n_enc = sum("in" in c for c in lines)
    n_dec = sum("dec" in c for c in lines)
    print(f"{os.path.normpath(out)}: {hf.name}; vocab {len(obj['model']['vocab'])}, merges {len(obj['model']['merges'])}, "
          f"added {len(obj['added_tokens'])}, ids {n_ids}; goldens: {n_enc} encode, {n_dec} decode "
          f"({time.time() - t0:.0f} s)")
    if isinstance(hf, PyHF):
        cross_check(out, hf.toks[h], sample + edge_texts())


def cross_check(out, tok, texts):
    """transformers' loaders against tokenizers (information only: mill follows tokenizers)."""
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except Exception as ex:
        print(f"transformers: not importable ({ex})")
        return
    for name, make_tok in (("PreTrainedTokenizerFast", lambda: PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(out, "tokenizer.json"))), ("AutoTokenizer", lambda: AutoTokenizer.from_pretrained(out))):
        try:
            t = make_tok()
            same = sum(t.encode(x, add_special_tokens=True) == tok.encode(x, add_special_tokens=True).ids for x in texts)
            print(f"transformers {name} ({type(t).__name__}): encode(add_special_tokens=True) equals tokenizers' on "
                  f"{same}/{len(texts)} texts; bos {t.bos_token_id} eos {t.eos_token_id} pad {t.pad_token_id}")
        except Exception as ex:
            print(f"transformers {name}: failed ({type(ex).__name__}: {ex})")


def bench_corpus(path, mb, english=False):
    rng = random.Random(12345)
    total, docs = 0, []
    while total < mb * 1_000_000:
        if english:  # plain English prose: sentences, paragraphs
            n = rng.randrange(500, 8000)
            d = ""
            while len(d) < n:
                d += r_english(rng).rstrip("\r\n:") + rng.choice([" ", " ", " ", "\n\n"])
            d = d.encode()
        else:
            d = r_doc(rng, rng.randrange(500, 8000)).encode()
        docs.append(d)
        total += len(d)
    with open(path, "wb") as f:
        f.write(b"\0".join(docs))
    print(f"{path}: {len(docs)} documents, {total / 1e6:.1f} MB")


def hf_bench(hf, corpus, tokdir):
    """HF's encode speed on the corpus (single documents in a loop, and batched), with its ids' count
    and CRC-32 (zlib.crc32 over each id as a little-endian int32, chained over the documents)."""
    with open(os.path.join(tokdir, "tokenizer.json"), encoding="utf-8") as f:
        h = hf.load(json.load(f))
    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    if isinstance(hf, NodeHF):
        r = hf.ask(op="bench", h=h, corpus=os.path.abspath(corpus))
        print(f"hf: ids: {r['tokens']} tokens, crc32 0x{r['crc']:08x}")
        print(f"hf: {hf.name}: encode() one document at a time: {r['encode']:.2f} MB/s")
        print(f"hf: {hf.name}: encodeBatch, RAYON_NUM_THREADS={threads}: {r['encodeBatch']:.2f} MB/s")
        return
    import array
    tok = hf.toks[h]
    with open(corpus, "rb") as f:
        docs = f.read().split(b"\0")
    texts = [d.decode("utf-8") for d in docs]
    mb = sum(len(d) for d in docs) / 1e6
    crc, n = 0, 0
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False).ids
        n += len(ids)
        a = array.array("i", ids)  # int32; little-endian on x86-64, as the C side's CRC reads
        crc = zlib.crc32(a.tobytes(), crc)
    print(f"hf: ids: {n} tokens, crc32 0x{crc:08x}")

    def best(f):
        t = 1e9
        for _ in range(2):
            t0 = time.perf_counter()
            f()
            t = min(t, time.perf_counter() - t0)
        return mb / t
    print(f"hf: {hf.name}: encode() one document at a time: "
          f"{best(lambda: [tok.encode(t, add_special_tokens=False) for t in texts]):.2f} MB/s")
    print(f"hf: {hf.name}: encode_batch, RAYON_NUM_THREADS={threads}: "
          f"{best(lambda: tok.encode_batch(texts, add_special_tokens=False)):.2f} MB/s")
    if hasattr(tok, "encode_batch_fast"):
        print(f"hf: {hf.name}: encode_batch_fast, RAYON_NUM_THREADS={threads}: "
              f"{best(lambda: tok.encode_batch_fast(texts, add_special_tokens=False)):.2f} MB/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "bpe-tiny"))
    ap.add_argument("--node-tokenizers", help="the npm package tokenizers (a directory), when Python has none")
    ap.add_argument("--bench-corpus")
    ap.add_argument("--mb", type=float, default=30)
    ap.add_argument("--english", action="store_true", help="--bench-corpus of plain English prose only")
    ap.add_argument("--hf-bench", nargs=2, metavar=("CORPUS", "TOKENIZER_DIR"))
    a = ap.parse_args()
    if a.bench_corpus:
        bench_corpus(a.bench_corpus, a.mb, a.english)
    elif a.hf_bench:
        hf_bench(hf_backend(a.node_tokenizers), *a.hf_bench)
    else:
        make(a.out, hf_backend(a.node_tokenizers))


if __name__ == "__main__":
    main()
