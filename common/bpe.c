/* common/bpe.c — HF tokenizers' tokenizer.json byte-level BPE. See bpe.h and tokenizer.h.
 *
 * The pipeline is HF's (tokenizers 0.23, read for facts, not copied):
 *   text -> valid UTF-8 (U+FFFD per maximal invalid subpart)
 *        -> added tokens that are not `normalized`, leftmost-longest on the raw text
 *        -> the normalizer on each remaining piece -> the `normalized` added tokens on that
 *        -> the pre-tokenizer steps (Split..., ByteLevel) -> BPE on each word -> post-processor.
 * Regexes are Oniguruma's in HF; PCRE2 runs them here, with the few escapes whose meaning
 * differs rewritten (re_translate) and onig's find_iter rule for empty matches (re_marks).
 * BPE merges by rank with a heap over the word (HF's algorithm, same tie-break: lower rank, then
 * leftmost), and each thread caches word -> ids. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "bpe.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <locale.h>
#include <pcre2.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wctype.h>

enum { MAX_PT_STEPS = 16, CACHE_MAX_WORD = 256 };

/* ---------------------------------------------------------------- small containers */

typedef struct {
    char *p;
    size_t n, cap;
} xbuf;

static int xb_reserve(xbuf *b, size_t extra) {
    if (b->n + extra <= b->cap) return 0;
    size_t c = b->cap ? b->cap : 256;
    while (c < b->n + extra) c *= 2;
    char *p = realloc(b->p, c);
    if (!p) return -1;
    b->p = p;
    b->cap = c;
    return 0;
}

static int xb_put(xbuf *b, const void *s, size_t n) {
    if (xb_reserve(b, n)) return -1;
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

/* A span [a, b) of some text; tag is a match flag, or an added-token index (-1: text). */
typedef struct {
    uint32_t a, b;
    int32_t tag;
} span;

typedef struct {
    span *v;
    size_t n, cap;
} spanvec;

static int sv_push(spanvec *s, uint32_t a, uint32_t b, int32_t tag) {
    if (s->n == s->cap) {
        size_t c = s->cap ? 2 * s->cap : 64;
        span *v = realloc(s->v, c * sizeof *v);
        if (!v) return -1;
        s->v = v;
        s->cap = c;
    }
    s->v[s->n++] = (span){a, b, tag};
    return 0;
}

typedef struct {
    int32_t *v;
    size_t n, cap;
} ivec;

static int iv_reserve(ivec *s, size_t extra) {
    if (s->n + extra <= s->cap) return 0;
    size_t c = s->cap ? s->cap : 256;
    while (c < s->n + extra) c *= 2;
    int32_t *v = realloc(s->v, c * sizeof *v);
    if (!v) return -1;
    s->v = v;
    s->cap = c;
    return 0;
}

static uint64_t hash_bytes(const void *p, size_t n) {
    const unsigned char *s = p;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)n;
    while (n >= 8) {
        uint64_t k;
        memcpy(&k, s, 8);
        h = (h ^ k) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
        s += 8;
        n -= 8;
    }
    uint64_t k = 0;
    for (size_t i = 0; i < n; i++) k |= (uint64_t)s[i] << (8 * i);
    h = (h ^ k) * 0x94d049bb133111ebull;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return h;
}

/* string -> int32 map; keys live in the map's own pool */
typedef struct {
    uint32_t off, len;
    int32_t val;
    uint32_t h;
} sm_ent;

typedef struct {
    int32_t *slot; /* entry index, -1 empty */
    size_t mask;
    sm_ent *ent;
    size_t n, cap;
    xbuf pool;
} strmap;

static int sm_rehash(strmap *m, size_t nslots) {
    int32_t *s = malloc(nslots * sizeof *s);
    if (!s) return -1;
    for (size_t i = 0; i < nslots; i++) s[i] = -1;
    for (size_t k = 0; k < m->n; k++) {
        size_t i = m->ent[k].h & (nslots - 1);
        while (s[i] >= 0) i = (i + 1) & (nslots - 1);
        s[i] = (int32_t)k;
    }
    free(m->slot);
    m->slot = s;
    m->mask = nslots - 1;
    return 0;
}

static int32_t sm_get(const strmap *m, const char *s, size_t n) {
    if (!m->slot) return -1;
    uint32_t h = (uint32_t)hash_bytes(s, n);
    for (size_t i = h & m->mask;; i = (i + 1) & m->mask) {
        int32_t k = m->slot[i];
        if (k < 0) return -1;
        const sm_ent *x = &m->ent[k];
        if (x->h == h && x->len == n && memcmp(m->pool.p + x->off, s, n) == 0) return x->val;
    }
}

/* Inserts; *had is set (and nothing changes) when the key is already there. */
static int sm_put(strmap *m, const char *s, size_t n, int32_t val, int32_t *had) {
    *had = -1;
    if (!m->slot || 2 * (m->n + 1) > m->mask + 1)
        if (sm_rehash(m, m->slot ? 2 * (m->mask + 1) : 1024)) return -1;
    uint32_t h = (uint32_t)hash_bytes(s, n);
    size_t i = h & m->mask;
    for (;; i = (i + 1) & m->mask) {
        int32_t k = m->slot[i];
        if (k < 0) break;
        const sm_ent *x = &m->ent[k];
        if (x->h == h && x->len == n && memcmp(m->pool.p + x->off, s, n) == 0) {
            *had = x->val;
            return 0;
        }
    }
    if (m->n == m->cap) {
        size_t c = m->cap ? 2 * m->cap : 1024;
        sm_ent *v = realloc(m->ent, c * sizeof *v);
        if (!v) return -1;
        m->ent = v;
        m->cap = c;
    }
    if (n > UINT32_MAX || m->pool.n > UINT32_MAX - n) return -1;
    uint32_t off = (uint32_t)m->pool.n;
    if (xb_put(&m->pool, s, n)) return -1;
    m->ent[m->n] = (sm_ent){off, (uint32_t)n, val, h};
    m->slot[i] = (int32_t)m->n++;
    return 0;
}

static void sm_free(strmap *m) {
    free(m->slot);
    free(m->ent);
    free(m->pool.p);
    memset(m, 0, sizeof *m);
}

/* ---------------------------------------------------------------- UTF-8 */

static int u8_len(unsigned char c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

/* One code point of valid UTF-8 at s (n > 0 bytes left); *len gets its length. */
static uint32_t u8_decode(const unsigned char *s, size_t n, int *len) {
    int l = u8_len(s[0]);
    if ((size_t)l > n) l = 1;
    *len = l;
    switch (l) {
    case 1:
        return s[0];
    case 2:
        return (uint32_t)(s[0] & 0x1F) << 6 | (s[1] & 0x3F);
    case 3:
        return (uint32_t)(s[0] & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
    default:
        return (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 | (uint32_t)(s[2] & 0x3F) << 6 |
               (s[3] & 0x3F);
    }
}

static int u8_encode(uint32_t c, char *o) {
    if (c < 0x80) return o[0] = (char)c, 1;
    if (c < 0x800) return o[0] = (char)(0xC0 | c >> 6), o[1] = (char)(0x80 | (c & 0x3F)), 2;
    if (c < 0x10000)
        return o[0] = (char)(0xE0 | c >> 12), o[1] = (char)(0x80 | ((c >> 6) & 0x3F)), o[2] = (char)(0x80 | (c & 0x3F)),
               3;
    o[0] = (char)(0xF0 | c >> 18);
    o[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((c >> 6) & 0x3F));
    o[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

/* The length of the well-formed sequence at s (Unicode Table 3-7), or -k: the first k bytes are a
 * maximal subpart that cannot be completed (k >= 1). */
static int u8_seq(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    int need;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
        need = 1;
    else if (c == 0xE0)
        need = 2, lo = 0xA0;
    else if (c >= 0xE1 && c <= 0xEC)
        need = 2;
    else if (c == 0xED)
        need = 2, hi = 0x9F;
    else if (c >= 0xEE && c <= 0xEF)
        need = 2;
    else if (c == 0xF0)
        need = 3, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3)
        need = 3;
    else if (c == 0xF4)
        need = 3, hi = 0x8F;
    else
        return -1;
    for (int k = 1; k <= need; k++) {
        if ((size_t)k >= n) return -k;
        unsigned char d = s[k];
        if (k == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) return -k;
    }
    return need + 1;
}

static int u8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        int l = u8_seq(s + i, n - i);
        if (l < 0) return 0;
        i += (size_t)l;
    }
    return 1;
}

size_t bpe_utf8_repair(const unsigned char *in, size_t n, char *out) {
    size_t i = 0, w = 0;
    while (i < n) {
        int l = u8_seq(in + i, n - i);
        if (l > 0) {
            memcpy(out + w, in + i, (size_t)l);
            w += (size_t)l;
            i += (size_t)l;
        } else {
            memcpy(out + w, "\xEF\xBF\xBD", 3);
            w += 3;
            i += (size_t)-l;
        }
    }
    return w;
}

/* Unicode White_Space: Oniguruma's and Rust's \s, Rust's char::is_whitespace. */
static int is_white(uint32_t c) {
    return (c >= 9 && c <= 13) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* ---------------------------------------------------------------- byte-level alphabet */

/* GPT-2's map: printable bytes stand for themselves, the other 68 take U+0100.. in byte order. */
static uint32_t bl_b2c[256];
static int16_t bl_c2b[512]; /* -1: not a byte-level character */
static pthread_once_t bl_once = PTHREAD_ONCE_INIT;

static void bl_init(void) {
    uint32_t next = 256;
    for (int i = 0; i < 512; i++) bl_c2b[i] = -1;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        bl_b2c[b] = keep ? (uint32_t)b : next++;
        bl_c2b[bl_b2c[b]] = (int16_t)b;
    }
}

/* s (valid UTF-8) as raw bytes if every character is in the byte-level alphabet; else -1. */
static long bl_decode(const char *s, size_t n, xbuf *o) {
    size_t start = o->n, i = 0;
    while (i < n) {
        int l;
        uint32_t c = u8_decode((const unsigned char *)s + i, n - i, &l);
        if (c >= 512 || bl_c2b[c] < 0) {
            o->n = start;
            return -1;
        }
        char byte = (char)bl_c2b[c];
        if (xb_put(o, &byte, 1)) return -2;
        i += (size_t)l;
    }
    return (long)(o->n - start);
}

/* ---------------------------------------------------------------- regexes */

typedef struct {
    pcre2_code *code;
    int jit;
} bre;

/* Oniguruma's \w is L|M|N|Pc (PCRE2's is L|N|_ ), \h a hex digit (PCRE2: horizontal space). */
#define ONIG_WORD "\\p{L}\\p{M}\\p{N}\\p{Pc}"

/* Rewrites an Oniguruma pattern into PCRE2 syntax with the same meaning, or says why it cannot. */
static int re_translate(const char *p, size_t n, xbuf *o, const char **why) {
    int in_class = 0;
    size_t class_first = 0;
#define PUT(s)                                                                                                         \
    do {                                                                                                               \
        if (xb_put(o, (s), strlen(s))) return (*why = "out of memory", -1);                                            \
    } while (0)
#define PUTN(s, k)                                                                                                     \
    do {                                                                                                               \
        if (xb_put(o, (s), (k))) return (*why = "out of memory", -1);                                                  \
    } while (0)
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c == '\\' && i + 1 < n) {
            char d = p[++i];
            switch (d) {
            case 'w':
                PUT(in_class ? ONIG_WORD : "[" ONIG_WORD "]");
                continue;
            case 'W':
                if (in_class) return (*why = "\\W inside a character class is not supported", -1);
                PUT("[^" ONIG_WORD "]");
                continue;
            case 'h':
                PUT(in_class ? "0-9a-fA-F" : "[0-9a-fA-F]");
                continue;
            case 'H':
                if (in_class) return (*why = "\\H inside a character class is not supported", -1);
                PUT("[^0-9a-fA-F]");
                continue;
            case 'b':
                if (in_class) {
                    PUT("\\x08");
                    continue;
                }
                return (*why = "\\b (a word boundary) is not supported", -1);
            case 'B':
                return (*why = "\\B (a word boundary) is not supported", -1);
            case 'u': { /* onig's \uHHHH */
                int hex = i + 4 < n;
                for (size_t k = 1; k <= 4 && hex; k++) {
                    char h = p[i + k];
                    hex = (h >= '0' && h <= '9') || (h >= 'a' && h <= 'f') || (h >= 'A' && h <= 'F');
                }
                if (!hex) return (*why = "\\u not followed by four hex digits", -1);
                PUT("\\x{");
                PUTN(p + i + 1, 4);
                PUT("}");
                i += 4;
                continue;
            }
            default: {
                char two[2] = {'\\', d};
                PUTN(two, 2);
                continue;
            }
            }
        }
        if (in_class) {
            if (c == '[') {
                if (i + 1 < n && p[i + 1] == ':') { /* a POSIX class [:alpha:] */
                    const char *end = NULL;
                    for (size_t k = i + 2; k + 1 < n; k++)
                        if (p[k] == ':' && p[k + 1] == ']') {
                            end = p + k + 2;
                            break;
                        }
                    if (!end) return (*why = "an unterminated [: :] class", -1);
                    PUTN(p + i, (size_t)(end - (p + i)));
                    i = (size_t)(end - p) - 1;
                    continue;
                }
                return (*why = "a nested character class is not supported", -1);
            }
            if (c == '&' && i + 1 < n && p[i + 1] == '&')
                return (*why = "&& (class intersection) is not supported", -1);
            if (c == ']' && i != class_first) in_class = 0;
            PUTN(&c, 1);
            continue;
        }
        if (c == '[') {
            in_class = 1;
            PUTN(&c, 1);
            if (i + 1 < n && p[i + 1] == '^') {
                PUT("^");
                i++;
            }
            class_first = i + 1;
            continue;
        }
        if (c == '(' && i + 2 < n && p[i + 1] == '?') {
            /* (?imx-imx) and (?imx-imx:...): only i means the same in both engines (onig's m is dotall) */
            size_t k = i + 2;
            int flags = 0, other = 0;
            while (k < n && ((p[k] >= 'a' && p[k] <= 'z') || (p[k] >= 'A' && p[k] <= 'Z') || p[k] == '-')) {
                flags = 1;
                if (p[k] != 'i' && p[k] != '-') other = 1;
                k++;
            }
            if (flags && k < n && (p[k] == ')' || p[k] == ':') && other)
                return (*why = "inline options other than (?i) are not supported", -1);
        }
        PUTN(&c, 1);
    }
    return 0; /* a lone trailing backslash stays, and PCRE2 refuses it as onig does */
#undef PUT
#undef PUTN
}

