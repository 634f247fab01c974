#include "worker.h"

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "../algos/grpo.h"
#include "../common/wire.h"
#include "../kernels/dense.h"
#include "checkpoint.h"
#include "dist.h"
#include "model.h"
#include "optimizer.h"

typedef struct {
    dsv4_model m, ref; /* ref: the frozen reference policy, loaded only when kl_coef != 0; on a GPU
                        * both are freed once their device copies exist (no host image is kept) */
    int ready;         /* model and optimizer loaded */
    kctx k;
    optimizer opt;
    /* on a GPU: the copies that train, publish (staged a bucket at a time) and save (a shard at a time) */
    int gpu;
    dsv4_model dm, dref;
    optimizer dopt;
    grpo_config algo;
    float temperature;
    int updates, micro_batch; /* optimizer steps per batch; sequences per forward (0: all) */
    arena a;
    arena *arenas; /* 1F1B: one per micro-batch and chunk of an update (a: the forward-only passes) */
    int n_arenas;
    float *grads;
    long version;
    void *zctx, *sock;
    /* the request being served: train reports its micro-batches to it as it goes */
    unsigned char peer[256];
    size_t peer_len;
    uint64_t id;
    /* CUDA IPC publish: the handle of dm.data, made once (the buffer never moves) */
    unsigned char ipc_handle[MEM_IPC_HANDLE_BYTES];
    int ipc_ready;
    const wire_curve *curve; /* the run's keys (NULL: plain sockets) */
    /* the trainer's ranks: rank 0 talks to the controller and relays each request to the others;
     * every rank runs it on its part (dist: the layout's groups, set by init) */
    comm *world;
    dist_ctx d;
    int dist_on;
    int64_t kill_step, kill_rank; /* fault injection (debug_kill_*): SIGKILL this rank when that step trains */
    int64_t wedge_step;           /* ... or hang there, alive (debug_wedge_step): what the controller's heartbeat catches */
} worker;

static dsv4_model *train_model(worker *w) { return w->gpu ? &w->dm : &w->m; }
static dsv4_model *ref_model(worker *w) { return w->gpu ? &w->dref : &w->ref; }
static optimizer *train_opt(worker *w) { return w->gpu ? &w->dopt : &w->opt; }

static void reply_error(worker *w, const unsigned char *peer, size_t plen, uint64_t id, const char *msg) {
    wire_builder *b = wire_builder_new("error", id);
    mill_err e;
    if (!b) return;
    wire_put_str(b, "message", msg);
    wire_send(w->sock, peer, plen, b, &e);
    wire_builder_free(b);
}

/* ---------------------------------------------------------------------- init */

