#include "dist.h"

#include "../kernels/dense.h"

#include <stdlib.h>
#include <string.h>

model_stage dist_rank_stage(const par_sizes *s, const dsv4_config *cfg, int r, int q, int t) {
    model_stage st = {.n_chunks = par_vpp(s), .first = r == 0, .last = r == s->pp - 1, .tp = s->tp, .tp_rank = t,
                      .sp = s->sp && s->tp > 1, .cp = s->cp};
    for (int c = 0; c < st.n_chunks; c++)
        par_stage_layers(s, cfg->num_hidden_layers, c * s->pp + r, &st.l0[c], &st.l1[c]);
    if (s->ep > 1) {
        int El = cfg->n_routed_experts / s->ep;
        st.x0 = q * El, st.x1 = (q + 1) * El;
    }
    return st;
}

static int ep_a2a(void *ctx, const void *send, const size_t *sc, const size_t *sd, void *recv, const size_t *rc,
                  const size_t *rd, mill_dtype dt, int host, mill_err *e) {
    dist_ctx *d = ctx;
    for (int q = 0; !host && q < d->ep->size; q++)
        if (q != d->ep->rank) d->ep_bytes += (double)sc[q] * (double)dtype_size(dt);
    return comm_all_to_allv(host ? d->par.ep : d->ep, send, sc, sd, recv, rc, rd, dt, e);
}

static int tp_all_reduce(void *ctx, float *buf, size_t n, mill_err *e) {
    dist_ctx *d = ctx;
    d->tp_bytes += 2.0 * (d->tp->size - 1) / d->tp->size * (double)n * sizeof(float);
    return comm_all_reduce(d->tp, buf, n, DTYPE_F32, e);
}

/* buf [size x n]: every rank's n elements, its own at rank x n on entry. */
static int gather_equal(comm *c, void *buf, size_t n, mill_dtype dt, mill_err *e) {
    size_t *cnt = malloc(sizeof(size_t) * 2 * (size_t)c->size), *dsp = cnt ? cnt + c->size : NULL;
    if (!cnt) return mill_errf(e, "%s: out of memory", c->name);
    for (int r = 0; r < c->size; r++) cnt[r] = n, dsp[r] = (size_t)r * n;
    int rc = comm_all_gatherv(c, buf, cnt, dsp, dt, e);
    free(cnt);
    return rc;
}

static int tp_all_gather(void *ctx, void *buf, size_t n, mill_dtype dt, mill_err *e) {
    dist_ctx *d = ctx;
    d->tp_bytes += (double)(d->tp->size - 1) * (double)n * (double)dtype_size(dt);
    return gather_equal(d->tp, buf, n, dt, e);
}

static int tp_gather_rows(void *ctx, void *buf, long rows, size_t width, mill_dtype dt, mill_err *e) {
    dist_ctx *d = ctx;
    comm *c = d->tp;
    size_t *cnt = malloc(sizeof(size_t) * 2 * (size_t)c->size), *dsp = cnt ? cnt + c->size : NULL;
    if (!cnt) return mill_errf(e, "tp: out of memory");
    for (int r = 0; r < c->size; r++) {
        int64_t lo, hi;
        model_split_range(rows, c->size, r, &lo, &hi);
        cnt[r] = (size_t)(hi - lo) * width, dsp[r] = (size_t)lo * width;
    }
    d->tp_bytes += (double)(c->size - 1) * (double)cnt[c->rank] * (double)dtype_size(dt);
    int rc = comm_all_gatherv(c, buf, cnt, dsp, dt, e);
    free(cnt);
    return rc;
}

/* Rows in equal blocks are the reduce-scatter's own layout; uneven ones are summed whole (the
 * all-reduce: twice the bytes, the same sums). */
static int tp_scatter_rows(void *ctx, float *buf, long rows, size_t width, mill_err *e) {
    comm *c = ((dist_ctx *)ctx)->tp;
    if (rows % c->size) return comm_all_reduce(c, buf, (size_t)rows * width, DTYPE_F32, e);
    return comm_reduce_scatter(c, buf, (size_t)(rows / c->size) * width, DTYPE_F32, e);
}

static int tp_gather(void *ctx, const float *mine, float *all, size_t n, mill_err *e) {
    comm *c = ((dist_ctx *)ctx)->par.tp; /* host memory: the MPI comm */
    memcpy(all + (size_t)c->rank * n, mine, sizeof(float) * n);
    return gather_equal(c, all, n, DTYPE_F32, e);
}

