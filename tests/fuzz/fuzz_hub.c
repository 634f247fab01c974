/* tests/fuzz/fuzz_hub.c — fuzz target for what `mill download` reads from the network
 * (launch/hub.c, included here for its static parsers): the repo-info listing JSON
 * (parse_listing), response header lines (on_header: Content-Length, Content-Range, ETag,
 * X-Linked-*, X-Error-*, Retry-After), an error body's snippet (on_body), the error message built
 * from them (status_error), and the checks every listed path meets before it names a file
 * (hub_check_path, hub_glob_match, the resolve URL).
 * Input: the listing body; after FUZZ_SEP, header lines; after another, an error body.
 * Promises checked: a listing that parses has a 40-hex commit, files sorted with no repeats, hex
 * ids of the right lengths; a path hub_check_path accepts stays inside the download directory
 * (checked here independently: relative, no empty/./.. component, no control byte or '\\', not
 * under .cache/mill); header values stay NUL-terminated inside their fields. */
#include "fuzz_common.h"
#include "launch/hub.c"

static int hexlen(const char *s, size_t n) {
    if (strlen(s) != n) return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
    return 1;
}

/* An independent reading of "a path inside the repository". */
static int path_inside(const char *p) {
    if (!p[0] || p[0] == '/' || !strncmp(p, ".cache/mill/", 12) || !strcmp(p, ".cache/mill")) return 0;
    for (const unsigned char *c = (const unsigned char *)p; *c; c++)
        if (*c < 0x20 || *c == 0x7f || *c == '\\') return 0;
    const char *s = p;
    for (;;) {
        const char *end = strchr(s, '/');
        size_t k = end ? (size_t)(end - s) : strlen(s);
        if (k == 0 || (k == 1 && s[0] == '.') || (k == 2 && !strncmp(s, "..", 2))) return 0;
        if (!end) return 1;
        s = end + 1;
    }
}

static void check_listing(const hub_listing *l) {
    FUZZ_CHECK(hexlen(l->commit, 40));
    FUZZ_CHECK(l->n >= 0);
    static const char *const globs[] = {"*.json", "model*/", "*", "[", "a/**/b"};
    hub_client c = {.endpoint = "https://huggingface.co/", .type = HUB_DATASET, .repo = "o/r"};
    char url[4096];
    for (int i = 0; i < l->n; i++) {
        const hub_file *f = &l->files[i];
        FUZZ_CHECK(f->path != NULL && f->size >= 0);
        if (i) FUZZ_CHECK(strcmp(l->files[i - 1].path, f->path) < 0);
        FUZZ_CHECK(f->sha256[0] == 0 || hexlen(f->sha256, 64));
        FUZZ_CHECK(f->blob[0] == 0 || hexlen(f->blob, 40));
        FUZZ_CHECK(!(f->sha256[0] && f->blob[0]));
        mill_err e;
        int ok = hub_check_path(f->path, &e) == 0;
        if (ok) FUZZ_CHECK(path_inside(f->path));
        (void)hub_glob_match(globs, 5, f->path);
        (void)hub_glob_match(globs + (i % 5), 1, f->path);
        if (ok && resolve_url(&c, l->commit, f->path, url, sizeof url) == 0) {
            FUZZ_CHECK(strlen(url) < sizeof url);
            for (const char *p = url; *p; p++) FUZZ_CHECK(*p > 0x20 && *p < 0x7f); /* percent-encoded */
        }
    }
}

static void check_field(const char *s, size_t cap) { FUZZ_CHECK(memchr(s, 0, cap) != NULL); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *part[3];
    size_t len[3];
    int np = fuzz_split(data, size, part, len, 3);
    mill_err e;
    e.msg[0] = 0;

    char *body = fuzz_dup(part[0], len[0]);
    hub_listing l;
    memset(&l, 0, sizeof l); /* as hub_list does */
    int rc = parse_listing("https://hub/api", body, len[0], &l, &e);
    FUZZ_CHECK(rc == 0 || rc == -1);
    if (rc == 0) {
        check_listing(&l);
    } else {
        FUZZ_CHECK(e.msg[0] != 0 && l.files == NULL && l.n == 0);
        fuzz_refused("parse_listing", e.msg);
    }
    hub_listing_free(&l);
    free(body);
    if (np < 2) return 0;

    hub_xfer x;
    memset(&x, 0, sizeof x);
    hdrs_reset(&x.h);
    for (const uint8_t *p = part[1], *end = part[1] + len[1]; p < end;) {
        const uint8_t *nl = memchr(p, '\n', (size_t)(end - p));
        size_t k = nl ? (size_t)(nl - p) + 1 : (size_t)(end - p);
        /* curl hands over one whole line, CRLF included, without a NUL: exactly that */
        int whole = nl != NULL;
        char *line = malloc(k + (whole ? 0 : 2));
        FUZZ_CHECK(line != NULL);
        memcpy(line, p, k);
        if (!whole) memcpy(line + k, "\r\n", 2);
        size_t lk = k + (whole ? 0 : 2);
        FUZZ_CHECK(on_header(line, 1, lk, &x) == lk);
        free(line);
        p += k;
    }
    check_field(x.h.etag, sizeof x.h.etag);
    check_field(x.h.linked_etag, sizeof x.h.linked_etag);
    check_field(x.h.error_code, sizeof x.h.error_code);
    check_field(x.h.error_msg, sizeof x.h.error_msg);
    FUZZ_CHECK(x.h.content_length >= -1 && x.h.linked_size >= -1);
    if (np > 2) {
        char *eb = fuzz_dup(part[2], len[2]);
        if (x.h.status >= 200 && x.h.status < 300) x.h.status = 500; /* the snippet path only */
        FUZZ_CHECK(on_body(eb, 1, len[2], &x) == len[2]);
        free(eb);
        FUZZ_CHECK(x.snip_n < sizeof x.snip && x.snip[x.snip_n] == 0);
    }
    hub_client c = {.endpoint = "https://huggingface.co", .token = (size & 1) ? "hf_x" : NULL, .repo = "o/r"};
    char why[700] = "";
    e.msg[0] = 0;
    if (status_error(&c, &x, "https://hub/x", (size & 2) ? "a.json" : NULL, "main", why, sizeof why, &e))
        FUZZ_CHECK(why[0] != 0);
    else
        FUZZ_CHECK(e.msg[0] != 0);
    return 0;
}