static int handle_init(worker *w, const wire_msg *msg, wire_builder **reply, mill_err *e) {
    char model[1024], ref[1024], sched[16], freeze[OPTIM_MAX_FREEZE * 96], device[8], wire[8];
    int resume, seqm, sp, exact;
    int64_t version, warm, total, kl, agg, ratio, updates, mb, lay[6];
    double temp;
    optim_config oc;
    optim_config_default(&oc);
    grpo_config_default(&w->algo);
    if (w->ready) return mill_errf(e, "init: the worker is already initialised");
    if (w->dist_on) { /* a failed init before: its groups go */
        dist_free(&w->d);
        w->dist_on = 0;
    }
    if (wire_get_str(msg, "model", 1, NULL, model, sizeof model, e) || wire_get_bool(msg, "resume", 0, 0, &resume, e) ||
        wire_get_str(msg, "ref_model", 0, "", ref, sizeof ref, e) ||
        wire_get_str(msg, "device", 0, "cpu", device, sizeof device, e) ||
        wire_get_int(msg, "version", 0, 0, 0, INT64_MAX, &version, e) ||
        wire_get_num(msg, "lr", 1, 0, 0, 10, &oc.lr, e) || wire_get_num(msg, "min_lr", 0, 0, 0, 10, &oc.min_lr, e) ||
        wire_get_num(msg, "beta1", 0, oc.beta1, 0, 1, &oc.beta1, e) ||
        wire_get_num(msg, "beta2", 0, oc.beta2, 0, 1, &oc.beta2, e) ||
        wire_get_num(msg, "eps", 0, oc.eps, 0, 1, &oc.eps, e) ||
        wire_get_num(msg, "weight_decay", 0, oc.weight_decay, 0, 10, &oc.weight_decay, e) ||
        wire_get_num(msg, "clip_grad", 0, oc.clip_grad, -1, 1e30, &oc.clip_grad, e) ||
        wire_get_str(msg, "schedule", 0, "constant", sched, sizeof sched, e) ||
        wire_get_int(msg, "warmup_steps", 0, 0, 0, 1 << 30, &warm, e) ||
        wire_get_int(msg, "total_steps", 1, 0, 1, 1L << 40, &total, e) ||
        wire_get_str(msg, "freeze", 0, "", freeze, sizeof freeze, e) ||
        wire_get_num(msg, "eps_low", 0, 0.2, 0, 1, &w->algo.eps_low, e) ||
        wire_get_num(msg, "eps_high", 0, 0.28, 0, 10, &w->algo.eps_high, e) ||
        wire_get_bool(msg, "seq_mean", 0, 0, &seqm, e) ||
        wire_get_num(msg, "kl_coef", 0, 0, 0, 1e6, &w->algo.kl_coef, e) ||
        wire_get_int(msg, "kl_type", 0, KL_K3, KL_K1, KL_UNBIASED, &kl, e) ||
        wire_get_int(msg, "loss_agg", 0, AGG_TOKEN_MEAN, AGG_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM_NORM, &agg, e) ||
        wire_get_num(msg, "agg_horizon", 0, 1, 1e-9, 1e9, &w->algo.agg_horizon, e) ||
        wire_get_int(msg, "ratio", 0, RATIO_TOKEN, RATIO_TOKEN, RATIO_GSPO, &ratio, e) ||
        wire_get_num(msg, "clip_ratio_c", 0, 0, 0, 1e6, &w->algo.clip_ratio_c, e) ||
        wire_get_num(msg, "log_ratio_clamp", 0, 0, 0, 1e6, &w->algo.log_ratio_clamp, e) ||
        wire_get_num(msg, "tis_cap", 0, 0, 0, 1e6, &w->algo.tis_cap, e) ||
        wire_get_num(msg, "entropy_coef", 0, 0, -1e3, 1e3, &w->algo.entropy_coef, e) ||
        wire_get_num(msg, "temperature", 0, 1.0, 1e-6, 100, &temp, e) || wire_get_bool(msg, "exact", 0, 0, &exact, e) ||
        wire_get_int(msg, "updates_per_step", 0, 1, 1, 1024, &updates, e) ||
        wire_get_int(msg, "micro_batch", 0, 0, 0, 1 << 20, &mb, e) ||
        wire_get_int(msg, "tp", 0, 1, 1, 1 << 20, &lay[0], e) || wire_get_int(msg, "pp", 0, 1, 1, 1 << 20, &lay[1], e) ||
        wire_get_int(msg, "ep", 0, 1, 1, 1 << 20, &lay[2], e) || wire_get_int(msg, "cp", 0, 1, 1, 1 << 20, &lay[3], e) ||
        wire_get_int(msg, "dp", 0, 1, 1, 1 << 20, &lay[4], e) || wire_get_int(msg, "vpp", 0, 1, 1, PAR_MAX_VPP, &lay[5], e) ||
        wire_get_str(msg, "pp_dtype", 0, "auto", wire, sizeof wire, e) || wire_get_bool(msg, "sp", 0, 0, &sp, e) ||
        wire_get_int(msg, "debug_kill_step", 0, 0, 0, 1 << 30, &w->kill_step, e) ||
        wire_get_int(msg, "debug_kill_rank", 0, 0, 0, 1 << 20, &w->kill_rank, e) ||
        wire_get_int(msg, "debug_wedge_step", 0, 0, 0, 1 << 30, &w->wedge_step, e))
        return mill_err_wrap(e, "init");
    par_sizes ps = {.tp = (int)lay[0], .pp = (int)lay[1], .ep = (int)lay[2], .cp = (int)lay[3], .dp = (int)lay[4],
                    .vpp = (int)lay[5], .sp = sp};
    if (par_wire_parse(wire, &ps.pp_wire)) return mill_errf(e, "init: pp_dtype \"%s\" must be auto, fp32 or bf16", wire);
    int64_t split[WIRE_MAX_INTS];
    int n_split = 0;
    if (wire_get_int_array(msg, "pp_layers", 0, 1, 1 << 20, split, WIRE_MAX_INTS, &n_split, e))
        return mill_err_wrap(e, "init");
    for (int i = 0; i < n_split && i < PAR_MAX_STAGES; i++) ps.pp_layers[i] = (int)split[i];
    if (w->algo.kl_coef != 0 && !ref[0]) return mill_errf(e, "init: kl_coef != 0 needs ref_model (the reference policy)");
    if (strcmp(device, "cpu") && strcmp(device, "cuda"))
        return mill_errf(e, "init: device \"%s\" must be \"cpu\" or \"cuda\"", device);
    if (!strcmp(device, "cuda")) { /* the ops run where the kctx says */
        kctx_free(&w->k);
        if (kctx_init(&w->k, DEVICE_CUDA, e)) return mill_err_wrap(e, "init: device cuda");
        w->gpu = 1;
    }
    w->k.exact = exact; /* the engines' exact logprobs are this forward's (rollout.exact) */
    dsv4_config mcfg; /* the stages need the model's layers */
    if (config_load(model, &mcfg, e) || dist_init(&w->d, w->world, &ps, &mcfg, 0, &w->k, e))
        return mill_err_wrap(e, "init");
    w->dist_on = 1;
    if (!strcmp(sched, "cosine")) oc.schedule = LR_COSINE;
    else if (!strcmp(sched, "constant")) oc.schedule = LR_CONSTANT;
    else return mill_errf(e, "init: schedule \"%s\" must be \"cosine\" or \"constant\"", sched);
    oc.warmup_steps = warm;
    oc.total_steps = total;
    for (char *p = freeze, *tok; (tok = strtok_r(p, "\n", &p)) != NULL;) {
        if (oc.n_freeze == OPTIM_MAX_FREEZE || strlen(tok) >= sizeof oc.freeze[0])
            return mill_errf(e, "init: at most %d freeze patterns of under %zu characters", OPTIM_MAX_FREEZE,
                             sizeof oc.freeze[0]);
        snprintf(oc.freeze[oc.n_freeze++], sizeof oc.freeze[0], "%s", tok);
    }
    w->algo.seq_mean = seqm;
    w->algo.kl_type = (grpo_kl)kl;
    w->algo.agg = (grpo_agg)agg;
    w->algo.ratio = (grpo_ratio)ratio;
    w->temperature = (float)temp;
    w->updates = (int)updates;
    w->micro_batch = (int)mb;
    long step = 0;
    /* each dp rank keeps its shard of the moments (edp rank, with experts over ranks), each pp rank
     * its stage's layers, each ep rank its experts */
    int ep = ps.ep > 1;
    comm *dp = ep ? w->d.par.edp : w->d.par.dpcp, *pp = ps.pp > 1 ? w->d.par.pp : NULL;
    const model_stage *stage = &w->d.stage;
    if (resume) {
        train_state ts;
        if (checkpoint_load_shard(model, &w->m, &w->opt, &oc, dp, stage, pp, &ts, e)) return -1;
        step = ts.step;
    } else {
        if (model_load_stage(&w->m, model, stage, e)) return -1;
        if (optimizer_init_shard(&w->opt, &w->m, &oc, dp, e)) {
            model_free(&w->m);
            return -1;
        }
    }
    w->opt.pp = pp;
    if (ep) w->opt.ep = w->d.par.ep, w->opt.dense = w->d.par.dpcp;
    if (ps.tp > 1) w->opt.tp = w->d.par.tp;
    if (par_validate(&ps, &w->m.cfg, w->world->size, 0, e)) {
        optimizer_free(&w->opt);
        model_free(&w->m);
        return mill_err_wrap(e, "init");
    }
    if (w->algo.kl_coef != 0 && model_load_stage(&w->ref, ref, stage, e)) {
        optimizer_free(&w->opt);
        model_free(&w->m);
        return mill_err_wrap(e, "init: reference model");
    }
    if (w->gpu && (model_to_device(&w->dm, &w->m, &w->k, e) || optimizer_to_device(&w->dopt, &w->opt, &w->k, e) ||
                   (w->algo.kl_coef != 0 && model_to_device(&w->dref, &w->ref, &w->k, e)))) {
        model_free(&w->dm);
        optimizer_free(&w->dopt);
        optimizer_free(&w->opt);
        model_free(&w->m);
        if (w->algo.kl_coef != 0) model_free(&w->ref);
        return mill_err_wrap(e, "init: to the GPU");
    }
    if (w->gpu) { /* the device copies are all there is from now on: no host image of the model */
        model_move_extras(&w->dm, &w->m); /* mtp.* (not run) still go into checkpoints */
        model_free(&w->m);
        optimizer_free(&w->opt);
        model_free(&w->ref);
        w->dopt.dp = ep ? w->d.edp : w->d.dp; /* the device moments' shards are gathered over the device's comms */
        if (ep) w->dopt.ep = w->d.ep, w->dopt.dense = w->d.dp;
        if (ps.tp > 1) w->dopt.tp = w->d.tp;
    }
    dist_ep_io(&w->d, train_model(w)); /* routed experts over the ep ranks */
    dist_ep_io(&w->d, ref_model(w));
    w->ready = 1;
    w->version = version;
    *reply = wire_builder_new("ready", wire_id(msg));
    if (!*reply) return mill_errf(e, "init: out of memory");
    wire_put_int(*reply, "version", w->version);
    wire_put_int(*reply, "optimizer_step", step);
    wire_put_int(*reply, "params", (int64_t)train_model(w)->n_floats);
    wire_put_str(*reply, "device", w->gpu ? "cuda" : "cpu");
    wire_put_int(*reply, "ranks", w->world->size);
    return 0;
}

/* --------------------------------------------------------------------- train */

