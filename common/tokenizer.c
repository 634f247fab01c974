/* common/tokenizer.c — the byte tokenizer, and the dispatch to the HF byte-level BPE (bpe.c).
 * See tokenizer.h for the contract. */
#include "tokenizer.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bpe.h"

typedef enum {
    TOKENIZER_BYTES = 1, /* ids 0..255 are bytes */
    TOKENIZER_BPE = 2,   /* HF tokenizer.json byte-level BPE */
} tokenizer_kind;

enum { TOK_N_BYTES = 256, TOK_N_SPECIAL = 3 };

/* Indexed by id - TOK_N_BYTES. */
static const char *const tok_special_names[TOK_N_SPECIAL] = {"<|bos|>", "<|eos|>", "<|pad|>"};

struct tokenizer {
    tokenizer_kind kind;
    int vocab_size;
    int bos, eos, pad;
    size_t max_piece; /* tokenizer_max_piece */
    bpe *bpe;
};

int tokenizer_bytes_new(tokenizer **out, int vocab_size, mill_err *e) {
    *out = NULL;
    if (vocab_size < TOK_N_BYTES + TOK_N_SPECIAL)
        return mill_errf(e, "tokenizer: vocab_size %d is below %d (256 bytes + bos, eos, pad)", vocab_size,
                         TOK_N_BYTES + TOK_N_SPECIAL);
    tokenizer *t = calloc(1, sizeof *t);
    if (!t) return mill_errf(e, "tokenizer: out of memory");
    t->kind = TOKENIZER_BYTES;
    t->vocab_size = vocab_size;
    t->bos = TOK_N_BYTES;
    t->eos = TOK_N_BYTES + 1;
    t->pad = TOK_N_BYTES + 2;
    t->max_piece = 16; /* "<|id:N|>" for an id past the bytes and specials */
    *out = t;
    return 0;
}

static int is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static int is_file(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

int tokenizer_load(tokenizer **out, const char *path, mill_err *e) {
    *out = NULL;
    if (!path || !*path) return mill_errf(e, "tokenizer: no tokenizer.json path given");
    size_t n = strlen(path);
    char *json = malloc(n + 32), *cfg = malloc(n + 32);
    if (!json || !cfg) return free(json), free(cfg), mill_errf(e, "tokenizer: out of memory");
    if (is_dir(path)) {
        snprintf(json, n + 32, "%s%stokenizer.json", path, path[n - 1] == '/' ? "" : "/");
    } else {
        memcpy(json, path, n + 1);
    }
    /* tokenizer_config.json lives beside tokenizer.json */
    const char *slash = strrchr(json, '/');
    size_t dl = slash ? (size_t)(slash - json) + 1 : 0;
    memcpy(cfg, json, dl);
    memcpy(cfg + dl, "tokenizer_config.json", sizeof "tokenizer_config.json");
    if (!is_file(json)) {
        int rc = mill_errf(e, "%s: no such file (a tokenizer.json or the directory holding one)", json);
        return free(json), free(cfg), rc;
    }
    tokenizer *t = calloc(1, sizeof *t);
    int rc = !t ? mill_errf(e, "tokenizer: out of memory") : bpe_load(&t->bpe, json, is_file(cfg) ? cfg : NULL, e);
    free(json);
    free(cfg);
    if (rc) return free(t), -1;
    t->kind = TOKENIZER_BPE;
    t->vocab_size = bpe_vocab_size(t->bpe);
    t->bos = bpe_bos(t->bpe);
    t->eos = bpe_eos(t->bpe);
    t->pad = bpe_pad(t->bpe);
    t->max_piece = bpe_max_piece(t->bpe);
    *out = t;
    return 0;
}

void tokenizer_free(tokenizer *t) {
    if (!t) return;
    bpe_free(t->bpe);
    free(t);
}

int tokenizer_vocab_size(const tokenizer *t) { return t->vocab_size; }
size_t tokenizer_max_piece(const tokenizer *t) { return t->max_piece; }
int tokenizer_bos(const tokenizer *t) { return t->bos; }
int tokenizer_eos(const tokenizer *t) { return t->eos; }
int tokenizer_pad(const tokenizer *t) { return t->pad; }

int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int32_t *out, int cap, int *n_out, mill_err *e) {
    *n_out = 0;
    if (t->kind == TOKENIZER_BPE) return bpe_encode(t->bpe, text, len, 0, 0, out, cap, n_out, e);
    if (len > 0 && !text) return mill_errf(e, "tokenizer: encode got NULL text with length %zu", len);
    if (len > (size_t)INT_MAX) return mill_errf(e, "tokenizer: encode text of %zu bytes is over the int limit", len);
    if (cap < 0 || (size_t)cap < len)
        return mill_errf(e, "tokenizer: encode needs %zu ids, the output has room for %d", len, cap);
    const unsigned char *s = (const unsigned char *)text;
    for (size_t i = 0; i < len; i++) out[i] = (int32_t)s[i];
    *n_out = (int)len;
    return 0;
}

