/* launch/hub.h — a Hugging Face hub client (libcurl): list a repository at a revision, download
 * its files into a directory, checked. What `mill download` (download_cli.h) is made of.
 * Owns: the hub's URL layout and replies as huggingface_hub reads them, the download directory's
 * state (DIR/.cache/mill/download/: partial files and per-file records) and the retry policy.
 *
 * The hub, as used here:
 *   listing   GET {endpoint}/api/{models|datasets}/{repo}/revision/{rev}?blobs=true
 *             -> {"sha": commit, "siblings": [{"rfilename", "size", "blobId", "lfs": {"sha256", "size"}}]}
 *   a file    GET {endpoint}/[datasets/]{repo}/resolve/{commit}/{path}: the bytes, or (LFS files) a 302
 *             to a CDN host carrying X-Linked-Size and X-Linked-Etag (the sha256); ETag is the git
 *             blob id of a small file. Errors name themselves in X-Error-Code (RepoNotFound,
 *             RevisionNotFound, EntryNotFound, GatedRepo).
 * Redirects are followed here, not by curl, so that Authorization goes only to the endpoint's own
 * scheme://host:port. A file is written to DIR/.cache/mill/download/PATH.<oid>.incomplete, resumed
 * from there by a Range request, checked (size; sha256 for LFS files, git's blob sha1 otherwise),
 * fsynced and renamed to DIR/PATH; a record beside it (PATH.meta: oid, size, mtime) lets a later run
 * skip the file without hashing it again. Connection errors, stalls, 429 and 5xx are retried with
 * exponential backoff; 401/403/404 are not. Every failure is one line in the mill_err. */
#ifndef MILL_HUB_H
#define MILL_HUB_H

#include <stdint.h>

#include "../common/err.h"

typedef enum { HUB_MODEL = 0, HUB_DATASET = 1 } hub_repo_type;

typedef struct {
    char *path;      /* in the repository, '/'-separated */
    int64_t size;    /* bytes */
    char sha256[65]; /* the LFS object id; "" when the file is not in LFS */
    char blob[41];   /* the git blob id; "" when the listing gave none */
} hub_file;

typedef struct {
    char commit[41]; /* the revision, resolved */
    hub_file *files;
    int n;
} hub_listing;

/* Called as bytes arrive (often: throttle the drawing). done and total are the file's bytes. */
typedef void (*hub_progress_fn)(void *ud, const hub_file *f, int64_t done, int64_t total);

typedef struct {
    const char *endpoint; /* e.g. https://huggingface.co (a trailing '/' is ignored) */
    const char *token;    /* Bearer token, or NULL; never printed */
    hub_repo_type type;
    const char *repo; /* NAME or OWNER/NAME */
    double timeout_s; /* connect timeout, and the longest a transfer may stall (<= 0: 10 s) */
    int retries;      /* attempts after a transient failure without progress (< 0: 5) */
    double backoff_s; /* the first retry's wait, doubling up to 30 s (<= 0: 1 s) */
    int verify;       /* 1: hash files already present even when their record says they are fine */
    hub_progress_fn progress;
    void *progress_ud;
} hub_client;

typedef struct {
    int skipped;          /* 1: already present and right; nothing fetched */
    int replaced;         /* 1: a present file differed from the hub's and was removed first */
    int64_t resumed_from; /* bytes of an earlier partial download kept, 0 if none */
    int range_ignored;    /* 1: the server answered a Range request with the whole file */
    int restarted;        /* 1: a resumed download hashed wrong and was fetched again from 0 */
    int attempts;         /* requests for the bytes (0 when skipped) */
    int64_t fetched;      /* bytes received */
} hub_result;

/* Once per process, before any other call (curl_global_init), and after the last one. */
int hub_global_init(mill_err *e);
void hub_global_cleanup(void);

/* A repository id as the hub accepts it: NAME or OWNER/NAME, letters, digits, '-', '_', '.'. */
int hub_check_repo_id(const char *repo, mill_err *e);

/* The token huggingface_hub would use: $HF_TOKEN, else the file $HF_TOKEN_PATH, else
 * $HF_HOME/token (HF_HOME defaults to ~/.cache/huggingface). *tok is malloc'd, or NULL when none;
 * a token with a control character is an error. */
int hub_token_from_env(char **tok, mill_err *e);

/* The files of the repository at revision (a branch, tag or commit), sorted by path. */
int hub_list(const hub_client *c, const char *revision, hub_listing *out, mill_err *e);
void hub_listing_free(hub_listing *l);

/* 1 when path matches one of the globs (fnmatch: '*' also crosses '/'; a glob ending in '/'
 * takes everything under it) or when there are none. */
int hub_glob_match(const char *const *globs, int n, const char *path);

/* A repository path that may be written under DIR: relative, no empty, "." or ".." component,
 * no control characters, not under .cache/mill/. */
int hub_check_path(const char *path, mill_err *e);

/* Bytes still to fetch for f in dir (0 when present at its size; minus a partial download). */
int64_t hub_bytes_needed(const char *dir, const hub_file *f);

/* Downloads f at commit into dir/f->path, or leaves it when it is already there and right. */
int hub_download_file(const hub_client *c, const char *commit, const hub_file *f, const char *dir, hub_result *r,
                      mill_err *e);

#endif
