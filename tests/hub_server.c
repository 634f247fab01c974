/* tests/hub_server.c — the stand-in hub. See hub_server.h. One thread accepts on both ports and
 * answers one request per connection (Connection: close), so that a fault's effect on a client
 * is one request, counted. */
#include "hub_server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fnmatch.h>
#include <jansson.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/sha256.h"

typedef struct {
    char *path;
    unsigned char *data;
    size_t size;
    char sha256[65], blob[41], ptr_blob[41]; /* ptr_blob: the LFS pointer file's blob id */
    size_t ptr_size;
    int lfs;
    hs_fault_kind fault;
    int fault_left; /* < 0: forever */
    long long last_range;
} hs_file;

struct hub_server {
    hs_file *files;
    int n;
    char repo[256], token[256], commit[41];
    int dataset, has_token;
    int fd[2], port[2]; /* 0: the hub, 1: the CDN */
    atomic_int stop;
    pthread_t th;
    pthread_mutex_t mu; /* stats, faults, last_range, log */
    hs_stats st;
    FILE *log;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- the repository ---- */

static int add_files(hub_server *s, const char *root, const char *rel, const hs_config *c, char *err, size_t cap) {
    char dpath[4096];
    snprintf(dpath, sizeof dpath, "%s%s%s", root, rel[0] ? "/" : "", rel);
    DIR *d = opendir(dpath);
    if (!d) return snprintf(err, cap, "%s: cannot open: %s", dpath, strerror(errno)), -1;
    struct dirent *de;
    int rc = 0;
    while (rc == 0 && (de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        char r[4096], full[8192];
        snprintf(r, sizeof r, "%s%s%s", rel, rel[0] ? "/" : "", de->d_name);
        snprintf(full, sizeof full, "%s/%s", root, r);
        struct stat st;
        if (stat(full, &st) != 0) continue;
        if (S_ISDIR(st.st_mode)) {
            rc = add_files(s, root, r, c, err, cap);
            continue;
        }
        if (!S_ISREG(st.st_mode)) continue;
        hs_file *nf = realloc(s->files, sizeof *nf * (size_t)(s->n + 1));
        if (!nf) return closedir(d), snprintf(err, cap, "out of memory"), -1;
        s->files = nf;
        hs_file *f = &s->files[s->n++];
        memset(f, 0, sizeof *f);
        f->path = strdup(r);
        f->size = (size_t)st.st_size;
        f->data = malloc(f->size ? f->size : 1);
        f->last_range = -1;
        FILE *in = fopen(full, "rb");
        if (!f->path || !f->data || !in || fread(f->data, 1, f->size, in) != f->size) {
            if (in) fclose(in);
            closedir(d);
            return snprintf(err, cap, "%s: cannot read", full), -1;
        }
        fclose(in);
        uint8_t h[32];
        sha256_ctx a;
        sha256_init(&a);
        sha256_update(&a, f->data, f->size);
        sha256_final(&a, h);
        sha_hex(h, 32, f->sha256);
        char head[64];
        int hl = snprintf(head, sizeof head, "blob %zu", f->size);
        sha1_ctx b;
        sha1_init(&b);
        sha1_update(&b, head, (size_t)hl + 1);
        sha1_update(&b, f->data, f->size);
        sha1_final(&b, h);
        sha_hex(h, 20, f->blob);
        for (int i = 0; i < c->n_lfs; i++) f->lfs |= fnmatch(c->lfs[i], f->path, 0) == 0;
        /* what git stores for an LFS file: a pointer, whose blob id the listing gives */
        char ptr[256];
        int pl = snprintf(ptr, sizeof ptr, "version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %zu\n",
                          f->sha256, f->size);
        f->ptr_size = (size_t)pl;
        hl = snprintf(head, sizeof head, "blob %d", pl);
        sha1_init(&b);
        sha1_update(&b, head, (size_t)hl + 1);
        sha1_update(&b, ptr, (size_t)pl);
        sha1_final(&b, h);
        sha_hex(h, 20, f->ptr_blob);
    }
    closedir(d);
    return rc;
}

static int cmp_hs_file(const void *a, const void *b) {
    return strcmp(((const hs_file *)a)->path, ((const hs_file *)b)->path);
}

static hs_file *find_path(hub_server *s, const char *p) {
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->files[i].path, p) == 0) return &s->files[i];
    return NULL;
}

