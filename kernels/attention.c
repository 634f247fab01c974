#include "attention.h"

#include "dense.h"
#include "rope.h"

#ifdef MILL_CUDA
#include "cuda/cuda_ops.h"
#endif

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* One query's H heads over an explicit key list (the shared core of the full-sequence op and the
 * cached engine's op_cache_attend, so both compute a token identically). s: scratch of nk floats. */
static void attend_one(float *out, const float *q, const float *const *keys, int nk, const float *sinks, int H, int d,
                       float scale, float *s) {
    for (int h = 0; h < H; h++) {
        const float *qi = q + (long)h * d;
        float mx = sinks[h];
        for (int j = 0; j < nk; j++) {
            float dot = 0.f;
            for (int c = 0; c < d; c++) dot += qi[c] * keys[j][c];
            s[j] = dot * scale;
            if (s[j] > mx) mx = s[j];
        }
        float den = expf(sinks[h] - mx);
        for (int j = 0; j < nk; j++) {
            s[j] = expf(s[j] - mx);
            den += s[j];
        }
        float *o = out + (long)h * d;
        memset(o, 0, sizeof(float) * (size_t)d);
        for (int j = 0; j < nk; j++) {
            float p = s[j] / den;
            for (int c = 0; c < d; c++) o[c] += p * keys[j][c];
        }
    }
}

/* Runs attend_one for n queries in parallel with per-thread scratch; list(ctx, i, keys, &row) fills
 * query i's keys and names its q/out row. */
typedef int (*attend_list_fn)(const void *ctx, int i, const float **keys, long *row);

static int attend_all(const char *op, int n, size_t max_keys, attend_list_fn list, const void *ctx, float *out,
                      const float *q, const float *sinks, int H, int d, float scale, mill_err *e) {
    int oom = 0;
    if (!max_keys) max_keys = 1;
#pragma omp parallel
    {
        /* each query writes only its own output row */
        float *s = malloc(sizeof(float) * max_keys);
        const float **keys = malloc(sizeof(float *) * max_keys);
        if (!s || !keys) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            if (!s || !keys) continue;
            long row;
            int nk = list(ctx, i, keys, &row);
            attend_one(out + row * H * d, q + row * H * d, keys, nk, sinks, H, d, scale, s);
        }
        free(s);
        free(keys);
    }
    if (oom) return mill_errf(e, "%s: out of memory", op);
    return 0;
}

typedef struct {
    const float *kv, *comp;
    const int32_t *comp_idx;
    int n_comp, d, window, q0;
} seq_keys;

/* Query row i (position q0 + i) of a sequence: the window of kv rows, then the chosen compressed
 * entries. */
static int seq_key_list(const void *ctx, int i, const float **keys, long *row) {
    const seq_keys *c = ctx;
    int nk = 0, p = c->q0 + i;
    for (int j = p - c->window + 1 < 0 ? 0 : p - c->window + 1; j <= p; j++) keys[nk++] = c->kv + (long)j * c->d;
    for (int t = 0; t < c->n_comp; t++) {
        int32_t w = c->comp_idx[(long)i * c->n_comp + t];
        if (w >= 0) keys[nk++] = c->comp + (long)w * c->d;
    }
    *row = i;
    return nk;
}

int op_sink_attention(const kctx *k, float *out, const float *q, const float *kv, const float *comp,
                      const int32_t *comp_idx, int n_comp, const float *sinks, int T, int q0, int H, int d, int window,
                      float scale, mill_err *e) {
    MILL_CUDA_DISPATCH(
        cuda_op_sink_attention(k, out, q, kv, comp, comp_idx, n_comp, sinks, T, q0, H, d, window, scale, e));
    TRY(kctx_require_cpu(k, "op_sink_attention", e));
    seq_keys c = {kv, comp, comp_idx, n_comp, d, window, q0};
    return attend_all("op_sink_attention", T, (size_t)(window + n_comp), seq_key_list, &c, out, q, sinks, H, d, scale,
                      e);
}

/* One channel's gated pool over ns slots: softmax(lg) . *val, in one fixed order (the full forward
 * and the cached engine share it, so an entry has the same bits either way). lg is overwritten. */
