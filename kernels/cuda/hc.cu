/* kernels/cuda/hc.cu — CUDA paths of kernels/hc.h (manifold-constrained hyper-connections).
 * All fp32 like the CPU path: the logits' product f = rms(flatten(h)) @ fn^T is a full-fp32 cuBLAS
 * GEMM (it is small, (2+n)*n outputs, and feeds Sinkhorn); the per-token mixing math (sigmoids,
 * softmax, Sinkhorn and its backward) is one thread per token, since n is 4; collapse / placement
 * are one thread per element; dot products over D are one block each. Parameter gradients (base,
 * scale) are summed per token first, then over tokens in order: no float atomics. */
#include "cuda_internal.cuh"

#include <math.h>
#include "../shared_math.h"

__device__ __forceinline__ float hc_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* f[N, mix] = unweighted_rmsnorm(h) @ fn^T, the normed rows kept in FL. */
static int hc_logits(const kctx *k, float *f, float *FL, const float *h, const float *fn, int N, int mix, hc_dims dm,
                     mill_err *e) {
    int nd = dm.n * dm.D;
    TRY(cu_rmsnorm_rows(k, FL, h, NULL, N, nd, 0, dm.norm_eps, e));
    return cu_gemm(k, GEMM_NT, N, mix, nd, FL, nd, fn, nd, f, mix, 0.0f, 0, e);
}

/* x[t, c] = sum_j pre[t, j] h[t, j, c] (j in order, from zero, as on the CPU). */
__global__ void hc_collapse_kernel(float *x, const float *h, const float *pre, int N, int n, int D) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)N * D) return;
    long t = id / D;
    int c = (int)(id % D);
    float acc = 0.f;
    for (int j = 0; j < n; j++) acc += pre[t * n + j] * h[(t * n + j) * D + c];
    x[id] = acc;
}

static int hc_collapse(const kctx *k, float *x, const float *h, const float *pre, int N, int n, int D, mill_err *e) {
    hc_collapse_kernel<<<cu_blocks((long)N * D, 256), 256, 0, cu_stream(k)>>>(x, h, pre, N, n, D);
    LAUNCH_CHECK("hc_collapse_kernel");
    return 0;
}

/* pre, post and the Sinkhorn-projected comb of one token per thread. */
__global__ void hc_mix_kernel(float *pre, float *post, float *comb, const float *f, const float *base,
                              const float *scale, int N, hc_dims dm) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    int n = dm.n, mix = (2 + n) * n;
    const float *ft = f + (long)t * mix;
    float *pr = pre + (long)t * n, *po = post + (long)t * n, *C = comb + (long)t * n * n;
    for (int j = 0; j < n; j++) {
        pr[j] = hc_sigmoid(ft[j] * scale[0] + base[j]) + dm.hc_eps;
        po[j] = 2.0f * hc_sigmoid(ft[n + j] * scale[1] + base[n + j]);
    }
    for (int r = 0; r < n; r++) {
        float *row = C + r * n, mx = -INFINITY, den = 0.f;
        for (int c = 0; c < n; c++) {
            row[c] = ft[2 * n + r * n + c] * scale[2] + base[2 * n + r * n + c];
            mx = fmaxf(mx, row[c]);
        }
        for (int c = 0; c < n; c++) {
            row[c] = expf(row[c] - mx);
            den += row[c];
        }
        for (int c = 0; c < n; c++) row[c] = row[c] / den + dm.hc_eps;
    }
    sinkhorn_inplace(C, n, dm.sinkhorn_iters, dm.hc_eps);
}

int cuda_op_hc_pre(const kctx *k, float *x, float *pre, float *post, float *comb, const float *h, const float *fn,
                   const float *base, const float *scale, int N, hc_dims dm, float *work, mill_err *e) {
    if (N <= 0) return 0;
    int n = dm.n, mix = (2 + n) * n;
    float *f = work + (long)N * n * dm.D;
    TRY(hc_logits(k, f, work, h, fn, N, mix, dm, e));
    hc_mix_kernel<<<cu_blocks(N, 128), 128, 0, cu_stream(k)>>>(pre, post, comb, f, base, scale, N, dm);
    LAUNCH_CHECK("hc_mix_kernel");
    return hc_collapse(k, x, h, pre, N, n, dm.D, e);
}

