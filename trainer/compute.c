/* trainer/compute.c — the DeepSeek-V4 forward and its hand-written backward (llm.c style:
 * the forward records what the backward needs in a trace held by the arena; the backward
 * walks the layers in reverse, recomputing the cheap parts: attention probabilities,
 * Sinkhorn, expert activations). Device-agnostic: every touch of activation or weight memory is
 * an op (kernels/), so the same code runs on the CPU and, with a CUDA kctx, a model from
 * model_to_device and a device arena, on the GPU. Host-built index arrays (token ids, targets,
 * replay, positions) go to the arena in one copy per call; the per-layer trace index lives on
 * the host. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/attention.h"
#include "../kernels/dense.h"
#include "../kernels/hc.h"
#include "../kernels/moe.h"
#include "../kernels/optim.h"
#include "../kernels/rope.h"
#include "model.h"

/* Expert parallelism's trace of a layer: the rows this rank's experts received (x [R, D], their
 * local expert ids, unit weights) and every (token, slot)'s expert output that came back (Y [N*K, D]). */
typedef struct {
    float *x, *ones, *Y;
    int32_t *id;
    long R;
} moe_ep_trace;

/* What one hyper-connection site keeps: its input streams and the mixing weights. */
typedef struct {
    float *h_in, *pre, *post, *comb; /* [N,n,D], [N,n], [N,n], [N,n,n] (this rank's tokens under sp) */
    float *x, *xn, *y;               /* collapsed input, normed input, sublayer output [N,D] (the same) */
    float *xf; /* the normed input of every token (sp: gathered; else xn) for attention, shared experts */
} site_trace;

typedef struct {
    site_trace attn, ffn;
    /* attention */
    float *qr_raw, *qr, *q_raw, *q, *kv_raw, *kv, *o, *o_rot, *z;
    float *ca, *cg, *pooled, *comp; /* compressor: projections [N,width], pooled/entries [B,Tc,d] */
    float *kvf, *caf, *cgf; /* kv, ca, cg of the whole rows [B, Tf, .] (context parallelism: gathered) */
    int32_t *idx;                    /* [N, n_comp] compressed entries per query */
    int Tc, n_comp;
    /* MoE */
    float *logits, *scores, *wts;
    int32_t *ids;
    moe_ep_trace ep; /* expert parallelism: what the backward needs */
} layer_trace;

typedef struct {
    const dsv4_model *m;
    const kctx *k;
    arena *a;
    int B, T, N; /* rows, this rank's positions of each (context parallelism: a slice), tokens B * T */
    int cp, p0, Tf; /* context parallelism: positions [p0, p0 + T) of rows of Tf (without: 1, 0, T) */
    int sp, n0, Nl; /* sequence parallelism: this rank's tokens [n0, n0 + Nl) (without: 0 and N) */
    /* in the arena (device memory on CUDA): token ids [N], positions [N], per-layer compressed
     * entry positions wpos_all [layers, Tf] (entry w of layer l at w * ratio), targets [N] and
     * replay [layers, N, k] when given; wpos: the current layer's row */
    const int32_t *ids, *pos, *wpos, *wpos_all, *targets, *replay;
    mill_err *e;
    layer_trace *lt;                   /* [layers], host memory: pointers into the arena */
    float *host;                       /* host scratch of the token loss */
    float *dlogits;                    /* the last stage's d loss / d logits (tokens_forward) */
    float *h_final, *x_head, *xn_head; /* HC head input [Nl,n,D], its output and the normed output */
    float *xnf_head;                   /* the normed output of every token (sp: gathered) */
} fwd;

#define ALLOC(ptr, count)                                                          \
    do {                                                                           \
        (ptr) = (void *)arena_floats(f->a, (size_t)(count));                       \
        if (!(ptr)) return mill_errf(f->e, "forward: out of activation memory"); \
    } while (0)

/* ------------------------------------------------------------------- forward */

/* Context parallelism's key side, on w floats a position. cp_enter: the whole rows [B, Tf, w] of
 * this rank's positions [B, T, w] (every cp rank's gathered, then put in row order; without cp the
 * local rows are the whole ones). cp_leave: whole-row gradients [B, Tf, w], each rank's from its own
 * queries, summed over cp, and this rank's positions of them [B, T, w] (without cp: the same). */
static int cp_enter(fwd *f, const float *local, float **full, int w) {
    if (f->cp == 1) return *full = (float *)local, 0;
    int B = f->B, Tf = f->Tf, cp = f->cp;
    float *stage;
    ALLOC(stage, (long)B * Tf * w);
    ALLOC(*full, (long)B * Tf * w);
    size_t *cnt = malloc(sizeof(size_t) * 2 * (size_t)cp), *dsp = cnt ? cnt + cp : NULL;
    if (!cnt) return mill_errf(f->e, "cp: out of memory");
    for (int r = 0; r < cp; r++) { /* rank r's [B, its positions, w], in rank order */
        int64_t lo, hi;
        model_split_range(Tf, cp, r, &lo, &hi);
        cnt[r] = (size_t)B * (size_t)(hi - lo) * (size_t)w, dsp[r] = (size_t)B * (size_t)lo * (size_t)w;
    }
    int rc = op_copy(f->k, stage + dsp[f->m->stage.cp_rank], local, sizeof(float) * cnt[f->m->stage.cp_rank], f->e) ||
             f->m->cp.gather(f->m->cp.ctx, stage, cnt, dsp, DTYPE_F32, f->e);
    for (int r = 0; !rc && r < cp; r++) {
        long n = (long)(cnt[r] / (size_t)B / (size_t)w), lo = (long)(dsp[r] / (size_t)B / (size_t)w);
        for (int b = 0; !rc && b < B; b++)
            rc = op_copy(f->k, *full + ((long)b * Tf + lo) * w, stage + dsp[r] + (long)b * n * w,
                         sizeof(float) * (size_t)(n * w), f->e);
    }
    free(cnt);
    return rc ? -1 : 0;
}

static int cp_leave(fwd *f, float *full, float **local, int w) {
    if (f->cp == 1) return *local = full, 0;
    int B = f->B, T = f->T;
    TRY(f->m->cp.all_reduce(f->m->cp.ctx, full, (size_t)B * f->Tf * w, f->e));
    ALLOC(*local, (long)B * T * w);
    for (int b = 0; b < B; b++)
        TRY(op_copy(f->k, *local + (long)b * T * w, full + ((long)b * f->Tf + f->p0) * w,
                    sizeof(float) * (size_t)T * w, f->e));
    return 0;
}

static int compress_pool(fwd *f, float *pooled, float *comp, const float *a, const float *g, const float *ape,
                         const float *norm, int d, int ratio, int overlap) {
    const dsv4_config *c = &f->m->cfg;
    int T = f->Tf, Tc = T / ratio, width = overlap ? 2 * d : d; /* whole rows */
    for (int b = 0; b < f->B; b++) {
        float *pb = pooled + (long)b * Tc * d, *cb = comp + (long)b * Tc * d;
        TRY(op_compress_pool(f->k, pb, a + (long)b * T * width, g + (long)b * T * width, ape, T, d, ratio, overlap,
                             f->e));
        TRY(op_rmsnorm(f->k, cb, pb, norm, Tc, d, 0, (float)c->rms_norm_eps, f->e));
        TRY(op_rope(f->k, cb, Tc, 1, d, c->qk_rope_head_dim, f->wpos, f->m->inv_freq_compress, 1, f->e));
    }
    return 0;
}

/* Indexer of a CSA layer: sel[B*T, topk_eff] for this rank's queries against the whole rows' keys
 * (context parallelism: the key projections gathered). It takes no gradient (top-k is a selection). */
