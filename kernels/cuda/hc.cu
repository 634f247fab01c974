/* kernels/cuda/hc.cu — CUDA paths of kernels/hc.h (manifold-constrained hyper-connections).
 * All fp32 like the CPU path: the logits' product f = rms(flatten(h)) @ fn^T is a full-fp32 cuBLAS
 * GEMM (it is small, (2+n)*n outputs, and feeds Sinkhorn); the per-token mixing math (sigmoids,
 * softmax, Sinkhorn and its backward) is one thread per token, since n is 4; collapse / placement
 * are one thread per element; dot products over D are one block each. Parameter gradients (base,
 * scale) are summed per token first, then over chunks of tokens and the chunks in order
 * (cu_colsum_add): no float atomics. The two products with a long reduction (the logits, dfn) are
 * split along it (hc_gemm_split); the Sinkhorn matrices live in shared memory (hc_token_smem). */
#include "cuda_internal.cuh"

#include <math.h>
#include "../shared_math.h"

__device__ __forceinline__ float hc_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* ---- The fp32 products with a small output and a long reduction (the logits f = FL fn^T: K = n*D;
 * dfn += dF^T FL: K = tokens) get few output tiles, so one GEMM leaves most of the GPU idle. They
 * are split along K into S slices, one strided-batched fp32 GEMM computes the S partial products,
 * and a kernel adds them in slice order (deterministic; no TF32, no bf16). */
#define HC_SPLIT_MIN_K 256

static int hc_splits(int K) {
    for (int s = 16; s > 1; s >>= 1)
        if (K % s == 0 && K / s >= HC_SPLIT_MIN_K) return s;
    return 1;
}

/* C[i] = beta C[i] + sum_s part[s, i], slices in order */
__global__ void hc_split_sum_kernel(float *C, const float *part, long n, int S, float beta) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float acc = 0.f;
    for (int s = 0; s < S; s++) acc += part[(long)s * n + i];
    C[i] = beta != 0.f ? C[i] + acc : acc;
}

/* Row-major C[M, Nc] (compact) = shape(A, B) (+ C when beta = 1) in full fp32, split along K when that
 * pays. sa / sb: how far A / B move per K slice of length one (GEMM_NT: 1 and 1, GEMM_TN: lda and ldb). */
static int hc_gemm_split(const kctx *k, cu_gemm_shape shape, int M, int Nc, int K, const float *A, int lda,
                         long sa, const float *B, int ldb, long sb, float *C, float beta, mill_err *e) {
    int S = hc_splits(K);
    if (S == 1 || (long)M * Nc > (1L << 22)) return cu_gemm(k, shape, M, Nc, K, A, lda, B, ldb, C, Nc, beta, 0, e);
    int Ks = K / S;
    long n = (long)M * Nc;
    float *part = NULL;
    TRY(cu_scratch((void **)&part, sizeof(float) * (size_t)(n * S), k, e));
    /* slice s: row-major A + s Ks sa, B + s Ks sb into part + s n; the column-major call swaps A, B */
    cu_colmajor_gemm g = cu_gemm_plan(shape, M, Nc, Ks, A, lda, B, ldb, part, Nc);
    const float alpha = 1.0f, zero = 0.0f;
    int rc = 0;
    cublasStatus_t st = cublasGemmStridedBatchedEx(cu_blas(k), g.ta, g.tb, g.m, g.n, g.k, &alpha, g.A, CUDA_R_32F,
                                                   g.lda, (long long)Ks * sb, g.B, CUDA_R_32F, g.ldb,
                                                   (long long)Ks * sa, &zero, g.C, CUDA_R_32F, g.ldc, (long long)n, S,
                                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
        rc = mill_errf(e, "hc: cublasGemmStridedBatchedEx failed: cuBLAS status %d", (int)st);
    if (!rc) {
        hc_split_sum_kernel<<<cu_blocks(n, 256), 256, 0, cu_stream(k)>>>(C, part, n, S, beta);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "hc_split_sum_kernel: launch failed: %s", cudaGetErrorString(le));
    }
    cu_scratch_free(part, k);
    return rc;
}

