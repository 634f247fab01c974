#include "moe.h"

#ifdef MILL_CUDA
#include "cuda/cuda_ops.h"
#endif

#include <math.h>
#include "shared_math.h"
#include <stdlib.h>
#include <string.h>

#include "dense.h"

static float score_fn(float x, dsv4_score_func f) {
    if (f == SCORE_SIGMOID) return 1.0f / (1.0f + expf(-x));
    /* sqrt(softplus(x)); torch's softplus returns x itself above 20 */
    float sp = x > 20.0f ? x : log1pf(expf(x));
    return sqrtf(sp);
}

int op_moe_route(const kctx *k, float *scores, int32_t *ids, float *weights, const float *logits, const float *bias,
                 const int32_t *given_ids, int N, moe_route_cfg rc, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_moe_route(k, scores, ids, weights, logits, bias, given_ids, N, rc, e));
    TRY(kctx_require_cpu(k, "op_moe_route", e));
    int E = rc.E, K = rc.K;
    for (int t = 0; t < N; t++) {
        const float *l = logits + (long)t * E;
        float *s = scores + (long)t * E;
        if (rc.score_func == SCORE_SOFTMAX) {
            float mx = l[0], den = 0.f;
            for (int x = 1; x < E; x++) mx = l[x] > mx ? l[x] : mx;
            for (int x = 0; x < E; x++) den += (s[x] = expf(l[x] - mx));
            for (int x = 0; x < E; x++) s[x] /= den;
        } else {
            for (int x = 0; x < E; x++) s[x] = score_fn(l[x], rc.score_func);
        }
        int32_t *id = ids + (long)t * K;
        if (given_ids) {
            for (int j = 0; j < K; j++) {
                int32_t g = given_ids[(long)t * K + j];
                if (g < 0 || g >= E)
                    return mill_errf(e, "routing: expert id %d for token %d is outside [0, %d)", g, t, E);
                id[j] = g;
            }
        } else {
            route_topk(s, bias, E, K, id);
        }
        route_weights(s, id, K, rc.norm_topk, rc.routed_scale, weights + (long)t * K);
    }
    return 0;
}

long moe_experts_work_floats(int N, int D, int I, int E, int K) {
    long NK = (long)N * K;
    return NK * (2L * D + 2L * I) + NK + E + 1; /* int32 fits in a float slot */
}

/* Groups the N*K (token, slot) rows by expert (stable counting sort): xg gets the token rows in
 * grouped order, slot_row maps each (token, slot) to its grouped row, offs[E+1] the expert starts. */
static int group_rows(float *xg, int32_t *slot_row, int32_t *offs, const float *x, const int32_t *ids, long NK, int D,
                      int E, int K, mill_err *e) {
    memset(offs, 0, sizeof(int32_t) * (size_t)(E + 1));
    for (long r = 0; r < NK; r++) {
        if (ids[r] < 0 || ids[r] >= E) return mill_errf(e, "moe: expert id %d outside [0, %d)", ids[r], E);
        offs[ids[r] + 1]++;
    }
    for (int ex = 0; ex < E; ex++) offs[ex + 1] += offs[ex];
    for (long r = 0; r < NK; r++) {
        long dst = offs[ids[r]]++;
        slot_row[r] = (int32_t)dst;
        memcpy(xg + dst * D, x + (r / K) * D, sizeof(float) * (size_t)D);
    }
    for (int ex = E; ex > 0; ex--) offs[ex] = offs[ex - 1]; /* restore the starts */
    offs[0] = 0;
    return 0;
}

