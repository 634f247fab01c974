/* tests/fuzz/fuzz_tokenize.c — fuzz target for encoding and decoding (common/tokenizer.c,
 * common/bpe.c) with a fixed tokenizer, and for `mill tokenize`'s input lines
 * (launch/tokenize_cli.c, included here for its static tk_line).
 * The tokenizer: tests/data/bpe-tiny (DeepSeek's pre-tokenizer and added tokens) when it exists,
 * else tests/fuzz/data/tok (a hand-made one of the same layout); $MILL_FUZZ_TOKENIZER overrides.
 * Input: a line starting with '{' is a `mill tokenize` JSONL line (text, ids or messages with
 * their flags), run through tk_line as the CLI runs it. Anything else is text for both the BPE
 * and the byte tokenizer, and its bytes, read as little-endian int32, are ids to decode.
 * Promises checked: encoding with the CLI's room (3 ids a byte + 16) never runs out; every id is
 * in the vocabulary; decoding what encoding gave (no added-token matching) returns the text with
 * invalid UTF-8 replaced (byte-level BPE loses nothing; calibrated at start on single bytes);
 * decoding any ids fails cleanly or fits; a too-small buffer is refused, never overrun. */
#include <stdint.h>

#include "common/bpe.h"
#include "common/tokenizer.h"
#include "fuzz_common.h"
#include "launch/tokenize_cli.c"

#ifndef MILL_SOURCE_DIR
#define MILL_SOURCE_DIR "."
#endif

static tokenizer *bpe_tok, *byte_tok;
static int roundtrip; /* decode(encode(x)) == repair(x) holds for this tokenizer */
static tk_ctx cli;

static int try_roundtrip(const tokenizer *t, const char *text, size_t len, int hf_decode);

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    mill_err e;
    struct stat sb;
    const char *dir = getenv("MILL_FUZZ_TOKENIZER");
    if (!dir || !*dir)
        dir = stat(MILL_SOURCE_DIR "/tests/data/bpe-tiny/tokenizer.json", &sb) == 0 ? MILL_SOURCE_DIR "/tests/data/bpe-tiny"
                                                                                    : MILL_SOURCE_DIR "/tests/fuzz/data/tok";
    if (tokenizer_load(&bpe_tok, dir, &e) || tokenizer_bytes_new(&byte_tok, 264, &e)) {
        fprintf(stderr, "fuzz_tokenize: %s\n", e.msg);
        exit(1);
    }
    roundtrip = 1;
    for (int c = 1; c < 128 && roundtrip; c++) {
        char ch = (char)c;
        roundtrip = try_roundtrip(bpe_tok, &ch, 1, 1) == 1;
    }
    chat_format_default(&cli.chat);
    cli.tok = bpe_tok;
    return 0;
}

/* 1: encode then decode gave the repaired text back; 0: it did not; -1: encoding failed. */
static int try_roundtrip(const tokenizer *t, const char *text, size_t len, int hf_decode) {
    int cap = (int)(3 * len + 16), n = 0;
    int32_t *ids = malloc(sizeof *ids * (size_t)cap);
    char *fixed = malloc(3 * len + 1), *out = malloc(3 * len + 64);
    FUZZ_CHECK(ids && fixed && out);
    size_t fl = bpe_utf8_repair((const unsigned char *)text, len, fixed);
    mill_err e;
    int ok = -1;
    if (tokenizer_encode(t, text, len, ids, cap, &n, &e) == 0) {
        int V = tokenizer_vocab_size(t);
        for (int i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < V);
        int rc = hf_decode ? tokenizer_decode_hf(t, ids, n, 0, out, 3 * len + 64, &e)
                           : tokenizer_decode(t, ids, n, out, 3 * len + 64, &e);
        /* the text may hold NULs: compare the bytes, then the terminator after them */
        ok = rc == 0 && (hf_decode ? memcmp(out, fixed, fl) == 0 && out[fl] == 0
                                   : memcmp(out, text, len) == 0 && out[len] == 0);
    }
    free(ids);
    free(fixed);
    free(out);
    return ok;
}