/* Compiles pattern p (literal: a plain string); on failure writes the reason into why. */
static int re_compile(bre *r, const char *p, size_t n, int literal, char *why, size_t whyn) {
    memset(r, 0, sizeof *r);
    xbuf t = {0};
    uint32_t opt = PCRE2_UTF;
    if (literal) {
        opt |= PCRE2_LITERAL;
        if (xb_put(&t, p, n)) return snprintf(why, whyn, "out of memory"), -1;
    } else {
        const char *w = NULL;
        if (re_translate(p, n, &t, &w)) {
            free(t.p);
            return snprintf(why, whyn, "%s", w), -1;
        }
        /* onig's ^ and $ are line anchors; . stops at \n only */
        opt |= PCRE2_UCP | PCRE2_MULTILINE;
    }
    pcre2_compile_context *cc = pcre2_compile_context_create(NULL);
    if (!cc) return free(t.p), snprintf(why, whyn, "out of memory"), -1;
    pcre2_set_newline(cc, PCRE2_NEWLINE_LF);
    int err;
    PCRE2_SIZE off;
    r->code = pcre2_compile((PCRE2_SPTR)(t.p ? t.p : ""), t.n, opt, &err, &off, cc);
    pcre2_compile_context_free(cc);
    free(t.p);
    if (!r->code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return snprintf(why, whyn, "PCRE2: %s at offset %zu", (const char *)msg, (size_t)off), -1;
    }
    r->jit = pcre2_jit_compile(r->code, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

static void re_free(bre *r) {
    if (r->code) pcre2_code_free(r->code);
    r->code = NULL;
}

/* ---------------------------------------------------------------- the tokenizer */

enum { NZ_REPLACE, NZ_PREPEND, NZ_LOWER, NZ_STRIP };
typedef struct {
    int kind;
    bre re;
    char *str; /* Replace's content, Prepend's prefix */
    size_t len;
    int left, right;
} nzstep;

enum { B_REMOVED, B_ISOLATED, B_MERGED_PREV, B_MERGED_NEXT, B_CONTIGUOUS };
enum { PT_SPLIT, PT_BYTELEVEL };
typedef struct {
    int kind;
    bre re;
    int behavior, invert;
    int add_prefix_space, use_regex;
} ptstep;

typedef struct {
    uint32_t off, len;   /* content */
    uint32_t noff, nlen; /* what is matched: the normalized content when `normalized` */
    int32_t id;
    unsigned char special, single_word, lstrip, rstrip, normalized;
} addtok;

typedef struct {
    int32_t child, sibling, tok;
    unsigned char byte;
} tnode;

typedef struct {
    tnode *v;
    size_t n, cap;
    int32_t root[256];
} trie;

typedef struct {
    uint64_t key;
    uint32_t rank;
    int32_t id; /* -1: empty slot */
} mslot;

typedef struct {
    int is_seq;
    int32_t *ids;
    int n;
} titem;

/* How one byte starts a word (HF's merge_word, per byte-level character). */
enum { BI_VOCAB, BI_FALLBACK, BI_UNK, BI_DROP };
typedef struct {
    int kind, n;
    int32_t ids[2];
} binit;

struct bpe {
    uint64_t serial; /* keys the threads' word caches */
    char *path;
    /* model */
    strmap vocab;  /* token string -> id */
    strmap rawmap; /* raw bytes -> id, for ignore_merges */
    mslot *merges;
    size_t mmask;
    int mbits;
    int32_t unk_id;
    int fuse_unk, byte_fallback, ignore_merges;
    binit bi[256];
    int32_t single[256]; /* a one-byte word's id, -1 when not simply a vocabulary character */
    /* added tokens */
    addtok *added;
    size_t n_added;
    xbuf apool;
    strmap addmap; /* content -> id */
    trie raw_trie, norm_trie;
    int has_raw, has_norm, any_single_word;
    bre wordchar;
    /* pipeline */
    nzstep *nz;
    int n_nz;
    locale_t lower_loc;
    ptstep pt[MAX_PT_STEPS];
    int n_pt;
    bre gpt2;
    titem *tmpl;
    int n_tmpl;
    int decoder_bytelevel;
    /* ids */
    int32_t n_ids;              /* highest id + 1 */
    int32_t *str_off, *str_len; /* the token string of each id (-1: no token) */
    int32_t *dec_off, *dec_len; /* its decoded bytes */
    unsigned char *special;     /* skipped by skip_special */
    xbuf spool, dpool;
    int bos, eos, pad;
};

static _Atomic uint64_t bpe_serials = 1;

/* ---------------------------------------------------------------- per-thread state */

typedef struct {
    uint64_t h;
    uint32_t koff, klen, ioff, nid;
} centry;

typedef struct {
    int32_t id, prev, next, alive;
} sym;

typedef struct {
    uint32_t rank, pos;
    int32_t id;
} hitem;

typedef struct {
    uint64_t owner;
    /* word cache */
    uint32_t *slot; /* entry + 1; 0 empty */
    size_t nslots, nent, entcap;
    centry *ent;
    xbuf keys;
    ivec cids;
    /* regex */
    pcre2_match_data *md;
    pcre2_match_context *mc;
    pcre2_jit_stack *js;
    /* scratch */
    spanvec marks[MAX_PT_STEPS + 1], pieces[MAX_PT_STEPS + 1], p1, p2, nmarks;
    xbuf fix, nb[2], pre, dbytes;
    ivec wids;
    sym *sy;
    size_t sycap;
    hitem *hp;
    size_t hpcap;
    /* the encode in progress */
    const struct bpe *b;
    int32_t *out;
    int cap, n;
    mill_err *e;
} tls;

static pthread_key_t tls_key;
static pthread_once_t tls_once = PTHREAD_ONCE_INIT;
static int tls_key_ok;

static void tls_destroy(void *p) {
    tls *T = p;
    if (!T) return;
    free(T->slot);
    free(T->ent);
    free(T->keys.p);
    free(T->cids.v);
    if (T->md) pcre2_match_data_free(T->md);
    if (T->mc) pcre2_match_context_free(T->mc);
    if (T->js) pcre2_jit_stack_free(T->js);
    for (int i = 0; i <= MAX_PT_STEPS; i++) free(T->marks[i].v), free(T->pieces[i].v);
    free(T->p1.v);
    free(T->p2.v);
    free(T->nmarks.v);
    free(T->fix.p);
    free(T->nb[0].p);
    free(T->nb[1].p);
    free(T->pre.p);
    free(T->dbytes.p);
    free(T->wids.v);
    free(T->sy);
    free(T->hp);
    free(T);
}

static void tls_init(void) { tls_key_ok = pthread_key_create(&tls_key, tls_destroy) == 0; }

static void cache_clear(tls *T) {
    if (T->slot) memset(T->slot, 0, T->nslots * sizeof *T->slot);
    T->nent = 0;
    T->keys.n = 0;
    T->cids.n = 0;
}

static tls *tls_get(const bpe *b, mill_err *e) {
    pthread_once(&tls_once, tls_init);
    if (!tls_key_ok) return mill_errf(e, "tokenizer: cannot create the per-thread state"), NULL;
    tls *T = pthread_getspecific(tls_key);
    if (!T) {
        T = calloc(1, sizeof *T);
        if (!T) return mill_errf(e, "tokenizer: out of memory"), NULL;
        T->md = pcre2_match_data_create(16, NULL);
        T->mc = pcre2_match_context_create(NULL);
        T->js = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
        if (!T->md || !T->mc || !T->js || pthread_setspecific(tls_key, T)) {
            tls_destroy(T);
            return mill_errf(e, "tokenizer: out of memory"), NULL;
        }
        pcre2_jit_stack_assign(T->mc, NULL, T->js);
    }
    if (T->owner != b->serial) {
        cache_clear(T);
        T->owner = b->serial;
    }
    T->b = b;
    T->e = e;
    return T;
}

/* ---------------------------------------------------------------- matching */

/* 1 and [*ms, *me) for the leftmost match at or after start, 0 for none, -1 on error. */
static int re_find(tls *T, const bre *r, const char *s, size_t n, size_t start, uint32_t opts, size_t *ms, size_t *me) {
    int rc = r->jit && !opts ? pcre2_jit_match(r->code, (PCRE2_SPTR)s, n, start, 0, T->md, T->mc)
                             : pcre2_match(r->code, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK | opts, T->md, T->mc);
    if (rc == PCRE2_ERROR_NOMATCH) return 0;
    if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        return mill_errf(T->e, "tokenizer: regex match failed on a piece of %zu bytes (PCRE2: %s)", n,
                         (const char *)msg);
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(T->md);
    if (ov[1] < ov[0]) return mill_errf(T->e, "tokenizer: regex match ended before it started (\\K is not supported)");
    *ms = ov[0];
    *me = ov[1];
    return 1;
}

/* HF's Pattern::find_matches over onig's find_iter: the text cut into (span, is_match) in order;
 * an empty match right where the last one ended is skipped and the search moves one character on. */
static int re_marks(tls *T, const bre *r, const char *s, size_t n, spanvec *out) {
    out->n = 0;
    if (n == 0) return sv_push(out, 0, 0, 0) ? mill_errf(T->e, "tokenizer: out of memory") : 0;
    size_t last_end = 0, last_match_end = 0, prev = 0;
    int have_last = 0;
    while (last_end <= n) {
        size_t ms, me;
        int rc = re_find(T, r, s, n, last_end, 0, &ms, &me);
        if (rc < 0) return -1;
        if (rc == 0) break;
        if (ms == me && have_last && last_match_end == me) {
            last_end += last_end < n ? (size_t)u8_len((unsigned char)s[last_end]) : 1;
            continue;
        }
        last_end = me;
        last_match_end = me;
        have_last = 1;
        if ((prev != ms && sv_push(out, (uint32_t)prev, (uint32_t)ms, 0)) ||
            sv_push(out, (uint32_t)ms, (uint32_t)me, 1))
            return mill_errf(T->e, "tokenizer: out of memory");
        prev = me;
    }
    if (prev != n && sv_push(out, (uint32_t)prev, (uint32_t)n, 0)) return mill_errf(T->e, "tokenizer: out of memory");
    return 0;
}

/* HF's NormalizedString::split: the pieces that survive a Split behavior. */
static int split_pieces(tls *T, const spanvec *m, int behavior, int invert, spanvec *out) {
    out->n = 0;
    int prev = 0;
    if (behavior == B_MERGED_NEXT) {
        for (size_t k = m->n; k-- > 0;) {
            int im = m->v[k].tag ^ invert;
            if (im && !prev && out->n)
                out->v[out->n - 1].a = m->v[k].a;
            else if (sv_push(out, m->v[k].a, m->v[k].b, 0))
                return mill_errf(T->e, "tokenizer: out of memory");
            prev = im;
        }
        for (size_t i = 0, j = out->n ? out->n - 1 : 0; i < j; i++, j--) {
            span t = out->v[i];
            out->v[i] = out->v[j];
            out->v[j] = t;
        }
        return 0;
    }
    for (size_t k = 0; k < m->n; k++) {
        int im = m->v[k].tag ^ invert;
        int extend = 0;
        switch (behavior) {
        case B_REMOVED:
            if (im) continue;
            break;
        case B_ISOLATED:
            break;
        case B_CONTIGUOUS:
            extend = im == prev && out->n;
            break;
        case B_MERGED_PREV:
            extend = im && !prev && out->n;
            break;
        }
        if (extend)
            out->v[out->n - 1].b = m->v[k].b;
        else if (sv_push(out, m->v[k].a, m->v[k].b, 0))
            return mill_errf(T->e, "tokenizer: out of memory");
        prev = im;
    }
    return 0;
}

/* ---------------------------------------------------------------- normalizer */

/* Runs the normalizer over s; the result is *o (s itself when there is none). */
static int nz_apply(tls *T, const char *s, size_t n, const char **o, size_t *on) {
    const bpe *b = T->b;
    *o = s;
    *on = n;
    for (int k = 0; k < b->n_nz; k++) {
        const nzstep *z = &b->nz[k];
        xbuf *d = &T->nb[k & 1];
        const char *src = *o;
        size_t sn = *on;
        d->n = 0;
        int oom = 0;
        switch (z->kind) {
        case NZ_REPLACE:
            if (re_marks(T, &z->re, src, sn, &T->nmarks)) return -1;
            for (size_t i = 0; i < T->nmarks.n && !oom; i++) {
                const span *p = &T->nmarks.v[i];
                oom = p->tag ? xb_put(d, z->str, z->len) : xb_put(d, src + p->a, p->b - p->a);
            }
            break;
        case NZ_PREPEND:
            if (sn) oom = xb_put(d, z->str, z->len) || xb_put(d, src, sn);
            break;
        case NZ_LOWER:
            for (size_t i = 0; i < sn && !oom;) {
                int l;
                uint32_t c = u8_decode((const unsigned char *)src + i, sn - i, &l);
                char u[8];
                if (c < 0x80) {
                    u[0] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
                    oom = xb_put(d, u, 1);
                } else if (c == 0x130) { /* the one full mapping: I with dot above -> i + combining dot */
                    oom = xb_put(d, "i\xCC\x87", 3);
                } else {
                    uint32_t lc = (uint32_t)towlower_l((wint_t)c, b->lower_loc);
                    oom = xb_put(d, u, (size_t)u8_encode(lc, u));
                }
                i += (size_t)l;
            }
            break;
        case NZ_STRIP: {
            size_t a = 0, e = sn;
            int l;
            while (z->left && a < e && is_white(u8_decode((const unsigned char *)src + a, e - a, &l))) a += (size_t)l;
            while (z->right && e > a) {
                size_t p = e - 1;
                while (p > a && ((unsigned char)src[p] & 0xC0) == 0x80) p--;
                if (!is_white(u8_decode((const unsigned char *)src + p, e - p, &l))) break;
                e = p;
            }
            oom = xb_put(d, src + a, e - a);
            break;
        }
        }
        if (oom) return mill_errf(T->e, "tokenizer: out of memory");
        *o = d->p ? d->p : "";
        *on = d->n;
    }
    return 0;
}

/* ---------------------------------------------------------------- added tokens */

static int trie_add(trie *t, const char *s, size_t n, int32_t tok) {
    if (n == 0) return 0; /* normalized to nothing: it can match nowhere */
    int32_t parent = -1, node = -1; /* an index, not a pointer into t->v: the realloc below moves it */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        int32_t k = parent < 0 ? t->root[(unsigned char)s[0]] : t->v[parent].child;
        while (k >= 0 && t->v[k].byte != c) k = t->v[k].sibling;
        if (k < 0) {
            if (t->n == t->cap) {
                size_t cap = t->cap ? 2 * t->cap : 256;
                tnode *v = realloc(t->v, cap * sizeof *v);
                if (!v) return -1;
                t->v = v;
                t->cap = cap;
            }
            int32_t *link = parent < 0 ? &t->root[(unsigned char)s[0]] : &t->v[parent].child;
            k = (int32_t)t->n++;
            t->v[k] = (tnode){-1, *link, -1, c};
            *link = k;
        }
        node = parent = k;
    }
    t->v[node].tok = tok;
    return 0;
}

/* The longest token starting at s[pos] (leftmost-longest is then the first pos that has one). */
static int trie_longest(const trie *t, const char *s, size_t n, size_t pos, size_t *len) {
    int32_t k = t->root[(unsigned char)s[pos]], best = -1;
    size_t d = 1;
    while (k >= 0) {
        if (t->v[k].tok >= 0) best = t->v[k].tok, *len = d;
        if (pos + d >= n) break;
        unsigned char c = (unsigned char)s[pos + d];
        int32_t ch = t->v[k].child;
        while (ch >= 0 && t->v[ch].byte != c) ch = t->v[ch].sibling;
        k = ch;
        d++;
    }
    return best;
}

/* Rust regex's \w (Alphabetic, M, Nd, Pc, Join_Control) for the character at s[p]. */
static int is_word_char(tls *T, const char *s, size_t n, size_t p) {
    size_t ms, me;
    int l = u8_len((unsigned char)s[p]);
    if (p + (size_t)l > n) l = (int)(n - p);
    return re_find(T, &T->b->wordchar, s + p, (size_t)l, 0, PCRE2_ANCHORED, &ms, &me) == 1;
}

/* HF's AddedVocabulary::find_matches: pieces of s, tag = added-token index or -1 for text. */
static int split_added(tls *T, const char *s, size_t n, const trie *tr, spanvec *out) {
    const bpe *b = T->b;
    out->n = 0;
    size_t pos = 0, start_offset = 0;
    while (pos < n) {
        size_t len = 0, at = pos;
        int32_t tok = -1;
        for (; at < n; at++)
            if (tr->root[(unsigned char)s[at]] >= 0 && (tok = trie_longest(tr, s, n, at, &len)) >= 0) break;
        if (tok < 0) break;
        size_t start = at, stop = at + len;
        pos = stop; /* the scan goes on after this match, whether it is taken or not */
        const addtok *a = &b->added[tok];
        if (a->single_word) {
            size_t q = start;
            if (q > 0) {
                q--;
                while (q > 0 && ((unsigned char)s[q] & 0xC0) == 0x80) q--;
            }
            int before_ok = start == 0 || !is_word_char(T, s, n, q);
            int after_ok = stop == n || !is_word_char(T, s, n, stop);
            if (!before_ok || !after_ok) continue;
        }
        if (a->lstrip) {
            size_t q = start;
            while (q > 0) {
                size_t p = q - 1;
                while (p > 0 && ((unsigned char)s[p] & 0xC0) == 0x80) p--;
                int l;
                if (!is_white(u8_decode((const unsigned char *)s + p, q - p, &l))) break;
                q = p;
            }
            start = q > start_offset ? q : start_offset;
        }
        if (a->rstrip) {
            int l;
            while (stop < n && is_white(u8_decode((const unsigned char *)s + stop, n - stop, &l))) stop += (size_t)l;
        }
        if (start < start_offset) continue; /* inside what an rstrip already took */
        if ((start_offset < start && sv_push(out, (uint32_t)start_offset, (uint32_t)start, -1)) ||
            sv_push(out, (uint32_t)start, (uint32_t)stop, tok))
            return mill_errf(T->e, "tokenizer: out of memory");
        start_offset = stop;
    }
    if (start_offset < n && sv_push(out, (uint32_t)start_offset, (uint32_t)n, -1))
        return mill_errf(T->e, "tokenizer: out of memory");
    return 0;
}

/* ---------------------------------------------------------------- BPE */

static inline const mslot *merge_get(const bpe *b, int32_t x, int32_t y) {
    uint64_t k = (uint64_t)(uint32_t)x << 32 | (uint32_t)y;
    size_t i = (size_t)((k * 0x9E3779B97F4A7C15ull) >> (64 - b->mbits));
    for (;; i = (i + 1) & b->mmask) {
        const mslot *m = &b->merges[i];
        if (m->id < 0) return NULL;
        if (m->key == k) return m;
    }
}

static inline int emit(tls *T, int32_t id) {
    if (T->n < T->cap) T->out[T->n] = id;
    if (T->n == INT_MAX) return mill_errf(T->e, "tokenizer: more than %d ids", INT_MAX);
    T->n++;
    return 0;
}

static int heap_push(tls *T, size_t *hn, uint32_t rank, uint32_t pos, int32_t id) {
    if (*hn == T->hpcap) {
        size_t c = T->hpcap ? 2 * T->hpcap : 256;
        hitem *v = realloc(T->hp, c * sizeof *v);
        if (!v) return mill_errf(T->e, "tokenizer: out of memory");
        T->hp = v;
        T->hpcap = c;
    }
    hitem *h = T->hp;
    size_t i = (*hn)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p].rank < rank || (h[p].rank == rank && h[p].pos <= pos)) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = (hitem){rank, pos, id};
    return 0;
}

