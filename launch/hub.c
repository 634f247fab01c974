/* launch/hub.c — the hub client. See hub.h for the contract and the hub's URL layout.
 * One curl easy handle per call (list, or one file), kept across redirects and retries so that a
 * live connection is reused; redirects are followed by hand (auth only to the endpoint's origin). */
#include "hub.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../algos/reward_remote.h"
#include "../common/sha256.h"

enum {
    HUB_MAX_LISTING = 256 << 20, /* a repo info reply this big is not one */
    HUB_MAX_HOPS = 10,
    HUB_MAX_ATTEMPTS = 1000, /* with progress between them; a bound on a server that trickles */
    HUB_PATH_MAX = 4096,
};

#define HUB_STATE_DIR ".cache/mill/download"

int hub_global_init(mill_err *e) {
    CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (rc != CURLE_OK) return mill_errf(e, "hub: curl_global_init: %s", curl_easy_strerror(rc));
    return 0;
}

void hub_global_cleanup(void) { curl_global_cleanup(); }

static const char *type_word(hub_repo_type t) { return t == HUB_DATASET ? "dataset" : "model"; }

/* ---- names: repo ids, paths, tokens ---- */

int hub_check_repo_id(const char *repo, mill_err *e) {
    static const char *want =
        "expected NAME or OWNER/NAME of letters, digits, '-', '_' and '.' (e.g. deepseek-ai/DeepSeek-V4-Flash)";
    if (!repo || !repo[0]) return mill_errf(e, "repo id is empty; %s", want);
    size_t n = strlen(repo);
    int slashes = 0;
    if (n > 96) return mill_errf(e, "repo id \"%.40s...\" is %zu characters; the hub allows 96", repo, n);
    for (size_t i = 0; i < n; i++) {
        char ch = repo[i];
        int ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' ||
                 ch == '_' || ch == '.' || ch == '/';
        if (!ok) {
            char shown[100]; /* the id as given, on one line */
            size_t k = 0;
            for (; k < n && k < sizeof shown - 1; k++) shown[k] = repo[k] >= 0x20 && repo[k] < 0x7f ? repo[k] : '?';
            shown[k] = 0;
            return mill_errf(e, "repo id \"%s\": character %zu is not allowed; %s", shown, i + 1, want);
        }
        if (ch == '/') slashes++;
    }
    /* the hub's rules: no "--" or "..", no part starting or ending with '-' or '.' */
    if (slashes > 1 || repo[0] == '/' || repo[n - 1] == '/' || strstr(repo, "--") || strstr(repo, ".."))
        return mill_errf(e, "repo id \"%s\": %s", repo, want);
    for (size_t i = 0; i < n; i++) {
        int edge = i == 0 || i == n - 1 || repo[i - 1] == '/' || repo[i + 1] == '/';
        if (edge && (repo[i] == '-' || repo[i] == '.'))
            return mill_errf(e, "repo id \"%s\": a part may not start or end with '-' or '.'; %s", repo, want);
    }
    return 0;
}

int hub_check_path(const char *path, mill_err *e) {
    if (!path || !path[0]) return mill_errf(e, "the listing has a file with an empty path");
    if (strlen(path) >= HUB_PATH_MAX - 256) return mill_errf(e, "file \"%.60s...\": path too long", path);
    if (path[0] == '/') return mill_errf(e, "file \"%s\": an absolute path; expected one inside the repository", path);
    for (const unsigned char *p = (const unsigned char *)path; *p; p++)
        if (*p < 0x20 || *p == 0x7f || *p == '\\')
            return mill_errf(e, "file \"%s\": a control character or '\\' in the path", path);
    for (const char *s = path;;) {
        const char *end = strchr(s, '/');
        size_t k = end ? (size_t)(end - s) : strlen(s);
        if (k == 0 || (k == 1 && s[0] == '.') || (k == 2 && s[0] == '.' && s[1] == '.'))
            return mill_errf(
                e, "file \"%s\": an empty, \".\" or \"..\" path component; expected a path inside the repository",
                path);
        if (!end) break;
        s = end + 1;
    }
    if (strncmp(path, ".cache/mill/", 12) == 0 || strcmp(path, ".cache/mill") == 0)
        return mill_errf(e, "file \"%s\": under .cache/mill/, where the download keeps its own state", path);
    return 0;
}

int hub_glob_match(const char *const *globs, int n, const char *path) {
    if (n <= 0) return 1;
    for (int i = 0; i < n; i++) {
        const char *g = globs[i];
        size_t k = strlen(g);
        if (k && g[k - 1] == '/') { /* "dir/" means everything under it, as hf appends a star */
            if (strncmp(path, g, k) == 0) return 1;
            char tmp[1024];
            if (k + 2 <= sizeof tmp) {
                memcpy(tmp, g, k);
                tmp[k] = '*', tmp[k + 1] = 0;
                if (fnmatch(tmp, path, 0) == 0) return 1;
            }
            continue;
        }
        if (fnmatch(g, path, 0) == 0) return 1;
    }
    return 0;
}

/* The whole of a small file, NUL-terminated and trimmed of trailing whitespace; NULL if unreadable. */
static char *slurp_small(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = malloc(4097);
    size_t n = buf ? fread(buf, 1, 4096, f) : 0;
    fclose(f);
    if (!buf) return NULL;
    buf[n] = 0;
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' || buf[n - 1] == '\t')) buf[--n] = 0;
    return buf;
}