static float pool_slots(float *lg, const float *const *val, int ns) {
    float mx = lg[0];
    for (int s = 1; s < ns; s++) mx = lg[s] > mx ? lg[s] : mx;
    float den = 0.f, acc = 0.f;
    for (int s = 0; s < ns; s++) {
        lg[s] = expf(lg[s] - mx);
        den += lg[s];
    }
    for (int s = 0; s < ns; s++) acc += (lg[s] / den) * *val[s];
    return acc;
}

int op_compress_pool(const kctx *k, float *out, const float *a, const float *g, const float *ape, int T, int d,
                     int ratio, int overlap, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_compress_pool(k, out, a, g, ape, T, d, ratio, overlap, e));
    TRY(kctx_require_cpu(k, "op_compress_pool", e));
    int n_win = T / ratio, width = overlap ? 2 * d : d, slots = overlap ? 2 * ratio : ratio;
    float *lg = malloc(sizeof(float) * (size_t)slots);
    const float **val = malloc(sizeof(float *) * (size_t)slots);
    if (!lg || !val) {
        free(lg);
        free(val);
        return mill_errf(e, "op_compress_pool: out of memory");
    }
    for (int w = 0; w < n_win; w++) {
        for (int c = 0; c < d; c++) {
            int ns = 0;
            if (overlap && w > 0) /* previous window's first half */
                for (int t = 0; t < ratio; t++) {
                    long row = (long)(w - 1) * ratio + t;
                    lg[ns] = g[row * width + c] + ape[(long)t * width + c];
                    val[ns++] = a + row * width + c;
                }
            int off = overlap ? d : 0; /* this window: the second half under overlap */
            for (int t = 0; t < ratio; t++) {
                long row = (long)w * ratio + t;
                lg[ns] = g[row * width + off + c] + ape[(long)t * width + off + c];
                val[ns++] = a + row * width + off + c;
            }
            out[(long)w * d + c] = pool_slots(lg, val, ns);
        }
    }
    free(lg);
    free(val);
    return 0;
}

/* One query's scores over entries [0, Tc); entries at or past `visible` are -inf. */
static void index_row(float *score, const float *q, const float *keys, const float *weights, int Tc, int nh, int hd,
                      float scale_qk, int visible) {
    for (int w = 0; w < Tc; w++) {
        if (w >= visible) {
            score[w] = -INFINITY;
            continue;
        }
        float acc = 0.f;
        for (int h = 0; h < nh; h++) {
            const float *qh = q + (long)h * hd;
            float dot = 0.f;
            for (int c = 0; c < hd; c++) dot += qh[c] * keys[(long)w * hd + c];
            acc += (dot > 0.f ? dot : 0.f) * scale_qk * weights[h];
        }
        score[w] = acc;
    }
}

int op_indexer_scores(const kctx *k, float *score, const float *q, const float *keys, const float *weights, int T,
                      int q0, int Tc, int nh, int hd, float scale_qk, int ratio, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_indexer_scores(k, score, q, keys, weights, T, q0, Tc, nh, hd, scale_qk, ratio, e));
    TRY(kctx_require_cpu(k, "op_indexer_scores", e));
#pragma omp parallel for schedule(static)
    for (int i = 0; i < T; i++)
        index_row(score + (long)i * Tc, q + (long)i * nh * hd, keys, weights + (long)i * nh, Tc, nh, hd, scale_qk,
                  (q0 + i + 1) / ratio);
    return 0;
}

/* Top `topk` of the first `visible` scores (descending, ties to the lower index), -1 padded. */
static void topk_row(int32_t *row, const float *s, int visible, int topk) {
    for (int c = 0; c < topk; c++) row[c] = -1;
    if (visible <= topk) {
        for (int w = 0; w < visible; w++) row[w] = w;
        return;
    }
    int n = 0; /* insertion into a descending list */
    for (int w = 0; w < visible; w++) {
        if (n == topk && !(s[w] > s[row[n - 1]])) continue;
        int p = n < topk ? n++ : topk - 1;
        while (p > 0 && s[w] > s[row[p - 1]]) {
            row[p] = row[p - 1];
            p--;
        }
        row[p] = w;
    }
}

int op_topk_visible(const kctx *k, int32_t *idx, const float *score, int T, int q0, int Tc, int topk, int ratio,
                    mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_topk_visible(k, idx, score, T, q0, Tc, topk, ratio, e));
    TRY(kctx_require_cpu(k, "op_topk_visible", e));
#pragma omp parallel for schedule(static)
    for (int i = 0; i < T; i++) {
        int visible = (q0 + i + 1) / ratio;
        topk_row(idx + (long)i * topk, score + (long)i * Tc, visible > Tc ? Tc : visible, topk);
    }
    return 0;
}

