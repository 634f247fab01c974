#include "dist.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

int dist_init(dist_ctx *d, comm *world, const par_sizes *s, const dsv4_config *cfg, long batch_rows, const kctx *k,
              mill_err *e) {
    memset(d, 0, sizeof *d);
    TRY(par_validate_stages(s, cfg, world->size, batch_rows, e));
    TRY(par_init(&d->par, world, s, e));
    d->dp = d->par.dp;
    d->pp = d->par.pp;
    if (cfg) {
        par_stage_layers(s, cfg->num_hidden_layers, d->par.pp_rank, &d->stage.l0, &d->stage.l1);
        d->stage.first = d->par.pp_rank == 0;
        d->stage.last = d->par.pp_rank == s->pp - 1;
    }
    /* on a GPU the dp group is NCCL's, one rank included (its ops are no-ops there, but a world of
     * one runs the same setup as many); the pp group's when there are stages */
    if (k->device == DEVICE_CUDA && (comm_nccl_from(d->par.dp, k->stream, &d->dp, e) ||
                                     (s->pp > 1 && comm_nccl_from(d->par.pp, k->stream, &d->pp, e)))) {
        dist_free(d);
        return mill_err_wrap(e, "groups on the GPU");
    }
    return 0;
}

void dist_free(dist_ctx *d) {
    if (d->dp && d->dp != d->par.dp) comm_free(d->dp);
    if (d->pp && d->pp != d->par.pp) comm_free(d->pp);
    par_free(&d->par);
    memset(d, 0, sizeof *d);
}

/* The streams forward to the next stage and their gradients back to the previous one. A send waits
 * for this stage's next receive and goes out in one batch with it (Megatron's send_forward_recv_backward
 * pairing): two neighbours that both send before they receive cannot block each other. */
