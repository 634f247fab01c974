/* algos/dataset.c — JSONL and arithmetic prompt datasets, templates, epoch order.
 * See dataset.h for the contract. */
#include "dataset.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../common/rng.h"
#include "arith.h"
#include "chat.h"

enum {
    DS_BLOCK = 1 << 20, /* arena block size; a larger string gets a block of its own */
    DS_MAX_KEY = 256,   /* longest dotted key accepted in the config */
    DS_CHUNK = 1 << 16, /* file read size */
};

/* Row text lives in a list of blocks, so row pointers never move while loading. */
typedef struct ds_block {
    struct ds_block *next;
    size_t used, cap;
    char data[];
} ds_block;

struct dataset {
    dataset_row *rows;
    long n, cap;
    char *tmpl;
    chat_format chat; /* kind CHAT_NONE: prompts render as plain text */
    ds_block *arena;
    long skipped;
    int n_reasons;
    char reasons[DATASET_SKIP_REASONS][sizeof(mill_err)];
    /* the current epoch's order, rebuilt when the (seed, epoch) asked for changes */
    long *perm;
    long perm_epoch;
    uint64_t perm_seed;
    int perm_ok;
};

/* ---- storage ---- */

static char *ds_alloc(dataset *d, size_t len) {
    ds_block *b = d->arena;
    if (!b || b->cap - b->used < len) {
        size_t cap = len > DS_BLOCK ? len : DS_BLOCK;
        ds_block *nb = malloc(sizeof *nb + cap);
        if (!nb) return NULL;
        nb->used = 0;
        nb->cap = cap;
        if (b && len > DS_BLOCK / 4) {
            /* a big string: put its block behind the current one, which keeps filling */
            nb->next = b->next;
            b->next = nb;
        } else {
            nb->next = b;
            d->arena = nb;
        }
        b = nb;
    }
    char *p = b->data + b->used;
    b->used += len;
    return p;
}

static char *ds_store(dataset *d, const char *s, size_t len) {
    char *p = ds_alloc(d, len + 1);
    if (!p) return NULL;
    memcpy(p, s, len);
    p[len] = 0;
    return p;
}

static dataset_row *ds_push(dataset *d) {
    if (d->n == d->cap) {
        long cap = d->cap ? d->cap * 2 : 1024;
        dataset_row *rows = realloc(d->rows, sizeof *rows * (size_t)cap);
        if (!rows) return NULL;
        d->rows = rows;
        d->cap = cap;
    }
    dataset_row *r = &d->rows[d->n];
    memset(r, 0, sizeof *r);
    r->id = d->n++;
    return r;
}

static int ds_set_template(dataset *d, const char *tmpl, const char *dflt, mill_err *e) {
    if (!tmpl) tmpl = dflt;
    if (!strstr(tmpl, "{prompt}"))
        return mill_errf(e, "prompt template \"%.200s\" has no {prompt}; expected e.g. \"Q: {prompt}\\nA: \"", tmpl);
    d->tmpl = malloc(strlen(tmpl) + 1);
    if (!d->tmpl) return mill_errf(e, "dataset: out of memory for the template");
    strcpy(d->tmpl, tmpl);
    return 0;
}

/* The permutation buffer is taken once here, so dataset_row_at cannot fail later. */
static int ds_finish(dataset *d, mill_err *e) {
    d->perm = malloc(sizeof *d->perm * (size_t)d->n);
    if (!d->perm) return mill_errf(e, "dataset: out of memory for the order of %ld rows", d->n);
    return 0;
}

static dataset *ds_new(void) { return calloc(1, sizeof(dataset)); }

void dataset_free(dataset *d) {
    if (!d) return;
    for (ds_block *b = d->arena, *next; b; b = next) {
        next = b->next;
        free(b);
    }
    free(d->rows);
    free(d->tmpl);
    free(d->perm);
    free(d);
}

/* ---- JSONL reading ---- */