static hs_file *find_sha(hub_server *s, const char *sha) {
    for (int i = 0; i < s->n; i++)
        if (s->files[i].lfs && strcmp(s->files[i].sha256, sha) == 0) return &s->files[i];
    return NULL;
}

/* ---- HTTP ---- */

typedef struct {
    char method[16], target[4096], auth[512], range[128];
    int has_auth, has_range;
} hs_req;

static void send_all(int c, const void *p, size_t n) {
    const char *b = p;
    while (n) {
        ssize_t k = send(c, b, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return;
        b += k, n -= (size_t)k;
    }
}

/* Reads the request head (no body: GET only). 0, or -1 when the peer left or took over 5 s. */
static int read_request(hub_server *s, int c, hs_req *r) {
    char buf[16384];
    size_t n = 0;
    double t0 = now_s();
    memset(r, 0, sizeof *r);
    while (!atomic_load(&s->stop) && now_s() - t0 < 5.0) {
        struct pollfd p = {c, POLLIN, 0};
        if (poll(&p, 1, 50) <= 0) continue;
        ssize_t k = recv(c, buf + n, sizeof buf - 1 - n, 0);
        if (k <= 0) return -1;
        n += (size_t)k;
        buf[n] = 0;
        char *end = strstr(buf, "\r\n\r\n");
        if (!end) {
            if (n == sizeof buf - 1) return -1;
            continue;
        }
        *end = 0;
        if (sscanf(buf, "%15s %4095s", r->method, r->target) != 2) return -1;
        for (char *line = strstr(buf, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
            char *h = line + 2, *colon = strchr(h, ':'), *eol = strstr(h, "\r\n");
            if (!colon || (eol && colon > eol)) continue;
            size_t kn = (size_t)(colon - h), vn = eol ? (size_t)(eol - colon - 1) : strlen(colon + 1);
            const char *v = colon + 1;
            while (vn && *v == ' ') v++, vn--;
            if (kn == 13 && strncasecmp(h, "authorization", 13) == 0) {
                r->has_auth = 1;
                snprintf(r->auth, sizeof r->auth, "%.*s", (int)vn, v);
            } else if (kn == 5 && strncasecmp(h, "range", 5) == 0) {
                r->has_range = 1;
                snprintf(r->range, sizeof r->range, "%.*s", (int)vn, v);
            }
        }
        return 0;
    }
    return -1;
}

static const char *reason(int st) {
    switch (st) {
    case 200: return "OK";
    case 206: return "Partial Content";
    case 302: return "Found";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 416: return "Range Not Satisfiable";
    case 429: return "Too Many Requests";
    default: return "Internal Server Error";
    }
}

/* A status line, the extra header lines (each ending in \r\n), Content-Length and the body. */
static void reply(int c, int st, const char *extra, const void *body, size_t n) {
    char head[4096];
    int hl = snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\n%sContent-Length: %zu\r\nConnection: close\r\n\r\n", st,
                      reason(st), extra ? extra : "", n);
    send_all(c, head, (size_t)hl);
    if (n) send_all(c, body, n);
}

static void reply_error(int c, int st, const char *code, const char *msg) {
    char extra[600], body[600];
    snprintf(extra, sizeof extra, "Content-Type: application/json\r\nX-Error-Code: %s\r\nX-Error-Message: %s\r\n", code,
             msg);
    snprintf(body, sizeof body, "{\"error\":\"%s\"}", msg);
    reply(c, st, extra, body, strlen(body));
}

/* %XX decoded in place. */
static void pct_decode(char *s) {
    char *w = s;
    for (char *r = s; *r; r++) {
        int hi, lo;
        if (r[0] == '%' && r[1] && r[2] && sscanf(r + 1, "%1x%1x", &hi, &lo) == 2) {
            *w++ = (char)(hi * 16 + lo);
            r += 2;
        } else {
            *w++ = *r;
        }
    }
    *w = 0;
}

static char *listing_json(hub_server *s, int blobs) {
    json_t *sib = json_array();
    for (int i = 0; i < s->n; i++) {
        hs_file *f = &s->files[i];
        json_t *o = json_pack("{s:s}", "rfilename", f->path);
        if (blobs) {
            json_object_set_new(o, "size", json_integer((json_int_t)f->size));
            json_object_set_new(o, "blobId", json_string(f->lfs ? f->ptr_blob : f->blob));
            if (f->lfs)
                json_object_set_new(o, "lfs",
                                    json_pack("{s:s, s:I, s:I}", "sha256", f->sha256, "size", (json_int_t)f->size,
                                              "pointerSize", (json_int_t)f->ptr_size));
        }
        json_array_append_new(sib, o);
    }
    json_t *root = json_pack("{s:s, s:s, s:s, s:b, s:o}", "id", s->repo, "modelId", s->repo, "sha", s->commit,
                             "private", s->has_token, "siblings", sib);
    char *t = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return t;
}

/* The fault for f's next request (decremented), under the lock. */
static hs_fault_kind take_fault(hub_server *s, hs_file *f, long long range) {
    pthread_mutex_lock(&s->mu);
    hs_fault_kind k = HS_NONE;
    if (f->fault != HS_NONE && f->fault_left != 0) {
        k = f->fault;
        if (f->fault_left > 0) f->fault_left--;
    }
    f->last_range = range;
    pthread_mutex_unlock(&s->mu);
    return k;
}

/* f's bytes, from the Range asked (bytes=N- or bytes=N-M), with the fault due. */
static void serve_bytes(hub_server *s, int c, hs_file *f, const hs_req *r, const char *extra_in) {
    long long a = 0, b = (long long)f->size - 1;
    int ranged = 0;
    if (r->has_range) {
        long long x, y;
        int k = sscanf(r->range, "bytes=%lld-%lld", &x, &y);
        if (k >= 1 && x >= 0) {
            ranged = 1;
            a = x;
            if (k == 2 && y < b) b = y;
        }
    }
    hs_fault_kind fault = take_fault(s, f, ranged ? a : -1);
    if (fault == HS_NORANGE || fault == HS_LONG) ranged = 0, a = 0, b = (long long)f->size - 1;
    char extra[2048];
    snprintf(extra, sizeof extra, "%sAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n", extra_in);
    switch (fault) {
    case HS_500:
        reply_error(c, 500, "InternalError", "Internal Error - We're working hard to fix this as soon as possible!");
        return;
    case HS_429: {
        char ex[256];
        snprintf(ex, sizeof ex, "Retry-After: 0\r\n");
        reply(c, 429, ex, "slow down", 9);
        return;
    }
    case HS_404: reply_error(c, 404, "EntryNotFound", "Entry not found"); return;
    default: break;
    }
    if (ranged && a >= (long long)f->size) {
        char ex[256];
        snprintf(ex, sizeof ex, "Content-Range: bytes */%zu\r\n", f->size);
        reply(c, 416, ex, "", 0);
        return;
    }
    size_t n = (size_t)(b - a + 1);
    if (f->size == 0) n = 0;
    unsigned char *body = malloc(n + 16 + 1);
    if (!body) return;
    if (n) memcpy(body, f->data + a, n);
    if (fault == HS_CORRUPT && n) body[n - 1] ^= 0x5a;
    if (fault == HS_LONG) memset(body + n, 'x', 16), n += 16;
    int st = ranged ? 206 : 200;
    if (ranged) {
        size_t k = strlen(extra);
        snprintf(extra + k, sizeof extra - k, "Content-Range: bytes %lld-%lld/%zu\r\n", a, b, f->size);
    }
    char head[4096];
    int hl = snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\n%sContent-Length: %zu\r\nConnection: close\r\n\r\n", st,
                      reason(st), extra, n);
    send_all(c, head, (size_t)hl);
    if (fault == HS_TRUNCATE) {
        send_all(c, body, n / 2);
    } else if (fault ==
               HS_STALL) { /* no byte of the body: hold the connection until the client gives up (or we stop) */
        for (char sink[256];;) {
            struct pollfd p = {c, POLLIN, 0};
            if (atomic_load(&s->stop)) break;
            if (poll(&p, 1, 50) > 0 && recv(c, sink, sizeof sink, 0) <= 0) break;
        }
    } else {
        send_all(c, body, n);
    }
    free(body);
}