static int cp_gather(void *ctx, void *buf, const size_t *counts, const size_t *displs, mill_dtype dt, mill_err *e) {
    return comm_all_gatherv(((dist_ctx *)ctx)->cp, buf, counts, displs, dt, e);
}

static int cp_all_reduce(void *ctx, float *buf, size_t n, mill_err *e) {
    return comm_all_reduce(((dist_ctx *)ctx)->cp, buf, n, DTYPE_F32, e);
}

void dist_ep_io(dist_ctx *d, dsv4_model *m) {
    m->cp = d->par.sz.cp > 1 ? (model_cp_io){cp_gather, cp_all_reduce, d} : (model_cp_io){0};
    m->ep = d->par.sz.ep > 1 ? (model_ep_io){d->par.sz.ep, d->par.ep_rank, ep_a2a, d} : (model_ep_io){0};
    m->tp = d->par.sz.tp > 1 ? (model_tp_io){tp_all_reduce, tp_all_gather, tp_gather_rows, tp_scatter_rows, tp_gather, d} : (model_tp_io){0};
}

int dist_init(dist_ctx *d, comm *world, const par_sizes *s, const dsv4_config *cfg, long batch_rows, const kctx *k,
              mill_err *e) {
    memset(d, 0, sizeof *d);
    TRY(par_validate(s, cfg, world->size, batch_rows, e));
    TRY(par_init(&d->par, world, s, e));
    d->dp = d->par.dpcp;
    d->cp = d->par.cp;
    d->pp = d->par.pp;
    d->ep = d->par.ep;
    d->edp = d->par.edp;
    d->tp = d->par.tp;
    d->k = k;
    d->wire = s->pp_wire == PAR_WIRE_BF16 || (s->pp_wire == PAR_WIRE_AUTO && k->device == DEVICE_CUDA) ? DTYPE_BF16
                                                                                                      : DTYPE_F32;
    if (cfg) d->stage = dist_rank_stage(s, cfg, d->par.pp_rank, d->par.ep_rank, d->par.tp_rank);
    d->stage.cp_rank = d->par.cp_rank;
    /* on a GPU the dp group is NCCL's, one rank included (its ops are no-ops there, but a world of
     * one runs the same setup as many); the pp group's when there are stages, ep and edp's with
     * experts over ranks */
    if (k->device == DEVICE_CUDA && (comm_nccl_from(d->par.dpcp, k->stream, &d->dp, e) ||
                                     (s->cp > 1 && comm_nccl_from(d->par.cp, k->stream, &d->cp, e)) ||
                                     (s->pp > 1 && comm_nccl_from(d->par.pp, k->stream, &d->pp, e)) ||
                                     (s->ep > 1 && (comm_nccl_from(d->par.ep, k->stream, &d->ep, e) ||
                                                    comm_nccl_from(d->par.edp, k->stream, &d->edp, e))) ||
                                     (s->tp > 1 && comm_nccl_from(d->par.tp, k->stream, &d->tp, e)))) {
        dist_free(d);
        return mill_err_wrap(e, "groups on the GPU");
    }
    return 0;
}

/* Four staging slots of cap elements in the wire type: the forward input and the backward gradient
 * received, the forward output and the backward gradient to send. */
struct dist_wire {
    void *buf;
    size_t cap;
};

void dist_free(dist_ctx *d) {
    if (d->dp && d->dp != d->par.dpcp) comm_free(d->dp);
    if (d->cp && d->cp != d->par.cp) comm_free(d->cp);
    if (d->pp && d->pp != d->par.pp) comm_free(d->pp);
    if (d->ep && d->ep != d->par.ep) comm_free(d->ep);
    if (d->edp && d->edp != d->par.edp) comm_free(d->edp);
    if (d->tp && d->tp != d->par.tp) comm_free(d->tp);
    if (d->bufs) mem_free(d->k->device, d->bufs->buf);
    free(d->bufs);
    par_free(&d->par);
    memset(d, 0, sizeof *d);
}

/* One run of dist_pipeline: the order, the op running now, and what the staging slots hold. */
typedef struct {
    dist_ctx *d;
    const pipe_op *order;
    int n, j, vpp;
    const size_t *elems;
    int recv_for[2]; /* the op whose input (0) or gradient (1) slot holds, -1: none */
    struct {
        int peer;
        size_t n;
    } send[2]; /* the forward output (0) and backward gradient (1) waiting for the next batch; n 0: none */
    int order_sent[2], n_sent; /* their order of arrival (the batch keeps it) */
} pipe_run;

