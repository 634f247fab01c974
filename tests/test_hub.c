/* tests/test_hub.c — the hub client (launch/hub.h) against the stand-in hub (tests/hub_server.h)
 * in this process, on 127.0.0.1: nothing touches the network. SHA-256 and SHA-1 on the NIST
 * vectors; repo ids, paths and globs; the listing (LFS oids, blob ids, revisions, datasets, 404s,
 * 401s); downloads (LFS through a redirect to another port with the token left behind, quoted
 * names, an empty file, re-runs that fetch nothing, a changed file fetched again); resume of a
 * partial file, a server that ignores Range, a kept prefix that hashes wrong; 500 and 429 retried,
 * bounded; a body cut short then resumed; a wrong hash and a long body refused with nothing left
 * in place; a stalled server timed out; a locked partial file. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <fcntl.h>
#include <ftw.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/sha256.h"
#include "launch/hub.h"
#include "tests/hub_server.h"

static char g_tmp[256];  /* everything the tests write */
static char g_repo[512]; /* the served repository */

static const char *const g_lfs[] = {"*.safetensors"};

/* ---- fixtures ---- */

static void write_file(const char *rel, const void *data, size_t n) {
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", g_repo, rel);
    char *slash = strrchr(p, '/');
    *slash = 0;
    mkdir(p, 0755);
    *slash = '/';
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static unsigned char *random_bytes(size_t n, uint32_t seed) {
    unsigned char *b = malloc(n);
    assert_non_null(b);
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        b[i] = (unsigned char)(seed >> 24);
    }
    return b;
}

static void make_repo(void **state) {
    (void)state;
    snprintf(g_repo, sizeof g_repo, "%s/repo", g_tmp);
    assert_int_equal(mkdir(g_repo, 0755), 0);
    const char *cfg = "{\"model_type\": \"deepseek_v4\", \"hidden_size\": 64}\n";
    write_file("config.json", cfg, strlen(cfg));
    char *tok = malloc(40000);
    assert_non_null(tok);
    for (int i = 0; i < 40000; i++) tok[i] = (char)('a' + i % 26);
    write_file("tokenizer.json", tok, 40000);
    free(tok);
    const char *idx = "{\"weight_map\": {\"a\": \"model-00001-of-00002.safetensors\", \"b\": "
                      "\"model-00002-of-00002.safetensors\"}}\n";
    write_file("model.safetensors.index.json", idx, strlen(idx));
    unsigned char *s1 = random_bytes(300000, 1), *s2 = random_bytes(200001, 2);
    write_file("model-00001-of-00002.safetensors", s1, 300000);
    write_file("model-00002-of-00002.safetensors", s2, 200001);
    free(s1);
    free(s2);
    write_file("sub dir/a+b&c.txt", "quoted\n", 7);
    write_file("empty.txt", "", 0);
}

static hub_server *start(const char *token, int dataset) {
    hs_config c = {.dir = g_repo, .repo = "acme/tiny", .dataset = dataset, .token = token, .lfs = g_lfs, .n_lfs = 1};
    char err[256];
    hub_server *s = hs_start(&c, err, sizeof err);
    if (!s) print_error("hub_server: %s\n", err);
    assert_non_null(s);
    return s;
}

static char g_ep[64];

static hub_client client(hub_server *s, const char *token) {
    snprintf(g_ep, sizeof g_ep, "http://127.0.0.1:%d/", hs_port(s)); /* a trailing '/' as users write it */
    hub_client c = {.endpoint = g_ep,
                    .token = token,
                    .type = HUB_MODEL,
                    .repo = "acme/tiny",
                    .timeout_s = 2,
                    .retries = 3,
                    .backoff_s = 0.01};
    return c;
}

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(p);
}

static const char *fresh_out(const char *name) {
    static char p[512];
    snprintf(p, sizeof p, "%s/%s", g_tmp, name);
    nftw(p, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    return p;
}

static unsigned char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long k = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)k + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)k, f), (size_t)k);
    fclose(f);
    *n = (size_t)k;
    return b;
}