static const wire_frame *frame(const wire_msg *msg, const char *name, mill_dtype dt, int ndim, mill_err *e) {
    const wire_frame *f = wire_frame_named(msg, name);
    if (!f || f->dtype != dt || f->ndim != ndim) {
        mill_errf(e, "train: needs a frame \"%s\" of dtype %s with %d dimensions", name, dtype_name(dt), ndim);
        return NULL;
    }
    return f;
}

typedef struct {
    grpo_batch b;
} loss_ctx;

static int loss_cb(void *ctx, const float *logp, const float *ent, int n, float *dlogp, float *dent, double *loss,
                   mill_err *e) {
    return grpo_loss(&((loss_ctx *)ctx)->b, logp, ent, n, dlogp, dent, loss, e);
}

typedef struct {
    const int32_t *ids, *targets, *replay;
    const float *adv, *rollout;
    const long *tok0; /* [n + 1]: first counted token of each sequence */
    int n, T, L, K;
} train_batch;

/* A sequence's token counts and log-ratio sums over the cp ranks that hold its positions. */
static int cp_share(void *ctx, double *v, int n, mill_err *e) { return comm_sum_f64((comm *)ctx, v, n, e); }

/* The forward over sequences [r0, r1) (with a loss also its gradient, for the backward), its pass
 * in *keep (its trace in arena a): gathers the rows' replay into scratch, runs the token loss over
 * this rank's counted tokens (context parallelism: those at its positions; each one's place in the
 * batch's order in gi). old: the whole batch's old logprobs or NULL (on-policy). logp_out: the
 * batch's [count] (this rank's tokens written). m: the model chunk the op runs. */
static int micro_step(worker *w, const dsv4_model *m, const train_batch *tb, int r0, int r1, const float *old,
                      const float *ref, long norm_tokens, int norm_seqs, int with_loss, float *logp_out,
                      grpo_stats *st, double *loss, int32_t *seq, int32_t *replay, model_pass **keep, arena *a,
                      mill_err *e) {
    int nb = r1 - r0, T = tb->T, K = tb->K, cp = m->stage.cp > 1 ? m->stage.cp : 1;
    for (int l = 0; l < tb->L; l++)
        memcpy(replay + (long)l * nb * T * K, tb->replay + ((long)l * tb->n + r0) * T * K,
               sizeof(int32_t) * (size_t)nb * T * K);
    int64_t p0, p1;
    model_split_range(T, cp, cp > 1 ? m->stage.cp_rank : 0, &p0, &p1);
    long all = tb->tok0[r1] - tb->tok0[r0], cnt = 0;
    long *gi = malloc(sizeof(long) * (size_t)(all + 1));
    float *lo = malloc(sizeof(float) * 4 * (size_t)(all + 1)), *lr = lo + all + 1, *lf = lr + all + 1, *lp = lf + all + 1;
    if (!gi || !lo) {
        free(gi), free(lo);
        return mill_errf(e, "train: out of memory");
    }
    for (int r = r0; r < r1; r++) /* counted tokens in row order, as the batch numbers them */
        for (long t = 0, g = tb->tok0[r]; t < T; t++)
            if (tb->targets[(long)r * T + t] >= 0) {
                if (t >= p0 && t < p1) gi[cnt] = g, seq[cnt++] = r - r0;
                g++;
            }
    for (long j = 0; j < cnt; j++) {
        lr[j] = tb->rollout[gi[j]];
        if (old) lo[j] = old[gi[j]];
        if (ref) lf[j] = ref[gi[j]];
    }
    loss_ctx lc = {.b = {.cfg = &w->algo, .seq = seq, .n_seqs = nb, .adv = tb->adv + r0, .old_logp = old ? lo : NULL,
                         .rollout_logp = lr, .ref_logp = ref ? lf : NULL, .norm_tokens = norm_tokens,
                         .norm_seqs = norm_seqs, .share = cp > 1 ? cp_share : NULL, .share_ctx = w->d.par.cp}};
    long count;
    double l = 0;
    /* the replay and the loss's inputs are read in the forward: the buffers can be reused */
    int rc = model_pass_forward(keep, m, &w->k, tb->ids + (long)r0 * T, tb->targets + (long)r0 * T, nb, T, replay,
                                w->temperature, with_loss ? loss_cb : NULL, &lc, lp, &l, &count, a, e);
    if (!rc && m->stage.last && count != cnt) rc = mill_errf(e, "train: %ld counted tokens, expected %ld", count, cnt);
    for (long j = 0; !rc && logp_out && m->stage.last && j < cnt; j++) logp_out[gi[j]] = lp[j];
    free(gi);
    free(lo);
    if (rc) return -1;
    if (with_loss) {
        wire_builder *pb = w->sock && m->stage.first ? wire_builder_new("progress", w->id) : NULL;
        mill_err pe;
        if (pb) { /* what a person sees: micro-batches done of the step's total */
            wire_put_int(pb, "done", r1);
            wire_put_int(pb, "total", tb->n);
            wire_send(w->sock, w->peer, w->peer_len, pb, &pe);
            wire_builder_free(pb);
        }
        *loss += l;
        /* statistics are token means within the call: weight them by its tokens */
        st->clip_frac += lc.b.stats.clip_frac * cnt;
        st->kl += lc.b.stats.kl * cnt;
        st->entropy += lc.b.stats.entropy * cnt;
        st->max_ratio = fmax(st->max_ratio, lc.b.stats.max_ratio);
        st->tokens += m->stage.last ? cnt : 0; /* the loss and its statistics are the last stage's */
    }
    return 0;
}

/* A pass of micro-batches through the stages: micro-batch i is rows [mbs[i], min(mbs[i] + mb, end)).
 * Forwards only (keep 0: each pass is freed at once, in arena w->a), or the update's training 1F1B
 * (each forward's pass kept, in an arena per micro-batch and chunk, for its backward). */
typedef struct {
    worker *w;
    const train_batch *tb;
    const int *mbs;
    int mb, end, keep;
    const float *old, *ref;
    long norm_tokens;
    int norm_seqs, with_loss;
    float *logp_out;
    grpo_stats *st;
    double *loss;
    int32_t *seq, *replay;
    model_pass **passes; /* [micro-batches x vpp] */
} pass_run;

static int pass_op(void *ctx, const pipe_op *op, const dsv4_model *chunk, mill_err *e) {
    pass_run *p = ctx;
    worker *w = p->w;
    int at = op->micro * par_vpp(&w->d.par.sz) + op->chunk, r0 = p->mbs[op->micro];
    if (op->backward) {
        int x = model_pass_backward(p->passes[at], w->grads, e);
        model_pass_free(p->passes[at]);
        p->passes[at] = NULL;
        return x;
    }
    model_pass *pass = NULL;
    if (micro_step(w, chunk, p->tb, r0, r0 + p->mb < p->end ? r0 + p->mb : p->end, p->old, p->ref, p->norm_tokens,
                   p->norm_seqs, p->with_loss, p->logp_out, p->st, p->loss, p->seq, p->replay, &pass,
                   p->keep ? &w->arenas[at] : &w->a, e))
        return -1;
    if (p->keep) p->passes[at] = pass;
    else model_pass_free(pass);
    return 0;
}

/* The micro-batches of rows [a, b) that hold target tokens (every stage sees the same): their
 * first rows into mbs, and their streams' sizes into elems; returns the count. */