/* f[N, mix] = unweighted_rmsnorm(h) @ fn^T, the normed rows kept in FL. */
static int hc_logits(const kctx *k, float *f, float *FL, const float *h, const float *fn, int N, int mix, hc_dims dm,
                     mill_err *e) {
    int nd = dm.n * dm.D;
    TRY(cu_rmsnorm_rows(k, FL, h, NULL, N, nd, 0, dm.norm_eps, e));
    return hc_gemm_split(k, GEMM_NT, N, mix, nd, FL, nd, 1, fn, nd, 1, f, 0.0f, e);
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

/* The per-token Sinkhorn kernels run their n x n matrices (and the backward's whole chain) in shared
 * memory, token i of the block at i * stride floats: the dependent loads and stores of the 40
 * normalisation steps then cost shared-memory latency instead of a round trip to L2 each (the chain
 * in global scratch was ~2.7 KB per token, uncoalesced). An odd stride puts the 32 lanes of a warp on
 * 32 different banks. hc_token_smem picks the block size that fits; stride 0: global memory, as
 * before (only for shapes too big for shared memory). */
static int hc_token_smem(int per_token, int want_threads, int *threads, size_t *bytes, mill_err *e) {
    int dev = 0, optin = 0;
    CU_CHECK(cudaGetDevice(&dev));
    CU_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    int stride = per_token | 1;
    for (int t = want_threads; t >= 1; t >>= 1)
        if ((size_t)t * stride * sizeof(float) <= (size_t)optin) {
            *threads = t;
            *bytes = (size_t)t * stride * sizeof(float);
            return stride;
        }
    *threads = want_threads;
    *bytes = 0;
    return 0;
}

/* pre, post and the Sinkhorn-projected comb of one token per thread. */
__global__ void hc_mix_kernel(float *pre, float *post, float *comb, const float *f, const float *base,
                              const float *scale, int N, hc_dims dm, int stride) {
    extern __shared__ float hc_sm[];
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    int n = dm.n, mix = (2 + n) * n;
    const float *ft = f + (long)t * mix;
    float *pr = pre + (long)t * n, *po = post + (long)t * n, *Cg = comb + (long)t * n * n;
    float *C = stride ? hc_sm + (long)threadIdx.x * stride : Cg;
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
    if (stride)
        for (int i = 0; i < n * n; i++) Cg[i] = C[i];
}

int cuda_op_hc_pre(const kctx *k, float *x, float *pre, float *post, float *comb, const float *h, const float *fn,
                   const float *base, const float *scale, int N, hc_dims dm, float *work, mill_err *e) {
    if (N <= 0) return 0;
    int n = dm.n, mix = (2 + n) * n;
    float *f = work + (long)N * n * dm.D;
    TRY(hc_logits(k, f, work, h, fn, N, mix, dm, e));
    int threads;
    size_t smem;
    int stride = hc_token_smem(n * n, 64, &threads, &smem, e);
    if (stride < 0) return -1;
    if (smem > 48 * 1024)
        CU_CHECK(cudaFuncSetAttribute(hc_mix_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    hc_mix_kernel<<<cu_blocks(N, threads), threads, smem, cu_stream(k)>>>(pre, post, comb, f, base, scale, N, dm,
                                                                         stride);
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
                                        const float *dpre, const float *dpost, const float *dcomb, const float *base,
                                        const float *scale, int N, hc_dims dm, int stride) {
    extern __shared__ float hc_sm[];
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    int n = dm.n, mix = (2 + n) * n, nn = n * n, steps = 2 * dm.sinkhorn_iters - 1;
    float *chain = stride ? hc_sm + (long)threadIdx.x * stride : scr + (long)t * (steps + 3) * nn;
    float *P = chain + (long)(steps + 1) * nn, *G = P + nn;
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

/* dFL = dF @ fn; dfn += dF^T FL; dh += rmsnorm backward of dFL (all fp32). */
static int hc_logits_backward(const kctx *k, float *dh, float *dfn, const float *dF, const float *FL, const float *h,
                              const float *fn, int N, int mix, hc_dims dm, float *dFL, mill_err *e) {
    int nd = dm.n * dm.D;
    TRY(cu_gemm(k, GEMM_NN, N, nd, mix, dF, mix, fn, nd, dFL, nd, 0.0f, 0, e));
    TRY(hc_gemm_split(k, GEMM_TN, mix, nd, N, dF, mix, mix, FL, nd, nd, dfn, 1.0f, e));
    return cuda_op_rmsnorm_backward(k, dh, NULL, dFL, h, NULL, N, nd, 0, dm.norm_eps, e);
}

int cuda_op_hc_pre_backward(const kctx *k, float *dh, float *dfn, float *dbase, float *dscale, const float *dx,
                            const float *dpost, const float *dcomb, const float *h, const float *fn,
                            const float *base, const float *scale, int N, hc_dims dm, float *work, mill_err *e) {
    if (N <= 0) return 0;
    int n = dm.n, D = dm.D, mix = (2 + n) * n, nn = n * n, steps = 2 * dm.sinkhorn_iters - 1;
    float *FL = work, *dFL = FL + (long)N * n * D, *F = dFL + (long)N * n * D, *dF = F + (long)N * mix;
    /* own scratch: pre, dpre [N, n]; part [N, mix + 3]; the per-token Sinkhorn chains */
    int threads;
    size_t smem;
    int stride = hc_token_smem((steps + 3) * nn, 32, &threads, &smem, e);
    if (stride < 0) return -1;
    if (smem > 48 * 1024)
        CU_CHECK(cudaFuncSetAttribute(hc_pre_bwd_token_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    float *s = NULL; /* the chains need global scratch only when they do not fit in shared memory */
    long per_tok = 2L * n + (mix + 3) + (stride ? 0 : (long)(steps + 3) * nn);
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
        hc_pre_bwd_token_kernel<<<cu_blocks(N, threads), threads, smem, cu_stream(k)>>>(
            dF, part, chains, F, pre, dpre, dpost, dcomb, base, scale, N, dm, stride);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "hc_pre backward: launch failed: %s", cudaGetErrorString(le));
    }
    /* dbase, dscale += the tokens' shares, summed in chunks of tokens then chunk by chunk */
    if (!rc) rc = cu_colsum_add(k, dbase, mix, dscale, part, N, mix + 3, e);
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
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "hc_head backward: launch failed: %s", cudaGetErrorString(le));
    }
    if (!rc) rc = cu_colsum_add(k, dbase, n, dscale, part, N, n + 1, e);
    if (!rc) rc = hc_logits_backward(k, dh, dfn, dF, FL, h, fn, N, n, dm, dFL, e);
    cu_scratch_free(s, k);
    return rc;
}
