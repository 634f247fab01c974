#include "hc.h"

#ifdef MILL_CUDA
#include "cuda/cuda_ops.h"
#endif

#include <math.h>
#include "shared_math.h"
#include <string.h>

#include "dense.h"

static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* f[N, mix] = unweighted_rmsnorm(h rows of n*D) @ fn^T; normed rows go to work. */
static int hc_logits(const kctx *k, float *f, const float *h, const float *fn, int N, int mix, hc_dims dm,
                     float *work, mill_err *e) {
    int nd = dm.n * dm.D;
    TRY(op_rmsnorm(k, work, h, NULL, N, nd, 0, dm.norm_eps, e));
    return op_linear(k, f, work, fn, N, mix, nd, 0, 0, 0, e);
}

static void collapse(float *x, const float *h, const float *pre, int N, int n, int D) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float *xt = x + (long)t * D;
        memset(xt, 0, sizeof(float) * (size_t)D);
        for (int j = 0; j < n; j++) {
            const float *hj = h + ((long)t * n + j) * D;
            float p = pre[(long)t * n + j];
            for (int c = 0; c < D; c++) xt[c] += p * hj[c];
        }
    }
}

int op_hc_pre(const kctx *k, float *x, float *pre, float *post, float *comb, const float *h, const float *fn,
              const float *base, const float *scale, int N, hc_dims dm, float *work, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_hc_pre(k, x, pre, post, comb, h, fn, base, scale, N, dm, work, e));
    TRY(kctx_require_cpu(k, "op_hc_pre", e));
    int n = dm.n, mix = (2 + n) * n;
    float *f = work + (long)N * n * dm.D;
    TRY(hc_logits(k, f, h, fn, N, mix, dm, work, e));
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const float *ft = f + (long)t * mix;
        float *pr = pre + (long)t * n, *po = post + (long)t * n, *C = comb + (long)t * n * n;
        for (int j = 0; j < n; j++) {
            pr[j] = sigmoidf(ft[j] * scale[0] + base[j]) + dm.hc_eps;
            po[j] = 2.0f * sigmoidf(ft[n + j] * scale[1] + base[n + j]);
        }
        for (int r = 0; r < n; r++) { /* softmax over each row, then + eps */
            float *row = C + r * n, mx = -INFINITY, den = 0.f;
            for (int c = 0; c < n; c++) {
                row[c] = ft[2 * n + r * n + c] * scale[2] + base[2 * n + r * n + c];
                mx = row[c] > mx ? row[c] : mx;
            }
            for (int c = 0; c < n; c++) {
                row[c] = expf(row[c] - mx);
                den += row[c];
            }
            for (int c = 0; c < n; c++) row[c] = row[c] / den + dm.hc_eps;
        }
        sinkhorn_inplace(C, n, dm.sinkhorn_iters, dm.hc_eps);
    }
    collapse(x, h, pre, N, n, dm.D);
    return 0;
}

int op_hc_post(const kctx *k, float *h_out, const float *h, const float *y, const float *post, const float *comb,
               int N, int n, int D, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_hc_post(k, h_out, h, y, post, comb, N, n, D, e));
    TRY(kctx_require_cpu(k, "op_hc_post", e));
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const float *C = comb + (long)t * n * n, *yt = y + (long)t * D;
        for (int kk = 0; kk < n; kk++) {
            float *o = h_out + ((long)t * n + kk) * D;
            float p = post[(long)t * n + kk];
            for (int c = 0; c < D; c++) o[c] = p * yt[c];
            for (int j = 0; j < n; j++) {
                const float *hj = h + ((long)t * n + j) * D;
                float w = C[j * n + kk];
                for (int c = 0; c < D; c++) o[c] += w * hj[c];
            }
        }
    }
    return 0;
}

int op_hc_head(const kctx *k, float *x, const float *h, const float *fn, const float *base, const float *scale, int N,
               hc_dims dm, float *work, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_hc_head(k, x, h, fn, base, scale, N, dm, work, e));
    TRY(kctx_require_cpu(k, "op_hc_head", e));
    int n = dm.n;
    float *f = work + (long)N * n * dm.D;
    TRY(hc_logits(k, f, h, fn, N, n, dm, work, e));
    for (long i = 0; i < (long)N * n; i++) f[i] = sigmoidf(f[i] * scale[0] + base[i % n]) + dm.hc_eps;
    collapse(x, h, f, N, n, dm.D);
    return 0;
}