static int micro_batches(const train_batch *tb, const dist_ctx *d, const dsv4_model *m, int a, int b, int mb, int *mbs,
                         size_t *elems) {
    int nm = 0;
    for (int r0 = a; r0 < b; r0 += mb) {
        int r1 = r0 + mb < b ? r0 + mb : b;
        if (tb->tok0[r1] == tb->tok0[r0]) continue;
        elems[nm] = dist_stream_elems(d, m, r1 - r0, tb->T);
        mbs[nm++] = r0;
    }
    return nm;
}

/* The batch's routing balance (its replay, every position the forward routes): per layer, the
 * busiest expert's tokens over the mean, and the busiest ep rank's (its block of experts) over the
 * mean; the worst layer's of each. */
static int expert_balance(const train_batch *tb, int E, int ep, double *expert, double *rank, mill_err *e) {
    long *cnt = calloc((size_t)E, sizeof(long));
    if (!cnt) return mill_errf(e, "train: out of memory");
    long per = (long)tb->n * tb->T * tb->K; /* a layer's (token, slot) pairs */
    *expert = *rank = 0;
    for (int l = 0; l < tb->L; l++) {
        memset(cnt, 0, sizeof(long) * (size_t)E);
        for (long i = 0; i < per; i++) cnt[tb->replay[(long)l * per + i]]++;
        long mx = 0, rmx = 0;
        for (int x = 0; x < E; x++) mx = cnt[x] > mx ? cnt[x] : mx;
        for (int q = 0; q < ep; q++) {
            long s = 0;
            for (int x = q * (E / ep); x < (q + 1) * (E / ep); x++) s += cnt[x];
            rmx = s > rmx ? s : rmx;
        }
        *expert = fmax(*expert, (double)mx * E / (double)per);
        *rank = fmax(*rank, (double)rmx * ep / (double)per);
    }
    free(cnt);
    return 0;
}

/* n activation arenas (1F1B keeps a micro-batch's trace per arena until its backward). */
static int worker_arenas(worker *w, int n, mill_err *e) {
    if (n <= w->n_arenas) return 0;
    arena *na = realloc(w->arenas, sizeof *na * (size_t)n);
    if (!na) return mill_errf(e, "train: out of memory");
    w->arenas = na;
    for (; w->n_arenas < n; w->n_arenas++) {
        memset(&w->arenas[w->n_arenas], 0, sizeof(arena));
        if (arena_init_device(&w->arenas[w->n_arenas], 16 << 20, w->k.device, w->k.stream, e)) return -1;
    }
    return 0;
}

static void worker_arenas_free(worker *w) {
    for (int i = 0; i < w->n_arenas; i++) arena_free(&w->arenas[i]);
    free(w->arenas);
    w->arenas = NULL;
    w->n_arenas = 0;
}