static int indexer_select(fwd *f, const dsv4_layer *L, int32_t *sel, int topk_eff, const float *x, const float *qr) {
    const dsv4_config *c = &f->m->cfg;
    int N = f->N, T = f->T, D = c->hidden_size, ih = c->index_head_dim, nh = c->index_n_heads, ratio = L->ratio;
    int Tc = f->Tf / ratio;
    float *ia, *ig, *iaf, *igf, *pooled, *keys, *iq, *iw, *score;
    ALLOC(ia, (long)N * 2 * ih);
    ALLOC(ig, (long)N * 2 * ih);
    ALLOC(pooled, (long)f->B * Tc * ih);
    ALLOC(keys, (long)f->B * Tc * ih);
    ALLOC(iq, (long)N * nh * ih);
    ALLOC(iw, (long)N * nh);
    ALLOC(score, (long)T * Tc);
    TRY(op_linear(f->k, ia, x, L->i_wkv, N, 2 * ih, D, 0, 0, 0, f->e));
    TRY(op_linear(f->k, ig, x, L->i_wgate, N, 2 * ih, D, 0, 0, 0, f->e));
    TRY(cp_enter(f, ia, &iaf, 2 * ih));
    TRY(cp_enter(f, ig, &igf, 2 * ih));
    TRY(compress_pool(f, pooled, keys, iaf, igf, L->i_ape, L->i_norm, ih, ratio, 1));
    TRY(op_linear(f->k, iq, qr, L->i_wq_b, N, nh * ih, c->q_lora_rank, 0, 0, 0, f->e));
    TRY(op_rope(f->k, iq, N, nh, ih, c->qk_rope_head_dim, f->pos, f->m->inv_freq_compress, 1, f->e));
    TRY(op_linear(f->k, iw, x, L->i_wproj, N, nh, D, 0, 0, 0, f->e));
    float wscale = 1.0f / sqrtf((float)nh);
    TRY(op_scale(f->k, iw, (long)N * nh, wscale, f->e));
    for (int b = 0; b < f->B; b++) {
        long t0 = (long)b * T;
        TRY(op_indexer_scores(f->k, score, iq + t0 * nh * ih, keys + (long)b * Tc * ih, iw + t0 * nh, T, f->p0, Tc, nh,
                              ih, 1.0f / sqrtf((float)ih), ratio, f->e));
        TRY(op_topk_visible(f->k, sel + t0 * topk_eff, score, T, f->p0, Tc, topk_eff, ratio, f->e));
    }
    return 0;
}

int model_attn_project(const dsv4_model *m, const kctx *k, int l, const float *x, const int32_t *pos, int N,
                       float *qr_raw, float *qr, float *q_raw, float *q, float *kv_raw, float *kv, mill_err *e) {
    const dsv4_config *c = &m->cfg;
    const dsv4_layer *L = &m->layers[l];
    int D = c->hidden_size, H = model_heads(m), d = c->head_dim, r = c->qk_rope_head_dim, qlr = c->q_lora_rank;
    float eps = (float)c->rms_norm_eps;
    const float *inv_freq = L->ratio ? m->inv_freq_compress : m->inv_freq_main;
    TRY(op_linear(k, qr_raw, x, L->wq_a, N, qlr, D, 0, 0, 0, e));
    TRY(op_rmsnorm(k, qr, qr_raw, L->q_norm, N, qlr, 0, eps, e));
    TRY(op_linear(k, q_raw, qr, L->wq_b, N, H * d, qlr, 0, 0, 0, e));
    TRY(op_rmsnorm(k, q, q_raw, NULL, N * H, d, 0, eps, e));
    TRY(op_rope(k, q, N, H, d, r, pos, inv_freq, 1, e));
    TRY(op_linear(k, kv_raw, x, L->wkv, N, d, D, 0, 0, 0, e));
    TRY(op_rmsnorm(k, kv, kv_raw, L->kv_norm, N, d, 0, eps, e));
    return op_rope(k, kv, N, 1, d, r, pos, inv_freq, 1, e);
}

int model_attn_output(const dsv4_model *m, const kctx *k, int l, const float *o, const int32_t *pos, int N,
                      float *o_rot, float *z, float *zg, float *y, mill_err *e) {
    const dsv4_config *c = &m->cfg;
    const dsv4_layer *L = &m->layers[l];
    int D = c->hidden_size, H = model_heads(m), d = c->head_dim, G = model_groups(m), R = c->o_lora_rank;
    int tp = m->stage.tp > 1 && m->stage.tp_exact ? m->stage.tp : 1;
    float *zl = tp > 1 ? zg + (long)m->stage.tp_rank * N * G * R : z; /* exact: this slice's piece of the gather */
    /* Values are the rotated keys: undo the rotation at the query position. */
    TRY(op_copy(k, o_rot, o, sizeof(float) * (size_t)N * H * d, e));
    TRY(op_rope(k, o_rot, N, H, d, c->qk_rope_head_dim, pos, L->ratio ? m->inv_freq_compress : m->inv_freq_main, -1,
                e));
    int gw = H * d / G; /* each group's rows of wo_a see only that group's heads */
    for (int g = 0; g < G; g++)
        TRY(op_linear(k, zl + (long)g * R, o_rot + (long)g * gw, L->wo_a + (long)g * R * gw, N, R, gw, H * d, G * R, 0,
                      e));
    if (tp > 1) { /* every slice's [N, G R] piece, then side by side in each row: the whole z */
        size_t w = sizeof(float) * (size_t)G * R;
        TRY(m->tp.all_gather(m->tp.ctx, zg, (size_t)N * G * R, DTYPE_F32, e));
        for (int t = 0; t < tp; t++) TRY(op_copy_2d(k, z + (long)t * G * R, w * tp, zg + (long)t * N * G * R, w, w, N, e));
    }
    return op_linear(k, y, z, L->wo_b, N, D, tp * G * R, 0, 0, 0, e);
}

/* Tensor parallelism: a slice's partial sum completed over the tp ranks (nothing without). */
static int tp_sum(const dsv4_model *m, float *buf, size_t n, mill_err *e) {
    return m->stage.tp > 1 ? m->tp.all_reduce(m->tp.ctx, buf, n, e) : 0;
}

/* Sequence parallelism's two crossings, on [tokens, D] floats. tp_enter: every token's rows from this
 * rank's [Nl, D] (an all-gather into a new [N, D]; without sp the local rows are all of them).
 * tp_leave: a slice's partial [N, D] sums completed, and this rank's rows of them (a reduce-scatter;
 * without sp an all-reduce, every row). */
static int tp_enter(fwd *f, const float *local, float **full) {
    int D = f->m->cfg.hidden_size;
    if (!f->sp) return *full = (float *)local, 0;
    ALLOC(*full, (long)f->N * D);
    TRY(op_copy(f->k, *full + (long)f->n0 * D, local, sizeof(float) * (size_t)f->Nl * (size_t)D, f->e));
    return f->m->tp.gather_rows(f->m->tp.ctx, *full, f->N, (size_t)D, DTYPE_F32, f->e);
}

static int tp_leave(fwd *f, float *full, float **local) {
    int D = f->m->cfg.hidden_size;
    *local = full + (long)f->n0 * D;
    if (!f->sp) return tp_sum(f->m, full, (size_t)f->N * D, f->e);
    return f->m->tp.scatter_rows(f->m->tp.ctx, full, f->N, (size_t)D, f->e);
}

/* y[N, D] = attention sublayer on x[N, D] (already attn_norm'ed). */
static int attention_forward(fwd *f, const dsv4_layer *L, layer_trace *t, float *y, const float *x) {
    const dsv4_config *c = &f->m->cfg;
    int N = f->N, T = f->T, D = c->hidden_size, H = model_heads(f->m), d = c->head_dim;
    int qlr = c->q_lora_rank, G = model_groups(f->m), R = c->o_lora_rank, ratio = L->ratio, l = (int)(L - f->m->layers);
    ALLOC(t->qr_raw, (long)N * qlr);
    ALLOC(t->qr, (long)N * qlr);
    ALLOC(t->q_raw, (long)N * H * d);
    ALLOC(t->q, (long)N * H * d);
    ALLOC(t->kv_raw, (long)N * d);
    ALLOC(t->kv, (long)N * d);
    ALLOC(t->o, (long)N * H * d);
    ALLOC(t->o_rot, (long)N * H * d);
    ALLOC(t->z, (long)N * G * R);
    TRY(model_attn_project(f->m, f->k, l, x, f->pos, N, t->qr_raw, t->qr, t->q_raw, t->q, t->kv_raw, t->kv, f->e));
    TRY(cp_enter(f, t->kv, &t->kvf, d)); /* the window's keys: the whole rows' */

    t->Tc = ratio ? f->Tf / ratio : 0;
    t->n_comp = 0;
    if (t->Tc) {
        int overlap = ratio == ATTN_CSA, width = overlap ? 2 * d : d, Tc = t->Tc;
        ALLOC(t->ca, (long)N * width);
        ALLOC(t->cg, (long)N * width);
        ALLOC(t->pooled, (long)f->B * Tc * d);
        ALLOC(t->comp, (long)f->B * Tc * d);
        TRY(op_linear(f->k, t->ca, x, L->c_wkv, N, width, D, 0, 0, 0, f->e));
        TRY(op_linear(f->k, t->cg, x, L->c_wgate, N, width, D, 0, 0, 0, f->e));
        TRY(cp_enter(f, t->ca, &t->caf, width)); /* entries pool the whole rows */
        TRY(cp_enter(f, t->cg, &t->cgf, width));
        TRY(compress_pool(f, t->pooled, t->comp, t->caf, t->cgf, L->c_ape, L->c_norm, d, ratio, overlap));
        t->n_comp = overlap ? (c->index_topk < Tc ? c->index_topk : Tc) : Tc;
        ALLOC(t->idx, (long)N * t->n_comp);
        if (overlap) TRY(indexer_select(f, L, t->idx, t->n_comp, x, t->qr));
        else
            for (int b = 0; b < f->B; b++)
                TRY(op_causal_entries(f->k, t->idx + (long)b * T * Tc, T, f->p0, Tc, ratio, f->e));
    }
    for (int b = 0; b < f->B; b++) { /* this rank's queries, at positions p0 .. of the whole rows */
        long t0 = (long)b * T;
        TRY(op_sink_attention(f->k, t->o + t0 * H * d, t->q + t0 * H * d, t->kvf + (long)b * f->Tf * d,
                              t->comp ? t->comp + (long)b * t->Tc * d : NULL, t->idx ? t->idx + t0 * t->n_comp : NULL,
                              t->n_comp, L->attn_sink, T, f->p0, H, d, c->sliding_window, 1.0f / sqrtf((float)d),
                              f->e));
    }
    return model_attn_output(f->m, f->k, l, t->o, f->pos, N, t->o_rot, t->z, NULL, y, f->e); /* partial: a slice of the heads */
}

