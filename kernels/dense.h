/* kernels/dense.h — matmul, norms, embedding and elementwise ops, the token head (log-softmax at
 * targets and entropy), and the memory ops a model needs between them (copy, zero, host
 * transfers, row repeat, int32 gather), so model code never touches activation memory itself.
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
/* The same over a slice of the vocabulary (a tensor-parallel rank's rows [v0, v1) of the table, at
 * table's row 0): out[t, :] = table[ids[t] - v0, :] for ids in the slice, zeros for the others. */
int op_embedding_part(const kctx *k, float *out, const float *table, const int32_t *ids, int n, int dim, int vocab,
                      int v0, int v1, mill_err *e);

/* SwiGLU with DeepSeek-V4's clamp: h = silu(min(g, L)) * clamp(u, -L, L); g, u, h are [n]. */
int op_swiglu_clamp(const kctx *k, float *h, const float *g, const float *u, long n, float limit, mill_err *e);

/* Backward ops ACCUMULATE into their gradient outputs (callers zero them once). */

/* y = x @ w^T: dx[M,K] += dy @ w (if dx), dw[N,K] += dy^T @ x (if dw). */
int op_linear_backward(const kctx *k, float *dx, float *dw, const float *dy, const float *x, const float *w, int M,
                       int N, int K, int ldx, int ldy, mill_err *e);
/* y = rmsnorm(x) * w: dx += ..., dw += sum_rows dy * x * r (w, dw NULL: unweighted). */
int op_rmsnorm_backward(const kctx *k, float *dx, float *dw, const float *dy, const float *x, const float *w, int rows,
                        int dim, int ld, float eps, mill_err *e);
/* dtable[ids[t]] += dout[t]; over a slice: dtable[ids[t] - v0] += dout[t] for ids in [v0, v1). */
int op_embedding_backward(const kctx *k, float *dtable, const float *dout, const int32_t *ids, int n, int dim,
                          mill_err *e);
int op_embedding_part_backward(const kctx *k, float *dtable, const float *dout, const int32_t *ids, int n, int dim,
                               int v0, int v1, mill_err *e);
/* h = silu(min(g, L)) * clamp(u, -L, L): dg += ..., du += ... */
int op_swiglu_clamp_backward(const kctx *k, float *dg, float *du, const float *dh, const float *g, const float *u,
                             long n, float limit, mill_err *e);
/* Mean next-token cross-entropy: rows whose target is < 0 are skipped. Returns the loss sum in
 * *loss_sum and the count in *count; dlogits = (softmax - onehot) * grad_scale for counted rows,
 * 0 elsewhere (dlogits may alias logits). */
int op_cross_entropy(const kctx *k, float *dlogits, double *loss_sum, long *count, const float *logits,
                     const int32_t *targets, int n, int vocab, float grad_scale, mill_err *e);


/* log(sum_v exp(logits[v] / T)) of one host row, as op_token_logp computes it on the CPU: the
 * rollout's sampler uses it too, so engine and trainer logprobs share one formula. */
double logsumexp_t(const float *logits, int V, float temperature);

/* Log-probabilities and entropies of logits / temperature at the rows whose target is >= 0, over
 * a slice of the vocabulary: logits [n, vl] hold columns [v0, v0 + vl) of rows of vocab (tensor
 * parallelism, where no rank forms a whole row; one process: v0 0, vl vocab). Two steps around
 * an exchange of three doubles a row:
 *   op_token_logp_part: at each row whose target is in [0, vocab), part[3t .. 3t + 2] = the slice's
 *     log-sum-exp of z = logits / T, its sum of exp(z - that) * z, and z at the target when the
 *     slice holds it (else 0); the other rows are left alone.
 *   op_token_logp: given every slice's parts [n_parts][n][3] (in one order on every rank), the
 *     counted rows in order get logp[i] = log_softmax at the target, ent[i] = the entropy of the
 *     whole row's distribution and rows[i] = the row; *count (host) = how many (a target >= vocab
 *     is an error). Counted rows of logits are replaced by their softmax probabilities (the
 *     backward's input); the others are left alone. logp, ent, rows: [n] capacity. One slice
 *     gives the single-process numbers bit for bit. */
int op_token_logp_part(const kctx *k, const float *logits, double *part, const int32_t *targets, int n, int vl, int v0,
                       int vocab, float temperature, mill_err *e);
int op_token_logp(const kctx *k, float *logits, float *logp, float *ent, int32_t *rows, long *count,
                  const double *parts, int n_parts, const int32_t *targets, int n, int vl, int vocab,
                  float temperature, mill_err *e);
/* Its backward, in place: probs (op_token_logp's logits) become dlogits given dlogp and dent
 * ([count], d loss / d logp and / d entropy): d logp_y / d z = onehot_y - p, d H / d z_v =
 * -p_v (log p_v + H), z = logits / temperature (the onehot where the slice holds the target);
 * rows without a target get 0. Overwrites, unlike the other backward ops. */
int op_token_logp_backward(const kctx *k, float *probs, const int32_t *rows, long count, const float *dlogp,
                           const float *dent, const float *ent, const int32_t *targets, int n, int vl, int v0,
                           float temperature, mill_err *e);

/* Memory ops (bytes of any element type). The from/to_host pair moves between host memory and
 * k's memory (memcpy on the CPU); op_copy_to_host waits for the device. */
int op_copy(const kctx *k, void *dst, const void *src, size_t bytes, mill_err *e);
int op_zero(const kctx *k, void *x, size_t bytes, mill_err *e);
int op_copy_from_host(const kctx *k, void *dst, const void *host_src, size_t bytes, mill_err *e);
int op_copy_to_host(const kctx *k, void *host_dst, const void *src, size_t bytes, mill_err *e);
/* The same copy queued without waiting: the bytes are in host_dst after the next kctx_sync or
 * op_copy_to_host (CUDA: truly asynchronous only into mem_alloc_host memory). */
int op_copy_to_host_async(const kctx *k, void *host_dst, const void *src, size_t bytes, mill_err *e);
/* rows rows of width bytes from src (rows spitch bytes apart) to dst (dpitch apart), in k's memory: a
 * block of columns moved between row-major matrices (tensor-parallel pieces into whole rows). */
int op_copy_2d(const kctx *k, void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, long rows,
               mill_err *e);
/* fp32 to bf16 (round to nearest even, NaN kept quiet: f32_to_bf16's bits) and back: a boundary
 * tensor's wire format (the pipeline's streams). */
int op_to_bf16(const kctx *k, uint16_t *dst, const float *src, size_t n, mill_err *e);
int op_from_bf16(const kctx *k, float *dst, const uint16_t *src, size_t n, mill_err *e);
/* dst[r, j, :] = src[r, :] for j < reps (dst [rows, reps, dim]): the hyper-connection streams
 * start as copies of the embedding. */
int op_repeat_rows(const kctx *k, float *dst, const float *src, int rows, int reps, int dim, mill_err *e);
/* Its backward: dsrc[r, :] += ddst[r, 0, :] + ... + ddst[r, reps-1, :] (in that order). */
int op_repeat_rows_backward(const kctx *k, float *dsrc, const float *ddst, int rows, int reps, int dim, mill_err *e);
/* out[t, :] = table[ids[t], :] for an int32 table of `rows` rows of `width` (tid2eid); ids checked. */
int op_gather_i32(const kctx *k, int32_t *out, const int32_t *table, const int32_t *ids, int n, int width, int rows,
                  mill_err *e);

#endif
