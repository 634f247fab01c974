/* launch/runs_cli.c — `mill runs`, `mill show`, `mill plot`: what the run ledger knows, as tables
 * and a picture. See runs_cli.h. Only reads the ledger. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* mkdtemp, posix_spawnp under -std=c11 */
#endif
#include "runs_cli.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../common/ledger.h"

extern char **environ;

/* ---- arguments ---- */

typedef struct {
    const char *run;     /* the one positional argument (NULL: none) */
    const char *ledger;  /* --ledger */
    const char *out;     /* --out */
    const char *samples; /* --samples */
} cli_args;

/* Options come as "--name VALUE"; `known` lists the ones this command takes. */
/* The last "controller HOST PID" event of a run (grpo.c records one at every start and resume). */
typedef struct {
    char host[256];
    long pid;
} cli_controller;

static int cli_controller_event(void *ctx, const ledger_event_row *row, mill_err *e) {
    (void)e;
    cli_controller *c = ctx;
    if (!strcmp(row->kind, "controller") && sscanf(row->message, "%255s %ld", c->host, &c->pid) != 2) c->pid = 0;
    return 0;
}

/* A run the ledger says is running whose controller was on this host and is gone (killed, the
 * machine restarted) is shown interrupted: `mill resume` picks it up. A controller on another host
 * cannot be checked from here: its run shows as recorded. */
static const char *cli_status(ledger *l, const ledger_run *r) {
    cli_controller c = {{0}, 0};
    char here[256] = "", path[64], cmd[256];
    mill_err e;
    if (strcmp(r->status, "running") || ledger_events_each(l, r->id, cli_controller_event, &c, &e) < 0 || c.pid <= 0 ||
        gethostname(here, sizeof here - 1) || strcmp(here, c.host))
        return r->status;
    if (kill((pid_t)c.pid, 0) && errno == ESRCH) return "interrupted";
    snprintf(path, sizeof path, "/proc/%ld/cmdline", c.pid); /* a pid taken since by another program */
    FILE *f = fopen(path, "rb");
    if (!f) return r->status;
    size_t n = fread(cmd, 1, sizeof cmd - 1, f);
    fclose(f);
    cmd[n] = 0;
    return strstr(cmd, "mill") ? r->status : "interrupted";
}

static int cli_parse(int argc, char **argv, const char *const *known, int want_run, cli_args *a, mill_err *e) {
    memset(a, 0, sizeof *a);
    for (int i = 2; i < argc; i++) {
        const char *s = argv[i];
        if (strncmp(s, "--", 2) != 0) {
            if (!want_run) return mill_errf(e, "unexpected argument \"%s\"", s);
            if (a->run) return mill_errf(e, "one run at a time (got \"%s\" and \"%s\")", a->run, s);
            a->run = s;
            continue;
        }
        int ok = 0;
        for (const char *const *k = known; *k; k++) ok |= strcmp(s, *k) == 0;
        if (!ok) return mill_errf(e, "unknown option %s for mill %s", s, argv[1]);
        if (i + 1 >= argc) return mill_errf(e, "option %s needs a value", s);
        const char *v = argv[++i];
        if (strcmp(s, "--ledger") == 0) a->ledger = v;
        else if (strcmp(s, "--out") == 0) a->out = v;
        else if (strcmp(s, "--samples") == 0) a->samples = v;
    }
    if (want_run && !a->run) return mill_errf(e, "mill %s needs a run name or id", argv[1]);
    if (!a->ledger) a->ledger = ledger_default_path();
    return 0;
}

static int cli_fail(const char *cmd, const mill_err *e) {
    fprintf(stderr, "mill %s: error: %s\n", cmd, e->msg);
    return 1;
}

/* ---- metrics ---- */

/* The main metrics, in the order tables show them; other keys follow in name order. */
static const char *const cli_main_keys[] = {"reward", "accuracy", "kl", "entropy", "clip_frac", "max_dlogp", "response_len", "step_s"};
#define CLI_N_MAIN ((int)(sizeof cli_main_keys / sizeof cli_main_keys[0]))

