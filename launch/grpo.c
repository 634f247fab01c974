#include "grpo.h"
#include "ranks.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <jansson.h>
#include <zmq.h>

#include "../algos/arith.h"
#include "../algos/dataset.h"
#include "../algos/reward_remote.h"
#include "../algos/verify.h"
#include "../common/config.h"
#include "../common/ledger.h"
#include "../common/tokenizer.h"
#include "../common/wire.h"
#include "../rollout/generate.h"
#include "procs.h"

static double wall(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ================================================================== engines */

static int engine_wait_ready(procs *ps, proc *p, int idx, double tmo, mill_err *e) {
    char what[64];
    snprintf(what, sizeof what, "rollout engine %d", idx);
    return proc_rpc_simple(ps, p, what, "health", "health_ok", tmo, e);
}

static int engine_start(procs *ps, const grpo_recipe *r, const char *run_dir, const char *model, int i, mill_err *e) {
    proc *p = &ps->engines[i];
    snprintf(p->log, sizeof p->log, "%s/logs/engine-%d.log", run_dir, i);
    if (!p->addr[0]) {
        if (r->disaggregated) {
            int port;
            if (proc_free_port(&port, e)) return -1;
            snprintf(p->addr, sizeof p->addr, "tcp://127.0.0.1:%d", port);
        } else {
            snprintf(p->addr, sizeof p->addr, "ipc://%s/engine-%d.sock", run_dir, i);
        }
    }
    char cache[32], tp[16], ep[16];
    snprintf(cache, sizeof cache, "%g", r->cache_mb);
    snprintf(tp, sizeof tp, "%d", r->engine_par.tp);
    snprintf(ep, sizeof ep, "%d", r->engine_par.ep);
    /* an engine of several ranks starts them itself (mpiexec); its rank 0 serves the address */
    const char *args[] = {"mill", "rollout-server", "--model", model, "--bind", p->addr, "--cache-mb", cache,
                          "--tp", tp, "--ep", ep, "--device", r->rollout_gpu ? "cuda" : "cpu", "--exact",
                          r->exact ? "on" : "off",
                          ps->curve.on ? "--curve" : NULL, ps->curve_file, NULL};
    if (proc_set_argv(p, args, e) || proc_spawn(p, ps->exe, e) || proc_connect(p, ps->zctx, &ps->curve, e))
        return -1;
    return engine_wait_ready(ps, p, i, 60, e);
}

/* ================================================================== the run */

typedef struct {
    const grpo_recipe *r;
    ledger *lg;
    int64_t run_id;
    int attempt;
    procs ps;
    dataset *data, *eval_data;
    tokenizer *tok;
    dsv4_config cfg;
    char run_dir[1024];
    long version; /* weights the engines hold */
    int64_t cursor; /* prompts drawn */
    int fault_done; /* debug.kill_engine_at_step has fired */
    int engine_restarts; /* engines started again in this run */
} run_ctx;

typedef struct {
    int n;                 /* samples */
    int *prompt_of;        /* [n] index into the batch's prompts */
    int32_t **tokens;      /* [n] response tokens */
    float **logprobs;      /* [n] */
    int32_t **routing;     /* [n] [L, prompt_len + out, K] widened */
    int *out_len, *finish, *got;
    long *version;
} samples;

static void samples_free(samples *s) {
    for (int i = 0; i < s->n; i++) {
        if (s->tokens) free(s->tokens[i]);
        if (s->logprobs) free(s->logprobs[i]);
        if (s->routing) free(s->routing[i]);
    }
    free(s->prompt_of);
    free(s->tokens);
    free(s->logprobs);
    free(s->routing);
    free(s->out_len);
    free(s->finish);
    free(s->got);
    free(s->version);
    memset(s, 0, sizeof *s);
}

typedef struct {
    int n;                 /* prompts */
    int32_t **ids;         /* [n] bos + prompt tokens */
    int *len;
    const dataset_row **row;
} prompt_set;

static void prompts_free(prompt_set *p) {
    for (int i = 0; i < p->n; i++)
        if (p->ids) free(p->ids[i]);
    free(p->ids);
    free(p->len);
    free(p->row);
    memset(p, 0, sizeof *p);
}

/* A chat prompt's text holds its markers (BOS included) and is tokenized as the release's pipeline
 * does (added tokens matched); a plain prompt is BOS + its text, in which nothing is special. */
static int prompt_encode(run_ctx *c, prompt_set *ps, int i, const char *text, mill_err *e) {
    size_t n = strlen(text);
    int cap = (int)(3 * n + 2); /* room for U+FFFD's three bytes per bad byte */
    ps->ids[i] = malloc(sizeof(int32_t) * (size_t)cap);
    if (!ps->ids[i]) return mill_errf(e, "out of memory");
    int nt, bos = tokenizer_bos(c->tok), lead = c->r->chat.kind == CHAT_NONE && bos >= 0;
    if (lead) ps->ids[i][0] = bos;
    if (c->r->chat.kind != CHAT_NONE ? tokenizer_encode_hf(c->tok, text, n, 0, ps->ids[i], cap, &nt, e)
                                     : tokenizer_encode(c->tok, text, n, ps->ids[i] + lead, cap - lead, &nt, e))
        return -1;
    ps->len[i] = nt + lead;
    return 0;
}

static int prompts_alloc(prompt_set *p, int n, mill_err *e) {
    memset(p, 0, sizeof *p);
    p->n = n;
    p->ids = calloc((size_t)n, sizeof *p->ids);
    p->len = calloc((size_t)n, sizeof(int));
    p->row = calloc((size_t)n, sizeof *p->row);
    if (!p->ids || !p->len || !p->row) return mill_errf(e, "out of memory");
    return 0;
}

/* Sends each engine its contiguous block of prompts as one batch request (so a sample's seed,
 * base + its index in the whole batch, does not depend on how many engines there are). */
static int send_block(run_ctx *c, int j, const prompt_set *pp, int G, float temp, uint64_t seed, int maxn,
                      uint64_t *req_id, mill_err *e) {
    int E = c->ps.n_engines, p0 = (int)((long)pp->n * j / E), p1 = (int)((long)pp->n * (j + 1) / E);
    *req_id = 0;
    if (p1 <= p0) return 0;
    long total = 0;
    for (int p = p0; p < p1; p++) total += pp->len[p];
    int32_t *flat = malloc(sizeof(int32_t) * (size_t)total), *lens = malloc(sizeof(int32_t) * (size_t)(p1 - p0));
    wire_builder *b = proc_msg(&c->ps, "generate");
    int rc = -1;
    if (!flat || !lens || !b) {
        mill_errf(e, "out of memory");
        goto out;
    }
    long off = 0;
    for (int p = p0; p < p1; p++) {
        memcpy(flat + off, pp->ids[p], sizeof(int32_t) * (size_t)pp->len[p]);
        off += pp->len[p];
        lens[p - p0] = pp->len[p];
    }
    int64_t sh = total, shl = p1 - p0;
    wire_put_int(b, "n", G);
    wire_put_int(b, "max_new_tokens", maxn);
    wire_put_num(b, "temperature", temp);
    wire_put_num(b, "top_p", c->r->top_p);
    wire_put_int(b, "seed", (int64_t)(seed + (uint64_t)p0 * G));
    int64_t stop = tokenizer_eos(c->tok);
    wire_put_int_array(b, "stop", &stop, 1);
    if (wire_put_frame(b, "prompts", DTYPE_I32, 1, &sh, flat, e) ||
        wire_put_frame(b, "prompt_lens", DTYPE_I32, 1, &shl, lens, e))
        goto out;
    *req_id = c->ps.next_id - 1;
    rc = wire_send(c->ps.engines[j].sock, NULL, 0, b, e);
out:
    wire_builder_free(b);
    free(flat);
    free(lens);
    return rc;
}

/* Before the n-th restart (from 0): 0.5 s doubling to at most 30 s, so a fault that recurs at once
 * (a full disk, a bad host) does not spin. */
static void backoff(int n) {
    double s = 0.5 * (double)(1L << (n < 6 ? n : 6));
    struct timespec ts = {(time_t)(s < 30 ? s : 30), (long)((s < 30 ? s - (double)(long)s : 0) * 1e9)};
    nanosleep(&ts, NULL);
}

/* Restarts engine j after a fault (our own engines only; an external one is the operator's to
 * restart, and at most rollout.max_restarts in a run) and records it. The caller gives it weights. */
static int engine_restart(run_ctx *c, int j, long step, const char *why, mill_err *e) {
    proc *p = &c->ps.engines[j];
    char msg[1200];
    snprintf(msg, sizeof msg, "rollout engine %d: %s", j, why);
    mill_err le;
    ledger_event(c->lg, c->run_id, step, "fault", msg, &le);
    if (p->pid == 0) return mill_errf(e, "%s (an external engine: restart it, then mill resume)", msg);
    if (c->engine_restarts == c->r->engine_max_restarts)
        return mill_errf(e, "%s; engines were restarted %d times in this run (rollout.max_restarts)", msg,
                         c->engine_restarts);
    fprintf(stderr, "\nmill: %s; restarting it\n", msg);
    proc_stop(p);
    backoff(c->engine_restarts++);
    if (proc_spawn(p, c->ps.exe, e) || proc_connect(p, c->ps.zctx, &c->ps.curve, e) || engine_wait_ready(&c->ps, p, j, 60, e))
        return mill_err_wrap(e, "restarting rollout engine %d", j);
    ledger_event(c->lg, c->run_id, step, "restart", msg, &le);
    return 0;
}

static int publish_to(run_ctx *c, const char *addrs, double *secs, mill_err *e) {
    wire_builder *b = proc_msg(&c->ps, "publish");
    wire_msg *r;
    wire_raw *raw;
    if (!b) return mill_errf(e, "out of memory");
    wire_put_str(b, "engines", addrs);
    /* trainer and engine on this host's GPU: the engine copies the weights device to device */
    wire_put_bool(b, "ipc", !c->r->disaggregated && c->r->train_gpu && c->r->rollout_gpu);
    /* an engine acknowledges each bucket within its heartbeat, or the publish fails (and publish()
     * finds the wedged engine) */
    wire_put_num(b, "timeout_s", c->r->rollout_heartbeat_s > 0 ? c->r->rollout_heartbeat_s : 60);
    if (proc_rpc(&c->ps, &c->ps.trainer, "trainer worker", b, "published", 600, &r, &raw, e)) return -1;
    int64_t v;
    double s = 0;
    int x = wire_get_int(r, "version", 1, 0, 0, INT64_MAX, &v, e) || wire_get_num(r, "seconds", 0, 0, 0, 1e9, &s, e);
    wire_msg_free(r);
    wire_recv_free(raw);
    if (x) return -1;
    c->version = (long)v;
    if (secs) *secs = s;
    return 0;
}

/* Engine j dead, or (ours, with a heartbeat) not answering health within it: restarted. */
static int engine_ensure(run_ctx *c, int j, long step, mill_err *e) {
    proc *p = &c->ps.engines[j];
    mill_err pe;
    double hb = c->r->rollout_heartbeat_s;
    if (proc_check(p, "engine", &pe)) return engine_restart(c, j, step, pe.msg, e);
    if (p->pid <= 0 || hb <= 0 || !proc_rpc_simple(&c->ps, p, "rollout engine", "health", "health_ok", hb, &pe)) return 0;
    if (!proc_check(p, "engine", &pe)) /* alive, silent */
        snprintf(pe.msg, sizeof pe.msg, "did not answer health within %g s (its heartbeat): wedged", hb);
    return engine_restart(c, j, step, pe.msg, e);
}

/* Brings every engine to the trainer's weights, restarting any that died or wedged since last seen;
 * when the publish fails on an engine that wedges during it, once more after that engine's restart. */
static int publish(run_ctx *c, long step, double *secs, mill_err *e) {
    for (int attempt = 0;; attempt++) {
        char addrs[4096] = "";
        for (int j = 0; j < c->ps.n_engines; j++) {
            if (engine_ensure(c, j, step, e)) return -1;
            size_t u = strlen(addrs);
            snprintf(addrs + u, sizeof addrs - u, "%s%s", u ? "," : "", c->ps.engines[j].addr);
        }
        if (!publish_to(c, addrs, secs, e)) return 0;
        mill_err pe;
        if (attempt || c->ps.trainer.pid < 0 || (c->ps.trainer.pid > 0 && proc_check(&c->ps.trainer, "trainer", &pe)))
            return -1;
        fprintf(stderr, "\nmill: %s; checking the engines\n", e->msg);
    }
}

/* A fault mid-rollout: restart engine j, give it the current weights and re-send its block. Samples
 * already received are kept and their repeats dropped (a sample is a function of its seed and the
 * weights, so the repeat is the same sample). */
static int engine_recover(run_ctx *c, int j, const prompt_set *pp, int G, float temp, uint64_t seed, int maxn,
                          uint64_t *req, long step, const char *why, mill_err *e) {
    if (engine_restart(c, j, step, why, e) || publish_to(c, c->ps.engines[j].addr, NULL, e)) return -1;
    return send_block(c, j, pp, G, temp, seed, maxn, req, e);
}

/* Generates G samples per prompt on the engines; fills s (indexed prompt * G + g). */
static int rollout(run_ctx *c, const prompt_set *pp, int G, float temp, uint64_t seed, int maxn, long step,
                   int kill_step, samples *s, mill_err *e) {
    const dsv4_config *cfg = &c->cfg;
    int L = cfg->num_hidden_layers, K = cfg->num_experts_per_tok, E = c->ps.n_engines, n = pp->n * G;
    memset(s, 0, sizeof *s);
    s->n = n;
    s->prompt_of = malloc(sizeof(int) * (size_t)n);
    s->tokens = calloc((size_t)n, sizeof *s->tokens);
    s->logprobs = calloc((size_t)n, sizeof *s->logprobs);
    s->routing = calloc((size_t)n, sizeof *s->routing);
    s->out_len = calloc((size_t)n, sizeof(int));
    s->finish = calloc((size_t)n, sizeof(int));
    s->got = calloc((size_t)n, sizeof(int));
    s->version = calloc((size_t)n, sizeof(long));
    uint64_t req[64];
    if (!s->prompt_of || !s->tokens || !s->logprobs || !s->routing || !s->out_len || !s->finish || !s->got || !s->version)
        return mill_errf(e, "out of memory");
    for (int i = 0; i < n; i++) s->prompt_of[i] = i / G;
    for (int j = 0; j < E; j++)
        if (send_block(c, j, pp, G, temp, seed, maxn, &req[j], e)) return mill_err_wrap(e, "rollout engine %d", j);
    int have = 0, isatty_err = isatty(2), left[64];
    long toks = 0;
    double t0 = mill_now(), last_msg = mill_now(), heard[64], pinged[64], hb = c->r->rollout_heartbeat_s;
    for (int j = 0; j < E; j++) {
        left[j] = (int)((long)pp->n * (j + 1) / E - (long)pp->n * j / E) * G; /* samples of its block still out */
        heard[j] = pinged[j] = t0;
    }
    zmq_pollitem_t items[64];
    while (have < n) {
        for (int j = 0; j < E; j++) items[j] = (zmq_pollitem_t){.socket = c->ps.engines[j].sock, .events = ZMQ_POLLIN};
        if (zmq_poll(items, E, 200) < 0 && zmq_errno() != EINTR)
            return mill_errf(e, "rollout: poll: %s", zmq_strerror(zmq_errno()));
        for (int j = 0; j < E; j++) {
            mill_err pe;
            double now = mill_now();
            int wedged = !(items[j].revents & ZMQ_POLLIN) && hb > 0 && left[j] > 0 && now - heard[j] > hb;
            if (wedged) snprintf(pe.msg, sizeof pe.msg, "sent nothing for %g s (its heartbeat): wedged", hb);
            if (wedged || proc_check(&c->ps.engines[j], "engine", &pe)) {
                if (engine_recover(c, j, pp, G, temp, seed, maxn, &req[j], step, pe.msg, e)) return -1;
                last_msg = heard[j] = pinged[j] = mill_now();
                continue;
            }
            /* the heartbeat: an engine that owes samples and has been quiet is asked for health_ok,
             * which it answers between decode steps; its silence past hb is a wedge */
            if (hb > 0 && left[j] > 0 && now - heard[j] > hb / 2 && now - pinged[j] > hb / 2) {
                wire_builder *ping = proc_msg(&c->ps, "health");
                if (!ping) return mill_errf(e, "out of memory");
                if (wire_send(c->ps.engines[j].sock, NULL, 0, ping, e)) {
                    wire_builder_free(ping);
                    return mill_err_wrap(e, "rollout engine %d: heartbeat", j);
                }
                wire_builder_free(ping);
                pinged[j] = now;
            }
            if (!(items[j].revents & ZMQ_POLLIN)) continue;
            wire_msg *m;
            wire_raw *raw;
            if (wire_recv(c->ps.engines[j].sock, 0, 0, NULL, NULL, &m, &raw, e) != 0)
                return mill_err_wrap(e, "rollout engine %d", j);
            last_msg = heard[j] = mill_now();
            const char *t = wire_type(m);
            int rc = 0;
            if (wire_id(m) != req[j] || !strcmp(t, "done")) { /* a stale reply, or the end of a block */
            } else if (!strcmp(t, "error")) {
                char why[900];
                wire_get_str(m, "message", 0, "?", why, sizeof why, e);
                rc = mill_errf(e, "rollout engine %d refused the batch: %s", j, why);
            } else if (!strcmp(t, "sample")) {
                int64_t idx, ver;
                char fin[16];
                int p0 = (int)((long)pp->n * j / E);
                const wire_frame *ft = wire_frame_named(m, "tokens"), *fl = wire_frame_named(m, "logprobs"),
                                 *fr = wire_frame_named(m, "routing");
                if (wire_get_int(m, "index", 1, 0, 0, n - 1, &idx, e) ||
                    wire_get_int(m, "weight_version", 1, 0, 0, INT64_MAX, &ver, e) ||
                    wire_get_str(m, "finish_reason", 1, NULL, fin, sizeof fin, e))
                    rc = mill_err_wrap(e, "rollout engine %d sent a bad sample", j);
                int i = p0 * G + (int)idx;
                if (!rc && (i >= n || !ft || ft->dtype != DTYPE_I32 || !fl || fl->dtype != DTYPE_F32 ||
                            fl->shape[0] != ft->shape[0] || ft->shape[0] > maxn || !fr || fr->ndim != 3 ||
                            fr->shape[0] != L || fr->shape[2] != K ||
                            fr->shape[1] != pp->len[i / G] + ft->shape[0] ||
                            (fr->dtype != DTYPE_U8 && fr->dtype != DTYPE_U16 && fr->dtype != DTYPE_I32)))
                    rc = mill_errf(e, "rollout engine %d sent sample %lld with frames that do not match its request", j,
                                   (long long)idx);
                if (!rc && !s->got[i]) {
                    int no = (int)ft->shape[0];
                    long nr = (long)L * fr->shape[1] * K;
                    s->tokens[i] = malloc(sizeof(int32_t) * (size_t)(no ? no : 1));
                    s->logprobs[i] = malloc(sizeof(float) * (size_t)(no ? no : 1));
                    s->routing[i] = malloc(sizeof(int32_t) * (size_t)nr);
                    if (!s->tokens[i] || !s->logprobs[i] || !s->routing[i]) rc = mill_errf(e, "out of memory");
                    else {
                        memcpy(s->tokens[i], ft->data, sizeof(int32_t) * (size_t)no);
                        memcpy(s->logprobs[i], fl->data, sizeof(float) * (size_t)no);
                        for (long q = 0; q < nr; q++) {
                            int32_t v = fr->dtype == DTYPE_U8    ? ((const uint8_t *)fr->data)[q]
                                        : fr->dtype == DTYPE_U16 ? ((const uint16_t *)fr->data)[q]
                                                                 : ((const int32_t *)fr->data)[q];
                            if (v < 0 || v >= cfg->n_routed_experts) rc = mill_errf(e, "rollout engine %d: expert id %d out of range", j, v);
                            s->routing[i][q] = v;
                        }
                        s->out_len[i] = no;
                        s->finish[i] = !strcmp(fin, "stop");
                        s->version[i] = (long)ver;
                        s->got[i] = 1;
                        have++;
                        left[j]--;
                        toks += no;
                    }
                }
                /* fault injection (tests): kill engine 0 at its first sample of that step */
                if (!rc && kill_step && step == kill_step && j == 0 && !c->fault_done && c->ps.engines[0].pid > 0) {
                    c->fault_done = 1;
                    fprintf(stderr, "\nmill: debug.kill_engine_at_step: SIGKILL to rollout engine 0 (pid %d)\n",
                            (int)c->ps.engines[0].pid);
                    kill(c->ps.engines[0].pid, SIGKILL);
                }
            }
            wire_msg_free(m);
            wire_recv_free(raw);
            if (rc) return -1;
        }
        if (isatty_err)
            fprintf(stderr, "\r  rollout: %d/%d samples, %.0f tokens/s   ", have, n, toks / fmax(mill_now() - t0, 1e-9));
        if (mill_now() - last_msg > c->r->timeout_s)
            return mill_errf(e, "rollout: no sample from any engine for %g s (rollout.timeout_s)", c->r->timeout_s);
    }
    if (isatty_err) fprintf(stderr, "\r%60s\r", "");
    return 0;
}

/* Decoded response text (up to the stop token). */
static int response_text(run_ctx *c, const samples *s, int i, char **out, mill_err *e) {
    int n = s->out_len[i];
    if (n > 0 && s->finish[i]) n--; /* the stop token */
    size_t cap = (size_t)n * tokenizer_max_piece(c->tok) + 1;
    if (!(*out = malloc(cap))) return mill_errf(e, "out of memory");
    return tokenizer_decode_lossy(c->tok, s->tokens[i], n, *out, cap, e);
}

/* Rewards of samples [0, s->n): arithmetic (first integer equals the label, and a clean stop),
 * the math verifier, or a remote scorer. */
static int score(run_ctx *c, const prompt_set *pp, const samples *s, float *rewards, char **texts, mill_err *e) {
    const grpo_recipe *r = c->r;
    for (int i = 0; i < s->n; i++)
        if (response_text(c, s, i, &texts[i], e)) return -1;
    if (r->reward == REWARD_REMOTE) {
        const char **pr = malloc(sizeof(char *) * (size_t)s->n), **lb = malloc(sizeof(char *) * (size_t)s->n);
        if (!pr || !lb) return free(pr), free(lb), mill_errf(e, "out of memory");
        for (int i = 0; i < s->n; i++) {
            pr[i] = pp->row[s->prompt_of[i]]->prompt;
            lb[i] = pp->row[s->prompt_of[i]]->label;
        }
        remote_reward_config rc = {.timeout_s = r->reward_timeout_s, .retries = r->reward_retries,
                                   .backoff_s = r->reward_backoff_s};
        snprintf(rc.url, sizeof rc.url, "%s", r->reward_url);
        int x = reward_remote_score(&rc, pr, (const char *const *)texts, lb, s->n, rewards, e);
        free(pr);
        free(lb);
        return x;
    }
    for (int i = 0; i < s->n; i++) {
        const dataset_row *row = pp->row[s->prompt_of[i]];
        if (r->reward == REWARD_MATH) {
            const verify_options vo = {.fallback_last_number = r->reward_fallback_last_number};
            rewards[i] = verify_math_reward_opts(texts[i], row->label, &vo);
        } else {
            arith_problem pb = {.value = strtoll(row->label, NULL, 10)};
            rewards[i] = (float)(arith_check(texts[i], &pb) && s->finish[i]);
        }
    }
    return 0;
}

static void free_texts(char **t, int n) {
    if (!t) return;
    for (int i = 0; i < n; i++) free(t[i]);
    free(t);
}

/* Greedy accuracy on the held-out set (the arithmetic generator's held-out split, or eval.path),
 * on the engines; per_level[l] for arithmetic levels 1..4 (-1 when absent). */
static int evaluate(run_ctx *c, double *acc, double *per_level, mill_err *e) {
    const grpo_recipe *r = c->r;
    int n = r->eval_problems, rc = -1, maxn = r->jsonl ? r->max_new_tokens : 12;
    arith_problem *probs = NULL;
    dataset_row *rows = NULL;
    prompt_set pp = {0};
    samples s = {0};
    char **texts = NULL;
    float *rew = NULL;
    if (r->jsonl) {
        dataset *d = c->eval_data ? c->eval_data : c->data;
        n = (int)(dataset_size(d) < n ? dataset_size(d) : n);
    }
    if (prompts_alloc(&pp, n, e)) goto out;
    probs = calloc((size_t)n, sizeof *probs);
    rows = calloc((size_t)n, sizeof *rows);
    char (*labels)[32] = calloc((size_t)n, sizeof *labels);
    if (!probs || !rows || !labels) {
        free(labels);
        mill_errf(e, "out of memory");
        goto out;
    }
    rng g;
    rng_seed(&g, r->eval_seed);
    for (int i = 0; i < n; i++) {
        char text[8192];
        if (r->jsonl) {
            const dataset *d = c->eval_data ? c->eval_data : c->data;
            rows[i] = *dataset_row_get(d, i);
            if (dataset_format(d, &rows[i], text, sizeof text, e)) goto out_l;
        } else { /* the same problems as mill sft's evaluation */
            int level = r->levels[r->n_levels > 1 ? rng_below(&g, (uint64_t)r->n_levels) : 0];
            arith_draw(&probs[i], level, 1, &g);
            arith_format_prompt(&probs[i], text, sizeof text);
            snprintf(labels[i], sizeof labels[i], "%lld", probs[i].value);
            rows[i] = (dataset_row){.prompt = probs[i].prompt, .label = labels[i], .level = level};
        }
        pp.row[i] = &rows[i];
        if (prompt_encode(c, &pp, i, text, e)) goto out_l;
    }
    /* greedy: one sample per prompt (G = 1) */
    if (rollout(c, &pp, 1, 0.0f, 0, maxn, -1, 0, &s, e)) goto out_l;
    texts = calloc((size_t)n, sizeof *texts);
    rew = malloc(sizeof(float) * (size_t)n);
    if (!texts || !rew) {
        mill_errf(e, "out of memory");
        goto out_l;
    }
    if (r->jsonl) {
        if (score(c, &pp, &s, rew, texts, e)) goto out_l;
    } else {
        for (int i = 0; i < n; i++) {
            if (response_text(c, &s, i, &texts[i], e)) goto out_l;
            rew[i] = (float)arith_check(texts[i], &probs[i]);
        }
    }
    int lvl_n[5] = {0}, lvl_ok[5] = {0};
    double ok = 0;
    for (int i = 0; i < n; i++) {
        ok += rew[i];
        lvl_n[rows[i].level] += 1;
        lvl_ok[rows[i].level] += rew[i] > 0.5f;
    }
    *acc = n ? ok / n : 0;
    for (int l = 1; l <= 4; l++) per_level[l - 1] = lvl_n[l] ? (double)lvl_ok[l] / lvl_n[l] : -1.0;
    rc = 0;
out_l:
    free(labels);
out:
    free_texts(texts, n);
    free(rew);
    samples_free(&s);
    prompts_free(&pp);
    free(probs);
    free(rows);
    return rc;
}

/* One draw of P prompts and their groups. */
typedef struct {
    prompt_set pp;
    samples s;
    float *rewards, *adv;
    char **texts;
    int64_t cursor0; /* the cursor of its first prompt: prompt ids in the ledger are cursor positions */
} draw;

static void draw_free(draw *d) {
    free_texts(d->texts, d->s.n);
    samples_free(&d->s);
    prompts_free(&d->pp);
    free(d->rewards);
    free(d->adv);
    memset(d, 0, sizeof *d);
}

static int draw_make(run_ctx *c, draw *d, long step, int k, mill_err *e) {
    const grpo_recipe *r = c->r;
    int P = r->prompts_per_step, G = r->samples_per_prompt;
    memset(d, 0, sizeof *d);
    if (prompts_alloc(&d->pp, P, e)) return -1;
    d->cursor0 = c->cursor;
    for (int p = 0; p < P; p++) {
        char text[16384];
        d->pp.row[p] = dataset_row_at(c->data, r->data_seed, (long)c->cursor++);
        if (dataset_format(c->data, d->pp.row[p], text, sizeof text, e) || prompt_encode(c, &d->pp, p, text, e))
            return -1;
    }
    /* sample i of draw k of step s uses seed base + i: the same sample on any engine layout */
    uint64_t seed = r->sample_seed + ((uint64_t)step << 32) + ((uint64_t)k << 24);
    if (rollout(c, &d->pp, G, (float)r->temperature, seed, r->max_new_tokens, step, r->kill_engine_at_step, &d->s, e))
        return -1;
    d->rewards = malloc(sizeof(float) * (size_t)P * G);
    d->adv = malloc(sizeof(float) * (size_t)P * G);
    d->texts = calloc((size_t)P * G, sizeof *d->texts);
    if (!d->rewards || !d->adv || !d->texts) return mill_errf(e, "out of memory");
    if (score(c, &d->pp, &d->s, d->rewards, d->texts, e)) return -1;
    grpo_advantages(d->rewards, P, G, r->std_normalize, d->adv);
    return 0;
}

static int group_informative(const draw *d, int p, int G) {
    for (int g = 1; g < G; g++)
        if (d->rewards[p * G + g] != d->rewards[p * G]) return 1;
    return 0;
}

typedef struct {
    int d, p;
} group_ref;

/* The training batch of the chosen groups: prompt + response rows, right-padded; targets on
 * response tokens; replay = the engine's experts (padding repeats the row's last token's). */
static int train_batch(run_ctx *c, draw *dr, const group_ref *gr, int n_groups, wire_builder *b, void **bufs,
                       mill_err *e) {
    const dsv4_config *cfg = &c->cfg;
    int G = c->r->samples_per_prompt, n = n_groups * G, L = cfg->num_hidden_layers, K = cfg->num_experts_per_tok, T = 0;
    long cnt = 0;
    for (int q = 0; q < n; q++) {
        const draw *d = &dr[gr[q / G].d];
        int i = gr[q / G].p * G + q % G, len = d->pp.len[i / G] + d->s.out_len[i];
        T = len > T ? len : T;
        cnt += d->s.out_len[i];
    }
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n * T), *tg = malloc(sizeof(int32_t) * (size_t)n * T);
    int32_t *rp = malloc(sizeof(int32_t) * (size_t)L * n * T * K);
    float *adv = malloc(sizeof(float) * (size_t)n), *lp = malloc(sizeof(float) * (size_t)(cnt ? cnt : 1));
    bufs[0] = ids, bufs[1] = tg, bufs[2] = rp, bufs[3] = adv, bufs[4] = lp;
    if (!ids || !tg || !rp || !adv || !lp) return mill_errf(e, "out of memory");
    long k = 0;
    const int32_t pad = tokenizer_pad(c->tok) >= 0 ? tokenizer_pad(c->tok) : tokenizer_eos(c->tok); /* never read */
    for (int q = 0; q < n; q++) {
        const draw *d = &dr[gr[q / G].d];
        int i = gr[q / G].p * G + q % G, pl = d->pp.len[i / G], len = pl + d->s.out_len[i];
        const int32_t *prompt = d->pp.ids[i / G];
        adv[q] = d->adv[i];
        for (int t = 0; t < T; t++) {
            ids[(long)q * T + t] = t < pl ? prompt[t] : t < len ? d->s.tokens[i][t - pl] : pad;
            int resp = t + 1 >= pl && t + 1 < len; /* position t predicts response token t + 1 */
            tg[(long)q * T + t] = resp ? d->s.tokens[i][t + 1 - pl] : -1;
            if (resp) lp[k++] = d->s.logprobs[i][t + 1 - pl];
        }
        for (int l = 0; l < L; l++)
            for (int t = 0; t < T; t++)
                memcpy(rp + (((long)l * n + q) * T + t) * K, d->s.routing[i] + ((long)l * len + (t < len ? t : len - 1)) * K,
                       sizeof(int32_t) * (size_t)K);
    }
    int64_t s2[2] = {n, T}, s4[4] = {L, n, T, K}, s1 = n, sc = k;
    if (wire_put_frame(b, "ids", DTYPE_I32, 2, s2, ids, e) || wire_put_frame(b, "targets", DTYPE_I32, 2, s2, tg, e) ||
        wire_put_frame(b, "replay", DTYPE_I32, 4, s4, rp, e) || wire_put_frame(b, "adv", DTYPE_F32, 1, &s1, adv, e) ||
        wire_put_frame(b, "rollout_logp", DTYPE_F32, 1, &sc, lp, e))
        return -1;
    return 0;
}