int hub_token_from_env(char **tok, mill_err *e) {
    *tok = NULL;
    const char *v = getenv("HF_TOKEN"), *from = "HF_TOKEN";
    char path[HUB_PATH_MAX];
    if (v && v[0]) {
        *tok = strdup(v);
    } else {
        const char *tp = getenv("HF_TOKEN_PATH"), *home = getenv("HF_HOME"), *h = getenv("HOME");
        if (tp && tp[0]) snprintf(path, sizeof path, "%s", tp);
        else if (home && home[0]) snprintf(path, sizeof path, "%s/token", home);
        else if (h && h[0]) snprintf(path, sizeof path, "%s/.cache/huggingface/token", h);
        else return 0;
        if (access(path, F_OK) != 0) return 0;
        *tok = slurp_small(path);
        if (!*tok) return mill_errf(e, "%s: cannot read the hub token", path);
        from = path;
    }
    if (!*tok) return mill_errf(e, "out of memory");
    if (!(*tok)[0]) {
        free(*tok);
        *tok = NULL;
        return 0;
    }
    for (const unsigned char *p = (const unsigned char *)*tok; *p; p++)
        if (*p <= 0x20 || *p >= 0x7f) { /* it goes into a header line */
            free(*tok);
            *tok = NULL;
            return mill_errf(e, "%s: the hub token has a space or control character; expected one word like hf_...",
                             from);
        }
    return 0;
}

static int is_hex(const char *s, size_t n) {
    if (strlen(s) != n) return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
    return 1;
}

/* ---- URLs ---- */

/* Appends s to out, percent-encoding every byte but unreserved ones (and '/' when keep_slash),
 * as Python's quote() does. Returns 0, or -1 when out (cap bytes) is too small. */
static int url_put(char *out, size_t cap, const char *s, int keep_slash) {
    static const char hx[] = "0123456789ABCDEF";
    size_t n = strlen(out);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        int plain = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-' ||
                    *p == '_' || *p == '.' || *p == '~' || (keep_slash && *p == '/');
        if (n + 4 > cap) return -1;
        if (plain) {
            out[n++] = (char)*p;
        } else {
            out[n++] = '%';
            out[n++] = hx[*p >> 4];
            out[n++] = hx[*p & 15];
        }
    }
    out[n] = 0;
    return 0;
}

/* The endpoint without trailing '/', into out. */
static void endpoint_base(const char *ep, char *out, size_t cap) {
    snprintf(out, cap, "%s", ep ? ep : "https://huggingface.co");
    size_t n = strlen(out);
    while (n && out[n - 1] == '/') out[--n] = 0;
}

static int resolve_url(const hub_client *c, const char *commit, const char *path, char *out, size_t cap) {
    char base[1024];
    endpoint_base(c->endpoint, base, sizeof base);
    if (snprintf(out, cap, "%s/%s%s/resolve/%s/", base, c->type == HUB_DATASET ? "datasets/" : "", c->repo, commit) >=
        (int)cap)
        return -1;
    return url_put(out, cap, path, 1);
}

/* "scheme://host:port" of url, lowercased, with the scheme's default port filled in. */
static int url_origin(const char *url, char *out, size_t cap) {
    CURLU *u = curl_url();
    char *sch = NULL, *host = NULL, *port = NULL;
    int rc = -1;
    if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_SCHEME, &sch, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK) {
        snprintf(out, cap, "%s://%s:%s", sch, host, port);
        for (char *p = out; *p; p++) *p = (char)(*p >= 'A' && *p <= 'Z' ? *p - 'A' + 'a' : *p);
        rc = 0;
    }
    curl_free(sch);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    return rc;
}

/* ---- one request, its redirects followed ---- */

typedef struct {
    long status;
    int64_t content_length, range_start, range_total, linked_size; /* -1: not sent */
    char etag[96], linked_etag[96], error_code[64], error_msg[256];
    double retry_after; /* seconds, -1: not sent */
} hub_hdrs;

typedef struct hub_dl hub_dl;

typedef struct {
    hub_hdrs h; /* the current hop's */
    int64_t linked_size;
    char linked_etag[96];
    /* a body kept in memory (the listing), up to HUB_MAX_LISTING */
    int to_mem;
    char *mem;
    size_t n, cap;
    /* a body written to a file (a download) */
    hub_dl *dl;
    int started;    /* the 2xx body has begun (hub_dl_begin ran) */
    char snip[200]; /* the start of a non-2xx body, for messages */
    size_t snip_n;
    int failed; /* the write callback stopped the transfer: fail_msg says why */
    char fail_msg[600];
} hub_xfer;

struct hub_dl {
    const hub_client *c;
    const hub_file *f;
    hub_result *r;
    int fd;
    const char *inc; /* the partial file's path */
    int64_t have;    /* bytes in the partial file, all hashed */
    int64_t asked;   /* this request's Range start */
    int64_t got;     /* bytes received by this request */
    sha256_ctx s256;
    sha1_ctx s1;
};

typedef struct {
    const hub_client *c;
    CURL *h;
    struct curl_slist *hdr_auth, *hdr_plain;
    char origin[512];
    char errbuf[CURL_ERROR_SIZE];
    hub_xfer *x;
} hub_conn;

static void hdrs_reset(hub_hdrs *h) {
    memset(h, 0, sizeof *h);
    h->content_length = h->range_start = h->range_total = h->linked_size = -1;
    h->retry_after = -1;
}

/* A header's value without quotes or W/, into out. */
static void copy_tag(const char *v, size_t n, char *out, size_t cap) {
    if (n >= 2 && v[0] == 'W' && v[1] == '/') v += 2, n -= 2;
    while (n && (*v == '"' || *v == ' ')) v++, n--;
    while (n && (v[n - 1] == '"' || v[n - 1] == ' ')) n--;
    if (n >= cap) n = cap - 1;
    memcpy(out, v, n);
    out[n] = 0;
}

