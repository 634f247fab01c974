/* common/ledger.h — the run ledger: one SQLite file that records every GRPO run, so any run can be
 * shown, plotted and resumed from it.
 * Owns: the ledger schema (below), opening and checking a ledger file, the writes a run makes (run,
 * step state and metrics, samples, checkpoints, events) and the reads `mill runs / show / plot /
 * resume` need; and ledger_checksum_dir, the checksum recorded with each checkpoint.
 *
 * Schema (version LEDGER_SCHEMA_VERSION, kept in PRAGMA user_version; PRAGMA application_id is
 * LEDGER_APP_ID so a mill ledger is told apart from any other SQLite file):
 *   runs(id INTEGER PRIMARY KEY, name TEXT UNIQUE, created_at, status, recipe_path, recipe_text,
 *        out_dir, layout, seed, last_step)   status: running | finished | failed | interrupted
 *   steps(run_id, step, attempt, started_at, finished_at, weight_version, data_cursor,
 *         rng_state BLOB, metrics TEXT (a JSON object), superseded, PRIMARY KEY(run_id, step, attempt))
 *   samples(run_id, step, attempt, prompt_id, sample_idx, reward, prompt_len, response_len,
 *           weight_version, finish, text, superseded, UNIQUE(run_id, step, attempt, prompt_id, sample_idx))
 *   checkpoints(id, run_id, step, path, checksum, bytes, complete, created_at, UNIQUE(run_id, path))
 *   events(id, run_id, at, step, kind, message)
 * Times are UTC text, "YYYY-MM-DDTHH:MM:SSZ". Every child row references runs(id).
 *
 * Attempts: a resumed run re-does the steps after its checkpoint under a new attempt number
 * (ledger_max_attempt + 1), so nothing recorded is overwritten: the rows of earlier attempts it
 * goes back past are marked superseded = 1 (ledger_supersede), so `WHERE superseded = 0` sees each
 * step and its samples once; the reads below that say "live" return only those rows, the run's one
 * effective history. Version 1 ledgers gain the column on open, filled by the rule version 1 read
 * them with (a row is stale when a later attempt began at or before its step).
 *
 * Durability: WAL with synchronous=NORMAL. A write is one transaction; a process killed at any
 * point loses nothing it committed, and a power loss may lose the last commits but never corrupts
 * the file. Several processes may read while one writes (busy_timeout waits out short locks).
 *
 * Errors follow common/err.h: 0 on success, -1 with one line in the mill_err naming the ledger
 * path and the run, step or field at fault. A ledger handle is used by one thread at a time. */
#ifndef MILL_LEDGER_H
#define MILL_LEDGER_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define LEDGER_SCHEMA_VERSION 2
#define LEDGER_APP_ID 0x6d696c6c /* "mill" */
/* Where mill looks when no --ledger is given: $MILL_LEDGER if set, else this, relative to the
 * working directory. */
#define LEDGER_DEFAULT_PATH "runs/ledger.db"

typedef struct ledger ledger;

/* Opens the ledger at path, creating the file (and its parent directories) with the schema when it
 * does not exist. Fails, naming the path, on a file that is not SQLite, is truncated, is an SQLite
 * database that is not a mill ledger, or has a newer schema than this build knows. */
int ledger_open(ledger **out, const char *path, mill_err *e);
/* The same for a ledger that must already exist (the read-only commands): a missing file is an
 * error "no ledger at PATH", and nothing is created. */
int ledger_open_existing(ledger **out, const char *path, mill_err *e);
void ledger_close(ledger *l); /* NULL is fine */
const char *ledger_path(const ledger *l);
/* $MILL_LEDGER if set and non-empty, else LEDGER_DEFAULT_PATH. */
const char *ledger_default_path(void);

/* ---- runs ---- */

typedef struct {
    int64_t id;
    char name[128];
    char status[16];
    char created_at[32];
    char recipe_path[1024];
    char out_dir[1024];
    char layout[32];
    uint64_t seed;
    long last_step; /* the last step recorded (-1: none yet) */
} ledger_run;

/* A new run with status "running". name NULL: "run-YYYYmmdd-HHMMSS" (local time), with "-2", "-3",
 * ... appended while taken. A given name must be new, at most 127 bytes, printable without spaces
 * and not all digits (those are run ids). recipe_path/out_dir/layout may be NULL. */
int ledger_run_create(ledger *l, const char *name, const char *recipe_path, const char *recipe_text,
                      const char *out_dir, const char *layout, uint64_t seed, int64_t *run_id, mill_err *e);
/* By name, or by id when name_or_id is all digits. Not found: "no run named X in PATH". */
int ledger_run_find(ledger *l, const char *name_or_id, ledger_run *out, mill_err *e);
/* All runs, oldest first; *runs is malloc'd (free it), *n may be 0. */
int ledger_run_list(ledger *l, ledger_run **runs, int *n, mill_err *e);
/* The recipe YAML as recorded at creation; *recipe_text is malloc'd ("" when none was given). */
int ledger_run_recipe(ledger *l, int64_t run_id, char **recipe_text, mill_err *e);
/* status: running | finished | failed | interrupted. */
int ledger_run_set_status(ledger *l, int64_t run_id, const char *status, mill_err *e);

/* ---- steps ---- */

/* Records a finished step and sets the run's last_step to it, in one transaction. started_at is
 * wall-clock seconds since the epoch (<= 0: unknown); the finish time is now. rng_state is opaque
 * (e.g. the 32 bytes of a xoshiro state; NULL/0: none). metrics_json must be a JSON object (NULL:
 * "{}"). A step already recorded under the same attempt is an error. */
