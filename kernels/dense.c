#include "dense.h"
#include "shared_math.h"

#ifdef MILL_CUDA
#include "cuda/cuda_ops.h"
#endif

#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

/* GEMMs are split across OpenMP threads here, each calling single-threaded OpenBLAS (kctx_init
 * sets that): one thread pool for the whole CPU path instead of two fighting over the cores. */
static int gemm_chunks(int rows) {
    int nt = omp_get_max_threads();
    return nt > 1 && rows >= 2 * nt ? nt : 1;
}

/* op_linear is row-invariant: a row's result does not depend on how many rows share the call, so
 * the rollout engine (1 row per decode step, a few per expert) and the trainer (B*T rows) give a
 * token the same bits, and GRPO's rollout/trainer logprob gap is 0. OpenBLAS sums a row in an
 * order that depends on the call's row count and the row's place in it (M = 1 goes to gemv,
 * M-tails and some row counts to other micro-kernels), so every sgemm call here has exactly
 * k->gemm_rows rows, or whole blocks of them where kctx_init measured that several blocks per
 * call give the same bits (k->gemm_batch), and a last partial block runs zero-padded. */

int op_linear(const kctx *k, float *y, const float *x, const float *w, int M, int N, int K, int ldx, int ldy,
              int accumulate, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_linear(k, y, x, w, M, N, K, ldx, ldy, accumulate, e));
    TRY(kctx_require_cpu(k, "op_linear", e));
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) {
        if (!accumulate)
            for (int i = 0; i < M; i++) memset(y + (long)i * (ldy ? ldy : N), 0, sizeof(float) * (size_t)N);
        return 0;
    }
    const int GEMM_ROWS = k->gemm_rows > 0 ? k->gemm_rows : 16;
    int lx = ldx ? ldx : K, ly = ldy ? ldy : N, blocks = M / GEMM_ROWS, tail = M % GEMM_ROWS;
    float beta = accumulate ? 1.0f : 0.0f;
    int nc = gemm_chunks(blocks);
    if (k->gemm_batch) {
#pragma omp parallel for schedule(static) if (nc > 1)
        for (int c = 0; c < nc; c++) {
            int m0 = (int)((long)blocks * c / nc) * GEMM_ROWS, m1 = (int)((long)blocks * (c + 1) / nc) * GEMM_ROWS;
            if (m1 > m0)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m1 - m0, N, K, 1.0f, x + (long)m0 * lx, lx, w, K,
                            beta, y + (long)m0 * ly, ly);
        }
    } else {
#pragma omp parallel for schedule(static) if (nc > 1)
        for (int b = 0; b < blocks; b++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, GEMM_ROWS, N, K, 1.0f, x + (long)b * GEMM_ROWS * lx, lx,
                        w, K, beta, y + (long)b * GEMM_ROWS * ly, ly);
    }
    if (!tail) return 0;
    float *xs = calloc((size_t)GEMM_ROWS * K, sizeof(float)), *ys = calloc((size_t)GEMM_ROWS * N, sizeof(float));
    if (!xs || !ys) {
        free(xs);
        free(ys);
        return mill_errf(e, "op_linear: out of memory for a %d x %d padded block", GEMM_ROWS, K > N ? K : N);
    }
    long m0 = (long)blocks * GEMM_ROWS;
    for (int i = 0; i < tail; i++) {
        memcpy(xs + (long)i * K, x + (m0 + i) * lx, sizeof(float) * (size_t)K);
        if (accumulate) memcpy(ys + (long)i * N, y + (m0 + i) * ly, sizeof(float) * (size_t)N);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, GEMM_ROWS, N, K, 1.0f, xs, K, w, K, beta, ys, N);
    for (int i = 0; i < tail; i++) memcpy(y + (m0 + i) * ly, ys + (long)i * N, sizeof(float) * (size_t)N);
    free(xs);
    free(ys);
    return 0;
}

