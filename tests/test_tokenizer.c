/* tests/test_tokenizer.c — the byte tokenizer: round trips (every byte, UTF-8),
 * special tokens, and bad input (small vocab, bad or reserved ids, small buffers).
 * The tokenizer.json byte-level BPE: every golden of tests/data/bpe-tiny/goldens.jsonl (HF tokenizers'
 * encode and decode, made by tests/reference/make_tokenizer_goldens.py) equal, on DeepSeek's
 * configuration and its variants; a hand-built BPE with known merges; threads; bad files. */
#include <jansson.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/tokenizer.h"

static tokenizer *make(int vocab) {
    tokenizer *t = NULL;
    mill_err e = {{0}};
    assert_int_equal(tokenizer_bytes_new(&t, vocab, &e), 0);
    assert_non_null(t);
    return t;
}

static void test_specials(void **state) {
    (void)state;
    tokenizer *t = make(264);
    assert_int_equal(tokenizer_vocab_size(t), 264);
    assert_int_equal(tokenizer_bos(t), 256);
    assert_int_equal(tokenizer_eos(t), 257);
    assert_int_equal(tokenizer_pad(t), 258);
    assert_int_equal(tokenizer_special_id(t, "<|bos|>"), 256);
    assert_int_equal(tokenizer_special_id(t, "<|eos|>"), 257);
    assert_int_equal(tokenizer_special_id(t, "<|pad|>"), 258);
    assert_int_equal(tokenizer_special_id(t, "<|eos|"), -1);
    assert_int_equal(tokenizer_special_id(t, "eos"), -1);
    assert_int_equal(tokenizer_special_id(t, "<|EOS|>"), -1);
    assert_int_equal(tokenizer_special_id(t, ""), -1);
    assert_int_equal(tokenizer_special_id(t, NULL), -1);
    tokenizer_free(t);
    /* the smallest vocabulary works too */
    t = make(259);
    assert_int_equal(tokenizer_vocab_size(t), 259);
    assert_int_equal(tokenizer_pad(t), 258);
    tokenizer_free(t);
}

static void test_vocab_too_small(void **state) {
    (void)state;
    const int bad[] = {258, 256, 0, -5};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        tokenizer *t = (tokenizer *)&t; /* must be cleared on failure */
        mill_err e = {{0}};
        assert_int_equal(tokenizer_bytes_new(&t, bad[i], &e), -1);
        assert_null(t);
        char num[16];
        snprintf(num, sizeof num, "%d", bad[i]);
        assert_non_null(strstr(e.msg, "vocab_size"));
        assert_non_null(strstr(e.msg, num));
    }
}

static void test_all_bytes_round_trip(void **state) {
    (void)state;
    tokenizer *t = make(264);
    char text[256];
    for (int i = 0; i < 256; i++) text[i] = (char)(unsigned char)i;
    int32_t ids[256];
    int n = -1;
    mill_err e = {{0}};
    assert_int_equal(tokenizer_encode(t, text, sizeof text, ids, 256, &n, &e), 0);
    assert_int_equal(n, 256);
    for (int i = 0; i < 256; i++) assert_int_equal(ids[i], i);
    char out[257];
    memset(out, 'x', sizeof out);
    assert_int_equal(tokenizer_decode(t, ids, n, out, sizeof out, &e), 0);
    assert_memory_equal(out, text, 256);
    assert_int_equal(out[256], 0);
    tokenizer_free(t);
}

static void test_utf8_round_trip(void **state) {
    (void)state;
    tokenizer *t = make(264);
    const char *text = "h\xc3\xa9llo w\xc3\xb6rld \xe2\x80\x94 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x99\x82!"; /* héllo wörld — 日本 🙂! */
    size_t len = strlen(text);
    int32_t ids[64];
    int n = -1;
    mill_err e = {{0}};
    assert_int_equal(tokenizer_encode(t, text, len, ids, 64, &n, &e), 0);
    assert_int_equal(n, (int)len);
    assert_int_equal(ids[1], 0xc3); /* one id per byte, high bytes unsigned */
    assert_int_equal(ids[2], 0xa9);
    for (int i = 0; i < n; i++) assert_true(ids[i] >= 0 && ids[i] < 256);
    char out[64];
    assert_int_equal(tokenizer_decode(t, ids, n, out, sizeof out, &e), 0);
    assert_string_equal(out, text);
    /* empty text, NULL allowed when len is 0 */
    assert_int_equal(tokenizer_encode(t, NULL, 0, ids, 0, &n, &e), 0);
    assert_int_equal(n, 0);
    assert_int_equal(tokenizer_decode(t, ids, 0, out, sizeof out, &e), 0);
    assert_string_equal(out, "");
    tokenizer_free(t);
}

static void test_specials_decode_by_name(void **state) {
    (void)state;
    tokenizer *t = make(264);
    const int32_t ids[] = {256, 'h', 'i', 257, 258, 258};
    char out[64];
    mill_err e = {{0}};
    assert_int_equal(tokenizer_decode(t, ids, 6, out, sizeof out, &e), 0);
    assert_string_equal(out, "<|bos|>hi<|eos|><|pad|><|pad|>");
    /* a special's name in text is text: a prompt cannot inject an eos */
    int32_t enc[16];
    int n = 0;
    assert_int_equal(tokenizer_encode(t, "<|eos|>", 7, enc, 16, &n, &e), 0);
    assert_int_equal(n, 7);
    for (int i = 0; i < n; i++) assert_true(enc[i] < 256);
    tokenizer_free(t);
}