/* The CLI's room for encode_hf must be enough, and every id inside the vocabulary. */
static void encode_hf(const tokenizer *t, const char *text, size_t len, int add_special) {
    int cap = (int)(3 * len + 16), n = -1;
    int32_t *ids = malloc(sizeof *ids * (size_t)cap);
    FUZZ_CHECK(ids != NULL);
    mill_err e;
    if (tokenizer_encode_hf(t, text, len, add_special, ids, cap, &n, &e) != 0) {
        fprintf(stderr, "encode_hf refused %zu bytes: %s\n", len, e.msg);
        FUZZ_CHECK(!"encode_hf fits in 3 ids a byte + 16");
    }
    int V = tokenizer_vocab_size(t);
    for (int i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < V);
    if (n > 0) { /* one id less room: refused, not overrun */
        FUZZ_CHECK(tokenizer_encode_hf(t, text, len, add_special, ids, n - 1, &n, &e) == -1);
    }
    free(ids);
}

/* Any ids: strict and HF decoding may refuse, lossy only for room; small buffers are refused. */
static void decode_any(const tokenizer *t, const int32_t *ids, int n) {
    size_t cap = 64 * (size_t)n + 64;
    char *out = malloc(cap);
    FUZZ_CHECK(out != NULL);
    mill_err e;
    for (int mode = 0; mode < 4; mode++) {
        int rc = mode == 0   ? tokenizer_decode(t, ids, n, out, cap, &e)
                 : mode == 1 ? tokenizer_decode_lossy(t, ids, n, out, cap, &e)
                             : tokenizer_decode_hf(t, ids, n, mode == 3, out, cap, &e);
        FUZZ_CHECK(rc == 0 || rc == -1);
        if (rc) continue;
        size_t k = strlen(out);
        FUZZ_CHECK(k < cap);
        char *tight = malloc(k + 1); /* the exact room fits when the text holds no NUL */
        FUZZ_CHECK(tight != NULL);
        if (k > 0) {
            rc = mode == 1 ? tokenizer_decode_lossy(t, ids, n, tight, k, &e)
                           : mode == 0 ? tokenizer_decode(t, ids, n, tight, k, &e)
                                       : tokenizer_decode_hf(t, ids, n, mode == 3, tight, k, &e);
            FUZZ_CHECK(rc == -1); /* k bytes hold no k-byte text and its NUL */
        }
        free(tight);
    }
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 0 && data[0] == '{') { /* a `mill tokenize` line */
        json_t *o = json_loadb((const char *)data, size, JSON_ALLOW_NUL, NULL), *res = json_object();
        mill_err e;
        e.msg[0] = 0;
        if (o && res) {
            if (tk_line(&cli, o, res, &e) == 0) {
                char *s = json_dumps(res, JSON_COMPACT); /* what the CLI writes */
                FUZZ_CHECK(s != NULL);
                free(s);
            } else {
                FUZZ_CHECK(e.msg[0] != 0);
                fuzz_refused("tk_line", e.msg);
            }
        }
        json_decref(o);
        json_decref(res);
        return 0;
    }
    char *text = fuzz_dup(data, size);
    int r = try_roundtrip(byte_tok, text, size, 0);
    FUZZ_CHECK(r == 1); /* the byte tokenizer is the identity on bytes */
    FUZZ_CHECK(try_roundtrip(byte_tok, text, size, 1) == 1);
    r = try_roundtrip(bpe_tok, text, size, 1);
    FUZZ_CHECK(r != -1 || size > 0); /* the empty text always encodes */
    if (roundtrip && r != -1) FUZZ_CHECK(r == 1);
    for (int sp = 0; sp < 2; sp++) {
        encode_hf(bpe_tok, text, size, sp);
        encode_hf(byte_tok, text, size, sp);
    }
    int n = (int)(size / 4);
    int32_t *ids = malloc(sizeof *ids * (size_t)(n ? n : 1));
    FUZZ_CHECK(ids != NULL);
    for (int i = 0; i < n; i++) memcpy(&ids[i], data + 4 * i, 4);
    decode_any(bpe_tok, ids, n);
    decode_any(byte_tok, ids, n);
    int V = tokenizer_vocab_size(bpe_tok); /* the same ids folded into the vocabulary: decodable */
    for (int i = 0; i < n; i++) ids[i] = (int32_t)((uint32_t)ids[i] % (uint32_t)V);
    decode_any(bpe_tok, ids, n);
    free(ids);
    free(text);
    return 0;
}