int ledger_step_record(ledger *l, int64_t run_id, long step, int attempt, double started_at, long weight_version,
                       int64_t data_cursor, const void *rng_state, size_t rng_len, const char *metrics_json,
                       mill_err *e);
/* The saved state of a step, from the latest attempt that recorded it: data cursor, rng state
 * (copied into rng_state, at most rng_cap bytes; a longer one is an error), its length and the
 * attempt. Returns 0 found, 1 when the step was never recorded, -1 on error. */
int ledger_step_state(ledger *l, int64_t run_id, long step, int64_t *data_cursor, void *rng_state, size_t rng_cap,
                      size_t *rng_len, int *attempt, mill_err *e);
/* The highest attempt number recorded for the run in steps or samples (0 when none). */
int ledger_max_attempt(ledger *l, int64_t run_id, int *attempt, mill_err *e);
/* Attempt `attempt` goes back to from_step: the steps and samples of earlier attempts at from_step or
 * later are superseded (kept, marked), so the live rows are each step once. One transaction. */
int ledger_supersede(ledger *l, int64_t run_id, long from_step, int attempt, mill_err *e);

typedef struct {
    long step;
    int attempt;
    long weight_version;
    int64_t data_cursor;
    const char *started_at, *finished_at; /* "" when unknown */
    const char *metrics_json;             /* a JSON object */
} ledger_step_row;
/* Calls fn for each live step of the run in step order (descending: newest first). Strings are
 * valid during the call only. fn returns 0 to go on, > 0 to stop early (returned), < 0 on an error
 * it wrote into e (returned). */
typedef int (*ledger_step_fn)(void *ctx, const ledger_step_row *row, mill_err *e);
int ledger_steps_each(ledger *l, int64_t run_id, int descending, ledger_step_fn fn, void *ctx, mill_err *e);

/* ---- samples ---- */

typedef struct {
    int64_t run_id;
    long step;
    int attempt;
    long prompt_id;
    int sample_idx;
    double reward;
    int prompt_len, response_len;
    long weight_version;
    const char *finish; /* e.g. "stop", "length"; NULL: none */
    const char *text;   /* the response text; NULL: none */
} ledger_sample;

/* Inserts n samples in one transaction: a duplicate (run, step, attempt, prompt, sample) is an error
 * naming it, and then none of the n is kept. */
int ledger_samples_add(ledger *l, const ledger_sample *s, int n, mill_err *e);
/* Calls fn for the run's `limit` most recent samples (highest step, attempt, prompt, sample first).
 * Strings are valid during the call only; fn returns as for ledger_steps_each. */
typedef int (*ledger_sample_fn)(void *ctx, const ledger_sample *s, mill_err *e);
int ledger_samples_recent(ledger *l, int64_t run_id, int limit, ledger_sample_fn fn, void *ctx, mill_err *e);

/* ---- checkpoints ---- */

/* Records (or updates, for the same run and path) a checkpoint. complete = 1 only once the directory
 * is fsynced and renamed into place; a checkpoint is recorded incomplete first when its writing may
 * be interrupted. */
int ledger_checkpoint_add(ledger *l, int64_t run_id, long step, const char *path, const char *checksum, int64_t bytes,
                          int complete, mill_err *e);
/* The complete checkpoint of the highest step (the latest recorded among equals): its step, path and
 * checksum (either buffer may be NULL). Returns 0 found, 1 none, -1 on error. */
int ledger_checkpoint_latest(ledger *l, int64_t run_id, long *step, char *path, size_t cap, char *checksum,
                             size_t ccap, mill_err *e);

typedef struct {
    long step;
    int complete;
    int64_t bytes;
    const char *path, *checksum, *created_at;
} ledger_checkpoint_row;
typedef int (*ledger_checkpoint_fn)(void *ctx, const ledger_checkpoint_row *row, mill_err *e);
/* In step order; fn as for ledger_steps_each. */
int ledger_checkpoints_each(ledger *l, int64_t run_id, ledger_checkpoint_fn fn, void *ctx, mill_err *e);

/* ---- events ---- */

/* kind: e.g. start, resume, fault, restart, stop (any non-empty word); step < 0: not tied to a step. */
int ledger_event(ledger *l, int64_t run_id, long step, const char *kind, const char *message, mill_err *e);

typedef struct {
    const char *at, *kind, *message;
    long step; /* -1: none */
} ledger_event_row;
typedef int (*ledger_event_fn)(void *ctx, const ledger_event_row *row, mill_err *e);
/* In the order they were recorded; fn as for ledger_steps_each. */
int ledger_events_each(ledger *l, int64_t run_id, ledger_event_fn fn, void *ctx, mill_err *e);

/* ---- checksums ---- */

/* A checksum of a regular file (64-bit FNV-1a over its bytes) or of a directory tree (64-bit FNV-1a
 * over, for each regular file, depth first with each directory's entries in byte-wise name order:
 * its path relative to the top, a NUL, its size as 8 bytes little-endian and its bytes). Renaming, adding, removing or changing any file changes it. Written as
 * "fnv1a64:" + 16 hex digits (cap >= LEDGER_CHECKSUM_LEN); *bytes (may be NULL) gets the total file
 * size. Symbolic links and other non-regular files are an error (a checkpoint holds none).
 * FNV-1a is not cryptographic: it detects corruption and truncation, not tampering. It runs at
 * roughly 1 GB/s, one core. */
#define LEDGER_CHECKSUM_LEN 25
int ledger_checksum_dir(const char *path, char *hex, size_t cap, int64_t *bytes, mill_err *e);

#endif