static void test_decode_bad_ids(void **state) {
    (void)state;
    tokenizer *t = make(264);
    char out[64];
    mill_err e = {{0}};
    const int32_t over[] = {'a', 'b', 264};
    assert_int_equal(tokenizer_decode(t, over, 3, out, sizeof out, &e), -1);
    assert_non_null(strstr(e.msg, "264"));
    assert_non_null(strstr(e.msg, "position 2"));
    assert_non_null(strstr(e.msg, "outside")); /* out of range, not merely reserved */
    const int32_t neg[] = {-1, 'a'};
    assert_int_equal(tokenizer_decode(t, neg, 2, out, sizeof out, &e), -1);
    assert_non_null(strstr(e.msg, "-1"));
    assert_non_null(strstr(e.msg, "position 0"));
    const int32_t reserved[] = {'a', 259};
    assert_int_equal(tokenizer_decode(t, reserved, 2, out, sizeof out, &e), -1);
    assert_non_null(strstr(e.msg, "259"));
    assert_non_null(strstr(e.msg, "position 1"));
    assert_non_null(strstr(e.msg, "reserved"));
    const int32_t last_reserved[] = {263};
    assert_int_equal(tokenizer_decode(t, last_reserved, 1, out, sizeof out, &e), -1);
    assert_non_null(strstr(e.msg, "reserved"));
    /* with the smallest vocabulary, 259 is simply out of range */
    tokenizer *small = make(259);
    assert_int_equal(tokenizer_decode(small, reserved, 2, out, sizeof out, &e), -1);
    assert_non_null(strstr(e.msg, "259"));
    assert_non_null(strstr(e.msg, "outside"));
    tokenizer_free(small);
    tokenizer_free(t);
}

/* Model output may hold any id: the lossy decode names the ones without text instead of failing. */
static void test_decode_lossy(void **state) {
    (void)state;
    tokenizer *t = make(264);
    const int32_t ids[] = {'8', 259, '5', 257, 263, 264, -1};
    char out[128];
    mill_err e = {{0}};
    assert_int_equal(tokenizer_decode(t, ids, 7, out, sizeof out, &e), -1);
    assert_int_equal(tokenizer_decode_lossy(t, ids, 7, out, sizeof out, &e), 0);
    assert_string_equal(out, "8<|id:259|>5<|eos|><|id:263|><|id:264|><|id:-1|>");
    assert_int_equal(tokenizer_decode_lossy(t, ids, 7, out, 8, &e), -1); /* cap still counts */
    tokenizer_free(t);
}

static void test_cap_too_small(void **state) {
    (void)state;
    tokenizer *t = make(264);
    mill_err e = {{0}};
    int32_t ids[8];
    int n = -1;
    assert_int_equal(tokenizer_encode(t, "hello", 5, ids, 4, &n, &e), -1);
    assert_non_null(strstr(e.msg, "5"));
    assert_int_equal(n, 0);
    assert_int_equal(tokenizer_encode(t, "hello", 5, ids, 5, &n, &e), 0);
    assert_int_equal(n, 5);
    char out[16];
    assert_int_equal(tokenizer_decode(t, ids, 5, out, 5, &e), -1); /* no room for the NUL */
    assert_non_null(strstr(e.msg, "too small"));
    assert_int_equal(tokenizer_decode(t, ids, 5, out, 6, &e), 0);
    assert_string_equal(out, "hello");
    const int32_t eos[] = {257};
    assert_int_equal(tokenizer_decode(t, eos, 1, out, 7, &e), -1); /* "<|eos|>" is 7 bytes + NUL */
    assert_int_equal(tokenizer_decode(t, eos, 1, out, 8, &e), 0);
    assert_string_equal(out, "<|eos|>");
    assert_int_equal(tokenizer_decode(t, eos, 1, out, 0, &e), -1);
    tokenizer_free(t);
}

/* ------------------------------------------------------------------ the tokenizer.json BPE */

#define BPE_TINY MILL_TEST_DATA "/bpe-tiny"

static size_t b64_decode(const char *in, unsigned char *out) {
    static signed char map[256];
    if (!map['B']) {
        memset(map, -1, sizeof map);
        const char *a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for (int i = 0; i < 64; i++) map[(unsigned char)a[i]] = (signed char)i;
    }
    size_t w = 0;
    unsigned v = 0;
    int bits = 0;
    for (; *in && *in != '='; in++) {
        int d = map[(unsigned char)*in];
        assert_true(d >= 0);
        v = v << 6 | (unsigned)d;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[w++] = (unsigned char)(v >> bits);
        }
    }
    return w;
}

static void show(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n && i < 160; i++) {
        if (s[i] >= 0x20 && s[i] < 0x7f && s[i] != '\\')
            fputc(s[i], stderr);
        else
            fprintf(stderr, "\\x%02x", s[i]);
    }
}