int op_causal_entries(const kctx *k, int32_t *idx, int T, int q0, int Tc, int ratio, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_causal_entries(k, idx, T, q0, Tc, ratio, e));
    TRY(kctx_require_cpu(k, "op_causal_entries", e));
    for (int i = 0; i < T; i++) {
        int visible = (q0 + i + 1) / ratio;
        for (int w = 0; w < Tc; w++) idx[(long)i * Tc + w] = w < visible ? w : -1;
    }
    return 0;
}

int op_sink_attention_backward(const kctx *k, float *dq, float *dkv, float *dcomp, float *dsinks, const float *dout,
                               const float *q, const float *kv, const float *comp, const int32_t *comp_idx, int n_comp,
                               const float *sinks, int T, int q0, int H, int d, int window, float scale, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_sink_attention_backward(k, dq, dkv, dcomp, dsinks, dout, q, kv, comp, comp_idx, n_comp,
                                                       sinks, T, q0, H, d, window, scale, e));
    TRY(kctx_require_cpu(k, "op_sink_attention_backward", e));
    int max_keys = window + n_comp;
    size_t nk_alloc = (size_t)(max_keys > 0 ? max_keys : 1);
    float *p = malloc(sizeof(float) * nk_alloc), *dp = malloc(sizeof(float) * nk_alloc);
    const float **keys = malloc(sizeof(float *) * nk_alloc);
    float **dkeys = malloc(sizeof(float *) * nk_alloc);
    if (!p || !dp || !keys || !dkeys) {
        free(p);
        free(dp);
        free(keys);
        free(dkeys);
        return mill_errf(e, "op_sink_attention_backward: out of memory");
    }
    for (int i = 0; i < T; i++) {
        int nk = 0, pos = q0 + i; /* row i of q, dout, comp_idx; row pos of kv */
        for (int j = pos - window + 1 < 0 ? 0 : pos - window + 1; j <= pos; j++) {
            keys[nk] = kv + (long)j * d;
            dkeys[nk++] = dkv + (long)j * d;
        }
        for (int c = 0; c < n_comp; c++) {
            int32_t w = comp_idx[(long)i * n_comp + c];
            if (w >= 0) {
                keys[nk] = comp + (long)w * d;
                dkeys[nk++] = dcomp + (long)w * d;
            }
        }
        for (int h = 0; h < H; h++) {
            const float *qi = q + ((long)i * H + h) * d, *go = dout + ((long)i * H + h) * d;
            float *dqi = dq + ((long)i * H + h) * d;
            float mx = sinks[h];
            for (int j = 0; j < nk; j++) {
                float dot = 0.f;
                for (int c = 0; c < d; c++) dot += qi[c] * keys[j][c];
                p[j] = dot * scale;
                if (p[j] > mx) mx = p[j];
            }
            float psink = expf(sinks[h] - mx), den = psink;
            for (int j = 0; j < nk; j++) den += (p[j] = expf(p[j] - mx));
            psink /= den;
            /* o = sum_j p_j k_j: dp_j = do.k_j; ds_j = p_j (dp_j - sum_l p_l dp_l); the sink has no value. */
            float D = 0.f;
            for (int j = 0; j < nk; j++) {
                p[j] /= den;
                float dot = 0.f;
                for (int c = 0; c < d; c++) dot += go[c] * keys[j][c];
                dp[j] = dot;
                D += p[j] * dot;
            }
            dsinks[h] += -psink * D;
            for (int j = 0; j < nk; j++) {
                float ds = p[j] * (dp[j] - D) * scale;
                float *dk = dkeys[j];
                for (int c = 0; c < d; c++) {
                    dqi[c] += ds * keys[j][c];
                    dk[c] += ds * qi[c] + p[j] * go[c];
                }
            }
        }
    }
    free(p);
    free(dp);
    free(keys);
    free(dkeys);
    return 0;
}