static int handle_train(worker *w, const wire_msg *msg, wire_builder **reply, mill_err *e) {
    const dsv4_config *c = &train_model(w)->cfg;
    if (!w->ready) return mill_errf(e, "train: send init first");
    int64_t step;
    if (wire_get_int(msg, "step", 0, 0, 0, INT64_MAX, &step, e)) return -1;
    if (w->kill_step && step == w->kill_step && w->world->rank == w->kill_rank) {
        log_warn("trainer rank %d: debug_kill_step %lld: SIGKILL to itself", w->world->rank, (long long)step);
        raise(SIGKILL); /* as kill -9 from outside, mid-step (the other ranks are in this step too) */
    }
    if (w->wedge_step && step == w->wedge_step && w->world->rank == w->kill_rank) {
        log_warn("trainer rank %d: debug_wedge_step %lld: hanging", w->world->rank, (long long)step);
        for (;;) pause(); /* as a deadlock: alive, silent, killable */
    }
    const wire_frame *fi, *ft, *fr, *fa, *fl;
    if (!(fi = frame(msg, "ids", DTYPE_I32, 2, e)) || !(ft = frame(msg, "targets", DTYPE_I32, 2, e)) ||
        !(fr = frame(msg, "replay", DTYPE_I32, 4, e)) || !(fa = frame(msg, "adv", DTYPE_F32, 1, e)) ||
        !(fl = frame(msg, "rollout_logp", DTYPE_F32, 1, e)))
        return -1;
    train_batch tb = {.ids = fi->data, .targets = ft->data, .replay = fr->data, .adv = fa->data, .rollout = fl->data,
                      .n = (int)fi->shape[0], .T = (int)fi->shape[1], .L = c->num_hidden_layers,
                      .K = c->num_experts_per_tok};
    int n = tb.n, T = tb.T;
    if (n < 1 || T < 2 || (long)n * T > (1L << 26) || ft->shape[0] != n || ft->shape[1] != T || fa->shape[0] != n ||
        fr->shape[0] != tb.L || fr->shape[1] != n || fr->shape[2] != T || fr->shape[3] != tb.K)
        return mill_errf(e, "train: frames disagree: ids [n, T], targets [n, T], adv [n], replay [%d, n, T, %d]", tb.L,
                         tb.K);
    for (long i = 0; i < (long)n * T; i++)
        if (tb.ids[i] < 0 || tb.ids[i] >= c->vocab_size || tb.targets[i] >= c->vocab_size)
            return mill_errf(e, "train: token %ld is outside the vocabulary [0, %d)", i, c->vocab_size);
    for (long i = 0; i < (long)tb.L * n * T * tb.K; i++)
        if (tb.replay[i] < 0 || tb.replay[i] >= c->n_routed_experts)
            return mill_errf(e, "train: replay entry %ld = %d is not an expert id in [0, %d)", i, tb.replay[i],
                             c->n_routed_experts);
    int rc = -1, mb = w->micro_batch > 0 ? w->micro_batch : n;
    long *tok0 = malloc(sizeof(long) * (size_t)(n + 1));
    float *old = NULL, *logp = NULL, *ref = NULL;
    int32_t *seq = NULL, *replay = malloc(sizeof(int32_t) * (size_t)tb.L * mb * T * tb.K);
    int vpp = par_vpp(&w->d.par.sz), cap = n / mb + 2, *mbs = malloc(sizeof(int) * (size_t)cap);
    size_t *elems = malloc(sizeof(size_t) * (size_t)cap); /* each micro-batch's streams between stages */
    model_pass **passes = calloc((size_t)(cap * vpp), sizeof *passes);
    if (!tok0 || !replay || !mbs || !elems || !passes) goto oom;
    tok0[0] = 0;
    for (int r = 0; r < n; r++) {
        long k = 0;
        for (int t = 0; t < T; t++) k += tb.targets[(long)r * T + t] >= 0;
        tok0[r + 1] = tok0[r] + k;
    }
    long cnt = tok0[n];
    if (fl->shape[0] != cnt) {
        mill_errf(e, "train: rollout_logp holds %lld values for %ld target tokens", (long long)fl->shape[0], cnt);
        goto out;
    }
    if (!cnt) {
        mill_errf(e, "train: the batch has no target tokens");
        goto out;
    }
    tb.tok0 = tok0;
    old = calloc((size_t)cnt, sizeof(float)); /* each rank writes its own tokens' (cp: its positions') */
    logp = malloc(sizeof(float) * (size_t)cnt);
    seq = malloc(sizeof(int32_t) * (size_t)cnt);
    if (!old || !logp || !seq) goto oom;
    if (w->algo.kl_coef != 0) { /* the reference policy's logprobs, with the same replayed experts */
        if (!(ref = malloc(sizeof(float) * (size_t)cnt))) goto oom;
    }
    size_t gbytes = sizeof(float) * train_model(w)->n_floats;
    if (!w->grads && !(w->grads = mem_alloc_copy(w->k.device, NULL, gbytes, e))) goto out;
    if (!w->a.head && arena_init_device(&w->a, 16 << 20, w->k.device, w->k.stream, e)) goto out;
    double t_start = mill_now(), loss = 0, gn = 0, lr = 0;
    grpo_stats st = {0};
    /* update u trains rows [u0, u1) of the batch; this dp rank takes rows [a[u], b[u]) of those */
    int ranges[2 * 1024]; /* updates_per_step is at most 1024 (init) */
    for (int u = 0; u < w->updates; u++) {
        long u0 = (long)n * u / w->updates, u1 = (long)n * (u + 1) / w->updates, lo, hi;
        dist_rows(&w->d, u1 - u0, &lo, &hi);
        ranges[2 * u] = (int)(u0 + lo);
        ranges[2 * u + 1] = (int)(u0 + hi);
    }
    /* the old policy's logprobs: with several updates per batch they are computed first, with the
     * weights that generated it (modulo the engine's kernels); with one, the first forward is it */
    for (int u = 0; u < w->updates; u++) {
        int b = ranges[2 * u + 1], nm = micro_batches(&tb, &w->d, train_model(w), ranges[2 * u], b, mb, mbs, elems);
        pass_run pr = {.w = w, .tb = &tb, .mbs = mbs, .mb = mb, .end = b, .logp_out = ref, .st = &st, .loss = &loss,
                       .seq = seq, .replay = replay, .passes = passes};
        if (ref && dist_pipeline(&w->d, ref_model(w), nm, 0, elems, pass_op, &pr, e)) goto out;
        pr.logp_out = old;
        if (w->updates > 1 && dist_pipeline(&w->d, train_model(w), nm, 0, elems, pass_op, &pr, e)) goto out;
    }
    /* context parallelism: every rank's tokens' old logprobs on every rank (the others' are zero here) */
    if (w->updates > 1 && comm_all_reduce(w->d.par.cp, old, (size_t)cnt, DTYPE_F32, e)) goto out;
    for (int u = 0; u < w->updates; u++) {
        int u0 = (int)((long)n * u / w->updates), u1 = (int)((long)n * (u + 1) / w->updates);
        int a = ranges[2 * u], b = ranges[2 * u + 1], nm = micro_batches(&tb, &w->d, train_model(w), a, b, mb, mbs, elems);
        int nseqs = 0; /* the normalisers are the whole update's, over every rank's rows */
        for (int r = u0; r < u1; r++) nseqs += tok0[r + 1] > tok0[r];
        if (op_zero(&w->k, w->grads, gbytes, e) || worker_arenas(w, nm * vpp, e)) goto out;
        pass_run pr = {w, &tb, mbs, mb, b, 1, w->updates > 1 ? old : NULL, ref, tok0[u1] - tok0[u0], nseqs, 1,
                       w->updates > 1 ? logp : old, &st, &loss, seq, replay, passes};
        dist_hook(&w->d, train_model(w), w->grads); /* in each chunk's last backward (dist_pipeline) */
        int x = dist_pipeline(&w->d, train_model(w), nm, 1, elems, pass_op, &pr, e); /* 1F1B through the stages */
        dist_unhook(train_model(w));
        if (x) {
            mill_err_wrap(e, "train: update %d (rows %d to %d of this rank in micro-batches of %d)", u, a, b, mb);
            goto out;
        }
        if (!nm && dist_reduce_idle(&w->d, train_model(w), w->grads, e)) goto out; /* no tokens here */
        if (optimizer_step(train_opt(w), train_model(w), &w->k, w->grads, &gn, &lr, e)) goto out;
    }
    if (w->updates == 1 && comm_all_reduce(w->d.par.cp, old, (size_t)cnt, DTYPE_F32, e)) goto out;
    double maxd = 0; /* the logprobs and the loss are the last stage's (the others' are zero) */
    for (int u = 0; train_model(w)->stage.last && u < w->updates; u++)
        for (long t = tok0[ranges[2 * u]]; t < tok0[ranges[2 * u + 1]]; t++)
            maxd = fmax(maxd, fabs((double)old[t] - tb.rollout[t]));
    double sums[5] = {loss, st.clip_frac, st.kl, st.entropy, (double)st.tokens}, maxes[2] = {maxd, st.max_ratio};
    if (comm_sum_f64(w->d.par.dpcp, sums, 5, e) || comm_max_f64(w->d.par.dpcp, maxes, 2, e) ||
        comm_sum_f64(w->d.par.pp, sums, 5, e) || comm_max_f64(w->d.par.pp, maxes, 2, e))
        goto out;
    loss = sums[0];
    st.clip_frac = sums[1];
    st.kl = sums[2];
    st.entropy = sums[3];
    st.tokens = (long)sums[4];
    maxd = maxes[0];
    double bal_x = 0, bal_r = 0; /* routing balance: visible in the ledger, per step */
    if (expert_balance(&tb, c->n_routed_experts, w->d.par.sz.ep, &bal_x, &bal_r, e)) goto out;
    w->version++;
    *reply = wire_builder_new("trained", wire_id(msg));
    if (!*reply) goto oom;
    double tok = st.tokens ? (double)st.tokens : 1;
    wire_put_int(*reply, "version", w->version);
    wire_put_num(*reply, "loss", loss / w->updates);
    wire_put_num(*reply, "grad_norm", gn);
    wire_put_num(*reply, "lr", lr);
    wire_put_num(*reply, "clip_frac", st.clip_frac / tok);
    wire_put_num(*reply, "kl", st.kl / tok);
    wire_put_num(*reply, "entropy", st.entropy / tok);
    wire_put_num(*reply, "max_dlogp", maxd);
    wire_put_num(*reply, "expert_imbalance", bal_x);
    wire_put_num(*reply, "ep_imbalance", bal_r);
    wire_put_int(*reply, "tokens", cnt);
    wire_put_num(*reply, "seconds", mill_now() - t_start);
    rc = 0;
    goto out;
oom:
    mill_errf(e, "train: out of memory");
out:
    for (int i = 0; passes && i < cap * vpp; i++) model_pass_free(passes[i]);
    free(passes);
    free(mbs);
    free(elems);
    free(tok0);
    free(old);
    free(ref);
    free(logp);
    free(seq);
    free(replay);
    return rc;
}

/* ------------------------------------------------------------------- publish */

/* Sends the float parameters this rank owns (model_param_shard over dp: a sharded trainer's ranks
 * each send their part, by name) to one engine in buckets of about bucket_bytes (at most
 * WIRE_MAX_FRAMES tensors each), every bucket naming the senders and this one; the engine stages
 * them and swaps when every sender's last bucket is in. A rank that owns nothing sends one empty
 * last bucket. */