static void show_ids(const char *what, const int32_t *v, int n) {
    fprintf(stderr, "    %s (%d):", what, n);
    for (int i = 0; i < n && i < 40; i++) fprintf(stderr, " %d", (int)v[i]);
    fprintf(stderr, "%s\n", n > 40 ? " ..." : "");
}

/* tokenizer.json of dir, with the golden's dotted keys replaced, written into tmpdir */
static tokenizer *load_variant(json_t *patch, const char *tmpdir) {
    mill_err e = {{0}};
    tokenizer *t = NULL;
    if (json_object_size(patch) == 0) {
        if (tokenizer_load(&t, BPE_TINY, &e)) fail_msg("%s", e.msg);
        return t;
    }
    json_error_t je;
    json_t *root = json_load_file(BPE_TINY "/tokenizer.json", 0, &je);
    assert_non_null(root);
    const char *key;
    json_t *val;
    json_object_foreach(patch, key, val) {
        char k[256];
        snprintf(k, sizeof k, "%s", key);
        json_t *d = root;
        char *dot, *part = k;
        while ((dot = strchr(part, '.'))) {
            *dot = 0;
            d = json_object_get(d, part);
            assert_non_null(d);
            part = dot + 1;
        }
        json_object_set(d, part, val);
    }
    char path[512];
    snprintf(path, sizeof path, "%s/tokenizer.json", tmpdir);
    assert_int_equal(json_dump_file(root, path, JSON_COMPACT), 0);
    json_decref(root);
    if (tokenizer_load(&t, path, &e)) fail_msg("%s", e.msg);
    return t;
}

typedef struct {
    int v, plain;
    unsigned char *in;
    size_t in_len;
    int32_t *ids, *ids_sp, *dec;
    int n_ids, n_sp, n_dec;
    unsigned char *text, *text_skip;
    size_t text_len, skip_len;
} golden;

static int32_t *ids_of(json_t *a, int *n) {
    *n = (int)json_array_size(a);
    int32_t *v = malloc(sizeof *v * (size_t)(*n + 1));
    for (int i = 0; i < *n; i++) v[i] = (int32_t)json_integer_value(json_array_get(a, (size_t)i));
    return v;
}

static unsigned char *b64_of(json_t *s, size_t *n) {
    const char *t = json_string_value(s);
    assert_non_null(t);
    unsigned char *o = malloc(strlen(t) + 1);
    *n = b64_decode(t, o);
    return o;
}

static golden *read_goldens(int *n_out, json_t **vars) {
    FILE *f = fopen(BPE_TINY "/goldens.jsonl", "r");
    if (!f)
        fail_msg("%s/goldens.jsonl is missing: run tests/reference/make_tokenizer_goldens.py on the GPU machine",
                 BPE_TINY);
    size_t cap = 1 << 16;
    char *line = malloc(cap);
    golden *g = NULL;
    int n = 0, gcap = 0;
    *vars = json_array();
    while (fgets(line, (int)cap, f)) {
        size_t l = strlen(line);
        while (l == cap - 1 && line[l - 1] != '\n') {
            cap *= 2;
            line = realloc(line, cap);
            if (!fgets(line + l, (int)(cap - l), f)) break;
            l = strlen(line);
        }
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        if (!o) fail_msg("goldens.jsonl: %s", je.text);
        if (json_object_get(o, "variant")) {
            json_array_append(*vars, o);
            json_decref(o);
            continue;
        }
        if (n == gcap) g = realloc(g, sizeof *g * (size_t)(gcap = gcap ? 2 * gcap : 1024));
        golden *c = &g[n++];
        memset(c, 0, sizeof *c);
        c->v = (int)json_integer_value(json_object_get(o, "v"));
        if (json_object_get(o, "in")) {
            c->in = b64_of(json_object_get(o, "in"), &c->in_len);
            c->ids = ids_of(json_object_get(o, "ids"), &c->n_ids);
            json_t *sp = json_object_get(o, "ids_sp");
            if (json_is_null(sp)) { /* DeepSeek's template: bos (id 0), then the text */
                c->n_sp = c->n_ids + 1;
                c->ids_sp = malloc(sizeof *c->ids_sp * (size_t)c->n_sp);
                c->ids_sp[0] = 0;
                memcpy(c->ids_sp + 1, c->ids, sizeof *c->ids * (size_t)c->n_ids);
            } else {
                c->ids_sp = ids_of(sp, &c->n_sp);
            }
            c->plain = json_is_true(json_object_get(o, "plain"));
        } else {
            c->dec = ids_of(json_object_get(o, "dec"), &c->n_dec);
            c->text = b64_of(json_object_get(o, "text"), &c->text_len);
            c->text_skip = b64_of(json_object_get(o, "text_skip"), &c->skip_len);
        }
        json_decref(o);
    }
    free(line);
    fclose(f);
    *n_out = n;
    return g;
}

static void free_goldens(golden *g, int n) {
    for (int i = 0; i < n; i++)
        free(g[i].in), free(g[i].ids), free(g[i].ids_sp), free(g[i].dec), free(g[i].text), free(g[i].text_skip);
    free(g);
}

