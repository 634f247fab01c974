/* tests/fuzz/fuzz_tokenizer.c — fuzz target for loading an HF tokenizer.json (common/tokenizer.c
 * and the byte-level BPE of common/bpe.c): the model (vocab, merges, unk, byte_fallback), added
 * tokens, normalizers, pre-tokenizer regexes (translated to PCRE2), post-processor templates,
 * decoder, and tokenizer_config.json's bos/eos/pad.
 * Input: tokenizer.json; after FUZZ_SEP, an optional tokenizer_config.json. Both are written to
 * a scratch directory and loaded by tokenizer_load(dir), as `mill tokenize --tokenizer DIR` does.
 * A tokenizer that loads must encode a few fixed texts (added-token names, invalid UTF-8, CJK,
 * digits, blanks) into ids inside its vocabulary, decode those ids again, and answer its lookups. */
#include <stdint.h>

#include "common/tokenizer.h"
#include "fuzz_common.h"

static const char *const texts[] = {
    "Hello world, 12345 times!",
    ("<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>hi<\xef\xbd\x9cUser\xef\xbd\x9c><think>x</think>"),
    "\xff\xfe bad \xc3 utf8 \xed\xa0\x80",
    "  \n\t\r\n  trailing   ",
    "\xe4\xbd\xa0\xe5\xa5\xbd\xe4\xb8\x96\xe7\x95\x8c 2024-01-02 caf\xc3\xa9",
    "",
};

static void exercise(const tokenizer *t) {
    int V = tokenizer_vocab_size(t);
    FUZZ_CHECK(V >= 1);
    const int sp[3] = {tokenizer_bos(t), tokenizer_eos(t), tokenizer_pad(t)};
    for (int i = 0; i < 3; i++) FUZZ_CHECK(sp[i] >= -1 && sp[i] < V);
    FUZZ_CHECK(tokenizer_special_id(t, "<|bos|>") == sp[0]);
    int32_t ids[512];
    char out[8192];
    mill_err e;
    for (size_t k = 0; k < sizeof texts / sizeof texts[0]; k++) {
        size_t len = strlen(texts[k]);
        for (int mode = 0; mode < 3; mode++) {
            int n = -1;
            int rc = mode == 0 ? tokenizer_encode(t, texts[k], len, ids, 512, &n, &e)
                               : tokenizer_encode_hf(t, texts[k], len, mode == 2, ids, 512, &n, &e);
            FUZZ_CHECK(rc == 0 || rc == -1);
            if (rc) continue; /* a tokenizer may fail on text (a regex's match limit, say), never crash */
            FUZZ_CHECK(n >= 0 && n <= 512);
            for (int i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < V);
            if (tokenizer_decode_lossy(t, ids, n, out, sizeof out, &e) == 0) FUZZ_CHECK(strlen(out) < sizeof out);
            (void)tokenizer_decode_hf(t, ids, n, 1, out, sizeof out, &e);
        }
        (void)tokenizer_token_id(t, texts[k]);
    }
    /* the first few hundred ids, each decoded alone: lossy decoding fails only for want of room */
    int m = V < 300 ? V : 300;
    for (int32_t i = 0; i < m; i++) {
        int rc = tokenizer_decode_lossy(t, &i, 1, out, sizeof out, &e);
        FUZZ_CHECK(rc == 0 || rc == -1);
        if (rc == 0) FUZZ_CHECK(strlen(out) < sizeof out);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *dir = fuzz_tmp("tokenizer");
    const uint8_t *part[2];
    size_t len[2];
    int np = fuzz_split(data, size, part, len, 2);
    char pj[600], pc[600];
    fuzz_write(fuzz_path(dir, "tokenizer.json", pj, sizeof pj), part[0], len[0]);
    fuzz_path(dir, "tokenizer_config.json", pc, sizeof pc);
    if (np > 1) fuzz_write(pc, part[1], len[1]);
    else unlink(pc);
    tokenizer *t = NULL;
    mill_err e;
    e.msg[0] = 0;
    int rc = tokenizer_load(&t, dir, &e);
    FUZZ_CHECK(rc == 0 || rc == -1);
    if (rc == 0) {
        FUZZ_CHECK(t != NULL);
        exercise(t);
        tokenizer_free(t);
    } else {
        FUZZ_CHECK(t == NULL && e.msg[0] != 0);
        fuzz_refused("tokenizer_load", e.msg);
    }
    return 0;
}