static int send_buckets(worker *w, void *s, long version, size_t bucket_bytes, int *n_buckets, size_t *bytes,
                        mill_err *e) {
    const dsv4_model *m = train_model(w);
    /* every (stage, dp x cp rank) sends its part: the stage's tensors split over its dp x cp ranks (with
     * experts over ranks: each ep rank's experts over its edp ranks, the rest over ep rank 0's) */
    int dp = w->d.par.dpcp->size, senders = w->d.par.sz.pp * dp, me = w->d.par.pp_rank * dp + w->d.par.dpcp->rank;
    int ns = w->d.par.sz.ep > 1 ? w->d.par.edp->size : dp, r = w->d.par.sz.ep > 1 ? w->d.par.edp_rank : w->d.par.dpcp->rank;
    /* heads over ranks: the tp ranks gather each sliced tensor whole; tp rank 0 sends */
    int tp = w->d.par.sz.tp, lead = tp == 1 || w->d.par.tp_rank == 0;
    int last_p = -1;
#define OWNED(p) (m->params[p].kind != PARAM_INDEX && model_param_shard(m, &m->params[p], ns) == r)
    size_t largest = 0, sliced = 0;
    for (int p = 0; p < m->n_params; p++)
        if (OWNED(p)) {
            last_p = p;
            largest = m->params[p].numel > largest ? m->params[p].numel : largest;
            if (tp > 1 && m->params[p].split >= 0) sliced = m->params[p].numel > sliced ? m->params[p].numel : sliced;
        }
    float *all = sliced ? malloc(sizeof(float) * sliced * (size_t)tp * 2) : NULL, *whole = all ? all + sliced * tp : NULL;
    if (sliced && !all) return mill_errf(e, "publish: out of memory");
    /* device weights come over one bucket at a time into pinned memory (a bucket closes once it
     * reaches bucket_bytes, so it never holds more than that plus one tensor) */
    float *stage = NULL;
    size_t staged = 0;
    if (m->device != DEVICE_CPU &&
        !(stage = mem_alloc_host(m->device, bucket_bytes + sizeof(float) * (largest ? largest : 1), e))) {
        free(all);
        return mill_err_wrap(e, "publish: staging");
    }
    wire_builder *b = NULL;
    size_t in_bucket = 0;
    *n_buckets = 0;
    *bytes = 0;
    for (int p = 0; p <= last_p || (last_p < 0 && p == 0); p++) {
        int owned = last_p >= 0 && OWNED(p), end = p == last_p || last_p < 0;
        if (!owned && !end) continue;
        if (lead && !b && !(b = wire_builder_new("update_weights", (uint64_t)*n_buckets))) {
            mill_errf(e, "publish: out of memory");
            goto fail;
        }
        int whole_sent = 0; /* a gathered tensor closes its bucket (whole is reused) */
        if (owned) {
            const param_info *pi = &m->params[p];
            const float *src = m->data + pi->offset;
            if (stage) {
                if (op_copy_to_host(&w->k, stage + staged, src, pi->numel * sizeof(float), e)) goto fail;
                src = stage + staged;
                staged += pi->numel;
            }
            int64_t shape[3];
            model_whole_shape(pi, shape);
            if (pi->split >= 0) {
                if (model_gather_slices(m, pi, src, all, whole, e)) goto fail;
                src = whole;
                whole_sent = 1;
            }
            size_t n = model_whole_numel(pi);
            if (lead && wire_put_frame(b, pi->name, DTYPE_F32, pi->ndim, shape, src, e)) goto fail;
            in_bucket += n * sizeof(float);
            *bytes += lead ? n * sizeof(float) : 0;
        }
        if (!lead) { /* its slices went to tp rank 0: the staging is free again */
            staged = 0;
            continue;
        }
        if (end || whole_sent || in_bucket >= bucket_bytes || wire_builder_n_frames(b) == WIRE_MAX_FRAMES) {
            wire_put_int(b, "version", version);
            wire_put_int(b, "bucket", *n_buckets);
            wire_put_bool(b, "last", end);
            wire_put_int(b, "senders", senders);
            wire_put_int(b, "sender", me);
            if (wire_send(s, NULL, 0, b, e)) goto fail; /* the frames are copied: the staging is free again */
            wire_builder_free(b);
            b = NULL;
            in_bucket = 0;
            staged = 0;
            ++*n_buckets;
        }
    }
#undef OWNED
    mem_free_host(m->device, stage);
    free(all);
    return 0;
fail:
    wire_builder_free(b);
    mem_free_host(m->device, stage);
    free(all);
    return -1;
}

/* (Re)connects a DEALER socket to each engine. */
static int connect_engines(worker *w, void **socks, char *const *names, int n, mill_err *e) {
    for (int i = 0; i < n; i++) {
        if (socks[i]) zmq_close(socks[i]);
        int linger = 0;
        socks[i] = zmq_socket(w->zctx, ZMQ_DEALER);
        if (!socks[i] || zmq_setsockopt(socks[i], ZMQ_LINGER, &linger, sizeof linger))
            return mill_errf(e, "publish: cannot make a socket: %s", zmq_strerror(zmq_errno()));
        if (wire_curve_client(socks[i], w->curve, e)) return -1;
        if (zmq_connect(socks[i], names[i]))
            return mill_errf(e, "publish: cannot connect to engine %s: %s", names[i], zmq_strerror(zmq_errno()));
    }
    return 0;
}

/* Waits for want[i] acknowledgements (bucket_ok / weights_ok) from each engine. */
static int await_acks(worker *w, void *const *socks, char *const *names, const int *want, int n, double tmo,
                      mill_err *e) {
    for (int i = 0; i < n; i++)
        for (int got = 0; got < want[i];) {
            wire_msg *r = NULL;
            wire_raw *raw = NULL;
            int x = wire_recv(socks[i], 0, (int)(tmo * 1000), NULL, NULL, &r, &raw, e);
            if (x == 1) mill_errf(e, "publish: engine %s did not acknowledge version %ld within %g s", names[i], w->version, tmo);
            if (x) {
                wire_recv_free(raw);
                return -1;
            }
            const char *t = wire_type(r);
            if (!strcmp(t, "error")) {
                char why[512];
                wire_get_str(r, "message", 0, "?", why, sizeof why, e);
                mill_errf(e, "publish: engine %s refused version %ld: %s", names[i], w->version, why);
            }
            int bad = strcmp(t, "bucket_ok") && strcmp(t, "weights_ok");
            got++;
            wire_msg_free(r);
            wire_recv_free(raw);
            if (bad) return -1;
        }
    return 0;
}

/* Colocated: each engine copies the weights straight from the trainer's device buffers (CUDA IPC,
 * this GPU or a peer of the same machine), with no host round trip. Several dp ranks each offer
 * the part they own (model_shard_range) of their whole flat buffer; the engine swaps once all are in. */
