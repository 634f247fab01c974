/* common/ledger.c — the SQLite run ledger. See ledger.h for the schema and the contract.
 * Every value reaches SQL through a bound parameter of a prepared statement; no SQL text is built
 * from values. Statements are prepared per call: preparing costs microseconds, far below a
 * step, and keeps the handle free of cached state. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strdup, gmtime_r, localtime_r, mkdir under -std=c11 */
#endif
#include "ledger.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

struct ledger {
    sqlite3 *db;
    char path[4096];
};

/* Readers wait this long for a writer's lock (and a writer for another writer) before failing. */
#define LG_BUSY_MS 10000

#define LG_STR_(x) #x
#define LG_STR(x) LG_STR_(x)

static const char lg_schema[] =
    "CREATE TABLE runs("
    " id INTEGER PRIMARY KEY,"
    " name TEXT NOT NULL UNIQUE,"
    " created_at TEXT NOT NULL,"
    " status TEXT NOT NULL CHECK (status IN ('running','finished','failed','interrupted')),"
    " recipe_path TEXT NOT NULL DEFAULT '',"
    " recipe_text TEXT NOT NULL DEFAULT '',"
    " out_dir TEXT NOT NULL DEFAULT '',"
    " layout TEXT NOT NULL DEFAULT '',"
    " seed INTEGER NOT NULL," /* the uint64 seed's bit pattern as int64 */
    " last_step INTEGER NOT NULL DEFAULT -1);"
    "CREATE TABLE steps("
    " run_id INTEGER NOT NULL REFERENCES runs(id),"
    " step INTEGER NOT NULL,"
    " attempt INTEGER NOT NULL CHECK (attempt >= 1),"
    " started_at TEXT,"
    " finished_at TEXT NOT NULL,"
    " weight_version INTEGER NOT NULL,"
    " data_cursor INTEGER NOT NULL,"
    " rng_state BLOB,"
    " metrics TEXT NOT NULL,"
    " superseded INTEGER NOT NULL DEFAULT 0 CHECK (superseded IN (0, 1)),"
    " PRIMARY KEY (run_id, step, attempt));"
    "CREATE TABLE samples("
    " run_id INTEGER NOT NULL REFERENCES runs(id),"
    " step INTEGER NOT NULL,"
    " attempt INTEGER NOT NULL,"
    " prompt_id INTEGER NOT NULL,"
    " sample_idx INTEGER NOT NULL,"
    " reward REAL," /* NULL: NaN (SQLite stores a NaN as NULL) */
    " prompt_len INTEGER NOT NULL,"
    " response_len INTEGER NOT NULL,"
    " weight_version INTEGER NOT NULL,"
    " finish TEXT,"
    " text TEXT,"
    " superseded INTEGER NOT NULL DEFAULT 0 CHECK (superseded IN (0, 1)),"
    " UNIQUE (run_id, step, attempt, prompt_id, sample_idx));"
    "CREATE TABLE checkpoints("
    " id INTEGER PRIMARY KEY,"
    " run_id INTEGER NOT NULL REFERENCES runs(id),"
    " step INTEGER NOT NULL,"
    " path TEXT NOT NULL,"
    " checksum TEXT NOT NULL DEFAULT '',"
    " bytes INTEGER NOT NULL DEFAULT 0,"
    " complete INTEGER NOT NULL CHECK (complete IN (0, 1)),"
    " created_at TEXT NOT NULL,"
    " UNIQUE (run_id, path));"
    "CREATE INDEX checkpoints_by_step ON checkpoints(run_id, complete, step);"
    "CREATE TABLE events("
    " id INTEGER PRIMARY KEY,"
    " run_id INTEGER NOT NULL REFERENCES runs(id),"
    " at TEXT NOT NULL,"
    " step INTEGER,"
    " kind TEXT NOT NULL CHECK (kind <> ''),"
    " message TEXT NOT NULL DEFAULT '');"
    "CREATE INDEX events_by_run ON events(run_id, id);"
    "PRAGMA application_id = " LG_STR(LEDGER_APP_ID) ";"
    "PRAGMA user_version = " LG_STR(LEDGER_SCHEMA_VERSION) ";";

/* ---- small helpers ---- */

/* One line naming the ledger, what was being done and SQLite's own words. */
static int lg_fail(ledger *l, mill_err *e, const char *what) {
    return mill_errf(e, "%s: %s: %s", l->path, what, sqlite3_errmsg(l->db));
}

static int lg_prepare(ledger *l, const char *sql, sqlite3_stmt **st, const char *what, mill_err *e) {
    if (sqlite3_prepare_v2(l->db, sql, -1, st, NULL) != SQLITE_OK) {
        *st = NULL;
        return lg_fail(l, e, what);
    }
    return 0;
}

/* Finalizing only repeats the last step's error code, which the caller already handled. */
static void lg_finalize(sqlite3_stmt *st) { (void)sqlite3_finalize(st); }

/* A query about one run: prepared, with ?1 bound to run_id. */
static int lg_prepare_run(ledger *l, const char *sql, int64_t run_id, sqlite3_stmt **st, const char *what,
                          mill_err *e) {
    if (lg_prepare(l, sql, st, what, e)) return -1;
    if (sqlite3_bind_int64(*st, 1, run_id) != SQLITE_OK) {
        lg_finalize(*st);
        *st = NULL;
        return lg_fail(l, e, what);
    }
    return 0;
}

static int lg_exec(ledger *l, const char *sql, const char *what, mill_err *e) {
    if (sqlite3_exec(l->db, sql, NULL, NULL, NULL) != SQLITE_OK) return lg_fail(l, e, what);
    return 0;
}

/* IMMEDIATE takes the write lock up front: a deferred transaction that reads and then writes can
 * fail with SQLITE_BUSY on the upgrade, which busy_timeout does not wait out. */
static int lg_begin(ledger *l, mill_err *e) { return lg_exec(l, "BEGIN IMMEDIATE", "starting a write transaction", e); }
static int lg_commit(ledger *l, mill_err *e) { return lg_exec(l, "COMMIT", "committing", e); }

static void lg_rollback(ledger *l) {
    if (sqlite3_get_autocommit(l->db)) return; /* SQLite already rolled back */
    if (sqlite3_exec(l->db, "ROLLBACK", NULL, NULL, NULL) != SQLITE_OK)
        log_warn("%s: rollback failed: %s", l->path, sqlite3_errmsg(l->db));
}

static int lg_bind_text(sqlite3_stmt *st, int i, const char *s) {
    return s ? sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(st, i);
}

static const char *lg_col_text(sqlite3_stmt *st, int i) {
    const unsigned char *s = sqlite3_column_text(st, i);
    return s ? (const char *)s : "";
}