/* 0 when the case matches; prints what differs otherwise */
static int check_golden(const tokenizer *t, const golden *c, const char *vname) {
    mill_err e = {{0}};
    if (c->in) {
        int cap = (int)(3 * c->in_len + 16), n = 0, bad = 0;
        int32_t *got = malloc(sizeof *got * (size_t)cap);
        for (int pass = 0; pass < 3 && !bad; pass++) {
            if (pass == 2 && !c->plain) break;
            const int32_t *want = pass == 1 ? c->ids_sp : c->ids;
            int nw = pass == 1 ? c->n_sp : c->n_ids;
            int rc = pass == 2 ? tokenizer_encode(t, (const char *)c->in, c->in_len, got, cap, &n, &e)
                               : tokenizer_encode_hf(t, (const char *)c->in, c->in_len, pass, got, cap, &n, &e);
            if (rc || n != nw || memcmp(got, want, sizeof *got * (size_t)n)) {
                fprintf(stderr, "  [%s] %s mismatch on \"", vname,
                        pass == 2 ? "encode"
                        : pass    ? "encode_hf(add_special)"
                                  : "encode_hf");
                show(c->in, c->in_len);
                fprintf(stderr, "\"%s%s\n", rc ? ": " : "", rc ? e.msg : "");
                show_ids("want", want, nw);
                if (!rc) show_ids("got ", got, n);
                bad = 1;
            }
        }
        free(got);
        return bad;
    }
    size_t cap = 64 * (size_t)c->n_dec + 64;
    char *out = malloc(cap);
    int bad = 0;
    for (int skip = 0; skip < 2 && !bad; skip++) {
        const unsigned char *want = skip ? c->text_skip : c->text;
        size_t nw = skip ? c->skip_len : c->text_len;
        int rc = tokenizer_decode_hf(t, c->dec, c->n_dec, skip, out, cap, &e);
        if (rc || nw >= cap || memcmp(out, want, nw) || out[nw]) { /* the text may hold NUL bytes */
            fprintf(stderr, "  [%s] decode_hf(skip_special=%d) mismatch%s%s\n", vname, skip, rc ? ": " : "",
                    rc ? e.msg : "");
            show_ids("ids", c->dec, c->n_dec);
            fprintf(stderr, "    want \"");
            show(want, nw);
            fprintf(stderr, "\"\n    got  \"");
            if (!rc) show((const unsigned char *)out, nw < cap ? nw + 1 : strlen(out));
            fprintf(stderr, "\"\n");
            bad = 1;
        }
    }
    free(out);
    return bad;
}

typedef struct {
    const tokenizer *t;
    const golden *g;
    int n, bad;
} thread_job;

static void *thread_run(void *p) {
    thread_job *j = p;
    for (int i = 0; i < j->n; i++)
        if (j->g[i].v == 0) j->bad += check_golden(j->t, &j->g[i], "thread");
    return NULL;
}

/* Every HF golden, on DeepSeek's configuration and on each variant; then the base ones again from
 * four threads at once (each keeps its own word cache). */
static void test_bpe_goldens(void **state) {
    (void)state;
    int n = 0;
    json_t *vars;
    golden *g = read_goldens(&n, &vars);
    char tmpdir[] = "/tmp/mill-bpe-XXXXXX";
    assert_non_null(mkdtemp(tmpdir));
    int total_bad = 0, n_enc = 0, n_dec = 0;
    size_t vi;
    json_t *var;
    json_array_foreach(vars, vi, var) {
        int v = (int)json_integer_value(json_object_get(var, "variant"));
        const char *name = json_string_value(json_object_get(var, "name"));
        tokenizer *t = load_variant(json_object_get(var, "patch"), tmpdir);
        int bad = 0, cases = 0;
        for (int i = 0; i < n; i++) {
            if (g[i].v != v) continue;
            cases++;
            g[i].in ? n_enc++ : n_dec++;
            if (check_golden(t, &g[i], name) && ++bad >= 20) break;
        }
        if (bad)
            fprintf(stderr, "bpe goldens: variant %s: %d of %d cases differ%s\n", name, bad, cases,
                    bad >= 20 ? " (stopped at 20)" : "");
        total_bad += bad;
        if (v == 0 && !bad) {
            pthread_t th[4];
            thread_job jobs[4];
            for (int k = 0; k < 4; k++) {
                jobs[k] = (thread_job){t, g, n, 0};
                assert_int_equal(pthread_create(&th[k], NULL, thread_run, &jobs[k]), 0);
            }
            for (int k = 0; k < 4; k++) {
                pthread_join(th[k], NULL);
                total_bad += jobs[k].bad;
            }
        }
        tokenizer_free(t);
    }
    char path[600];
    snprintf(path, sizeof path, "%s/tokenizer.json", tmpdir);
    unlink(path);
    rmdir(tmpdir);
    printf("bpe goldens: %d encode and %d decode cases over %zu configurations, %d differ\n", n_enc, n_dec,
           json_array_size(vars), total_bad);
    json_decref(vars);
    free_goldens(g, n);
    assert_int_equal(total_bad, 0);
    assert_true(n_enc > 1000 && n_dec > 500);
}