static hitem heap_pop(tls *T, size_t *hn) {
    hitem *h = T->hp, top = h[0], last = h[--*hn];
    size_t i = 0, n = *hn;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && (h[c + 1].rank < h[c].rank || (h[c + 1].rank == h[c].rank && h[c + 1].pos < h[c].pos))) c++;
        if (last.rank < h[c].rank || (last.rank == h[c].rank && last.pos <= h[c].pos)) break;
        h[i] = h[c];
        i = c;
    }
    if (n) h[i] = last;
    return top;
}

/* HF's merge_word + Word::merge_all for one word of raw bytes: the ids into T->wids. */
static int merge_word(tls *T, const unsigned char *w, size_t n) {
    const bpe *b = T->b;
    T->wids.n = 0;
    if (b->ignore_merges) {
        int32_t id = sm_get(&b->rawmap, (const char *)w, n);
        if (id >= 0) {
            if (iv_reserve(&T->wids, 1)) return mill_errf(T->e, "tokenizer: out of memory");
            T->wids.v[T->wids.n++] = id;
            return 0;
        }
    }
    if (T->sycap < 2 * n + 2) {
        free(T->sy);
        T->sycap = 2 * n + 2;
        T->sy = malloc(T->sycap * sizeof *T->sy);
        if (!T->sy) return T->sycap = 0, mill_errf(T->e, "tokenizer: out of memory");
    }
    sym *y = T->sy;
    size_t m = 0;
    int pending = 0;
#define ADD(x) (y[m] = (sym){(x), (int32_t)m - 1, -1, 1}, m ? (void)(y[m - 1].next = (int32_t)m) : (void)0, m++)
    for (size_t i = 0; i < n; i++) {
        const binit *bi = &b->bi[w[i]];
        switch (bi->kind) {
        case BI_VOCAB:
            if (pending) ADD(b->unk_id), pending = 0;
            ADD(bi->ids[0]);
            break;
        case BI_FALLBACK:
            for (int k = 0; k < bi->n; k++) ADD(bi->ids[k]);
            break;
        case BI_UNK:
            if (pending && !b->fuse_unk) ADD(b->unk_id);
            pending = 1;
            break;
        default:
            break; /* no token, no unk: HF drops the character */
        }
    }
    if (pending) ADD(b->unk_id);
#undef ADD
    size_t hn = 0;
    for (size_t i = 0; i + 1 < m; i++) {
        const mslot *g = merge_get(b, y[i].id, y[i + 1].id);
        if (g && heap_push(T, &hn, g->rank, (uint32_t)i, g->id)) return -1;
    }
    while (hn) {
        hitem top = heap_pop(T, &hn);
        sym *s = &y[top.pos];
        if (!s->alive || s->next < 0) continue;
        int32_t r = s->next;
        const mslot *g = merge_get(b, s->id, y[r].id);
        if (!g || g->id != top.id) continue; /* stale: this pair changed since it was queued */
        s->id = top.id;
        s->next = y[r].next;
        y[r].alive = 0;
        if (s->next >= 0) y[s->next].prev = (int32_t)top.pos;
        if (s->prev >= 0) {
            g = merge_get(b, y[s->prev].id, s->id);
            if (g && heap_push(T, &hn, g->rank, (uint32_t)s->prev, g->id)) return -1;
        }
        if (s->next >= 0) {
            g = merge_get(b, s->id, y[s->next].id);
            if (g && heap_push(T, &hn, g->rank, top.pos, g->id)) return -1;
        }
    }
    if (iv_reserve(&T->wids, m)) return mill_errf(T->e, "tokenizer: out of memory");
    for (int32_t k = m ? 0 : -1; k >= 0; k = y[k].next) T->wids.v[T->wids.n++] = y[k].id;
    return 0;
}