/* Copies a column into a fixed field; a value that does not fit is an error, never a cut path. */
static int lg_copy(ledger *l, char *dst, size_t cap, const char *src, const char *field, mill_err *e) {
    size_t n = strlen(src);
    if (n >= cap) return mill_errf(e, "%s: %s is %zu bytes, longer than the %zu this mill holds", l->path, field, n, cap - 1);
    memcpy(dst, src, n + 1);
    return 0;
}

/* UTC "YYYY-MM-DDTHH:MM:SSZ" of t (seconds since the epoch). */
static void lg_utc(time_t t, char buf[32]) {
    struct tm tm;
    if (!gmtime_r(&t, &tm) || !strftime(buf, 32, "%Y-%m-%dT%H:%M:%SZ", &tm)) snprintf(buf, 32, "%lld", (long long)t);
}

/* mkdir -p of path's parent directories. */
static int lg_mkdirs(const char *path, mill_err *e) {
    char dir[4096];
    if (snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir) return mill_errf(e, "%s: path too long", path);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir) return 0;
    *slash = 0;
    for (char *p = dir + 1;; p++) {
        if (*p != '/' && *p) continue;
        char c = *p;
        *p = 0;
        if (mkdir(dir, 0777) != 0 && errno != EEXIST) return mill_errf(e, "%s: cannot create directory %s: %s", path, dir, strerror(errno));
        if (!c) return 0;
        *p = c;
    }
}

/* Reads SQLite's 100-byte header before SQLite does, so a file that is not SQLite or was cut short
 * gets an error that says so (SQLite would say "file is not a database" or fail later, per page). */
static int lg_check_header(const char *path, off_t size, mill_err *e) {
    unsigned char h[100];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mill_errf(e, "%s: cannot open: %s", path, strerror(errno));
    ssize_t got = read(fd, h, sizeof h);
    int err = errno;
    close(fd);
    if (got < 0) return mill_errf(e, "%s: cannot read: %s", path, strerror(err));
    static const char magic[16] = "SQLite format 3";
    if (got < 16 && memcmp(h, magic, (size_t)got) == 0)
        return mill_errf(e, "%s: truncated SQLite database (%lld bytes)", path, (long long)size);
    if (got < 16 || memcmp(h, magic, 16) != 0)
        return mill_errf(e, "%s: not an SQLite database, so not a mill ledger", path);
    if (got < (ssize_t)sizeof h)
        return mill_errf(e, "%s: truncated SQLite database (%lld bytes, less than its 100-byte header)", path, (long long)size);
    long page = (long)h[16] << 8 | h[17];
    if (page == 1) page = 65536;
    uint32_t pages = (uint32_t)h[28] << 24 | (uint32_t)h[29] << 16 | (uint32_t)h[30] << 8 | h[31];
    int count_valid = memcmp(h + 24, h + 92, 4) == 0 && pages > 0; /* SQLite's own validity rule */
    /* With a non-empty WAL beside it, the main file may lag its header until the next checkpoint
     * (after a crash mid-checkpoint); SQLite repairs that from the WAL, so only check without one. */
    char wal[4200];
    struct stat ws;
    snprintf(wal, sizeof wal, "%s-wal", path);
    int have_wal = stat(wal, &ws) == 0 && ws.st_size > 0;
    if (count_valid && !have_wal && (long long)size < (long long)pages * page)
        return mill_errf(e, "%s: truncated SQLite database: its header says %u pages of %ld bytes, the file has %lld bytes",
                         path, pages, page, (long long)size);
    return 0;
}

/* application_id, user_version and the number of schema objects. */
static int lg_identity(ledger *l, int *app, int *ver, int *nobj, mill_err *e) {
    static const char *const sql[3] = {"PRAGMA application_id", "PRAGMA user_version", "SELECT count(*) FROM sqlite_master"};
    int *out[3] = {app, ver, nobj};
    for (int i = 0; i < 3; i++) {
        sqlite3_stmt *st;
        int rc = sqlite3_prepare_v2(l->db, sql[i], -1, &st, NULL);
        if (rc == SQLITE_OK) rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) *out[i] = sqlite3_column_int(st, 0);
        int code = sqlite3_errcode(l->db);
        if (rc != SQLITE_ROW) {
            if (code == SQLITE_NOTADB || code == SQLITE_CORRUPT)
                mill_errf(e, "%s: not a readable SQLite database (%s), so not a mill ledger", l->path, sqlite3_errmsg(l->db));
            else
                lg_fail(l, e, "reading the schema version");
            lg_finalize(st);
            return -1;
        }
        lg_finalize(st);
    }
    return 0;
}

static int lg_check_identity(ledger *l, int app, int ver, int nobj, mill_err *e) {
    if (app == 0 && ver == 0)
        return nobj ? mill_errf(e, "%s: an SQLite database, but not a mill ledger (it holds other tables)", l->path)
                    : mill_errf(e, "%s: an empty SQLite database, not a mill ledger", l->path);
    if ((unsigned)app != LEDGER_APP_ID)
        return mill_errf(e, "%s: an SQLite database, but not a mill ledger (application_id 0x%08x)", l->path, (unsigned)app);
    if (ver > LEDGER_SCHEMA_VERSION)
        return mill_errf(e, "%s: ledger schema version %d is newer than this mill knows (%d); use a newer mill", l->path, ver,
                         LEDGER_SCHEMA_VERSION);
    if (ver < 1) return mill_errf(e, "%s: mill ledger with unknown schema version %d", l->path, ver);
    return 0;
}

/* Version 1 -> 2: steps and samples gain `superseded`, filled as version 1 read them (a row is
 * stale when a later attempt began at or before its step), in one transaction. */
static int lg_migrate(ledger *l, int ver, mill_err *e) {
    static const char sql[] =
        "ALTER TABLE steps ADD COLUMN superseded INTEGER NOT NULL DEFAULT 0 CHECK (superseded IN (0, 1));"
        "ALTER TABLE samples ADD COLUMN superseded INTEGER NOT NULL DEFAULT 0 CHECK (superseded IN (0, 1));"
        "CREATE TEMP TABLE firsts AS SELECT run_id, attempt, min(step) AS first FROM"
        " (SELECT run_id, attempt, step FROM steps UNION ALL SELECT run_id, attempt, step FROM samples)"
        " GROUP BY run_id, attempt;"
        "UPDATE steps SET superseded = 1 WHERE EXISTS (SELECT 1 FROM firsts f WHERE f.run_id = steps.run_id"
        " AND f.attempt > steps.attempt AND f.first <= steps.step);"
        "UPDATE samples SET superseded = 1 WHERE EXISTS (SELECT 1 FROM firsts f WHERE f.run_id = samples.run_id"
        " AND f.attempt > samples.attempt AND f.first <= samples.step);"
        "DROP TABLE firsts;"
        "PRAGMA user_version = 2;";
    if (ver != 1) return 0;
    if (lg_begin(l, e)) return -1;
    if (lg_exec(l, sql, "migrating the ledger to schema version 2", e)) {
        lg_rollback(l);
        return -1;
    }
    return lg_commit(l, e);
}