/* Colocated: the engines' turn (resume) or the trainer's (release_memory). An engine found dead or
 * stopped meanwhile is restarted, given the trainer's weights, and takes the turn. */
static int engines_turn(run_ctx *c, long step, const char *type, const char *want, mill_err *e) {
    if (c->r->disaggregated) return 0; /* each side has its own memory */
    for (int j = 0; j < c->ps.n_engines; j++) {
        proc *p = &c->ps.engines[j];
        if (!proc_rpc_simple(&c->ps, p, "rollout engine", type, want, 60, e)) continue;
        mill_err pe;
        if (p->pid > 0 && !proc_check(p, "rollout engine", &pe)) return -1; /* it lives: a real error */
        char why[sizeof e->msg];
        snprintf(why, sizeof why, "%s", e->msg);
        if (engine_restart(c, j, step, why, e) || publish_to(c, p->addr, NULL, e) ||
            proc_rpc_simple(&c->ps, p, "rollout engine", type, want, 60, e))
            return -1;
    }
    return 0;
}

static const char *const step_keys[] = {"loss",      "grad_norm", "lr",     "clip_frac",        "kl",
                                        "entropy",   "max_dlogp", "tokens", "expert_imbalance", "ep_imbalance"};

/* A step's training batch: its draws, the groups chosen for training, and its metrics. */
typedef struct {
    long step;
    draw dr[64];
    int nd, ng;
    group_ref *gr;
    json_t *m;
    int64_t cursor_end; /* the dataset cursor after its prompts: what a checkpoint of this step saves */
    double t0;          /* when it began (monotonic) */
    void *bufs[5];      /* the train message's frames */
    uint64_t train_id;  /* the train request in flight, 0 when none */
} step_batch;