/* DeepSeek's layout: bos/eos/pad from tokenizer_config.json; names; plain encode matches no added
 * token; merges as ["a", "b"] pairs read the same as "a b" strings. */
static void test_bpe_tiny_api(void **state) {
    (void)state;
    mill_err e = {{0}};
    tokenizer *t = NULL;
    if (tokenizer_load(&t, BPE_TINY, &e)) fail_msg("%s", e.msg);
    assert_int_equal(tokenizer_bos(t), 0);
    assert_int_equal(tokenizer_eos(t), 1);
    assert_int_equal(tokenizer_pad(t), 2);
    assert_int_equal(tokenizer_special_id(t, "<|eos|>"), 1);
    assert_int_equal(tokenizer_token_id(t, "<\xef\xbd\x9c"
                                           "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"),
                     1);
    int user = tokenizer_token_id(t, "<\xef\xbd\x9cUser\xef\xbd\x9c>");
    assert_true(user > 2 && user < tokenizer_vocab_size(t));
    assert_int_equal(tokenizer_token_id(t, "no such token at all"), -1);
    assert_true(tokenizer_token_id(t, "a") >= 0);
    /* a prompt cannot inject an eos through the plain encode; encode_hf matches it */
    const char *txt = "hi<\xef\xbd\x9c"
                      "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>";
    int32_t ids[64];
    int n = 0;
    assert_int_equal(tokenizer_encode(t, txt, strlen(txt), ids, 64, &n, &e), 0);
    for (int i = 0; i < n; i++) assert_true(ids[i] != 1);
    assert_int_equal(tokenizer_encode_hf(t, txt, strlen(txt), 1, ids, 64, &n, &e), 0);
    assert_int_equal(ids[0], 0);
    assert_int_equal(ids[n - 1], 1);
    /* too small an output names both numbers */
    assert_int_equal(tokenizer_encode_hf(t, txt, strlen(txt), 1, ids, 2, &n, &e), -1);
    assert_non_null(strstr(e.msg, "room for 2"));
    assert_int_equal(n, 0);
    /* decode: strict refuses an id out of range, lossy names it */
    char out[256];
    const int32_t bad[] = {ids[1], 1000000};
    assert_int_equal(tokenizer_decode(t, bad, 2, out, sizeof out, &e), -1);
    assert_non_null(strstr(e.msg, "1000000"));
    assert_non_null(strstr(e.msg, "position 1"));
    assert_int_equal(tokenizer_decode_lossy(t, bad, 2, out, sizeof out, &e), 0);
    assert_non_null(strstr(out, "<|id:1000000|>"));
    assert_int_equal(tokenizer_encode_hf(t, txt, strlen(txt), 1, ids, 64, &n, &e), 0);
    assert_int_equal(tokenizer_decode_hf(t, ids, n, 0, out, 4, &e), -1);
    assert_non_null(strstr(e.msg, "too small"));
    tokenizer_free(t);

    /* merges as pairs */
    json_error_t je;
    json_t *root = json_load_file(BPE_TINY "/tokenizer.json", 0, &je);
    assert_non_null(root);
    json_t *merges = json_object_get(json_object_get(root, "model"), "merges");
    for (size_t i = 0; i < json_array_size(merges); i++) {
        const char *m = json_string_value(json_array_get(merges, i));
        assert_non_null(m);
        const char *sp = strchr(m, ' ');
        json_t *pair = json_pack("[s%s]", m, (size_t)(sp - m), sp + 1);
        json_array_set_new(merges, i, pair);
    }
    char dir[] = "/tmp/mill-bpe-XXXXXX", path[128];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    assert_int_equal(json_dump_file(root, path, JSON_COMPACT), 0);
    json_decref(root);
    tokenizer *a = NULL, *b = NULL;
    if (tokenizer_load(&a, path, &e) || tokenizer_load(&b, BPE_TINY "/tokenizer.json", &e)) fail_msg("%s", e.msg);
    assert_int_equal(tokenizer_bos(a), -1); /* no tokenizer_config.json beside it */
    const char *texts[] = {"Hello, world! 12345 \xe4\xb8\xad\xe6\x96\x87", "def f(x):\n    return x\n", "  \t\r\n  x"};
    for (int i = 0; i < 3; i++) {
        int32_t x[128], y[128];
        int nx, ny;
        assert_int_equal(tokenizer_encode_hf(a, texts[i], strlen(texts[i]), 1, x, 128, &nx, &e), 0);
        assert_int_equal(tokenizer_encode_hf(b, texts[i], strlen(texts[i]), 1, y, 128, &ny, &e), 0);
        assert_int_equal(nx, ny);
        assert_memory_equal(x, y, sizeof *x * (size_t)nx);
    }
    tokenizer_free(a);
    tokenizer_free(b);
    unlink(path);
    rmdir(dir);
}

/* A hand-built BPE whose answers are worked out by hand: the byte characters are ids 0..255 by
 * byte value, then he=256 ll=257 hell=258 hello=259 (ranks in that order), "<s>" added at 260. */