/* ------------------------------------------------------- expert parallelism */

/* Where each (token, slot) pair of this rank's routing goes: pairs sorted by owner rank (stable),
 * with per-peer counts exchanged. Host: counts and displacements in pairs; device (the arena):
 * send slot i's pair perm[i] and token tok[i], pair p's send slot inv[p], slot i's expert local to
 * its owner lid[i]. */
typedef struct {
    long NK, R; /* pairs sent (all of this rank's), received */
    size_t *sc, *sd, *rc, *rd;
    int32_t *perm, *tok, *inv, *lid;
} ep_plan;

static void ep_plan_free(ep_plan *p) { free(p->sc); }

static int ep_plan_make(const dsv4_model *m, const kctx *k, const int32_t *ids, int N, arena *a, ep_plan *p,
                        mill_err *e) {
    const model_ep_io *ep = &m->ep;
    int P = ep->size, K = m->cfg.num_experts_per_tok, El = m->cfg.n_routed_experts / P;
    long NK = (long)N * K;
    memset(p, 0, sizeof *p);
    p->NK = NK;
    p->sc = calloc((size_t)P * 4, sizeof(size_t));
    int32_t *h = malloc(sizeof(int32_t) * (size_t)(5 * NK + 1));
    if (!p->sc || !h) {
        free(h);
        return mill_errf(e, "moe: out of memory for the expert-parallel plan");
    }
    p->sd = p->sc + P, p->rc = p->sc + 2 * P, p->rd = p->sc + 3 * P;
    int32_t *hid = h, *perm = h + NK, *tok = h + 2 * NK, *inv = h + 3 * NK, *lid = h + 4 * NK;
    int rc = op_copy_to_host(k, hid, ids, sizeof(int32_t) * (size_t)NK, e);
    for (long i = 0; !rc && i < NK; i++) p->sc[hid[i] / El]++;
    for (int q = 1; q < P; q++) p->sd[q] = p->sd[q - 1] + p->sc[q - 1];
    size_t *at = p->rd; /* scratch until the exchange: each owner's next slot */
    for (int q = 0; q < P; q++) at[q] = p->sd[q];
    for (long i = 0; !rc && i < NK; i++) {
        int q = hid[i] / El;
        long s = (long)at[q]++;
        perm[s] = (int32_t)i, tok[s] = (int32_t)(i / K), inv[i] = (int32_t)s, lid[s] = hid[i] - q * El;
    }
    size_t *one = malloc(sizeof(size_t) * 2 * (size_t)P), *idx = one + P; /* the counts, one per peer, over the host */
    if (!rc && !one) rc = mill_errf(e, "moe: out of memory");
    for (int q = 0; !rc && q < P; q++) one[q] = 1, idx[q] = (size_t)q;
    if (!rc) rc = ep->a2a(ep->ctx, p->sc, one, idx, p->rc, one, idx, DTYPE_I64, 1, e);
    free(one);
    p->rd[0] = 0;
    for (int q = 1; !rc && q < P; q++) p->rd[q] = p->rd[q - 1] + p->rc[q - 1];
    for (int q = 0; !rc && q < P; q++) p->R += (long)p->rc[q];
    if (!rc) {
        int32_t *d = (int32_t *)arena_floats(a, (size_t)(4 * NK + 1));
        if (!d) rc = mill_errf(e, "moe: out of activation memory");
        else if (!(rc = op_copy_from_host(k, d, perm, sizeof(int32_t) * (size_t)(4 * NK), e)))
            p->perm = d, p->tok = d + NK, p->inv = d + 2 * NK, p->lid = d + 3 * NK;
    }
    free(h);
    if (rc) ep_plan_free(p);
    return rc;
}

/* Rows of width elements from every send slot to its owner (back: from the owners to the slots). */
static int ep_move(const dsv4_model *m, const ep_plan *p, const void *send, void *recv, int width, mill_dtype dt,
                   int back, mill_err *e) {
    int P = m->ep.size;
    size_t *c = malloc(sizeof(size_t) * 4 * (size_t)P);
    if (!c) return mill_errf(e, "moe: out of memory");
    const size_t *sc = back ? p->rc : p->sc, *sd = back ? p->rd : p->sd, *rc = back ? p->sc : p->rc,
                 *rd = back ? p->sd : p->rd;
    for (int q = 0; q < P; q++)
        c[q] = sc[q] * width, c[P + q] = sd[q] * width, c[2 * P + q] = rc[q] * width, c[3 * P + q] = rd[q] * width;
    int rc_ = m->ep.a2a(m->ep.ctx, send, c, c + P, recv, c + 2 * P, c + 3 * P, dt, 0, e);
    free(c);
    return rc_;
}

#define EP_ALLOC(ptr, count)                                                                   \
    do {                                                                                       \
        (ptr) = (void *)arena_floats(a, (size_t)(count) > 0 ? (size_t)(count) : 1);           \
        if (!(ptr)) return ep_plan_free(&p), mill_errf(e, "moe: out of activation memory"); \
    } while (0)

/* The routed experts of y = MoE(x) over the expert-parallel ranks: each (token, slot) row to the
 * rank that holds its expert, the experts there (unweighted), the outputs back, then the weighted
 * sum in slot order (op_moe_experts' own). tr (the training trace) or NULL. */
static int moe_experts_ep(const dsv4_model *m, const kctx *k, const dsv4_layer *L, const float *x, const int32_t *ids,
                          const float *wts, int N, float *y, moe_ep_trace *tr, arena *a, mill_err *e) {
    const dsv4_config *c = &m->cfg;
    int D = c->hidden_size, K = c->num_experts_per_tok, I = c->moe_intermediate_size, El = c->n_routed_experts / m->ep.size;
    ep_plan p;
    TRY(ep_plan_make(m, k, ids, N, a, &p, e));
    long NK = p.NK, R = p.R;
    float *xs, *xr, *ones, *yr, *ys, *Y, *work, *h1;
    int32_t *idr;
    EP_ALLOC(xs, NK * D);
    EP_ALLOC(xr, R * D);
    EP_ALLOC(idr, R);
    EP_ALLOC(ones, R);
    EP_ALLOC(yr, R * D);
    EP_ALLOC(ys, NK * D);
    EP_ALLOC(Y, NK * D);
    EP_ALLOC(work, moe_experts_work_floats((int)R, D, I, El, 1));
    int rc = !(h1 = malloc(sizeof(float) * (size_t)(R > 0 ? R : 1)));
    for (long i = 0; !rc && i < R; i++) h1[i] = 1.0f;
    rc = rc ? mill_errf(e, "moe: out of memory")
            : op_copy_from_host(k, ones, h1, sizeof(float) * (size_t)R, e) ||
                  op_embedding(k, xs, x, p.tok, (int)NK, D, N, e) || ep_move(m, &p, xs, xr, D, DTYPE_F32, 0, e) ||
                  ep_move(m, &p, p.lid, idr, 1, DTYPE_I32, 0, e) ||
                  (R > 0 && op_moe_experts(k, yr, xr, idr, ones, L->w1, L->w3, L->w2, (int)R, D, I, El, 1,
                                           (float)c->swiglu_limit, 0, work, e)) ||
                  ep_move(m, &p, yr, ys, D, DTYPE_F32, 1, e) || op_embedding(k, Y, ys, p.inv, (int)NK, D, (int)NK, e) ||
                  op_moe_combine(k, y, Y, wts, N, K, D, e);
    free(h1);
    if (!rc && tr) *tr = (moe_ep_trace){xr, ones, Y, idr, R};
    ep_plan_free(&p);
    return rc;
}