int tokenizer_encode_hf(const tokenizer *t, const char *text, size_t len, int add_special, int32_t *out, int cap,
                        int *n_out, mill_err *e) {
    *n_out = 0;
    if (t->kind == TOKENIZER_BPE) return bpe_encode(t->bpe, text, len, 1, add_special, out, cap, n_out, e);
    if (len > 0 && !text) return mill_errf(e, "tokenizer: encode got NULL text with length %zu", len);
    if (len > (size_t)INT_MAX / 4) return mill_errf(e, "tokenizer: encode text of %zu bytes is over the limit", len);
    if (cap < 0 || (cap > 0 && !out)) return mill_errf(e, "tokenizer: encode got an output of %d ids", cap);
    /* the byte tokenizer: its three names are matched, the rest are the bytes of the repaired text */
    char *fixed = malloc(3 * len + 1);
    if (!fixed) return mill_errf(e, "tokenizer: out of memory");
    size_t n = bpe_utf8_repair((const unsigned char *)(len ? text : ""), len, fixed);
    int w = 0;
    for (size_t i = 0; i < n;) {
        int id = -1;
        size_t l = 0;
        for (int k = 0; k < TOK_N_SPECIAL && fixed[i] == '<'; k++) {
            size_t sl = strlen(tok_special_names[k]);
            if (sl <= n - i && memcmp(fixed + i, tok_special_names[k], sl) == 0) id = TOK_N_BYTES + k, l = sl;
        }
        if (id < 0) id = (unsigned char)fixed[i], l = 1;
        if (w < cap) out[w] = id;
        w++;
        i += l;
    }
    free(fixed);
    if (w > cap) return mill_errf(e, "tokenizer: encode needs %d ids, the output has room for %d", w, cap);
    *n_out = w;
    return 0;
}

/* Decodes ids; lossy: an id with no text (reserved, or outside the vocabulary) becomes "<|id:N|>"
 * instead of an error; hf: skip (skip_special) and UTF-8 repair as HF's decode. */
static int decode(const tokenizer *t, const int32_t *ids, int n, char *out, size_t cap, int lossy, int hf, int skip,
                  mill_err *e) {
    if (cap == 0 || !out) return mill_errf(e, "tokenizer: decode output buffer has no room (cap 0)");
    out[0] = 0;
    if (n < 0) return mill_errf(e, "tokenizer: decode got n = %d ids", n);
    if (n > 0 && !ids) return mill_errf(e, "tokenizer: decode got NULL ids for n = %d", n);
    size_t w = 0;
    for (int i = 0; i < n; i++) {
        int32_t id = ids[i];
        const char *piece;
        size_t plen;
        char byte, unknown[32];
        if (id >= 0 && id < t->vocab_size && id < TOK_N_BYTES) {
            byte = (char)(unsigned char)id;
            piece = &byte;
            plen = 1;
        } else if (id >= 0 && id < t->vocab_size && id < TOK_N_BYTES + TOK_N_SPECIAL) {
            if (skip) continue;
            piece = tok_special_names[id - TOK_N_BYTES];
            plen = strlen(piece);
        } else if (lossy) {
            plen = (size_t)snprintf(unknown, sizeof unknown, "<|id:%d|>", (int)id);
            piece = unknown;
        } else if (id < 0 || id >= t->vocab_size) {
            return mill_errf(e, "tokenizer: decode id %d at position %d is outside [0, %d)", (int)id, i, t->vocab_size);
        } else {
            return mill_errf(e, "tokenizer: decode id %d at position %d is reserved (no token; vocab %d has %d in use)",
                             (int)id, i, t->vocab_size, TOK_N_BYTES + TOK_N_SPECIAL);
        }
        if (plen >= cap - w) { /* room for the piece and the NUL */
            out[w] = 0;
            return mill_errf(e, "tokenizer: decode output of %zu bytes is too small (full at id position %d)", cap, i);
        }
        memcpy(out + w, piece, plen);
        w += plen;
    }
    out[w] = 0;
    if (hf) { /* bytes that are not UTF-8 become U+FFFD, as HF's from_utf8_lossy */
        char *fixed = malloc(3 * w + 1);
        if (!fixed) return mill_errf(e, "tokenizer: out of memory");
        size_t k = bpe_utf8_repair((const unsigned char *)out, w, fixed);
        if (k >= cap) {
            free(fixed);
            out[0] = 0;
            return mill_errf(e, "tokenizer: decode output of %zu bytes is too small (%zu needed)", cap, k + 1);
        }
        memcpy(out, fixed, k);
        out[k] = 0;
        free(fixed);
    }
    return 0;
}

int tokenizer_decode(const tokenizer *t, const int32_t *ids, int n, char *out, size_t cap, mill_err *e) {
    if (t->kind == TOKENIZER_BPE) return bpe_decode(t->bpe, ids, n, 0, 0, out, cap, e);
    return decode(t, ids, n, out, cap, 0, 0, 0, e);
}

int tokenizer_decode_lossy(const tokenizer *t, const int32_t *ids, int n, char *out, size_t cap, mill_err *e) {
    if (t->kind == TOKENIZER_BPE) return bpe_decode(t->bpe, ids, n, 0, 1, out, cap, e);
    return decode(t, ids, n, out, cap, 1, 0, 0, e);
}

int tokenizer_decode_hf(const tokenizer *t, const int32_t *ids, int n, int skip_special, char *out, size_t cap,
                        mill_err *e) {
    if (t->kind == TOKENIZER_BPE) return bpe_decode(t->bpe, ids, n, skip_special, 0, out, cap, e);
    return decode(t, ids, n, out, cap, 0, 1, skip_special, e);
}

int tokenizer_special_id(const tokenizer *t, const char *name) {
    if (!name) return -1;
    const int ids[TOK_N_SPECIAL] = {t->bos, t->eos, t->pad};
    for (int i = 0; i < TOK_N_SPECIAL; i++)
        if (strcmp(name, tok_special_names[i]) == 0) return ids[i];
    return -1;
}

int tokenizer_token_id(const tokenizer *t, const char *token) {
    if (!token) return -1;
    if (t->kind == TOKENIZER_BPE) return bpe_token_id(t->bpe, token);
    int id = tokenizer_special_id(t, token);
    if (id >= 0) return id;
    return strlen(token) == 1 ? (unsigned char)token[0] : -1;
}