int op_moe_experts(const kctx *k, float *out, const float *x, const int32_t *ids, const float *weights,
                   const float *w1, const float *w3, const float *w2, int N, int D, int I, int E, int K, float limit,
                   int accumulate, float *work, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_moe_experts(k, out, x, ids, weights, w1, w3, w2, N, D, I, E, K, limit, accumulate, work, e));
    TRY(kctx_require_cpu(k, "op_moe_experts", e));
    long NK = (long)N * K;
    float *xg = work, *g = xg + NK * D, *u = g + NK * I, *y = u + NK * I;
    int32_t *slot_row = (int32_t *)(y + NK * D); /* (token*K + slot) -> its grouped row */
    int32_t *offs = slot_row + NK;               /* [E + 1] */
    TRY(group_rows(xg, slot_row, offs, x, ids, NK, D, E, K, e));
    for (int ex = 0; ex < E; ex++) {
        long s0 = offs[ex], n = offs[ex + 1] - s0;
        if (!n) continue;
        float *xe = xg + s0 * D, *ge = g + s0 * I, *ue = u + s0 * I, *ye = y + s0 * D;
        TRY(op_linear(k, ge, xe, w1 + (long)ex * I * D, (int)n, I, D, 0, 0, 0, e));
        TRY(op_linear(k, ue, xe, w3 + (long)ex * I * D, (int)n, I, D, 0, 0, 0, e));
        TRY(op_swiglu_clamp(k, ge, ge, ue, n * I, limit, e));
        TRY(op_linear(k, ye, ge, w2 + (long)ex * D * I, (int)n, D, I, 0, 0, 0, e));
    }
    /* Sum in (token, slot) order so the result does not depend on how tokens were grouped. */
    if (!accumulate) memset(out, 0, sizeof(float) * (size_t)N * D);
    for (long r = 0; r < NK; r++) {
        float wgt = weights[r], *o = out + (r / K) * D;
        const float *yr = y + (long)slot_row[r] * D;
        for (int c = 0; c < D; c++) o[c] += wgt * yr[c];
    }
    return 0;
}

int op_moe_combine(const kctx *k, float *out, const float *y, const float *weights, int N, int K, int D, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_moe_combine(k, out, y, weights, N, K, D, e));
    TRY(kctx_require_cpu(k, "op_moe_combine", e));
    memset(out, 0, sizeof(float) * (size_t)N * D); /* op_moe_experts' sum, term by term */
    for (long r = 0; r < (long)N * K; r++) {
        float wgt = weights[r], *o = out + (r / K) * D;
        const float *yr = y + r * D;
        for (int c = 0; c < D; c++) o[c] += wgt * yr[c];
    }
    return 0;
}

int op_moe_combine_backward(const kctx *k, float *dy, float *dweights, const float *dout, const float *y,
                            const float *weights, int N, int K, int D, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_moe_combine_backward(k, dy, dweights, dout, y, weights, N, K, D, e));
    TRY(kctx_require_cpu(k, "op_moe_combine_backward", e));
    for (long r = 0; r < (long)N * K; r++) {
        const float *g = dout + (r / K) * D, *yr = y + r * D;
        float *d = dy + r * D, s = 0.f;
        for (int c = 0; c < D; c++) {
            d[c] = weights[r] * g[c];
            s += g[c] * yr[c];
        }
        dweights[r] = s;
    }
    return 0;
}

static float score_grad(float l, float s, dsv4_score_func f) {
    if (f == SCORE_SIGMOID) return s * (1.0f - s);
    float sp_grad = l > 20.0f ? 1.0f : 1.0f / (1.0f + expf(-l)); /* softplus' (torch's threshold) */
    return s > 0.f ? sp_grad / (2.0f * s) : 0.f;
}

int op_moe_route_backward(const kctx *k, float *dlogits, const float *dweights, const float *scores,
                          const float *logits, const int32_t *ids, int N, moe_route_cfg rc, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_moe_route_backward(k, dlogits, dweights, scores, logits, ids, N, rc, e));
    TRY(kctx_require_cpu(k, "op_moe_route_backward", e));
    int E = rc.E, K = rc.K;
    float *ds = malloc(sizeof(float) * (size_t)E);
    if (!ds) return mill_errf(e, "op_moe_route_backward: out of memory");
    for (int t = 0; t < N; t++) {
        const float *s = scores + (long)t * E, *l = logits + (long)t * E, *dw = dweights + (long)t * K;
        const int32_t *id = ids + (long)t * K;
        memset(ds, 0, sizeof(float) * (size_t)E);
        if (rc.norm_topk) {
            float S = 1e-20f, dot = 0.f;
            for (int j = 0; j < K; j++) S += s[id[j]];
            for (int j = 0; j < K; j++) dot += dw[j] * s[id[j]];
            for (int j = 0; j < K; j++) ds[id[j]] += rc.routed_scale * (dw[j] / S - dot / (S * S));
        } else {
            for (int j = 0; j < K; j++) ds[id[j]] += rc.routed_scale * dw[j];
        }
        float *dl = dlogits + (long)t * E;
        if (rc.score_func == SCORE_SOFTMAX) {
            float dot = 0.f;
            for (int x = 0; x < E; x++) dot += s[x] * ds[x];
            for (int x = 0; x < E; x++) dl[x] += s[x] * (ds[x] - dot);
        } else {
            for (int x = 0; x < E; x++) dl[x] += ds[x] * score_grad(l[x], s[x], rc.score_func);
        }
    }
    free(ds);
    return 0;
}