/* 1 when the request may go on; otherwise a 401 has been sent. */
static int check_auth(hub_server *s, int c, const hs_req *r) {
    if (!s->has_token) return 1;
    char want[300];
    snprintf(want, sizeof want, "Bearer %s", s->token);
    if (!r->has_auth) {
        char msg[400];
        snprintf(msg, sizeof msg,
                 "Access to model %s is restricted. You must have access to it and be authenticated to access it. "
                 "Please log in.",
                 s->repo);
        reply_error(c, 401, "GatedRepo", msg);
        return 0;
    }
    if (strcmp(r->auth, want) != 0) {
        reply_error(c, 401, "Unauthorized", "Invalid credentials in Authorization header");
        return 0;
    }
    return 1;
}

static int rev_ok(hub_server *s, const char *rev) { return strcmp(rev, "main") == 0 || strcmp(rev, s->commit) == 0; }

static int handle_hub(hub_server *s, int c, hs_req *r) {
    char path[4096];
    snprintf(path, sizeof path, "%s", r->target);
    char *q = strchr(path, '?');
    const char *query = "";
    if (q) *q = 0, query = q + 1;
    const char *kind = s->dataset ? "datasets" : "models";
    char pre[512];
    snprintf(pre, sizeof pre, "/api/%s/%s/revision/", kind, s->repo);
    if (strncmp(path, "/api/", 5) == 0) {
        pthread_mutex_lock(&s->mu);
        s->st.api++;
        pthread_mutex_unlock(&s->mu);
        if (!check_auth(s, c, r)) return 401;
        if (strncmp(path, pre, strlen(pre)) != 0)
            return reply_error(c, 404, "RepoNotFound", "Repository not found"), 404;
        char *rev = path + strlen(pre);
        pct_decode(rev);
        if (!rev_ok(s, rev)) return reply_error(c, 404, "RevisionNotFound", "Invalid rev id"), 404;
        char *t = listing_json(s, strstr(query, "blobs=true") != NULL);
        reply(c, 200, "Content-Type: application/json\r\n", t, strlen(t));
        free(t);
        return 200;
    }
    pthread_mutex_lock(&s->mu);
    s->st.resolve++;
    pthread_mutex_unlock(&s->mu);
    if (!check_auth(s, c, r)) return 401;
    snprintf(pre, sizeof pre, "%s/%s/resolve/", s->dataset ? "/datasets" : "", s->repo);
    if (strncmp(path, pre, strlen(pre)) != 0) return reply_error(c, 404, "RepoNotFound", "Repository not found"), 404;
    char *rev = path + strlen(pre), *slash = strchr(rev, '/');
    if (!slash) return reply_error(c, 404, "EntryNotFound", "Entry not found"), 404;
    *slash = 0;
    char *file = slash + 1;
    pct_decode(rev);
    pct_decode(file);
    if (!rev_ok(s, rev)) return reply_error(c, 404, "RevisionNotFound", "Invalid rev id"), 404;
    hs_file *f = find_path(s, file);
    if (!f) return reply_error(c, 404, "EntryNotFound", "Entry not found"), 404;
    char extra[1024];
    if (f->lfs) {
        snprintf(extra, sizeof extra,
                 "Location: http://127.0.0.1:%d/cdn/%s?X-Amz-Signature=abc\r\nX-Linked-Size: %zu\r\nX-Linked-Etag: "
                 "\"%s\"\r\n"
                 "ETag: \"%s\"\r\nX-Repo-Commit: %s\r\n",
                 s->port[1], f->sha256, f->size, f->sha256, f->sha256, s->commit);
        reply(c, 302, extra, "Found. Redirecting", 18);
        return 302;
    }
    snprintf(extra, sizeof extra, "ETag: \"%s\"\r\nX-Repo-Commit: %s\r\n", f->blob, s->commit);
    serve_bytes(s, c, f, r, extra);
    return 200;
}

