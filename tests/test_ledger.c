/* tests/test_ledger.c — the SQLite run ledger (common/ledger.h): schema and reopen, runs, step state
 * round trips, sample batches that roll back whole, checkpoint and event records, files that are not
 * ledgers, a reader beside a writer (WAL), a writer killed with SIGKILL, directory checksums.
 * `test_ledger --populate PATH` instead writes a small demo ledger at PATH for tests/ledger_cli.sh. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test_util.h"
#include "common/ledger.h"


static int setup(void **state) { return test_dir_setup(state, "test_ledger", "sub/dir/ledger.db"); }

static int teardown(void **state) { return test_dir_teardown(state); }

static ledger *open_ok(const char *path) {
    mill_err e = {{0}};
    ledger *l = NULL;
    if (ledger_open(&l, path, &e)) fail_msg("ledger_open(%s): %s", path, e.msg);
    return l;
}

static int64_t new_run(ledger *l, const char *name) {
    mill_err e = {{0}};
    int64_t id = 0;
    if (ledger_run_create(l, name, "configs/runs/x.yaml", "steps: 3\n", "out/x", "colocated", 42, &id, &e))
        fail_msg("ledger_run_create: %s", e.msg);
    return id;
}

static void assert_contains(const char *s, const char *part) {
    if (!strstr(s, part)) fail_msg("\"%s\" does not contain \"%s\"", s, part);
}

static void step_ok(ledger *l, int64_t run, long step, int attempt, const char *metrics) {
    mill_err e = {{0}};
    uint8_t rng[32];
    for (int i = 0; i < 32; i++) rng[i] = (uint8_t)(step * 7 + attempt * 13 + i);
    if (ledger_step_record(l, run, step, attempt, 1.7e9, step, 100 * step + attempt, rng, sizeof rng, metrics, &e))
        fail_msg("step %ld attempt %d: %s", step, attempt, e.msg);
}

/* ---- schema, reopen, runs ---- */

static void test_create_reopen(void **state) {
    test_dir *f = *state;
    mill_err e = {{0}};
    ledger *l = open_ok(f->path); /* parent directories are made */
    struct stat st;
    assert_int_equal(stat(f->path, &st), 0);
    assert_string_equal(ledger_path(l), f->path);
    int64_t id = new_run(l, "alpha");
    ledger_close(l);

    l = open_ok(f->path);
    ledger_run r;
    assert_int_equal(ledger_run_find(l, "alpha", &r, &e), 0);
    assert_int_equal(r.id, id);
    assert_string_equal(r.status, "running");
    assert_string_equal(r.out_dir, "out/x");
    assert_string_equal(r.layout, "colocated");
    assert_int_equal(r.seed, 42);
    assert_int_equal(r.last_step, -1);
    ledger_close(l);

    /* the read-only commands' open: an existing ledger opens, a missing one is not created */
    assert_int_equal(ledger_open_existing(&l, f->path, &e), 0);
    ledger_close(l);
    char missing[160];
    snprintf(missing, sizeof missing, "%s/none.db", f->dir);
    assert_int_equal(ledger_open_existing(&l, missing, &e), -1);
    assert_contains(e.msg, "no ledger at");
    assert_contains(e.msg, missing);
    assert_int_not_equal(stat(missing, &st), 0);
}

