/* tests/hub_server.h — a stand-in for the Hugging Face hub, for tests that must not touch the
 * network: a small HTTP/1.1 server (one pthread, 127.0.0.1, ephemeral ports) that serves one
 * repository from a directory in the hub's URL layout (launch/hub.h): the repo info listing
 * computed from the files (sizes, git blob ids, sha256 of the files marked LFS), /resolve/ for
 * small files with Range support, and for LFS files a 302 to a second port (another "host": the
 * CDN), where the Authorization header must not arrive. Faults can be injected per file.
 * Built into test_hub, and as the `hub_server` program (HUB_SERVER_MAIN) for tests/download_cli.sh. */
#ifndef MILL_TEST_HUB_SERVER_H
#define MILL_TEST_HUB_SERVER_H

#include <stddef.h>
#include <stdio.h>

typedef enum {
    HS_NONE = 0,
    HS_500,      /* HTTP 500 */
    HS_429,      /* HTTP 429 with Retry-After: 0 */
    HS_TRUNCATE, /* the whole Content-Length announced, half the body sent, connection closed */
    HS_CORRUPT,  /* the body's last byte flipped: the hash cannot match */
    HS_NORANGE,  /* Range ignored: 200 with the whole file */
    HS_STALL,    /* the headers, then silence until the client gives up */
    HS_LONG,     /* 16 bytes more than the file, announced in Content-Length */
    HS_404,      /* 404 EntryNotFound, as if the file were not there */
} hs_fault_kind;

typedef struct {
    const char *dir;        /* the repository's files */
    const char *repo;       /* its id, e.g. acme/tiny */
    int dataset;            /* 1: served under /api/datasets/ and /datasets/ */
    const char *token;      /* non-NULL: every hub request needs "Authorization: Bearer <token>" */
    const char *const *lfs; /* globs (fnmatch) of the files served as LFS objects through the CDN */
    int n_lfs;
} hs_config;

typedef struct {
    int requests, api, resolve, cdn; /* requests in all, and by route */
    int hub_auth, cdn_auth;          /* requests that carried an Authorization header, by port */
    int ranged;                      /* requests with a Range header */
} hs_stats;

typedef struct hub_server hub_server;

/* NULL on failure, with the reason in err. */
hub_server *hs_start(const hs_config *c, char *err, size_t errcap);
void hs_stop(hub_server *s);
int hs_port(const hub_server *s);
int hs_cdn_port(const hub_server *s);
const char *hs_commit(const hub_server *s);
/* The next `times` requests for the bytes of path (times < 0: all of them) get fault f. 0, or -1
 * when the server has no such file. */
int hs_fault(hub_server *s, const char *path, hs_fault_kind f, int times);
void hs_get_stats(hub_server *s, hs_stats *out);
void hs_reset_stats(hub_server *s);
/* The Range start of the last request for path's bytes: -1 when it had no Range. */
long long hs_last_range(hub_server *s, const char *path);
/* One line per request to f (flushed), or none when f is NULL. */
void hs_set_log(hub_server *s, FILE *f);

#endif