/* Its backward: dx [N, D] += d/dx, dwts [N, K] = d/d weights, the local experts' gradients into
 * grads (their rows' gradients come from every rank). */
static int moe_experts_ep_backward(const dsv4_model *m, const kctx *k, const dsv4_layer *L, const layer_trace *t,
                                   const float *dy, int N, float *dx, float *dwts, float *grads, arena *a, mill_err *e) {
    const dsv4_config *c = &m->cfg;
    int D = c->hidden_size, K = c->num_experts_per_tok, I = c->moe_intermediate_size, El = c->n_routed_experts / m->ep.size;
    ep_plan p;
    TRY(ep_plan_make(m, k, t->ids, N, a, &p, e));
    long NK = p.NK, R = p.R;
    if (R != t->ep.R) return ep_plan_free(&p), mill_errf(e, "moe: %ld rows came back for %ld sent", R, t->ep.R);
    float *dY, *dys, *dyr, *dxr, *dwr, *dxs, *DX, *work;
    EP_ALLOC(dY, NK * D);
    EP_ALLOC(dys, NK * D);
    EP_ALLOC(dyr, R * D);
    EP_ALLOC(dxr, R * D);
    EP_ALLOC(dwr, R);
    EP_ALLOC(dxs, NK * D);
    EP_ALLOC(DX, NK * D);
    EP_ALLOC(work, moe_experts_backward_work_floats((int)R, D, I, El, 1));
#define G(ptr) ((ptr) ? grads + ((ptr) - m->data) : NULL)
    int rc = op_moe_combine_backward(k, dY, dwts, dy, t->ep.Y, t->wts, N, K, D, e) ||
             op_embedding(k, dys, dY, p.perm, (int)NK, D, (int)NK, e) || ep_move(m, &p, dys, dyr, D, DTYPE_F32, 0, e) ||
             op_zero(k, dxr, sizeof(float) * (size_t)(R * D), e) ||
             (R > 0 && op_moe_experts_backward(k, dxr, G(L->w1), G(L->w3), G(L->w2), dwr, dyr, t->ep.x, t->ep.id,
                                               t->ep.ones, L->w1, L->w3, L->w2, (int)R, D, I, El, 1,
                                               (float)c->swiglu_limit, work, e)) ||
             ep_move(m, &p, dxr, dxs, D, DTYPE_F32, 1, e) || op_embedding(k, DX, dxs, p.inv, (int)NK, D, (int)NK, e) ||
             op_repeat_rows_backward(k, dx, DX, N, K, D, e);
#undef G
    ep_plan_free(&p);
    return rc;
}

/* Whether the shared experts' hidden units are split over tp (whole in the engine's exact layout). */
static int shared_split(const dsv4_model *m) { return m->stage.tp > 1 && !m->stage.tp_exact; }

/* y [N, D] (+= with accumulate) the shared experts on x [N, D]; a tp slice's hidden units give its
 * partial products. */
static int shared_forward(const dsv4_model *m, const kctx *k, const dsv4_layer *L, const float *x, int N, float *y,
                          int accumulate, arena *a, mill_err *e) {
    const dsv4_config *c = &m->cfg;
    int D = c->hidden_size, Is = c->moe_intermediate_size * c->n_shared_experts / (shared_split(m) ? m->stage.tp : 1);
    float *g = arena_floats(a, (size_t)N * Is), *u = arena_floats(a, (size_t)N * Is);
    if (!g || !u) return mill_errf(e, "moe: out of activation memory");
    TRY(op_linear(k, g, x, L->sw1, N, Is, D, 0, 0, 0, e));
    TRY(op_linear(k, u, x, L->sw3, N, Is, D, 0, 0, 0, e));
    TRY(op_swiglu_clamp(k, g, g, u, (long)N * Is, (float)c->swiglu_limit, e));
    return op_linear(k, y, g, L->sw2, N, D, Is, 0, 0, accumulate, e);
}

/* The router and the routed experts, then (shared) the shared experts, on N tokens. */
static int model_moe_traced(const dsv4_model *m, const kctx *k, int l, const float *x, const int32_t *tokens, int N,
                            const int32_t *replay, float *y, float *logits, float *scores, int32_t *ids, float *wts,
                            int shared, moe_ep_trace *tr, arena *a, mill_err *e) {
    const dsv4_config *c = &m->cfg;
    const dsv4_layer *L = &m->layers[l];
    int D = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok, I = c->moe_intermediate_size;
    const int32_t *given = replay;
    float *work = arena_floats(a, (size_t)moe_experts_work_floats(N, D, I, E, K));
    if (!work) return mill_errf(e, "moe: out of activation memory");
    TRY(op_linear(k, logits, x, L->gate, N, E, D, 0, 0, 0, e));
    if (L->is_hash && !given) { /* the table picks the experts; the gate still weights them */
        int32_t *g = (int32_t *)arena_floats(a, (size_t)N * K);
        if (!g) return mill_errf(e, "moe: out of activation memory");
        TRY(op_gather_i32(k, g, L->tid2eid, tokens, N, K, c->vocab_size, e));
        given = g;
    }
    moe_route_cfg rc = {E, K, c->scoring_func, c->norm_topk_prob, (float)c->routed_scaling_factor};
    TRY(op_moe_route(k, scores, ids, wts, logits, L->gate_bias, given, N, rc, e));
    if (m->ep.size > 1) TRY(moe_experts_ep(m, k, L, x, ids, wts, N, y, tr, a, e));
    else TRY(op_moe_experts(k, y, x, ids, wts, L->w1, L->w3, L->w2, N, D, I, E, K, (float)c->swiglu_limit, 0, work, e));
    if (shared && L->sw1) { /* tensor parallelism: this rank's slice of the hidden units, summed over tp */
        float *sy = shared_split(m) ? arena_floats(a, (size_t)N * D) : y;
        if (!sy) return mill_errf(e, "moe: out of activation memory");
        TRY(shared_forward(m, k, L, x, N, sy, sy == y, a, e));
        if (sy != y) { /* y += the completed sum (op_repeat_rows_backward with one repeat: an add) */
            TRY(tp_sum(m, sy, (size_t)N * D, e));
            TRY(op_repeat_rows_backward(k, y, sy, N, 1, D, e));
        }
    }
    return 0;
}

int model_moe(const dsv4_model *m, const kctx *k, int l, const float *x, const int32_t *tokens, int N,
              const int32_t *replay, float *y, float *logits, float *scores, int32_t *ids, float *wts, arena *a,
              mill_err *e) {
    return model_moe_traced(m, k, l, x, tokens, N, replay, y, logits, scores, ids, wts, 1, NULL, a, e);
}

/* y = MoE sublayer on the site's normed input (this rank's tokens); replay [N, k] or NULL. Under
 * sequence parallelism the router and the routed experts see this rank's tokens, the shared experts
 * every token (their hidden units are split over tp). */
static int moe_forward(fwd *f, const dsv4_layer *L, layer_trace *t, site_trace *s, const int32_t *replay) {
    const dsv4_config *c = &f->m->cfg;
    int Nl = f->Nl, E = c->n_routed_experts, K = c->num_experts_per_tok, D = c->hidden_size;
    ALLOC(t->logits, (long)Nl * E);
    ALLOC(t->scores, (long)Nl * E);
    ALLOC(t->wts, (long)Nl * K);
    TRY(model_moe_traced(f->m, f->k, (int)(L - f->m->layers), s->xn, f->ids + f->n0, Nl,
                         replay ? replay + (long)f->n0 * K : NULL, s->y, t->logits, t->scores, t->ids, t->wts, !f->sp,
                         &t->ep, f->a, f->e));
    s->xf = s->xn;
    if (!f->sp || !L->sw1) return 0;
    float *sy, *syl;
    ALLOC(sy, (long)f->N * D);
    TRY(tp_enter(f, s->xn, &s->xf));
    TRY(shared_forward(f->m, f->k, L, s->xf, f->N, sy, 0, f->a, f->e));
    TRY(tp_leave(f, sy, &syl));
    return op_repeat_rows_backward(f->k, s->y, syl, Nl, 1, D, f->e); /* y += this rank's rows: an add */
}