int op_compress_pool_backward(const kctx *k, float *da, float *dg, float *dape, const float *dout, const float *a,
                              const float *g, const float *ape, int T, int d, int ratio, int overlap, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_compress_pool_backward(k, da, dg, dape, dout, a, g, ape, T, d, ratio, overlap, e));
    TRY(kctx_require_cpu(k, "op_compress_pool_backward", e));
    int n_win = T / ratio, width = overlap ? 2 * d : d, slots = overlap ? 2 * ratio : ratio;
    float *lg = malloc(sizeof(float) * (size_t)slots);
    long *idx = malloc(sizeof(long) * (size_t)slots); /* element offset in a/g of each slot */
    int *apei = malloc(sizeof(int) * (size_t)slots);  /* element offset in ape */
    if (!lg || !idx || !apei) {
        free(lg);
        free(idx);
        free(apei);
        return mill_errf(e, "op_compress_pool_backward: out of memory");
    }
    for (int w = 0; w < n_win; w++) {
        for (int c = 0; c < d; c++) {
            int ns = 0;
            if (overlap && w > 0)
                for (int t = 0; t < ratio; t++) {
                    idx[ns] = ((long)(w - 1) * ratio + t) * width + c;
                    apei[ns++] = t * width + c;
                }
            int off = overlap ? d : 0;
            for (int t = 0; t < ratio; t++) {
                idx[ns] = ((long)w * ratio + t) * width + off + c;
                apei[ns++] = t * width + off + c;
            }
            float mx = -INFINITY, den = 0.f, pooled = 0.f;
            for (int s = 0; s < ns; s++) {
                lg[s] = g[idx[s]] + ape[apei[s]];
                mx = lg[s] > mx ? lg[s] : mx;
            }
            for (int s = 0; s < ns; s++) den += (lg[s] = expf(lg[s] - mx));
            for (int s = 0; s < ns; s++) pooled += (lg[s] /= den) * a[idx[s]];
            float go = dout[(long)w * d + c];
            for (int s = 0; s < ns; s++) {
                float dl = lg[s] * (a[idx[s]] - pooled) * go; /* softmax backward */
                da[idx[s]] += lg[s] * go;
                dg[idx[s]] += dl;
                dape[apei[s]] += dl;
            }
        }
    }
    free(lg);
    free(idx);
    free(apei);
    return 0;
}

/* ---- The cached engine's wave ops: tokens of a wave belong to distinct sequences, so they run in
 * parallel; each computes exactly what the full-sequence ops compute for its position. */

int op_cache_push_kv(const kctx *k, attn_wave w, int layer, const float *kv, int d, int window, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_cache_push_kv(k, w, layer, kv, d, window, e));
    TRY(kctx_require_cpu(k, "op_cache_push_kv", e));
    for (int j = 0; j < w.n; j++)
        memcpy(w.seq[j][layer].ring + (long)(w.pos[j] % window) * d, kv + (long)w.row[j] * d, sizeof(float) * (size_t)d);
    return 0;
}

/* Pools one closing window straight from the cache, as op_compress_pool pools it. lg, val: 2 ratio. */
static void cache_pool(float *out, const attn_comp_cache *cc, const float *ape, int ratio, int dim, int overlap,
                       int has_prev, float *lg, const float **val) {
    int width = overlap ? 2 * dim : dim, off = overlap ? dim : 0;
    for (int c = 0; c < dim; c++) {
        int ns = 0;
        if (has_prev)
            for (int t = 0; t < ratio; t++) {
                lg[ns] = cc->prev_g[(long)t * width + c] + ape[(long)t * width + c];
                val[ns++] = cc->prev_a + (long)t * width + c;
            }
        for (int t = 0; t < ratio; t++) {
            lg[ns] = cc->cur_g[(long)t * width + off + c] + ape[(long)t * width + off + c];
            val[ns++] = cc->cur_a + (long)t * width + off + c;
        }
        out[c] = pool_slots(lg, val, ns);
    }
}

