#include "dense.h"

#ifdef MILL_CUDA
#include "cuda/cuda_ops.h"
#endif

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

/* GEMMs are split across OpenMP threads here, each calling single-threaded OpenBLAS (kctx_init
 * sets that): one thread pool for the whole CPU path instead of two fighting over the cores. */
static int gemm_chunks(int rows) {
    int nt = omp_get_max_threads();
    return nt > 1 && rows >= 2 * nt ? nt : 1;
}

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
    int lx = ldx ? ldx : K, ly = ldy ? ldy : N, nc = gemm_chunks(M);
#pragma omp parallel for schedule(static) if (nc > 1)
    for (int c = 0; c < nc; c++) {
        int m0 = (int)((long)M * c / nc), m1 = (int)((long)M * (c + 1) / nc);
        if (m1 > m0)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m1 - m0, N, K, 1.0f, x + (long)m0 * lx, lx, w, K,
                        accumulate ? 1.0f : 0.0f, y + (long)m0 * ly, ly);
    }
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
    MILL_CUDA_DISPATCH(cuda_op_embedding(k, out, table, ids, n, dim, vocab, e));
    TRY(kctx_require_cpu(k, "op_embedding", e));
    for (int t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= vocab)
            return mill_errf(e, "token id %d at position %d is outside the vocabulary [0, %d)", ids[t], t, vocab);
        memcpy(out + (long)t * dim, table + (long)ids[t] * dim, sizeof(float) * (size_t)dim);
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
    MILL_CUDA_DISPATCH(cuda_op_embedding_backward(k, dtable, dout, ids, n, dim, e));
    TRY(kctx_require_cpu(k, "op_embedding_backward", e));
    for (int t = 0; t < n; t++) {
        float *row = dtable + (long)ids[t] * dim;
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