static int site_alloc(fwd *f, site_trace *s) {
    int N = f->Nl, n = f->m->cfg.hc_mult, D = f->m->cfg.hidden_size;
    ALLOC(s->pre, (long)N * n);
    ALLOC(s->post, (long)N * n);
    ALLOC(s->comb, (long)N * n * n);
    ALLOC(s->x, (long)N * D);
    ALLOC(s->xn, (long)N * D);
    ALLOC(s->y, (long)N * D);
    return 0;
}

/* Runs the model; the trace (f->lt etc.) stays in the arena. logits: [N, the vocabulary slice]. The
 * streams h and the per-token ops cover this rank's Nl tokens (all N without sequence parallelism). */
static int forward_traced(fwd *f, float *logits, int32_t *routing) {
    const dsv4_model *m = f->m;
    const dsv4_config *c = &m->cfg;
    const kctx *k = f->k;
    mill_err *e = f->e;
    int N = f->N, Nl = f->Nl, D = c->hidden_size, n = c->hc_mult, K = c->num_experts_per_tok;
    const int32_t *replay = f->replay;
    float *work, *h;
    ALLOC(work, (long)Nl * (n * D + (2 + n) * n));
    ALLOC(h, (long)Nl * n * D);
    if (m->stage.first) { /* the n streams all start as the embedding */
        float *x0, *x0l;
        int v0, v1;
        model_vocab_range(m, &v0, &v1);
        ALLOC(x0, (long)N * D);
        TRY(op_embedding_part(k, x0, m->embed, f->ids, N, D, c->vocab_size, v0, v1, e));
        TRY(tp_leave(f, x0, &x0l)); /* a slice of the vocabulary: other slices' tokens are 0 here */
        TRY(op_repeat_rows(k, h, x0l, Nl, n, D, e));
    } else { /* the previous stage's streams */
        TRY(m->io.recv(m->io.ctx, h, (size_t)Nl * n * D, 0, e));
    }
    hc_dims dm = {n, D, c->hc_sinkhorn_iters, (float)c->hc_eps, (float)c->rms_norm_eps};
    float eps = (float)c->rms_norm_eps;
    for (int l = m->stage.l0[0]; l < m->stage.l1[0]; l++) {
        const dsv4_layer *Ly = &m->layers[l];
        layer_trace *t = &f->lt[l];
        f->wpos = f->wpos_all + (long)l * f->Tf;
        TRY(site_alloc(f, &t->attn));
        TRY(site_alloc(f, &t->ffn));
        ALLOC(t->ids, (long)Nl * K);
        site_trace *s = &t->attn;
        s->h_in = h;
        TRY(op_hc_pre(k, s->x, s->pre, s->post, s->comb, h, Ly->hc_attn_fn, Ly->hc_attn_base, Ly->hc_attn_scale, Nl,
                      dm, work, e));
        TRY(op_rmsnorm(k, s->xn, s->x, Ly->attn_norm, Nl, D, 0, eps, e));
        float *yf;
        ALLOC(yf, (long)N * D);
        TRY(tp_enter(f, s->xn, &s->xf));
        TRY(attention_forward(f, Ly, t, yf, s->xf));
        TRY(tp_leave(f, yf, &s->y)); /* a slice of the heads: the partial wo_b products */
        ALLOC(h, (long)Nl * n * D);
        TRY(op_hc_post(k, h, s->h_in, s->y, s->post, s->comb, Nl, n, D, e));
        s = &t->ffn;
        s->h_in = h;
        TRY(op_hc_pre(k, s->x, s->pre, s->post, s->comb, h, Ly->hc_ffn_fn, Ly->hc_ffn_base, Ly->hc_ffn_scale, Nl, dm,
                      work, e));
        TRY(op_rmsnorm(k, s->xn, s->x, Ly->ffn_norm, Nl, D, 0, eps, e));
        TRY(moe_forward(f, Ly, t, s, replay ? replay + (long)l * N * K : NULL));
        if (routing) TRY(op_copy(k, routing + ((long)l * N + f->n0) * K, t->ids, sizeof(int32_t) * (size_t)Nl * K, e));
        ALLOC(h, (long)Nl * n * D);
        TRY(op_hc_post(k, h, s->h_in, s->y, s->post, s->comb, Nl, n, D, e));
    }
    for (int l = m->stage.l0[0]; routing && f->sp && l < m->stage.l1[0]; l++) /* every rank's tokens' experts */
        TRY(m->tp.gather_rows(m->tp.ctx, routing + (long)l * N * K, N, (size_t)K, DTYPE_I32, e));
    f->h_final = h;
    if (!m->stage.last) return m->io.send(m->io.ctx, h, (size_t)Nl * n * D, 0, e); /* on to the next stage */
    ALLOC(f->x_head, (long)Nl * D);
    ALLOC(f->xn_head, (long)Nl * D);
    TRY(op_hc_head(k, f->x_head, h, m->hc_head_fn, m->hc_head_base, m->hc_head_scale, Nl, dm, work, e));
    TRY(op_rmsnorm(k, f->xn_head, f->x_head, m->norm, Nl, D, 0, eps, e));
    TRY(tp_enter(f, f->xn_head, &f->xnf_head));
    int v0, v1;
    model_vocab_range(m, &v0, &v1);
    return op_linear(k, logits, f->xnf_head, m->head, N, v1 - v0, D, 0, 0, 0, e); /* this slice's columns */
}

/* The host index arrays, built into one host buffer and copied to the arena at once: of rows of Tf
 * positions given, this rank's [p0, p0 + T) of each (token ids, targets, replay), their positions,
 * and every layer's compressed entry positions over the whole rows. */
static int fwd_upload(fwd *f, const int32_t *ids, const int32_t *targets, const int32_t *replay) {
    const dsv4_config *c = &f->m->cfg;
    int N = f->N, T = f->T, Tf = f->Tf, L = c->num_hidden_layers, K = c->num_experts_per_tok;
    long n_rep = replay ? (long)L * N * K : 0, n_tgt = targets ? N : 0;
    long n = 2L * N + (long)L * Tf + n_tgt + n_rep;
    int32_t *dev, *h = malloc(sizeof(int32_t) * (size_t)n);
    if (!h) return mill_errf(f->e, "forward: out of memory for %ld indices", n);
    dev = (int32_t *)arena_floats(f->a, (size_t)n);
    if (!dev) {
        free(h);
        return mill_errf(f->e, "forward: out of activation memory");
    }
    int32_t *hp = h + N, *hw = h + 2L * N, *ht = hw + (long)L * Tf, *hr = ht + n_tgt;
    for (int b = 0; b < f->B; b++) {
        long src = (long)b * Tf + f->p0, dst = (long)b * T;
        memcpy(h + dst, ids + src, sizeof(int32_t) * (size_t)T);
        if (targets) memcpy(ht + dst, targets + src, sizeof(int32_t) * (size_t)T);
        for (int l = 0; replay && l < L; l++)
            memcpy(hr + ((long)l * N + dst) * K, replay + ((long)l * f->B * Tf + src) * K, sizeof(int32_t) * (size_t)T * K);
    }
    for (int i = 0; i < N; i++) hp[i] = f->p0 + i % T;
    for (int l = 0; l < L; l++) /* compressed entry w sits at position w * ratio */
        for (int w = 0; w < Tf; w++) hw[(long)l * Tf + w] = w * c->compress_ratios[l];
    int rc = op_copy_from_host(f->k, dev, h, sizeof(int32_t) * (size_t)n, f->e);
    free(h);
    f->ids = dev;
    f->pos = dev + N;
    f->wpos_all = dev + 2L * N;
    f->targets = targets ? dev + 2L * N + (long)L * Tf : NULL;
    f->replay = replay ? dev + 2L * N + (long)L * Tf + n_tgt : NULL;
    return rc;
}

static void fwd_end(fwd *f) {
    free(f->lt);
    free(f->host);
    f->lt = NULL;
    f->host = NULL;
}