static void batch_free(step_batch *b) {
    for (int d = 0; d < b->nd; d++) draw_free(&b->dr[d]);
    for (int i = 0; i < 5; i++) free(b->bufs[i]);
    free(b->gr);
    json_decref(b->m);
    memset(b, 0, sizeof *b);
}

/* Rollout and rewards of step `step` (1-based), with dynamic sampling; every generated sample goes
 * to the ledger, kept for training or not. */
static int batch_generate(run_ctx *c, long step, step_batch *b, mill_err *e) {
    const grpo_recipe *r = c->r;
    int P = r->prompts_per_step, G = r->samples_per_prompt;
    memset(b, 0, sizeof *b);
    b->step = step;
    b->t0 = mill_now();
    b->gr = malloc(sizeof *b->gr * (size_t)P);
    b->m = json_object();
    if (!b->gr || !b->m) return mill_errf(e, "out of memory");
    double rsum = 0, lsum = 0, nsamp = 0;
    int max_draws = r->dynamic_sampling ? (r->max_draws < 64 ? r->max_draws : 64) : 1;
    if (engines_turn(c, step, "resume", "resumed", e)) return -1;
    /* dynamic sampling: groups whose rewards are all equal carry no signal; draw more prompts
     * until P informative groups are in or max_draws is reached */
    while (b->ng < P && b->nd < max_draws) {
        draw *d = &b->dr[b->nd++];
        if (draw_make(c, d, step, b->nd - 1, e)) return -1;
        for (int p = 0; p < P && b->ng < P; p++)
            if (!r->dynamic_sampling || group_informative(d, p, G)) b->gr[b->ng++] = (group_ref){b->nd - 1, p};
        for (int i = 0; i < P * G; i++) {
            rsum += d->rewards[i];
            lsum += d->s.out_len[i];
            nsamp++;
        }
    }
    b->cursor_end = c->cursor;
    ledger_sample *ls = calloc((size_t)b->nd * P * G, sizeof *ls);
    if (!ls) return mill_errf(e, "out of memory");
    int nl = 0;
    for (int k = 0; k < b->nd; k++) {
        const draw *d = &b->dr[k];
        for (int i = 0; i < P * G; i++)
            ls[nl++] = (ledger_sample){.run_id = c->run_id, .step = step, .attempt = c->attempt,
                                       .prompt_id = (long)d->cursor0 + i / G, .sample_idx = i % G,
                                       .reward = d->rewards[i], .prompt_len = d->pp.len[i / G],
                                       .response_len = d->s.out_len[i], .weight_version = d->s.version[i],
                                       .finish = d->s.finish[i] ? "stop" : "length", .text = d->texts[i]};
    }
    int x = ledger_samples_add(c->lg, ls, nl, e);
    free(ls);
    if (x) return -1;
    json_object_set_new(b->m, "reward", json_real(rsum / nsamp));
    json_object_set_new(b->m, "response_len", json_real(lsum / nsamp));
    json_object_set_new(b->m, "rollout_s", json_real(mill_now() - b->t0));
    json_object_set_new(b->m, "groups", json_integer(b->ng));
    json_object_set_new(b->m, "draws", json_integer(b->nd));
    return 0;
}