static void test_runs(void **state) {
    test_dir *f = *state;
    mill_err e = {{0}};
    ledger *l = open_ok(f->path);
    int64_t a = new_run(l, "alpha");
    int64_t g1 = new_run(l, NULL), g2 = new_run(l, NULL);
    ledger_run r1, r2, r;
    char ids[32];
    snprintf(ids, sizeof ids, "%lld", (long long)g1);
    assert_int_equal(ledger_run_find(l, ids, &r1, &e), 0);
    snprintf(ids, sizeof ids, "%lld", (long long)g2);
    assert_int_equal(ledger_run_find(l, ids, &r2, &e), 0);
    assert_int_equal(strncmp(r1.name, "run-", 4), 0);
    assert_string_not_equal(r1.name, r2.name); /* same second: a suffix keeps them apart */
    assert_int_equal(ledger_run_find(l, r2.name, &r, &e), 0);
    assert_int_equal(r.id, g2);

    assert_int_equal(ledger_run_create(l, "alpha", NULL, NULL, NULL, NULL, 0, &a, &e), -1);
    assert_contains(e.msg, "alpha");
    assert_int_equal(ledger_run_create(l, "123", NULL, NULL, NULL, NULL, 0, &a, &e), -1);
    assert_contains(e.msg, "digits");
    assert_int_equal(ledger_run_create(l, "has space", NULL, NULL, NULL, NULL, 0, &a, &e), -1);

    assert_int_equal(ledger_run_find(l, "nosuch", &r, &e), -1);
    assert_contains(e.msg, "no run named nosuch in ");
    assert_contains(e.msg, f->path);
    assert_int_equal(ledger_run_find(l, "999", &r, &e), -1);
    assert_contains(e.msg, "no run with id 999");

    char *recipe = NULL;
    assert_int_equal(ledger_run_recipe(l, a, &recipe, &e), 0);
    assert_string_equal(recipe, "steps: 3\n");
    free(recipe);

    assert_int_equal(ledger_run_set_status(l, a, "finished", &e), 0);
    assert_int_equal(ledger_run_find(l, "alpha", &r, &e), 0);
    assert_string_equal(r.status, "finished");
    assert_int_equal(ledger_run_set_status(l, a, "done", &e), -1);
    assert_contains(e.msg, "done");
    assert_int_equal(ledger_run_set_status(l, 999, "failed", &e), -1);
    assert_contains(e.msg, "999");

    ledger_run *all = NULL;
    int n = 0;
    assert_int_equal(ledger_run_list(l, &all, &n, &e), 0);
    assert_int_equal(n, 3);
    assert_string_equal(all[0].name, "alpha");
    free(all);
    ledger_close(l);
}

/* ---- steps ---- */

typedef struct {
    long steps[32];
    int attempts[32];
    int n;
    char metrics[512];
} step_list;

static int collect(void *ctx, const ledger_step_row *r, mill_err *e) {
    (void)e;
    step_list *s = ctx;
    s->steps[s->n] = r->step;
    s->attempts[s->n] = r->attempt;
    snprintf(s->metrics, sizeof s->metrics, "%s", r->metrics_json);
    s->n++;
    return 0;
}