static void *slot(const dist_ctx *d, int i) {
    return (char *)d->bufs->buf + (size_t)i * d->bufs->cap * dtype_size(d->wire);
}

static int pipe_recv(void *ctx, float *buf, size_t n, int grad, mill_err *e) {
    pipe_run *p = ctx;
    const dist_ctx *d = p->d;
    if (p->recv_for[grad] != p->j || p->elems[p->order[p->j].micro] != n)
        return mill_errf(e, "pipeline rank %d: op %d wants %zu boundary floats it has not received", d->par.pp_rank,
                         p->j, n);
    p->recv_for[grad] = -1;
    return d->wire == DTYPE_BF16 ? op_from_bf16(d->k, buf, slot(d, grad), n, e)
                                 : op_copy(d->k, buf, slot(d, grad), sizeof(float) * n, e);
}

static int pipe_send(void *ctx, const float *buf, size_t n, int grad, mill_err *e) {
    pipe_run *p = ctx;
    const dist_ctx *d = p->d;
    int peer = pipe_send_peer(d->par.sz.pp, p->vpp, d->par.pp_rank, &p->order[p->j]);
    if (peer < 0 || p->send[grad].n || n != p->elems[p->order[p->j].micro])
        return mill_errf(e, "pipeline rank %d: op %d sends %zu boundary floats out of turn", d->par.pp_rank, p->j, n);
    p->send[grad].peer = peer;
    p->send[grad].n = n;
    p->order_sent[p->n_sent++] = grad;
    return d->wire == DTYPE_BF16 ? op_to_bf16(d->k, slot(d, 2 + grad), buf, n, e)
                                 : op_copy(d->k, slot(d, 2 + grad), buf, sizeof(float) * n, e);
}

/* The batch after op j (pipe_batch): the waiting sends, then the next receives, at once. */
static int pipe_transfer(pipe_run *p, pipe_plan *plan, mill_err *e) {
    dist_ctx *d = p->d;
    int rf, rb, want[2], k = 0;
    if (!pipe_batch(p->order, p->n, p->j, plan, &rf, &rb)) return 0;
    comm_p2p ops[4];
    for (int i = 0; i < p->n_sent; i++) {
        int g = p->order_sent[i];
        ops[k++] = (comm_p2p){p->send[g].peer, 1, slot(d, 2 + g), p->send[g].n};
        p->send[g].n = 0;
    }
    p->n_sent = 0;
    want[0] = rf;
    want[1] = rb;
    for (int g = 0; g < 2; g++) {
        int peer = want[g] < 0 ? -1 : pipe_recv_peer(d->par.sz.pp, p->vpp, d->par.pp_rank, &p->order[want[g]]);
        if (peer < 0) continue;
        if (p->recv_for[g] >= 0)
            return mill_errf(e, "pipeline rank %d: op %d's input was never used", d->par.pp_rank, p->recv_for[g]);
        p->recv_for[g] = want[g];
        ops[k++] = (comm_p2p){peer, 0, slot(d, g), p->elems[p->order[want[g]].micro]};
    }
    if (!k) return 0;
    double t0 = mill_now();
    int rc = comm_sendrecv(d->pp, ops, k, d->wire, e);
    d->t_wait += mill_now() - t0;
    return rc;
}