static int fwd_begin(fwd *f, const dsv4_model *m, const kctx *k, const int32_t *ids, const int32_t *targets,
                     const int32_t *replay, int B, int T, arena *a, mill_err *e) {
    memset(f, 0, sizeof *f);
    if (B <= 0 || T <= 0) return mill_errf(e, "forward: empty batch (%d rows of %d tokens)", B, T);
    if (m->device != k->device || a->device != k->device)
        return mill_errf(e, "forward: the model, the arena and the kctx must be on one device");
    if (m->stage.n_chunks != 1) /* an interleaved pipeline rank runs one chunk at a time (dist) */
        return mill_errf(e, "forward: the model holds %d chunks of layers; run one (model_stage_chunk)", m->stage.n_chunks);
    if (m->stage.tp > 1 && m->stage.tp_exact) /* its whole row-parallel weights have no training path */
        return mill_errf(e, "forward: the exact tensor-parallel layout (stage.tp_exact) is the rollout engine's");
    arena_reset(a);
    f->m = m;
    f->k = k;
    f->a = a;
    f->B = B;
    f->Tf = T;
    f->cp = m->stage.cp > 1 ? m->stage.cp : 1;
    int64_t lo = 0, hi = T;
    model_split_range(T, f->cp, f->cp > 1 ? m->stage.cp_rank : 0, &lo, &hi);
    if (hi == lo)
        return mill_errf(e, "forward: context parallelism over cp %d needs rows of at least %d positions, got %d",
                         f->cp, f->cp, T);
    f->p0 = (int)lo;
    f->T = (int)(hi - lo);
    f->N = B * f->T;
    f->e = e;
    f->sp = m->stage.sp && m->stage.tp > 1;
    lo = 0, hi = f->N;
    if (f->sp) model_split_range(f->N, m->stage.tp, m->stage.tp_rank, &lo, &hi);
    f->n0 = (int)lo;
    f->Nl = (int)(hi - lo);
    if (f->Nl < 1)
        return mill_errf(e, "forward: sequence parallelism over tp %d needs at least %d tokens a micro-batch, got %d",
                         m->stage.tp, m->stage.tp, f->N);
    f->lt = calloc((size_t)(m->cfg.num_hidden_layers ? m->cfg.num_hidden_layers : 1), sizeof(layer_trace));
    if (!f->lt) return mill_errf(e, "forward: out of memory");
    if (fwd_upload(f, ids, targets, replay)) {
        fwd_end(f);
        return -1;
    }
    return 0;
}

int model_forward(const dsv4_model *m, const kctx *k, const int32_t *ids, int B, int T, float *logits,
                  int32_t *routing, arena *a, mill_err *e) {
    fwd f;
    TRY(fwd_begin(&f, m, k, ids, NULL, NULL, B, T, a, e));
    int rc = forward_traced(&f, logits, routing);
    fwd_end(&f);
    return rc;
}

/* ------------------------------------------------------------------ backward */

#define GRAD(p) ((p) ? grads + ((p) - f->m->data) : NULL) /* the gradient slot of a parameter pointer */

/* dx[N, D] += d(attention sublayer)/dx given dy. */
static int attention_backward(fwd *f, const dsv4_layer *L, const layer_trace *t, float *dx, const float *dy,
                              const float *x, float *grads) {
    const dsv4_config *c = &f->m->cfg;
    const kctx *k = f->k;
    mill_err *e = f->e;
    int N = f->N, T = f->T, D = c->hidden_size, H = model_heads(f->m), d = c->head_dim;
    int r = c->qk_rope_head_dim, qlr = c->q_lora_rank, G = model_groups(f->m), R = c->o_lora_rank, ratio = L->ratio;
    float eps = (float)c->rms_norm_eps;
    const float *inv_freq = ratio ? f->m->inv_freq_compress : f->m->inv_freq_main;
    int Tf = f->Tf;
    float *dz, *do_, *dq, *dkv, *dkvf, *dqr, *dq_raw, *dkv_raw, *dqr_raw, *dcomp = NULL;
    ALLOC(dz, (long)N * G * R);
    ALLOC(do_, (long)N * H * d);
    ALLOC(dq, (long)N * H * d);
    ALLOC(dkvf, (long)f->B * Tf * d); /* the whole rows' (each rank's queries' part under cp) */
    ALLOC(dqr, (long)N * qlr);
    ALLOC(dq_raw, (long)N * H * d);
    ALLOC(dkv_raw, (long)N * d);
    ALLOC(dqr_raw, (long)N * qlr);
    TRY(op_linear_backward(k, dz, GRAD(L->wo_b), dy, t->z, L->wo_b, N, D, G * R, 0, 0, e));
    int gw = H * d / G;
    for (int g = 0; g < G; g++)
        TRY(op_linear_backward(k, do_ + (long)g * gw, GRAD(L->wo_a) + (long)g * R * gw, dz + (long)g * R,
                               t->o_rot + (long)g * gw, L->wo_a + (long)g * R * gw, N, R, gw, H * d, G * R, e));
    TRY(op_rope(k, do_, N, H, d, r, f->pos, inv_freq, 1, e)); /* back through the inverse rotation */
    const int32_t *wp = f->wpos_all + (long)(L - f->m->layers) * Tf; /* the forward's entry positions */
    if (t->n_comp) ALLOC(dcomp, (long)f->B * t->Tc * d);
    for (int b = 0; b < f->B; b++) {
        long t0 = (long)b * T;
        TRY(op_sink_attention_backward(k, dq + t0 * H * d, dkvf + (long)b * Tf * d,
                                       dcomp ? dcomp + (long)b * t->Tc * d : NULL, GRAD(L->attn_sink), do_ + t0 * H * d,
                                       t->q + t0 * H * d, t->kvf + (long)b * Tf * d,
                                       t->comp ? t->comp + (long)b * t->Tc * d : NULL,
                                       t->idx ? t->idx + t0 * t->n_comp : NULL, t->n_comp, L->attn_sink, T, f->p0, H, d,
                                       c->sliding_window, 1.0f / sqrtf((float)d), e));
    }
    if (t->Tc) { /* compressor: entries = rope(rmsnorm(pool(x Wkv, x Wgate))) */
        int overlap = ratio == ATTN_CSA, width = overlap ? 2 * d : d, Tc = t->Tc;
        float *dpooled, *dcaf, *dcgf, *dca, *dcg;
        ALLOC(dpooled, (long)f->B * Tc * d);
        ALLOC(dcaf, (long)f->B * Tf * width);
        ALLOC(dcgf, (long)f->B * Tf * width);
        if (dcomp) {
            for (int b = 0; b < f->B; b++) {
                float *dc = dcomp + (long)b * Tc * d;
                TRY(op_rope(k, dc, Tc, 1, d, r, wp, f->m->inv_freq_compress, -1, e));
                TRY(op_rmsnorm_backward(k, dpooled + (long)b * Tc * d, GRAD(L->c_norm), dc,
                                        t->pooled + (long)b * Tc * d, L->c_norm, Tc, d, 0, eps, e));
                TRY(op_compress_pool_backward(k, dcaf + (long)b * Tf * width, dcgf + (long)b * Tf * width,
                                              GRAD(L->c_ape), dpooled + (long)b * Tc * d, t->caf + (long)b * Tf * width,
                                              t->cgf + (long)b * Tf * width, L->c_ape, Tf, d, ratio, overlap, e));
            }
        }
        TRY(cp_leave(f, dcaf, &dca, width)); /* each position's gradient to its rank */
        TRY(cp_leave(f, dcgf, &dcg, width));
        TRY(op_linear_backward(k, dx, GRAD(L->c_wkv), dca, x, L->c_wkv, N, width, D, 0, 0, e));
        TRY(op_linear_backward(k, dx, GRAD(L->c_wgate), dcg, x, L->c_wgate, N, width, D, 0, 0, e));
    }
    TRY(cp_leave(f, dkvf, &dkv, d));
    TRY(op_rope(k, dkv, N, 1, d, r, f->pos, inv_freq, -1, e));
    TRY(op_rmsnorm_backward(k, dkv_raw, GRAD(L->kv_norm), dkv, t->kv_raw, L->kv_norm, N, d, 0, eps, e));
    TRY(op_linear_backward(k, dx, GRAD(L->wkv), dkv_raw, x, L->wkv, N, d, D, 0, 0, e));
    TRY(op_rope(k, dq, N, H, d, r, f->pos, inv_freq, -1, e));
    TRY(op_rmsnorm_backward(k, dq_raw, NULL, dq, t->q_raw, NULL, N * H, d, 0, eps, e));
    TRY(op_linear_backward(k, dqr, GRAD(L->wq_b), dq_raw, t->qr, L->wq_b, N, H * d, qlr, 0, 0, e));
    TRY(op_rmsnorm_backward(k, dqr_raw, GRAD(L->q_norm), dqr, t->qr_raw, L->q_norm, N, qlr, 0, eps, e));
    return op_linear_backward(k, dx, GRAD(L->wq_a), dqr_raw, x, L->wq_a, N, qlr, D, 0, 0, e);
}