static void test_steps(void **state) {
    test_dir *f = *state;
    mill_err e = {{0}};
    ledger *l = open_ok(f->path);
    int64_t run = new_run(l, "s");
    int att = -1;
    assert_int_equal(ledger_max_attempt(l, run, &att, &e), 0);
    assert_int_equal(att, 0);
    for (long s = 1; s <= 5; s++) step_ok(l, run, s, 1, "{\"reward\": 0.5, \"kl\": 0.01, \"note\": \"x\"}");

    int64_t cursor = 0;
    uint8_t rng[32], want[32];
    size_t rlen = 0;
    int attempt = 0;
    assert_int_equal(ledger_step_state(l, run, 3, &cursor, rng, sizeof rng, &rlen, &attempt, &e), 0);
    for (int i = 0; i < 32; i++) want[i] = (uint8_t)(3 * 7 + 13 + i);
    assert_int_equal(rlen, 32);
    assert_memory_equal(rng, want, 32);
    assert_int_equal(cursor, 301);
    assert_int_equal(attempt, 1);
    assert_int_equal(ledger_step_state(l, run, 9, &cursor, rng, sizeof rng, &rlen, &attempt, &e), 1);
    uint8_t small[8];
    assert_int_equal(ledger_step_state(l, run, 3, &cursor, small, sizeof small, &rlen, &attempt, &e), -1);
    assert_contains(e.msg, "32 bytes");

    /* the same step and attempt twice; bad metrics; an unknown run */
    assert_int_equal(ledger_step_record(l, run, 3, 1, 0, 3, 0, NULL, 0, "{}", &e), -1);
    assert_contains(e.msg, "step 3 (attempt 1)");
    assert_contains(e.msg, "already recorded");
    assert_int_equal(ledger_step_record(l, run, 6, 1, 0, 6, 0, NULL, 0, "{\"reward\": ", &e), -1);
    assert_contains(e.msg, "metrics");
    assert_int_equal(ledger_step_record(l, run, 6, 1, 0, 6, 0, NULL, 0, "[1, 2]", &e), -1);
    assert_contains(e.msg, "JSON object");
    assert_int_equal(ledger_step_record(l, 999, 1, 1, 0, 1, 0, NULL, 0, "{}", &e), -1);
    assert_contains(e.msg, "no run with id 999");

    ledger_run r;
    assert_int_equal(ledger_run_find(l, "s", &r, &e), 0);
    assert_int_equal(r.last_step, 5);

    /* resume from step 3 under attempt 2: steps 4 and 5 of attempt 1 are superseded */
    assert_int_equal(ledger_max_attempt(l, run, &att, &e), 0);
    assert_int_equal(att, 1);
    assert_int_equal(ledger_supersede(l, run, 4, 2, &e), 0);
    step_ok(l, run, 4, 2, "{\"reward\": 0.75}");
    assert_int_equal(ledger_step_state(l, run, 4, &cursor, rng, sizeof rng, &rlen, &attempt, &e), 0);
    assert_int_equal(attempt, 2);
    assert_int_equal(cursor, 402);
    step_list s = {0};
    assert_int_equal(ledger_steps_each(l, run, 0, collect, &s, &e), 0);
    assert_int_equal(s.n, 4);
    long want_steps[4] = {1, 2, 3, 4};
    int want_att[4] = {1, 1, 1, 2};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(s.steps[i], want_steps[i]);
        assert_int_equal(s.attempts[i], want_att[i]);
    }
    assert_string_equal(s.metrics, "{\"reward\": 0.75}"); /* metrics JSON comes back as recorded */
    memset(&s, 0, sizeof s);
    assert_int_equal(ledger_steps_each(l, run, 1, collect, &s, &e), 0);
    assert_int_equal(s.steps[0], 4);
    assert_int_equal(ledger_run_find(l, "s", &r, &e), 0);
    assert_int_equal(r.last_step, 4);
    ledger_close(l);
}

/* ---- samples ---- */

typedef struct {
    int n;
    double reward[16];
    char text[16][32];
} sample_list;

static int collect_sample(void *ctx, const ledger_sample *x, mill_err *e) {
    (void)e;
    sample_list *s = ctx;
    if (s->n < 16) {
        s->reward[s->n] = x->reward;
        snprintf(s->text[s->n], sizeof s->text[0], "%s", x->text ? x->text : "(null)");
    }
    s->n++;
    return 0;
}

static void test_samples(void **state) {
    test_dir *f = *state;
    mill_err e = {{0}};
    ledger *l = open_ok(f->path);
    int64_t run = new_run(l, "s");
    ledger_sample b[4];
    for (int i = 0; i < 4; i++)
        b[i] = (ledger_sample){run, 1, 1, i / 2, i % 2, i == 3 ? NAN : 0.25 * i, 10, 20 + i, 1, "stop", "answer"};
    b[2].text = NULL;
    assert_int_equal(ledger_samples_add(l, b, 4, &e), 0);

    /* a batch whose third row repeats a recorded key: an error naming it, and none of it kept */
    ledger_sample c[3];
    for (int i = 0; i < 3; i++) c[i] = (ledger_sample){run, 2, 1, 7, i, 1.0, 10, 5, 2, "length", "new"};
    c[2] = b[1];
    assert_int_equal(ledger_samples_add(l, c, 3, &e), -1);
    assert_contains(e.msg, "sample 1 of prompt 0 at step 1 (attempt 1)");
    assert_contains(e.msg, "already recorded");
    sample_list s = {0};
    assert_int_equal(ledger_samples_recent(l, run, 100, collect_sample, &s, &e), 0);
    assert_int_equal(s.n, 4);
    for (int i = 0; i < s.n; i++) assert_string_not_equal(s.text[i], "new");
    /* newest first: (prompt 1, sample 1) with its NaN reward, then (1, 0) without text */
    assert_true(isnan(s.reward[0]));
    assert_string_equal(s.text[1], "(null)");
    assert_true(s.reward[3] == 0.0);

    memset(&s, 0, sizeof s);
    assert_int_equal(ledger_samples_recent(l, run, 2, collect_sample, &s, &e), 0);
    assert_int_equal(s.n, 2);

    c[0].run_id = 999;
    assert_int_equal(ledger_samples_add(l, c, 1, &e), -1);
    assert_contains(e.msg, "no run with id 999");

    int att = 0;
    ledger_sample d = {run, 3, 4, 0, 0, 1, 1, 1, 1, NULL, NULL};
    assert_int_equal(ledger_samples_add(l, &d, 1, &e), 0);
    assert_int_equal(ledger_max_attempt(l, run, &att, &e), 0);
    assert_int_equal(att, 4);
    ledger_close(l);
}