static json_t *hand_bpe(void) {
    json_t *vocab = json_object();
    for (int c = 0; c < 256; c++) {
        /* GPT-2's byte -> character map */
        int keep = (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF);
        static int next;
        if (c == 0) next = 256;
        unsigned cp = keep ? (unsigned)c : (unsigned)next++;
        char u[4] = {0};
        if (cp < 0x80)
            u[0] = (char)cp;
        else
            u[0] = (char)(0xC0 | cp >> 6), u[1] = (char)(0x80 | (cp & 0x3F));
        json_object_set_new(vocab, u, json_integer(c));
    }
    const char *extra[] = {"he", "ll", "hell", "hello"};
    for (int i = 0; i < 4; i++) json_object_set_new(vocab, extra[i], json_integer(256 + i));
    json_error_t je;
    json_t *root = json_loads(
        "{\"version\": \"1.0\", \"added_tokens\": [{\"id\": 260, \"content\": \"<s>\", \"single_word\": false,"
        " \"lstrip\": false, \"rstrip\": false, \"normalized\": false, \"special\": true}], \"normalizer\": null,"
        " \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\":"
        " {\"Regex\": \"\\\\p{N}{1,3}\"}, \"behavior\": \"Isolated\", \"invert\": false}, {\"type\": \"ByteLevel\","
        " \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": true}]},"
        " \"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"<s>\","
        " \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}], \"special_tokens\": {\"<s>\":"
        " {\"id\": \"<s>\", \"ids\": [260], \"tokens\": [\"<s>\"]}}},"
        " \"decoder\": {\"type\": \"ByteLevel\"},"
        " \"model\": {\"type\": \"BPE\", \"merges\": [\"h e\", \"l l\", \"he ll\", \"hell o\"]}}",
        0, &je);
    if (!root) fail_msg("hand_bpe: %s", je.text);
    json_object_set_new(json_object_get(root, "model"), "vocab", vocab);
    return root;
}

static tokenizer *load_json(json_t *root, char *msg, size_t msgn) {
    char dir[] = "/tmp/mill-bpe-XXXXXX", path[128];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    assert_int_equal(json_dump_file(root, path, JSON_COMPACT), 0);
    tokenizer *t = NULL;
    mill_err e = {{0}};
    int rc = tokenizer_load(&t, dir, &e);
    snprintf(msg, msgn, "%s", rc ? e.msg : "");
    if (rc) {
        assert_null(t);
        assert_null(strchr(e.msg, '\n')); /* one line */
        assert_non_null(strstr(e.msg, path));
    }
    unlink(path);
    rmdir(dir);
    return t;
}

static void test_bpe_hand_built(void **state) {
    (void)state;
    char msg[1024];
    json_t *root = hand_bpe();
    assert_non_null(root);
    tokenizer *t = load_json(root, msg, sizeof msg);
    if (!t) fail_msg("%s", msg);
    json_decref(root);
    mill_err e = {{0}};
    int32_t ids[64];
    int n;
    assert_int_equal(tokenizer_vocab_size(t), 261);
    assert_int_equal(tokenizer_bos(t), -1);
    assert_int_equal(tokenizer_encode_hf(t, "hello hello", 11, 1, ids, 64, &n, &e), 0);
    const int32_t want1[] = {260, 259, 32, 259}; /* <s> hello Ġ hello: " hello" is one GPT-2 piece */
    assert_int_equal(n, 4);
    assert_memory_equal(ids, want1, sizeof want1);
    assert_int_equal(tokenizer_encode_hf(t, "hhell", 5, 0, ids, 64, &n, &e), 0);
    const int32_t want2[] = {'h', 258}; /* h+e first (rank 0), then l+l, then he+ll */
    assert_int_equal(n, 2);
    assert_memory_equal(ids, want2, sizeof want2);
    assert_int_equal(tokenizer_encode_hf(t, "<s>hello", 8, 0, ids, 64, &n, &e), 0);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 260);
    assert_int_equal(tokenizer_encode(t, "<s>hello", 8, ids, 64, &n, &e), 0);
    const int32_t want3[] = {'<', 's', '>', 259};
    assert_int_equal(n, 4);
    assert_memory_equal(ids, want3, sizeof want3);
    assert_int_equal(tokenizer_encode_hf(t, "12345", 5, 0, ids, 64, &n, &e), 0); /* 123 | 45 */
    const int32_t want4[] = {'1', '2', '3', '4', '5'};
    assert_int_equal(n, 5);
    assert_memory_equal(ids, want4, sizeof want4);
    /* invalid UTF-8: U+FFFD is EF BF BD, three byte tokens */
    assert_int_equal(tokenizer_encode_hf(t, "\xc3", 1, 0, ids, 64, &n, &e), 0);
    const int32_t want5[] = {0xEF, 0xBF, 0xBD};
    assert_int_equal(n, 3);
    assert_memory_equal(ids, want5, sizeof want5);
    char out[64];
    const int32_t half[] = {259, 0xC3, 260};
    assert_int_equal(tokenizer_decode_hf(t, half, 3, 0, out, sizeof out, &e), 0);
    assert_string_equal(out, "hello\xef\xbf\xbd<s>");
    assert_int_equal(tokenizer_decode_hf(t, half, 3, 1, out, sizeof out, &e), 0);
    assert_string_equal(out, "hello\xef\xbf\xbd");
    const int32_t both[] = {0xC3, 0xA9};
    assert_int_equal(tokenizer_decode_hf(t, both, 2, 1, out, sizeof out, &e), 0);
    assert_string_equal(out, "\xc3\xa9");
    tokenizer_free(t);
}