static int publish_ipc(worker *w, void *const *socks, char *const *names, int n, double tmo, mill_err *e) {
    if (!w->ipc_ready) {
        TRY(mem_ipc_handle(w->k.device, w->dm.data, w->ipc_handle, e));
        w->ipc_ready = 1;
    }
    TRY(kctx_sync(&w->k, e)); /* the last update has landed before anyone reads */
    int64_t shape[1] = {MEM_IPC_HANDLE_BYTES};
    int want[64], senders = w->d.par.dpcp->size, me = w->d.par.dpcp->rank;
    size_t lo, hi;
    model_shard_range(&w->dm, me, senders, &lo, &hi);
    for (int i = 0; i < n; i++) {
        wire_builder *b = wire_builder_new("update_weights_ipc", 0);
        if (!b) return mill_errf(e, "publish: out of memory");
        wire_put_int(b, "version", w->version);
        wire_put_int(b, "floats", (int64_t)(hi - lo));
        wire_put_int(b, "offset", (int64_t)lo);
        wire_put_int(b, "src_offset", (int64_t)lo);
        wire_put_int(b, "senders", senders);
        wire_put_int(b, "sender", me);
        int x = wire_put_frame(b, "handle", DTYPE_U8, 1, shape, w->ipc_handle, e) || wire_send(socks[i], NULL, 0, b, e);
        wire_builder_free(b);
        if (x) return mill_err_wrap(e, "publish to %s", names[i]);
        want[i] = 1;
    }
    return await_acks(w, socks, names, want, n, tmo, e);
}

static int handle_publish(worker *w, const wire_msg *msg, wire_builder **reply, mill_err *e) {
    char engines[4096];
    double mb, tmo;
    int ipc;
    if (!w->ready) return mill_errf(e, "publish: send init first");
    if (wire_get_str(msg, "engines", 1, NULL, engines, sizeof engines, e) ||
        wire_get_num(msg, "bucket_mb", 0, 64, 0.001, 1e6, &mb, e) ||
        wire_get_num(msg, "timeout_s", 0, 60, 0.1, 1e5, &tmo, e) || wire_get_bool(msg, "ipc", 0, 0, &ipc, e))
        return -1;
    /* a stage's tensors, or some of the experts, are not one range of the whole layout */
    ipc = ipc && w->gpu && w->d.par.sz.pp == 1 && w->d.par.sz.ep == 1 && w->d.par.sz.tp == 1;
    double t0 = mill_now();
    size_t bytes = 0;
    int n_eng = 0, rc = -1;
    enum { MAX_ENGINES = 64 };
    void *socks[MAX_ENGINES] = {0};
    char *names[MAX_ENGINES];
    int buckets[MAX_ENGINES] = {0};
    for (char *p = engines, *tok; (tok = strtok_r(p, ",", &p)) != NULL;) {
        if (n_eng == MAX_ENGINES) {
            mill_errf(e, "publish: more than %d engines", MAX_ENGINES);
            goto out;
        }
        names[n_eng++] = tok;
    }
    if (connect_engines(w, socks, names, n_eng, e)) goto out;
    int ipc_ok = ipc && !publish_ipc(w, socks, names, n_eng, tmo, e);
    if (ipc) { /* every rank by IPC, or every rank in buckets */
        double bad = !ipc_ok;
        mill_err ae;
        if (comm_max_f64(w->d.par.dpcp, &bad, 1, &ae)) {
            *e = ae;
            goto out;
        }
        ipc_ok = bad == 0;
    }
    if (ipc_ok) {
        size_t lo, hi;
        model_shard_range(&w->dm, w->d.par.dpcp->rank, w->d.par.dpcp->size, &lo, &hi);
        bytes = (hi - lo) * sizeof(float);
    } else {
        /* an engine that cannot map this GPU's memory (another GPU, the CPU) gets buckets: all do,
         * on fresh sockets, so no late IPC reply is taken for a bucket's */
        if (ipc) {
            log_warn("publish: CUDA IPC refused or failed here or on another rank (%s); sending version %ld in buckets",
                     e->msg, w->version);
            if (connect_engines(w, socks, names, n_eng, e)) goto out;
        }
        ipc = 0;
        for (int i = 0; i < n_eng; i++) /* send to every engine, then collect: they stage in parallel */
            if (send_buckets(w, socks[i], w->version, (size_t)(mb * (1 << 20)), &buckets[i], &bytes, e)) {
                mill_err_wrap(e, "publish to %s", names[i]);
                goto out;
            }
        if (await_acks(w, socks, names, buckets, n_eng, tmo, e)) goto out;
    }
    /* every sender's part acknowledged (the engines swapped at the last one): then it is published */
    double total = (double)bytes;
    if (comm_sum_f64(w->d.par.dpcp, &total, 1, e) || comm_sum_f64(w->d.par.pp, &total, 1, e) ||
        comm_barrier(w->d.par.dpcp, e) || comm_barrier(w->d.par.pp, e))
        goto out;
    bytes = (size_t)total;
    *reply = wire_builder_new("published", wire_id(msg));
    if (!*reply) {
        mill_errf(e, "publish: out of memory");
        goto out;
    }
    wire_put_int(*reply, "version", w->version);
    wire_put_int(*reply, "bytes", (int64_t)bytes);
    wire_put_num(*reply, "seconds", mill_now() - t0);
    wire_put_str(*reply, "path", ipc ? "ipc" : "buckets");
    if (w->d.par.rank == 0)
        log_info("publish: version %ld to %d engine(s) by %s from %d sender(s), %.1f MiB in %.3f s", w->version, n_eng,
                 ipc ? "CUDA IPC" : "buckets", w->d.par.dpcp->size * w->d.par.sz.pp, (double)bytes / (1 << 20),
                 mill_now() - t0);
    rc = 0;
out:
    for (int i = 0; i < n_eng; i++)
        if (socks[i]) zmq_close(socks[i]);
    return rc;
}

/* ---------------------------------------------------------------------- save */

static int handle_save(worker *w, const wire_msg *msg, wire_builder **reply, mill_err *e) {
    char dir[1024];
    int64_t pos;
    if (!w->ready) return mill_errf(e, "save: send init first");
    if (wire_get_str(msg, "dir", 1, NULL, dir, sizeof dir, e) ||
        wire_get_int(msg, "data_position", 0, 0, 0, INT64_MAX, &pos, e))
        return -1;
    train_state ts = {.step = train_opt(w)->step, .data_position = (uint64_t)pos};
    const wire_frame *fr = wire_frame_named(msg, "rng");
    if (fr) {
        if (fr->dtype != DTYPE_U8 || fr->nbytes != sizeof ts.data_rng)
            return mill_errf(e, "save: frame \"rng\" must be U8 [%zu]", sizeof ts.data_rng);
        memcpy(&ts.data_rng, fr->data, sizeof ts.data_rng);
    }
    if (checkpoint_save(dir, train_model(w), train_opt(w), &ts, &w->k, e)) return -1;
    *reply = wire_builder_new("saved", wire_id(msg));
    if (!*reply) return mill_errf(e, "save: out of memory");
    wire_put_str(*reply, "dir", dir);
    wire_put_int(*reply, "version", w->version);
    return 0;
}

/* ---------------------------------------------------------------------- loop */

static wire_builder *simple(const char *type, uint64_t id, long version) {
    wire_builder *b = wire_builder_new(type, id);
    if (b) wire_put_int(b, "version", version);
    return b;
}

/* A request from rank 0 to the other ranks: the part count and sizes, then each part's bytes. */
typedef struct {
    void *buf;
    const void *parts[WIRE_MAX_FRAMES + 1];
    size_t lens[WIRE_MAX_FRAMES + 1];
    int n;
} relayed;