/* ---- checkpoints and events ---- */

static int count_ck(void *ctx, const ledger_checkpoint_row *r, mill_err *e) {
    (void)e;
    (void)r;
    (*(int *)ctx)++;
    return 0;
}

typedef struct {
    int n;
    char kinds[8][16];
    long steps[8];
} event_list;

static int collect_event(void *ctx, const ledger_event_row *r, mill_err *e) {
    (void)e;
    event_list *v = ctx;
    snprintf(v->kinds[v->n], sizeof v->kinds[0], "%s", r->kind);
    v->steps[v->n++] = r->step;
    return 0;
}

static void test_checkpoints_events(void **state) {
    test_dir *f = *state;
    mill_err e = {{0}};
    ledger *l = open_ok(f->path);
    int64_t run = new_run(l, "c"), other = new_run(l, "d");
    long step = -1;
    char path[256], sum[64];
    assert_int_equal(ledger_checkpoint_latest(l, run, &step, path, sizeof path, sum, sizeof sum, &e), 1);
    assert_int_equal(ledger_checkpoint_add(l, run, 2, "out/step-2", "fnv1a64:0000000000000002", 100, 1, &e), 0);
    assert_int_equal(ledger_checkpoint_add(l, run, 4, "out/step-4", "", 0, 0, &e), 0); /* being written */
    assert_int_equal(ledger_checkpoint_add(l, other, 9, "other/step-9", "x", 1, 1, &e), 0);
    assert_int_equal(ledger_checkpoint_latest(l, run, &step, path, sizeof path, sum, sizeof sum, &e), 0);
    assert_int_equal(step, 2);
    assert_string_equal(path, "out/step-2");
    assert_string_equal(sum, "fnv1a64:0000000000000002");
    /* step 4 finishes: the same path is now complete */
    assert_int_equal(ledger_checkpoint_add(l, run, 4, "out/step-4", "fnv1a64:0000000000000004", 200, 1, &e), 0);
    assert_int_equal(ledger_checkpoint_latest(l, run, &step, path, sizeof path, NULL, 0, &e), 0);
    assert_int_equal(step, 4);
    assert_string_equal(path, "out/step-4");
    char tiny[4];
    assert_int_equal(ledger_checkpoint_latest(l, run, &step, tiny, sizeof tiny, NULL, 0, &e), -1);
    int n = 0;
    assert_int_equal(ledger_checkpoints_each(l, run, count_ck, &n, &e), 0);
    assert_int_equal(n, 2);
    assert_int_equal(ledger_checkpoint_add(l, run, 5, "out/step-5", "", 0, 2, &e), -1);
    assert_int_equal(ledger_checkpoint_add(l, 999, 5, "out/step-5", "", 0, 1, &e), -1);
    assert_contains(e.msg, "no run with id 999");

    assert_int_equal(ledger_event(l, run, -1, "start", "recipe x", &e), 0);
    assert_int_equal(ledger_event(l, run, 3, "fault", "rollout engine 1 lost", &e), 0);
    assert_int_equal(ledger_event(l, other, 1, "stop", NULL, &e), 0);
    assert_int_equal(ledger_event(l, run, 3, "", "x", &e), -1);
    event_list v = {0};
    assert_int_equal(ledger_events_each(l, run, collect_event, &v, &e), 0);
    assert_int_equal(v.n, 2);
    assert_string_equal(v.kinds[0], "start");
    assert_int_equal(v.steps[0], -1);
    assert_string_equal(v.kinds[1], "fault");
    assert_int_equal(v.steps[1], 3);
    ledger_close(l);
}