static int lg_open(ledger **out, const char *path, int create, mill_err *e) {
    *out = NULL;
    if (!path || !*path) return mill_errf(e, "ledger: empty path");
    struct stat st;
    int exists = stat(path, &st) == 0;
    if (!exists && errno != ENOENT) return mill_errf(e, "%s: cannot stat: %s", path, strerror(errno));
    if (!exists && !create) return mill_errf(e, "no ledger at %s (give --ledger PATH or set MILL_LEDGER)", path);
    if (exists && !S_ISREG(st.st_mode)) return mill_errf(e, "%s: not a regular file, so not a mill ledger", path);
    if (exists && st.st_size > 0 && lg_check_header(path, st.st_size, e)) return -1;
    if (!exists && lg_mkdirs(path, e)) return -1;

    ledger *l = calloc(1, sizeof *l);
    if (!l) return mill_errf(e, "%s: out of memory", path);
    if (snprintf(l->path, sizeof l->path, "%s", path) >= (int)sizeof l->path) {
        free(l);
        return mill_errf(e, "%.200s...: path too long", path);
    }
    int flags = SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0);
    if (sqlite3_open_v2(path, &l->db, flags, NULL) != SQLITE_OK) {
        if (l->db) lg_fail(l, e, "cannot open");
        else mill_errf(e, "%s: cannot open: out of memory", path);
        ledger_close(l);
        return -1;
    }
    int app = 0, ver = 0, nobj = 0;
    if (sqlite3_extended_result_codes(l->db, 1) != SQLITE_OK || sqlite3_busy_timeout(l->db, LG_BUSY_MS) != SQLITE_OK) {
        lg_fail(l, e, "configuring the connection");
        goto fail;
    }
    if (lg_identity(l, &app, &ver, &nobj, e)) goto fail;
    int fresh = app == 0 && ver == 0 && nobj == 0;
    if (fresh && !create) {
        mill_errf(e, "%s: an empty SQLite database, not a mill ledger", path);
        goto fail;
    }
    if (!fresh && lg_check_identity(l, app, ver, nobj, e)) goto fail;

    /* WAL: readers never block the writer and the writer never blocks readers, so `mill show` works
     * during a run. synchronous=NORMAL under WAL syncs at checkpoints, not at each commit: a killed
     * process loses nothing committed; a power loss may lose the last commits, never the file. */
    sqlite3_stmt *jm = NULL;
    if (lg_prepare(l, "PRAGMA journal_mode=WAL", &jm, "setting WAL mode", e)) goto fail;
    int rc = sqlite3_step(jm);
    int wal = rc == SQLITE_ROW && sqlite3_column_text(jm, 0) && strcmp((const char *)sqlite3_column_text(jm, 0), "wal") == 0;
    if (rc != SQLITE_ROW) lg_fail(l, e, "setting WAL mode");
    else if (!wal) mill_errf(e, "%s: SQLite refused WAL mode (journal mode %s)", path, lg_col_text(jm, 0));
    lg_finalize(jm);
    if (!wal) goto fail;
    if (lg_exec(l, "PRAGMA synchronous=NORMAL", "setting synchronous=NORMAL", e) ||
        lg_exec(l, "PRAGMA foreign_keys=ON", "enabling foreign keys", e))
        goto fail;

    if (!fresh && lg_migrate(l, ver, e)) goto fail;
    if (fresh) {
        /* Another process may be creating the same file: decide again under the write lock. */
        if (lg_begin(l, e) || lg_identity(l, &app, &ver, &nobj, e)) goto fail_tx;
        if (app == 0 && ver == 0 && nobj == 0 && lg_exec(l, lg_schema, "creating the ledger schema", e)) goto fail_tx;
        if (lg_commit(l, e) || lg_identity(l, &app, &ver, &nobj, e) || lg_check_identity(l, app, ver, nobj, e)) goto fail_tx;
    }
    *out = l;
    return 0;
fail_tx:
    lg_rollback(l);
fail:
    ledger_close(l);
    return -1;
}

int ledger_open(ledger **out, const char *path, mill_err *e) { return lg_open(out, path, 1, e); }
int ledger_open_existing(ledger **out, const char *path, mill_err *e) { return lg_open(out, path, 0, e); }

void ledger_close(ledger *l) {
    if (!l) return;
    if (l->db && sqlite3_close(l->db) != SQLITE_OK) /* only with statements left open: a bug here */
        log_warn("%s: close: %s", l->path, sqlite3_errmsg(l->db));
    free(l);
}

const char *ledger_path(const ledger *l) { return l->path; }

const char *ledger_default_path(void) {
    const char *p = getenv("MILL_LEDGER");
    return p && *p ? p : LEDGER_DEFAULT_PATH;
}

/* ---- runs ---- */

static int lg_valid_status(const char *s) {
    static const char *const ok[] = {"running", "finished", "failed", "interrupted"};
    for (int i = 0; s && i < 4; i++)
        if (strcmp(s, ok[i]) == 0) return 1;
    return 0;
}

static int lg_check_name(const ledger *l, const char *name, mill_err *e) {
    size_t n = strlen(name);
    int digits = 1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c <= ' ' || c == 0x7f) return mill_errf(e, "%s: run name \"%s\" has a space or control character", l->path, name);
        digits &= c >= '0' && c <= '9';
    }
    if (n == 0) return mill_errf(e, "%s: empty run name", l->path);
    if (n >= sizeof((ledger_run *)0)->name) return mill_errf(e, "%s: run name \"%.40s...\" is longer than 127 bytes", l->path, name);
    if (digits) return mill_errf(e, "%s: run name \"%s\" is all digits (those name run ids)", l->path, name);
    return 0;
}

/* 1: name taken, 0: free, -1: error. */
static int lg_name_taken(ledger *l, const char *name, mill_err *e) {
    sqlite3_stmt *st;
    if (lg_prepare(l, "SELECT 1 FROM runs WHERE name = ?1", &st, "looking up a run name", e)) return -1;
    int rc = sqlite3_bind_text(st, 1, name, -1, SQLITE_TRANSIENT);
    if (rc == SQLITE_OK) rc = sqlite3_step(st);
    int out = rc == SQLITE_ROW ? 1 : rc == SQLITE_DONE ? 0 : lg_fail(l, e, "looking up a run name");
    lg_finalize(st);
    return out;
}

