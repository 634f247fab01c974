/* launch/download_cli.c — `mill download`. See download_cli.h; the hub client is hub.h. */
#include "download_cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "../common/err.h"
#include "hub.h"

enum { DL_MAX_INCLUDES = 64 };

typedef struct {
    int tty;             /* stderr is a terminal: draw the bar there */
    int idx, n;          /* the file being fetched (1-based) and how many need fetching */
    int64_t total;       /* bytes to fetch in all (estimated before the first request) */
    int64_t done_before; /* bytes fetched by the files before this one */
    int64_t base;        /* this file's bytes already on disk when it started */
    int64_t file_done;
    double t0, file_t0, last_draw, last_line;
    int drawn; /* a bar is on the terminal's last line */
} dl_view;

static void human(double b, char *out, size_t cap) {
    static const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int k = 0;
    while (b >= 1024 && k < 5) b /= 1024, k++;
    if (k == 0) snprintf(out, cap, "%.0f B", b);
    else snprintf(out, cap, "%.1f %s", b, u[k]);
}

static int term_width(void) {
    struct winsize w;
    if (ioctl(STDERR_FILENO, TIOCGWINSZ, &w) == 0 && w.ws_col >= 40) return w.ws_col;
    return 80;
}

static void bar_clear(dl_view *v) {
    if (v->tty && v->drawn) {
        fputs("\r\033[K", stderr);
        fflush(stderr);
        v->drawn = 0;
    }
}

/* "14.8/28.6 MiB": done in total's unit. */
static void human_pair(double done, double total, char *out, size_t cap) {
    static const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int k = 0;
    double t = total, d = done;
    while (t >= 1024 && k < 5) t /= 1024, d /= 1024, k++;
    if (k == 0) snprintf(out, cap, "%.0f/%.0f B", d, t);
    else snprintf(out, cap, "%.1f/%.1f %s", d, t, u[k]);
}

static void draw_bar(dl_view *v, const hub_file *f, int64_t done, int64_t size, int64_t all, double rate) {
    char fb[48], tb[48], r[32], eta[32] = "";
    human_pair((double)done, (double)size, fb, sizeof fb);
    human_pair((double)all, (double)v->total, tb, sizeof tb);
    human(rate, r, sizeof r);
    double left = rate > 0 ? (double)(v->total - all) / rate : -1;
    if (left >= 0 && mill_now() - v->t0 > 1) {
        long sec = (long)(left + 0.5);
        if (sec >= 3600) snprintf(eta, sizeof eta, " | %ld:%02ld:%02ld left", sec / 3600, sec / 60 % 60, sec % 60);
        else snprintf(eta, sizeof eta, " | %ld:%02ld left", sec / 60, sec % 60);
    }
    int fpct = size ? (int)(100.0 * (double)done / (double)size) : 100;
    int tpct = v->total ? (int)(100.0 * (double)all / (double)v->total) : 100;
    if (tpct > 100) tpct = 100;
    char head[32];
    int hl = snprintf(head, sizeof head, "[%d/%d] ", v->idx, v->n), width = term_width() - 1;
    int plen = (int)strlen(f->path), want = plen < 24 ? plen : 24;
    /* the most detail that leaves the name room: bytes, then the ETA, then the totals' bytes go */
    char tail[200];
    int tl = 0;
    for (int level = 0; level < 3; level++) {
        if (level == 0)
            tl = snprintf(tail, sizeof tail, " %3d%% %s | total %3d%% %s | %s/s%s", fpct, fb, tpct, tb, r, eta);
        else if (level == 1) tl = snprintf(tail, sizeof tail, " %3d%% | total %3d%% %s | %s/s", fpct, tpct, tb, r);
        else tl = snprintf(tail, sizeof tail, " %3d%% | total %3d%% | %s/s", fpct, tpct, r);
        if (width - hl - tl >= want) break;
    }
    int room = width - hl - tl;
    if (room < 7) room = 7;
    if (plen <= room) {
        fprintf(stderr, "\r\033[K%s%s%s", head, f->path, tail);
    } else { /* the name's start and end, which tell shards apart */
        int a = (room - 3) / 2, b = room - 3 - a;
        fprintf(stderr, "\r\033[K%s%.*s...%s%s", head, a, f->path, f->path + plen - b, tail);
    }
    fflush(stderr);
    v->drawn = 1;
}