/* ---- files that are not ledgers ---- */

static void write_file(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, n, fp), n);
    assert_int_equal(fclose(fp), 0);
}

static void raw_sql(const char *path, const char *sql) {
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK) fail_msg("%s: %s", sql, sqlite3_errmsg(db));
    assert_int_equal(sqlite3_close(db), SQLITE_OK);
}

/* Samples of an abandoned attempt: superseded when a later attempt goes back past their step, kept,
 * and no longer among the live ones; a version 1 ledger (no superseded column) gains the column on
 * open, filled as version 1 read it. */
static void test_superseded(void **state) {
    test_dir *f = *state;
    mill_err e = {{0}};
    ledger *l = open_ok(f->path);
    int64_t run = new_run(l, "sup");
    ledger_sample a[6];
    for (int i = 0; i < 6; i++) /* attempt 1: steps 1..3, two samples each */
        a[i] = (ledger_sample){run, 1 + i / 2, 1, 0, i % 2, 1.0, 1, 1, 1, "stop", "a1"};
    assert_int_equal(ledger_samples_add(l, a, 6, &e), 0);
    assert_int_equal(ledger_supersede(l, run, 2, 2, &e), 0); /* attempt 2 goes back to step 2 */
    for (int i = 0; i < 4; i++) a[i] = (ledger_sample){run, 2 + i / 2, 2, 0, i % 2, 0.5, 1, 1, 2, "stop", "a2"};
    assert_int_equal(ledger_samples_add(l, a, 4, &e), 0);
    sample_list s = {0};
    assert_int_equal(ledger_samples_recent(l, run, 100, collect_sample, &s, &e), 0);
    assert_int_equal(s.n, 6); /* steps 1 (attempt 1), 2 and 3 (attempt 2): each step once */
    for (int i = 0; i < 4; i++) assert_string_equal(s.text[i], "a2");
    ledger_close(l);
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT count(*), sum(superseded) FROM samples", -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(st, 0), 10); /* nothing recorded is lost */
    assert_int_equal(sqlite3_column_int(st, 1), 4);
    sqlite3_finalize(st);
    sqlite3_close(db);

    /* version 1: the same rows without the column (dropped here), then opened by this mill */
    raw_sql(f->path, "ALTER TABLE samples DROP COLUMN superseded; ALTER TABLE steps DROP COLUMN superseded;"
                     "PRAGMA user_version = 1;");
    l = open_ok(f->path);
    memset(&s, 0, sizeof s);
    assert_int_equal(ledger_samples_recent(l, run, 100, collect_sample, &s, &e), 0);
    assert_int_equal(s.n, 6);
    for (int i = 0; i < 4; i++) assert_string_equal(s.text[i], "a2");
    ledger_close(l);
}

static void expect_open_error(const char *path, const char *part) {
    mill_err e = {{0}};
    ledger *l = NULL;
    assert_int_equal(ledger_open(&l, path, &e), -1);
    assert_null(l);
    assert_contains(e.msg, path);
    assert_contains(e.msg, part);
}

static void test_bad_files(void **state) {
    test_dir *f = *state;
    char p[160];
    snprintf(p, sizeof p, "%s/notes.txt", f->dir);
    const char text[] = "these are not the tables you are looking for\n";
    write_file(p, text, sizeof text - 1);
    expect_open_error(p, "not an SQLite database");

    snprintf(p, sizeof p, "%s/other.db", f->dir);
    raw_sql(p, "CREATE TABLE t(x); INSERT INTO t VALUES (1);");
    expect_open_error(p, "not a mill ledger");

    /* a ledger from a newer mill */
    snprintf(p, sizeof p, "%s/newer.db", f->dir);
    ledger *l = open_ok(p);
    ledger_close(l);
    raw_sql(p, "PRAGMA user_version = 99;");
    expect_open_error(p, "newer");

    /* a ledger cut short: a closed ledger has no WAL left, so its header's page count must hold */
    snprintf(p, sizeof p, "%s/cut.db", f->dir);
    l = open_ok(p);
    int64_t run = new_run(l, "big");
    char big[4096];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = 0;
    for (int i = 0; i < 40; i++) {
        ledger_sample s = {run, i, 1, 0, 0, 1, 1, 1, 1, "stop", big};
        mill_err e = {{0}};
        assert_int_equal(ledger_samples_add(l, &s, 1, &e), 0);
    }
    ledger_close(l);
    struct stat st;
    assert_int_equal(stat(p, &st), 0);
    assert_true(st.st_size > 100000);
    assert_int_equal(truncate(p, st.st_size / 2), 0);
    expect_open_error(p, "truncated");
    assert_int_equal(truncate(p, 60), 0);
    expect_open_error(p, "truncated");
    assert_int_equal(truncate(p, 9), 0); /* inside the magic string */
    expect_open_error(p, "truncated");
}