/* A metric's value as a number; 0 when it is absent or not a number. */
static int cli_metric(json_t *m, const char *key, double *v) {
    json_t *x = json_object_get(m, key);
    if (!json_is_number(x)) return 0;
    *v = json_number_value(x);
    return 1;
}

static void cli_fmt_num(double v, char *buf, size_t n) {
    if (isnan(v)) snprintf(buf, n, "nan");
    else if (v == floor(v) && fabs(v) < 1e9) snprintf(buf, n, "%.0f", v);
    else snprintf(buf, n, "%.4g", v);
}

/* Live steps with their parsed metrics, in step order. */
typedef struct {
    long step;
    int attempt;
    long weight_version;
    json_t *metrics;
} cli_step;

typedef struct {
    cli_step *v;
    int n, cap;
} cli_steps;

static int cli_collect_step(void *ctx, const ledger_step_row *r, mill_err *e) {
    cli_steps *s = ctx;
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 64;
        cli_step *g = realloc(s->v, sizeof *g * (size_t)cap);
        if (!g) return mill_errf(e, "out of memory reading steps");
        s->v = g;
        s->cap = cap;
    }
    json_t *m = json_loads(r->metrics_json, 0, NULL);
    if (!json_is_object(m)) { /* ledger_step_record checks this; a hand-edited row still must not crash */
        json_decref(m);
        m = json_object();
    }
    s->v[s->n++] = (cli_step){r->step, r->attempt, r->weight_version, m};
    return 0;
}

static void cli_steps_free(cli_steps *s) {
    for (int i = 0; i < s->n; i++) json_decref(s->v[i].metrics);
    free(s->v);
    memset(s, 0, sizeof *s);
}

static int cli_cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static int cli_is_main(const char *k) {
    for (int i = 0; i < CLI_N_MAIN; i++)
        if (strcmp(k, cli_main_keys[i]) == 0) return 1;
    return 0;
}

/* Every numeric metric key any step has: the main ones in their order, then the rest sorted.
 * *keys is malloc'd; the strings belong to the steps' JSON. */
static int cli_metric_keys(const cli_steps *s, const char ***keys, int *nk, mill_err *e) {
    int cap = CLI_N_MAIN, n = 0;
    const char **k = malloc(sizeof *k * (size_t)cap);
    if (!k) return mill_errf(e, "out of memory");
    for (int i = 0; i < CLI_N_MAIN; i++) {
        double v;
        for (int j = 0; j < s->n; j++)
            if (cli_metric(s->v[j].metrics, cli_main_keys[i], &v)) {
                k[n++] = cli_main_keys[i];
                break;
            }
    }
    int n_main = n;
    for (int j = 0; j < s->n; j++) {
        const char *key;
        json_t *val;
        json_object_foreach(s->v[j].metrics, key, val) {
            if (!json_is_number(val) || cli_is_main(key)) continue;
            int seen = 0;
            for (int i = n_main; i < n && !seen; i++) seen = strcmp(k[i], key) == 0;
            if (seen) continue;
            if (n == cap) {
                cap *= 2;
                const char **g = realloc(k, sizeof *k * (size_t)cap);
                if (!g) {
                    free(k);
                    return mill_errf(e, "out of memory");
                }
                k = g;
            }
            k[n++] = key;
        }
    }
    qsort(k + n_main, (size_t)(n - n_main), sizeof *k, cli_cmp_str);
    *keys = k;
    *nk = n;
    return 0;
}

/* ---- mill runs ---- */

/* The newest reward, and the newest accuracy (only eval steps may have one), from live steps. */
typedef struct {
    int have_reward, have_acc;
    double reward, acc;
} cli_latest;

static int cli_latest_step(void *ctx, const ledger_step_row *r, mill_err *e) {
    (void)e;
    cli_latest *x = ctx;
    json_t *m = json_loads(r->metrics_json, 0, NULL);
    if (!x->have_reward) x->have_reward = cli_metric(m, "reward", &x->reward);
    if (!x->have_acc) x->have_acc = cli_metric(m, "accuracy", &x->acc);
    json_decref(m);
    return x->have_reward && x->have_acc; /* > 0 stops: both found */
}

