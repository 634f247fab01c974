/* kernels/dense.h — matmul, norms, embedding and elementwise ops.
 * Row-major throughout; a weight w[N, K] is stored as in the checkpoint
 * (out_features x in_features), so a linear layer is y = x @ w^T. */
#ifndef MILL_DENSE_H
#define MILL_DENSE_H

#include <stdint.h>

#include "backend.h"

/* y[M,N] = x[M,K] @ w[N,K]^T (+ y when accumulate). ldx/ldy: row strides (0 = K / N). */
int op_linear(const kctx *k, float *y, const float *x, const float *w, int M, int N, int K, int ldx, int ldy,
              int accumulate, mill_err *e);
/* y[M,N] = a[M,K] @ b[K,N]  (plain product, for mixing small matrices). */
int op_matmul_nn(const kctx *k, float *y, const float *a, const float *b, int M, int N, int K, mill_err *e);

/* y = x / sqrt(mean(x^2) + eps) * w over rows of `dim`; w NULL: unweighted.
 * ld: stride between rows of x and y (0 = dim); y may alias x. */
int op_rmsnorm(const kctx *k, float *y, const float *x, const float *w, int rows, int dim, int ld, float eps,
               mill_err *e);

/* out[t, :] = table[ids[t], :]; ids checked against vocab. */
int op_embedding(const kctx *k, float *out, const float *table, const int32_t *ids, int n, int dim, int vocab,
                 mill_err *e);

/* SwiGLU with DeepSeek-V4's clamp: h = silu(min(g, L)) * clamp(u, -L, L); g, u, h are [n]. */
int op_swiglu_clamp(const kctx *k, float *h, const float *g, const float *u, long n, float limit, mill_err *e);

/* Backward ops ACCUMULATE into their gradient outputs (callers zero them once). */

/* y = x @ w^T: dx[M,K] += dy @ w (if dx), dw[N,K] += dy^T @ x (if dw). */
int op_linear_backward(const kctx *k, float *dx, float *dw, const float *dy, const float *x, const float *w, int M,
                       int N, int K, int ldx, int ldy, mill_err *e);
/* y = rmsnorm(x) * w: dx += ..., dw += sum_rows dy * x * r (w, dw NULL: unweighted). */
int op_rmsnorm_backward(const kctx *k, float *dx, float *dw, const float *dy, const float *x, const float *w, int rows,
                        int dim, int ld, float eps, mill_err *e);
/* dtable[ids[t]] += dout[t]. */
int op_embedding_backward(const kctx *k, float *dtable, const float *dout, const int32_t *ids, int n, int dim,
                          mill_err *e);
/* h = silu(min(g, L)) * clamp(u, -L, L): dg += ..., du += ... */
int op_swiglu_clamp_backward(const kctx *k, float *dg, float *du, const float *dh, const float *g, const float *u,
                             long n, float limit, mill_err *e);
/* Mean next-token cross-entropy: rows whose target is < 0 are skipped. Returns the loss sum in
 * *loss_sum and the count in *count; dlogits = (softmax - onehot) * grad_scale for counted rows,
 * 0 elsewhere (dlogits may alias logits). */
int op_cross_entropy(const kctx *k, float *dlogits, double *loss_sum, long *count, const float *logits,
                     const int32_t *targets, int n, int vocab, float grad_scale, mill_err *e);

#endif