int op_matmul_nn(const kctx *k, float *y, const float *a, const float *b, int M, int N, int K, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_matmul_nn(k, y, a, b, M, N, K, e));
    TRY(kctx_require_cpu(k, "op_matmul_nn", e));
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    int nc = gemm_chunks(M);
#pragma omp parallel for schedule(static) if (nc > 1)
    for (int c = 0; c < nc; c++) {
        int m0 = (int)((long)M * c / nc), m1 = (int)((long)M * (c + 1) / nc);
        if (m1 > m0)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m1 - m0, N, K, 1.0f, a + (long)m0 * K, K, b, N, 0.0f,
                        y + (long)m0 * N, N);
    }
    return 0;
}

int op_rmsnorm(const kctx *k, float *y, const float *x, const float *w, int rows, int dim, int ld, float eps,
               mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_rmsnorm(k, y, x, w, rows, dim, ld, eps, e));
    TRY(kctx_require_cpu(k, "op_rmsnorm", e));
    if (!ld) ld = dim;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (long)r * ld;
        float *yr = y + (long)r * ld;
        double ss = 0.0; /* double sum: rows can be n*D long (HC flatten) */
        for (int i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        float inv = 1.0f / sqrtf((float)(ss / dim) + eps);
        for (int i = 0; i < dim; i++) yr[i] = w ? w[i] * (xr[i] * inv) : xr[i] * inv;
    }
    return 0;
}

int op_embedding(const kctx *k, float *out, const float *table, const int32_t *ids, int n, int dim, int vocab,
                 mill_err *e) {
    return op_embedding_part(k, out, table, ids, n, dim, vocab, 0, vocab, e);
}

int op_embedding_part(const kctx *k, float *out, const float *table, const int32_t *ids, int n, int dim, int vocab,
                      int v0, int v1, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_embedding_part(k, out, table, ids, n, dim, vocab, v0, v1, e));
    TRY(kctx_require_cpu(k, "op_embedding", e));
    for (int t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= vocab)
            return mill_errf(e, "token id %d at position %d is outside the vocabulary [0, %d)", ids[t], t, vocab);
        if (ids[t] >= v0 && ids[t] < v1)
            memcpy(out + (long)t * dim, table + (long)(ids[t] - v0) * dim, sizeof(float) * (size_t)dim);
        else memset(out + (long)t * dim, 0, sizeof(float) * (size_t)dim);
    }
    return 0;
}

int op_swiglu_clamp(const kctx *k, float *h, const float *g, const float *u, long n, float limit, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_swiglu_clamp(k, h, g, u, n, limit, e));
    TRY(kctx_require_cpu(k, "op_swiglu_clamp", e));
#pragma omp parallel for schedule(static)
    for (long i = 0; i < n; i++) {
        float a = g[i] < limit ? g[i] : limit;
        float b = u[i] < -limit ? -limit : (u[i] > limit ? limit : u[i]);
        h[i] = a / (1.0f + expf(-a)) * b;
    }
    return 0;
}

int op_linear_backward(const kctx *k, float *dx, float *dw, const float *dy, const float *x, const float *w, int M,
                       int N, int K, int ldx, int ldy, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_linear_backward(k, dx, dw, dy, x, w, M, N, K, ldx, ldy, e));
    TRY(kctx_require_cpu(k, "op_linear_backward", e));
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    int lx = ldx ? ldx : K, ly = ldy ? ldy : N;
    if (dx) { /* rows of dx are independent */
        int nc = gemm_chunks(M);
#pragma omp parallel for schedule(static) if (nc > 1)
        for (int c = 0; c < nc; c++) {
            int m0 = (int)((long)M * c / nc), m1 = (int)((long)M * (c + 1) / nc);
            if (m1 > m0)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m1 - m0, K, N, 1.0f, dy + (long)m0 * ly, ly, w,
                            K, 1.0f, dx + (long)m0 * lx, lx);
        }
    }
    if (dw) { /* dw sums over M: split its rows (N) instead */
        int nc = gemm_chunks(N);
#pragma omp parallel for schedule(static) if (nc > 1)
        for (int c = 0; c < nc; c++) {
            int n0 = (int)((long)N * c / nc), n1 = (int)((long)N * (c + 1) / nc);
            if (n1 > n0)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n1 - n0, K, M, 1.0f, dy + n0, ly, x, lx, 1.0f,
                            dw + (long)n0 * K, K);
        }
    }
    return 0;
}