typedef struct {
    FILE *fp;
    char chunk[DS_CHUNK];
    size_t pos, end;
    int eof;
    char *line; /* the current line without its '\n', NUL-terminated */
    size_t len, cap;
    int toolong; /* the line passed DATASET_MAX_LINE; its bytes were dropped */
} ds_reader;

/* 1: a line is in r->line; 0: end of file; -1: read error (errno set). */
static int ds_read_line(ds_reader *r) {
    int got = 0;
    r->len = 0;
    r->toolong = 0;
    for (;;) {
        if (r->pos == r->end) {
            if (r->eof) return got;
            size_t k = fread(r->chunk, 1, sizeof r->chunk, r->fp);
            if (k == 0) {
                if (ferror(r->fp)) return -1;
                r->eof = 1;
                return got;
            }
            r->pos = 0;
            r->end = k;
        }
        got = 1;
        char *start = r->chunk + r->pos, *nl = memchr(start, '\n', r->end - r->pos);
        size_t take = nl ? (size_t)(nl - start) : r->end - r->pos;
        if (!r->toolong) {
            if (r->len + take > DATASET_MAX_LINE) {
                r->toolong = 1;
            } else {
                if (r->len + take + 1 > r->cap) {
                    size_t cap = r->cap ? r->cap : 4096;
                    while (cap < r->len + take + 1) cap *= 2;
                    char *line = realloc(r->line, cap);
                    if (!line) {
                        errno = ENOMEM;
                        return -1;
                    }
                    r->line = line;
                    r->cap = cap;
                }
                memcpy(r->line + r->len, start, take);
                r->len += take;
                r->line[r->len] = 0;
            }
        }
        r->pos += take;
        if (nl) {
            r->pos++;
            return 1;
        }
    }
}

static int ds_is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v'; }

static int ds_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!ds_is_space(s[i])) return 0;
    return 1;
}

static const char *ds_type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "a list";
    case JSON_STRING: return "a string";
    case JSON_INTEGER:
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* "a, b, c" (cut short with "...") so a wrong key in the config is easy to spot. */
static void ds_key_list(const json_t *obj, char *out, size_t cap) {
    size_t n = 0;
    const char *k;
    json_t *v;
    out[0] = 0;
    json_object_foreach((json_t *)obj, k, v) {
        (void)v;
        int w = snprintf(out + n, cap - n, "%s%s", n ? ", " : "", k);
        if (w < 0 || (size_t)w >= cap - n || n + (size_t)w > 120) {
            snprintf(out + n, cap - n, "%s...", n ? ", " : "");
            return;
        }
        n += (size_t)w;
    }
    if (!n) snprintf(out, cap, "none");
}

/* The value at a dotted key, or NULL with why[] saying what was found instead. */
static json_t *ds_lookup(json_t *root, const char *key, char *why, size_t cap) {
    json_t *cur = root;
    const char *seg = key;
    for (;;) {
        const char *dot = strchr(seg, '.');
        size_t n = dot ? (size_t)(dot - seg) : strlen(seg);
        char name[DS_MAX_KEY + 1];
        memcpy(name, seg, n); /* the config check bounds n */
        name[n] = 0;
        json_t *next = json_object_get(cur, name);
        if (!next) {
            char keys[200];
            ds_key_list(cur, keys, sizeof keys);
            if (cur == root)
                snprintf(why, cap, "no key \"%s\" (the row has keys: %s)", key, keys);
            else
                snprintf(why, cap, "no key \"%s\" (\"%.*s\" has keys: %s)", key, (int)(seg - 1 - key), key, keys);
            return NULL;
        }
        if (!dot) return next;
        if (!json_is_object(next)) {
            snprintf(why, cap, "\"%.*s\" is %s, not an object holding \"%s\"", (int)(dot - key), key,
                     ds_type_name(next), key);
            return NULL;
        }
        cur = next;
        seg = dot + 1;
    }
}

static int ds_check_key(const char *what, const char *key, mill_err *e) {
    size_t n = strlen(key);
    if (n == 0 || n > DS_MAX_KEY) return mill_errf(e, "dataset %s \"%.300s\": expected 1 to %d characters", what, key, DS_MAX_KEY);
    if (key[0] == '.' || key[n - 1] == '.' || strstr(key, ".."))
        return mill_errf(e, "dataset %s \"%s\" has an empty part; expected names joined by dots, e.g. \"reward_model.ground_truth\"",
                         what, key);
    return 0;
}