static int cache_grow(tls *T, size_t nslots) {
    uint32_t *s = calloc(nslots, sizeof *s);
    if (!s) return -1;
    for (size_t k = 0; k < T->nent; k++) {
        size_t i = T->ent[k].h & (nslots - 1);
        while (s[i]) i = (i + 1) & (nslots - 1);
        s[i] = (uint32_t)k + 1;
    }
    free(T->slot);
    T->slot = s;
    T->nslots = nslots;
    return 0;
}

/* One pre-tokenized word (raw bytes) -> its ids, through the thread's cache. */
static int bpe_word(tls *T, const char *w, size_t n) {
    const bpe *b = T->b;
    if (n == 1 && b->single[(unsigned char)w[0]] >= 0) return emit(T, b->single[(unsigned char)w[0]]);
    uint64_t h = 0;
    size_t i = 0;
    int have_h = 0;
    if (n < CACHE_MAX_WORD && T->slot) {
        h = hash_bytes(w, n);
        have_h = 1;
        for (i = h & (T->nslots - 1); T->slot[i]; i = (i + 1) & (T->nslots - 1)) {
            const centry *c = &T->ent[T->slot[i] - 1];
            if (c->h == h && c->klen == n && memcmp(T->keys.p + c->koff, w, n) == 0) {
                for (uint32_t k = 0; k < c->nid; k++)
                    if (emit(T, T->cids.v[c->ioff + k])) return -1;
                return 0;
            }
        }
    }
    if (merge_word(T, (const unsigned char *)w, n)) return -1;
    for (size_t k = 0; k < T->wids.n; k++)
        if (emit(T, T->wids.v[k])) return -1;
    if (n >= CACHE_MAX_WORD) return 0;
    /* remember it; a full cache starts over (a bound on memory, not a policy worth more) */
    if (!T->slot || 2 * (T->nent + 1) > T->nslots || T->keys.n > UINT32_MAX / 2 || T->cids.n > UINT32_MAX / 2) {
        if (T->slot && (T->nslots >= ((size_t)1 << 20) || 2 * (T->nent + 1) <= T->nslots))
            cache_clear(T);
        else if (cache_grow(T, T->slot ? 2 * T->nslots : (size_t)1 << 14))
            return 0;
        have_h = 0;
    }
    if (!have_h) h = hash_bytes(w, n);
    for (i = h & (T->nslots - 1); T->slot[i]; i = (i + 1) & (T->nslots - 1)) {
    }
    if (T->nent == T->entcap) {
        size_t c = T->entcap ? 2 * T->entcap : 4096;
        centry *v = realloc(T->ent, c * sizeof *v);
        if (!v) return 0;
        T->ent = v;
        T->entcap = c;
    }
    if (xb_reserve(&T->keys, n) || iv_reserve(&T->cids, T->wids.n)) return 0;
    T->ent[T->nent] = (centry){h, (uint32_t)T->keys.n, (uint32_t)n, (uint32_t)T->cids.n, (uint32_t)T->wids.n};
    memcpy(T->keys.p + T->keys.n, w, n);
    T->keys.n += n;
    memcpy(T->cids.v + T->cids.n, T->wids.v, T->wids.n * sizeof *T->wids.v);
    T->cids.n += T->wids.n;
    T->slot[i] = (uint32_t)++T->nent;
    return 0;
}

/* ---------------------------------------------------------------- pre-tokenizer */

static int pt_run(tls *T, int k, const char *s, size_t n) {
    const bpe *b = T->b;
    if (n == 0) return 0;
    const ptstep *st = &b->pt[k];
    if (st->kind == PT_SPLIT) {
        if (re_marks(T, &st->re, s, n, &T->marks[k]) ||
            split_pieces(T, &T->marks[k], st->behavior, st->invert, &T->pieces[k]))
            return -1;
        const spanvec *pv = &T->pieces[k];
        for (size_t i = 0; i < pv->n; i++)
            if (pv->v[i].b > pv->v[i].a && pt_run(T, k + 1, s + pv->v[i].a, pv->v[i].b - pv->v[i].a)) return -1;
        return 0;
    }
    /* ByteLevel: always the last step */
    if (st->add_prefix_space && s[0] != ' ') {
        T->pre.n = 0;
        if (xb_put(&T->pre, " ", 1) || xb_put(&T->pre, s, n)) return mill_errf(T->e, "tokenizer: out of memory");
        s = T->pre.p;
        n = T->pre.n;
    }
    if (!st->use_regex) return bpe_word(T, s, n);
    if (re_marks(T, &b->gpt2, s, n, &T->marks[k])) return -1;
    const spanvec *mv = &T->marks[k];
    for (size_t i = 0; i < mv->n; i++)
        if (mv->v[i].b > mv->v[i].a && bpe_word(T, s + mv->v[i].a, mv->v[i].b - mv->v[i].a)) return -1;
    return 0;
}

/* Normalizer, then pre-tokenizer and BPE, for one piece that holds no added token. */
static int encode_piece(tls *T, const char *s, size_t n) {
    const char *ns;
    size_t nn;
    if (n == 0) return 0;
    if (nz_apply(T, s, n, &ns, &nn)) return -1;
    return pt_run(T, 0, ns, nn);
}