/* h_out[t, kk, c] = post_kk y[t, c] + sum_j comb[j, kk] h[t, j, c] */
__global__ void hc_post_kernel(float *h_out, const float *h, const float *y, const float *post, const float *comb,
                               int N, int n, int D) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)N * n * D) return;
    int c = (int)(id % D), kk = (int)((id / D) % n);
    long t = id / ((long)n * D);
    const float *C = comb + t * n * n;
    float o = post[t * n + kk] * y[t * D + c];
    for (int j = 0; j < n; j++) o += C[j * n + kk] * h[(t * n + j) * D + c];
    h_out[id] = o;
}

int cuda_op_hc_post(const kctx *k, float *h_out, const float *h, const float *y, const float *post,
                    const float *comb, int N, int n, int D, mill_err *e) {
    long tot = (long)N * n * D;
    if (tot <= 0) return 0;
    hc_post_kernel<<<cu_blocks(tot, 256), 256, 0, cu_stream(k)>>>(h_out, h, y, post, comb, N, n, D);
    LAUNCH_CHECK("hc_post_kernel");
    return 0;
}

/* pre[t, j] = sigmoid(f[t * ldf + j] * scale0 + base[j]) + eps */
__global__ void hc_pre_weights_kernel(float *pre, const float *f, int ldf, const float *base, const float *scale,
                                      int N, int n, float eps) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)N * n) return;
    long t = id / n;
    int j = (int)(id % n);
    pre[id] = hc_sigmoid(f[t * ldf + j] * scale[0] + base[j]) + eps;
}

int cuda_op_hc_head(const kctx *k, float *x, const float *h, const float *fn, const float *base, const float *scale,
                    int N, hc_dims dm, float *work, mill_err *e) {
    if (N <= 0) return 0;
    int n = dm.n;
    float *f = work + (long)N * n * dm.D;
    TRY(hc_logits(k, f, work, h, fn, N, n, dm, e));
    /* in place: element (t, j) reads only itself */
    hc_pre_weights_kernel<<<cu_blocks((long)N * n, 256), 256, 0, cu_stream(k)>>>(f, f, n, base, scale, N, n,
                                                                                 dm.hc_eps);
    LAUNCH_CHECK("hc_pre_weights_kernel");
    return hc_collapse(k, x, h, f, N, n, dm.D, e);
}

/* dy[t, c] += sum_kk post_kk g_kk[c]; dh_j[c] += sum_kk comb[j, kk] g_kk[c] (kk outer, as the CPU). */
__global__ void hc_post_bwd_elem_kernel(float *dh, float *dy, const float *dh_out, const float *post,
                                        const float *comb, int N, int n, int D) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)N * D) return;
    long t = id / D;
    int c = (int)(id % D);
    const float *C = comb + t * n * n;
    float dyv = dy[id];
    for (int kk = 0; kk < n; kk++) {
        float g = dh_out[(t * n + kk) * D + c];
        dyv += post[t * n + kk] * g;
        for (int j = 0; j < n; j++) dh[(t * n + j) * D + c] += C[j * n + kk] * g;
    }
    dy[id] = dyv;
}

/* Grid (N, n + n*n): output o < n is dpost[t, o] = g_o . y_t; else dcomb[t, j, kk] = g_kk . h_j. */
__global__ void hc_post_bwd_dot_kernel(float *dpost, float *dcomb, const float *dh_out, const float *h,
                                       const float *y, int n, int D) {
    __shared__ float sh[32];
    long t = blockIdx.x;
    int o = blockIdx.y;
    const float *a, *b;
    if (o < n) {
        a = dh_out + (t * n + o) * D;
        b = y + t * D;
    } else {
        int j = (o - n) / n, kk = (o - n) % n;
        a = dh_out + (t * n + kk) * D;
        b = h + (t * n + j) * D;
    }
    float s = 0.f;
    for (int c = threadIdx.x; c < D; c += blockDim.x) s += a[c] * b[c];
    s = cu_block_sum(s, sh);
    if (threadIdx.x == 0) {
        if (o < n)
            dpost[t * n + o] = s;
        else
            dcomb[t * n * n + (o - n)] = s;
    }
}