int dist_pipeline(dist_ctx *d, const dsv4_model *m, int n_micro, int backward, const size_t *elems, dist_op_fn fn,
                  void *ctx, mill_err *e) {
    int pp = d->par.sz.pp, vpp = par_vpp(&d->par.sz), rc = -1;
    if (m->stage.n_chunks != vpp)
        return mill_errf(e, "pipeline: the model holds %d chunks of layers, the layout %d", m->stage.n_chunks, vpp);
    pipe_op *order = malloc(sizeof *order * (size_t)(2 * n_micro * vpp + 1));
    dsv4_model *views = malloc(sizeof *views * (size_t)vpp);
    if (!order || !views) {
        mill_errf(e, "pipeline: out of memory");
        goto out;
    }
    int n = pipe_schedule(pp, vpp, d->par.pp_rank, n_micro, backward, order);
    if (n < 0) {
        mill_errf(e, "pipeline: the interleaved 1F1B (vpp %d) runs a multiple of pp %d micro-batches, not %d", vpp, pp,
                  n_micro);
        goto out;
    }
    size_t cap = 0;
    for (int i = 0; i < n_micro; i++) cap = elems[i] > cap ? elems[i] : cap;
    if (pp > 1 && (!d->bufs || d->bufs->cap < cap)) { /* the staging slots, grown to this run's largest */
        if (!d->bufs && !(d->bufs = calloc(1, sizeof *d->bufs))) {
            mill_errf(e, "pipeline: out of memory");
            goto out;
        }
        mem_free(d->k->device, d->bufs->buf);
        d->bufs->cap = 0;
        if (!(d->bufs->buf = mem_alloc_copy(d->k->device, NULL, 4 * cap * dtype_size(d->wire), e))) goto out;
        d->bufs->cap = cap;
    }
    pipe_run run = {d, order, n, -1, vpp, elems, {-1, -1}, {{0, 0}, {0, 0}}, {0, 0}, 0};
    for (int c = 0; c < vpp; c++) { /* chunk c as a model of its own, its streams through run */
        views[c] = *m;
        views[c].stage = model_stage_chunk(&m->stage, c);
        views[c].io = (model_stage_io){pipe_recv, pipe_send, &run};
    }
    pipe_plan plan = {.interleaved = vpp > 1};
    if (pipe_transfer(&run, &plan, e)) goto out;
    for (run.j = 0; run.j < n; run.j++) {
        const pipe_op *op = &order[run.j];
        dsv4_model *v = &views[op->chunk];
        v->grad_ready = op->backward && op->micro == n_micro - 1 ? m->grad_ready : (model_grad_hook){0};
        if (fn(ctx, op, v, e) || pipe_transfer(&run, &plan, e)) goto out;
    }
    rc = 0;
out:
    free(order);
    free(views);
    return rc;
}

void dist_rows(const dist_ctx *d, long n, long *lo, long *hi) { par_range(n, d->par.dp_rank, d->par.sz.dp, lo, hi); }

size_t dist_stream_elems(const dist_ctx *d, const dsv4_model *m, long rows, int T) {
    int64_t lo, hi;
    model_split_range(T, d->par.sz.cp, d->par.cp_rank, &lo, &hi);
    long tokens = rows * (long)(hi - lo);
    if (m->stage.sp) model_split_range(tokens, m->stage.tp, m->stage.tp_rank, &lo, &hi);
    else lo = 0, hi = tokens;
    return (size_t)(hi - lo) * (size_t)m->cfg.hc_mult * (size_t)m->cfg.hidden_size;
}

/* Layer l's gradients over dp, its routed experts' inside it over edp (the ranks that hold the
 * same experts). */
static int reduce_layer(void *ctx, const dsv4_model *m, int l, mill_err *e) {
    dist_ctx *d = ctx;
    size_t lo, hi, x0, x1;
    /* partial in each slice, summed over tp first: the attention's whole tensors (their inputs come
     * from a slice of the heads), and under sequence parallelism every whole tensor (each rank saw
     * its own tokens) */
    model_layer_range(m, l, &lo, &hi);
    for (int i = 0; d->tp->size > 1 && i < m->n_params; i++) {
        const param_info *p = &m->params[i];
        if (p->offset >= lo && p->offset < hi && p->split < 0 && model_param_has_grad(p) &&
            (m->stage.sp || strstr(p->name, ".attn.")))
            TRY(comm_all_reduce(d->tp, d->grads + p->offset, p->numel, DTYPE_F32, e));
    }
    model_expert_range(m, l, &x0, &x1);
    if (x0 == x1) x0 = x1 = hi;
    if (x0 > lo && d->dp->size > 1) TRY(comm_all_reduce_async(d->dp, d->grads + lo, x0 - lo, DTYPE_F32, e));
    if (x1 > x0 && d->edp->size > 1) TRY(comm_all_reduce_async(d->edp, d->grads + x0, x1 - x0, DTYPE_F32, e));
    if (hi > x1 && d->dp->size > 1) TRY(comm_all_reduce_async(d->dp, d->grads + x1, hi - x1, DTYPE_F32, e));
    return 0;
}

void dist_hook(dist_ctx *d, dsv4_model *m, float *grads) {
    d->grads = grads;
    m->grad_ready.fn = d->dp->size > 1 || d->edp->size > 1 || d->tp->size > 1 ? reduce_layer : NULL;
    m->grad_ready.ctx = d;
}