/* json with one change: the dotted key (array indexes as numbers) set to v (NULL: removed) */
static json_t *hand_with(const char *key, json_t *v) {
    json_t *root = hand_bpe(), *d = root;
    char k[128], *dot, *part = k;
    snprintf(k, sizeof k, "%s", key);
    while ((dot = strchr(part, '.'))) {
        *dot = 0;
        d = json_is_array(d) ? json_array_get(d, (size_t)atoi(part)) : json_object_get(d, part);
        assert_non_null(d);
        part = dot + 1;
    }
    if (json_is_array(d))
        assert_int_equal(json_array_set_new(d, (size_t)atoi(part), v), 0);
    else if (v)
        json_object_set_new(d, part, v);
    else
        json_object_del(d, part);
    return root;
}

static void expect_refused(json_t *root, const char *const *needles) {
    char msg[1024];
    tokenizer *t = load_json(root, msg, sizeof msg);
    json_decref(root);
    if (t) {
        tokenizer_free(t);
        fail_msg("loaded, but should have been refused for %s", needles[0]);
    }
    for (int i = 0; needles[i]; i++)
        if (!strstr(msg, needles[i])) fail_msg("message \"%s\" lacks \"%s\"", msg, needles[i]);
}

static void test_bpe_bad_files(void **state) {
    (void)state;
    /* truncated JSON */
    {
        char dir[] = "/tmp/mill-bpe-XXXXXX", path[128];
        assert_non_null(mkdtemp(dir));
        snprintf(path, sizeof path, "%s/tokenizer.json", dir);
        json_t *root = hand_bpe();
        char *s = json_dumps(root, JSON_COMPACT);
        json_decref(root);
        FILE *f = fopen(path, "w");
        fwrite(s, 1, strlen(s) / 2, f);
        fclose(f);
        free(s);
        tokenizer *t = NULL;
        mill_err e = {{0}};
        assert_int_equal(tokenizer_load(&t, path, &e), -1);
        assert_null(t);
        assert_non_null(strstr(e.msg, path));
        assert_non_null(strstr(e.msg, "not valid JSON"));
        assert_null(strchr(e.msg, '\n'));
        unlink(path);
        /* no file at all */
        assert_int_equal(tokenizer_load(&t, dir, &e), -1);
        assert_non_null(strstr(e.msg, "tokenizer.json"));
        assert_non_null(strstr(e.msg, "no such file"));
        rmdir(dir);
    }
    expect_refused(hand_with("model.merges", json_pack("[s, s]", "h e", "h zz")),
                   (const char *[]){"model.merges[1]", "\"zz\"", "not in model.vocab", NULL});
    expect_refused(hand_with("model.merges", json_pack("[s]", "h e l")),
                   (const char *[]){"model.merges[0]", "not two tokens", NULL});
    expect_refused(hand_with("pre_tokenizer.pretokenizers",
                             json_pack("[{s:s}, {s:s}, {s:s, s:s, s:b}]", "type", "ByteLevel", "type", "ByteLevel",
                                       "type", "Metaspace", "replacement", "_", "add_prefix_space", 1)),
                   (const char *[]){"pre_tokenizer.pretokenizers[1]", "nothing may follow", NULL});
    expect_refused(
        hand_with("pre_tokenizer.pretokenizers.1", json_pack("{s:s, s:s}", "type", "Metaspace", "replacement", "_")),
        (const char *[]){"pre_tokenizer.pretokenizers[1].type \"Metaspace\" is not supported", NULL});
    expect_refused(
        hand_with("pre_tokenizer.pretokenizers.0.pattern", json_pack("{s:s}", "Regex", "(ab[")),
        (const char *[]){"pre_tokenizer.pretokenizers[0].pattern.Regex \"(ab[\" does not compile", "PCRE2", NULL});
    expect_refused(hand_with("pre_tokenizer.pretokenizers.0.pattern", json_pack("{s:s}", "Regex", "a\\bb")),
                   (const char *[]){"pre_tokenizer.pretokenizers[0].pattern.Regex", "word boundary", NULL});
    expect_refused(hand_with("pre_tokenizer.pretokenizers.0.behavior", json_string("Sideways")),
                   (const char *[]){"pre_tokenizer.pretokenizers[0].behavior \"Sideways\"", NULL});
    expect_refused(hand_with("model", NULL), (const char *[]){": model is missing", NULL});
    expect_refused(hand_with("model.type", json_string("WordPiece")),
                   (const char *[]){"model.type \"WordPiece\" is not supported", NULL});
    expect_refused(hand_with("model.vocab", NULL), (const char *[]){"model.vocab is missing", NULL});
    expect_refused(hand_with("model.dropout", json_real(0.1)), (const char *[]){"model.dropout", NULL});
    expect_refused(
        hand_with("normalizer", json_pack("{s:s, s:[{s:s}]}", "type", "Sequence", "normalizers", "type", "NFKC")),
        (const char *[]){"normalizer.normalizers[0].type \"NFKC\" is not supported", "Unicode normalization", NULL});
    expect_refused(hand_with("decoder", json_pack("{s:s}", "type", "Metaspace")),
                   (const char *[]){"decoder.type \"Metaspace\" is not supported", NULL});
    expect_refused(hand_with("post_processor", json_pack("{s:s}", "type", "RobertaProcessing")),
                   (const char *[]){"post_processor.type \"RobertaProcessing\" is not supported", NULL});
    expect_refused(hand_with("post_processor.special_tokens", json_object()),
                   (const char *[]){"post_processor.special_tokens has no entry \"<s>\"", NULL});
    expect_refused(hand_with("pre_tokenizer", json_pack("{s:s, s:[]}", "type", "Sequence", "pretokenizers")),
                   (const char *[]){"pre_tokenizer: a ByteLevel step must come last", NULL});
    expect_refused(hand_with("added_tokens", json_pack("[{s:i, s:s}]", "id", 300, "content", "<s>")),
                   (const char *[]){"added_tokens[0] \"<s>\": id 300, but HF gives it 260", NULL});
    expect_refused(hand_with("truncation", json_pack("{s:i}", "max_length", 5)),
                   (const char *[]){"truncation must be null", NULL});
    expect_refused(hand_with("version", json_string("2.0")), (const char *[]){"version \"2.0\"", NULL});
    /* tokenizer_config.json naming a token the tokenizer lacks */
    {
        char dir[] = "/tmp/mill-bpe-XXXXXX", path[128], cfg[128];
        assert_non_null(mkdtemp(dir));
        snprintf(path, sizeof path, "%s/tokenizer.json", dir);
        snprintf(cfg, sizeof cfg, "%s/tokenizer_config.json", dir);
        json_t *root = hand_bpe();
        assert_int_equal(json_dump_file(root, path, JSON_COMPACT), 0);
        json_decref(root);
        json_t *c = json_pack("{s:{s:s}, s:s}", "bos_token", "content", "<s>", "eos_token", "</s>");
        assert_int_equal(json_dump_file(c, cfg, JSON_COMPACT), 0);
        json_decref(c);
        tokenizer *t = NULL;
        mill_err e = {{0}};
        assert_int_equal(tokenizer_load(&t, dir, &e), -1);
        assert_non_null(strstr(e.msg, cfg));
        assert_non_null(strstr(e.msg, "eos_token \"</s>\" is not a token"));
        c = json_pack("{s:{s:s}, s:s, s:n}", "bos_token", "content", "<s>", "eos_token", "<s>", "pad_token");
        assert_int_equal(json_dump_file(c, cfg, JSON_COMPACT), 0);
        json_decref(c);
        if (tokenizer_load(&t, dir, &e)) fail_msg("%s", e.msg);
        assert_int_equal(tokenizer_bos(t), 260);
        assert_int_equal(tokenizer_eos(t), 260);
        assert_int_equal(tokenizer_pad(t), -1);
        tokenizer_free(t);
        unlink(path);
        unlink(cfg);
        rmdir(dir);
    }
}