long hc_backward_work_floats(int N, hc_dims dm) {
    int n = dm.n, mix = (2 + n) * n, steps = 2 * dm.sinkhorn_iters;
    return 2L * N * n * dm.D + 2L * N * mix + (long)(steps + 4) * n * n;
}

int op_hc_post_backward(const kctx *k, float *dh, float *dy, float *dpost, float *dcomb, const float *dh_out,
                        const float *h, const float *y, const float *post, const float *comb, int N, int n, int D,
                        mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_hc_post_backward(k, dh, dy, dpost, dcomb, dh_out, h, y, post, comb, N, n, D, e));
    TRY(kctx_require_cpu(k, "op_hc_post_backward", e));
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const float *C = comb + (long)t * n * n, *yt = y + (long)t * D;
        float *dyt = dy + (long)t * D;
        for (int kk = 0; kk < n; kk++) {
            const float *g = dh_out + ((long)t * n + kk) * D;
            float p = post[(long)t * n + kk], dp = 0.f;
            for (int c = 0; c < D; c++) {
                dp += g[c] * yt[c];
                dyt[c] += p * g[c];
            }
            dpost[(long)t * n + kk] = dp;
            for (int j = 0; j < n; j++) {
                const float *hj = h + ((long)t * n + j) * D;
                float *dhj = dh + ((long)t * n + j) * D, w = C[j * n + kk], dc = 0.f;
                for (int c = 0; c < D; c++) {
                    dc += g[c] * hj[c];
                    dhj[c] += w * g[c];
                }
                dcomb[(long)t * n * n + j * n + kk] = dc;
            }
        }
    }
    return 0;
}

/* d(collapse): dpre_j = dx . h_j; dh_j += pre_j dx. */
static void collapse_backward(float *dpre, float *dh, const float *dx, const float *h, const float *pre, int n, int D) {
    for (int j = 0; j < n; j++) {
        const float *hj = h + (long)j * D;
        float *dhj = dh + (long)j * D, acc = 0.f;
        for (int c = 0; c < D; c++) {
            acc += dx[c] * hj[c];
            dhj[c] += pre[j] * dx[c];
        }
        dpre[j] = acc;
    }
}

/* Shared tail: dFL = dF @ fn, dfn += dF^T FL, then through the unweighted RMSNorm into dh. */
static int hc_logits_backward(const kctx *k, float *dh, float *dfn, const float *dF, const float *FL, const float *h,
                              const float *fn, int N, int mix, hc_dims dm, float *dFL, mill_err *e) {
    int nd = dm.n * dm.D;
    memset(dFL, 0, sizeof(float) * (size_t)N * nd);
    TRY(op_linear_backward(k, dFL, dfn, dF, FL, fn, N, mix, nd, 0, 0, e));
    return op_rmsnorm_backward(k, dh, NULL, dFL, h, NULL, N, nd, 0, dm.norm_eps, e);
}