/* ---- concurrency and crashes ---- */

typedef struct {
    int n;
} counter;

static int count_event(void *ctx, const ledger_event_row *r, mill_err *e) {
    (void)e;
    (void)r;
    ((counter *)ctx)->n++;
    return 0;
}

/* A writer holds an open write transaction; a second connection still reads the committed state at
 * once, and sees the write once it commits. */
static void test_wal_reader(void **state) {
    test_dir *f = *state;
    mill_err e = {{0}};
    ledger *w = open_ok(f->path), *r = open_ok(f->path);
    int64_t run = new_run(w, "wal");
    assert_int_equal(ledger_event(w, run, 1, "start", "", &e), 0);

    sqlite3 *raw = NULL;
    assert_int_equal(sqlite3_open(f->path, &raw), SQLITE_OK);
    char sql[200];
    snprintf(sql, sizeof sql,
             "BEGIN IMMEDIATE; INSERT INTO events(run_id, at, step, kind, message) VALUES (%lld, 'now', 2, 'fault', '');",
             (long long)run);
    assert_int_equal(sqlite3_exec(raw, sql, NULL, NULL, NULL), SQLITE_OK);

    counter c = {0};
    assert_int_equal(ledger_events_each(r, run, count_event, &c, &e), 0); /* not blocked by the writer */
    assert_int_equal(c.n, 1);
    ledger_run run_row;
    assert_int_equal(ledger_run_find(r, "wal", &run_row, &e), 0);

    assert_int_equal(sqlite3_exec(raw, "COMMIT", NULL, NULL, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_close(raw), SQLITE_OK);
    c.n = 0;
    assert_int_equal(ledger_events_each(r, run, count_event, &c, &e), 0);
    assert_int_equal(c.n, 2);
    /* and the reader's connection may write too, between the writer's transactions */
    assert_int_equal(ledger_event(r, run, 3, "stop", "", &e), 0);
    c.n = 0;
    assert_int_equal(ledger_events_each(w, run, count_event, &c, &e), 0);
    assert_int_equal(c.n, 3);
    ledger_close(r);
    ledger_close(w);
}

#define KILL_BATCH 16

/* The child records steps and batches of KILL_BATCH samples until killed, telling the parent over
 * a pipe the number of each step it committed. */
static void kill_child(const char *db, int fd) {
    mill_err e = {{0}};
    ledger *l = NULL;
    int64_t run = 0;
    if (ledger_open(&l, db, &e) || ledger_run_create(l, "victim", NULL, NULL, NULL, NULL, 1, &run, &e)) _exit(2);
    char text[200];
    memset(text, 'y', sizeof text - 1);
    text[sizeof text - 1] = 0;
    for (long step = 0;; step++) {
        ledger_sample s[KILL_BATCH];
        for (int i = 0; i < KILL_BATCH; i++) s[i] = (ledger_sample){run, step, 1, i, 0, 0.5, 3, 4, step, "stop", text};
        uint64_t rng[4] = {(uint64_t)step, 2, 3, 4};
        if (ledger_samples_add(l, s, KILL_BATCH, &e) ||
            ledger_step_record(l, run, step, 1, 0, step, step * 10, rng, sizeof rng, "{\"reward\": 0.5}", &e))
            _exit(3);
        if (write(fd, &step, sizeof step) != (ssize_t)sizeof step) _exit(4);
    }
}

static int count_all_samples(void *ctx, const ledger_sample *s, mill_err *e) {
    (void)e;
    (void)s;
    ((counter *)ctx)->n++;
    return 0;
}

static void test_kill9(void **state) {
    test_dir *f = *state;
    mill_err e = {{0}};
    ledger *l = open_ok(f->path); /* the schema exists before the child starts */
    ledger_close(l);
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(p[0]);
        kill_child(f->path, p[1]);
        _exit(5);
    }
    close(p[1]);
    long last = -1, got;
    while (last < 40 && read(p[0], &got, sizeof got) == (ssize_t)sizeof got) last = got;
    assert_int_equal(last, 40); /* the child worked until told about */
    assert_int_equal(kill(pid, SIGKILL), 0); /* mid-loop: likely inside a transaction */
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    while (read(p[0], &got, sizeof got) == (ssize_t)sizeof got) last = got; /* commits reported before the kill */
    close(p[0]);

    l = open_ok(f->path);
    ledger_run r;
    assert_int_equal(ledger_run_find(l, "victim", &r, &e), 0);
    assert_true(r.last_step >= last);
    /* every reported step is there with its state, and every sample batch whole or absent */
    for (long s = 0; s <= last; s++) {
        int64_t cursor = -1;
        uint64_t rng[4];
        size_t n = 0;
        int att = 0;
        assert_int_equal(ledger_step_state(l, r.id, s, &cursor, rng, sizeof rng, &n, &att, &e), 0);
        assert_int_equal(cursor, s * 10);
        assert_int_equal(rng[0], (uint64_t)s);
    }
    counter c = {0};
    assert_int_equal(ledger_samples_recent(l, r.id, 1 << 30, count_all_samples, &c, &e), 0);
    assert_int_equal(c.n % KILL_BATCH, 0);
    assert_true(c.n >= (last + 1) * KILL_BATCH);
    assert_true(c.n <= (r.last_step + 2) * KILL_BATCH);
    /* and the file takes new writes */
    assert_int_equal(ledger_event(l, r.id, r.last_step, "restart", "after SIGKILL", &e), 0);
    ledger_close(l);
}