/* Sends the batch to the trainer (colocated: the engines give their memory back first). */
static int batch_train_send(run_ctx *c, step_batch *b, mill_err *e) {
    if (!b->ng) return 0;
    if (engines_turn(c, b->step, "release_memory", "released", e)) return -1;
    wire_builder *w = proc_msg(&c->ps, "train");
    if (!w) return mill_errf(e, "out of memory");
    wire_put_int(w, "step", b->step);
    if (train_batch(c, b->dr, b->gr, b->ng, w, b->bufs, e)) {
        wire_builder_free(w);
        return -1;
    }
    return proc_send(&c->ps, &c->ps.trainer, "trainer worker", w, &b->train_id, e);
}

/* Waits for the step's training, then refreshes the engines' weights. */
static int batch_train_finish(run_ctx *c, step_batch *b, mill_err *e) {
    double t1 = mill_now();
    if (!b->ng) { /* no group with signal: no update; the version stays */
        json_object_set_new(b->m, "skipped", json_true());
    } else {
        wire_msg *rep;
        wire_raw *raw;
        if (proc_wait(&c->ps.trainer, "trainer worker", b->train_id, "trained", 3600, c->r->train_heartbeat_s, &rep,
                      &raw, e)) return -1;
        b->train_id = 0;
        int x = 0;
        for (size_t k = 0; !x && k < sizeof step_keys / sizeof *step_keys; k++) {
            double v;
            x = wire_get_num(rep, step_keys[k], 1, 0, -1e300, 1e300, &v, e);
            if (!x) json_object_set_new(b->m, step_keys[k], json_real(v));
        }
        wire_msg_free(rep);
        wire_recv_free(raw);
        double tp;
        if (x || proc_rpc_simple(&c->ps, &c->ps.trainer, "trainer worker", "release_memory", "released", 60, e) ||
            engines_turn(c, b->step, "resume", "resumed", e) || publish(c, b->step, &tp, e))
            return -1;
        json_object_set_new(b->m, "publish_s", json_real(tp));
    }
    json_object_set_new(b->m, "train_s", json_real(mill_now() - t1));
    json_object_set_new(b->m, "step_s", json_real(mill_now() - b->t0));
    return 0;
}