/* 1 when out/rel has the served file's bytes. */
static int same_as_repo(const char *out, const char *rel) {
    char a[1024], b[1024];
    snprintf(a, sizeof a, "%s/%s", out, rel);
    snprintf(b, sizeof b, "%s/%s", g_repo, rel);
    size_t na = 0, nb = 0;
    unsigned char *x = read_all(a, &na), *y = read_all(b, &nb);
    int same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

static int exists(const char *out, const char *rel) {
    char a[1024];
    struct stat st;
    snprintf(a, sizeof a, "%s/%s", out, rel);
    return stat(a, &st) == 0;
}

/* The number of files under dir/.cache/mill/download whose name ends in suffix. */
static int g_count;
static const char *g_suffix;
static int count_one(const char *p, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)ftw;
    size_t n = strlen(p), k = strlen(g_suffix);
    if (flag == FTW_F && n >= k && strcmp(p + n - k, g_suffix) == 0) g_count++;
    return 0;
}
static int count_state(const char *out, const char *suffix) {
    char p[1024];
    snprintf(p, sizeof p, "%s/.cache/mill/download", out);
    g_count = 0;
    g_suffix = suffix;
    nftw(p, count_one, 16, FTW_PHYS);
    return g_count;
}

static const hub_file *file_of(const hub_listing *l, const char *path) {
    for (int i = 0; i < l->n; i++)
        if (strcmp(l->files[i].path, path) == 0) return &l->files[i];
    fail_msg("no %s in the listing", path);
    return NULL;
}

/* The partial file hub.c would resume for f, with the first n bytes of data (or of the file). */
static void plant_partial(const char *out, const hub_file *f, const unsigned char *data, size_t n) {
    char p[1024];
    snprintf(p, sizeof p, "%s/.cache", out);
    mkdir(out, 0755), mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/.cache/mill", out), mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/.cache/mill/download", out), mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/.cache/mill/download/%s.%.16s.incomplete", out, f->path,
             f->sha256[0] ? f->sha256 : f->blob);
    unsigned char *src = NULL;
    if (!data) {
        char q[1024];
        size_t m;
        snprintf(q, sizeof q, "%s/%s", g_repo, f->path);
        src = read_all(q, &m);
        data = src;
    }
    FILE *o = fopen(p, "wb");
    assert_non_null(o);
    assert_int_equal(fwrite(data, 1, n, o), n);
    fclose(o);
    free(src);
}