static int encode_text(tls *T, const char *s, size_t n, int match_added) {
    const bpe *b = T->b;
    if (!match_added || (!b->has_raw && !b->has_norm)) return encode_piece(T, s, n);
    if (b->has_raw) {
        if (split_added(T, s, n, &b->raw_trie, &T->p1)) return -1;
    } else {
        T->p1.n = 0;
        if (n && sv_push(&T->p1, 0, (uint32_t)n, -1)) return mill_errf(T->e, "tokenizer: out of memory");
    }
    for (size_t i = 0; i < T->p1.n; i++) {
        span p = T->p1.v[i];
        if (p.tag >= 0) {
            if (emit(T, b->added[p.tag].id)) return -1;
            continue;
        }
        if (p.b == p.a) continue;
        if (!b->has_norm) {
            if (encode_piece(T, s + p.a, p.b - p.a)) return -1;
            continue;
        }
        const char *ns;
        size_t nn;
        if (nz_apply(T, s + p.a, p.b - p.a, &ns, &nn)) return -1;
        if (nn == 0) continue;
        if (split_added(T, ns, nn, &b->norm_trie, &T->p2)) return -1;
        for (size_t j = 0; j < T->p2.n; j++) {
            span q = T->p2.v[j];
            if (q.tag >= 0) {
                if (emit(T, b->added[q.tag].id)) return -1;
            } else if (q.b > q.a && pt_run(T, 0, ns + q.a, q.b - q.a)) {
                return -1;
            }
        }
    }
    return 0;
}

int bpe_encode(const bpe *b, const char *text, size_t len, int match_added, int add_special, int32_t *out, int cap,
               int *n_out, mill_err *e) {
    *n_out = 0;
    if (len > 0 && !text) return mill_errf(e, "tokenizer: encode got NULL text with length %zu", len);
    if (len > (size_t)INT_MAX / 4) return mill_errf(e, "tokenizer: encode text of %zu bytes is over the limit", len);
    if (cap < 0 || (cap > 0 && !out)) return mill_errf(e, "tokenizer: encode got an output of %d ids", cap);
    tls *T = tls_get(b, e);
    if (!T) return -1;
    const char *s = len ? text : "";
    if (!u8_valid((const unsigned char *)s, len)) {
        T->fix.n = 0;
        if (xb_reserve(&T->fix, 3 * len)) return mill_errf(e, "tokenizer: out of memory");
        len = bpe_utf8_repair((const unsigned char *)s, len, T->fix.p);
        s = T->fix.p;
    }
    T->out = out;
    T->cap = cap;
    T->n = 0;
    int a0 = -1, a1 = -1;
    static const titem seq_only = {1, NULL, 0};
    int nt = b->n_tmpl ? b->n_tmpl : 1;
    for (int k = 0; k < nt; k++) {
        const titem *it = b->n_tmpl ? &b->tmpl[k] : &seq_only;
        if (!it->is_seq) {
            for (int j = 0; add_special && j < it->n; j++)
                if (emit(T, it->ids[j])) return -1;
        } else if (a0 < 0) {
            a0 = T->n;
            if (encode_text(T, s, len, match_added)) return -1;
            a1 = T->n;
        } else { /* the template names A twice: HF repeats the sequence */
            for (int j = a0; j < a1; j++)
                if (emit(T, j < cap ? out[j] : 0)) return -1;
        }
    }
    if (T->n > cap) {
        int need = T->n;
        return mill_errf(e, "tokenizer: encode needs %d ids, the output has room for %d", need, cap);
    }
    *n_out = T->n;
    return 0;
}

/* ---------------------------------------------------------------- decode */

static int out_put(char *out, size_t cap, size_t *w, const char *s, size_t n, int pos, mill_err *e) {
    if (n >= cap - *w) {
        out[*w] = 0;
        return mill_errf(e, "tokenizer: decode output of %zu bytes is too small (full at id position %d)", cap, pos);
    }
    memcpy(out + *w, s, n);
    *w += n;
    return 0;
}

int bpe_decode(const bpe *b, const int32_t *ids, int n, int skip_special, int lossy, char *out, size_t cap,
               mill_err *e) {
    if (cap == 0 || !out) return mill_errf(e, "tokenizer: decode output buffer has no room (cap 0)");
    out[0] = 0;
    if (n < 0) return mill_errf(e, "tokenizer: decode got n = %d ids", n);
    if (n > 0 && !ids) return mill_errf(e, "tokenizer: decode got NULL ids for n = %d", n);
    tls *T = tls_get(b, e);
    if (!T) return -1;
    xbuf *bytes = &T->dbytes;
    bytes->n = 0;
    size_t w = 0;
    int first = 1;
    for (int i = 0; i <= n; i++) {
        int32_t id = i < n ? ids[i] : -1;
        int bad = i < n && (id < 0 || id >= b->n_ids || b->str_off[id] < 0);
        if (bad && !lossy) {
            if (id < 0 || id >= b->n_ids)
                return mill_errf(e, "tokenizer: decode id %d at position %d is outside [0, %d)", (int)id, i, b->n_ids);
            return mill_errf(e, "tokenizer: decode id %d at position %d has no token (%s has none)", (int)id, i,
                             b->path);
        }
        if (i == n || bad) { /* flush the bytes gathered so far, as HF's one from_utf8_lossy */
            if (b->decoder_bytelevel && bytes->n) {
                T->fix.n = 0;
                if (xb_reserve(&T->fix, 3 * bytes->n)) return mill_errf(e, "tokenizer: out of memory");
                size_t k = bpe_utf8_repair((const unsigned char *)bytes->p, bytes->n, T->fix.p);
                if (out_put(out, cap, &w, T->fix.p, k, i, e)) return -1;
                bytes->n = 0;
            }
            if (i == n) break;
            char tag[32];
            int k = snprintf(tag, sizeof tag, "<|id:%d|>", (int)id);
            if (!b->decoder_bytelevel && !first && out_put(out, cap, &w, " ", 1, i, e)) return -1;
            if (out_put(out, cap, &w, tag, (size_t)k, i, e)) return -1;
            first = 0;
            continue;
        }
        if (skip_special && b->special[id]) continue;
        if (b->decoder_bytelevel) {
            if (xb_put(bytes, b->dpool.p + b->dec_off[id], (size_t)b->dec_len[id]))
                return mill_errf(e, "tokenizer: out of memory");
        } else { /* no decoder: HF joins the token strings with spaces */
            if (!first && out_put(out, cap, &w, " ", 1, i, e)) return -1;
            if (out_put(out, cap, &w, b->spool.p + b->str_off[id], (size_t)b->str_len[id], i, e)) return -1;
            first = 0;
        }
    }
    out[w] = 0;
    return 0;
}

int bpe_token_id(const bpe *b, const char *token) {
    if (!token) return -1;
    size_t n = strlen(token);
    int32_t id = sm_get(&b->addmap, token, n);
    return id >= 0 ? id : sm_get(&b->vocab, token, n);
}

size_t bpe_max_piece(const bpe *b) {
    size_t m = 32; /* a lossy "<|id:N|>" */
    for (int id = 0; id < b->n_ids; id++) {
        if (b->str_off[id] < 0) continue;
        /* byte-level: every byte may become a 3-byte U+FFFD; else the string and its joining space */
        size_t k = b->decoder_bytelevel ? 3 * (size_t)b->dec_len[id] : (size_t)b->str_len[id] + 1;
        if (k > m) m = k;
    }
    return m;
}

int bpe_vocab_size(const bpe *b) { return b->n_ids; }
int bpe_bos(const bpe *b) { return b->bos; }
int bpe_eos(const bpe *b) { return b->eos; }
int bpe_pad(const bpe *b) { return b->pad; }

/* ---------------------------------------------------------------- load */

typedef struct {
    const char *path;
    mill_err *e;
} lctx;