static int handle_cdn(hub_server *s, int c, hs_req *r) {
    pthread_mutex_lock(&s->mu);
    s->st.cdn++;
    pthread_mutex_unlock(&s->mu);
    char path[4096];
    snprintf(path, sizeof path, "%s", r->target);
    char *q = strchr(path, '?');
    if (q) *q = 0;
    hs_file *f = strncmp(path, "/cdn/", 5) == 0 ? find_sha(s, path + 5) : NULL;
    if (!f) return reply(c, 404, NULL, "NoSuchKey", 9), 404;
    serve_bytes(s, c, f, r, "ETag: \"0123456789abcdef0123456789abcdef\"\r\n"); /* S3 gives an md5, not the oid */
    return 200;
}

static void *serve_main(void *arg) {
    hub_server *s = arg;
    while (!atomic_load(&s->stop)) {
        struct pollfd p[2] = {{s->fd[0], POLLIN, 0}, {s->fd[1], POLLIN, 0}};
        if (poll(p, 2, 50) <= 0) continue;
        for (int k = 0; k < 2; k++) {
            if (!(p[k].revents & POLLIN)) continue;
            int c = accept(s->fd[k], NULL, NULL);
            if (c < 0) continue;
            hs_req r;
            if (read_request(s, c, &r) == 0) {
                pthread_mutex_lock(&s->mu);
                s->st.requests++;
                if (r.has_auth) k ? s->st.cdn_auth++ : s->st.hub_auth++;
                if (r.has_range) s->st.ranged++;
                pthread_mutex_unlock(&s->mu);
                int st = k ? handle_cdn(s, c, &r) : handle_hub(s, c, &r);
                pthread_mutex_lock(&s->mu);
                if (s->log) {
                    fprintf(s->log, "%s %s %s auth=%d range=%s -> %d\n", k ? "cdn" : "hub", r.method, r.target,
                            r.has_auth, r.has_range ? r.range : "-", st);
                    fflush(s->log);
                }
                pthread_mutex_unlock(&s->mu);
            }
            close(c);
        }
    }
    return NULL;
}