int ledger_run_create(ledger *l, const char *name, const char *recipe_path, const char *recipe_text,
                      const char *out_dir, const char *layout, uint64_t seed, int64_t *run_id, mill_err *e) {
    const ledger_run *r = NULL;
    if (name && lg_check_name(l, name, e)) return -1;
    if (recipe_path && strlen(recipe_path) >= sizeof r->recipe_path)
        return mill_errf(e, "%s: recipe path %.60s... is too long", l->path, recipe_path);
    if (out_dir && strlen(out_dir) >= sizeof r->out_dir) return mill_errf(e, "%s: out_dir %.60s... is too long", l->path, out_dir);
    if (layout && strlen(layout) >= sizeof r->layout) return mill_errf(e, "%s: layout \"%.60s\" is too long", l->path, layout);
    char gen[128], now[32];
    time_t t = time(NULL);
    lg_utc(t, now);
    if (lg_begin(l, e)) return -1;
    int rc = -1;
    sqlite3_stmt *st = NULL;
    if (name) {
        int taken = lg_name_taken(l, name, e);
        if (taken < 0) goto out;
        if (taken) {
            mill_errf(e, "%s: a run named %s already exists", l->path, name);
            goto out;
        }
    } else {
        struct tm tm;
        char base[64];
        if (!localtime_r(&t, &tm) || !strftime(base, sizeof base, "run-%Y%m%d-%H%M%S", &tm)) {
            mill_errf(e, "%s: cannot format the time for a run name", l->path);
            goto out;
        }
        for (int k = 1;; k++) {
            if (k > 1000) {
                mill_errf(e, "%s: no free run name after %s-1000", l->path, base);
                goto out;
            }
            if (k == 1) snprintf(gen, sizeof gen, "%s", base);
            else snprintf(gen, sizeof gen, "%s-%d", base, k);
            int taken = lg_name_taken(l, gen, e);
            if (taken < 0) goto out;
            if (!taken) break;
        }
        name = gen;
    }
    if (lg_prepare(l,
                   "INSERT INTO runs(name, created_at, status, recipe_path, recipe_text, out_dir, layout, seed) "
                   "VALUES (?1, ?2, 'running', ?3, ?4, ?5, ?6, ?7)",
                   &st, "creating a run", e))
        goto out;
    if (sqlite3_bind_text(st, 1, name, -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_text(st, 2, now, -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_text(st, 3, recipe_path ? recipe_path : "", -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_text(st, 4, recipe_text ? recipe_text : "", -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_text(st, 5, out_dir ? out_dir : "", -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_text(st, 6, layout ? layout : "", -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_int64(st, 7, (sqlite3_int64)seed) != SQLITE_OK || sqlite3_step(st) != SQLITE_DONE) {
        lg_fail(l, e, "creating a run");
        goto out;
    }
    *run_id = sqlite3_last_insert_rowid(l->db);
    if (lg_commit(l, e)) goto out;
    rc = 0;
out:
    lg_finalize(st);
    if (rc) lg_rollback(l);
    return rc;
}

#define LG_RUN_COLS "id, name, status, created_at, recipe_path, out_dir, layout, seed, last_step"

static int lg_read_run(ledger *l, sqlite3_stmt *st, ledger_run *r, mill_err *e) {
    memset(r, 0, sizeof *r);
    r->id = sqlite3_column_int64(st, 0);
    r->seed = (uint64_t)sqlite3_column_int64(st, 7);
    r->last_step = (long)sqlite3_column_int64(st, 8);
    if (lg_copy(l, r->name, sizeof r->name, lg_col_text(st, 1), "a run name", e) ||
        lg_copy(l, r->status, sizeof r->status, lg_col_text(st, 2), "a run status", e) ||
        lg_copy(l, r->created_at, sizeof r->created_at, lg_col_text(st, 3), "a run's created_at", e) ||
        lg_copy(l, r->recipe_path, sizeof r->recipe_path, lg_col_text(st, 4), "a run's recipe_path", e) ||
        lg_copy(l, r->out_dir, sizeof r->out_dir, lg_col_text(st, 5), "a run's out_dir", e) ||
        lg_copy(l, r->layout, sizeof r->layout, lg_col_text(st, 6), "a run's layout", e))
        return -1;
    return 0;
}

int ledger_run_find(ledger *l, const char *name_or_id, ledger_run *out, mill_err *e) {
    if (!name_or_id || !*name_or_id) return mill_errf(e, "%s: empty run name", l->path);
    int is_id = strspn(name_or_id, "0123456789") == strlen(name_or_id) && strlen(name_or_id) < 19;
    sqlite3_stmt *st;
    if (lg_prepare(l, is_id ? "SELECT " LG_RUN_COLS " FROM runs WHERE id = ?1" : "SELECT " LG_RUN_COLS " FROM runs WHERE name = ?1",
                   &st, "looking up a run", e))
        return -1;
    int rc = is_id ? sqlite3_bind_int64(st, 1, strtoll(name_or_id, NULL, 10))
                   : sqlite3_bind_text(st, 1, name_or_id, -1, SQLITE_TRANSIENT);
    if (rc == SQLITE_OK) rc = sqlite3_step(st);
    int out_rc;
    if (rc == SQLITE_ROW) out_rc = lg_read_run(l, st, out, e);
    else if (rc == SQLITE_DONE)
        out_rc = is_id ? mill_errf(e, "no run with id %s in %s", name_or_id, l->path)
                       : mill_errf(e, "no run named %s in %s", name_or_id, l->path);
    else out_rc = lg_fail(l, e, "looking up a run");
    lg_finalize(st);
    return out_rc;
}

int ledger_run_list(ledger *l, ledger_run **runs, int *n, mill_err *e) {
    *runs = NULL;
    *n = 0;
    sqlite3_stmt *st;
    if (lg_prepare(l, "SELECT " LG_RUN_COLS " FROM runs ORDER BY id", &st, "listing runs", e)) return -1;
    int cap = 0, rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (*n == cap) {
            cap = cap ? 2 * cap : 16;
            ledger_run *g = realloc(*runs, sizeof **runs * (size_t)cap);
            if (!g) {
                mill_errf(e, "%s: out of memory listing runs", l->path);
                goto fail;
            }
            *runs = g;
        }
        if (lg_read_run(l, st, &(*runs)[*n], e)) goto fail;
        (*n)++;
    }
    if (rc != SQLITE_DONE) {
        lg_fail(l, e, "listing runs");
        goto fail;
    }
    lg_finalize(st);
    return 0;
fail:
    lg_finalize(st);
    free(*runs);
    *runs = NULL;
    *n = 0;
    return -1;
}

int ledger_run_recipe(ledger *l, int64_t run_id, char **recipe_text, mill_err *e) {
    *recipe_text = NULL;
    sqlite3_stmt *st;
    if (lg_prepare_run(l, "SELECT recipe_text FROM runs WHERE id = ?1", run_id, &st, "reading a recipe", e)) return -1;
    int rc = sqlite3_step(st);
    int out = 0;
    if (rc == SQLITE_ROW) {
        *recipe_text = strdup(lg_col_text(st, 0));
        if (!*recipe_text) out = mill_errf(e, "%s: out of memory reading the recipe of run %lld", l->path, (long long)run_id);
    } else if (rc == SQLITE_DONE) {
        out = mill_errf(e, "no run with id %lld in %s", (long long)run_id, l->path);
    } else {
        out = lg_fail(l, e, "reading a recipe");
    }
    lg_finalize(st);
    return out;
}

/* Runs one write statement (already bound) as its own transaction; SQLite makes a single statement
 * atomic, so no BEGIN is needed. *changes gets the rows it changed. */
static int lg_run_write(ledger *l, sqlite3_stmt *st, int *changes, const char *what, mill_err *e) {
    if (sqlite3_step(st) != SQLITE_DONE) return lg_fail(l, e, what);
    if (changes) *changes = sqlite3_changes(l->db);
    return 0;
}

int ledger_run_set_status(ledger *l, int64_t run_id, const char *status, mill_err *e) {
    if (!lg_valid_status(status))
        return mill_errf(e, "%s: run status \"%s\" is not one of running, finished, failed, interrupted", l->path,
                         status ? status : "(null)");
    sqlite3_stmt *st;
    if (lg_prepare(l, "UPDATE runs SET status = ?1 WHERE id = ?2", &st, "setting a run status", e)) return -1;
    int changes = 0, rc = -1;
    if (sqlite3_bind_text(st, 1, status, -1, SQLITE_TRANSIENT) != SQLITE_OK || sqlite3_bind_int64(st, 2, run_id) != SQLITE_OK)
        lg_fail(l, e, "setting a run status");
    else if (!lg_run_write(l, st, &changes, "setting a run status", e))
        rc = changes ? 0 : mill_errf(e, "no run with id %lld in %s", (long long)run_id, l->path);
    lg_finalize(st);
    return rc;
}

/* ---- steps ---- */

/* A constraint failure in words: which key, or which run is missing. */
static int lg_constraint(ledger *l, mill_err *e, int64_t run_id, const char *key_desc, const char *what) {
    int x = sqlite3_extended_errcode(l->db);
    if (x == SQLITE_CONSTRAINT_FOREIGNKEY) return mill_errf(e, "no run with id %lld in %s", (long long)run_id, l->path);
    if (x == SQLITE_CONSTRAINT_PRIMARYKEY || x == SQLITE_CONSTRAINT_UNIQUE)
        return mill_errf(e, "%s: %s is already recorded", l->path, key_desc);
    return lg_fail(l, e, what);
}

int ledger_step_record(ledger *l, int64_t run_id, long step, int attempt, double started_at, long weight_version,
                       int64_t data_cursor, const void *rng_state, size_t rng_len, const char *metrics_json,
                       mill_err *e) {
    char key[128];
    snprintf(key, sizeof key, "step %ld (attempt %d) of run %lld", step, attempt, (long long)run_id);
    if (step < 0 || attempt < 1) return mill_errf(e, "%s: %s: step must be >= 0 and attempt >= 1", l->path, key);
    if (rng_len && !rng_state) return mill_errf(e, "%s: %s: rng_state is NULL but rng_len is %zu", l->path, key, rng_len);
    if (rng_len > (size_t)1 << 20) return mill_errf(e, "%s: %s: rng_state of %zu bytes (at most 1 MiB)", l->path, key, rng_len);
    if (!metrics_json) metrics_json = "{}";
    json_error_t je;
    json_t *m = json_loads(metrics_json, JSON_REJECT_DUPLICATES, &je);
    int is_obj = json_is_object(m);
    json_decref(m);
    if (!m) return mill_errf(e, "%s: %s: metrics are not valid JSON (%s)", l->path, key, je.text);
    if (!is_obj) return mill_errf(e, "%s: %s: metrics must be a JSON object", l->path, key);

    char start[32], now[32];
    lg_utc(time(NULL), now);
    if (started_at > 0) lg_utc((time_t)started_at, start);
    sqlite3_stmt *ins = NULL, *upd = NULL;
    int rc = -1, changes = 0;
    if (lg_begin(l, e)) return -1;
    if (lg_prepare(l,
                   "INSERT INTO steps(run_id, step, attempt, started_at, finished_at, weight_version, data_cursor, "
                   "rng_state, metrics) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                   &ins, "recording a step", e) ||
        lg_prepare(l, "UPDATE runs SET last_step = ?1 WHERE id = ?2", &upd, "recording a step", e))
        goto out;
    if (sqlite3_bind_int64(ins, 1, run_id) != SQLITE_OK || sqlite3_bind_int64(ins, 2, step) != SQLITE_OK ||
        sqlite3_bind_int(ins, 3, attempt) != SQLITE_OK || lg_bind_text(ins, 4, started_at > 0 ? start : NULL) != SQLITE_OK ||
        sqlite3_bind_text(ins, 5, now, -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_int64(ins, 6, weight_version) != SQLITE_OK || sqlite3_bind_int64(ins, 7, data_cursor) != SQLITE_OK ||
        (rng_len ? sqlite3_bind_blob(ins, 8, rng_state, (int)rng_len, SQLITE_TRANSIENT) : sqlite3_bind_null(ins, 8)) != SQLITE_OK ||
        sqlite3_bind_text(ins, 9, metrics_json, -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_int64(upd, 1, step) != SQLITE_OK || sqlite3_bind_int64(upd, 2, run_id) != SQLITE_OK) {
        lg_fail(l, e, "recording a step");
        goto out;
    }
    if (sqlite3_step(ins) != SQLITE_DONE) {
        lg_constraint(l, e, run_id, key, "recording a step");
        goto out;
    }
    if (lg_run_write(l, upd, &changes, "recording a step", e)) goto out;
    if (!changes) {
        mill_errf(e, "no run with id %lld in %s", (long long)run_id, l->path);
        goto out;
    }
    if (lg_commit(l, e)) goto out;
    rc = 0;
out:
    lg_finalize(ins);
    lg_finalize(upd);
    if (rc) lg_rollback(l);
    return rc;
}

int ledger_step_state(ledger *l, int64_t run_id, long step, int64_t *data_cursor, void *rng_state, size_t rng_cap,
                      size_t *rng_len, int *attempt, mill_err *e) {
    sqlite3_stmt *st;
    if (lg_prepare(l,
                   "SELECT data_cursor, rng_state, attempt FROM steps WHERE run_id = ?1 AND step = ?2 "
                   "ORDER BY attempt DESC LIMIT 1",
                   &st, "reading a step's state", e))
        return -1;
    int rc = sqlite3_bind_int64(st, 1, run_id);
    if (rc == SQLITE_OK) rc = sqlite3_bind_int64(st, 2, step);
    if (rc == SQLITE_OK) rc = sqlite3_step(st);
    int out = 0;
    if (rc == SQLITE_ROW) {
        const void *b = sqlite3_column_blob(st, 1);
        size_t n = (size_t)sqlite3_column_bytes(st, 1);
        if (n > rng_cap) {
            out = mill_errf(e, "%s: step %ld of run %lld: rng state of %zu bytes, the caller holds %zu", l->path, step,
                            (long long)run_id, n, rng_cap);
        } else {
            if (n) memcpy(rng_state, b, n);
            if (rng_len) *rng_len = n;
            if (data_cursor) *data_cursor = sqlite3_column_int64(st, 0);
            if (attempt) *attempt = sqlite3_column_int(st, 2);
        }
    } else if (rc == SQLITE_DONE) {
        out = 1;
    } else {
        out = lg_fail(l, e, "reading a step's state");
    }
    lg_finalize(st);
    return out;
}

int ledger_max_attempt(ledger *l, int64_t run_id, int *attempt, mill_err *e) {
    sqlite3_stmt *st;
    if (lg_prepare_run(l,
                   "SELECT max(coalesce((SELECT max(attempt) FROM steps WHERE run_id = ?1), 0),"
                   " coalesce((SELECT max(attempt) FROM samples WHERE run_id = ?1), 0))",
                   run_id, &st, "reading the last attempt", e))
        return -1;
    int rc = sqlite3_step(st);
    int out = 0;
    if (rc == SQLITE_ROW) *attempt = sqlite3_column_int(st, 0);
    else out = lg_fail(l, e, "reading the last attempt");
    lg_finalize(st);
    return out;
}

int ledger_supersede(ledger *l, int64_t run_id, long from_step, int attempt, mill_err *e) {
    static const char *const sql[2] = {
        "UPDATE steps SET superseded = 1 WHERE run_id = ?1 AND step >= ?2 AND attempt < ?3 AND superseded = 0",
        "UPDATE samples SET superseded = 1 WHERE run_id = ?1 AND step >= ?2 AND attempt < ?3 AND superseded = 0"};
    if (lg_begin(l, e)) return -1;
    for (int i = 0; i < 2; i++) {
        sqlite3_stmt *st;
        if (lg_prepare(l, sql[i], &st, "marking superseded rows", e)) {
            lg_rollback(l);
            return -1;
        }
        int rc = sqlite3_bind_int64(st, 1, run_id);
        if (rc == SQLITE_OK) rc = sqlite3_bind_int64(st, 2, from_step);
        if (rc == SQLITE_OK) rc = sqlite3_bind_int(st, 3, attempt);
        if (rc == SQLITE_OK) rc = sqlite3_step(st);
        lg_finalize(st);
        if (rc != SQLITE_DONE) {
            lg_fail(l, e, "marking superseded rows");
            lg_rollback(l);
            return -1;
        }
    }
    return lg_commit(l, e);
}

/* Live rows only (not superseded by a later attempt that went back past them). */
#define LG_LIVE_STEPS                                                                                     \
    "SELECT step, attempt, weight_version, data_cursor, started_at, finished_at, metrics FROM steps "    \
    "WHERE run_id = ?1 AND superseded = 0 "

/* The end of an _each reader's loop: the callback's stop value, or an error if SQLite stopped early. */
static int lg_each_end(ledger *l, int rc, int stop, const char *what, mill_err *e) {
    if (stop) return stop;
    if (rc != SQLITE_DONE) return lg_fail(l, e, what);
    return 0;
}

int ledger_steps_each(ledger *l, int64_t run_id, int descending, ledger_step_fn fn, void *ctx, mill_err *e) {
    sqlite3_stmt *st;
    if (lg_prepare_run(l, descending ? LG_LIVE_STEPS "ORDER BY step DESC" : LG_LIVE_STEPS "ORDER BY step", run_id, &st,
                   "reading steps", e))
        return -1;
    int rc, stop = 0;
    while (!stop && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        ledger_step_row r = {
            .step = (long)sqlite3_column_int64(st, 0),
            .attempt = sqlite3_column_int(st, 1),
            .weight_version = (long)sqlite3_column_int64(st, 2),
            .data_cursor = sqlite3_column_int64(st, 3),
            .started_at = lg_col_text(st, 4),
            .finished_at = lg_col_text(st, 5),
            .metrics_json = lg_col_text(st, 6),
        };
        stop = fn(ctx, &r, e);
    }
    int out = lg_each_end(l, rc, stop, "reading steps", e);
    lg_finalize(st);
    return out;
}

/* ---- samples ---- */

int ledger_samples_add(ledger *l, const ledger_sample *s, int n, mill_err *e) {
    if (n < 0) return mill_errf(e, "%s: negative sample count %d", l->path, n);
    if (n == 0) return 0;
    sqlite3_stmt *st = NULL;
    int rc = -1;
    if (lg_begin(l, e)) return -1;
    if (lg_prepare(l,
                   "INSERT INTO samples(run_id, step, attempt, prompt_id, sample_idx, reward, prompt_len, response_len, "
                   "weight_version, finish, text) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                   &st, "recording samples", e))
        goto out;
    for (int i = 0; i < n; i++) {
        const ledger_sample *x = &s[i];
        if (sqlite3_reset(st) != SQLITE_OK || sqlite3_bind_int64(st, 1, x->run_id) != SQLITE_OK ||
            sqlite3_bind_int64(st, 2, x->step) != SQLITE_OK || sqlite3_bind_int(st, 3, x->attempt) != SQLITE_OK ||
            sqlite3_bind_int64(st, 4, x->prompt_id) != SQLITE_OK || sqlite3_bind_int(st, 5, x->sample_idx) != SQLITE_OK ||
            sqlite3_bind_double(st, 6, x->reward) != SQLITE_OK || sqlite3_bind_int(st, 7, x->prompt_len) != SQLITE_OK ||
            sqlite3_bind_int(st, 8, x->response_len) != SQLITE_OK ||
            sqlite3_bind_int64(st, 9, x->weight_version) != SQLITE_OK || lg_bind_text(st, 10, x->finish) != SQLITE_OK ||
            lg_bind_text(st, 11, x->text) != SQLITE_OK) {
            lg_fail(l, e, "recording samples");
            goto out;
        }
        if (sqlite3_step(st) != SQLITE_DONE) {
            char key[160];
            snprintf(key, sizeof key, "sample %d of prompt %ld at step %ld (attempt %d) of run %lld", x->sample_idx,
                     x->prompt_id, x->step, x->attempt, (long long)x->run_id);
            lg_constraint(l, e, x->run_id, key, "recording samples");
            goto out;
        }
    }
    if (lg_commit(l, e)) goto out;
    rc = 0;
out:
    lg_finalize(st);
    if (rc) lg_rollback(l);
    return rc;
}

int ledger_samples_recent(ledger *l, int64_t run_id, int limit, ledger_sample_fn fn, void *ctx, mill_err *e) {
    sqlite3_stmt *st;
    if (lg_prepare(l,
                   "SELECT step, attempt, prompt_id, sample_idx, reward, prompt_len, response_len, weight_version, finish, "
                   "text FROM samples WHERE run_id = ?1 AND superseded = 0 "
                   "ORDER BY step DESC, attempt DESC, prompt_id DESC, sample_idx DESC LIMIT ?2",
                   &st, "reading samples", e))
        return -1;
    int rc = sqlite3_bind_int64(st, 1, run_id), stop = 0;
    if (rc == SQLITE_OK) rc = sqlite3_bind_int(st, 2, limit < 0 ? 0 : limit);
    if (rc != SQLITE_OK) {
        lg_finalize(st);
        return lg_fail(l, e, "reading samples");
    }
    while (!stop && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        ledger_sample x = {
            .run_id = run_id,
            .step = (long)sqlite3_column_int64(st, 0),
            .attempt = sqlite3_column_int(st, 1),
            .prompt_id = (long)sqlite3_column_int64(st, 2),
            .sample_idx = sqlite3_column_int(st, 3),
            .reward = sqlite3_column_type(st, 4) == SQLITE_NULL ? NAN : sqlite3_column_double(st, 4),
            .prompt_len = sqlite3_column_int(st, 5),
            .response_len = sqlite3_column_int(st, 6),
            .weight_version = (long)sqlite3_column_int64(st, 7),
            .finish = (const char *)sqlite3_column_text(st, 8),
            .text = (const char *)sqlite3_column_text(st, 9),
        };
        stop = fn(ctx, &x, e);
    }
    int out = lg_each_end(l, rc, stop, "reading samples", e);
    lg_finalize(st);
    return out;
}

/* ---- checkpoints ---- */

int ledger_checkpoint_add(ledger *l, int64_t run_id, long step, const char *path, const char *checksum, int64_t bytes,
                          int complete, mill_err *e) {
    if (!path || !*path) return mill_errf(e, "%s: checkpoint of step %ld of run %lld has no path", l->path, step, (long long)run_id);
    if (complete != 0 && complete != 1)
        return mill_errf(e, "%s: checkpoint %s: complete must be 0 or 1, not %d", l->path, path, complete);
    char now[32];
    lg_utc(time(NULL), now);
    sqlite3_stmt *st;
    if (lg_prepare(l,
                   "INSERT INTO checkpoints(run_id, step, path, checksum, bytes, complete, created_at) "
                   "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (run_id, path) DO UPDATE SET step = excluded.step, "
                   "checksum = excluded.checksum, bytes = excluded.bytes, complete = excluded.complete, "
                   "created_at = excluded.created_at",
                   &st, "recording a checkpoint", e))
        return -1;
    int rc = -1;
    if (sqlite3_bind_int64(st, 1, run_id) != SQLITE_OK || sqlite3_bind_int64(st, 2, step) != SQLITE_OK ||
        sqlite3_bind_text(st, 3, path, -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_text(st, 4, checksum ? checksum : "", -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_int64(st, 5, bytes) != SQLITE_OK || sqlite3_bind_int(st, 6, complete) != SQLITE_OK ||
        sqlite3_bind_text(st, 7, now, -1, SQLITE_TRANSIENT) != SQLITE_OK)
        lg_fail(l, e, "recording a checkpoint");
    else if (sqlite3_step(st) != SQLITE_DONE)
        lg_constraint(l, e, run_id, path, "recording a checkpoint");
    else
        rc = 0;
    lg_finalize(st);
    return rc;
}

int ledger_checkpoint_latest(ledger *l, int64_t run_id, long *step, char *path, size_t cap, char *checksum,
                             size_t ccap, mill_err *e) {
    sqlite3_stmt *st;
    if (lg_prepare_run(l,
                   "SELECT step, path, checksum FROM checkpoints WHERE run_id = ?1 AND complete = 1 "
                   "ORDER BY step DESC, id DESC LIMIT 1",
                   run_id, &st, "reading checkpoints", e))
        return -1;
    int rc = sqlite3_step(st);
    int out = 0;
    if (rc == SQLITE_ROW) {
        if (step) *step = (long)sqlite3_column_int64(st, 0);
        if ((path && lg_copy(l, path, cap, lg_col_text(st, 1), "a checkpoint path", e)) ||
            (checksum && lg_copy(l, checksum, ccap, lg_col_text(st, 2), "a checkpoint checksum", e)))
            out = -1;
    } else if (rc == SQLITE_DONE) {
        out = 1;
    } else {
        out = lg_fail(l, e, "reading checkpoints");
    }
    lg_finalize(st);
    return out;
}

int ledger_checkpoints_each(ledger *l, int64_t run_id, ledger_checkpoint_fn fn, void *ctx, mill_err *e) {
    sqlite3_stmt *st;
    if (lg_prepare_run(l,
                   "SELECT step, complete, bytes, path, checksum, created_at FROM checkpoints WHERE run_id = ?1 "
                   "ORDER BY step, id",
                   run_id, &st, "reading checkpoints", e))
        return -1;
    int rc, stop = 0;
    while (!stop && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        ledger_checkpoint_row r = {
            .step = (long)sqlite3_column_int64(st, 0),
            .complete = sqlite3_column_int(st, 1),
            .bytes = sqlite3_column_int64(st, 2),
            .path = lg_col_text(st, 3),
            .checksum = lg_col_text(st, 4),
            .created_at = lg_col_text(st, 5),
        };
        stop = fn(ctx, &r, e);
    }
    int out = lg_each_end(l, rc, stop, "reading checkpoints", e);
    lg_finalize(st);
    return out;
}

/* ---- events ---- */

int ledger_event(ledger *l, int64_t run_id, long step, const char *kind, const char *message, mill_err *e) {
    if (!kind || !*kind) return mill_errf(e, "%s: event of run %lld has no kind", l->path, (long long)run_id);
    char now[32];
    lg_utc(time(NULL), now);
    sqlite3_stmt *st;
    if (lg_prepare(l, "INSERT INTO events(run_id, at, step, kind, message) VALUES (?1, ?2, ?3, ?4, ?5)", &st,
                   "recording an event", e))
        return -1;
    int rc = -1;
    if (sqlite3_bind_int64(st, 1, run_id) != SQLITE_OK || sqlite3_bind_text(st, 2, now, -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        (step >= 0 ? sqlite3_bind_int64(st, 3, step) : sqlite3_bind_null(st, 3)) != SQLITE_OK ||
        sqlite3_bind_text(st, 4, kind, -1, SQLITE_TRANSIENT) != SQLITE_OK ||
        sqlite3_bind_text(st, 5, message ? message : "", -1, SQLITE_TRANSIENT) != SQLITE_OK)
        lg_fail(l, e, "recording an event");
    else if (sqlite3_step(st) != SQLITE_DONE)
        lg_constraint(l, e, run_id, "the event", "recording an event");
    else
        rc = 0;
    lg_finalize(st);
    return rc;
}

int ledger_events_each(ledger *l, int64_t run_id, ledger_event_fn fn, void *ctx, mill_err *e) {
    sqlite3_stmt *st;
    if (lg_prepare_run(l, "SELECT at, step, kind, message FROM events WHERE run_id = ?1 ORDER BY id", run_id, &st, "reading events", e))
        return -1;
    int rc, stop = 0;
    while (!stop && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        ledger_event_row r = {
            .at = lg_col_text(st, 0),
            .step = sqlite3_column_type(st, 1) == SQLITE_NULL ? -1 : (long)sqlite3_column_int64(st, 1),
            .kind = lg_col_text(st, 2),
            .message = lg_col_text(st, 3),
        };
        stop = fn(ctx, &r, e);
    }
    int out = lg_each_end(l, rc, stop, "reading events", e);
    lg_finalize(st);
    return out;
}

/* ---- checksums ---- */

#define LG_FNV_OFFSET 0xcbf29ce484222325ull /* 14695981039346656037 */
#define LG_FNV_PRIME 0x100000001b3ull

static void lg_fnv(uint64_t *h, const void *p, size_t n) {
    const unsigned char *b = p;
    uint64_t x = *h;
    for (size_t i = 0; i < n; i++) x = (x ^ b[i]) * LG_FNV_PRIME;
    *h = x;
}

/* Hashes a regular file's bytes; with rel, first its relative path, a NUL and its size. */
static int lg_hash_file(const char *full, const char *rel, uint64_t *h, int64_t *bytes, unsigned char *buf, size_t bufsz,
                        mill_err *e) {
    /* Inside a tree a symlink is refused (lstat saw it first; O_NOFOLLOW closes the race). */
    int fd = open(full, O_RDONLY | O_CLOEXEC | (rel ? O_NOFOLLOW : 0));
    if (fd < 0) return mill_errf(e, "%s: cannot open: %s", full, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return mill_errf(e, "%s: cannot stat: %s", full, strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return mill_errf(e, "%s: not a regular file (checksums cover regular files and directories)", full);
    }
    if (rel) {
        unsigned char size[8];
        for (int i = 0; i < 8; i++) size[i] = (unsigned char)((uint64_t)st.st_size >> (8 * i));
        lg_fnv(h, rel, strlen(rel) + 1);
        lg_fnv(h, size, 8);
    }
    int64_t total = 0;
    for (;;) {
        ssize_t n = read(fd, buf, bufsz);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            int err = errno;
            close(fd);
            return mill_errf(e, "%s: read error: %s", full, strerror(err));
        }
        if (n == 0) break;
        lg_fnv(h, buf, (size_t)n);
        total += n;
    }
    close(fd);
    if (total != (int64_t)st.st_size) return mill_errf(e, "%s: changed size while being read", full);
    *bytes += total;
    return 0;
}

static int lg_cmp_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int lg_hash_tree(const char *root, const char *rel, uint64_t *h, int64_t *bytes, unsigned char *buf, size_t bufsz,
                        int depth, mill_err *e) {
    char dir[4096];
    if (snprintf(dir, sizeof dir, "%s%s%s", root, *rel ? "/" : "", rel) >= (int)sizeof dir)
        return mill_errf(e, "%s/%s: path too long", root, rel);
    if (depth > 64) return mill_errf(e, "%s: directories nested deeper than 64", dir);
    DIR *d = opendir(dir);
    if (!d) return mill_errf(e, "%s: cannot open directory: %s", dir, strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = -1;
    struct dirent *de;
    errno = 0;
    while ((de = readdir(d))) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **g = realloc(names, cap * sizeof *names);
            if (!g) {
                mill_errf(e, "%s: out of memory", dir);
                goto out;
            }
            names = g;
        }
        if (!(names[n] = strdup(de->d_name))) {
            mill_errf(e, "%s: out of memory", dir);
            goto out;
        }
        n++;
        errno = 0;
    }
    if (errno) {
        mill_errf(e, "%s: cannot list: %s", dir, strerror(errno));
        goto out;
    }
    if (n) qsort(names, n, sizeof *names, lg_cmp_names);
    for (size_t i = 0; i < n; i++) {
        char full[4096], sub[4096];
        if (snprintf(full, sizeof full, "%s/%s", dir, names[i]) >= (int)sizeof full ||
            snprintf(sub, sizeof sub, "%s%s%s", rel, *rel ? "/" : "", names[i]) >= (int)sizeof sub) {
            mill_errf(e, "%s/%s: path too long", dir, names[i]);
            goto out;
        }
        struct stat st;
        if (lstat(full, &st) != 0) {
            mill_errf(e, "%s: cannot stat: %s", full, strerror(errno));
            goto out;
        }
        if (S_ISDIR(st.st_mode) ? lg_hash_tree(root, sub, h, bytes, buf, bufsz, depth + 1, e)
                                : lg_hash_file(full, sub, h, bytes, buf, bufsz, e))
            goto out;
    }
    rc = 0;
out:
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    closedir(d);
    return rc;
}

int ledger_checksum_dir(const char *path, char *hex, size_t cap, int64_t *bytes, mill_err *e) {
    if (cap < LEDGER_CHECKSUM_LEN) return mill_errf(e, "%s: checksum buffer of %zu bytes (needs %d)", path, cap, LEDGER_CHECKSUM_LEN);
    struct stat st;
    if (stat(path, &st) != 0) return mill_errf(e, "%s: cannot stat: %s", path, strerror(errno));
    size_t bufsz = 1 << 20;
    unsigned char *buf = malloc(bufsz);
    if (!buf) return mill_errf(e, "%s: out of memory", path);
    uint64_t h = LG_FNV_OFFSET;
    int64_t total = 0;
    int rc = S_ISDIR(st.st_mode) ? lg_hash_tree(path, "", &h, &total, buf, bufsz, 0, e)
                                 : lg_hash_file(path, NULL, &h, &total, buf, bufsz, e);
    free(buf);
    if (rc) return -1;
    snprintf(hex, cap, "fnv1a64:%016llx", (unsigned long long)h);
    if (bytes) *bytes = total;
    return 0;
}