static void on_progress(void *ud, const hub_file *f, int64_t done, int64_t size) {
    dl_view *v = ud;
    double t = mill_now();
    v->file_done = done;
    int64_t all = v->done_before + (done > v->base ? done - v->base : 0);
    double el = t - v->t0 > 1e-3 ? t - v->t0 : 1e-3, rate = (double)all / el;
    if (v->tty && (t - v->last_draw >= 0.1 || done == size)) {
        v->last_draw = t;
        draw_bar(v, f, done, size, all, rate);
    } else if (!v->tty && size >= (64 << 20) && t - v->last_line >= 30) { /* a log gets a line now and then */
        char a[48], r[32];
        v->last_line = t;
        human_pair((double)done, (double)size, a, sizeof a);
        human(rate, r, sizeof r);
        printf("  %s: %d%% (%s, %s/s)\n", f->path, size ? (int)(100.0 * (double)done / (double)size) : 100, a, r);
        fflush(stdout);
    }
}

/* mkdir -p dir. */
static int make_dir(const char *dir, mill_err *e) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s/", dir) >= (int)sizeof tmp) return mill_errf(e, "%s: path too long", dir);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
            return mill_errf(e, "%s: cannot create: %s", tmp, strerror(errno));
        struct stat st;
        if (stat(tmp, &st) != 0 || !S_ISDIR(st.st_mode)) return mill_errf(e, "%s: exists and is not a directory", tmp);
        *p = '/';
    }
    return 0;
}

static int parse_pos(const char *name, const char *v, double lo, double hi, double *out, mill_err *e) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || *end || !(x >= lo && x <= hi))
        return mill_errf(e, "%s must be a number in [%g, %g], got \"%s\"", name, lo, hi, v);
    *out = x;
    return 0;
}