static double num(json_t *m, const char *k) { return json_number_value(json_object_get(m, k)); }

static void print_step(long step, long steps, json_t *m) {
    printf("step %4ld/%ld  reward %.3f  kl %.2e  entropy %.3f  clip %.3f  max|dlogp| %.2e  len %.1f  %.2fs "
           "(rollout %.2fs, train %.2fs)\n",
           step, steps, num(m, "reward"), num(m, "kl"), num(m, "entropy"), num(m, "clip_frac"), num(m, "max_dlogp"),
           num(m, "response_len"), num(m, "step_s"), num(m, "rollout_s"), num(m, "train_s"));
    fflush(stdout);
}

static void print_eval(long step, double acc, const double *lv) {
    printf("step %4ld  held-out greedy accuracy %.3f", step, acc);
    for (int l = 0, first = 1; l < 4; l++)
        if (lv[l] >= 0) {
            printf("%slevel %d: %.3f", first ? "  [" : ", ", l + 1, lv[l]);
            first = 0;
        }
    printf("%s\n", lv[0] >= 0 || lv[1] >= 0 || lv[2] >= 0 || lv[3] >= 0 ? "]" : "");
    fflush(stdout);
}

static int eval_into(run_ctx *c, long step, json_t *m, mill_err *e) {
    double acc, lv[4];
    if (evaluate(c, &acc, lv, e)) return -1;
    json_object_set_new(m, "accuracy", json_real(acc));
    print_eval(step, acc, lv);
    return 0;
}