void dist_unhook(dsv4_model *m) { memset(&m->grad_ready, 0, sizeof m->grad_ready); }

int dist_reduce_idle(dist_ctx *d, const dsv4_model *m, float *grads, mill_err *e) {
    d->grads = grads;
    for (int l = m->cfg.num_hidden_layers; l >= -1; l--) /* head group, layers last to first, embedding */
        TRY(reduce_layer(d, m, l, e));
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

/* Every member of c's flat buffer (member i holds sts[i]; mine and mine_index: this one's) into
 * out (its data, and index_data when mine_index is given) by tensor name. */
static int gather_by_name(comm *c, const model_stage *sts, const float *mine, const int32_t *mine_index,
                          dsv4_model *out, mill_err *e) {
    int S = c->size, me = c->rank, rc = -1;
    dsv4_model *st = calloc((size_t)S, sizeof *st);
    size_t *cnt = calloc((size_t)S * 4, sizeof(size_t)), *dsp = cnt + S, *icnt = cnt + 2 * S, *idsp = cnt + 3 * S;
    float *all = NULL;
    int32_t *alli = NULL;
    if (!st || !cnt) {
        mill_errf(e, "gather: out of memory");
        goto out;
    }
    size_t total = 0, itotal = 0;
    for (int s = 0; s < S; s++) { /* every member's table */
        if (model_layout_stage(&st[s], &out->cfg, sts[s], e)) goto out;
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
    if (comm_all_gatherv(c, all, cnt, dsp, DTYPE_F32, e) ||
        (mine_index && comm_all_gatherv(c, alli, icnt, idsp, DTYPE_I32, e)))
        goto out;
    for (int s = 0; s < S; s++) { /* each member's tensors, by name, into out */
        st[s].data = all + dsp[s];
        st[s].index_data = mine_index ? alli + idsp[s] : NULL;
        int32_t *keep = out->index_data;
        if (!mine_index) out->index_data = NULL;
        int x = model_copy_matching(out, &st[s], e);
        out->index_data = keep;
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

/* The tp ranks' slices (each holds st, its slice tp_rank) into out's whole tensors; the tensors
 * every slice holds whole (equal on every tp rank) from this one. */
static int gather_slices(comm *c, const model_stage *st, const float *mine, const int32_t *mine_index,
                         dsv4_model *out, mill_err *e) {
    dsv4_model lay = {0};
    TRY(model_layout_stage(&lay, &out->cfg, *st, e));
    int tp = c->size, rc = -1;
    size_t nf = lay.n_floats;
    float *all = malloc(sizeof(float) * (nf * (size_t)tp + 1));
    if (!all) {
        mill_errf(e, "gather: out of memory");
        goto out;
    }
    memcpy(all + (size_t)c->rank * nf, mine, sizeof(float) * nf);
    if (gather_equal(c, all, nf, DTYPE_F32, e)) goto out;
    for (int i = 0; i < lay.n_params; i++) {
        const param_info *p = &lay.params[i], *q = model_find_param(out, p->name);
        if (!q) {
            mill_errf(e, "gather: %s is not in the whole layout", p->name);
            goto out;
        }
        if (p->kind == PARAM_INDEX) {
            if (mine_index && out->index_data) memcpy(out->index_data + q->offset, mine_index + p->offset, sizeof(int32_t) * p->numel);
            continue;
        }
        if (p->split < 0) {
            memcpy(out->data + q->offset, mine + p->offset, sizeof(float) * p->numel);
            continue;
        }
        for (int r = 0; r < tp; r++) model_slice_copy(p, tp, r, all + (size_t)r * nf + p->offset, out->data + q->offset, 1);
    }
    rc = 0;
out:
    model_free(&lay);
    free(all);
    return rc;
}

int dist_gather_stages(dist_ctx *d, const float *mine, const int32_t *mine_index, dsv4_model *full, mill_err *e) {
    const par_sizes *sz = &d->par.sz;
    par_sizes tp1 = *sz, whole = *sz; /* whole tensors (tp 1), and every expert too (ep 1) */
    tp1.tp = 1;
    whole.tp = whole.ep = 1;
    const dsv4_config *cfg = &full->cfg;
    int pr = d->par.pp_rank, er = d->par.ep_rank;
    model_stage *sts = malloc(sizeof *sts * (size_t)(sz->ep > sz->pp ? sz->ep : sz->pp));
    if (!sts) return mill_errf(e, "gather: out of memory");
    /* over tp (the slices into whole tensors), then ep (every expert of this stage), then pp */
    dsv4_model tpw = {0}, stage = {0};
    int rc = 0;
    if (sz->tp > 1) {
        rc = model_init_stage(&tpw, cfg, dist_rank_stage(&tp1, cfg, pr, er, 0), e) ||
             gather_slices(d->par.tp, &d->stage, mine, mine_index, &tpw, e);
        mine = tpw.data;
        mine_index = mine_index ? tpw.index_data : NULL;
    }
    if (!rc && sz->ep > 1) {
        for (int q = 0; q < sz->ep; q++) sts[q] = dist_rank_stage(&tp1, cfg, pr, q, 0);
        rc = model_init_stage(&stage, cfg, dist_rank_stage(&whole, cfg, pr, 0, 0), e) ||
             gather_by_name(d->par.ep, sts, mine, mine_index, &stage, e);
        mine = stage.data;
        mine_index = mine_index ? stage.index_data : NULL;
    }
    for (int s = 0; !rc && s < sz->pp; s++) sts[s] = dist_rank_stage(&whole, cfg, s, 0, 0);
    rc = rc || gather_by_name(d->par.pp, sts, mine, mine_index, full, e);
    model_free(&tpw);
    model_free(&stage);
    free(sts);
    return rc;
}

typedef struct {
    const kctx *k;
    const int32_t *ids, *targets;
    int B, T, n_micro, vpp;
    ce_ctx c;
    double loss;
    float *grads;
    model_pass **pass; /* [n_micro x vpp] */
    arena *arenas;
} ce_run;

static int ce_op(void *ctx, const pipe_op *op, const dsv4_model *chunk, mill_err *e) {
    ce_run *r = ctx;
    int i = op->micro, at = i * r->vpp + op->chunk;
    long r0 = (long)r->B * i / r->n_micro, r1 = (long)r->B * (i + 1) / r->n_micro, mine;
    if (!op->backward) { /* forward of micro-batch i in its own arena */
        double l = 0;
        TRY(model_pass_forward(&r->pass[at], chunk, r->k, r->ids + r0 * r->T, r->targets + r0 * r->T, (int)(r1 - r0),
                               r->T, NULL, 1.0f, ce_global, &r->c, NULL, &l, &mine, &r->arenas[at], e));
        r->loss += l;
        return 0;
    }
    int x = model_pass_backward(r->pass[at], r->grads, e);
    model_pass_free(r->pass[at]);
    r->pass[at] = NULL;
    return x;
}

int dist_ce_step(dist_ctx *d, const dsv4_model *m, const kctx *k, const int32_t *ids, const int32_t *targets, int B,
                 int T, int n_micro, float *grads, model_loss *out, arena *arenas, mill_err *e) {
    double cnt = 0;
    for (long i = 0; i < (long)B * T; i++) cnt += targets[i] >= 0;
    TRY(comm_sum_f64(d->par.dp, &cnt, 1, e));
    if (cnt < 1) return mill_errf(e, "loss: no position of the batch has a target");
    if (n_micro < 1 || n_micro > B) return mill_errf(e, "train: %d micro-batches of %d rows", n_micro, B);
    int vpp = par_vpp(&d->par.sz), rc = -1;
    ce_run r = {k, ids, targets, B, T, n_micro, vpp, {(long)cnt}, 0, grads, NULL, arenas};
    size_t *elems = malloc(sizeof(size_t) * (size_t)n_micro);
    r.pass = calloc((size_t)(n_micro * vpp), sizeof *r.pass);
    if (!elems || !r.pass) {
        mill_errf(e, "train: out of memory");
        goto out;
    }
    for (int i = 0; i < n_micro; i++) /* the streams [rows, T, hc_mult, hidden] */
        elems[i] = dist_stream_elems(d, m, (long)B * (i + 1) / n_micro - (long)B * i / n_micro, T);
    if (dist_pipeline(d, m, n_micro, 1, elems, ce_op, &r, e) || comm_sum_f64(d->par.dpcp, &r.loss, 1, e) ||
        comm_sum_f64(d->par.pp, &r.loss, 1, e)) /* the last stage's */
        goto out;
    out->loss = r.loss;
    out->count = r.c.count;
    rc = 0;
out:
    for (int i = 0; r.pass && i < n_micro * vpp; i++) model_pass_free(r.pass[i]);
    free(r.pass);
    free(elems);
    return rc;
}
