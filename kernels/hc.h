/* kernels/hc.h — manifold-constrained hyper-connections (mHC).
 * The residual is n = hc_mult streams per token, h[N, n, D]. Each block site
 * mixes them with weights computed from the (unweighted-RMS-normed) flattened
 * streams: pre (collapse), post (placement of the sublayer output) and comb,
 * an n x n matrix projected towards doubly stochastic by Sinkhorn. fp32. */
#ifndef MILL_HC_H
#define MILL_HC_H

#include "backend.h"

typedef struct {
    int n, D, sinkhorn_iters;
    float hc_eps, norm_eps;
} hc_dims;

/* f = unweighted_rmsnorm(flatten(h)) @ fn^T, then
 * pre[N, n]  = sigmoid(f[:n] * scale0 + base[:n]) + eps
 * post[N, n] = 2 * sigmoid(f[n:2n] * scale1 + base[n:2n])
 * comb[N, n, n] = sinkhorn(softmax_row(f[2n:] * scale2 + base[2n:]) + eps)
 * x[N, D] = sum_j pre_j * h_j.   work: >= N * (n*D + (2+n)*n) floats; afterwards f [N, mix] is at
 * work + N*n*D (op_hc_head: pre [N, n] there). The first N*n*D floats are scratch (the CPU leaves the
 * normed rows there, CUDA's few-token path nothing): no backward reads them, each recomputes. */
int op_hc_pre(const kctx *k, float *x, float *pre, float *post, float *comb, const float *h, const float *fn,
              const float *base, const float *scale, int N, hc_dims dm, float *work, mill_err *e);

/* h_out[N, k, :] = post_k * y + sum_j comb[j, k] * h[N, j, :]  (comb consumed transposed). */
int op_hc_post(const kctx *k, float *h_out, const float *h, const float *y, const float *post, const float *comb,
               int N, int n, int D, mill_err *e);

/* HC head: pre = sigmoid(rms(flatten(h)) @ fn^T * scale + base) + eps; x = sum_j pre_j h_j. */
int op_hc_head(const kctx *k, float *x, const float *h, const float *fn, const float *base, const float *scale, int N,
               hc_dims dm, float *work, mill_err *e);

/* Work floats the backward ops below need for N tokens. */
long hc_backward_work_floats(int N, hc_dims dm);

/* Backward of op_hc_post given dh_out [N, n, D]: dh += comb-mixed grads, dy += sum_k post_k dh_out_k;
 * dpost [N, n] and dcomb [N, n, n] are written (not accumulated). */
int op_hc_post_backward(const kctx *k, float *dh, float *dy, float *dpost, float *dcomb, const float *dh_out,
                        const float *h, const float *y, const float *post, const float *comb, int N, int n, int D,
                        mill_err *e);

/* Backward of op_hc_pre from dx [N, D], dpost [N, n], dcomb [N, n, n] (Sinkhorn recomputed):
 * accumulates into dh [N, n, D], dfn, dbase, dscale. */
int op_hc_pre_backward(const kctx *k, float *dh, float *dfn, float *dbase, float *dscale, const float *dx,
                       const float *dpost, const float *dcomb, const float *h, const float *fn, const float *base,
                       const float *scale, int N, hc_dims dm, float *work, mill_err *e);

/* Backward of op_hc_head from dx [N, D]: accumulates into dh, dfn, dbase, dscale. */
int op_hc_head_backward(const kctx *k, float *dh, float *dfn, float *dbase, float *dscale, const float *dx,
                        const float *h, const float *fn, const float *base, const float *scale, int N, hc_dims dm,
                        float *work, mill_err *e);

#endif