int op_rmsnorm_backward(const kctx *k, float *dx, float *dw, const float *dy, const float *x, const float *w, int rows,
                        int dim, int ld, float eps, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_rmsnorm_backward(k, dx, dw, dy, x, w, rows, dim, ld, eps, e));
    TRY(kctx_require_cpu(k, "op_rmsnorm_backward", e));
    if (!ld) ld = dim;
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (long)r * ld, *gr = dy + (long)r * ld;
        float *dxr = dx + (long)r * ld;
        double ss = 0.0, dot = 0.0;
        for (int i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        float inv = 1.0f / sqrtf((float)(ss / dim) + eps);
        for (int i = 0; i < dim; i++) dot += (double)(w ? w[i] * gr[i] : gr[i]) * xr[i];
        /* d/dx of x*inv: inv * g - x * inv^3 * (g.x) / dim */
        float c = (float)(dot / dim) * inv * inv * inv;
        for (int i = 0; i < dim; i++) {
            float g = w ? w[i] * gr[i] : gr[i];
            dxr[i] += inv * g - xr[i] * c;
            if (dw) dw[i] += gr[i] * xr[i] * inv;
        }
    }
    return 0;
}

int op_embedding_backward(const kctx *k, float *dtable, const float *dout, const int32_t *ids, int n, int dim,
                          mill_err *e) {
    return op_embedding_part_backward(k, dtable, dout, ids, n, dim, 0, INT_MAX, e);
}

int op_embedding_part_backward(const kctx *k, float *dtable, const float *dout, const int32_t *ids, int n, int dim,
                               int v0, int v1, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_embedding_part_backward(k, dtable, dout, ids, n, dim, v0, v1, e));
    TRY(kctx_require_cpu(k, "op_embedding_backward", e));
    for (int t = 0; t < n; t++) {
        if (ids[t] < v0 || ids[t] >= v1) continue;
        float *row = dtable + (long)(ids[t] - v0) * dim;
        const float *g = dout + (long)t * dim;
        for (int i = 0; i < dim; i++) row[i] += g[i];
    }
    return 0;
}

int op_swiglu_clamp_backward(const kctx *k, float *dg, float *du, const float *dh, const float *g, const float *u,
                             long n, float limit, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_swiglu_clamp_backward(k, dg, du, dh, g, u, n, limit, e));
    TRY(kctx_require_cpu(k, "op_swiglu_clamp_backward", e));
    for (long i = 0; i < n; i++) {
        /* torch's clamp passes the gradient where the input lies within [min, max] */
        int g_in = g[i] <= limit, u_in = u[i] >= -limit && u[i] <= limit;
        float a = g_in ? g[i] : limit;
        float b = u_in ? u[i] : (u[i] < 0 ? -limit : limit);
        float sg = 1.0f / (1.0f + expf(-a)), silu = a * sg;
        if (g_in) dg[i] += dh[i] * b * (sg * (1.0f + a * (1.0f - sg)));
        if (u_in) du[i] += dh[i] * silu;
    }
    return 0;
}

int op_cross_entropy(const kctx *k, float *dlogits, double *loss_sum, long *count, const float *logits,
                     const int32_t *targets, int n, int vocab, float grad_scale, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_cross_entropy(k, dlogits, loss_sum, count, logits, targets, n, vocab, grad_scale, e));
    TRY(kctx_require_cpu(k, "op_cross_entropy", e));
    double total = 0.0;
    long cnt = 0;
    for (int t = 0; t < n; t++) {
        const float *l = logits + (long)t * vocab;
        float *d = dlogits ? dlogits + (long)t * vocab : NULL;
        int y = targets[t];
        if (y < 0) {
            if (d) memset(d, 0, sizeof(float) * (size_t)vocab);
            continue;
        }
        if (y >= vocab) return mill_errf(e, "cross entropy: target %d at row %d is outside [0, %d)", y, t, vocab);
        float mx = l[0];
        for (int v = 1; v < vocab; v++) mx = l[v] > mx ? l[v] : mx;
        double den = 0.0;
        for (int v = 0; v < vocab; v++) den += exp((double)(l[v] - mx));
        double lse = log(den) + mx;
        total += lse - l[y];
        cnt++;
        if (d) {
            for (int v = 0; v < vocab; v++) d[v] = (float)(exp((double)l[v] - lse)) * grad_scale;
            d[y] -= grad_scale;
        }
    }
    *loss_sum = total;
    *count = cnt;
    return 0;
}

