/* common/tokenizer.c — the byte tokenizer. See tokenizer.h for the contract. */
#include "tokenizer.h"

#include <limits.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

typedef enum {
    TOKENIZER_BYTES = 1, /* ids 0..255 are bytes */
    /* TOKENIZER_BPE: HF tokenizer.json byte-level BPE, later */
} tokenizer_kind;

enum { TOK_N_BYTES = 256, TOK_N_SPECIAL = 3 };

/* Indexed by id - TOK_N_BYTES. */
static const char *const tok_special_names[TOK_N_SPECIAL] = {"<|bos|>", "<|eos|>", "<|pad|>"};

struct tokenizer {
    tokenizer_kind kind;
    int vocab_size;
    int bos, eos, pad;
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
    *out = t;
    return 0;
}

void tokenizer_free(tokenizer *t) { free(t); }

int tokenizer_vocab_size(const tokenizer *t) { return t->vocab_size; }
int tokenizer_bos(const tokenizer *t) { return t->bos; }
int tokenizer_eos(const tokenizer *t) { return t->eos; }
int tokenizer_pad(const tokenizer *t) { return t->pad; }

int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int32_t *out, int cap, int *n_out, mill_err *e) {
    *n_out = 0;
    if (len > 0 && !text) return mill_errf(e, "tokenizer: encode got NULL text with length %zu", len);
    if (len > (size_t)INT_MAX) return mill_errf(e, "tokenizer: encode text of %zu bytes is over the int limit", len);
    if (cap < 0 || (size_t)cap < len)
        return mill_errf(e, "tokenizer: encode needs %zu ids, the output has room for %d", len, cap);
    (void)t; /* one kind today; a BPE kind dispatches on t->kind here */
    const unsigned char *s = (const unsigned char *)text;
    for (size_t i = 0; i < len; i++) out[i] = (int32_t)s[i];
    *n_out = (int)len;
    return 0;
}

/* Decodes ids; lossy: an id with no text (reserved, or outside the vocabulary) becomes "<|id:N|>"
 * instead of an error. */
static int decode(const tokenizer *t, const int32_t *ids, int n, char *out, size_t cap, int lossy, mill_err *e) {
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
    return 0;
}

int tokenizer_decode(const tokenizer *t, const int32_t *ids, int n, char *out, size_t cap, mill_err *e) {
    return decode(t, ids, n, out, cap, 0, e);
}

int tokenizer_decode_lossy(const tokenizer *t, const int32_t *ids, int n, char *out, size_t cap, mill_err *e) {
    return decode(t, ids, n, out, cap, 1, e);
}

int tokenizer_special_id(const tokenizer *t, const char *name) {
    if (!name) return -1;
    for (int i = 0; i < TOK_N_SPECIAL; i++)
        if (strcmp(name, tok_special_names[i]) == 0) return TOK_N_BYTES + i;
    (void)t;
    return -1;
}