static int lerr(lctx *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int lerr(lctx *L, const char *fmt, ...) {
    char msg[800];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return mill_errf(L->e, "%s: %s", L->path, msg);
}

/* s quoted for one line of error: escapes, and cut at 60 bytes. */
static const char *q(const char *s, char buf[128]) {
    size_t w = 0;
    buf[w++] = '"';
    for (size_t i = 0; s && s[i] && w < 100; i++) {
        unsigned char c = (unsigned char)s[i];
        if (i >= 60) {
            memcpy(buf + w, "...", 3);
            w += 3;
            break;
        }
        if (c == '"' || c == '\\')
            buf[w++] = '\\', buf[w++] = (char)c;
        else if (c < 0x20)
            w += (size_t)snprintf(buf + w, 8, "\\x%02x", c);
        else
            buf[w++] = (char)c;
    }
    buf[w++] = '"';
    buf[w] = 0;
    return buf;
}

static const char *jtype(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

/* An optional boolean field; absent or null gives dflt. */
static int jbool(lctx *L, json_t *o, const char *key, int dflt, const char *where, int *out) {
    json_t *v = json_object_get(o, key);
    *out = dflt;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) return lerr(L, "%s.%s must be true or false, not %s", where, key, jtype(v));
    *out = json_is_true(v);
    return 0;
}

/* The "type" of a component object. */
static int jtypename(lctx *L, json_t *o, const char *where, const char **out) {
    if (!json_is_object(o)) return lerr(L, "%s must be an object, not %s", where, jtype(o));
    json_t *t = json_object_get(o, "type");
    if (!t) return lerr(L, "%s.type is missing", where);
    if (!json_is_string(t)) return lerr(L, "%s.type must be a string, not %s", where, jtype(t));
    *out = json_string_value(t);
    return 0;
}

/* A {"String": s} or {"Regex": r} pattern, compiled. */
static int jpattern(lctx *L, json_t *o, const char *where, bre *r) {
    json_t *p = json_object_get(o, "pattern");
    char why[400], qb[128];
    if (!p) return lerr(L, "%s.pattern is missing", where);
    json_t *s = json_is_object(p) ? json_object_get(p, "String") : NULL;
    json_t *x = json_is_object(p) ? json_object_get(p, "Regex") : NULL;
    if (!json_is_object(p) || json_object_size(p) != 1 || (!json_is_string(s) && !json_is_string(x)))
        return lerr(L, "%s.pattern must be {\"String\": \"...\"} or {\"Regex\": \"...\"}", where);
    json_t *v = s ? s : x;
    if (re_compile(r, json_string_value(v), json_string_length(v), s != NULL, why, sizeof why))
        return lerr(L, "%s.pattern.%s %s does not compile (%s)", where, s ? "String" : "Regex",
                    q(json_string_value(v), qb), why);
    return 0;
}

static int merge_put(bpe *b, int32_t x, int32_t y, uint32_t rank, int32_t id) {
    uint64_t k = (uint64_t)(uint32_t)x << 32 | (uint32_t)y;
    size_t i = (size_t)((k * 0x9E3779B97F4A7C15ull) >> (64 - b->mbits));
    for (;; i = (i + 1) & b->mmask) {
        mslot *m = &b->merges[i];
        if (m->id < 0 || m->key == k) { /* a repeated pair: the later rank wins, as in HF's map */
            *m = (mslot){k, rank, id};
            return 0;
        }
    }
}

static int load_model(lctx *L, bpe *b, json_t *root) {
    json_t *m = json_object_get(root, "model");
    const char *type;
    char qb[128], qc[128];
    if (!m || json_is_null(m)) return lerr(L, "model is missing");
    if (jtypename(L, m, "model", &type)) return -1;
    if (strcmp(type, "BPE")) return lerr(L, "model.type %s is not supported (only \"BPE\")", q(type, qb));
    json_t *dropout = json_object_get(m, "dropout");
    if (dropout && !json_is_null(dropout) && !(json_is_number(dropout) && json_number_value(dropout) == 0.0))
        return lerr(L, "model.dropout must be null or 0 (dropout makes encoding random)");
    const char *opt_str[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(m, opt_str[i]);
        if (v && !json_is_null(v) && !(json_is_string(v) && json_string_length(v) == 0))
            return lerr(L, "model.%s must be null or \"\" (a byte-level BPE has none)", opt_str[i]);
    }
    if (jbool(L, m, "fuse_unk", 0, "model", &b->fuse_unk) ||
        jbool(L, m, "byte_fallback", 0, "model", &b->byte_fallback) ||
        jbool(L, m, "ignore_merges", 0, "model", &b->ignore_merges))
        return -1;
    json_t *vocab = json_object_get(m, "vocab"), *merges = json_object_get(m, "merges");
    if (!vocab) return lerr(L, "model.vocab is missing");
    if (!json_is_object(vocab)) return lerr(L, "model.vocab must be an object of token -> id, not %s", jtype(vocab));
    if (!merges) return lerr(L, "model.merges is missing");
    if (!json_is_array(merges)) return lerr(L, "model.merges must be an array, not %s", jtype(merges));
    /* the vocabulary */
    int32_t max_id = -1;
    const char *key;
    json_t *val;
    strmap byid = {0}; /* catches two tokens with one id */
    json_object_foreach(vocab, key, val) {
        if (!json_is_integer(val) || json_integer_value(val) < 0 || json_integer_value(val) >= INT32_MAX - 1) {
            sm_free(&byid);
            return lerr(L, "model.vocab[%s] must be an id in [0, %d), not %s", q(key, qb), INT32_MAX - 1, jtype(val));
        }
        int32_t id = (int32_t)json_integer_value(val), had;
        char idk[16];
        int kl = snprintf(idk, sizeof idk, "%d", (int)id);
        if (sm_put(&b->vocab, key, strlen(key), id, &had) || sm_put(&byid, idk, (size_t)kl, id, &had)) {
            sm_free(&byid);
            return lerr(L, "out of memory reading model.vocab");
        }
        if (had >= 0) {
            sm_free(&byid);
            return lerr(L, "model.vocab[%s]: id %d is given to another token too", q(key, qb), (int)id);
        }
        if (id > max_id) max_id = id;
    }
    sm_free(&byid);
    b->n_ids = max_id + 1;
    /* the merges, by rank */
    size_t nm = json_array_size(merges);
    b->mbits = 10;
    while (((size_t)1 << b->mbits) < 2 * nm + 16) b->mbits++;
    b->mmask = ((size_t)1 << b->mbits) - 1;
    b->merges = malloc((b->mmask + 1) * sizeof *b->merges);
    if (!b->merges) return lerr(L, "out of memory for %zu merges", nm);
    for (size_t i = 0; i <= b->mmask; i++) b->merges[i].id = -1;
    xbuf cat = {0};
    for (size_t r = 0; r < nm; r++) {
        json_t *x = json_array_get(merges, r);
        const char *pa, *pb;
        size_t la, lb;
        if (json_is_string(x)) {
            const char *s = json_string_value(x), *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                free(cat.p);
                return lerr(L, "model.merges[%zu] %s is not two tokens separated by one space", r, q(s, qb));
            }
            pa = s, la = (size_t)(sp - s), pb = sp + 1, lb = strlen(sp + 1);
        } else if (json_is_array(x) && json_array_size(x) == 2 && json_is_string(json_array_get(x, 0)) &&
                   json_is_string(json_array_get(x, 1))) {
            pa = json_string_value(json_array_get(x, 0)), la = json_string_length(json_array_get(x, 0));
            pb = json_string_value(json_array_get(x, 1)), lb = json_string_length(json_array_get(x, 1));
        } else {
            free(cat.p);
            return lerr(L, "model.merges[%zu] must be \"a b\" or [\"a\", \"b\"], not %s", r, jtype(x));
        }
        int32_t ia = sm_get(&b->vocab, pa, la), ib = sm_get(&b->vocab, pb, lb);
        cat.n = 0;
        if (xb_put(&cat, pa, la) || xb_put(&cat, pb, lb) || xb_put(&cat, "", 1)) {
            free(cat.p);
            return lerr(L, "out of memory reading model.merges");
        }
        int32_t ic = sm_get(&b->vocab, cat.p, la + lb);
        if (ia < 0 || ib < 0 || ic < 0) {
            char tmp[2][256];
            snprintf(tmp[0], sizeof tmp[0], "%.*s", (int)(la < 200 ? la : 200), pa);
            snprintf(tmp[1], sizeof tmp[1], "%.*s", (int)(lb < 200 ? lb : 200), pb);
            int rc = lerr(L, "model.merges[%zu] (%s, %s): %s is not in model.vocab", r, q(tmp[0], qb), q(tmp[1], qc),
                          ia < 0   ? "the first token"
                          : ib < 0 ? "the second token"
                                   : "the merged token");
            free(cat.p);
            return rc;
        }
        merge_put(b, ia, ib, (uint32_t)r, ic);
    }
    free(cat.p);
    /* unk */
    json_t *unk = json_object_get(m, "unk_token");
    b->unk_id = -1;
    if (unk && !json_is_null(unk)) {
        if (!json_is_string(unk)) return lerr(L, "model.unk_token must be a string or null, not %s", jtype(unk));
        b->unk_id = sm_get(&b->vocab, json_string_value(unk), json_string_length(unk));
        if (b->unk_id < 0) return lerr(L, "model.unk_token %s is not in model.vocab", q(json_string_value(unk), qb));
    }
    return 0;
}

static int load_normalizer(lctx *L, bpe *b, json_t *n, const char *where, int depth) {
    const char *type;
    char qb[128], w[160];
    if (!n || json_is_null(n)) return 0;
    if (jtypename(L, n, where, &type)) return -1;
    if (!strcmp(type, "Sequence")) {
        json_t *a = json_object_get(n, "normalizers");
        if (!json_is_array(a)) return lerr(L, "%s.normalizers must be an array", where);
        if (depth > 4) return lerr(L, "%s: Sequence nested too deep", where);
        for (size_t i = 0; i < json_array_size(a); i++) {
            snprintf(w, sizeof w, "%s.normalizers[%zu]", where, i);
            if (load_normalizer(L, b, json_array_get(a, i), w, depth + 1)) return -1;
        }
        return 0;
    }
    nzstep z = {0};
    if (!strcmp(type, "Replace")) {
        json_t *c = json_object_get(n, "content");
        if (!json_is_string(c)) return lerr(L, "%s.content must be a string", where);
        if (jpattern(L, n, where, &z.re)) return -1;
        z.kind = NZ_REPLACE;
        z.len = json_string_length(c);
        z.str = malloc(z.len + 1);
        if (!z.str) return re_free(&z.re), lerr(L, "out of memory");
        memcpy(z.str, json_string_value(c), z.len + 1);
    } else if (!strcmp(type, "Prepend")) {
        json_t *c = json_object_get(n, "prepend");
        if (!json_is_string(c)) return lerr(L, "%s.prepend must be a string", where);
        z.kind = NZ_PREPEND;
        z.len = json_string_length(c);
        z.str = malloc(z.len + 1);
        if (!z.str) return lerr(L, "out of memory");
        memcpy(z.str, json_string_value(c), z.len + 1);
    } else if (!strcmp(type, "Lowercase")) {
        z.kind = NZ_LOWER;
        if (!b->lower_loc) {
            b->lower_loc = newlocale(LC_CTYPE_MASK, "C.UTF-8", (locale_t)0);
            if (!b->lower_loc)
                return lerr(L, "%s.type \"Lowercase\" needs the C.UTF-8 locale, which this system lacks", where);
        }
    } else if (!strcmp(type, "Strip")) {
        z.kind = NZ_STRIP;
        if (jbool(L, n, "strip_left", 1, where, &z.left) || jbool(L, n, "strip_right", 1, where, &z.right)) return -1;
    } else if (!strcmp(type, "NFC") || !strcmp(type, "NFD") || !strcmp(type, "NFKC") || !strcmp(type, "NFKD")) {
        return lerr(L, "%s.type %s is not supported (Unicode normalization needs tables mill does not carry)", where,
                    q(type, qb));
    } else {
        return lerr(L, "%s.type %s is not supported", where, q(type, qb));
    }
    nzstep *v = realloc(b->nz, (size_t)(b->n_nz + 1) * sizeof *v);
    if (!v) return re_free(&z.re), free(z.str), lerr(L, "out of memory");
    b->nz = v;
    b->nz[b->n_nz++] = z;
    return 0;
}

static int load_pretok_step(lctx *L, bpe *b, json_t *p, const char *where) {
    const char *type;
    char qb[128];
    if (jtypename(L, p, where, &type)) return -1;
    if (b->n_pt && b->pt[b->n_pt - 1].kind == PT_BYTELEVEL)
        return lerr(L, "%s: nothing may follow the ByteLevel pre-tokenizer", where);
    if (b->n_pt == MAX_PT_STEPS) return lerr(L, "%s: more than %d pre-tokenizer steps", where, MAX_PT_STEPS);
    ptstep *st = &b->pt[b->n_pt];
    memset(st, 0, sizeof *st);
    if (!strcmp(type, "Split")) {
        static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
        json_t *bh = json_object_get(p, "behavior");
        if (!json_is_string(bh)) return lerr(L, "%s.behavior must be a string", where);
        int k = 0;
        while (k < 5 && strcmp(names[k], json_string_value(bh))) k++;
        if (k == 5)
            return lerr(
                L, "%s.behavior %s is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous",
                where, q(json_string_value(bh), qb));
        if (jbool(L, p, "invert", 0, where, &st->invert)) return -1;
        if (jpattern(L, p, where, &st->re)) return -1;
        st->kind = PT_SPLIT;
        st->behavior = k;
    } else if (!strcmp(type, "ByteLevel")) {
        st->kind = PT_BYTELEVEL;
        if (jbool(L, p, "add_prefix_space", 1, where, &st->add_prefix_space) ||
            jbool(L, p, "use_regex", 1, where, &st->use_regex))
            return -1;
        if (st->use_regex && !b->gpt2.code) {
            static const char gpt2[] =
                "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
            char why[300];
            if (re_compile(&b->gpt2, gpt2, strlen(gpt2), 0, why, sizeof why))
                return lerr(L, "%s: the GPT-2 regex: %s", where, why);
        }
    } else {
        return lerr(L, "%s.type %s is not supported", where, q(type, qb));
    }
    b->n_pt++;
    return 0;
}