/* The loop below was compute.c's token head, moved verbatim: CPU numerics unchanged. */
double logsumexp_t(const float *logits, int V, float temperature) {
    float mx = logits[0] / temperature;
    for (int v = 1; v < V; v++) mx = logits[v] / temperature > mx ? logits[v] / temperature : mx;
    double den = 0.0;
    for (int v = 0; v < V; v++) den += exp((double)(logits[v] / temperature - mx));
    return log(den) + mx;
}

int op_token_logp_part(const kctx *k, const float *logits, double *part, const int32_t *targets, int n, int vl, int v0,
                       int vocab, float temperature, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_token_logp_part(k, logits, part, targets, n, vl, v0, vocab, temperature, e));
    TRY(kctx_require_cpu(k, "op_token_logp_part", e));
    for (int t = 0; t < n; t++) {
        const float *l = logits + (long)t * vl;
        int y = targets[t];
        if (y < 0 || y >= vocab) continue; /* op_token_logp reports a target past the vocabulary */
        double lse = vl ? logsumexp_t(l, vl, temperature) : -INFINITY, pz = 0.0;
        for (int v = 0; v < vl; v++) {
            double z = (double)(l[v] / temperature);
            pz += exp(z - lse) * z;
        }
        part[3L * t] = lse;
        part[3L * t + 1] = pz;
        part[3L * t + 2] = y >= v0 && y < v0 + vl ? (double)(l[y - v0] / temperature) : 0.0;
    }
    return 0;
}

int op_token_logp(const kctx *k, float *logits, float *logp, float *ent, int32_t *rows, long *count,
                  const double *parts, int n_parts, const int32_t *targets, int n, int vl, int vocab,
                  float temperature, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_token_logp(k, logits, logp, ent, rows, count, parts, n_parts, targets, n, vl, vocab,
                                          temperature, e));
    TRY(kctx_require_cpu(k, "op_token_logp", e));
    /* log-softmax of logits / T and the entropy at each counted target; logits become softmax
     * probabilities */
    long cnt = 0;
    for (int t = 0; t < n; t++) {
        float *l = logits + (long)t * vl;
        int y = targets[t];
        if (y < 0) continue;
        if (y >= vocab) return mill_errf(e, "loss: target %d at position %d is outside [0, %d)", y, t, vocab);
        double lse, pz, zy;
        token_logp_combine(parts, n_parts, n, t, &lse, &pz, &zy);
        logp[cnt] = (float)(zy - lse);
        for (int v = 0; v < vl; v++) l[v] = (float)exp((double)(l[v] / temperature) - lse);
        ent[cnt] = (float)(lse - pz); /* H = -sum p log p = lse - sum p z */
        rows[cnt++] = t;
    }
    *count = cnt;
    return 0;
}

int op_token_logp_backward(const kctx *k, float *probs, const int32_t *rows, long count, const float *dlogp,
                           const float *dent, const float *ent, const int32_t *targets, int n, int vl, int v0,
                           float temperature, mill_err *e) {
    MILL_CUDA_DISPATCH(
        cuda_op_token_logp_backward(k, probs, rows, count, dlogp, dent, ent, targets, n, vl, v0, temperature, e));
    TRY(kctx_require_cpu(k, "op_token_logp_backward", e));
    /* d logp_y / d z = onehot_y - p and d H / d z_v = -p_v (log p_v + H), with z = logits / T;
     * rows without a target get no gradient */
    int next = 0;
    for (int t = 0; t < n; t++) {
        float *row = probs + (long)t * vl;
        if (next < count && rows[next] == t) {
            float g = dlogp[next] / temperature, gh = dent[next] / temperature, H = ent[next];
            next++;
            for (int v = 0; v < vl; v++) {
                float p = row[v];
                row[v] = -g * p - (gh != 0.0f && p > 0.0f ? gh * p * (logf(p) + H) : 0.0f);
            }
            if (targets[t] >= v0 && targets[t] < v0 + vl) row[targets[t] - v0] += g;
        } else {
            memset(row, 0, sizeof(float) * (size_t)vl);
        }
    }
    return 0;
}