long moe_experts_backward_work_floats(int N, int D, int I, int E, int K) {
    long NK = (long)N * K;
    return NK * (4L * D + 5L * I) + NK + E + 1;
}

int op_moe_experts_backward(const kctx *k, float *dx, float *dw1, float *dw3, float *dw2, float *dweights,
                            const float *dout, const float *x, const int32_t *ids, const float *weights,
                            const float *w1, const float *w3, const float *w2, int N, int D, int I, int E, int K,
                            float limit, float *work, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_moe_experts_backward(k, dx, dw1, dw3, dw2, dweights, dout, x, ids, weights, w1, w3, w2, N, D, I, E, K, limit, work, e));
    TRY(kctx_require_cpu(k, "op_moe_experts_backward", e));
    long NK = (long)N * K;
    float *xg = work, *y = xg + NK * D, *dy = y + NK * D, *dxg = dy + NK * D;
    float *g = dxg + NK * D, *u = g + NK * I, *act = u + NK * I, *dg = act + NK * I, *du = dg + NK * I;
    int32_t *slot_row = (int32_t *)(du + NK * I), *offs = slot_row + NK;
    TRY(group_rows(xg, slot_row, offs, x, ids, NK, D, E, K, e));
    /* dy of each grouped row = weight * dout[token]; dweights = dout . y (needs y: recompute) */
    for (int ex = 0; ex < E; ex++) {
        long s0 = offs[ex], n = offs[ex + 1] - s0;
        if (!n) continue;
        TRY(op_linear(k, g + s0 * I, xg + s0 * D, w1 + (long)ex * I * D, (int)n, I, D, 0, 0, 0, e));
        TRY(op_linear(k, u + s0 * I, xg + s0 * D, w3 + (long)ex * I * D, (int)n, I, D, 0, 0, 0, e));
        TRY(op_swiglu_clamp(k, act + s0 * I, g + s0 * I, u + s0 * I, n * I, limit, e));
        TRY(op_linear(k, y + s0 * D, act + s0 * I, w2 + (long)ex * D * I, (int)n, D, I, 0, 0, 0, e));
    }
    for (long r = 0; r < NK; r++) {
        const float *go = dout + (r / K) * D, *yr = y + (long)slot_row[r] * D;
        float *dyr = dy + (long)slot_row[r] * D, dot = 0.f;
        for (int c = 0; c < D; c++) {
            dot += go[c] * yr[c];
            dyr[c] = weights[r] * go[c];
        }
        dweights[r] = dot;
    }
    memset(dg, 0, sizeof(float) * (size_t)(NK * I * 2));
    memset(dxg, 0, sizeof(float) * (size_t)(NK * D));
    for (int ex = 0; ex < E; ex++) {
        long s0 = offs[ex], n = offs[ex + 1] - s0;
        if (!n) continue;
        float *dact = act + s0 * I; /* act's rows become dact once dw2 has used them */
        TRY(op_linear_backward(k, NULL, dw2 + (long)ex * D * I, dy + s0 * D, act + s0 * I, w2 + (long)ex * D * I,
                               (int)n, D, I, 0, 0, e));
        memset(dact, 0, sizeof(float) * (size_t)(n * I));
        TRY(op_linear_backward(k, dact, NULL, dy + s0 * D, NULL, w2 + (long)ex * D * I, (int)n, D, I, 0, 0, e));
        TRY(op_swiglu_clamp_backward(k, dg + s0 * I, du + s0 * I, dact, g + s0 * I, u + s0 * I, n * I, limit, e));
        TRY(op_linear_backward(k, dxg + s0 * D, dw1 + (long)ex * I * D, dg + s0 * I, xg + s0 * D, w1 + (long)ex * I * D,
                               (int)n, I, D, 0, 0, e));
        TRY(op_linear_backward(k, dxg + s0 * D, dw3 + (long)ex * I * D, du + s0 * I, xg + s0 * D, w3 + (long)ex * I * D,
                               (int)n, I, D, 0, 0, e));
    }
    for (long r = 0; r < NK; r++) {
        float *o = dx + (r / K) * D;
        const float *gr = dxg + (long)slot_row[r] * D;
        for (int c = 0; c < D; c++) o[c] += gr[c];
    }
    return 0;
}