static int load_pretok(lctx *L, bpe *b, json_t *p) {
    const char *type;
    char w[96];
    if (!p || json_is_null(p)) return lerr(L, "pre_tokenizer is missing (a byte-level BPE needs ByteLevel)");
    if (jtypename(L, p, "pre_tokenizer", &type)) return -1;
    if (!strcmp(type, "Sequence")) {
        json_t *a = json_object_get(p, "pretokenizers");
        if (!json_is_array(a)) return lerr(L, "pre_tokenizer.pretokenizers must be an array");
        for (size_t i = 0; i < json_array_size(a); i++) {
            snprintf(w, sizeof w, "pre_tokenizer.pretokenizers[%zu]", i);
            if (load_pretok_step(L, b, json_array_get(a, i), w)) return -1;
        }
    } else if (load_pretok_step(L, b, p, "pre_tokenizer")) {
        return -1;
    }
    if (!b->n_pt || b->pt[b->n_pt - 1].kind != PT_BYTELEVEL)
        return lerr(L, "pre_tokenizer: a ByteLevel step must come last (this is a byte-level BPE)");
    return 0;
}

/* Error paths: a template's items own their ids (tests/fuzz found free(nt) leaking them). */
static void titems_free(titem *t, int n) {
    for (int k = 0; t && k < n; k++) free(t[k].ids);
    free(t);
}

/* Composes one TemplateProcessing's "single" onto the template so far ([A] to begin with). */
static int load_template(lctx *L, bpe *b, json_t *p, const char *where) {
    char qb[128];
    json_t *single = json_object_get(p, "single"), *sp = json_object_get(p, "special_tokens");
    if (!json_is_array(single)) return lerr(L, "%s.single must be an array of pieces", where);
    if (sp && !json_is_object(sp) && !json_is_null(sp)) return lerr(L, "%s.special_tokens must be an object", where);
    if (!b->n_tmpl) {
        b->tmpl = calloc(1, sizeof *b->tmpl);
        if (!b->tmpl) return lerr(L, "out of memory");
        b->tmpl[0].is_seq = 1;
        b->n_tmpl = 1;
    }
    titem *nt = NULL;
    int nn = 0;
    for (size_t i = 0; i < json_array_size(single); i++) {
        json_t *piece = json_array_get(single, i), *tok = json_object_get(piece, "SpecialToken"),
               *seq = json_object_get(piece, "Sequence");
        int add = 0;
        titem *src = NULL;
        titem one = {0};
        if (json_is_object(seq)) {
            json_t *id = json_object_get(seq, "id");
            if (!json_is_string(id) || strcmp(json_string_value(id), "A")) {
                titems_free(nt, nn);
                return lerr(L, "%s.single[%zu].Sequence.id must be \"A\" (a single sequence)", where, i);
            }
            src = b->tmpl;
            add = b->n_tmpl;
        } else if (json_is_object(tok)) {
            json_t *id = json_object_get(tok, "id");
            json_t *st = json_is_string(id) && json_is_object(sp) ? json_object_get(sp, json_string_value(id)) : NULL;
            json_t *ids = st ? json_object_get(st, "ids") : NULL;
            if (!json_is_string(id)) {
                titems_free(nt, nn);
                return lerr(L, "%s.single[%zu].SpecialToken.id must be a string", where, i);
            }
            if (!json_is_array(ids)) {
                titems_free(nt, nn);
                return lerr(L, "%s.special_tokens has no entry %s with \"ids\" for single[%zu]", where,
                            q(json_string_value(id), qb), i);
            }
            one.n = (int)json_array_size(ids);
            one.ids = malloc(sizeof(int32_t) * (size_t)(one.n ? one.n : 1));
            if (!one.ids) return titems_free(nt, nn), lerr(L, "out of memory");
            for (int k = 0; k < one.n; k++) {
                json_t *x = json_array_get(ids, (size_t)k);
                if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) > INT32_MAX) {
                    free(one.ids);
                    titems_free(nt, nn);
                    return lerr(L, "%s.special_tokens[%s].ids[%d] must be a token id", where,
                                q(json_string_value(id), qb), k);
                }
                one.ids[k] = (int32_t)json_integer_value(x);
            }
            src = &one;
            add = 1;
        } else {
            titems_free(nt, nn);
            return lerr(L, "%s.single[%zu] must be {\"SpecialToken\": ...} or {\"Sequence\": ...}", where, i);
        }
        titem *v = realloc(nt, (size_t)(nn + add) * sizeof *v);
        if (!v) return free(one.ids), titems_free(nt, nn), lerr(L, "out of memory");
        nt = v;
        for (int k = 0; k < add; k++) {
            nt[nn] = src[k];
            if (!src[k].is_seq && src != &one) { /* copy: the old template is freed below */
                nt[nn].ids = malloc(sizeof(int32_t) * (size_t)(src[k].n ? src[k].n : 1));
                if (!nt[nn].ids) return titems_free(nt, nn), lerr(L, "out of memory");
                memcpy(nt[nn].ids, src[k].ids, sizeof(int32_t) * (size_t)src[k].n);
            }
            nn++;
        }
    }
    for (int k = 0; k < b->n_tmpl; k++) free(b->tmpl[k].ids);
    free(b->tmpl);
    b->tmpl = nt;
    b->n_tmpl = nn;
    if (!nn) { /* an empty template: nothing at all, HF gives no ids */
        b->tmpl = calloc(1, sizeof *b->tmpl);
        if (!b->tmpl) return lerr(L, "out of memory");
        b->tmpl[0].is_seq = 0;
        b->n_tmpl = 1;
    }
    return 0;
}

static int load_post(lctx *L, bpe *b, json_t *p, const char *where, int depth) {
    const char *type;
    char qb[128], w[128];
    if (!p || json_is_null(p)) return 0;
    if (jtypename(L, p, where, &type)) return -1;
    if (!strcmp(type, "ByteLevel")) return 0; /* it only trims offsets */
    if (!strcmp(type, "TemplateProcessing")) return load_template(L, b, p, where);
    if (!strcmp(type, "Sequence")) {
        json_t *a = json_object_get(p, "processors");
        if (!json_is_array(a)) return lerr(L, "%s.processors must be an array", where);
        if (depth > 4) return lerr(L, "%s: Sequence nested too deep", where);
        for (size_t i = 0; i < json_array_size(a); i++) {
            snprintf(w, sizeof w, "%s.processors[%zu]", where, i);
            if (load_post(L, b, json_array_get(a, i), w, depth + 1)) return -1;
        }
        return 0;
    }
    return lerr(L, "%s.type %s is not supported", where, q(type, qb));
}

static int load_decoder(lctx *L, bpe *b, json_t *d) {
    const char *type;
    char qb[128];
    if (!d || json_is_null(d)) return 0;
    if (jtypename(L, d, "decoder", &type)) return -1;
    if (!strcmp(type, "Sequence")) {
        json_t *a = json_object_get(d, "decoders");
        if (!json_is_array(a)) return lerr(L, "decoder.decoders must be an array");
        if (json_array_size(a) > 1) return lerr(L, "decoder.decoders: only one ByteLevel decoder is supported");
        for (size_t i = 0; i < json_array_size(a); i++) {
            json_t *x = json_array_get(a, i);
            if (jtypename(L, x, "decoder.decoders[0]", &type)) return -1;
            if (strcmp(type, "ByteLevel"))
                return lerr(L, "decoder.decoders[%zu].type %s is not supported", i, q(type, qb));
            b->decoder_bytelevel = 1;
        }
        return 0;
    }
    if (strcmp(type, "ByteLevel")) return lerr(L, "decoder.type %s is not supported", q(type, qb));
    b->decoder_bytelevel = 1;
    return 0;
}

static int load_added(lctx *L, bpe *b, json_t *a, tls *T) {
    char qb[128];
    if (!a || json_is_null(a)) return 0;
    if (!json_is_array(a)) return lerr(L, "added_tokens must be an array, not %s", jtype(a));
    size_t n = json_array_size(a);
    b->added = calloc(n ? n : 1, sizeof *b->added);
    if (!b->added) return lerr(L, "out of memory");
    int32_t next_id = (int32_t)b->vocab.n; /* HF: the vocabulary's size, then on */
    for (size_t i = 0; i < n; i++) {
        json_t *t = json_array_get(a, i), *c = json_object_get(t, "content"), *id = json_object_get(t, "id");
        char w[64];
        snprintf(w, sizeof w, "added_tokens[%zu]", i);
        if (!json_is_object(t)) return lerr(L, "%s must be an object", w);
        if (!json_is_string(c)) return lerr(L, "%s.content must be a string", w);
        if (id && !json_is_integer(id)) return lerr(L, "%s.id must be an integer", w);
        if (json_string_length(c) == 0) continue; /* HF ignores an empty token */
        addtok x = {0};
        int sw, ls, rs, nz, sp;
        if (jbool(L, t, "special", 0, w, &sp) || jbool(L, t, "single_word", 0, w, &sw) ||
            jbool(L, t, "lstrip", 0, w, &ls) || jbool(L, t, "rstrip", 0, w, &rs) ||
            jbool(L, t, "normalized", !sp, w, &nz))
            return -1;
        x.special = (unsigned char)sp, x.single_word = (unsigned char)sw, x.lstrip = (unsigned char)ls;
        x.rstrip = (unsigned char)rs, x.normalized = (unsigned char)nz;
        const char *s = json_string_value(c);
        size_t sl = json_string_length(c);
        if (memchr(s, 0, sl)) return lerr(L, "%s.content holds a NUL byte", w);
        int32_t vid = sm_get(&b->vocab, s, sl), had;
        x.id = vid >= 0 ? vid : next_id++;
        if (id && json_integer_value(id) != x.id)
            return lerr(
                L, "%s %s: id %lld, but HF gives it %d (%s)", w, q(s, qb), (long long)json_integer_value(id), (int)x.id,
                vid >= 0 ? "its id in model.vocab" : "the next id after model.vocab and the added tokens before it");
        if (sm_put(&b->addmap, s, sl, x.id, &had)) return lerr(L, "out of memory");
        if (had >= 0) return lerr(L, "%s.content %s repeats an earlier added token", w, q(s, qb));
        x.off = (uint32_t)b->apool.n;
        x.len = (uint32_t)sl;
        if (xb_put(&b->apool, s, sl)) return lerr(L, "out of memory");
        x.noff = x.off, x.nlen = x.len;
        if (x.normalized && b->n_nz) {
            const char *ns;
            size_t nn;
            if (nz_apply(T, b->apool.p + x.off, sl, &ns, &nn))
                return lerr(L, "%s: normalizing its content: %s", w, T->e->msg);
            if (nn == 0) return lerr(L, "%s.content %s normalizes to nothing", w, q(s, qb));
            x.noff = (uint32_t)b->apool.n;
            x.nlen = (uint32_t)nn;
            if (xb_put(&b->apool, ns, nn)) return lerr(L, "out of memory");
        }
        if (x.single_word) b->any_single_word = 1;
        b->added[b->n_added++] = x;
        if (x.id >= b->n_ids) b->n_ids = x.id + 1;
    }
    /* a vocabulary entry whose id an added token took, under another string, would decode as the added token */
    for (size_t i = 0; i < b->n_added; i++) {
        const addtok *x = &b->added[i];
        if (sm_get(&b->vocab, b->apool.p + x->off, x->len) >= 0) continue;
        for (size_t k = 0; k < b->vocab.n; k++)
            if (b->vocab.ent[k].val == x->id) {
                char qc[128];
                return lerr(L, "added_tokens: id %d is both %s (model.vocab) and %s (added)", (int)x->id,
                            q(b->vocab.pool.p + b->vocab.ent[k].off, qc), q(b->apool.p + x->off, qb));
            }
    }
    for (size_t i = 0; i < b->n_added; i++) {
        const addtok *x = &b->added[i];
        trie *tr = x->normalized ? &b->norm_trie : &b->raw_trie;
        if (trie_add(tr, b->apool.p + x->noff, x->nlen, (int32_t)i)) return lerr(L, "out of memory");
        if (x->normalized)
            b->has_norm = 1;
        else
            b->has_raw = 1;
    }
    if (b->any_single_word) {
        static const char wc[] = "[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]";
        int err;
        PCRE2_SIZE off;
        b->wordchar.code =
            pcre2_compile((PCRE2_SPTR)wc, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &off, NULL);
        if (!b->wordchar.code) return lerr(L, "single_word: this PCRE2 lacks the Unicode properties it needs");
    }
    return 0;
}