/* ---- checksums ---- */

static void test_checksum(void **state) {
    test_dir *f = *state;
    mill_err e = {{0}};
    char d[160], p[200], q[200], h1[LEDGER_CHECKSUM_LEN], h2[LEDGER_CHECKSUM_LEN];
    int64_t bytes = 0;
    snprintf(p, sizeof p, "%s/a.bin", f->dir);
    write_file(p, "a", 1);
    assert_int_equal(ledger_checksum_dir(p, h1, sizeof h1, &bytes, &e), 0);
    assert_string_equal(h1, "fnv1a64:af63dc4c8601ec8c"); /* FNV-1a 64 of "a" */
    assert_int_equal(bytes, 1);
    write_file(p, "", 0);
    assert_int_equal(ledger_checksum_dir(p, h1, sizeof h1, &bytes, &e), 0);
    assert_string_equal(h1, "fnv1a64:cbf29ce484222325"); /* the offset basis */

    snprintf(d, sizeof d, "%s/ck", f->dir);
    assert_int_equal(mkdir(d, 0755), 0);
    snprintf(p, sizeof p, "%s/sub", d);
    assert_int_equal(mkdir(p, 0755), 0);
    snprintf(p, sizeof p, "%s/model.safetensors", d);
    write_file(p, "0123456789", 10);
    snprintf(p, sizeof p, "%s/sub/state.bin", d);
    write_file(p, "abc", 3);
    assert_int_equal(ledger_checksum_dir(d, h1, sizeof h1, &bytes, &e), 0);
    assert_int_equal(bytes, 13);
    assert_int_equal(ledger_checksum_dir(d, h2, sizeof h2, NULL, &e), 0);
    assert_string_equal(h1, h2);
    write_file(p, "abd", 3); /* one byte changed */
    assert_int_equal(ledger_checksum_dir(d, h2, sizeof h2, NULL, &e), 0);
    assert_string_not_equal(h1, h2);
    write_file(p, "abc", 3);
    assert_int_equal(ledger_checksum_dir(d, h2, sizeof h2, NULL, &e), 0);
    assert_string_equal(h1, h2);
    snprintf(q, sizeof q, "%s/sub/state2.bin", d); /* renamed */
    assert_int_equal(rename(p, q), 0);
    assert_int_equal(ledger_checksum_dir(d, h2, sizeof h2, NULL, &e), 0);
    assert_string_not_equal(h1, h2);
    assert_int_equal(ledger_checksum_dir(d, h2, 8, NULL, &e), -1);
    snprintf(p, sizeof p, "%s/link", d);
    assert_int_equal(symlink("sub", p), 0);
    assert_int_equal(ledger_checksum_dir(d, h2, sizeof h2, NULL, &e), -1);
    assert_contains(e.msg, "link");
    snprintf(p, sizeof p, "%s/none", f->dir);
    assert_int_equal(ledger_checksum_dir(p, h2, sizeof h2, NULL, &e), -1);
    assert_contains(e.msg, p);
}