/* Shortest decimal text that reads back as v; integral values print without exponent. */
static void ds_real_text(double v, char *out, size_t cap) {
    if (v == 0) {
        snprintf(out, cap, "0");
        return;
    }
    if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(out, cap, "%.0f", v);
        return;
    }
    for (int p = 1; p <= 17; p++) {
        snprintf(out, cap, "%.*g", p, v);
        if (strtod(out, NULL) == v) return;
    }
}

/* Outcome of one row: stored, bad (message in e), or a failure no flag excuses. */
enum { DS_OK = 0, DS_BAD = -1, DS_FATAL = -2 };

static int ds_bad(mill_err *e, const char *path, long line, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int ds_bad(mill_err *e, const char *path, long line, const char *fmt, ...) {
    char msg[sizeof(mill_err)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    mill_errf(e, "%s:%ld: %s", path, line, msg);
    return DS_BAD;
}

#define DS_CHAT_EXPECT "expected a string or chat messages [{\"role\": \"user\", \"content\": \"...\"}, ...]"

/* tmpl with every "{prompt}" replaced by p[0..plen): the length it needs (NUL excluded), written
 * to out (NUL-terminated) only when it fits in cap. */
static size_t ds_subst(const char *tmpl, const char *p, size_t plen, char *out, size_t cap) {
    static const char key[] = "{prompt}";
    size_t n = 0;
    for (const char *t = tmpl; *t;) {
        const char *hit = strstr(t, key);
        size_t lit = hit ? (size_t)(hit - t) : strlen(t);
        if (n + lit < cap) memcpy(out + n, t, lit);
        n += lit;
        if (!hit) break;
        if (n + plen < cap) memcpy(out + n, p, plen);
        n += plen;
        t = hit + sizeof key - 1;
    }
    if (n < cap) out[n] = 0;
    return n;
}

/* The chat path: the prompt as messages (a string is one user message), the template applied to
 * the last user message's content, rendered by the dataset's chat format. */
static int ds_chat_prompt(dataset *d, json_t *v, const char *key, const char *path, long line, const char **out,
                          mill_err *e) {
    if (!json_is_string(v) && !json_is_array(v))
        return ds_bad(e, path, line, "prompt \"%s\" is %s; " DS_CHAT_EXPECT, key, ds_type_name(v));
    json_t *msgs = json_is_string(v) ? json_pack("[{s:s,s:O}]", "role", "user", "content", v) : json_deep_copy(v);
    if (!msgs) return DS_FATAL;
    int rc = DS_OK;
    for (size_t i = json_array_size(msgs); i-- > 0;) {
        json_t *m = json_array_get(msgs, i), *c = json_object_get(m, "content");
        const char *role = json_string_value(json_object_get(m, "role"));
        if (!role || strcmp(role, "user") || !json_is_string(c)) continue;
        size_t need = ds_subst(d->tmpl, json_string_value(c), json_string_length(c), NULL, 0);
        char *t = malloc(need + 1);
        if (!t) rc = DS_FATAL;
        else {
            ds_subst(d->tmpl, json_string_value(c), json_string_length(c), t, need + 1);
            if (json_object_set_new(m, "content", json_stringn(t, need))) rc = DS_FATAL;
            free(t);
        }
        break;
    }
    char *text = NULL;
    size_t len = 0;
    if (rc == DS_OK && chat_render(&d->chat, msgs, 1, &text, &len, e)) {
        char why[sizeof(mill_err)];
        snprintf(why, sizeof why, "%s", e->msg);
        rc = ds_bad(e, path, line, "prompt \"%s\": %s", key, why);
    }
    json_decref(msgs);
    if (rc == DS_OK && !(*out = ds_store(d, text, len))) rc = DS_FATAL;
    free(text);
    return rc;
}

static int ds_prompt(dataset *d, json_t *v, const char *key, const char *path, long line, const char **out, mill_err *e) {
    if (d->chat.kind != CHAT_NONE) return ds_chat_prompt(d, v, key, path, line, out, e);
    const char *s;
    size_t len;
    if (json_is_string(v)) {
        s = json_string_value(v);
        len = json_string_length(v);
        if (ds_blank(s, len)) return ds_bad(e, path, line, "prompt \"%s\" is empty; expected text", key);
        if (!(*out = ds_store(d, s, len))) return DS_FATAL;
        return DS_OK;
    }
    if (!json_is_array(v)) return ds_bad(e, path, line, "prompt \"%s\" is %s; " DS_CHAT_EXPECT, key, ds_type_name(v));
    size_t n = json_array_size(v), total = 0, i;
    if (n == 0) return ds_bad(e, path, line, "prompt \"%s\" is an empty list; " DS_CHAT_EXPECT, key);
    json_t *m;
    int any = 0;
    json_array_foreach(v, i, m) {
        json_t *c = json_object_get(m, "content"); /* NULL when m is not an object */
        if (!json_is_object(m))
            return ds_bad(e, path, line, "prompt \"%s\"[%zu] is %s; " DS_CHAT_EXPECT, key, i, ds_type_name(m));
        if (!json_is_string(c))
            return ds_bad(e, path, line, "prompt \"%s\"[%zu] has %s \"content\"; " DS_CHAT_EXPECT, key, i,
                          c ? ds_type_name(c) : "no");
        json_t *r = json_object_get(m, "role"); /* optional; when given, a role's name */
        if (r && !json_is_string(r))
            return ds_bad(e, path, line, "prompt \"%s\"[%zu] has %s \"role\"; " DS_CHAT_EXPECT, key, i,
                          ds_type_name(r));
        total += json_string_length(c) + (i ? 2 : 0);
        any |= !ds_blank(json_string_value(c), json_string_length(c));
    }
    if (!any) return ds_bad(e, path, line, "prompt \"%s\" has only empty messages; expected text", key);
    char *p = ds_alloc(d, total + 1);
    if (!p) return DS_FATAL;
    *out = p;
    json_array_foreach(v, i, m) {
        json_t *c = json_object_get(m, "content");
        if (i) {
            memcpy(p, "\n\n", 2);
            p += 2;
        }
        memcpy(p, json_string_value(c), json_string_length(c));
        p += json_string_length(c);
    }
    *p = 0;
    return DS_OK;
}

static int ds_label(dataset *d, json_t *v, const char *key, const char *path, long line, const char **out, mill_err *e) {
    char num[64];
    const char *s;
    size_t len;
    if (json_is_string(v)) {
        s = json_string_value(v);
        len = json_string_length(v);
        if (ds_blank(s, len)) return ds_bad(e, path, line, "label \"%s\" is empty; expected the reference answer", key);
    } else if (json_is_integer(v)) {
        snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        s = num;
        len = strlen(num);
    } else if (json_is_real(v)) {
        ds_real_text(json_real_value(v), num, sizeof num);
        s = num;
        len = strlen(num);
    } else {
        return ds_bad(e, path, line, "label \"%s\" is %s; expected a string or a number", key, ds_type_name(v));
    }
    if (!(*out = ds_store(d, s, len))) return DS_FATAL;
    return DS_OK;
}

static int ds_row(dataset *d, const dataset_jsonl_config *c, const char *pkey, const char *lkey, long line,
                  const char *buf, size_t len, mill_err *e) {
    json_error_t je;
    json_t *root = json_loadb(buf, len, JSON_DECODE_ANY, &je);
    if (!root)
        return ds_bad(e, c->path, line, "not JSON (%s, column %d); expected one JSON object a line", je.text, je.column);
    int rc = DS_OK;
    char why[400];
    const char *prompt = NULL, *label = NULL;
    json_t *pv, *lv;
    if (!json_is_object(root)) {
        rc = ds_bad(e, c->path, line, "the line is %s; expected a JSON object", ds_type_name(root));
    } else if (!(pv = ds_lookup(root, pkey, why, sizeof why))) {
        rc = ds_bad(e, c->path, line, "%s; expected the prompt there", why);
    } else if (!(lv = ds_lookup(root, lkey, why, sizeof why))) {
        rc = ds_bad(e, c->path, line, "%s; expected the label there", why);
    } else if ((rc = ds_prompt(d, pv, pkey, c->path, line, &prompt, e)) == DS_OK) {
        rc = ds_label(d, lv, lkey, c->path, line, &label, e);
    }
    /* a bad label after a good prompt leaves the prompt's bytes in the arena: harmless */
    json_decref(root);
    if (rc == DS_FATAL) {
        mill_errf(e, "%s:%ld: out of memory", c->path, line);
        return DS_FATAL;
    }
    if (rc != DS_OK) return rc;
    dataset_row *r = ds_push(d);
    if (!r) {
        mill_errf(e, "%s:%ld: out of memory for the row list", c->path, line);
        return DS_FATAL;
    }
    r->prompt = prompt;
    r->label = label;
    r->line = line;
    return DS_OK;
}

int dataset_open_jsonl(dataset **out, const dataset_jsonl_config *c, mill_err *e) {
    if (!out) return mill_errf(e, "dataset: no output pointer");
    *out = NULL;
    if (!c || !c->path || !c->path[0]) return mill_errf(e, "dataset: no JSONL path given");
    if (c->max_rows < 0) return mill_errf(e, "dataset %s: max_rows = %ld; expected 0 (all) or more", c->path, c->max_rows);
    const char *pkey = c->prompt_key ? c->prompt_key : "prompt";
    const char *lkey = c->label_key ? c->label_key : "label";
    if (ds_check_key("prompt key", pkey, e) || ds_check_key("label key", lkey, e)) return -1;
    dataset *d = ds_new();
    ds_reader *rd = calloc(1, sizeof *rd);
    if (!d || !rd) {
        free(d);
        free(rd);
        return mill_errf(e, "dataset %s: out of memory", c->path);
    }
    if (ds_set_template(d, c->prompt_template, "{prompt}", e)) goto fail;
    if (c->chat) d->chat = *c->chat;
    rd->fp = fopen(c->path, "rb");
    if (!rd->fp) {
        mill_errf(e, "cannot open dataset %s: %s", c->path, strerror(errno));
        goto fail;
    }
    long line = 0;
    for (;;) {
        if (c->max_rows && d->n >= c->max_rows) break;
        int got = ds_read_line(rd);
        if (got < 0) {
            mill_errf(e, "cannot read dataset %s after line %ld: %s", c->path, line, strerror(errno));
            goto fail;
        }
        if (got == 0) break;
        line++;
        int rc;
        if (rd->toolong)
            rc = ds_bad(e, c->path, line, "the line is longer than %d bytes; expected one JSON object a line",
                        DATASET_MAX_LINE);
        else if (ds_blank(rd->line, rd->len))
            continue;
        else
            rc = ds_row(d, c, pkey, lkey, line, rd->line, rd->len, e);
        if (rc == DS_FATAL || (rc == DS_BAD && !c->skip_bad)) goto fail;
        if (rc == DS_BAD) {
            if (d->n_reasons < DATASET_SKIP_REASONS) snprintf(d->reasons[d->n_reasons++], sizeof d->reasons[0], "%s", e->msg);
            d->skipped++;
        }
    }
    if (d->n == 0) {
        if (d->skipped)
            mill_errf(e, "dataset %s has no usable rows (%ld bad rows skipped; first: %s)", c->path, d->skipped,
                      d->reasons[0]);
        else
            mill_errf(e, "dataset %s has no rows; expected one JSON object a line", c->path);
        goto fail;
    }
    if (ds_finish(d, e)) goto fail;
    fclose(rd->fp);
    free(rd->line);
    free(rd);
    *out = d;
    return 0;
fail:
    if (rd->fp) fclose(rd->fp);
    free(rd->line);
    free(rd);
    dataset_free(d);
    return -1;
}

/* ---- arithmetic source ---- */

int dataset_arith(dataset **out, const int *levels, int n_levels, long n, uint64_t seed,
                  const char *prompt_template, mill_err *e) {
    if (!out) return mill_errf(e, "arith dataset: no output pointer");
    *out = NULL;
    if (!levels || n_levels <= 0) return mill_errf(e, "arith dataset: no levels given; expected some of 1..4");
    for (int i = 0; i < n_levels; i++)
        if (levels[i] < 1 || levels[i] > 4)
            return mill_errf(e, "arith dataset: level %d is not in 1..4", levels[i]);
    if (n <= 0 || n > (1L << 28)) return mill_errf(e, "arith dataset: n = %ld problems; expected 1 to %ld", n, 1L << 28);
    dataset *d = ds_new();
    if (!d) return mill_errf(e, "arith dataset: out of memory");
    if (ds_set_template(d, prompt_template, "Q: {prompt}\nA: ", e)) goto fail;
    rng r;
    rng_seed(&r, seed);
    for (long i = 0; i < n; i++) {
        arith_problem p;
        arith_draw(&p, levels[i % n_levels], 0, &r);
        dataset_row *row = ds_push(d);
        if (!row || !(row->prompt = ds_store(d, p.prompt, strlen(p.prompt))) ||
            !(row->label = ds_store(d, p.answer, strlen(p.answer)))) {
            mill_errf(e, "arith dataset: out of memory at problem %ld of %ld", i + 1, n);
            goto fail;
        }
        row->level = p.level;
    }
    if (ds_finish(d, e)) goto fail;
    *out = d;
    return 0;
fail:
    dataset_free(d);
    return -1;
}

/* ---- access ---- */

long dataset_size(const dataset *d) { return d ? d->n : 0; }
long dataset_skipped(const dataset *d) { return d ? d->skipped : 0; }

const char *dataset_skip_reason(const dataset *d, int i) {
    if (!d || i < 0 || i >= d->n_reasons) return NULL;
    return d->reasons[i];
}

const dataset_row *dataset_row_get(const dataset *d, long i) {
    if (!d || i < 0 || i >= d->n) return NULL;
    return &d->rows[i];
}

static uint64_t ds_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

const dataset_row *dataset_row_at(dataset *d, uint64_t seed, long cursor) {
    if (!d || cursor < 0 || d->n <= 0) return NULL;
    long epoch = cursor / d->n, pos = cursor % d->n;
    if (!d->perm_ok || d->perm_epoch != epoch || d->perm_seed != seed) {
        for (long i = 0; i < d->n; i++) d->perm[i] = i;
        /* the epoch is hashed in so consecutive epochs are unrelated shuffles */
        rng r;
        rng_seed(&r, ds_mix(seed ^ ds_mix((uint64_t)epoch + 0x9e3779b97f4a7c15ull)));
        for (long i = d->n - 1; i > 0; i--) {
            long j = (long)rng_below(&r, (uint64_t)i + 1);
            long t = d->perm[i];
            d->perm[i] = d->perm[j];
            d->perm[j] = t;
        }
        d->perm_epoch = epoch;
        d->perm_seed = seed;
        d->perm_ok = 1;
    }
    return &d->rows[d->perm[pos]];
}

int dataset_format(const dataset *d, const dataset_row *r, char *out, size_t cap, mill_err *e) {
    if (!out || cap == 0) return mill_errf(e, "dataset format: no output buffer");
    out[0] = 0;
    if (!d || !r || !r->prompt) return mill_errf(e, "dataset format: no dataset or row");
    /* a chat prompt was templated and rendered when it was loaded */
    const char *tmpl = d->chat.kind != CHAT_NONE ? "{prompt}" : d->tmpl;
    if (ds_subst(tmpl, r->prompt, strlen(r->prompt), out, cap) >= cap) {
        out[0] = 0;
        return mill_errf(e, "dataset format: row %ld's prompt does not fit in %zu bytes", r->id, cap);
    }
    return 0;
}