/* The byte tokenizer's HF-style calls: its three names are matched, bad UTF-8 repaired. */
static void test_bytes_hf_calls(void **state) {
    (void)state;
    tokenizer *t = make(264);
    mill_err e = {{0}};
    int32_t ids[32];
    int n;
    assert_int_equal(tokenizer_encode_hf(t, "a<|eos|>\xff", 9, 1, ids, 32, &n, &e), 0);
    const int32_t want[] = {'a', 257, 0xEF, 0xBF, 0xBD};
    assert_int_equal(n, 5);
    assert_memory_equal(ids, want, sizeof want);
    char out[32];
    const int32_t dec[] = {256, 'h', 0xC3, 257};
    assert_int_equal(tokenizer_decode_hf(t, dec, 4, 1, out, sizeof out, &e), 0);
    assert_string_equal(out, "h\xef\xbf\xbd");
    assert_int_equal(tokenizer_decode_hf(t, dec, 4, 0, out, sizeof out, &e), 0);
    assert_string_equal(out, "<|bos|>h\xef\xbf\xbd<|eos|>");
    assert_int_equal(tokenizer_token_id(t, "<|pad|>"), 258);
    assert_int_equal(tokenizer_token_id(t, "x"), 'x');
    assert_int_equal(tokenizer_token_id(t, "xy"), -1);
    tokenizer_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_specials),
        cmocka_unit_test(test_vocab_too_small),
        cmocka_unit_test(test_all_bytes_round_trip),
        cmocka_unit_test(test_utf8_round_trip),
        cmocka_unit_test(test_specials_decode_by_name),
        cmocka_unit_test(test_decode_bad_ids),
        cmocka_unit_test(test_decode_lossy),
        cmocka_unit_test(test_cap_too_small),
        cmocka_unit_test(test_bytes_hf_calls),
        cmocka_unit_test(test_bpe_hand_built),
        cmocka_unit_test(test_bpe_bad_files),
        cmocka_unit_test(test_bpe_tiny_api),
        cmocka_unit_test(test_bpe_goldens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