int cuda_op_hc_post_backward(const kctx *k, float *dh, float *dy, float *dpost, float *dcomb, const float *dh_out,
                             const float *h, const float *y, const float *post, const float *comb, int N, int n,
                             int D, mill_err *e) {
    if (N <= 0 || n <= 0 || D <= 0) return 0;
    hc_post_bwd_elem_kernel<<<cu_blocks((long)N * D, 256), 256, 0, cu_stream(k)>>>(dh, dy, dh_out, post, comb, N, n,
                                                                                   D);
    LAUNCH_CHECK("hc_post_bwd_elem_kernel");
    hc_post_bwd_dot_kernel<<<dim3(N, n + n * n), 256, 0, cu_stream(k)>>>(dpost, dcomb, dh_out, h, y, n, D);
    LAUNCH_CHECK("hc_post_bwd_dot_kernel");
    return 0;
}

/* d(collapse): dpre[t, j] = dx_t . h_j (grid (N, n)), and dh_j += pre_j dx (elementwise). */
__global__ void hc_collapse_bwd_dot_kernel(float *dpre, const float *dx, const float *h, int n, int D) {
    __shared__ float sh[32];
    long t = blockIdx.x;
    int j = blockIdx.y;
    const float *a = dx + t * D, *b = h + (t * n + j) * D;
    float s = 0.f;
    for (int c = threadIdx.x; c < D; c += blockDim.x) s += a[c] * b[c];
    s = cu_block_sum(s, sh);
    if (threadIdx.x == 0) dpre[t * n + j] = s;
}

__global__ void hc_collapse_bwd_elem_kernel(float *dh, const float *dx, const float *pre, int N, int n, int D) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)N * n * D) return;
    int c = (int)(id % D);
    long tj = id / D, t = tj / n;
    dh[id] += pre[tj] * dx[t * D + c];
}

static int hc_collapse_backward(const kctx *k, float *dpre, float *dh, const float *dx, const float *h,
                                const float *pre, int N, int n, int D, mill_err *e) {
    hc_collapse_bwd_dot_kernel<<<dim3(N, n), 256, 0, cu_stream(k)>>>(dpre, dx, h, n, D);
    LAUNCH_CHECK("hc_collapse_bwd_dot_kernel");
    hc_collapse_bwd_elem_kernel<<<cu_blocks((long)N * n * D, 256), 256, 0, cu_stream(k)>>>(dh, dx, pre, N, n, D);
    LAUNCH_CHECK("hc_collapse_bwd_elem_kernel");
    return 0;
}

/* One token per thread: recompute the softmax and the Sinkhorn chain, walk it back from dcomb, then
 * the pre/post sigmoids. Writes dF[t] and this token's share of dbase (part[t, :mix]) and dscale
 * (part[t, mix:mix+3]). scr: per token (steps + 3) n*n floats (the chain, P, G). */