static int checkpoint(run_ctx *c, long step, int64_t cursor, mill_err *e) {
    char dir[1200], sum[LEDGER_CHECKSUM_LEN];
    snprintf(dir, sizeof dir, "%s/step-%06ld", c->run_dir, step);
    wire_builder *b = proc_msg(&c->ps, "save");
    wire_msg *r;
    wire_raw *raw;
    if (!b) return mill_errf(e, "out of memory");
    wire_put_str(b, "dir", dir);
    wire_put_int(b, "data_position", cursor);
    if (proc_rpc(&c->ps, &c->ps.trainer, "trainer worker", b, "saved", 3600, &r, &raw, e)) return -1;
    wire_msg_free(r);
    wire_recv_free(raw);
    int64_t bytes;
    if (ledger_checksum_dir(dir, sum, sizeof sum, &bytes, e) ||
        ledger_checkpoint_add(c->lg, c->run_id, step, dir, sum, bytes, 1, e))
        return -1;
    printf("step %4ld  checkpoint %s (%s)\n", step, dir, sum);
    return 0;
}

static int loop(run_ctx *c, long start, mill_err *e) {
    const grpo_recipe *r = c->r;
    if (start == 0) { /* the baseline, recorded as step 0 */
        json_t *m = json_object();
        double t = wall();
        int x = eval_into(c, 0, m, e);
        char *js = x ? NULL : json_dumps(m, JSON_COMPACT);
        if (!x) x = ledger_step_record(c->lg, c->run_id, 0, c->attempt, t, c->version, c->cursor, NULL, 0, js, e);
        free(js);
        json_decref(m);
        if (x) return -1;
    }
    /* async (disaggregated): step s + 1 is generated while step s trains, by the weights before
     * step s's update; the trainer's importance weights (TIS) correct the one-version lag */
    step_batch cur = {0}, next = {0};
    int rc = -1;
    if (start < r->steps && batch_generate(c, start + 1, &cur, e)) goto out;
    for (long s = start + 1; s <= r->steps; s++) {
        double t = wall();
        if (batch_train_send(c, &cur, e)) goto out;
        if (r->async && s < r->steps && batch_generate(c, s + 1, &next, e)) goto out;
        if (batch_train_finish(c, &cur, e)) goto out;
        print_step(s, r->steps, cur.m);
        if (((r->eval_every && s % r->eval_every == 0) || s == r->steps) && eval_into(c, s, cur.m, e)) goto out;
        char *js = json_dumps(cur.m, JSON_COMPACT);
        int x = !js ? mill_errf(e, "out of memory")
                    : ledger_step_record(c->lg, c->run_id, s, c->attempt, t, c->version, cur.cursor_end, NULL, 0, js, e);
        free(js);
        if (x) goto out;
        if (((r->checkpoint_every && s % r->checkpoint_every == 0) || s == r->steps) &&
            checkpoint(c, s, cur.cursor_end, e))
            goto out;
        batch_free(&cur);
        if (r->async) {
            cur = next;
            memset(&next, 0, sizeof next);
        } else if (s < r->steps && batch_generate(c, s + 1, &cur, e)) {
            goto out;
        }
    }
    rc = 0;
out:
    batch_free(&cur);
    batch_free(&next);
    return rc;
}

/* The run's CURVE keys when its sockets use them (rollout.curve) into ps->curve, and their file into
 * ps->curve_file: the recipe's key file, else the run directory's (made on the first start, reused
 * on resume; external engines need the recipe's, which the recipe check enforces). */
static int run_curve(run_ctx *c, mill_err *e) {
    const grpo_recipe *r = c->r;
    procs *ps = &c->ps;
    memset(&ps->curve, 0, sizeof ps->curve);
    if (!r->curve) return 0;
    if (r->curve_keys[0]) {
        snprintf(ps->curve_file, sizeof ps->curve_file, "%s", r->curve_keys);
        return wire_curve_load(&ps->curve, ps->curve_file, e);
    }
    snprintf(ps->curve_file, sizeof ps->curve_file, "%s/curve.keys", c->run_dir);
    if (access(ps->curve_file, F_OK) == 0) return wire_curve_load(&ps->curve, ps->curve_file, e);
    return wire_curve_new(&ps->curve, e) || wire_curve_save(&ps->curve, ps->curve_file, e);
}

/* Starts the trainer worker (model_dir: the warm start, or a checkpoint when resume) and the
 * engines, and brings the engines to the trainer's weights. */
static int start_processes(run_ctx *c, const char *model_dir, int resume, long version, mill_err *e) {
    const grpo_recipe *r = c->r;
    procs *ps = &c->ps;
    ssize_t n = readlink("/proc/self/exe", ps->exe, sizeof ps->exe - 1);
    if (n <= 0) return mill_errf(e, "cannot find the mill executable (/proc/self/exe): %s", strerror(errno));
    ps->exe[n] = 0;
    if (!(ps->zctx = zmq_ctx_new())) return mill_errf(e, "cannot create a ZeroMQ context");
    if (run_curve(c, e)) return -1;
    proc *t = &ps->trainer;
    snprintf(t->log, sizeof t->log, "%s/logs/trainer.log", c->run_dir);
    if (r->trainer_addr[0]) { /* started outside the run (e.g. srun under Slurm): connect */
        snprintf(t->addr, sizeof t->addr, "%s", r->trainer_addr);
        t->pid = 0;
        if (proc_connect(t, ps->zctx, &ps->curve, e)) return -1;
    } else if (strlen(c->run_dir) < 80) {
        snprintf(t->addr, sizeof t->addr, "ipc://%s/trainer.sock", c->run_dir);
    } else {
        int port;
        if (proc_free_port(&port, e)) return -1;
        snprintf(t->addr, sizeof t->addr, "tcp://127.0.0.1:%d", port);
    }
    if (!r->trainer_addr[0]) { /* a trainer of several ranks starts under mpiexec (rank 0 binds the address) */
        int world = r->par.tp * r->par.pp * r->par.cp * r->par.dp;
        char np[16], mpiexec[4096];
        snprintf(np, sizeof np, "%d", world);
        const char *targs[] = {"mill", "trainer-worker", "--bind", t->addr, ps->curve.on ? "--curve" : NULL,
                               ps->curve_file, NULL};
        const char *margs[] = {"mpiexec", "-n", np, ps->exe, "trainer-worker", "--bind", t->addr,
                               ps->curve.on ? "--curve" : NULL, ps->curve_file, NULL};
        if (world > 1 && ranks_mpiexec(mpiexec, sizeof mpiexec, e)) return -1;
        if (proc_set_argv(t, world > 1 ? margs : targs, e) || proc_spawn(t, world > 1 ? mpiexec : ps->exe, e) ||
            proc_connect(t, ps->zctx, &ps->curve, e))
            return -1;
    }
    wire_builder *b = proc_msg(ps, "init");
    if (!b) return mill_errf(e, "out of memory");
    const optim_config *o = &r->optim;
    char freeze[OPTIM_MAX_FREEZE * 96] = "";
    for (int i = 0; i < o->n_freeze; i++) {
        size_t u = strlen(freeze);
        snprintf(freeze + u, sizeof freeze - u, "%s%s", i ? "\n" : "", o->freeze[i]);
    }
    wire_put_str(b, "model", model_dir);
    wire_put_bool(b, "resume", resume);
    wire_put_str(b, "ref_model", r->init_from); /* the frozen reference policy when kl_coef != 0 */
    wire_put_str(b, "device", r->train_gpu ? "cuda" : "cpu");
    wire_put_int(b, "version", version);
    wire_put_num(b, "lr", o->lr);
    wire_put_num(b, "min_lr", o->min_lr);
    wire_put_num(b, "beta1", o->beta1);
    wire_put_num(b, "beta2", o->beta2);
    wire_put_num(b, "eps", o->eps);
    wire_put_num(b, "weight_decay", o->weight_decay);
    wire_put_num(b, "clip_grad", o->clip_grad);
    wire_put_str(b, "schedule", o->schedule == LR_COSINE ? "cosine" : "constant");
    wire_put_int(b, "warmup_steps", o->warmup_steps);
    wire_put_int(b, "total_steps", o->total_steps);
    wire_put_str(b, "freeze", freeze);
    wire_put_num(b, "eps_low", r->algo.eps_low);
    wire_put_num(b, "eps_high", r->algo.eps_high);
    wire_put_bool(b, "seq_mean", r->algo.seq_mean);
    wire_put_num(b, "kl_coef", r->algo.kl_coef);
    wire_put_int(b, "kl_type", r->algo.kl_type);
    wire_put_num(b, "tis_cap", r->algo.tis_cap);
    wire_put_num(b, "entropy_coef", r->algo.entropy_coef);
    wire_put_int(b, "loss_agg", r->algo.agg);
    wire_put_num(b, "agg_horizon", r->algo.agg_horizon);
    wire_put_int(b, "ratio", r->algo.ratio);
    wire_put_num(b, "clip_ratio_c", r->algo.clip_ratio_c);
    wire_put_num(b, "log_ratio_clamp", r->algo.log_ratio_clamp);
    wire_put_num(b, "temperature", r->temperature);
    wire_put_bool(b, "exact", r->exact);
    wire_put_int(b, "updates_per_step", r->updates_per_step);
    wire_put_int(b, "micro_batch", r->micro_batch);
    wire_put_int(b, "tp", r->par.tp);
    wire_put_int(b, "pp", r->par.pp);
    wire_put_int(b, "ep", r->par.ep);
    wire_put_int(b, "cp", r->par.cp);
    wire_put_int(b, "dp", r->par.dp);
    wire_put_int(b, "vpp", par_vpp(&r->par));
    wire_put_str(b, "pp_dtype", par_wire_name(r->par.pp_wire));
    wire_put_bool(b, "sp", r->par.sp);
    int64_t split[PAR_MAX_STAGES];
    int n_split = 0;
    while (n_split < PAR_MAX_STAGES && r->par.pp_layers[n_split] > 0) split[n_split] = r->par.pp_layers[n_split], n_split++;
    if (n_split) wire_put_int_array(b, "pp_layers", split, n_split);
    if ((r->kill_trainer_at_step || r->wedge_trainer_at_step) && c->attempt == 1) { /* fault injection: first attempt */
        wire_put_int(b, "debug_kill_step", r->kill_trainer_at_step);
        wire_put_int(b, "debug_kill_rank", r->kill_trainer_rank);
        wire_put_int(b, "debug_wedge_step", r->wedge_trainer_at_step);
    }
    wire_msg *rep;
    wire_raw *raw;
    if (proc_rpc(ps, t, "trainer worker", b, "ready", 600, &rep, &raw, e)) return -1;
    wire_msg_free(rep);
    wire_recv_free(raw);
    ps->n_engines = r->n_engines;
    if (r->engine_addrs[0]) { /* external engines: connect */
        char list[sizeof r->engine_addrs];
        snprintf(list, sizeof list, "%s", r->engine_addrs);
        int j = 0;
        for (char *p = list, *a; (a = strtok_r(p, ",", &p)) != NULL; j++) {
            snprintf(ps->engines[j].addr, sizeof ps->engines[j].addr, "%s", a);
            if (proc_connect(&ps->engines[j], ps->zctx, &ps->curve, e) ||
                engine_wait_ready(ps, &ps->engines[j], j, r->timeout_s, e))
                return -1;
        }
    } else {
        for (int j = 0; j < r->n_engines; j++)
            if (engine_start(ps, r, c->run_dir, r->init_from, j, e)) return -1;
    }
    return publish(c, -1, NULL, e);
}