/* dx [Nl, D] += d(MoE sublayer)/dx given dy (this rank's tokens); the shared experts' part from every
 * token under sequence parallelism (dy gathered, their dx reduce-scattered). */
static int moe_backward(fwd *f, const dsv4_layer *L, const layer_trace *t, const site_trace *s, float *dx,
                        const float *dy, float *grads) {
    const dsv4_config *c = &f->m->cfg;
    const kctx *k = f->k;
    mill_err *e = f->e;
    const float *x = s->xn;
    int N = f->Nl, D = c->hidden_size, E = c->n_routed_experts, K = c->num_experts_per_tok, I = c->moe_intermediate_size;
    float *work, *dwts, *dlogits;
    ALLOC(work, moe_experts_backward_work_floats(N, D, I, E, K));
    ALLOC(dwts, (long)N * K);
    ALLOC(dlogits, (long)N * E);
    if (f->m->ep.size > 1) TRY(moe_experts_ep_backward(f->m, k, L, t, dy, N, dx, dwts, grads, f->a, e));
    else TRY(op_moe_experts_backward(k, dx, GRAD(L->w1), GRAD(L->w3), GRAD(L->w2), dwts, dy, x, t->ids, t->wts, L->w1,
                                     L->w3, L->w2, N, D, I, E, K, (float)c->swiglu_limit, work, e));
    moe_route_cfg rc = {E, K, c->scoring_func, c->norm_topk_prob, (float)c->routed_scaling_factor};
    TRY(op_moe_route_backward(k, dlogits, dwts, t->scores, t->logits, t->ids, N, rc, e));
    TRY(op_linear_backward(k, dx, GRAD(L->gate), dlogits, x, L->gate, N, E, D, 0, 0, e));
    if (L->sw1) { /* tensor parallelism: the slice's part of dx apart, summed over tp, then added */
        int Nf = f->N, Is = I * c->n_shared_experts / (f->m->stage.tp > 1 ? f->m->stage.tp : 1);
        float *g, *u, *act, *dact, *dg, *du, *dyf, *sdx = dx, *sdxl;
        if (f->m->stage.tp > 1) ALLOC(sdx, (long)Nf * D);
        TRY(tp_enter(f, dy, &dyf));
        ALLOC(g, (long)Nf * Is);
        ALLOC(u, (long)Nf * Is);
        ALLOC(act, (long)Nf * Is);
        ALLOC(dact, (long)Nf * Is);
        ALLOC(dg, (long)Nf * Is);
        ALLOC(du, (long)Nf * Is);
        TRY(op_linear(k, g, s->xf, L->sw1, Nf, Is, D, 0, 0, 0, e));
        TRY(op_linear(k, u, s->xf, L->sw3, Nf, Is, D, 0, 0, 0, e));
        TRY(op_swiglu_clamp(k, act, g, u, (long)Nf * Is, (float)c->swiglu_limit, e));
        TRY(op_linear_backward(k, dact, GRAD(L->sw2), dyf, act, L->sw2, Nf, D, Is, 0, 0, e));
        TRY(op_swiglu_clamp_backward(k, dg, du, dact, g, u, (long)Nf * Is, (float)c->swiglu_limit, e));
        TRY(op_linear_backward(k, sdx, GRAD(L->sw1), dg, s->xf, L->sw1, Nf, Is, D, 0, 0, e));
        TRY(op_linear_backward(k, sdx, GRAD(L->sw3), du, s->xf, L->sw3, Nf, Is, D, 0, 0, e));
        if (sdx != dx) {
            TRY(tp_leave(f, sdx, &sdxl));
            TRY(op_repeat_rows_backward(k, dx, sdxl, N, 1, D, e));
        }
    }
    return 0;
}

/* One hyper-connection site backward: given dh_out, accumulates into dh_in (and the site's params).
 * Every buffer is of this rank's tokens; the attention runs on all of them (dy gathered, its dx
 * reduce-scattered under sequence parallelism; summed over tp without). */
static int site_backward(fwd *f, const site_trace *s, const float *fn, const float *base, const float *scale,
                         const float *norm_w, float *dh_in, const float *dh_out, float *dxn_out, float *grads,
                         float *dy, float *dpost, float *dcomb, float *dx, float *work, int sublayer_is_attn,
                         const dsv4_layer *L, const layer_trace *t) {
    const dsv4_config *c = &f->m->cfg;
    int N = f->Nl, n = c->hc_mult, D = c->hidden_size;
    hc_dims dm = {n, D, c->hc_sinkhorn_iters, (float)c->hc_eps, (float)c->rms_norm_eps};
    TRY(op_zero(f->k, dy, sizeof(float) * (size_t)N * D, f->e));
    TRY(op_zero(f->k, dxn_out, sizeof(float) * (size_t)N * D, f->e));
    TRY(op_zero(f->k, dx, sizeof(float) * (size_t)N * D, f->e));
    TRY(op_hc_post_backward(f->k, dh_in, dy, dpost, dcomb, dh_out, s->h_in, s->y, s->post, s->comb, N, n, D, f->e));
    if (sublayer_is_attn) { /* a slice of the heads: its part of d input, summed over tp */
        float *dyf, *dxf = dxn_out, *dxl;
        if (f->sp) ALLOC(dxf, (long)f->N * D);
        TRY(tp_enter(f, dy, &dyf));
        TRY(attention_backward(f, L, t, dxf, dyf, s->xf, grads));
        TRY(tp_leave(f, dxf, &dxl));
        if (dxl != dxn_out) TRY(op_copy(f->k, dxn_out, dxl, sizeof(float) * (size_t)N * D, f->e));
    } else TRY(moe_backward(f, L, t, s, dxn_out, dy, grads));
    TRY(op_rmsnorm_backward(f->k, dx, GRAD(norm_w), dxn_out, s->x, norm_w, N, D, 0, dm.norm_eps, f->e));
    return op_hc_pre_backward(f->k, dh_in, GRAD(fn), GRAD(base), GRAD(scale), dx, dpost, dcomb, s->h_in, fn, base,
                              scale, N, dm, work, f->e);
}

/* The gradients of layer l's group are final: hand them to the model's hook. */
static int grads_ready(fwd *f, int l) {
    const dsv4_model *m = f->m;
    return m->grad_ready.fn ? m->grad_ready.fn(m->grad_ready.ctx, m, l, f->e) : 0;
}