__global__ void hc_pre_bwd_token_kernel(float *dF, float *part, float *scr, const float *F, const float *pre,
                                        const float *dpre,
                                        const float *dpost, const float *dcomb, const float *base,
                                        const float *scale, int N, hc_dims dm) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    int n = dm.n, mix = (2 + n) * n, nn = n * n, steps = 2 * dm.sinkhorn_iters - 1;
    float *chain = scr + (long)t * (steps + 3) * nn, *P = chain + (long)(steps + 1) * nn, *G = P + nn;
    const float *ft = F + (long)t * mix;
    float *dft = dF + (long)t * mix, *pt = part + (long)t * (mix + 3);
    for (int r = 0; r < n; r++) {
        float mx = -INFINITY, den = 0.f;
        for (int c = 0; c < n; c++) {
            P[r * n + c] = ft[2 * n + r * n + c] * scale[2] + base[2 * n + r * n + c];
            mx = fmaxf(mx, P[r * n + c]);
        }
        for (int c = 0; c < n; c++) den += (P[r * n + c] = expf(P[r * n + c] - mx));
        for (int c = 0; c < n; c++) {
            P[r * n + c] /= den;
            chain[r * n + c] = P[r * n + c] + dm.hc_eps;
        }
    }
    sinkhorn_chain(chain, n, steps, dm.hc_eps);
    for (int i = 0; i < nn; i++) G[i] = dcomb[(long)t * nn + i];
    sinkhorn_chain_backward(chain, G, n, steps, dm.hc_eps);
    float ds0 = 0.f, ds1 = 0.f, ds2 = 0.f;
    for (int r = 0; r < n; r++) { /* softmax rows */
        float dot = 0.f;
        for (int c = 0; c < n; c++) dot += P[r * n + c] * G[r * n + c];
        for (int c = 0; c < n; c++) {
            int ix = 2 * n + r * n + c;
            float dl = P[r * n + c] * (G[r * n + c] - dot);
            dft[ix] = dl * scale[2];
            ds2 += dl * ft[ix];
            pt[ix] = dl;
        }
    }
    for (int j = 0; j < n; j++) {
        float sg = pre[(long)t * n + j] - dm.hc_eps, dl = dpre[(long)t * n + j] * sg * (1.0f - sg);
        dft[j] = dl * scale[0];
        ds0 += dl * ft[j];
        pt[j] = dl;
        float sp = hc_sigmoid(ft[n + j] * scale[1] + base[n + j]);
        float dlp = dpost[(long)t * n + j] * 2.0f * sp * (1.0f - sp);
        dft[n + j] = dlp * scale[1];
        ds1 += dlp * ft[n + j];
        pt[n + j] = dlp;
    }
    pt[mix] = ds0;
    pt[mix + 1] = ds1;
    pt[mix + 2] = ds2;
}

/* The HC head's version: only pre. part[t, :n] for dbase, part[t, n] for dscale0. */
__global__ void hc_head_bwd_token_kernel(float *dF, float *part, const float *F, const float *pre, const float *dpre,
                                         const float *scale, int N, int n, float eps) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    const float *ft = F + (long)t * n;
    float *pt = part + (long)t * (n + 1), ds0 = 0.f;
    for (int j = 0; j < n; j++) {
        float sg = pre[(long)t * n + j] - eps, dl = dpre[(long)t * n + j] * sg * (1.0f - sg);
        dF[(long)t * n + j] = dl * scale[0];
        ds0 += dl * ft[j];
        pt[j] = dl;
    }
    pt[n] = ds0;
}

/* dbase[i] += sum_t part[t, i] for i < nb; dscale[i - nb] likewise after; tokens in order. */
__global__ void hc_param_reduce_kernel(float *dbase, float *dscale, const float *part, int N, int nb, int ns) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nb + ns) return;
    float *dst = i < nb ? dbase + i : dscale + (i - nb);
    float acc = *dst;
    for (int t = 0; t < N; t++) acc += part[(long)t * (nb + ns) + i];
    *dst = acc;
}

/* dFL = dF @ fn; dfn += dF^T FL; dh += rmsnorm backward of dFL (all fp32). */
static int hc_logits_backward(const kctx *k, float *dh, float *dfn, const float *dF, const float *FL, const float *h,
                              const float *fn, int N, int mix, hc_dims dm, float *dFL, mill_err *e) {
    int nd = dm.n * dm.D;
    TRY(cu_gemm(k, GEMM_NN, N, nd, mix, dF, mix, fn, nd, dFL, nd, 0.0f, 0, e));
    TRY(cu_gemm(k, GEMM_TN, mix, nd, N, dF, mix, FL, nd, dfn, nd, 1.0f, 0, e));
    return cuda_op_rmsnorm_backward(k, dh, NULL, dFL, h, NULL, N, nd, 0, dm.norm_eps, e);
}