static void stop_processes(run_ctx *c) {
    procs *ps = &c->ps;
    mill_err e;
    for (int j = 0; j < ps->n_engines; j++) {
        if (ps->engines[j].pid > 0 && ps->engines[j].sock) proc_rpc_simple(ps, &ps->engines[j], "engine", "shutdown", "bye", 5, &e);
        proc_stop(&ps->engines[j]);
        if (ps->engines[j].sock) zmq_close(ps->engines[j].sock);
    }
    if (ps->trainer.pid > 0 && ps->trainer.sock) proc_rpc_simple(ps, &ps->trainer, "trainer", "shutdown", "bye", 5, &e);
    proc_stop(&ps->trainer);
    if (ps->trainer.sock) zmq_close(ps->trainer.sock);
    if (ps->zctx) zmq_ctx_term(ps->zctx);
    memset(ps, 0, sizeof *ps);
}

static int mkdirs(const char *dir, mill_err *e) {
    char p[1200];
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1;; s++) {
        if (*s == '/' || !*s) {
            char ch = *s;
            *s = 0;
            if (mkdir(p, 0755) && errno != EEXIST) return mill_errf(e, "%s: cannot create: %s", p, strerror(errno));
            *s = ch;
            if (!ch) break;
        }
    }
    return 0;
}

/* data.tokenizer, checked against the model: every id it makes must be a row of the embedding,
 * and generation stops at its eos. */
static int open_tokenizer(run_ctx *c, mill_err *e) {
    const char *p = c->r->tokenizer;
    if (!*p) return tokenizer_bytes_new(&c->tok, c->cfg.vocab_size, e);
    if (tokenizer_load(&c->tok, p, e)) return mill_err_wrap(e, "data.tokenizer");
    if (tokenizer_vocab_size(c->tok) > c->cfg.vocab_size)
        return mill_errf(e, "data.tokenizer %s: its ids reach %d but the model's vocab_size is %d", p,
                         tokenizer_vocab_size(c->tok) - 1, c->cfg.vocab_size);
    if (tokenizer_eos(c->tok) < 0)
        return mill_errf(e, "data.tokenizer %s: no eos_token (tokenizer_config.json): generation could not stop", p);
    return 0;
}

/* Everything but the processes: datasets, tokenizer, the model's config. */
static int open_inputs(run_ctx *c, mill_err *e) {
    const grpo_recipe *r = c->r;
    char path[1100], logs[1200];
    snprintf(c->run_dir, sizeof c->run_dir, "%s", r->out_dir);
    snprintf(logs, sizeof logs, "%s/logs", c->run_dir);
    snprintf(path, sizeof path, "%s/config.json", r->init_from);
    if (mkdirs(logs, e) || config_load(path, &c->cfg, e) || open_tokenizer(c, e)) return -1;
    if (par_validate(&r->par, &c->cfg, 0, 0, e)) /* before any rank starts */
        return mill_err_wrap(e, "train.parallel");
    if (par_validate(&r->engine_par, &c->cfg, 0, 0, e)) return mill_err_wrap(e, "rollout.parallel");
    long n = (long)r->prompts_per_step * r->samples_per_prompt; /* each update's micro-batches on each dp rank */
    for (int u = 0; u < r->updates_per_step; u++)
        for (int d = 0; d < r->par.dp; d++) {
            long u0 = n * u / r->updates_per_step, u1 = n * (u + 1) / r->updates_per_step, lo, hi;
            par_range(u1 - u0, d, r->par.dp, &lo, &hi);
            long mb = r->micro_batch > 0 ? r->micro_batch : hi - lo;
            if (hi > lo && par_validate_micro(&r->par, (hi - lo + mb - 1) / mb, e))
                return mill_err_wrap(e, "train.micro_batch %d: update %d's %ld rows on dp rank %d", r->micro_batch, u,
                                     hi - lo, d);
        }
    const char *tmpl = r->template_[0] ? r->template_ : NULL;
    if (r->jsonl) {
        dataset_jsonl_config dc = {r->data_path, r->prompt_key, r->label_key, tmpl, r->skip_bad, 0, &r->chat};
        if (dataset_open_jsonl(&c->data, &dc, e)) return -1;
        if (dataset_skipped(c->data))
            fprintf(stderr, "mill: %s: skipped %ld bad rows (first: %s)\n", r->data_path, dataset_skipped(c->data),
                    dataset_skip_reason(c->data, 0));
        if (r->eval_path[0]) {
            dc.path = r->eval_path;
            if (dataset_open_jsonl(&c->eval_data, &dc, e)) return -1;
        }
    } else if (dataset_arith(&c->data, r->levels, r->n_levels, r->pool, r->data_seed, tmpl, e)) {
        return -1;
    }
    return 0;
}