int cli_runs(int argc, char **argv) {
    static const char *const known[] = {"--ledger", NULL};
    mill_err e = {{0}};
    cli_args a;
    ledger *l = NULL;
    ledger_run *runs = NULL;
    int n = 0;
    if (cli_parse(argc, argv, known, 0, &a, &e) || ledger_open_existing(&l, a.ledger, &e) || ledger_run_list(l, &runs, &n, &e)) {
        ledger_close(l);
        return cli_fail(argv[1], &e);
    }
    if (n == 0) {
        printf("no runs in %s\n", a.ledger);
        ledger_close(l);
        return 0;
    }
    int wn = 4;
    for (int i = 0; i < n; i++)
        if ((int)strlen(runs[i].name) > wn) wn = (int)strlen(runs[i].name);
    printf("%4s  %-*s  %-11s  %6s  %8s  %8s  %-20s  %s\n", "id", wn, "name", "status", "steps", "reward", "accuracy", "created", "out_dir");
    int rc = 0;
    for (int i = 0; i < n; i++) {
        const ledger_run *r = &runs[i];
        cli_latest x = {0};
        int s = ledger_steps_each(l, r->id, 1, cli_latest_step, &x, &e);
        if (s < 0) {
            rc = cli_fail(argv[1], &e);
            break;
        }
        char steps[24], rew[32] = "-", acc[32] = "-";
        if (r->last_step >= 0) snprintf(steps, sizeof steps, "%ld", r->last_step);
        else snprintf(steps, sizeof steps, "-");
        if (x.have_reward) snprintf(rew, sizeof rew, "%.4f", x.reward);
        if (x.have_acc) snprintf(acc, sizeof acc, "%.4f", x.acc);
        printf("%4lld  %-*s  %-11s  %6s  %8s  %8s  %-20s  %s\n", (long long)r->id, wn, r->name, cli_status(l, r), steps,
               rew, acc, r->created_at, r->out_dir[0] ? r->out_dir : "-");
    }
    free(runs);
    ledger_close(l);
    return rc;
}

/* ---- mill show ---- */

static int cli_print_checkpoint(void *ctx, const ledger_checkpoint_row *r, mill_err *e) {
    (void)e;
    int *n = ctx;
    if ((*n)++ == 0) printf("checkpoints:\n  %6s  %-8s  %-24s  %12s  %s\n", "step", "complete", "checksum", "bytes", "path");
    printf("  %6ld  %-8s  %-24s  %12lld  %s\n", r->step, r->complete ? "yes" : "no", r->checksum[0] ? r->checksum : "-",
           (long long)r->bytes, r->path);
    return 0;
}

static int cli_print_event(void *ctx, const ledger_event_row *r, mill_err *e) {
    (void)e;
    int *n = ctx;
    if ((*n)++ == 0) printf("events:\n  %-20s  %6s  %-10s  %s\n", "at", "step", "kind", "message");
    char step[24] = "-";
    if (r->step >= 0) snprintf(step, sizeof step, "%ld", r->step);
    printf("  %-20s  %6s  %-10s  %s\n", r->at, step, r->kind, r->message);
    return 0;
}

/* One line of at most max bytes of s: newlines and tabs shown as \n and \t, cut (not inside a UTF-8
 * character) with "..." when longer. */