/* Backward from dlogits [N, V] through the traced forward into grads. */
static int backward_from_logits(fwd *f, const float *dlogits, float *grads) {
    const dsv4_model *m = f->m;
    const dsv4_config *c = &m->cfg;
    const kctx *k = f->k;
    mill_err *e = f->e;
    const int32_t *ids = f->ids;
    int Nf = f->N, N = f->Nl, D = c->hidden_size, n = c->hc_mult, v0, v1;
    model_vocab_range(m, &v0, &v1);
    float *logits = (float *)dlogits; /* op_linear_backward reads it as dy */
    hc_dims dm = {n, D, c->hc_sinkhorn_iters, (float)c->hc_eps, (float)c->rms_norm_eps};
    float *dxn, *dxnl, *dx, *dxf, *dh, *dh2, *dy, *dpost, *dcomb, *work;
    ALLOC(dxn, (long)Nf * D);
    ALLOC(dx, (long)N * D);
    ALLOC(dh, (long)N * n * D);
    ALLOC(dh2, (long)N * n * D);
    ALLOC(dy, (long)N * D);
    ALLOC(dpost, (long)N * n);
    ALLOC(dcomb, (long)N * n * n);
    ALLOC(work, hc_backward_work_floats(N, dm));
    if (m->stage.last) {
        TRY(op_linear_backward(k, dxn, GRAD(m->head), logits, f->xnf_head, m->head, Nf, v1 - v0, D, 0, 0, e));
        TRY(tp_leave(f, dxn, &dxnl)); /* each vocabulary slice's part */
        TRY(op_rmsnorm_backward(k, dx, GRAD(m->norm), dxnl, f->x_head, m->norm, N, D, 0, dm.norm_eps, e));
        TRY(op_hc_head_backward(k, dh, GRAD(m->hc_head_fn), GRAD(m->hc_head_base), GRAD(m->hc_head_scale), dx,
                                f->h_final, m->hc_head_fn, m->hc_head_base, m->hc_head_scale, N, dm, work, e));
        TRY(grads_ready(f, c->num_hidden_layers));
    } else { /* the gradient of this stage's output streams, from the next stage */
        TRY(m->io.recv(m->io.ctx, dh, (size_t)N * n * D, 1, e));
    }
    for (int l = m->stage.l1[0] - 1; l >= m->stage.l0[0]; l--) {
        const dsv4_layer *L = &m->layers[l];
        const layer_trace *t = &f->lt[l];
        /* dh: grad of this layer's output; dh2: of its middle; then dh again: of its input */
        TRY(op_zero(k, dh2, sizeof(float) * (size_t)N * n * D, e));
        TRY(site_backward(f, &t->ffn, L->hc_ffn_fn, L->hc_ffn_base, L->hc_ffn_scale, L->ffn_norm, dh2, dh, dxn, grads,
                          dy, dpost, dcomb, dx, work, 0, L, t));
        TRY(op_zero(k, dh, sizeof(float) * (size_t)N * n * D, e));
        TRY(site_backward(f, &t->attn, L->hc_attn_fn, L->hc_attn_base, L->hc_attn_scale, L->attn_norm, dh, dh2, dxn,
                          grads, dy, dpost, dcomb, dx, work, 1, L, t));
        TRY(grads_ready(f, l));
    }
    if (!m->stage.first) return m->io.send(m->io.ctx, dh, (size_t)N * n * D, 1, e); /* back to the previous stage */
    /* the n streams all started as the embedding */
    TRY(op_zero(k, dx, sizeof(float) * (size_t)N * D, e));
    TRY(op_repeat_rows_backward(k, dx, dh, N, n, D, e));
    TRY(tp_enter(f, dx, &dxf)); /* every token's, for this rank's vocabulary rows */
    TRY(op_embedding_part_backward(k, GRAD(m->embed), dxf, ids, Nf, D, v0, v1, e));
    return grads_ready(f, -1);
}

/* The traced forward, then on the last stage the token head and the loss on the host; with a loss,
 * f->dlogits (the logits buffer, overwritten) holds its gradient for the backward. */
static int tokens_forward(fwd *f, float temperature, model_token_loss_fn loss_fn, void *ctx, float *logp_out,
                          double *loss, long *count) {
    const kctx *k = f->k;
    mill_err *e = f->e;
    const dsv4_model *m = f->m;
    int N = f->N, V = m->cfg.vocab_size, tp = m->stage.tp > 1 ? m->stage.tp : 1, v0, v1;
    if (!(temperature > 0)) return mill_errf(e, "loss: temperature must be positive, got %g", temperature);
    float *logits, *logp, *ent;
    double *parts;
    int32_t *rows;
    *count = 0;
    if (loss) *loss = 0; /* NULL with no loss_fn: a forward only */
    if (!m->stage.last) return forward_traced(f, NULL, NULL); /* the loss is the last stage's */
    model_vocab_range(m, &v0, &v1);
    ALLOC(logits, (long)N * (v1 - v0));
    ALLOC(logp, N);
    ALLOC(ent, N);
    ALLOC(rows, N);
    ALLOC(parts, 2L * 3 * N * tp); /* doubles */
    TRY(forward_traced(f, logits, NULL));
    /* no rank forms a whole row: each slice's three numbers a row go to every tp rank (as 8-byte
     * words: moved, never summed), and each joins them in rank order */
    long cnt = 0;
    TRY(op_token_logp_part(k, logits, parts + 3L * N * (tp > 1 ? m->stage.tp_rank : 0), f->targets, N, v1 - v0, v0, V,
                           temperature, e));
    if (tp > 1) TRY(m->tp.all_gather(m->tp.ctx, parts, 3L * N, DTYPE_I64, e));
    TRY(op_token_logp(k, logits, logp, ent, rows, &cnt, parts, tp, f->targets, N, v1 - v0, V, temperature, e));
    /* under context parallelism a rank's positions may hold none (a prompt): it adds nothing, but
     * takes part in the backward's exchanges */
    if (!cnt && f->cp == 1) return mill_errf(e, "loss: no position has a target");
    /* the loss runs on the host: logp and entropies come over, d loss / d (logp, entropy) go back */
    f->host = calloc((size_t)cnt * 4 + 1, sizeof(float));
    if (!f->host) return mill_errf(e, "loss: out of memory");
    float *hlogp = f->host, *hent = hlogp + cnt, *hdlogp = hent + cnt, *hdent = hdlogp + cnt;
    TRY(op_copy_to_host(k, hlogp, logp, sizeof(float) * (size_t)cnt, e));
    TRY(op_copy_to_host(k, hent, ent, sizeof(float) * (size_t)cnt, e));
    if (logp_out) memcpy(logp_out, hlogp, sizeof(float) * (size_t)cnt);
    *count = cnt;
    if (!loss_fn) return 0;
    float *dlogp, *dent;
    ALLOC(dlogp, cnt + 1);
    ALLOC(dent, cnt + 1);
    TRY(loss_fn(ctx, hlogp, hent, (int)cnt, hdlogp, hdent, loss, e));
    TRY(op_copy_from_host(k, dlogp, hdlogp, sizeof(float) * (size_t)cnt, e));
    TRY(op_copy_from_host(k, dent, hdent, sizeof(float) * (size_t)cnt, e));
    TRY(op_token_logp_backward(k, logits, rows, cnt, dlogp, dent, ent, f->targets, N, v1 - v0, v0, temperature, e));
    f->dlogits = logits;
    return 0;
}

struct model_pass {
    fwd f;
};

int model_pass_forward(model_pass **out, const dsv4_model *m, const kctx *k, const int32_t *ids, const int32_t *targets,
                       int B, int T, const int32_t *replay, float temperature, model_token_loss_fn loss_fn, void *ctx,
                       float *logp_out, double *loss, long *count, arena *a, mill_err *e) {
    model_pass *p = calloc(1, sizeof *p);
    *out = NULL;
    if (!p) return mill_errf(e, "forward: out of memory");
    if (fwd_begin(&p->f, m, k, ids, targets, replay, B, T, a, e)) {
        free(p);
        return -1;
    }
    if (tokens_forward(&p->f, temperature, loss_fn, ctx, logp_out, loss, count)) {
        model_pass_free(p);
        return -1;
    }
    *out = p;
    return 0;
}

int model_pass_backward(model_pass *p, float *grads, mill_err *e) {
    p->f.e = e;
    return backward_from_logits(&p->f, p->f.dlogits, grads);
}

void model_pass_free(model_pass *p) {
    if (!p) return;
    fwd_end(&p->f);
    free(p);
}

int model_forward_backward_tokens(const dsv4_model *m, const kctx *k, const int32_t *ids, const int32_t *targets, int B,
                                  int T, const int32_t *replay, float temperature, float *grads,
                                  model_token_loss_fn loss_fn, void *ctx, float *logp_out, double *loss, long *count,
                                  arena *a, mill_err *e) {
    model_pass *p;
    TRY(model_pass_forward(&p, m, k, ids, targets, B, T, replay, temperature, loss_fn, ctx, logp_out, loss, count, a,
                           e));
    int rc = loss_fn ? model_pass_backward(p, grads, e) : 0;
    model_pass_free(p);
    return rc;
}

/* Mean next-token cross-entropy: loss = -mean(logp), dloss/dlogp = -1/count. */
static int ce_loss(void *ctx, const float *logp, const float *ent, int n, float *dlogp, float *dent, double *loss,
                   mill_err *e) {
    (void)ctx;
    (void)ent;
    (void)dent;
    (void)e;
    double s = 0.0;
    for (int i = 0; i < n; i++) {
        s -= logp[i];
        dlogp[i] = -1.0f / (float)n;
    }
    *loss = s / n;
    return 0;
}

int model_forward_backward(const dsv4_model *m, const kctx *k, const int32_t *ids, const int32_t *targets, int B,
                           int T, const int32_t *replay, float *grads, model_loss *out, arena *a, mill_err *e) {
    return model_forward_backward_tokens(m, k, ids, targets, B, T, replay, 1.0f, grads, ce_loss, NULL, NULL, &out->loss,
                                         &out->count, a, e);
}