int op_cache_push_comp(const kctx *k, attn_wave w, int layer, int index, const float *a, const float *g,
                       const float *ape, const float *norm, const float *inv_freq, int ratio, int dim, int overlap,
                       int rope_dim, float eps, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_cache_push_comp(k, w, layer, index, a, g, ape, norm, inv_freq, ratio, dim, overlap,
                                               rope_dim, eps, e));
    TRY(kctx_require_cpu(k, "op_cache_push_comp", e));
    int width = overlap ? 2 * dim : dim, rc = 0;
    float *lg = malloc(sizeof(float) * (size_t)(2 * ratio + dim));
    const float **val = malloc(sizeof(float *) * (size_t)(2 * ratio));
    if (!lg || !val) rc = mill_errf(e, "op_cache_push_comp: out of memory");
    for (int j = 0; !rc && j < w.n; j++) {
        attn_layer_cache *lc = &w.seq[j][layer];
        const attn_comp_cache *cc = index ? &lc->index : &lc->comp;
        int p = w.pos[j], slot = p % ratio, win = p / ratio;
        memcpy(cc->cur_a + (long)slot * width, a + (long)w.row[j] * width, sizeof(float) * (size_t)width);
        memcpy(cc->cur_g + (long)slot * width, g + (long)w.row[j] * width, sizeof(float) * (size_t)width);
        if (slot != ratio - 1) continue;
        float *pooled = lg + 2 * ratio, *entry = cc->entries + (long)win * dim;
        int32_t wpos = win * ratio;
        cache_pool(pooled, cc, ape, ratio, dim, overlap, overlap && win > 0, lg, val);
        /* the same CPU ops the full forward applies to its pooled rows */
        rc = op_rmsnorm(k, entry, pooled, norm, 1, dim, 0, eps, e) ||
             op_rope(k, entry, 1, 1, dim, rope_dim, &wpos, inv_freq, 1, e);
        if (overlap) {
            memcpy(cc->prev_a, cc->cur_a, sizeof(float) * (size_t)ratio * width);
            memcpy(cc->prev_g, cc->cur_g, sizeof(float) * (size_t)ratio * width);
        }
    }
    free(lg);
    free(val);
    return rc ? -1 : 0;
}

int op_cache_index_topk(const kctx *k, int32_t *sel, float *score, attn_wave w, int layer, const float *q,
                        const float *weights, int nh, int hd, float scale_qk, int ratio, int max_entries, int topk,
                        mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_cache_index_topk(k, sel, score, w, layer, q, weights, nh, hd, scale_qk, ratio,
                                                max_entries, topk, e));
    TRY(kctx_require_cpu(k, "op_cache_index_topk", e));
#pragma omp parallel for schedule(static)
    for (int j = 0; j < w.n; j++) {
        int visible = (w.pos[j] + 1) / ratio, row = w.row[j];
        if (visible > max_entries) visible = max_entries; /* callers size max_entries to avoid this */
        float *s = score + (long)j * max_entries;
        index_row(s, q + (long)row * nh * hd, w.seq[j][layer].index.entries, weights + (long)row * nh, visible, nh, hd,
                  scale_qk, visible);
        topk_row(sel + (long)j * topk, s, visible, topk);
    }
    return 0;
}

typedef struct {
    const attn_wave *w;
    int layer;
    const int32_t *sel;
    int topk, ratio, max_entries, d, window;
} cache_keys;

/* Wave token j: its ring's window rows in position order, then all visible entries (HCA) or the
 * indexer's selection (CSA): op_sink_attention's order for the same position. */
static int cache_key_list(const void *ctx, int j, const float **keys, long *row) {
    const cache_keys *c = ctx;
    const attn_layer_cache *lc = &c->w->seq[j][c->layer];
    int p = c->w->pos[j], nk = 0, visible = c->ratio ? (p + 1) / c->ratio : 0;
    for (int i = p - c->window + 1 < 0 ? 0 : p - c->window + 1; i <= p; i++)
        keys[nk++] = lc->ring + (long)(i % c->window) * c->d;
    if (c->ratio && !c->sel)
        for (int t = 0; t < visible && t < c->max_entries; t++) keys[nk++] = lc->comp.entries + (long)t * c->d;
    if (c->ratio && c->sel)
        for (int t = 0; t < c->topk; t++) {
            int32_t w = c->sel[(long)j * c->topk + t];
            if (w >= 0) keys[nk++] = lc->comp.entries + (long)w * c->d;
        }
    *row = c->w->row[j];
    return nk;
}

int op_cache_attend(const kctx *k, float *out, const float *q, attn_wave w, int layer, const int32_t *sel, int topk,
                    int ratio, int max_entries, const float *sinks, int H, int d, int window, float scale,
                    mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_cache_attend(k, out, q, w, layer, sel, topk, ratio, max_entries, sinks, H, d, window,
                                            scale, e));
    TRY(kctx_require_cpu(k, "op_cache_attend", e));
    cache_keys c = {&w, layer, sel, topk, ratio, max_entries, d, window};
    return attend_all("op_cache_attend", w.n, (size_t)window + (size_t)(!ratio ? 0 : sel ? topk : max_entries),
                      cache_key_list, &c, out, q, sinks, H, d, scale, e);
}