static int listen_loopback(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len) || listen(fd, 64)) {
        close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

static void free_files(hub_server *s) {
    for (int i = 0; i < s->n; i++) free(s->files[i].path), free(s->files[i].data);
    free(s->files);
}

hub_server *hs_start(const hs_config *c, char *err, size_t cap) {
    hub_server *s = calloc(1, sizeof *s);
    if (!s) return snprintf(err, cap, "out of memory"), NULL;
    s->fd[0] = s->fd[1] = -1;
    snprintf(s->repo, sizeof s->repo, "%s", c->repo);
    if (c->token) snprintf(s->token, sizeof s->token, "%s", c->token), s->has_token = 1;
    s->dataset = c->dataset;
    if (add_files(s, c->dir, "", c, err, cap)) {
        free_files(s);
        free(s);
        return NULL;
    }
    qsort(s->files, (size_t)s->n, sizeof *s->files, cmp_hs_file);
    /* a commit id that follows the content, as a real one does */
    sha1_ctx h;
    sha1_init(&h);
    for (int i = 0; i < s->n; i++)
        sha1_update(&h, s->files[i].path, strlen(s->files[i].path) + 1), sha1_update(&h, s->files[i].blob, 40);
    uint8_t d[20];
    sha1_final(&h, d);
    sha_hex(d, 20, s->commit);
    pthread_mutex_init(&s->mu, NULL);
    for (int k = 0; k < 2; k++)
        if ((s->fd[k] = listen_loopback(&s->port[k])) < 0) {
            snprintf(err, cap, "cannot listen on 127.0.0.1: %s", strerror(errno));
            hs_stop(s);
            return NULL;
        }
    if (pthread_create(&s->th, NULL, serve_main, s) != 0) {
        snprintf(err, cap, "pthread_create failed");
        hs_stop(s);
        return NULL;
    }
    return s;
}

void hs_stop(hub_server *s) {
    if (!s) return;
    if (s->th) {
        atomic_store(&s->stop, 1);
        pthread_join(s->th, NULL);
    }
    for (int k = 0; k < 2; k++)
        if (s->fd[k] >= 0) close(s->fd[k]);
    pthread_mutex_destroy(&s->mu);
    free_files(s);
    free(s);
}

int hs_port(const hub_server *s) { return s->port[0]; }
int hs_cdn_port(const hub_server *s) { return s->port[1]; }
const char *hs_commit(const hub_server *s) { return s->commit; }

int hs_fault(hub_server *s, const char *path, hs_fault_kind f, int times) {
    hs_file *x = find_path(s, path);
    if (!x) return -1;
    pthread_mutex_lock(&s->mu);
    x->fault = f;
    x->fault_left = times;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

void hs_get_stats(hub_server *s, hs_stats *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->st;
    pthread_mutex_unlock(&s->mu);
}

void hs_reset_stats(hub_server *s) {
    pthread_mutex_lock(&s->mu);
    memset(&s->st, 0, sizeof s->st);
    pthread_mutex_unlock(&s->mu);
}

long long hs_last_range(hub_server *s, const char *path) {
    hs_file *x = find_path(s, path);
    if (!x) return -2;
    pthread_mutex_lock(&s->mu);
    long long v = x->last_range;
    pthread_mutex_unlock(&s->mu);
    return v;
}

void hs_set_log(hub_server *s, FILE *f) {
    pthread_mutex_lock(&s->mu);
    s->log = f;
    pthread_mutex_unlock(&s->mu);
}

#ifdef HUB_SERVER_MAIN
/* hub_server --dir DIR --repo ID --port-file F [--log F] [--dataset] [--token T] [--lfs GLOB]...
 *            [--fault PATH=MODE[:TIMES]]...   (MODE: 500 429 truncate corrupt norange stall long 404)
 * Serves until SIGTERM or SIGINT; the hub's port goes to the port file (written whole, by rename). */
static volatile sig_atomic_t quit;
static void on_signal(int sig) { (void)sig, quit = 1; }

static int die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "hub_server: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 2;
}

int main(int argc, char **argv) {
    hs_config c = {0};
    const char *lfs[16], *port_file = NULL, *log_file = NULL, *faults[16];
    int nf = 0;
    c.lfs = lfs;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--dataset")) {
            c.dataset = 1;
            continue;
        }
        if (!v) return die("%s needs a value", a);
        i++;
        if (!strcmp(a, "--dir")) c.dir = v;
        else if (!strcmp(a, "--repo")) c.repo = v;
        else if (!strcmp(a, "--token")) c.token = v;
        else if (!strcmp(a, "--port-file")) port_file = v;
        else if (!strcmp(a, "--log")) log_file = v;
        else if (!strcmp(a, "--lfs") && c.n_lfs < 16) lfs[c.n_lfs++] = v;
        else if (!strcmp(a, "--fault") && nf < 16) faults[nf++] = v;
        else return die("unknown option %s", a);
    }
    if (!c.dir || !c.repo || !port_file) return die("needs --dir DIR --repo ID --port-file F");
    char err[512];
    hub_server *s = hs_start(&c, err, sizeof err);
    if (!s) return die("%s", err);
    FILE *log = log_file ? fopen(log_file, "a") : NULL;
    if (log_file && !log) return die("%s: cannot open", log_file);
    hs_set_log(s, log);
    static const char *names[] = {"", "500", "429", "truncate", "corrupt", "norange", "stall", "long", "404"};
    for (int i = 0; i < nf; i++) {
        char path[1024], mode[32];
        int times = -1;
        const char *eq = strrchr(faults[i], '=');
        if (!eq) return die("--fault %s: expected PATH=MODE[:TIMES]", faults[i]);
        snprintf(path, sizeof path, "%.*s", (int)(eq - faults[i]), faults[i]);
        snprintf(mode, sizeof mode, "%s", eq + 1);
        char *colon = strchr(mode, ':');
        if (colon) *colon = 0, times = atoi(colon + 1);
        int m = 0;
        for (int k = 1; k < 9; k++)
            if (!strcmp(mode, names[k])) m = k;
        if (!m || hs_fault(s, path, (hs_fault_kind)m, times)) return die("--fault %s: no such mode or file", faults[i]);
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", port_file);
    FILE *pf = fopen(tmp, "w");
    if (!pf || fprintf(pf, "%d\n", hs_port(s)) < 0 || fclose(pf) != 0 || rename(tmp, port_file) != 0)
        return die("%s: cannot write", port_file);
    while (!quit) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    hs_stop(s);
    if (log) fclose(log);
    return 0;
}
#endif