int op_hc_pre_backward(const kctx *k, float *dh, float *dfn, float *dbase, float *dscale, const float *dx,
                       const float *dpost, const float *dcomb, const float *h, const float *fn, const float *base,
                       const float *scale, int N, hc_dims dm, float *work, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_hc_pre_backward(k, dh, dfn, dbase, dscale, dx, dpost, dcomb, h, fn, base, scale, N, dm, work, e));
    TRY(kctx_require_cpu(k, "op_hc_pre_backward", e));
    int n = dm.n, D = dm.D, mix = (2 + n) * n, nn = n * n, steps = 2 * dm.sinkhorn_iters - 1;
    float *FL = work, *dFL = FL + (long)N * n * D, *F = dFL + (long)N * n * D, *dF = F + (long)N * mix;
    float *chain = dF + (long)N * mix; /* (steps + 1) matrices: the input of each Sinkhorn step, then the result */
    float *P = chain + (long)(steps + 1) * nn, *G = P + nn, *pre = G + nn, *dpre = pre + n;
    TRY(op_rmsnorm(k, FL, h, NULL, N, n * D, 0, dm.norm_eps, e));
    TRY(op_linear(k, F, FL, fn, N, mix, n * D, 0, 0, 0, e));
    for (int t = 0; t < N; t++) {
        const float *ft = F + (long)t * mix;
        float *dft = dF + (long)t * mix;
        /* recompute pre and the Sinkhorn chain */
        for (int j = 0; j < n; j++) pre[j] = sigmoidf(ft[j] * scale[0] + base[j]) + dm.hc_eps;
        for (int r = 0; r < n; r++) {
            float mx = -INFINITY, den = 0.f;
            for (int c = 0; c < n; c++) {
                P[r * n + c] = ft[2 * n + r * n + c] * scale[2] + base[2 * n + r * n + c];
                mx = P[r * n + c] > mx ? P[r * n + c] : mx;
            }
            for (int c = 0; c < n; c++) den += (P[r * n + c] = expf(P[r * n + c] - mx));
            for (int c = 0; c < n; c++) {
                P[r * n + c] /= den;
                chain[r * n + c] = P[r * n + c] + dm.hc_eps;
            }
        }
        sinkhorn_chain(chain, n, steps, dm.hc_eps);
        /* back through the chain: G holds d(out) */
        memcpy(G, dcomb + (long)t * nn, sizeof(float) * (size_t)nn);
        sinkhorn_chain_backward(chain, G, n, steps, dm.hc_eps);
        for (int r = 0; r < n; r++) { /* softmax rows */
            float dot = 0.f;
            for (int c = 0; c < n; c++) dot += P[r * n + c] * G[r * n + c];
            for (int c = 0; c < n; c++) {
                int ix = 2 * n + r * n + c;
                float dl = P[r * n + c] * (G[r * n + c] - dot);
                dft[ix] = dl * scale[2];
                dscale[2] += dl * ft[ix];
                dbase[ix] += dl;
            }
        }
        collapse_backward(dpre, dh + (long)t * n * D, dx + (long)t * D, h + (long)t * n * D, pre, n, D);
        for (int j = 0; j < n; j++) {
            float sg = pre[j] - dm.hc_eps, dl = dpre[j] * sg * (1.0f - sg);
            dft[j] = dl * scale[0];
            dscale[0] += dl * ft[j];
            dbase[j] += dl;
            float sp = sigmoidf(ft[n + j] * scale[1] + base[n + j]), dlp = dpost[(long)t * n + j] * 2.0f * sp * (1.0f - sp);
            dft[n + j] = dlp * scale[1];
            dscale[1] += dlp * ft[n + j];
            dbase[n + j] += dlp;
        }
    }
    return hc_logits_backward(k, dh, dfn, dF, FL, h, fn, N, mix, dm, dFL, e);
}

int op_hc_head_backward(const kctx *k, float *dh, float *dfn, float *dbase, float *dscale, const float *dx,
                        const float *h, const float *fn, const float *base, const float *scale, int N, hc_dims dm,
                        float *work, mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_hc_head_backward(k, dh, dfn, dbase, dscale, dx, h, fn, base, scale, N, dm, work, e));
    TRY(kctx_require_cpu(k, "op_hc_head_backward", e));
    int n = dm.n, D = dm.D;
    float *FL = work, *dFL = FL + (long)N * n * D, *F = dFL + (long)N * n * D, *dF = F + (long)N * n;
    float *pre = dF + (long)N * n, *dpre = pre + n;
    TRY(op_rmsnorm(k, FL, h, NULL, N, n * D, 0, dm.norm_eps, e));
    TRY(op_linear(k, F, FL, fn, N, n, n * D, 0, 0, 0, e));
    for (int t = 0; t < N; t++) {
        const float *ft = F + (long)t * n;
        for (int j = 0; j < n; j++) pre[j] = sigmoidf(ft[j] * scale[0] + base[j]) + dm.hc_eps;
        collapse_backward(dpre, dh + (long)t * n * D, dx + (long)t * D, h + (long)t * n * D, pre, n, D);
        for (int j = 0; j < n; j++) {
            float sg = pre[j] - dm.hc_eps, dl = dpre[j] * sg * (1.0f - sg);
            dF[(long)t * n + j] = dl * scale[0];
            dscale[0] += dl * ft[j];
            dbase[j] += dl;
        }
    }
    return hc_logits_backward(k, dh, dfn, dF, FL, h, fn, N, n, dm, dFL, e);
}