static int download_main(int argc, char **argv, dl_view *v, mill_err *e) {
    static const char *use =
        "mill download REPO_ID --out DIR [--revision R] [--include GLOB]... [--repo-type model|dataset] "
        "[--timeout S] [--retries N] [--verify]";
    if (argc < 3 || argv[2][0] == '-') return mill_errf(e, "needs a repository: %s", use);
    const char *repo = argv[2], *out = NULL, *rev = "main", *type = "model", *includes[DL_MAX_INCLUDES];
    int n_inc = 0, verify = 0;
    double timeout = 10, retries = 5;
    const char *envt = getenv("HF_HUB_DOWNLOAD_TIMEOUT");
    if (envt && envt[0] && parse_pos("HF_HUB_DOWNLOAD_TIMEOUT", envt, 0.001, 86400, &timeout, e)) return -1;
    for (int i = 3; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--verify")) {
            verify = 1;
            continue;
        }
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--out") && strcmp(a, "--revision") && strcmp(a, "--include") && strcmp(a, "--repo-type") &&
            strcmp(a, "--timeout") && strcmp(a, "--retries"))
            return mill_errf(e, "unknown option %s (%s)", a, use);
        if (!val) return mill_errf(e, "option %s needs a value", a);
        i++;
        if (!strcmp(a, "--out")) out = val;
        else if (!strcmp(a, "--revision")) rev = val;
        else if (!strcmp(a, "--repo-type")) type = val;
        else if (!strcmp(a, "--timeout") && parse_pos("--timeout", val, 0.001, 86400, &timeout, e)) return -1;
        else if (!strcmp(a, "--retries") && parse_pos("--retries", val, 0, 100, &retries, e)) return -1;
        else if (!strcmp(a, "--include")) {
            if (n_inc == DL_MAX_INCLUDES) return mill_errf(e, "at most %d --include globs", DL_MAX_INCLUDES);
            if (!val[0]) return mill_errf(e, "--include needs a glob, got \"\"");
            includes[n_inc++] = val;
        }
    }
    if (!out || !out[0]) return mill_errf(e, "needs --out DIR: %s", use);
    if (strcmp(type, "model") && strcmp(type, "dataset"))
        return mill_errf(e, "--repo-type must be model or dataset, got \"%s\"", type);
    if (!rev[0]) return mill_errf(e, "--revision needs a branch, tag or commit id, got \"\"");
    if (retries != (int)retries) return mill_errf(e, "--retries must be a whole number, got %g", retries);
    if (hub_check_repo_id(repo, e)) return -1;
    const char *ep = getenv("HF_ENDPOINT");
    if (!ep || !ep[0]) ep = "https://huggingface.co";
    if (strncmp(ep, "http://", 7) && strncmp(ep, "https://", 8))
        return mill_errf(e, "HF_ENDPOINT must be an http:// or https:// URL, got \"%s\"", ep);

    char *token = NULL;
    if (hub_token_from_env(&token, e)) return -1;
    hub_client c = {.endpoint = ep,
                    .token = token,
                    .type = strcmp(type, "dataset") ? HUB_MODEL : HUB_DATASET,
                    .repo = repo,
                    .timeout_s = timeout,
                    .retries = (int)retries,
                    .backoff_s = 1.0,
                    .verify = verify,
                    .progress = on_progress,
                    .progress_ud = v};
    hub_listing l = {0};
    int rc = -1, fetched = 0, present = 0, *sel = NULL, n_sel = 0;
    int64_t bytes = 0, *need = NULL;
    if (hub_global_init(e)) {
        free(token);
        return -1;
    }
    if (hub_list(&c, rev, &l, e)) goto done;
    sel = malloc(sizeof *sel * (size_t)(l.n ? l.n : 1));
    need = malloc(sizeof *need * (size_t)(l.n ? l.n : 1));
    if (!sel || !need) {
        mill_errf(e, "out of memory");
        goto done;
    }
    for (int i = 0; i < l.n; i++)
        if (hub_glob_match(includes, n_inc, l.files[i].path)) sel[n_sel++] = i;
    if (l.n == 0) {
        mill_errf(e, "%s at %s (commit %.12s) has no files", repo, rev, l.commit);
        goto done;
    }
    if (n_sel == 0) {
        char globs[512] = "";
        for (int i = 0; i < n_inc; i++)
            snprintf(globs + strlen(globs), sizeof globs - strlen(globs), "%s\"%s\"", i ? ", " : "", includes[i]);
        mill_errf(e, "%s at %s: none of its %d files matches --include %s", repo, rev, l.n, globs);
        goto done;
    }
    if (make_dir(out, e)) goto done;
    int64_t total = 0;
    int n_need = 0;
    for (int k = 0; k < n_sel; k++) {
        need[k] = hub_bytes_needed(out, &l.files[sel[k]]);
        total += need[k];
        n_need += need[k] > 0;
    }
    struct statvfs fs;
    if (statvfs(out, &fs) == 0 && (double)fs.f_bavail * (double)fs.f_frsize < (double)total) {
        char a[32], b[32];
        human((double)fs.f_bavail * (double)fs.f_frsize, a, sizeof a);
        human((double)total, b, sizeof b);
        mill_errf(e, "%s: %s free, the download needs %s more", out, a, b);
        goto done;
    }
    v->total = total;
    v->n = n_need;
    v->t0 = mill_now();
    for (int k = 0; k < n_sel; k++) {
        const hub_file *f = &l.files[sel[k]];
        hub_result r;
        v->idx += need[k] > 0;
        v->base = f->size - need[k];
        v->file_t0 = mill_now();
        v->last_line = v->file_t0;
        if (hub_download_file(&c, l.commit, f, out, &r, e)) goto done;
        bar_clear(v);
        char a[32], b[32];
        if (r.skipped) {
            present++;
            human((double)f->size, a, sizeof a);
            printf("present  %s (%s)\n", f->path, a);
        } else {
            fetched++;
            bytes += r.fetched;
            v->done_before += need[k];
            double dt = mill_now() - v->file_t0;
            human((double)r.fetched, a, sizeof a);
            human(dt > 1e-6 ? (double)r.fetched / dt : 0, b, sizeof b);
            printf("fetched  %s (%s in %.2f s, %s/s", f->path, a, dt, b);
            if (r.resumed_from && !r.range_ignored && !r.restarted) {
                human((double)r.resumed_from, a, sizeof a);
                printf("; resumed after %s", a);
            }
            if (r.range_ignored) printf("; the server ignored the resume's Range, fetched whole");
            if (r.restarted) printf("; the kept partial file hashed wrong, fetched again from byte 0");
            if (r.replaced) printf("; replaced a copy that differed from the hub's");
            if (r.attempts > 1) printf("; %d attempts", r.attempts);
            printf(")\n");
        }
        fflush(stdout);
    }
    double dt = mill_now() - v->t0;
    char a[32], b[32];
    human((double)bytes, a, sizeof a);
    human(dt > 1e-6 ? (double)bytes / dt : 0, b, sizeof b);
    printf("mill download: %s at %s (commit %.12s): %d file%s, %d fetched (%s in %.2f s, %s/s), %d already present -> "
           "%s\n",
           repo, rev, l.commit, n_sel, n_sel == 1 ? "" : "s", fetched, a, dt, b, present, out);
    rc = 0;
done:
    bar_clear(v);
    free(sel);
    free(need);
    hub_listing_free(&l);
    hub_global_cleanup();
    if (token) memset(token, 0, strlen(token));
    free(token);
    return rc;
}

int cli_download(int argc, char **argv) {
    mill_err e = {{0}};
    dl_view v = {0};
    v.tty = isatty(STDERR_FILENO);
    if (download_main(argc, argv, &v, &e) == 0) return 0;
    fprintf(stderr, "mill download: error: %s\n", e.msg);
    return 1;
}