static int64_t parse_i64(const char *v, size_t n) {
    char tmp[32];
    if (n == 0 || n >= sizeof tmp) return -1;
    memcpy(tmp, v, n);
    tmp[n] = 0;
    char *end;
    errno = 0;
    long long x = strtoll(tmp, &end, 10);
    if (errno || end == tmp || *end || x < 0) return -1;
    return (int64_t)x;
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *ud) {
    hub_xfer *x = ud;
    size_t n = size * nmemb, len = n;
    while (len && (data[len - 1] == '\r' || data[len - 1] == '\n')) len--;
    if (len >= 5 && strncmp(data, "HTTP/", 5) == 0) { /* a new response (a 1xx, or the hop's own) */
        hdrs_reset(&x->h);
        const char *sp = memchr(data, ' ', len);
        if (sp) { /* digits inside the line only: strtol would skip its CRLF and read on (tests/fuzz) */
            const char *p = sp + 1, *end = data + len;
            long st = 0;
            while (p < end && (*p == ' ' || *p == '\t')) p++;
            for (; p < end && *p >= '0' && *p <= '9' && st < 100000; p++) st = st * 10 + (*p - '0');
            x->h.status = st;
        }
        return n;
    }
    const char *colon = memchr(data, ':', len);
    if (!colon) return n;
    size_t kn = (size_t)(colon - data);
    const char *v = colon + 1;
    size_t vn = len - kn - 1;
    while (vn && (*v == ' ' || *v == '\t')) v++, vn--;
    while (vn && (v[vn - 1] == ' ' || v[vn - 1] == '\t')) vn--;
#define IS(name) (kn == sizeof(name) - 1 && strncasecmp(data, name, kn) == 0)
    hub_hdrs *h = &x->h;
    if (IS("content-length")) h->content_length = parse_i64(v, vn);
    else if (IS("x-linked-size")) h->linked_size = parse_i64(v, vn);
    else if (IS("etag")) copy_tag(v, vn, h->etag, sizeof h->etag);
    else if (IS("x-linked-etag")) copy_tag(v, vn, h->linked_etag, sizeof h->linked_etag);
    else if (IS("x-error-code")) copy_tag(v, vn, h->error_code, sizeof h->error_code);
    else if (IS("x-error-message")) copy_tag(v, vn, h->error_msg, sizeof h->error_msg);
    else if (IS("retry-after")) {
        int64_t s = parse_i64(v, vn);
        h->retry_after = s >= 0 ? (double)s : -1;
    } else if (IS("content-range")) { /* bytes START-END/TOTAL */
        char tmp[128];
        size_t k = vn < sizeof tmp - 1 ? vn : sizeof tmp - 1;
        memcpy(tmp, v, k);
        tmp[k] = 0;
        long long a, b, t;
        if (sscanf(tmp, "bytes %lld-%lld/%lld", &a, &b, &t) == 3) h->range_start = a, h->range_total = t;
        else if (sscanf(tmp, "bytes %lld-%lld/*", &a, &b) == 2) h->range_start = a;
    }
#undef IS
    return n;
}

static void hub_dl_hash_reset(hub_dl *d) {
    sha256_init(&d->s256);
    sha1_init(&d->s1);
    char head[48];
    int k = snprintf(head, sizeof head, "blob %lld", (long long)d->f->size);
    sha1_update(&d->s1, head, (size_t)k + 1); /* git hashes "blob <size>\0" + content */
}

static int xfer_fail(hub_xfer *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int xfer_fail(hub_xfer *x, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->fail_msg, sizeof x->fail_msg, fmt, ap);
    va_end(ap);
    x->failed = 1;
    return -1;
}

/* The 2xx answer's headers, checked against what was asked, before its first byte is kept. */
static int hub_dl_begin(hub_xfer *x) {
    hub_dl *d = x->dl;
    const hub_hdrs *h = &x->h;
    int64_t want = d->f->size;
    x->started = 1;
    if (x->linked_size >= 0 && x->linked_size != want) /* the hub's hop said so before the CDN's bytes came */
        return xfer_fail(x, "the hub says %lld bytes (X-Linked-Size), the listing %lld", (long long)x->linked_size,
                         (long long)want);
    if (h->status == 206) {
        if (h->range_start != d->asked)
            return xfer_fail(x, "asked for bytes %lld- and got a 206 starting at %lld", (long long)d->asked,
                             (long long)h->range_start);
        if (h->range_total >= 0 && h->range_total != want)
            return xfer_fail(x, "the server's Content-Range says %lld bytes, the listing %lld",
                             (long long)h->range_total, (long long)want);
        if (h->content_length >= 0 && h->content_length != want - d->asked)
            return xfer_fail(x, "the server sends %lld bytes from %lld, the listing's size leaves %lld",
                             (long long)h->content_length, (long long)d->asked, (long long)(want - d->asked));
        return 0;
    }
    if (d->asked > 0) { /* a 200 to a Range request: the whole file comes again */
        if (ftruncate(d->fd, 0) != 0 || lseek(d->fd, 0, SEEK_SET) != 0)
            return xfer_fail(x, "%s: cannot truncate: %s", d->inc, strerror(errno));
        d->have = 0;
        hub_dl_hash_reset(d);
        d->r->range_ignored = 1;
    }
    if (h->content_length >= 0 && h->content_length != want)
        return xfer_fail(x, "the server says %lld bytes (Content-Length), the listing %lld",
                         (long long)h->content_length, (long long)want);
    return 0;
}

static int hub_dl_write(hub_xfer *x, const char *data, size_t n) {
    hub_dl *d = x->dl;
    if ((int64_t)n > d->f->size - d->have)
        return xfer_fail(x, "the server sent more than the %lld bytes the listing gives", (long long)d->f->size);
    for (size_t off = 0; off < n;) {
        ssize_t w = write(d->fd, data + off, n - off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0)
            return xfer_fail(x, "%s: cannot write: %s (the %lld bytes written so far stay for a resume)", d->inc,
                             strerror(w < 0 ? errno : EIO), (long long)d->have);
        off += (size_t)w;
    }
    if (d->f->sha256[0]) sha256_update(&d->s256, data, n);
    else sha1_update(&d->s1, data, n);
    d->have += (int64_t)n;
    d->got += (int64_t)n;
    d->r->fetched += (int64_t)n;
    if (d->c->progress) d->c->progress(d->c->progress_ud, d->f, d->have, d->f->size);
    return 0;
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *ud) {
    hub_xfer *x = ud;
    size_t n = size * nmemb;
    if (x->h.status < 200 || x->h.status >= 300) { /* a redirect's or an error's body: its start, for messages */
        for (size_t i = 0; i < n && x->snip_n + 1 < sizeof x->snip; i++) {
            unsigned char ch = (unsigned char)data[i];
            x->snip[x->snip_n++] = ch >= 0x20 && ch < 0x7f ? (char)ch : ' ';
        }
        x->snip[x->snip_n] = 0;
        return n;
    }
    if (x->to_mem) {
        if (n > HUB_MAX_LISTING - x->n) return xfer_fail(x, "the reply is over %d MiB", HUB_MAX_LISTING >> 20), 0;
        if (x->n + n + 1 > x->cap) {
            size_t cap = x->cap ? x->cap : 1 << 16;
            while (cap < x->n + n + 1) cap *= 2;
            char *p = realloc(x->mem, cap);
            if (!p) return xfer_fail(x, "out of memory"), 0;
            x->mem = p, x->cap = cap;
        }
        memcpy(x->mem + x->n, data, n);
        x->n += n;
        x->mem[x->n] = 0;
        return n;
    }
    if (!x->started && hub_dl_begin(x)) return 0;
    return hub_dl_write(x, data, n) ? 0 : n;
}