static void cli_one_line(const char *s, char *out, size_t max) {
    size_t o = 0;
    for (; *s && o + 2 < max; s++) {
        if (*s == '\n' || *s == '\t' || *s == '\r') {
            out[o++] = '\\';
            out[o++] = *s == '\n' ? 'n' : *s == '\t' ? 't' : 'r';
        } else if ((unsigned char)*s < ' ') {
            out[o++] = '?';
        } else {
            out[o++] = *s;
        }
    }
    if (*s) {
        o = o > 3 ? o - 3 : 0;
        while (o > 0 && ((unsigned char)out[o] & 0xC0) == 0x80) o--; /* back to a character start */
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = 0;
}

static int cli_print_sample(void *ctx, const ledger_sample *s, mill_err *e) {
    (void)e;
    int *n = ctx;
    if ((*n)++ == 0)
        printf("samples (most recent first):\n  %6s  %3s  %7s  %6s  %8s  %6s  %-7s  %s\n", "step", "att", "prompt", "sample",
               "reward", "len", "finish", "text");
    char text[84], rew[32];
    cli_one_line(s->text ? s->text : "", text, sizeof text);
    cli_fmt_num(s->reward, rew, sizeof rew);
    printf("  %6ld  %3d  %7ld  %6d  %8s  %6d  %-7s  %s\n", s->step, s->attempt, s->prompt_id, s->sample_idx, rew,
           s->response_len, s->finish ? s->finish : "-", text);
    return 0;
}

static void cli_print_steps(const cli_steps *s, const char **keys, int nk) {
    printf("steps:\n  %6s  %3s  %7s", "step", "att", "weights");
    int w[64];
    for (int i = 0; i < nk && i < 64; i++) {
        w[i] = (int)strlen(keys[i]) > 10 ? (int)strlen(keys[i]) : 10;
        printf("  %*s", w[i], keys[i]);
    }
    printf("\n");
    for (int j = 0; j < s->n; j++) {
        printf("  %6ld  %3d  %7ld", s->v[j].step, s->v[j].attempt, s->v[j].weight_version);
        for (int i = 0; i < nk && i < 64; i++) {
            char buf[32] = "-";
            double v;
            if (cli_metric(s->v[j].metrics, keys[i], &v)) cli_fmt_num(v, buf, sizeof buf);
            printf("  %*s", w[i], buf);
        }
        printf("\n");
    }
}

int cli_show(int argc, char **argv) {
    static const char *const known[] = {"--ledger", "--samples", NULL};
    mill_err e = {{0}};
    cli_args a;
    ledger *l = NULL;
    ledger_run r;
    cli_steps steps = {0};
    const char **keys = NULL;
    int nk = 0, rc = 1;
    long nsamples = 0;
    if (cli_parse(argc, argv, known, 1, &a, &e)) goto out;
    if (a.samples) {
        char *end;
        errno = 0;
        nsamples = strtol(a.samples, &end, 10);
        if (errno || *end || end == a.samples || nsamples < 0 || nsamples > 1000000) {
            mill_errf(&e, "--samples must be a count in [0, 1000000], not \"%s\"", a.samples);
            goto out;
        }
    }
    if (ledger_open_existing(&l, a.ledger, &e) || ledger_run_find(l, a.run, &r, &e)) goto out;
    if (ledger_steps_each(l, r.id, 0, cli_collect_step, &steps, &e) < 0 || cli_metric_keys(&steps, &keys, &nk, &e)) goto out;

    printf("run %lld  %s\n", (long long)r.id, r.name);
    printf("  status     %s\n  created    %s\n  recipe     %s\n  out_dir    %s\n  layout     %s\n  seed       %llu\n",
           cli_status(l, &r), r.created_at, r.recipe_path[0] ? r.recipe_path : "-", r.out_dir[0] ? r.out_dir : "-",
           r.layout[0] ? r.layout : "-", (unsigned long long)r.seed);
    if (r.last_step >= 0) printf("  last step  %ld\n", r.last_step);
    else printf("  last step  - (none recorded)\n");
    if (steps.n) cli_print_steps(&steps, keys, nk);
    else printf("steps: none\n");
    int nc = 0, ne = 0, ns = 0;
    if (ledger_checkpoints_each(l, r.id, cli_print_checkpoint, &nc, &e) < 0) goto out;
    if (!nc) printf("checkpoints: none\n");
    if (ledger_events_each(l, r.id, cli_print_event, &ne, &e) < 0) goto out;
    if (!ne) printf("events: none\n");
    if (nsamples > 0) {
        if (ledger_samples_recent(l, r.id, (int)nsamples, cli_print_sample, &ns, &e) < 0) goto out;
        if (!ns) printf("samples: none\n");
    }
    rc = 0;
out:
    free(keys);
    cli_steps_free(&steps);
    ledger_close(l);
    return rc ? cli_fail(argv[1], &e) : 0;
}

/* ---- mill plot ---- */

static const char *const cli_plot_keys[] = {"reward", "accuracy", "kl", "entropy", "response_len"};
#define CLI_N_PLOT 5

/* s inside a gnuplot single-quoted string: a quote is written twice. */
static void cli_gp_quoted(FILE *f, const char *s) {
    fputc('\'', f);
    for (; *s; s++) {
        if (*s == '\'') fputc('\'', f);
        fputc(*s, f);
    }
    fputc('\'', f);
}

/* Runs `gnuplot script`, its stderr into errpath; 0 when it exits 0. */
static int cli_run_gnuplot(const char *script, const char *errpath, mill_err *e) {
    posix_spawn_file_actions_t fa;
    if (posix_spawn_file_actions_init(&fa) != 0) return mill_errf(e, "cannot start gnuplot: out of memory");
    int rc = posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    if (!rc) rc = posix_spawn_file_actions_addopen(&fa, 2, errpath, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (rc) {
        posix_spawn_file_actions_destroy(&fa);
        return mill_errf(e, "cannot start gnuplot: %s", strerror(rc));
    }
    char *const args[] = {"gnuplot", (char *)script, NULL};
    pid_t pid;
    rc = posix_spawnp(&pid, "gnuplot", &fa, NULL, args, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc == ENOENT) return mill_errf(e, "gnuplot is not installed (not on PATH): install gnuplot-nox, e.g. apt-get install gnuplot-nox");
    if (rc) return mill_errf(e, "cannot start gnuplot: %s", strerror(rc));
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return mill_errf(e, "waiting for gnuplot: %s", strerror(errno));
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return 0;
    char line[300] = "";
    FILE *f = fopen(errpath, "r");
    if (f) { /* gnuplot's last non-empty line says what went wrong */
        char buf[300];
        while (fgets(buf, sizeof buf, f))
            if (buf[strspn(buf, " \t\r\n")]) memcpy(line, buf, sizeof line);
        fclose(f);
        line[strcspn(line, "\r\n")] = 0;
    }
    if (WIFSIGNALED(status)) return mill_errf(e, "gnuplot was killed by signal %d", WTERMSIG(status));
    return mill_errf(e, "gnuplot failed (exit %d): %s", WEXITSTATUS(status), line[0] ? line : "no message");
}

static int cli_plot_write(const cli_steps *s, const char *run_name, const char *data, const char *script, const char *png,
                          mill_err *e) {
    int have[CLI_N_PLOT], np = 0;
    for (int i = 0; i < CLI_N_PLOT; i++) {
        have[i] = 0;
        double v;
        for (int j = 0; j < s->n && !have[i]; j++) have[i] = cli_metric(s->v[j].metrics, cli_plot_keys[i], &v);
        np += have[i];
    }
    if (!np) return mill_errf(e, "run %s has none of reward, accuracy, kl, entropy, response_len in its step metrics", run_name);
    FILE *f = fopen(data, "w");
    if (!f) return mill_errf(e, "%s: cannot write: %s", data, strerror(errno));
    fprintf(f, "# step");
    for (int i = 0; i < CLI_N_PLOT; i++) fprintf(f, " %s", cli_plot_keys[i]);
    fprintf(f, "\n");
    for (int j = 0; j < s->n; j++) {
        fprintf(f, "%ld", s->v[j].step);
        for (int i = 0; i < CLI_N_PLOT; i++) {
            double v;
            if (cli_metric(s->v[j].metrics, cli_plot_keys[i], &v) && isfinite(v)) fprintf(f, " %.9g", v);
            else fprintf(f, " ?"); /* a step without this metric (accuracy: not an eval step) */
        }
        fprintf(f, "\n");
    }
    if (fclose(f) != 0) return mill_errf(e, "%s: cannot write: %s", data, strerror(errno));

    f = fopen(script, "w");
    if (!f) return mill_errf(e, "%s: cannot write: %s", script, strerror(errno));
    /* pngcairo draws smoother lines; plain png (libgd) is the fallback on builds without cairo. */
    fprintf(f, "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
               "  set terminal pngcairo noenhanced size 900,%d font ',9'\n"
               "} else {\n"
               "  set terminal png noenhanced size 900,%d\n"
               "}\n",
            60 + 220 * np, 60 + 220 * np);
    fprintf(f, "set output ");
    cli_gp_quoted(f, png);
    fprintf(f, "\nset datafile missing '?'\nset grid\nset key off\nset xlabel 'step'\n");
    /* one step axis for every panel, also for metrics recorded only at some steps */
    long lo = s->v[0].step, hi = s->v[s->n - 1].step;
    if (hi == lo) hi = lo + 1;
    fprintf(f, "set xrange [%ld:%ld]\n", lo, hi);
    fprintf(f, "set multiplot layout %d,1 title ", np);
    char title[200];
    snprintf(title, sizeof title, "mill run %s", run_name);
    cli_gp_quoted(f, title);
    fprintf(f, "\n");
    for (int i = 0; i < CLI_N_PLOT; i++) {
        if (!have[i]) continue;
        fprintf(f, "set ylabel '%s'\nplot ", cli_plot_keys[i]);
        cli_gp_quoted(f, data);
        fprintf(f, " using 1:%d with linespoints pt 7 ps 0.6 lw 1.5\n", i + 2);
    }
    fprintf(f, "unset multiplot\nset output\n");
    if (fclose(f) != 0) return mill_errf(e, "%s: cannot write: %s", script, strerror(errno));
    return 0;
}

int cli_plot(int argc, char **argv) {
    static const char *const known[] = {"--ledger", "--out", NULL};
    mill_err e = {{0}};
    cli_args a;
    ledger *l = NULL;
    ledger_run r;
    cli_steps steps = {0};
    int rc = 1;
    char dir[4096] = "", data[4200] = "", script[4200] = "", errp[4200] = "", tmp_png[4200] = "";
    if (cli_parse(argc, argv, known, 1, &a, &e)) goto out;
    if (!a.out) {
        mill_errf(&e, "mill plot needs --out FILE.png");
        goto out;
    }
    if (ledger_open_existing(&l, a.ledger, &e) || ledger_run_find(l, a.run, &r, &e) ||
        ledger_steps_each(l, r.id, 0, cli_collect_step, &steps, &e) < 0)
        goto out;
    if (!steps.n) {
        mill_errf(&e, "run %s has no steps recorded in %s, nothing to plot", r.name, a.ledger);
        goto out;
    }
    const char *tmpd = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/mill-plot-XXXXXX", tmpd && *tmpd ? tmpd : "/tmp");
    if (!mkdtemp(dir)) {
        mill_errf(&e, "%s: cannot make a temporary directory: %s", dir, strerror(errno));
        dir[0] = 0;
        goto out;
    }
    snprintf(data, sizeof data, "%s/metrics.dat", dir);
    snprintf(script, sizeof script, "%s/plot.gp", dir);
    snprintf(errp, sizeof errp, "%s/gnuplot.err", dir);
    /* gnuplot writes beside the target and the file is renamed into place only once it succeeded. */
    if (snprintf(tmp_png, sizeof tmp_png, "%s.tmp", a.out) >= (int)sizeof tmp_png) {
        mill_errf(&e, "%s: path too long", a.out);
        goto out;
    }
    if (cli_plot_write(&steps, r.name, data, script, tmp_png, &e) || cli_run_gnuplot(script, errp, &e)) goto out;
    struct stat st;
    if (stat(tmp_png, &st) != 0 || st.st_size == 0) {
        mill_errf(&e, "%s: gnuplot wrote no image", a.out);
        goto out;
    }
    if (rename(tmp_png, a.out) != 0) {
        mill_errf(&e, "%s: cannot write: %s", a.out, strerror(errno));
        goto out;
    }
    printf("%s: %d steps of run %s\n", a.out, steps.n, r.name);
    rc = 0;
out:
    if (rc && tmp_png[0]) unlink(tmp_png);
    if (dir[0]) {
        unlink(data);
        unlink(script);
        unlink(errp);
        rmdir(dir);
    }
    cli_steps_free(&steps);
    ledger_close(l);
    return rc ? cli_fail(argv[1], &e) : 0;
}