int cuda_op_hc_pre_backward(const kctx *k, float *dh, float *dfn, float *dbase, float *dscale, const float *dx,
                            const float *dpost, const float *dcomb, const float *h, const float *fn,
                            const float *base, const float *scale, int N, hc_dims dm, float *work, mill_err *e) {
    if (N <= 0) return 0;
    int n = dm.n, D = dm.D, mix = (2 + n) * n, nn = n * n, steps = 2 * dm.sinkhorn_iters - 1;
    float *FL = work, *dFL = FL + (long)N * n * D, *F = dFL + (long)N * n * D, *dF = F + (long)N * mix;
    /* own scratch: pre, dpre [N, n]; part [N, mix + 3]; the per-token Sinkhorn chains */
    float *s = NULL;
    long per_tok = 2L * n + (mix + 3) + (long)(steps + 3) * nn;
    TRY(cu_scratch((void **)&s, sizeof(float) * (size_t)(N * per_tok), k, e));
    float *pre = s, *dpre = pre + (long)N * n, *part = dpre + (long)N * n, *chains = part + (long)N * (mix + 3);
    int rc = hc_logits(k, F, FL, h, fn, N, mix, dm, e);
    if (!rc) {
        hc_pre_weights_kernel<<<cu_blocks((long)N * n, 256), 256, 0, cu_stream(k)>>>(pre, F, mix, base, scale, N, n,
                                                                                     dm.hc_eps);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "hc_pre_weights_kernel: launch failed: %s", cudaGetErrorString(le));
    }
    if (!rc) rc = hc_collapse_backward(k, dpre, dh, dx, h, pre, N, n, D, e);
    if (!rc) {
        hc_pre_bwd_token_kernel<<<cu_blocks(N, 64), 64, 0, cu_stream(k)>>>(dF, part, chains, F, pre, dpre, dpost, dcomb,
                                                                           base, scale, N, dm);
        hc_param_reduce_kernel<<<cu_blocks(mix + 3, 64), 64, 0, cu_stream(k)>>>(dbase, dscale, part, N, mix, 3);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "hc_pre backward: launch failed: %s", cudaGetErrorString(le));
    }
    if (!rc) rc = hc_logits_backward(k, dh, dfn, dF, FL, h, fn, N, mix, dm, dFL, e);
    cu_scratch_free(s, k);
    return rc;
}

int cuda_op_hc_head_backward(const kctx *k, float *dh, float *dfn, float *dbase, float *dscale, const float *dx,
                             const float *h, const float *fn, const float *base, const float *scale, int N,
                             hc_dims dm, float *work, mill_err *e) {
    if (N <= 0) return 0;
    int n = dm.n, D = dm.D;
    float *FL = work, *dFL = FL + (long)N * n * D, *F = dFL + (long)N * n * D, *dF = F + (long)N * n;
    float *s = NULL;
    TRY(cu_scratch((void **)&s, sizeof(float) * (size_t)N * (3 * n + 1), k, e));
    float *pre = s, *dpre = pre + (long)N * n, *part = dpre + (long)N * n;
    int rc = hc_logits(k, F, FL, h, fn, N, n, dm, e);
    if (!rc) {
        hc_pre_weights_kernel<<<cu_blocks((long)N * n, 256), 256, 0, cu_stream(k)>>>(pre, F, n, base, scale, N, n,
                                                                                     dm.hc_eps);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "hc_pre_weights_kernel: launch failed: %s", cudaGetErrorString(le));
    }
    if (!rc) rc = hc_collapse_backward(k, dpre, dh, dx, h, pre, N, n, D, e);
    if (!rc) {
        hc_head_bwd_token_kernel<<<cu_blocks(N, 64), 64, 0, cu_stream(k)>>>(dF, part, F, pre, dpre, scale, N, n, dm.hc_eps);
        hc_param_reduce_kernel<<<cu_blocks(n + 1, 64), 64, 0, cu_stream(k)>>>(dbase, dscale, part, N, n, 1);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "hc_head backward: launch failed: %s", cudaGetErrorString(le));
    }
    if (!rc) rc = hc_logits_backward(k, dh, dfn, dF, FL, h, fn, N, n, dm, dFL, e);
    cu_scratch_free(s, k);
    return rc;
}