static int conn_open(hub_conn *k, const hub_client *c, hub_xfer *x, mill_err *e) {
    memset(k, 0, sizeof *k);
    k->c = c;
    k->x = x;
    char base[1024];
    endpoint_base(c->endpoint, base, sizeof base);
    if (url_origin(base, k->origin, sizeof k->origin))
        return mill_errf(e, "HF_ENDPOINT \"%s\" is not a URL; expected e.g. https://huggingface.co", base);
    k->h = curl_easy_init();
    k->hdr_plain = curl_slist_append(NULL, "Accept-Encoding: identity"); /* bytes as stored: sizes and hashes hold */
    if (!k->h || !k->hdr_plain) return mill_errf(e, "hub: curl_easy_init failed");
    k->hdr_auth = curl_slist_append(NULL, "Accept-Encoding: identity");
    if (c->token && c->token[0]) {
        size_t n = strlen(c->token) + 32;
        char *line = malloc(n);
        if (!line) return mill_errf(e, "out of memory");
        snprintf(line, n, "Authorization: Bearer %s", c->token);
        struct curl_slist *l = k->hdr_auth ? curl_slist_append(k->hdr_auth, line) : NULL;
        memset(line, 0, n);
        free(line);
        if (!l) return mill_errf(e, "out of memory");
        k->hdr_auth = l;
    }
    if (!k->hdr_auth) return mill_errf(e, "out of memory");
    double t = c->timeout_s > 0 ? c->timeout_s : 10.0;
    long tms = t * 1000 < 1 ? 1 : t * 1000 > 3600e3 ? 3600000 : (long)(t * 1000);
    curl_easy_setopt(k->h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(k->h, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(k->h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(k->h, CURLOPT_CONNECTTIMEOUT_MS, tms);
    /* a stall, not a slow link, is the failure: under 1 byte/s for the timeout */
    curl_easy_setopt(k->h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(k->h, CURLOPT_LOW_SPEED_TIME, (long)(t < 1 ? 1 : ceil(t)));
    curl_easy_setopt(k->h, CURLOPT_USERAGENT, "mill-download/1");
    curl_easy_setopt(k->h, CURLOPT_BUFFERSIZE, 512L * 1024);
    curl_easy_setopt(k->h, CURLOPT_ERRORBUFFER, k->errbuf);
    curl_easy_setopt(k->h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(k->h, CURLOPT_HEADERDATA, x);
    curl_easy_setopt(k->h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(k->h, CURLOPT_WRITEDATA, x);
    return 0;
}

static void conn_close(hub_conn *k) {
    curl_slist_free_all(k->hdr_auth);
    curl_slist_free_all(k->hdr_plain);
    if (k->h) curl_easy_cleanup(k->h);
    memset(k, 0, sizeof *k);
}


typedef enum { REQ_DONE, REQ_STATUS, REQ_RETRY, REQ_FAIL } req_rc;

/* GET url (from byte `from` when > 0), following redirects. REQ_DONE: a 2xx, its body taken;
 * REQ_STATUS: another final status, in x->h.status; REQ_RETRY: a transient failure, described in
 * why; REQ_FAIL: e says what. */
static req_rc hub_get(hub_conn *k, const char *url, int64_t from, char *why, size_t whycap, mill_err *e) {
    hub_xfer *x = k->x;
    char *cur = strdup(url);
    req_rc rc = REQ_FAIL;
    if (!cur) return mill_errf(e, "out of memory"), REQ_FAIL;
    x->linked_size = -1;
    x->linked_etag[0] = 0;
    char range[32];
    snprintf(range, sizeof range, "%lld-", (long long)from);
    for (int hop = 0;; hop++) {
        if (hop == HUB_MAX_HOPS) {
            mill_errf(e, "%s: more than %d redirects", url, HUB_MAX_HOPS);
            break;
        }
        char org[512];
        int same = url_origin(cur, org, sizeof org) == 0 && strcmp(org, k->origin) == 0;
        curl_easy_setopt(k->h, CURLOPT_URL, cur);
        curl_easy_setopt(k->h, CURLOPT_HTTPHEADER, same ? k->hdr_auth : k->hdr_plain); /* the token stays home */
        curl_easy_setopt(k->h, CURLOPT_RANGE, from > 0 ? range : NULL);
        hdrs_reset(&x->h);
        x->snip_n = 0;
        x->snip[0] = 0;
        x->failed = 0;
        k->errbuf[0] = 0;
        CURLcode cc = curl_easy_perform(k->h);
        if (x->h.linked_size >= 0) x->linked_size = x->h.linked_size;
        if (x->h.linked_etag[0]) snprintf(x->linked_etag, sizeof x->linked_etag, "%s", x->h.linked_etag);
        if (x->failed) { /* bytes that contradict the listing: another attempt would get the same */
            mill_errf(e, "%s: %s", url, x->fail_msg);
            break;
        }
        if (cc != CURLE_OK) {
            snprintf(why, whycap, "%s", k->errbuf[0] ? k->errbuf : curl_easy_strerror(cc));
            if (reward_remote_transient(cc)) rc = REQ_RETRY;
            else mill_errf(e, "%s: %s", url, why);
            break;
        }
        long st = 0;
        curl_easy_getinfo(k->h, CURLINFO_RESPONSE_CODE, &st);
        x->h.status = st;
        if (st >= 300 && st < 400 && st != 304) {
            char *loc = NULL;
            curl_easy_getinfo(k->h, CURLINFO_REDIRECT_URL, &loc);
            if (!loc || !loc[0]) {
                mill_errf(e, "%s: HTTP %ld without a Location to follow", url, st);
                break;
            }
            char *next = strdup(loc);
            if (!next) {
                mill_errf(e, "out of memory");
                break;
            }
            free(cur);
            cur = next;
            continue;
        }
        rc = st >= 200 && st < 300 ? REQ_DONE : REQ_STATUS;
        break;
    }
    free(cur);
    return rc;
}

/* A final non-2xx status as one line in e, or (429, 408, 5xx) as a reason to retry in why: 1. */
static int status_error(const hub_client *c, const hub_xfer *x, const char *url, const char *what, const char *revision,
                        char *why, size_t whycap, mill_err *e) {
    long st = x->h.status;
    const char *code = x->h.error_code, *msg = x->h.error_msg[0] ? x->h.error_msg : x->snip;
    char hub[300] = "";
    if (msg[0]) snprintf(hub, sizeof hub, " (hub: \"%.200s\")", msg);
    if (st == 429 || st == 408 || (st >= 500 && st < 600)) {
        snprintf(why, whycap, "HTTP %ld%s", st, hub);
        return 1;
    }
    if (st == 401) {
        if (c->token && c->token[0])
            mill_errf(e, "%s: 401: the hub refused the token (HF_TOKEN) for %s repo %s: invalid or expired?%s", url,
                      type_word(c->type), c->repo, hub);
        else mill_errf(e, "%s: 401: set HF_TOKEN for this gated/private repo %s%s", url, c->repo, hub);
    } else if (st == 403) {
        if (strcmp(code, "GatedRepo") == 0 || !c->token || !c->token[0])
            mill_errf(e, "%s: 403: no access to the gated repo %s with %s: ask for access on its page%s", url, c->repo,
                      c->token && c->token[0] ? "this HF_TOKEN" : "no HF_TOKEN set", hub);
        else mill_errf(e, "%s: 403: the hub refuses access to repo %s%s", url, c->repo, hub);
    } else if (st == 404) {
        if (strcmp(code, "RevisionNotFound") == 0)
            mill_errf(e, "%s: 404: no revision \"%s\" in repo %s%s", url, revision, c->repo, hub);
        else if (strcmp(code, "RepoNotFound") == 0 || !what)
            mill_errf(e, "%s: 404: no %s repo %s (private? set HF_TOKEN; %s)%s", url, type_word(c->type), c->repo,
                      c->type == HUB_MODEL ? "a dataset? --repo-type dataset" : "a model? --repo-type model", hub);
        else mill_errf(e, "%s: 404: no file %s at revision %s of repo %s%s", url, what, revision, c->repo, hub);
    } else {
        mill_errf(e, "%s: HTTP %ld%s", url, st, hub);
    }
    return 0;
}

static void nap(double s) {
    if (!(s > 0)) return;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* The wait before retry number `fails` (1, 2, ...): backoff doubling, at most 30 s, or what a
 * Retry-After asked (at most 60 s). */
static double backoff_wait(const hub_client *c, int fails, double retry_after) {
    double b = c->backoff_s > 0 ? c->backoff_s : 1.0;
    double w = ldexp(b, fails - 1 > 20 ? 20 : fails - 1);
    if (w > 30) w = 30;
    if (retry_after > w) w = retry_after > 60 ? 60 : retry_after;
    return w;
}

static int retries_of(const hub_client *c) { return c->retries >= 0 ? c->retries : 5; }

/* ---- the listing ---- */

void hub_listing_free(hub_listing *l) {
    for (int i = 0; l->files && i < l->n; i++) free(l->files[i].path);
    free(l->files);
    memset(l, 0, sizeof *l);
}

static int cmp_file(const void *a, const void *b) {
    return strcmp(((const hub_file *)a)->path, ((const hub_file *)b)->path);
}

static int parse_listing(const char *url, const char *body, size_t n, hub_listing *out, mill_err *e) {
    json_error_t je;
    json_t *root = json_loadb(body ? body : "", n, 0, &je);
    if (!root) return mill_errf(e, "%s: the listing is not JSON (%s); expected the hub's repo info", url, je.text);
    int rc = -1;
    json_t *sha = json_object_get(root, "sha"), *sib = json_object_get(root, "siblings");
    if (!json_is_string(sha) || !is_hex(json_string_value(sha), 40)) {
        mill_errf(e, "%s: \"sha\" is not a 40-digit commit id; expected the hub's repo info", url);
        goto done;
    }
    if (!json_is_array(sib)) {
        mill_errf(e, "%s: no \"siblings\" array; expected the hub's repo info", url);
        goto done;
    }
    snprintf(out->commit, sizeof out->commit, "%s", json_string_value(sha));
    size_t m = json_array_size(sib);
    out->files = calloc(m ? m : 1, sizeof *out->files);
    if (!out->files) {
        mill_errf(e, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < m; i++) {
        json_t *o = json_array_get(sib, i), *name = json_object_get(o, "rfilename"), *size = json_object_get(o, "size");
        json_t *blob = json_object_get(o, "blobId"), *lfs = json_object_get(o, "lfs");
        if (!json_is_string(name)) {
            mill_errf(e, "%s: siblings[%zu] has no \"rfilename\" string", url, i);
            goto done;
        }
        const char *p = json_string_value(name); /* checked by hub_download_file, if it is ever asked for */
        hub_file *f = &out->files[out->n];
        if (!(f->path = strdup(p))) {
            mill_errf(e, "out of memory");
            goto done;
        }
        out->n++;
        if (!json_is_integer(size) || json_integer_value(size) < 0) {
            mill_errf(e, "%s: siblings[%zu] (%s) has no \"size\"; expected a listing with file metadata (blobs=true)",
                      url, i, p);
            goto done;
        }
        f->size = (int64_t)json_integer_value(size);
        if (json_is_string(blob) && is_hex(json_string_value(blob), 40))
            snprintf(f->blob, sizeof f->blob, "%s", json_string_value(blob));
        if (lfs && !json_is_null(lfs)) {
            json_t *s256 = json_object_get(lfs, "sha256"), *ls = json_object_get(lfs, "size");
            if (!json_is_string(s256) || !is_hex(json_string_value(s256), 64)) {
                mill_errf(e, "%s: siblings[%zu] (%s): lfs.sha256 is not 64 hex digits", url, i, p);
                goto done;
            }
            snprintf(f->sha256, sizeof f->sha256, "%s", json_string_value(s256));
            if (json_is_integer(ls) && json_integer_value(ls) != f->size) {
                mill_errf(e, "%s: siblings[%zu] (%s): lfs.size %lld differs from size %lld", url, i, p,
                          (long long)json_integer_value(ls), (long long)f->size);
                goto done;
            }
            f->blob[0] = 0; /* the blob is the LFS pointer, not the content */
        }
    }
    qsort(out->files, (size_t)out->n, sizeof *out->files, cmp_file);
    for (int i = 1; i < out->n; i++)
        if (strcmp(out->files[i - 1].path, out->files[i].path) == 0) {
            mill_errf(e, "%s: file %s is listed twice", url, out->files[i].path);
            goto done;
        }
    rc = 0;
done:
    json_decref(root);
    if (rc) hub_listing_free(out);
    return rc;
}

int hub_list(const hub_client *c, const char *revision, hub_listing *out, mill_err *e) {
    memset(out, 0, sizeof *out);
    if (hub_check_repo_id(c->repo, e)) return -1;
    if (!revision || !revision[0]) return mill_errf(e, "empty revision; expected a branch, tag or commit id");
    char url[4096], base[1024];
    endpoint_base(c->endpoint, base, sizeof base);
    snprintf(url, sizeof url, "%s/api/%ss/%s/revision/", base, type_word(c->type), c->repo);
    if (url_put(url, sizeof url - 16, revision, 0)) return mill_errf(e, "revision \"%.60s...\" too long", revision);
    strcat(url, "?blobs=true");
    hub_xfer x = {0};
    x.to_mem = 1;
    hub_conn k;
    int rc = -1, fails = 0;
    char why[700] = "";
    if (conn_open(&k, c, &x, e)) goto done;
    for (int attempt = 1;; attempt++) {
        x.n = 0;
        req_rc r = hub_get(&k, url, 0, why, sizeof why, e);
        if (r == REQ_FAIL) goto done;
        if (r == REQ_DONE) {
            rc = parse_listing(url, x.mem, x.n, out, e);
            goto done;
        }
        if (r == REQ_STATUS && !status_error(c, &x, url, NULL, revision, why, sizeof why, e)) goto done;
        if (++fails > retries_of(c)) {
            mill_errf(e, "%s: gave up after %d attempts; last: %s", url, attempt, why);
            goto done;
        }
        nap(backoff_wait(c, fails, r == REQ_STATUS ? x.h.retry_after : -1));
    }
done:
    conn_close(&k);
    free(x.mem);
    return rc;
}

/* ---- files on disk ---- */

/* mkdir -p of the directory part of path (everything before the last '/'). */
static int mkdirs_for(const char *path, mill_err *e) {
    char tmp[HUB_PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    char *last = strrchr(tmp, '/');
    if (!last || last == tmp) return 0;
    *last = 0;
    for (char *p = tmp + 1;; p++) {
        char save = *p;
        if (save == '/' || save == 0) {
            *p = 0;
            if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
                return mill_errf(e, "%s: cannot create: %s", tmp, strerror(errno));
            struct stat st;
            if (stat(tmp, &st) != 0 || !S_ISDIR(st.st_mode))
                return mill_errf(e, "%s: exists and is not a directory", tmp);
            *p = save;
        }
        if (!save) break;
    }
    return 0;
}

static void fsync_dir_of(const char *path) {
    char tmp[HUB_PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    char *last = strrchr(tmp, '/');
    if (last) *last = 0;
    else snprintf(tmp, sizeof tmp, ".");
    int fd = open(tmp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd); /* the rename survives a crash */
        close(fd);
    }
}

typedef struct {
    char final[HUB_PATH_MAX], meta[HUB_PATH_MAX], inc[HUB_PATH_MAX];
    const char *oid; /* sha256, else blob id, else "" */
} hub_paths;

static int make_paths(const char *dir, const hub_file *f, hub_paths *p, mill_err *e) {
    p->oid = f->sha256[0] ? f->sha256 : f->blob;
    char tag[17];
    snprintf(tag, sizeof tag, "%.16s", p->oid[0] ? p->oid : "nohash");
    if (snprintf(p->final, sizeof p->final, "%s/%s", dir, f->path) >= (int)sizeof p->final ||
        snprintf(p->meta, sizeof p->meta, "%s/" HUB_STATE_DIR "/%s.meta", dir, f->path) >= (int)sizeof p->meta ||
        snprintf(p->inc, sizeof p->inc, "%s/" HUB_STATE_DIR "/%s.%s.incomplete", dir, f->path, tag) >=
            (int)sizeof p->inc)
        return mill_errf(e, "%s/%s: path too long", dir, f->path);
    return 0;
}

/* 1 when the record says the file at st is f's bytes (same oid, size and modification time). */
static int meta_says_ok(const hub_paths *p, const hub_file *f, const struct stat *st) {
    if (!p->oid[0]) return 0;
    char *s = slurp_small(p->meta);
    if (!s) return 0;
    char oid[80] = "";
    long long size = -1, sec = -1, nsec = -1;
    int ok = sscanf(s, "mill-download 1\noid %79s\nsize %lld\nmtime %lld.%lld", oid, &size, &sec, &nsec) == 4 &&
             strcmp(oid, p->oid) == 0 && size == f->size && size == (long long)st->st_size &&
             sec == (long long)st->st_mtim.tv_sec && nsec == (long long)st->st_mtim.tv_nsec;
    free(s);
    return ok;
}

static void meta_write(const hub_paths *p, const hub_file *f) {
    struct stat st;
    if (!p->oid[0] || stat(p->final, &st) != 0) return;
    char tmp[HUB_PATH_MAX + 8];
    snprintf(tmp, sizeof tmp, "%s.tmp", p->meta);
    FILE *o = fopen(tmp, "w");
    if (!o) return; /* only a shortcut for the next run: without it the file gets hashed */
    int bad = fprintf(o, "mill-download 1\noid %s\nsize %lld\nmtime %lld.%09ld\n", p->oid, (long long)f->size,
                      (long long)st.st_mtim.tv_sec, (long)st.st_mtim.tv_nsec) < 0;
    bad |= fclose(o) != 0;
    if (bad || rename(tmp, p->meta) != 0) unlink(tmp);
}

/* Hashes the first n bytes of fd into d's contexts. */
static int hash_prefix(hub_dl *d, int64_t n, mill_err *e) {
    enum { CHUNK = 1 << 20 };
    char *buf = n > 0 ? malloc(CHUNK) : NULL;
    if (n > 0 && !buf) return mill_errf(e, "out of memory");
    int rc = 0;
    for (int64_t off = 0; off < n;) {
        size_t k = n - off < CHUNK ? (size_t)(n - off) : CHUNK;
        ssize_t r = pread(d->fd, buf, k, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            rc = mill_errf(e, "%s: cannot read: %s", d->inc, r < 0 ? strerror(errno) : "the file shrank");
            break;
        }
        if (d->f->sha256[0]) sha256_update(&d->s256, buf, (size_t)r);
        else sha1_update(&d->s1, buf, (size_t)r);
        off += r;
    }
    free(buf);
    return rc;
}

/* The digest the listing gives for f (sha256 or the blob id) of d's bytes, as hex, into out[65]. */
static void digest_of(hub_dl *d, char out[65]) {
    uint8_t h[32];
    if (d->f->sha256[0]) {
        sha256_final(&d->s256, h);
        sha_hex(h, 32, out);
    } else {
        sha1_final(&d->s1, h);
        sha_hex(h, 20, out);
    }
}

/* 1 when the file at path has f's size and digest (or only its size, when the listing gives no digest). */
static int file_matches(const char *path, const hub_file *f, mill_err *e) {
    hub_dl d = {0};
    hub_result r = {0};
    d.f = f, d.r = &r, d.inc = path;
    d.fd = open(path, O_RDONLY | O_CLOEXEC);
    if (d.fd < 0) return mill_errf(e, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    int rc = fstat(d.fd, &st) == 0 && st.st_size == f->size ? 1 : 0;
    if (rc == 1 && (f->sha256[0] || f->blob[0])) {
        hub_dl_hash_reset(&d);
        if (hash_prefix(&d, f->size, e)) rc = -1;
        else {
            char got[65];
            digest_of(&d, got);
            rc = strcmp(got, f->sha256[0] ? f->sha256 : f->blob) == 0;
        }
    }
    close(d.fd);
    return rc;
}

int64_t hub_bytes_needed(const char *dir, const hub_file *f) {
    hub_paths p;
    mill_err e;
    struct stat st;
    if (make_paths(dir, f, &p, &e)) return f->size;
    if (stat(p.final, &st) == 0 && st.st_size == f->size) return 0;
    if (stat(p.inc, &st) == 0 && st.st_size <= f->size) return f->size - st.st_size;
    return f->size;
}

/* ---- one file ---- */

/* The bytes of f into d->fd (from d->have on), retried; 0 when d->have == f->size. */
static int fetch_bytes(hub_conn *k, hub_dl *d, const char *url, const char *commit, mill_err *e) {
    const hub_client *c = d->c;
    hub_xfer *x = k->x;
    int fails = 0;
    char why[700] = "";
    for (int attempt = 1; d->have < d->f->size; attempt++) {
        d->asked = d->have;
        d->got = 0;
        x->started = 0;
        d->r->attempts++;
        req_rc r = hub_get(k, url, d->asked, why, sizeof why, e);
        if (r == REQ_FAIL) return -1;
        if (r == REQ_DONE) {
            if (!x->started && hub_dl_begin(x)) return mill_errf(e, "%s: %s", url, x->fail_msg); /* an empty body */
            if (d->have == d->f->size) break;
            snprintf(why, sizeof why, "the body ended at byte %lld of %lld", (long long)d->have, (long long)d->f->size);
        } else if (r == REQ_STATUS) {
            if (x->h.status == 416 && d->asked > 0) { /* the partial file is no prefix the server knows: start over */
                if (ftruncate(d->fd, 0) != 0 || lseek(d->fd, 0, SEEK_SET) != 0)
                    return mill_errf(e, "%s: cannot truncate: %s", d->inc, strerror(errno));
                d->have = 0;
                hub_dl_hash_reset(d);
                continue;
            }
            if (!status_error(c, x, url, d->f->path, commit, why, sizeof why, e)) return -1;
        }
        /* a transient failure: progress resets the count, so a long download over a flaky link goes on */
        fails = d->got > 0 ? 1 : fails + 1;
        if (fails > retries_of(c) || attempt >= HUB_MAX_ATTEMPTS) {
            char kept[HUB_PATH_MAX + 100] = "";
            if (d->have > 0)
                snprintf(kept, sizeof kept, " (%lld of %lld bytes kept in %s for a resume)", (long long)d->have,
                         (long long)d->f->size, d->inc);
            return mill_errf(e, "%s: gave up after %d attempt%s%s; last: %s", url, attempt, attempt > 1 ? "s" : "",
                             kept, why);
        }
        nap(backoff_wait(c, fails, r == REQ_STATUS ? x->h.retry_after : -1));
    }
    return 0;
}

int hub_download_file(const hub_client *c, const char *commit, const hub_file *f, const char *dir, hub_result *r,
                      mill_err *e) {
    memset(r, 0, sizeof *r);
    if (hub_check_path(f->path, e)) return -1;
    if (hub_check_repo_id(c->repo, e)) return -1;
    if (!commit || !commit[0]) return mill_errf(e, "%s: no commit to download from", f->path);
    if (f->size < 0) return mill_errf(e, "%s: negative size %lld in the listing", f->path, (long long)f->size);
    if ((f->sha256[0] && !is_hex(f->sha256, 64)) || (f->blob[0] && !is_hex(f->blob, 40)))
        return mill_errf(e, "%s: the listing's sha256 / blob id is not lowercase hex", f->path);
    hub_paths p;
    if (make_paths(dir, f, &p, e)) return -1;

    struct stat st;
    if (stat(p.final, &st) == 0) {
        if (!S_ISREG(st.st_mode))
            return mill_errf(e, "%s: exists and is not a file; expected %s of repo %s", p.final, f->path, c->repo);
        if (st.st_size == f->size) {
            if (!c->verify && meta_says_ok(&p, f, &st)) {
                r->skipped = 1;
                return 0;
            }
            int m = file_matches(p.final, f, e);
            if (m < 0) return -1;
            if (m == 1) {
                if (mkdirs_for(p.meta, e) == 0) meta_write(&p, f);
                r->skipped = 1;
                return 0;
            }
        }
        /* known wrong: never left in place, even if the download below fails */
        if (unlink(p.final) != 0)
            return mill_errf(e, "%s: differs from the hub's and cannot be removed: %s", p.final, strerror(errno));
        unlink(p.meta);
        r->replaced = 1;
    }

    char url[HUB_PATH_MAX * 3 + 1200];
    if (resolve_url(c, commit, f->path, url, sizeof url)) return mill_errf(e, "%s: URL too long", f->path);
    if (mkdirs_for(p.inc, e)) return -1;
    hub_xfer x = {0};
    x.linked_size = -1; /* a file fetched with no request (complete partial, empty file) has no headers */
    hub_dl d = {0};
    hub_conn k;
    int rc = -1;
    d.c = c, d.f = f, d.r = r, d.inc = p.inc;
    d.fd = open(p.inc, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (d.fd < 0) return mill_errf(e, "%s: cannot open: %s", p.inc, strerror(errno));
    if (flock(d.fd, LOCK_EX | LOCK_NB) != 0) {
        close(d.fd);
        return mill_errf(e, "%s: another download is writing it (locked)", p.inc);
    }
    x.dl = &d;
    if (conn_open(&k, c, &x, e)) goto done;
    for (int pass = 0;; pass++) {
        if (fstat(d.fd, &st) != 0) {
            mill_errf(e, "%s: %s", p.inc, strerror(errno));
            goto done;
        }
        d.have = st.st_size;
        if (d.have > f->size) { /* longer than the file: not a prefix of it */
            if (ftruncate(d.fd, 0) != 0) {
                mill_errf(e, "%s: cannot truncate: %s", p.inc, strerror(errno));
                goto done;
            }
            d.have = 0;
        }
        if (lseek(d.fd, (off_t)d.have, SEEK_SET) < 0) {
            mill_errf(e, "%s: %s", p.inc, strerror(errno));
            goto done;
        }
        hub_dl_hash_reset(&d);
        if (hash_prefix(&d, d.have, e)) goto done;
        if (pass == 0) r->resumed_from = d.have;
        int64_t from = d.have;
        if (fetch_bytes(&k, &d, url, commit, e)) goto done;
        /* the hub's other names for the bytes, when it sent them, must agree with the listing */
        if (x.linked_size >= 0 && x.linked_size != f->size) {
            mill_errf(e, "%s: the hub says %lld bytes (X-Linked-Size), the listing %lld", url, (long long)x.linked_size,
                      (long long)f->size);
            goto done;
        }
        const char *want = f->sha256[0] ? f->sha256 : f->blob;
        char got[65];
        digest_of(&d, got);
        const char *kind = f->sha256[0] ? "sha256" : "git blob sha1";
        if (want[0] && strcmp(got, want) != 0) {
            if (ftruncate(d.fd, 0) != 0 || lseek(d.fd, 0, SEEK_SET) != 0) {
                mill_errf(e, "%s: cannot truncate: %s", p.inc, strerror(errno));
                goto done;
            }
            if (from > 0 && pass == 0) { /* the kept prefix may be what was wrong: once more from byte 0 */
                r->restarted = 1;
                continue;
            }
            unlink(p.inc);
            mill_errf(e, "%s: the downloaded bytes' %s is %s, the listing's %s; deleted, nothing kept", url, kind, got,
                      want);
            goto done;
        }
        const char *tag = f->sha256[0] ? x.linked_etag : x.h.etag;
        if (want[0] && is_hex(tag, strlen(want)) && strcmp(tag, want) != 0) {
            mill_errf(e, "%s: the hub's ETag %s disagrees with the listing's %s %s", url, tag, kind, want);
            goto done;
        }
        break;
    }
    if (fsync(d.fd) != 0) {
        mill_errf(e, "%s: fsync: %s", p.inc, strerror(errno));
        goto done;
    }
    if (mkdirs_for(p.final, e)) goto done;
    if (rename(p.inc, p.final) != 0) {
        mill_errf(e, "%s -> %s: cannot rename: %s", p.inc, p.final, strerror(errno));
        goto done;
    }
    fsync_dir_of(p.final);
    meta_write(&p, f);
    rc = 0;
done:
    conn_close(&k);
    struct stat now;
    if (rc && fstat(d.fd, &st) == 0 && st.st_size == 0 && stat(p.inc, &now) == 0 && now.st_ino == st.st_ino &&
        now.st_dev == st.st_dev)
        unlink(p.inc); /* nothing worth keeping for a resume (and still ours) */
    close(d.fd);       /* after the rename: the lock holds until the file has its name */
    return rc;
}