/* ---- the demo ledger for tests/ledger_cli.sh ---- */

static int populate(const char *path) {
    mill_err e = {{0}};
    ledger *l = NULL;
    int64_t run = 0, other = 0;
    if (ledger_open(&l, path, &e) ||
        ledger_run_create(l, "demo", "configs/runs/grpo-arith-demo.yaml", "steps: 8\n", "runs/demo", "colocated", 7, &run, &e) ||
        ledger_run_create(l, "empty", NULL, NULL, NULL, NULL, 0, &other, &e) || ledger_event(l, run, -1, "start", "demo run", &e))
        goto fail;
    for (long s = 1; s <= 8; s++) {
        char m[300];
        int n = snprintf(m, sizeof m,
                         "{\"reward\": %.3f, \"kl\": %.4f, \"entropy\": %.3f, \"clip_frac\": %.3f, \"response_len\": %.1f, "
                         "\"step_s\": 1.5, \"loss\": %.4f",
                         0.2 + 0.05 * (double)s, 0.001 * (double)s, 1.0 - 0.05 * (double)s, 0.01 * (double)s,
                         30.0 + (double)s, -0.01 * (double)s);
        if (s % 4 == 0) snprintf(m + n, sizeof m - (size_t)n, ", \"accuracy\": %.3f}", 0.3 + 0.02 * (double)s);
        else snprintf(m + n, sizeof m - (size_t)n, "}");
        uint64_t rng[4] = {(uint64_t)s, 1, 2, 3};
        ledger_sample x[4];
        for (int i = 0; i < 4; i++) {
            static const char *const texts[] = {"The answer is 12.", "12", "I think\nit is 13", "12 (because 7 + 5 = 12)"};
            x[i] = (ledger_sample){run, s, 1, 100 * s + i / 2, i % 2, i == 2 ? 0.0 : 1.0, 20, 8 + i, s - 1, "stop", texts[i]};
        }
        if (ledger_samples_add(l, x, 4, &e) || ledger_step_record(l, run, s, 1, 1.7e9, s, s * 2, rng, sizeof rng, m, &e))
            goto fail;
        if (s % 4 == 0 && ledger_checkpoint_add(l, run, s, s == 4 ? "runs/demo/step-000004" : "runs/demo/step-000008",
                                                s == 4 ? "fnv1a64:0123456789abcdef" : "", s == 4 ? 123456 : 0, s == 4, &e))
            goto fail;
    }
    if (ledger_event(l, run, 6, "fault", "rollout engine restarted", &e) || ledger_event(l, run, 8, "stop", "steps done", &e) ||
        ledger_run_set_status(l, run, "finished", &e))
        goto fail;
    ledger_close(l);
    return 0;
fail:
    fprintf(stderr, "test_ledger --populate: %s\n", e.msg);
    ledger_close(l);
    return 1;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--populate") == 0) return populate(argv[2]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_create_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_runs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_steps, setup, teardown),
        cmocka_unit_test_setup_teardown(test_samples, setup, teardown),
        cmocka_unit_test_setup_teardown(test_superseded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_checkpoints_events, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_files, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wal_reader, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kill9, setup, teardown),
        cmocka_unit_test_setup_teardown(test_checksum, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