static double wall(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int pending_flush(dist_ctx *d, mill_err *e) {
    if (!d->pend.buf) return 0;
    comm_p2p op = {d->pend.peer, 1, d->pend.buf, d->pend.n};
    d->pend.buf = NULL;
    double t0 = wall();
    int rc = comm_sendrecv(d->pp, &op, 1, DTYPE_F32, e);
    d->t_wait += wall() - t0;
    return rc;
}

static int stage_recv(void *ctx, float *buf, size_t n, int grad, mill_err *e) {
    dist_ctx *d = ctx;
    comm_p2p ops[2] = {{d->par.pp_rank + (grad ? 1 : -1), 0, buf, n}, {d->pend.peer, 1, d->pend.buf, d->pend.n}};
    double t0 = wall();
    int rc = comm_sendrecv(d->pp, ops, d->pend.buf ? 2 : 1, DTYPE_F32, e);
    d->t_wait += wall() - t0;
    d->pend.buf = NULL;
    return rc;
}

static int stage_send(void *ctx, const float *buf, size_t n, int grad, mill_err *e) {
    dist_ctx *d = ctx;
    TRY(pending_flush(d, e)); /* one in waiting at most (the first and last stages send twice in a row) */
    d->pend.buf = (float *)buf; /* in the micro-batch's arena, untouched until its pass is freed */
    d->pend.n = n;
    d->pend.peer = d->par.pp_rank + (grad ? -1 : 1);
    return 0;
}

int dist_stage_flush(dist_ctx *d, mill_err *e) { return pending_flush(d, e); }

void dist_stage_io(dist_ctx *d, dsv4_model *m) {
    m->io = (model_stage_io){stage_recv, stage_send, d};
}

void dist_rows(const dist_ctx *d, long n, long *lo, long *hi) { par_range(n, d->par.dp_rank, d->par.sz.dp, lo, hi); }

static int reduce_layer(void *ctx, size_t lo, size_t hi, mill_err *e) {
    dist_ctx *d = ctx;
    return comm_all_reduce_async(d->dp, d->grads + lo, hi - lo, DTYPE_F32, e);
}

void dist_hook(dist_ctx *d, dsv4_model *m, float *grads) {
    d->grads = grads;
    m->grad_ready.fn = d->dp->size > 1 ? reduce_layer : NULL;
    m->grad_ready.ctx = d;
}

void dist_unhook(dsv4_model *m) { memset(&m->grad_ready, 0, sizeof m->grad_ready); }

int dist_reduce_idle(dist_ctx *d, const dsv4_model *m, float *grads, mill_err *e) {
    d->grads = grads;
    for (int l = m->cfg.num_hidden_layers; l >= -1; l--) { /* head group, layers last to first, embedding */
        size_t lo, hi;
        model_layer_range(m, l, &lo, &hi);
        if (lo < hi && d->dp->size > 1) TRY(reduce_layer(d, lo, hi, e));
    }
    return 0;
}

typedef struct {
    long count; /* the whole batch's counted positions */
} ce_ctx;

/* loss = -sum(logp) / global count over this rank's positions: the ranks' losses add up to the mean. */
static int ce_global(void *ctx, const float *logp, const float *ent, int n, float *dlogp, float *dent, double *loss,
                     mill_err *e) {
    (void)ent, (void)dent, (void)e;
    long cnt = ((ce_ctx *)ctx)->count;
    double s = 0.0;
    for (int i = 0; i < n; i++) {
        s -= logp[i];
        dlogp[i] = -1.0f / (float)cnt;
    }
    *loss = s / (double)cnt;
    return 0;
}

int dist_gather_stages(dist_ctx *d, const float *mine, const int32_t *mine_index, dsv4_model *full, mill_err *e) {
    int S = d->par.sz.pp, me = d->par.pp_rank, rc = -1;
    dsv4_model *st = calloc((size_t)S, sizeof *st);
    size_t *cnt = calloc((size_t)S * 4, sizeof(size_t)), *dsp = cnt + S, *icnt = cnt + 2 * S, *idsp = cnt + 3 * S;
    float *all = NULL;
    int32_t *alli = NULL;
    if (!st || !cnt) {
        mill_errf(e, "gather: out of memory");
        goto out;
    }
    size_t total = 0, itotal = 0;
    for (int s = 0; s < S; s++) { /* every stage's table */
        model_stage sg = {0, 0, s == 0, s == S - 1};
        par_stage_layers(&d->par.sz, full->cfg.num_hidden_layers, s, &sg.l0, &sg.l1);
        if (model_layout_stage(&st[s], &full->cfg, sg, e)) goto out;
        dsp[s] = total;
        cnt[s] = st[s].n_floats;
        total += cnt[s];
        idsp[s] = itotal;
        icnt[s] = st[s].n_index;
        itotal += icnt[s];
    }
    all = malloc(sizeof(float) * (total ? total : 1));
    alli = malloc(sizeof(int32_t) * (itotal ? itotal : 1));
    if (!all || !alli) {
        mill_errf(e, "gather: out of memory");
        goto out;
    }
    memcpy(all + dsp[me], mine, sizeof(float) * cnt[me]);
    if (mine_index) memcpy(alli + idsp[me], mine_index, sizeof(int32_t) * icnt[me]);
    if (comm_all_gatherv(d->par.pp, all, cnt, dsp, DTYPE_F32, e) ||
        (mine_index && comm_all_gatherv(d->par.pp, alli, icnt, idsp, DTYPE_I32, e)))
        goto out;
    for (int s = 0; s < S; s++) { /* each stage's tensors, by name, into the whole model */
        st[s].data = all + dsp[s];
        st[s].index_data = mine_index ? alli + idsp[s] : NULL;
        int32_t *keep = full->index_data;
        if (!mine_index) full->index_data = NULL;
        int x = model_copy_matching(full, &st[s], e);
        full->index_data = keep;
        st[s].data = NULL;
        st[s].index_data = NULL;
        if (x) goto out;
    }
    rc = 0;
out:
    for (int s = 0; st && s < S; s++) model_free(&st[s]);
    free(st);
    free(cnt);
    free(all);
    free(alli);
    return rc;
}

void dist_schedule_1f1b(int pp, int stage, int n_micro, int *order) {
    int warm = pp - stage - 1 < n_micro ? pp - stage - 1 : n_micro, f = 0, b = 0, k = 0;
    while (f < warm) order[k++] = f++;
    while (f < n_micro) { /* steady state: one forward, one backward */
        order[k++] = f++;
        order[k++] = -1 - b++;
    }
    while (b < n_micro) order[k++] = -1 - b++;
}

int dist_ce_step(dist_ctx *d, const dsv4_model *m, const kctx *k, const int32_t *ids, const int32_t *targets, int B,
                 int T, int n_micro, float *grads, model_loss *out, arena *arenas, mill_err *e) {
    double cnt = 0;
    for (long i = 0; i < (long)B * T; i++) cnt += targets[i] >= 0;
    TRY(comm_sum_f64(d->par.dp, &cnt, 1, e));
    if (cnt < 1) return mill_errf(e, "loss: no position of the batch has a target");
    if (n_micro < 1 || n_micro > B) return mill_errf(e, "train: %d micro-batches of %d rows", n_micro, B);
    ce_ctx c = {(long)cnt};
    double loss = 0;
    model_grad_hook hook = m->grad_ready; /* the reduction starts in the last backward only */
    model_pass **pass = calloc((size_t)n_micro, sizeof *pass);
    int *order = malloc(sizeof(int) * 2 * (size_t)n_micro), rc = -1;
    if (!pass || !order) {
        mill_errf(e, "train: out of memory");
        goto out;
    }
    dist_schedule_1f1b(d->par.sz.pp, d->par.pp_rank, n_micro, order);
    for (int s = 0; s < 2 * n_micro; s++) {
        int i = order[s] >= 0 ? order[s] : -1 - order[s];
        long r0 = (long)B * i / n_micro, r1 = (long)B * (i + 1) / n_micro, mine;
        double l = 0;
        if (order[s] >= 0) { /* forward of micro-batch i in its own arena */
            if (model_pass_forward(&pass[i], m, k, ids + r0 * T, targets + r0 * T, (int)(r1 - r0), T, NULL, 1.0f,
                                   ce_global, &c, NULL, &l, &mine, &arenas[i], e))
                goto out;
            loss += l;
            continue;
        }
        ((dsv4_model *)m)->grad_ready = i == n_micro - 1 ? hook : (model_grad_hook){0};
        int x = model_pass_backward(pass[i], grads, e);
        model_pass_free(pass[i]);
        pass[i] = NULL;
        if (x) goto out;
    }
    if (dist_stage_flush(d, e) || comm_sum_f64(d->par.dp, &loss, 1, e) ||
        comm_sum_f64(d->par.pp, &loss, 1, e)) /* the last stage's */
        goto out;
    out->loss = loss;
    out->count = c.count;
    rc = 0;
out:
    ((dsv4_model *)m)->grad_ready = hook;
    for (int i = 0; pass && i < n_micro; i++) model_pass_free(pass[i]);
    free(pass);
    free(order);
    return rc;
}