/* Token strings, decoded bytes and the special flag of every id; how each byte starts a word. */
static int build_tables(lctx *L, bpe *b) {
    size_t n = (size_t)b->n_ids;
    b->str_off = malloc((n ? n : 1) * sizeof(int32_t));
    b->str_len = malloc((n ? n : 1) * sizeof(int32_t));
    b->dec_off = malloc((n ? n : 1) * sizeof(int32_t));
    b->dec_len = malloc((n ? n : 1) * sizeof(int32_t));
    b->special = calloc(n ? n : 1, 1);
    if (!b->str_off || !b->str_len || !b->dec_off || !b->dec_len || !b->special) return lerr(L, "out of memory");
    for (size_t i = 0; i < n; i++) b->str_off[i] = -1, b->str_len[i] = 0;
    /* vocabulary first, then added tokens over it (HF looks the added ones up first) */
    for (size_t k = 0; k < b->vocab.n; k++) {
        const sm_ent *x = &b->vocab.ent[k];
        b->str_off[x->val] = (int32_t)b->spool.n;
        b->str_len[x->val] = (int32_t)x->len;
        if (xb_put(&b->spool, b->vocab.pool.p + x->off, x->len)) return lerr(L, "out of memory");
    }
    strmap specials = {0};
    for (size_t i = 0; i < b->n_added; i++) {
        const addtok *x = &b->added[i];
        int32_t had;
        b->str_off[x->id] = (int32_t)b->spool.n;
        b->str_len[x->id] = (int32_t)x->nlen; /* HF decodes the normalized content */
        if (xb_put(&b->spool, b->apool.p + x->noff, x->nlen) ||
            (x->special && sm_put(&specials, b->apool.p + x->off, x->len, 1, &had))) {
            sm_free(&specials);
            return lerr(L, "out of memory");
        }
    }
    for (size_t i = 0; i < n; i++) {
        b->dec_off[i] = (int32_t)b->dpool.n;
        b->dec_len[i] = 0;
        if (b->str_off[i] < 0) continue;
        const char *s = b->spool.p + b->str_off[i];
        size_t l = (size_t)b->str_len[i];
        b->special[i] = sm_get(&specials, s, l) >= 0;
        long k = bl_decode(s, l, &b->dpool);
        if (k == -2) return sm_free(&specials), lerr(L, "out of memory");
        if (k < 0) { /* a character outside the alphabet: HF keeps the token's own UTF-8 */
            if (xb_put(&b->dpool, s, l)) return sm_free(&specials), lerr(L, "out of memory");
            k = (long)l;
        }
        b->dec_len[i] = (int32_t)k;
    }
    sm_free(&specials);
    if (b->dpool.n > INT32_MAX || b->spool.n > INT32_MAX) return lerr(L, "the token strings are over 2 GiB");
    /* a word's first symbols, per byte (HF's merge_word over byte-level characters) */
    for (int c = 0; c < 256; c++) {
        char u[4];
        int ul = u8_encode(bl_b2c[c], u);
        binit *bi = &b->bi[c];
        int32_t id = sm_get(&b->vocab, u, (size_t)ul);
        b->single[c] = -1;
        if (id >= 0) {
            *bi = (binit){BI_VOCAB, 1, {id, -1}};
            b->single[c] = id;
            continue;
        }
        if (b->byte_fallback) {
            int ok = 1;
            for (int k = 0; k < ul && ok; k++) {
                char code[8];
                snprintf(code, sizeof code, "<0x%02X>", (unsigned char)u[k]);
                bi->ids[k] = sm_get(&b->vocab, code, strlen(code));
                ok = bi->ids[k] >= 0;
            }
            if (ok) {
                bi->kind = BI_FALLBACK;
                bi->n = ul;
                continue;
            }
        }
        bi->kind = b->unk_id >= 0 ? BI_UNK : BI_DROP;
        bi->n = 0;
    }
    if (b->ignore_merges) {
        xbuf raw = {0};
        for (size_t k = 0; k < b->vocab.n; k++) {
            const sm_ent *x = &b->vocab.ent[k];
            raw.n = 0;
            long l = bl_decode(b->vocab.pool.p + x->off, x->len, &raw);
            int32_t had;
            if (l == -2 || (l >= 0 && sm_put(&b->rawmap, raw.p ? raw.p : "", (size_t)l, x->val, &had))) {
                free(raw.p);
                return lerr(L, "out of memory");
            }
        }
        free(raw.p);
    }
    return 0;
}

static int load_config(bpe *b, const char *path, mill_err *e) {
    lctx L = {path, e};
    json_error_t je;
    char qb[128];
    json_t *root = json_load_file(path, 0, &je);
    if (!root) return lerr(&L, "not valid JSON (line %d, column %d: %s)", je.line, je.column, je.text);
    int rc = 0;
    if (!json_is_object(root)) rc = lerr(&L, "must be a JSON object");
    const char *keys[] = {"bos_token", "eos_token", "pad_token"};
    int *dst[] = {&b->bos, &b->eos, &b->pad};
    for (int i = 0; i < 3 && !rc; i++) {
        json_t *v = json_object_get(root, keys[i]);
        *dst[i] = -1;
        if (!v || json_is_null(v)) continue;
        json_t *s = json_is_object(v) ? json_object_get(v, "content") : v;
        if (!json_is_string(s)) {
            rc = lerr(&L, "%s must be a string or {\"content\": \"...\"}, not %s", keys[i], jtype(v));
            break;
        }
        *dst[i] = bpe_token_id(b, json_string_value(s));
        if (*dst[i] < 0) rc = lerr(&L, "%s %s is not a token of %s", keys[i], q(json_string_value(s), qb), b->path);
    }
    json_decref(root);
    return rc;
}

int bpe_load(bpe **out, const char *json_path, const char *config_path, mill_err *e) {
    *out = NULL;
    pthread_once(&bl_once, bl_init);
    bpe *b = calloc(1, sizeof *b);
    if (!b) return mill_errf(e, "%s: out of memory", json_path);
    b->serial = atomic_fetch_add(&bpe_serials, 1);
    b->bos = b->eos = b->pad = -1;
    b->unk_id = -1;
    for (int i = 0; i < 256; i++) b->raw_trie.root[i] = b->norm_trie.root[i] = -1;
    b->path = strdup(json_path);
    lctx L = {json_path, e};
    if (!b->path) return bpe_free(b), mill_errf(e, "%s: out of memory", json_path);
    json_error_t je;
    json_t *root = json_load_file(json_path, 0, &je);
    if (!root) {
        int rc = je.line < 0 || je.position == 0
                     ? lerr(&L, "cannot read (%s)", je.text)
                     : lerr(&L, "not valid JSON (line %d, column %d: %s)", je.line, je.column, je.text);
        bpe_free(b);
        return rc;
    }
    int rc = 0;
    char qb[128];
    tls *T = NULL;
    if (!json_is_object(root)) rc = lerr(&L, "must be a JSON object");
    json_t *v = json_object_get(root, "version");
    if (!rc && v && !(json_is_string(v) && !strcmp(json_string_value(v), "1.0")))
        rc = lerr(&L, "version %s is not \"1.0\"", json_is_string(v) ? q(json_string_value(v), qb) : jtype(v));
    const char *nulls[] = {"truncation", "padding"};
    for (int i = 0; i < 2 && !rc; i++) {
        json_t *x = json_object_get(root, nulls[i]);
        if (x && !json_is_null(x)) rc = lerr(&L, "%s must be null (encode applies no %s)", nulls[i], nulls[i]);
    }
    if (!rc) rc = load_model(&L, b, root);
    if (!rc) rc = load_normalizer(&L, b, json_object_get(root, "normalizer"), "normalizer", 0);
    if (!rc) rc = load_pretok(&L, b, json_object_get(root, "pre_tokenizer"));
    if (!rc) rc = load_post(&L, b, json_object_get(root, "post_processor"), "post_processor", 0);
    if (!rc) rc = load_decoder(&L, b, json_object_get(root, "decoder"));
    if (!rc && !(T = tls_get(b, e))) rc = -1;
    if (!rc) rc = load_added(&L, b, json_object_get(root, "added_tokens"), T);
    if (!rc) rc = build_tables(&L, b);
    json_decref(root);
    if (!rc && config_path) rc = load_config(b, config_path, e);
    if (rc) {
        bpe_free(b);
        return -1;
    }
    *out = b;
    return 0;
}

void bpe_free(bpe *b) {
    if (!b) return;
    /* this thread's cache holds b's words: forget them (other threads' caches key on the serial) */
    if (tls_key_ok) {
        tls *T = pthread_getspecific(tls_key);
        if (T && T->owner == b->serial) cache_clear(T), T->owner = 0;
    }
    sm_free(&b->vocab);
    sm_free(&b->rawmap);
    sm_free(&b->addmap);
    free(b->merges);
    free(b->added);
    free(b->apool.p);
    free(b->raw_trie.v);
    free(b->norm_trie.v);
    re_free(&b->wordchar);
    for (int i = 0; i < b->n_nz; i++) re_free(&b->nz[i].re), free(b->nz[i].str);
    free(b->nz);
    if (b->lower_loc) freelocale(b->lower_loc);
    for (int i = 0; i < b->n_pt; i++) re_free(&b->pt[i].re);
    re_free(&b->gpt2);
    for (int i = 0; i < b->n_tmpl; i++) free(b->tmpl[i].ids);
    free(b->tmpl);
    free(b->str_off);
    free(b->str_len);
    free(b->dec_off);
    free(b->dec_len);
    free(b->special);
    free(b->spool.p);
    free(b->dpool.p);
    free(b->path);
    free(b);
}