int op_copy(const kctx *k, void *dst, const void *src, size_t bytes, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_copy(k, dst, src, bytes, e));
    TRY(kctx_require_cpu(k, "op_copy", e));
    if (bytes) memmove(dst, src, bytes);
    return 0;
}

int op_copy_2d(const kctx *k, void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, long rows,
               mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_copy_2d(k, dst, dpitch, src, spitch, width, rows, e));
    TRY(kctx_require_cpu(k, "op_copy_2d", e));
    for (long r = 0; width && r < rows; r++) memmove((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
    return 0;
}

int op_zero(const kctx *k, void *x, size_t bytes, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_zero(k, x, bytes, e));
    TRY(kctx_require_cpu(k, "op_zero", e));
    if (bytes) memset(x, 0, bytes);
    return 0;
}

int op_copy_from_host(const kctx *k, void *dst, const void *host_src, size_t bytes, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_copy_from_host(k, dst, host_src, bytes, e));
    TRY(kctx_require_cpu(k, "op_copy_from_host", e));
    if (bytes) memmove(dst, host_src, bytes);
    return 0;
}

int op_copy_to_host(const kctx *k, void *host_dst, const void *src, size_t bytes, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_copy_to_host(k, host_dst, src, bytes, e));
    TRY(kctx_require_cpu(k, "op_copy_to_host", e));
    if (bytes) memmove(host_dst, src, bytes);
    return 0;
}

int op_copy_to_host_async(const kctx *k, void *host_dst, const void *src, size_t bytes, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_copy_to_host_async(k, host_dst, src, bytes, e));
    TRY(kctx_require_cpu(k, "op_copy_to_host_async", e));
    if (bytes) memmove(host_dst, src, bytes);
    return 0;
}

int op_to_bf16(const kctx *k, uint16_t *dst, const float *src, size_t n, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_to_bf16(k, dst, src, n, e));
    TRY(kctx_require_cpu(k, "op_to_bf16", e));
    for (size_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
    return 0;
}

int op_from_bf16(const kctx *k, float *dst, const uint16_t *src, size_t n, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_from_bf16(k, dst, src, n, e));
    TRY(kctx_require_cpu(k, "op_from_bf16", e));
    for (size_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    return 0;
}

int op_repeat_rows(const kctx *k, float *dst, const float *src, int rows, int reps, int dim, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_repeat_rows(k, dst, src, rows, reps, dim, e));
    TRY(kctx_require_cpu(k, "op_repeat_rows", e));
    for (int t = 0; t < rows; t++)
        for (int j = 0; j < reps; j++)
            memcpy(dst + ((long)t * reps + j) * dim, src + (long)t * dim, sizeof(float) * (size_t)dim);
    return 0;
}

int op_repeat_rows_backward(const kctx *k, float *dsrc, const float *ddst, int rows, int reps, int dim, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_repeat_rows_backward(k, dsrc, ddst, rows, reps, dim, e));
    TRY(kctx_require_cpu(k, "op_repeat_rows_backward", e));
    for (int t = 0; t < rows; t++)
        for (int j = 0; j < reps; j++)
            for (int i = 0; i < dim; i++) dsrc[(long)t * dim + i] += ddst[((long)t * reps + j) * dim + i];
    return 0;
}

int op_gather_i32(const kctx *k, int32_t *out, const int32_t *table, const int32_t *ids, int n, int width, int rows,
                  mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_gather_i32(k, out, table, ids, n, width, rows, e));
    TRY(kctx_require_cpu(k, "op_gather_i32", e));
    for (int t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= rows)
            return mill_errf(e, "id %d at position %d is outside the table's rows [0, %d)", ids[t], t, rows);
        memcpy(out + (long)t * width, table + (long)ids[t] * width, sizeof(int32_t) * (size_t)width);
    }
    return 0;
}