static int relay(worker *w, const wire_raw *raw, relayed *rl, mill_err *e) {
    int64_t hdr[WIRE_MAX_FRAMES + 2] = {0};
    if (raw) {
        rl->n = wire_raw_parts(raw, 1, rl->parts, rl->lens, WIRE_MAX_FRAMES + 1);
        hdr[0] = rl->n;
        for (int i = 0; i < rl->n; i++) hdr[1 + i] = (int64_t)rl->lens[i];
    }
    comm_watch_idle(w->world, 1); /* the next request may be long in coming */
    int x = comm_broadcast(w->world, hdr, WIRE_MAX_FRAMES + 2, DTYPE_I64, 0, e);
    comm_watch_idle(w->world, 0);
    TRY(x);
    size_t total = 0;
    rl->n = (int)hdr[0];
    for (int i = 0; i < rl->n; i++) total += (size_t)hdr[1 + i];
    if (!raw && !(rl->buf = malloc(total ? total : 1))) return mill_errf(e, "trainer: out of memory for a request");
    for (int i = 0, off = 0; i < rl->n; off += (int)hdr[1 + i], i++) {
        if (!raw) {
            rl->parts[i] = (char *)rl->buf + off;
            rl->lens[i] = (size_t)hdr[1 + i];
        }
        TRY(comm_broadcast(w->world, (void *)rl->parts[i], rl->lens[i], DTYPE_U8, 0, e));
    }
    return 0;
}

/* Every rank ran the request: all failed alike (a bad request: rank 0 answers the error and the
 * trainer goes on), none failed, or some did, when the ranks no longer agree and the job ends. */
static int agree(worker *w, int failed, mill_err *me) {
    double n = failed != 0;
    mill_err e;
    if (comm_sum_f64(w->world, &n, 1, &e)) return -1;
    if (n > 0 && n < w->world->size) {
        char why[1200];
        snprintf(why, sizeof why, "%s", failed ? me->msg : "another rank failed the request");
        comm_abort(w->world, why);
    }
    return 0;
}

static wire_builder *handle(worker *w, const wire_msg *msg, int *stop, mill_err *me) {
    const char *t = wire_type(msg);
    uint64_t id = wire_id(msg);
    wire_builder *reply = NULL;
    int x = 0;
    if (!strcmp(t, "init")) x = handle_init(w, msg, &reply, me);
    else if (!strcmp(t, "train")) x = handle_train(w, msg, &reply, me);
    else if (!strcmp(t, "publish")) x = handle_publish(w, msg, &reply, me);
    else if (!strcmp(t, "save")) x = handle_save(w, msg, &reply, me);
    else if (!strcmp(t, "release_memory")) { /* the engine's turn: give back activations and gradients */
        arena_free(&w->a);
        worker_arenas_free(w);
        mem_free(w->k.device, w->grads);
        w->grads = NULL;
        reply = simple("released", id, w->version);
    } else if (!strcmp(t, "resume")) {
        reply = simple("resumed", id, w->version);
    } else if (!strcmp(t, "shutdown")) {
        *stop = 1;
        reply = simple("bye", id, w->version);
    } else {
        x = mill_errf(me, "unknown message type \"%s\" (see trainer/PROTOCOL.md)", t);
    }
    if (x) {
        wire_builder_free(reply);
        return NULL;
    }
    return reply;
}

int trainer_worker_run(const char *bind, const wire_curve *curve, mill_err *e) {
    worker w = {0};
    int rc = -1, linger = 0, stop = 0;
    if (comm_world_init(&w.world, e)) return -1;
    int lead = w.world->rank == 0, many = w.world->size > 1;
    if (kctx_init(&w.k, DEVICE_CPU, e)) {
        comm_world_end(w.world, 1);
        return -1;
    }
    w.curve = curve;
    wire_zap *zap = NULL;
    if (lead) { /* rank 0 talks to the controller */
        w.zctx = zmq_ctx_new();
        if (!w.zctx || !(w.sock = zmq_socket(w.zctx, ZMQ_ROUTER)) ||
            zmq_setsockopt(w.sock, ZMQ_LINGER, &linger, sizeof linger)) {
            mill_errf(e, "trainer: cannot make a socket: %s", zmq_strerror(zmq_errno()));
            goto out;
        }
        if (wire_curve_server(w.sock, curve, e) || wire_zap_start(w.zctx, curve, &zap, e)) goto out;
        if (zmq_bind(w.sock, bind)) {
            mill_errf(e, "trainer: cannot bind %s: %s", bind, zmq_strerror(zmq_errno()));
            goto out;
        }
    } else if (!(w.zctx = zmq_ctx_new())) { /* the others open sockets to engines only (publish) */
        mill_errf(e, "trainer: cannot make a ZeroMQ context");
        goto out;
    }
    while (!stop) {
        unsigned char peer[256];
        size_t plen = 0;
        wire_msg *msg = NULL;
        wire_raw *raw = NULL;
        relayed rl = {0};
        mill_err me = {{0}};
        if (lead) {
            int r = wire_recv(w.sock, 1, -1, peer, &plen, &msg, &raw, &me);
            if (r) { /* undecodable: answered here, never relayed */
                if (r < 0 && plen) reply_error(&w, peer, plen, wire_raw_id(raw, 1), me.msg); /* its id, if readable */
                wire_recv_free(raw);
                continue;
            }
        }
        if (many) { /* the same bytes to every rank, decoded there */
            if (relay(&w, raw, &rl, e)) goto out;
            if (!lead && wire_decode(&msg, rl.parts[0], rl.lens[0], rl.parts + 1, rl.lens + 1, rl.n - 1, e)) {
                free(rl.buf);
                goto out;
            }
        }
        memcpy(w.peer, peer, plen);
        w.peer_len = plen;
        w.id = wire_id(msg);
        wire_builder *reply = handle(&w, msg, &stop, &me);
        if (many && agree(&w, !reply, &me)) goto out;
        if (lead) {
            if (!reply) reply_error(&w, peer, plen, w.id, me.msg);
            else wire_send(w.sock, peer, plen, reply, &me);
        } else if (!reply) {
            log_error("trainer rank %d: %s", w.world->rank, me.msg);
        }
        wire_builder_free(reply);
        wire_msg_free(msg);
        wire_recv_free(raw);
        free(rl.buf);
    }
    rc = 0;
out:
    if (w.sock) zmq_close(w.sock);
    wire_zap_stop(zap);
    if (w.zctx) zmq_ctx_term(w.zctx);
    mem_free(w.k.device, w.grads);
    arena_free(&w.a);
    worker_arenas_free(&w);
    if (w.ready) {
        optimizer_free(&w.opt);
        model_free(&w.m);
        if (w.algo.kl_coef != 0) model_free(&w.ref);
        if (w.gpu) {
            optimizer_free(&w.dopt);
            model_free(&w.dm);
            if (w.algo.kl_coef != 0) model_free(&w.dref);
        }
    }
    if (w.dist_on) dist_free(&w.d);
    kctx_free(&w.k);
    comm_world_end(w.world, rc != 0);
    return rc;
}