static void list_ok(const hub_client *c, hub_listing *l) {
    mill_err e = {{0}};
    int rc = hub_list(c, "main", l, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
}

static void download_ok(const hub_client *c, const hub_listing *l, const char *path, const char *out, hub_result *r) {
    mill_err e = {{0}};
    int rc = hub_download_file(c, l->commit, file_of(l, path), out, r, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
}

static void expect_error(int rc, const mill_err *e, const char *want) {
    assert_int_equal(rc, -1);
    print_message("error: %s\n", e->msg);
    if (!strstr(e->msg, want)) fail_msg("expected \"%s\" in: %s", want, e->msg);
    assert_null(strchr(e->msg, '\n')); /* one line */
}

/* ---- the cases ---- */

static void hex_of(const char *what, const char *msg, size_t n, int reps, int sha1, const char *want) {
    char got[65];
    uint8_t d[32];
    if (sha1) {
        sha1_ctx c;
        sha1_init(&c);
        for (int i = 0; i < reps; i++) sha1_update(&c, msg, n);
        sha1_final(&c, d);
        sha_hex(d, 20, got);
    } else {
        sha256_ctx c;
        sha256_init(&c);
        for (int i = 0; i < reps; i++) sha256_update(&c, msg, n);
        sha256_final(&c, d);
        sha_hex(d, 32, got);
    }
    if (strcmp(got, want)) fail_msg("%s %s: got %s, want %s", sha1 ? "SHA-1" : "SHA-256", what, got, want);
}

/* FIPS 180-4 examples (NIST CSRC "Examples with Intermediate Values") and the long message. */
static void test_sha_vectors(void **state) {
    (void)state;
    const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    const char *m896 = "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqr"
                       "smnopqrstnopqrstu";
    hex_of("\"\"", "", 0, 1, 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    hex_of("abc", "abc", 3, 1, 0, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    hex_of("448 bits", m448, strlen(m448), 1, 0, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    hex_of("896 bits", m896, strlen(m896), 1, 0, "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
    hex_of("a x 10^6", "aaaaaaaaaa", 10, 100000, 0, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    hex_of("\"\"", "", 0, 1, 1, "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    hex_of("abc", "abc", 3, 1, 1, "a9993e364706816aba3e25717850c26c9cd0d89d");
    hex_of("448 bits", m448, strlen(m448), 1, 1, "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
    hex_of("896 bits", m896, strlen(m896), 1, 1, "a49b2446a02c645bf419f995b67091253a04a259");
    hex_of("a x 10^6", "aaaaaaaaaa", 10, 100000, 1, "34aa973cd4c4daa4f61eeb2bdbad27316534016f");
    /* every split of a message across updates gives the one-call digest */
    unsigned char *buf = random_bytes(300, 7);
    uint8_t one[32], two[32];
    sha256_ctx a;
    sha256_init(&a);
    sha256_update(&a, buf, 300);
    sha256_final(&a, one);
    for (size_t cut = 0; cut <= 300; cut++) {
        sha256_init(&a);
        sha256_update(&a, buf, cut);
        sha256_update(&a, buf + cut, 300 - cut);
        sha256_final(&a, two);
        assert_memory_equal(one, two, 32);
    }
    free(buf);
    /* git's blob id of the empty file: sha1("blob 0\0") */
    hex_of("blob 0", "blob 0", 7, 1, 1, "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
}

static void test_names(void **state) {
    (void)state;
    mill_err e;
    const char *good[] = {"gpt2", "deepseek-ai/DeepSeek-V4-Flash", "a_b/c.d-e", "Org/model.v2"};
    const char *bad[] = {"", "a/b/c", "/a", "a/", "a b", "a--b", "a..b", "-a", "a/.b", "a/b-", "x\ny", "a/b?c"};
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) assert_int_equal(hub_check_repo_id(good[i], &e), 0);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        assert_int_equal(hub_check_repo_id(bad[i], &e), -1);
        assert_null(strchr(e.msg, '\n'));
    }
    const char *okp[] = {"config.json", "sub dir/a+b.txt", "original/x.safetensors", ".gitattributes", ".cache/other"};
    const char *badp[] = {"",           "/etc/passwd", "../x", "a/../../x", "a//b",
                          "./a",        "a/.",         "a\\b", "a\tb",      ".cache/mill/download/x.meta",
                          ".cache/mill"};
    for (size_t i = 0; i < sizeof okp / sizeof *okp; i++) assert_int_equal(hub_check_path(okp[i], &e), 0);
    for (size_t i = 0; i < sizeof badp / sizeof *badp; i++) {
        if (hub_check_path(badp[i], &e) != -1) fail_msg("path \"%s\" accepted", badp[i]);
    }
    const char *g1[] = {"*.json"}, *g2[] = {"model-*.safetensors", "tokenizer*"}, *g3[] = {"sub dir/"}, *g4[] = {"*"};
    assert_true(hub_glob_match(NULL, 0, "anything"));
    assert_true(hub_glob_match(g1, 1, "config.json"));
    assert_true(hub_glob_match(g1, 1, "sub/x.json")); /* '*' crosses '/', as Python's fnmatch */
    assert_false(hub_glob_match(g1, 1, "model.safetensors"));
    assert_true(hub_glob_match(g2, 2, "model-00001-of-00002.safetensors"));
    assert_true(hub_glob_match(g2, 2, "tokenizer.json"));
    assert_false(hub_glob_match(g2, 2, "model.safetensors.index.json"));
    assert_true(hub_glob_match(g3, 1, "sub dir/a+b&c.txt"));
    assert_false(hub_glob_match(g3, 1, "sub dirx/a"));
    assert_true(hub_glob_match(g4, 1, ".gitattributes"));
}

static void test_list(void **state) {
    (void)state;
    hub_server *s = start(NULL, 0);
    hub_client c = client(s, NULL);
    hub_listing l;
    list_ok(&c, &l);
    assert_string_equal(l.commit, hs_commit(s));
    assert_int_equal(l.n, 7);
    assert_string_equal(l.files[0].path, "config.json"); /* sorted */
    const hub_file *s1 = file_of(&l, "model-00001-of-00002.safetensors"), *cfg = file_of(&l, "config.json");
    assert_int_equal(s1->size, 300000);
    assert_int_equal(strlen(s1->sha256), 64);
    assert_string_equal(s1->blob, ""); /* the pointer's blob is not the content's */
    assert_int_equal(strlen(cfg->blob), 40);
    assert_string_equal(cfg->sha256, "");
    assert_int_equal(file_of(&l, "empty.txt")->size, 0);
    assert_string_equal(file_of(&l, "empty.txt")->blob, "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
    /* the sha256 is the content's */
    char p[1024];
    size_t n;
    snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", g_repo);
    unsigned char *b = read_all(p, &n);
    sha256_ctx a;
    uint8_t d[32];
    char hx[65];
    sha256_init(&a);
    sha256_update(&a, b, n);
    sha256_final(&a, d);
    sha_hex(d, 32, hx);
    free(b);
    assert_string_equal(s1->sha256, hx);
    hub_listing_free(&l);

    mill_err e = {{0}};
    assert_int_equal(hub_list(&c, hs_commit(s), &l, &e), 0); /* a commit id is a revision too */
    hub_listing_free(&l);
    expect_error(hub_list(&c, "v9.9", &l, &e), &e, "404: no revision \"v9.9\" in repo acme/tiny");
    hub_client nope = c;
    nope.repo = "acme/nope";
    expect_error(hub_list(&nope, "main", &l, &e), &e, "404: no model repo acme/nope");
    assert_non_null(strstr(e.msg, "--repo-type dataset"));
    hub_client ds = c;
    ds.type = HUB_DATASET;
    expect_error(hub_list(&ds, "main", &l, &e), &e, "404: no dataset repo acme/tiny");
    nope.repo = "bad repo";
    expect_error(hub_list(&nope, "main", &l, &e), &e, "repo id \"bad repo\"");
    hs_stop(s);

    /* a dataset: /api/datasets/ and /datasets/.../resolve/ */
    s = start(NULL, 1);
    c = client(s, NULL);
    c.type = HUB_DATASET;
    list_ok(&c, &l);
    const char *out = fresh_out("ds");
    hub_result r;
    download_ok(&c, &l, "config.json", out, &r);
    download_ok(&c, &l, "model-00002-of-00002.safetensors", out, &r);
    assert_true(same_as_repo(out, "config.json") && same_as_repo(out, "model-00002-of-00002.safetensors"));
    hub_listing_free(&l);
    hs_stop(s);
}

static int g_calls;
static int64_t g_last_done, g_last_total;
static void count_progress(void *ud, const hub_file *f, int64_t done, int64_t total) {
    (void)ud, (void)f;
    g_calls++;
    g_last_done = done, g_last_total = total;
}

static void test_download_all(void **state) {
    (void)state;
    hub_server *s = start("hf_secret", 0);
    hub_client c = client(s, "hf_secret");
    c.progress = count_progress;
    hub_listing l;
    list_ok(&c, &l);
    const char *out = fresh_out("all");
    hs_reset_stats(s);
    for (int i = 0; i < l.n; i++) {
        hub_result r;
        g_calls = 0;
        download_ok(&c, &l, l.files[i].path, out, &r);
        assert_false(r.skipped);
        assert_int_equal(r.fetched, l.files[i].size);
        assert_true(same_as_repo(out, l.files[i].path));
        if (l.files[i].size) assert_true(g_calls > 0 && g_last_done == g_last_total && g_last_total == l.files[i].size);
    }
    hs_stats st;
    hs_get_stats(s, &st);
    print_message("requests %d: resolve %d, cdn %d; Authorization on hub %d, on cdn %d\n", st.requests, st.resolve,
                  st.cdn, st.hub_auth, st.cdn_auth);
    assert_int_equal(st.resolve, 6); /* the empty file needs no request */
    assert_int_equal(st.cdn, 2);     /* the LFS files, redirected to the other port */
    assert_int_equal(st.hub_auth, 6);
    assert_int_equal(st.cdn_auth, 0); /* the token never left the endpoint's host:port */
    assert_int_equal(count_state(out, ".incomplete"), 0);
    assert_int_equal(count_state(out, ".meta"), 7);

    /* again: nothing fetched, nothing asked */
    hs_reset_stats(s);
    for (int i = 0; i < l.n; i++) {
        hub_result r;
        download_ok(&c, &l, l.files[i].path, out, &r);
        assert_true(r.skipped);
        assert_int_equal(r.attempts, 0);
    }
    c.verify = 1; /* hashing every file again still finds them right */
    for (int i = 0; i < l.n; i++) {
        hub_result r;
        download_ok(&c, &l, l.files[i].path, out, &r);
        assert_true(r.skipped);
    }
    c.verify = 0;
    hs_get_stats(s, &st);
    assert_int_equal(st.requests, 0);

    /* a byte changed in place (same size): the record no longer matches, the hash neither: fetched again */
    char p[1024];
    snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", out);
    int fd = open(p, O_WRONLY);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, "X", 1, 1000), 1);
    close(fd);
    hub_result r;
    download_ok(&c, &l, "model-00001-of-00002.safetensors", out, &r);
    assert_false(r.skipped);
    assert_true(r.replaced);
    assert_true(same_as_repo(out, "model-00001-of-00002.safetensors"));
    /* without its record, a right file is hashed once and kept */
    snprintf(p, sizeof p, "%s/.cache/mill/download/config.json.meta", out);
    assert_int_equal(unlink(p), 0);
    download_ok(&c, &l, "config.json", out, &r);
    assert_true(r.skipped);
    assert_int_equal(access(p, F_OK), 0);
    /* a different size: fetched again */
    snprintf(p, sizeof p, "%s/tokenizer.json", out);
    assert_int_equal(truncate(p, 10), 0);
    download_ok(&c, &l, "tokenizer.json", out, &r);
    assert_true(r.replaced && same_as_repo(out, "tokenizer.json"));
    hub_listing_free(&l);
    hs_stop(s);
}

static void test_auth(void **state) {
    (void)state;
    hub_server *s = start("hf_secret", 0);
    hub_client c = client(s, NULL);
    hub_listing l;
    mill_err e = {{0}};
    expect_error(hub_list(&c, "main", &l, &e), &e, "401: set HF_TOKEN for this gated/private repo acme/tiny");
    c.token = "hf_wrong";
    expect_error(hub_list(&c, "main", &l, &e), &e, "401: the hub refused the token");
    assert_null(strstr(e.msg, "hf_wrong")); /* never printed */
    c.token = "hf_secret";
    list_ok(&c, &l);
    c.token = NULL;
    hs_reset_stats(s);
    hub_result r;
    const char *out = fresh_out("auth");
    expect_error(hub_download_file(&c, l.commit, file_of(&l, "config.json"), out, &r, &e), &e, "401: set HF_TOKEN");
    hs_stats st;
    hs_get_stats(s, &st);
    assert_int_equal(st.requests, 1); /* no retry */
    assert_false(exists(out, "config.json"));
    assert_int_equal(count_state(out, ".incomplete"), 0);
    hub_listing_free(&l);
    hs_stop(s);
}

static void test_resume(void **state) {
    (void)state;
    hub_server *s = start(NULL, 0);
    hub_client c = client(s, NULL);
    hub_listing l;
    list_ok(&c, &l);
    const hub_file *f = file_of(&l, "model-00001-of-00002.safetensors");
    const char *out = fresh_out("resume");
    plant_partial(out, f, NULL, 100000);
    hub_result r;
    download_ok(&c, &l, f->path, out, &r);
    assert_int_equal(r.resumed_from, 100000);
    assert_int_equal(r.fetched, 200000);
    assert_false(r.range_ignored);
    assert_int_equal(hs_last_range(s, f->path), 100000);
    assert_true(same_as_repo(out, f->path));
    assert_int_equal(count_state(out, ".incomplete"), 0);

    /* a small (non-LFS) file resumes from the hub itself */
    const hub_file *t = file_of(&l, "tokenizer.json");
    plant_partial(out, t, NULL, 12345);
    download_ok(&c, &l, t->path, out, &r);
    assert_int_equal(r.resumed_from, 12345);
    assert_int_equal(hs_last_range(s, t->path), 12345);
    assert_true(same_as_repo(out, t->path));

    /* a partial file as long as the file: checked, then renamed, no request */
    out = fresh_out("resume-full");
    const hub_file *f2 = file_of(&l, "model-00002-of-00002.safetensors");
    plant_partial(out, f2, NULL, (size_t)f2->size);
    download_ok(&c, &l, f2->path, out, &r);
    assert_int_equal(r.attempts, 0);
    assert_true(same_as_repo(out, f2->path));

    /* a server that ignores Range: the whole file again, and still right */
    out = fresh_out("norange");
    plant_partial(out, f, NULL, 150000);
    hs_fault(s, f->path, HS_NORANGE, -1);
    download_ok(&c, &l, f->path, out, &r);
    assert_true(r.range_ignored);
    assert_int_equal(r.fetched, 300000);
    assert_true(same_as_repo(out, f->path));
    hs_fault(s, f->path, HS_NONE, 0);

    /* a kept prefix that is not the file's (another version, a crash's garbage): hashed wrong,
     * fetched again from byte 0 */
    out = fresh_out("badprefix");
    unsigned char *junk = random_bytes(100000, 99);
    plant_partial(out, f, junk, 100000);
    free(junk);
    download_ok(&c, &l, f->path, out, &r);
    assert_true(r.restarted);
    assert_true(same_as_repo(out, f->path));
    hub_listing_free(&l);
    hs_stop(s);
}

static void test_retries(void **state) {
    (void)state;
    hub_server *s = start(NULL, 0);
    hub_client c = client(s, NULL);
    hub_listing l;
    list_ok(&c, &l);
    const char *out = fresh_out("retry");
    hub_result r;
    mill_err e = {{0}};
    /* 500 twice, then the file */
    hs_fault(s, "config.json", HS_500, 2);
    download_ok(&c, &l, "config.json", out, &r);
    assert_int_equal(r.attempts, 3);
    assert_true(same_as_repo(out, "config.json"));
    /* 429 (Retry-After: 0) once, on the CDN */
    hs_fault(s, "model-00002-of-00002.safetensors", HS_429, 1);
    download_ok(&c, &l, "model-00002-of-00002.safetensors", out, &r);
    assert_int_equal(r.attempts, 2);
    /* 500 for ever: bounded, one line, the file absent */
    hs_fault(s, "tokenizer.json", HS_500, -1);
    hs_reset_stats(s);
    c.retries = 2;
    double t0 = mill_now();
    expect_error(hub_download_file(&c, l.commit, file_of(&l, "tokenizer.json"), out, &r, &e), &e,
                 "gave up after 3 attempts");
    assert_non_null(strstr(e.msg, "HTTP 500"));
    assert_true(mill_now() - t0 < 2.0);
    hs_stats st;
    hs_get_stats(s, &st);
    assert_int_equal(st.resolve, 3);
    assert_false(exists(out, "tokenizer.json"));
    hs_fault(s, "tokenizer.json", HS_NONE, 0);
    /* a body cut short once: the next request resumes where it stopped */
    const hub_file *f = file_of(&l, "model-00001-of-00002.safetensors");
    hs_fault(s, f->path, HS_TRUNCATE, 1);
    download_ok(&c, &l, f->path, out, &r);
    assert_int_equal(r.attempts, 2);
    assert_int_equal(hs_last_range(s, f->path), 150000);
    assert_int_equal(r.fetched, 300000);
    assert_true(same_as_repo(out, f->path));
    /* the connection refused: retried, then one line */
    int port = hs_port(s);
    hs_stop(s);
    snprintf(g_ep, sizeof g_ep, "http://127.0.0.1:%d", port);
    hub_listing l2;
    expect_error(hub_list(&c, "main", &l2, &e), &e, "gave up after 3 attempts");
    hub_listing_free(&l);
}

static void test_refused_bytes(void **state) {
    (void)state;
    hub_server *s = start(NULL, 0);
    hub_client c = client(s, NULL);
    hub_listing l;
    list_ok(&c, &l);
    const char *out = fresh_out("refused");
    hub_result r;
    mill_err e = {{0}};
    /* a wrong sha256 (LFS): one line, nothing in place, no partial file */
    hs_fault(s, "model-00002-of-00002.safetensors", HS_CORRUPT, -1);
    expect_error(hub_download_file(&c, l.commit, file_of(&l, "model-00002-of-00002.safetensors"), out, &r, &e), &e,
                 "sha256");
    assert_non_null(strstr(e.msg, "model-00002-of-00002.safetensors"));
    assert_false(exists(out, "model-00002-of-00002.safetensors"));
    assert_int_equal(count_state(out, ".incomplete"), 0);
    /* a wrong git blob id (a small file) */
    hs_fault(s, "config.json", HS_CORRUPT, -1);
    expect_error(hub_download_file(&c, l.commit, file_of(&l, "config.json"), out, &r, &e), &e, "git blob sha1");
    assert_false(exists(out, "config.json"));
    /* more bytes than listed */
    hs_fault(s, "tokenizer.json", HS_LONG, -1);
    expect_error(hub_download_file(&c, l.commit, file_of(&l, "tokenizer.json"), out, &r, &e), &e, "the listing 40000");
    assert_false(exists(out, "tokenizer.json"));
    assert_int_equal(count_state(out, ".incomplete"), 0);
    /* a file the hub does not have: 404, no retry */
    hub_file ghost = {.path = "ghost.bin", .size = 10};
    hs_reset_stats(s);
    expect_error(hub_download_file(&c, l.commit, &ghost, out, &r, &e), &e, "404: no file ghost.bin at revision");
    assert_non_null(strstr(e.msg, "of repo acme/tiny"));
    hs_stats st;
    hs_get_stats(s, &st);
    assert_int_equal(st.requests, 1);
    /* a path that would leave DIR */
    hub_file evil = {.path = "../evil.txt", .size = 1};
    expect_error(hub_download_file(&c, l.commit, &evil, out, &r, &e), &e, "\"..\"");
    char p[1024];
    snprintf(p, sizeof p, "%s/evil.txt", g_tmp);
    assert_int_equal(access(p, F_OK), -1);
    /* a stalled server: timed out, retried, one line, in bounded time */
    hs_fault(s, "tokenizer.json", HS_STALL, -1);
    c.timeout_s = 1;
    c.retries = 1;
    double t0 = mill_now();
    expect_error(hub_download_file(&c, l.commit, file_of(&l, "tokenizer.json"), out, &r, &e), &e,
                 "gave up after 2 attempts");
    double dt = mill_now() - t0;
    print_message("stalled server given up after %.2f s\n", dt);
    assert_true(dt >= 1.5 && dt < 8.0);
    hs_fault(s, "tokenizer.json", HS_NONE, 0);
    /* a partial file another download holds */
    const hub_file *f = file_of(&l, "model-00001-of-00002.safetensors");
    plant_partial(out, f, NULL, 10);
    snprintf(p, sizeof p, "%s/.cache/mill/download/%s.%.16s.incomplete", out, f->path, f->sha256);
    int fd = open(p, O_RDWR);
    assert_true(fd >= 0);
    assert_int_equal(flock(fd, LOCK_EX), 0);
    expect_error(hub_download_file(&c, l.commit, f, out, &r, &e), &e, "another download is writing it");
    close(fd);
    download_ok(&c, &l, f->path, out, &r); /* and once it is free, resumed */
    assert_int_equal(r.resumed_from, 10);
    hub_listing_free(&l);
    hs_stop(s);
}

static void test_token_env(void **state) {
    (void)state;
    char *tok = NULL;
    mill_err e = {{0}};
    char p[512];
    snprintf(p, sizeof p, "%s/hfhome", g_tmp);
    mkdir(p, 0755);
    unsetenv("HF_TOKEN");
    unsetenv("HF_TOKEN_PATH");
    setenv("HF_HOME", p, 1);
    assert_int_equal(hub_token_from_env(&tok, &e), 0);
    assert_null(tok); /* none anywhere */
    snprintf(p, sizeof p, "%s/hfhome/token", g_tmp);
    FILE *f = fopen(p, "w");
    fputs("hf_fromfile\n", f);
    fclose(f);
    assert_int_equal(hub_token_from_env(&tok, &e), 0);
    assert_string_equal(tok, "hf_fromfile");
    free(tok);
    setenv("HF_TOKEN", "hf_env", 1); /* the variable wins */
    assert_int_equal(hub_token_from_env(&tok, &e), 0);
    assert_string_equal(tok, "hf_env");
    free(tok);
    setenv("HF_TOKEN", "hf_a\r\nX-Evil: 1", 1);
    expect_error(hub_token_from_env(&tok, &e), &e, "HF_TOKEN: the hub token has a space or control character");
    assert_null(strstr(e.msg, "hf_a"));
    unsetenv("HF_TOKEN");
}

int main(void) {
    /* The server is on loopback: a proxy from the environment must not get in between. */
    static const char *const proxies[] = {"http_proxy",  "HTTP_PROXY", "https_proxy",
                                          "HTTPS_PROXY", "all_proxy",  "ALL_PROXY"};
    for (size_t i = 0; i < sizeof proxies / sizeof proxies[0]; i++) unsetenv(proxies[i]);
    setenv("no_proxy", "*", 1);
    snprintf(g_tmp, sizeof g_tmp, "%s/test_hub.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(g_tmp)) {
        perror("mkdtemp");
        return 1;
    }
    mill_err e = {{0}};
    if (hub_global_init(&e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    const struct CMUnitTest setup[] = {cmocka_unit_test(make_repo)};
    int rc = cmocka_run_group_tests_name("fixture", setup, NULL, NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha_vectors),  cmocka_unit_test(test_names),         cmocka_unit_test(test_list),
        cmocka_unit_test(test_download_all), cmocka_unit_test(test_auth),          cmocka_unit_test(test_resume),
        cmocka_unit_test(test_retries),      cmocka_unit_test(test_refused_bytes), cmocka_unit_test(test_token_env),
    };
    if (rc == 0) rc = cmocka_run_group_tests(tests, NULL, NULL);
    hub_global_cleanup();
    nftw(g_tmp, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    return rc;
}