static void close_inputs(run_ctx *c) { /* idempotent */
    dataset_free(c->data);
    dataset_free(c->eval_data);
    if (c->tok) tokenizer_free(c->tok);
    c->data = c->eval_data = NULL;
    c->tok = NULL;
}

/* Where a run goes on from: the latest complete checkpoint in the ledger (0: found; *start, the
 * data cursor and the weights' version set from its step record, *model_dir = ck) or the start
 * (1: *start 0, the warm start). -1 on error. */
static int restart_point(run_ctx *c, long *start, char *ck, size_t n, const char **model_dir, mill_err *e) {
    int found = ledger_checkpoint_latest(c->lg, c->run_id, start, ck, n, NULL, 0, e);
    if (found < 0) return -1;
    *model_dir = c->r->init_from;
    if (found == 0) {
        int64_t cur;
        size_t rl;
        int att;
        int s = ledger_step_state(c->lg, c->run_id, *start, &cur, NULL, 0, &rl, &att, e);
        if (s < 0) return -1;
        if (s == 1) return mill_errf(e, "run %s: checkpoint of step %ld has no step record in the ledger", c->r->name, *start);
        c->cursor = cur;
        c->version = *start;
        *model_dir = ck;
    } else {
        *start = 0;
        c->cursor = 0;
        c->version = 0;
    }
    return found;
}

/* The trainer died (a rank killed, or its job ended by a failing rank): its group is started again
 * from the last complete checkpoint, with the engines, as mill resume would; the steps after that
 * checkpoint are redone under the next attempt number (the ledger keeps every sample once). */
static int restart_trainer(run_ctx *c, const char *why, long *start, char *ck, size_t n, const char **model_dir,
                           int *resume, mill_err *e) {
    mill_err le;
    fprintf(stderr, "\nmill: %s; restarting the trainer from the last checkpoint\n", why);
    ledger_event(c->lg, c->run_id, -1, "fault", why, &le);
    stop_processes(c);
    int found = restart_point(c, start, ck, n, model_dir, e);
    if (found < 0) return -1;
    *resume = found == 0;
    c->attempt++;
    char msg[1300];
    snprintf(msg, sizeof msg, "attempt %d from %s", c->attempt, found == 0 ? ck : "the start");
    return ledger_supersede(c->lg, c->run_id, found == 0 ? *start + 1 : 0, c->attempt, e) ||
           ledger_event(c->lg, c->run_id, *start, "restart", msg, e);
}

static int drive(run_ctx *c, const char *model_dir, int resume, long start, mill_err *e) {
    const grpo_recipe *r = c->r;
    double t0 = mill_now();
    int rc = -1;
    mill_err le;
    char ck[1100];
    for (int restarts = 0;; restarts++) {
        rc = start_processes(c, model_dir, resume, start, e);
        if (!rc) {
            printf("mill run %s (attempt %d): %s%s layout, %d engine(s), %ld steps of %d prompts x %d samples, from %s\n",
                   r->name, c->attempt, r->disaggregated ? "disaggregated" : "colocated", r->async ? " async" : "",
                   c->ps.n_engines, r->steps, r->prompts_per_step, r->samples_per_prompt,
                   start ? model_dir : r->init_from);
            fflush(stdout);
            rc = loop(c, start, e);
        }
        /* our trainer ended: reaped already (pid -1: e says how) or found ended now */
        mill_err pe = *e;
        int dead = c->ps.trainer.pid < 0 || c->ps.trainer.wedged ||
                   (c->ps.trainer.pid > 0 && proc_check(&c->ps.trainer, "trainer worker", &pe));
        if (!rc || !dead || restarts == r->max_restarts) break;
        char why[1200];
        snprintf(why, sizeof why, "%s", pe.msg);
        backoff(restarts);
        if (restart_trainer(c, why, &start, ck, sizeof ck, &model_dir, &resume, e)) {
            rc = -1;
            break;
        }
    }
    if (rc) {
        ledger_event(c->lg, c->run_id, -1, "fault", e->msg, &le);
        ledger_run_set_status(c->lg, c->run_id, "failed", &le);
        mill_err_wrap(e, "run %s stopped (resume with: mill resume %s)", r->name, r->name);
    } else {
        ledger_event(c->lg, c->run_id, r->steps, "stop", "finished", &le);
        ledger_run_set_status(c->lg, c->run_id, "finished", &le);
        printf("run %s finished in %.1f min; ledger %s\n", r->name, (mill_now() - t0) / 60, r->ledger);
    }
    stop_processes(c);
    close_inputs(c);
    return rc;
}


/* "controller HOST PID": who drives the run now, so `mill runs` on that host can tell a dead
 * controller's run (interrupted) from a live one (runs_cli's controller_alive). */
static int controller_event(ledger *lg, int64_t run_id, mill_err *e) {
    char host[256] = "?", msg[320];
    if (gethostname(host, sizeof host - 1)) snprintf(host, sizeof host, "?");
    host[sizeof host - 1] = 0;
    snprintf(msg, sizeof msg, "%s %ld", host, (long)getpid());
    return ledger_event(lg, run_id, -1, "controller", msg, e);
}
int grpo_run(const grpo_recipe *r, const char *recipe_path, mill_err *e) {
    grpo_recipe rr = *r; /* the name the ledger gives it */
    run_ctx c = {.r = &rr, .attempt = 1};
    /* bad inputs (model config, dataset rows) fail before the ledger records a run */
    if (open_inputs(&c, e) || ledger_open(&c.lg, r->ledger, e)) {
        close_inputs(&c);
        return -1;
    }
    int rc = ledger_run_create(c.lg, r->name[0] ? r->name : NULL, recipe_path, r->text, r->out_dir,
                               r->disaggregated ? "disaggregated" : "colocated", r->sample_seed, &c.run_id, e);
    if (!rc) {
        ledger_run run;
        char id[32];
        snprintf(id, sizeof id, "%lld", (long long)c.run_id);
        rc = ledger_run_find(c.lg, id, &run, e);
        if (!rc) snprintf(rr.name, sizeof rr.name, "%s", run.name);
    }
    if (!rc) rc = ledger_event(c.lg, c.run_id, -1, "start", recipe_path ? recipe_path : "", e);
    if (!rc) rc = controller_event(c.lg, c.run_id, e);
    if (!rc) rc = drive(&c, r->init_from, 0, 0, e);
    close_inputs(&c);
    ledger_close(c.lg);
    return rc;
}

int grpo_resume(const char *ledger_path, const char *name, mill_err *e) {
    run_ctx c = {0};
    ledger_run run;
    char *text = NULL, ck[1100];
    grpo_recipe r;
    memset(&r, 0, sizeof r);
    int rc = -1;
    long start = 0;
    if (ledger_open_existing(&c.lg, ledger_path, e) || ledger_run_find(c.lg, name, &run, e)) goto out;
    if (!strcmp(run.status, "finished")) {
        mill_errf(e, "run %s already finished (%ld steps)", run.name, run.last_step);
        goto out;
    }
    if (ledger_run_recipe(c.lg, run.id, &text, e)) goto out;
    if (grpo_recipe_parse(text, run.recipe_path, &r, e)) goto out;
    snprintf(r.name, sizeof r.name, "%s", run.name);
    snprintf(r.ledger, sizeof r.ledger, "%s", ledger_path);
    c.r = &r;
    c.run_id = run.id;
    if (ledger_max_attempt(c.lg, run.id, &c.attempt, e)) goto out;
    c.attempt++;
    const char *model_dir;
    int found = restart_point(&c, &start, ck, sizeof ck, &model_dir, e);
    if (found < 0) goto out;
    char msg[1300];
    snprintf(msg, sizeof msg, "attempt %d from %s", c.attempt, found == 0 ? ck : "the start");
    if (open_inputs(&c, e) || ledger_supersede(c.lg, run.id, found == 0 ? start + 1 : 0, c.attempt, e) ||
        ledger_event(c.lg, run.id, start, "resume", msg, e) ||
        controller_event(c.lg, run.id, e) || ledger_run_set_status(c.lg, run.id, "running", e))
        goto out;
    printf("resuming run %s at step %ld (%s)\n", run.name, start, msg);
    rc = drive(&c, model_dir, found == 0, start, e);
out:
    close_inputs(&c);
    free(text);
    ledger_close(c.lg);
    return rc;
}
