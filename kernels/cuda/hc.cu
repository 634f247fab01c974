/* kernels/cuda/hc.cu — CUDA paths of kernels/hc.h (manifold-constrained hyper-connections).
 * All fp32 like the CPU path. For hc_mult <= CUDA_HC_FUSED_MAX_STREAMS (DSV4's 4):
 *   - op_hc_pre / op_hc_head are one kernel each (hc_pre_fused_kernel / hc_head_fused_kernel): RMS,
 *     the logits f = rms(flatten(h)) @ fn^T, mixing, collapse; a token's bits do not depend on the
 *     batch, and the backwards recompute f with the same sums (hc_logits_fused_kernel);
 *   - the backwards' products with fn (dFL = dF fn, dfn += dF^T FL) and their per-token dots are
 *     kernels of their own (hc_dfl_kernel, hc_dfn_part/_sum_kernel, the *_dots_kernels).
 * Larger hc_mult takes the general path: the logits and dfn as full-fp32 cuBLAS GEMMs split along
 * their long reduction (hc_gemm_split), a dot product over D per block. Either way the per-token
 * Sinkhorn backward is a thread per token with its matrices in shared memory (hc_token_smem), and
 * the parameter gradients (base, scale) are summed per token first, then over chunks of tokens and
 * the chunks in order (cu_colsum_add): no float atomics anywhere. */
#include "cuda_internal.cuh"

#include <math.h>
#include "../shared_math.h"

__device__ __forceinline__ float hc_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* The per-token mixing formulas, written once for the general and the fused kernels. */
__device__ __forceinline__ float hc_pre_weight(float f, float s0, float b, float eps) {
    return hc_sigmoid(f * s0 + b) + eps;
}
__device__ __forceinline__ float hc_post_weight(float f, float s1, float b) { return 2.0f * hc_sigmoid(f * s1 + b); }
/* row[c] = softmax_c(fr[c] * s2 + br[c]) + eps, c < n */
__device__ __forceinline__ void hc_comb_row(float *row, const float *fr, const float *br, float s2, int n, float eps) {
    float mx = -INFINITY, den = 0.f;
    for (int c = 0; c < n; c++) {
        row[c] = fr[c] * s2 + br[c];
        mx = fmaxf(mx, row[c]);
    }
    for (int c = 0; c < n; c++) {
        row[c] = expf(row[c] - mx);
        den += row[c];
    }
    for (int c = 0; c < n; c++) row[c] = row[c] / den + eps;
}

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
    double tp = cu_phase(k);
    TRY(cu_rmsnorm_rows(k, FL, h, NULL, N, nd, 0, dm.norm_eps, e));
    cu_phase_end(k, "hc: normed rows", tp);
    tp = cu_phase(k);
    int rc = hc_gemm_split(k, GEMM_NT, N, mix, nd, FL, nd, 1, fn, nd, 1, f, 0.0f, e);
    cu_phase_end(k, "hc: logits = FL fn^T", tp);
    return rc;
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

/* ---- op_hc_pre / op_hc_head as one kernel (hc_mult up to 4).
 * The general path is five launches (RMSNorm, split GEMM, slice sum, mix, collapse) plus scratch:
 * measured on an H100, ~100 us of device time per op_hc_pre in decode (24 calls per step), and on
 * an H200 1.65 ms per call at 8,192 tokens (training). Here a block of HC_FUSED_THREADS does its tokens:
 *   1. each row's inverse RMS over its n*D floats, the sum of squares in double (as the CPU and
 *      cu_rmsnorm_rows);
 *   2. the logits, scale then dot in fp32 like the GEMM on the normed rows: each thread keeps the
 *      partial sums of every output over its strided slice of the row, then warp sums and the
 *      warps in order (fixed order: deterministic, and a token's bits do not depend on N);
 *   3. the mixing math, a warp per token: lane j owns pre_j, post_j, row j of the softmax and
 *      row / column j of each Sinkhorn step (sinkhorn_norm_row / _col, the very steps
 *      sinkhorn_inplace makes, so the same bits as one thread running them, with a serial chain n
 *      times shorter);
 *   4. the collapse x = sum_j pre_j h_j by all threads.
 * It writes f [N, mix] into work (op_hc_head: pre [N, n], as the CPU's in-place sigmoid) like the
 * general path; it does not write the normed rows (work's first N*n*D floats), which no caller
 * reads: both backwards recompute them. Static shared memory, no attribute to set, no host wait,
 * no scratch: a captured decode step replays it as is.
 * Every block reads all of fn (mix x n*D floats: 384 KB at n = 4, D = 1024), from L2 after the
 * first: up to CUDA_HC_FUSED_ONE_TOKEN_MAX tokens a block takes one token (most blocks in flight for
 * decode's few tokens), past it HC_FUSED_TOK (a quarter of the L2 reads for training's thousands). */
#define HC_FUSED_THREADS 256
#define HC_FUSED_WARPS (HC_FUSED_THREADS / 32)
/* Tokens per block past the decode sizes: every fn value a thread loads serves HC_FUSED_TOK tokens
 * (fn's L2 reads shrink that many times); each token's sums keep the one-token order below. */
#define HC_FUSED_TOK 4

/* Steps 1 and 2 for the rows of tokens t < ntok (<= TOK) at h0 + t*NH*D: s_f[t*MIX + j] =
 * (ht * inv_t) . fn[j]. A token's sums run in the same order whatever TOK and N are (thread tid
 * takes c = tid, tid + 256, ... in order; warp butterflies; warps in order), so its bits do not
 * depend on the batch. s_ss [32], s_part [HC_FUSED_WARPS * TOK * MIX]. FL0 (the backwards): the
 * normed rows are written there too. Ends with a barrier. */
template <int NH, int MIX, int TOK>
__device__ __forceinline__ void hc_fused_logits(float *s_f, double *s_ss, float *s_part, const float *h0, int ntok,
                                                const float *fn, int D, float norm_eps, float *FL0 = NULL) {
    static_assert(TOK * MIX <= HC_FUSED_THREADS && HC_FUSED_THREADS % 32 == 0, "a thread per output; whole warps");
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nd = NH * D;
    float inv[TOK];
#pragma unroll
    for (int t = 0; t < TOK; t++) {
        double ss = 0.0;
        if (t < ntok)
            for (int c = tid; c < nd; c += HC_FUSED_THREADS) ss += (double)h0[(long)t * nd + c] * h0[(long)t * nd + c];
        ss = cu_block_sum(ss, s_ss);
        inv[t] = 1.0f / sqrtf((float)(ss / nd) + norm_eps);
    }
    float acc[TOK][MIX];
#pragma unroll
    for (int t = 0; t < TOK; t++)
#pragma unroll
        for (int j = 0; j < MIX; j++) acc[t][j] = 0.f;
    /* one token (decode): four slices' loads in flight at once (the sums keep their order) */
#pragma unroll(TOK == 1 ? 4 : 1)
    for (int c = tid; c < nd; c += HC_FUSED_THREADS) {
        float w[MIX];
#pragma unroll
        for (int j = 0; j < MIX; j++) w[j] = fn[(long)j * nd + c];
#pragma unroll
        for (int t = 0; t < TOK; t++)
            if (t < ntok) {
                const float v = h0[(long)t * nd + c] * inv[t]; /* the normed element, rounded to fp32 as FL holds it */
                if (FL0) FL0[(long)t * nd + c] = v;
#pragma unroll
                for (int j = 0; j < MIX; j++) acc[t][j] += v * w[j];
            }
    }
#pragma unroll
    for (int t = 0; t < TOK; t++)
#pragma unroll
        for (int j = 0; j < MIX; j++) {
            const float s = cu_warp_sum(acc[t][j]); /* every lane gets the same sum */
            if (lane == 0) s_part[(warp * TOK + t) * MIX + j] = s;
        }
    __syncthreads();
    if (tid < TOK * MIX) {
        float s = 0.f;
        for (int w = 0; w < HC_FUSED_WARPS; w++) s += s_part[w * TOK * MIX + tid];
        s_f[tid] = s;
    }
    __syncthreads();
}

/* Step 4: xt[c] = sum_j s_pre[j] ht[j*D + c], j in order from zero (as hc_collapse_kernel). */
template <int NH>
__device__ __forceinline__ void hc_fused_collapse(float *xt, const float *ht, const float *s_pre, int D) {
    for (int c = threadIdx.x; c < D; c += HC_FUSED_THREADS) {
        float a = 0.f;
#pragma unroll
        for (int j = 0; j < NH; j++) a += s_pre[j] * ht[(long)j * D + c];
        xt[c] = a;
    }
}

/* op_hc_pre for the TOK tokens from blockIdx.x * TOK (fewer in the last block); f: work + N*NH*D,
 * [N, mix]. x must not overlap h. Warp w mixes token w. */
template <int NH, int TOK>
__global__ void __launch_bounds__(HC_FUSED_THREADS)
    hc_pre_fused_kernel(float *x, float *pre, float *post, float *comb, float *f, const float *h, const float *fn,
                        const float *base, const float *scale, int N, hc_dims dm) {
    constexpr int MIX = (2 + NH) * NH, NN = NH * NH;
    static_assert(MIX <= 32 && NN <= 32 && TOK <= HC_FUSED_WARPS, "a warp per token, a lane per logit / comb entry");
    __shared__ double s_ss[32];
    __shared__ float s_part[HC_FUSED_WARPS * TOK * MIX];
    __shared__ float s_f[TOK * MIX];
    __shared__ float s_C[TOK * NN];
    __shared__ float s_pre[TOK * NH];
    const long t0 = (long)blockIdx.x * TOK;
    const int ntok = N - t0 < TOK ? (int)(N - t0) : TOK, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    hc_fused_logits<NH, MIX, TOK>(s_f, s_ss, s_part, h + t0 * NH * dm.D, ntok, fn, dm.D, dm.norm_eps);
    if (w < ntok) { /* a whole warp: every lane reaches each __syncwarp */
        const long t = t0 + w;
        const float *sf = s_f + w * MIX;
        float *C = s_C + w * NN;
        if (lane < MIX) f[t * MIX + lane] = sf[lane];
        if (lane < NH) {
            const float p = hc_pre_weight(sf[lane], scale[0], base[lane], dm.hc_eps);
            s_pre[w * NH + lane] = p;
            pre[t * NH + lane] = p;
            post[t * NH + lane] = hc_post_weight(sf[NH + lane], scale[1], base[NH + lane]);
            hc_comb_row(C + lane * NH, sf + 2 * NH + lane * NH, base + 2 * NH + lane * NH, scale[2], NH, dm.hc_eps);
        }
        __syncwarp();
        for (int it = 0; it < dm.sinkhorn_iters; it++) { /* sinkhorn_inplace's steps, a row / column per lane */
            if (it > 0) {
                if (lane < NH) sinkhorn_norm_row(C, NH, lane, dm.hc_eps);
                __syncwarp();
            }
            if (lane < NH) sinkhorn_norm_col(C, NH, lane, dm.hc_eps);
            __syncwarp();
        }
        if (lane < NN) comb[t * NN + lane] = C[lane];
    }
    __syncthreads(); /* s_pre */
    for (int t = 0; t < ntok; t++)
        hc_fused_collapse<NH>(x + (t0 + t) * dm.D, h + (t0 + t) * NH * dm.D, s_pre + t * NH, dm.D);
}

/* op_hc_head for the TOK tokens from blockIdx.x * TOK; f: work + N*NH*D, [N, NH], gets pre (as on
 * the CPU). */
template <int NH, int TOK>
__global__ void __launch_bounds__(HC_FUSED_THREADS)
    hc_head_fused_kernel(float *x, float *f, const float *h, const float *fn, const float *base, const float *scale,
                         int N, hc_dims dm) {
    __shared__ double s_ss[32];
    __shared__ float s_part[HC_FUSED_WARPS * TOK * NH];
    __shared__ float s_f[TOK * NH];
    __shared__ float s_pre[TOK * NH];
    const long t0 = (long)blockIdx.x * TOK;
    const int ntok = N - t0 < TOK ? (int)(N - t0) : TOK, tid = threadIdx.x;
    hc_fused_logits<NH, NH, TOK>(s_f, s_ss, s_part, h + t0 * NH * dm.D, ntok, fn, dm.D, dm.norm_eps);
    if (tid < ntok * NH) {
        const int j = tid % NH;
        const float p = hc_pre_weight(s_f[tid], scale[0], base[j], dm.hc_eps);
        s_pre[tid] = p;
        f[t0 * NH + tid] = p;
    }
    __syncthreads(); /* s_pre */
    for (int t = 0; t < ntok; t++)
        hc_fused_collapse<NH>(x + (t0 + t) * dm.D, h + (t0 + t) * NH * dm.D, s_pre + t * NH, dm.D);
}

/* The logits alone, f [N, MIX], and the normed rows FL (the backwards' recomputation): the fused
 * kernels' sums, so the same bits as the forward's f. */
template <int NH, int MIX, int TOK>
__global__ void __launch_bounds__(HC_FUSED_THREADS)
    hc_logits_fused_kernel(float *f, float *FL, const float *h, const float *fn, int N, hc_dims dm) {
    __shared__ double s_ss[32];
    __shared__ float s_part[HC_FUSED_WARPS * TOK * MIX];
    __shared__ float s_f[TOK * MIX];
    const long t0 = (long)blockIdx.x * TOK;
    const int ntok = N - t0 < TOK ? (int)(N - t0) : TOK;
    hc_fused_logits<NH, MIX, TOK>(s_f, s_ss, s_part, h + t0 * NH * dm.D, ntok, fn, dm.D, dm.norm_eps,
                                  FL + t0 * NH * dm.D);
    if (threadIdx.x < ntok * MIX) f[t0 * MIX + threadIdx.x] = s_f[threadIdx.x];
}

/* Whether the fused kernels take these N tokens: n with an instance below, and n*D an int like the
 * general path's. */
static int hc_fused_fits(int N, hc_dims dm) {
    return N >= 1 && dm.n >= 1 && dm.n <= CUDA_HC_FUSED_MAX_STREAMS && dm.D >= 1 && (long)dm.n * dm.D <= 2147483647L;
}

template <int NH, int TOK>
static int hc_fused_launch(const kctx *k, int head, float *x, float *pre, float *post, float *comb, float *f,
                           const float *h, const float *fn, const float *base, const float *scale, int N, hc_dims dm,
                           mill_err *e) {
    unsigned grid = (unsigned)((N + TOK - 1) / TOK);
    if (head) {
        hc_head_fused_kernel<NH, TOK><<<grid, HC_FUSED_THREADS, 0, cu_stream(k)>>>(x, f, h, fn, base, scale, N, dm);
        LAUNCH_CHECK("hc_head_fused_kernel");
    } else {
        hc_pre_fused_kernel<NH, TOK><<<grid, HC_FUSED_THREADS, 0, cu_stream(k)>>>(x, pre, post, comb, f, h, fn, base,
                                                                                 scale, N, dm);
        LAUNCH_CHECK("hc_pre_fused_kernel");
    }
    return 0;
}

template <int NH>
static int hc_fused_n(const kctx *k, int head, float *x, float *pre, float *post, float *comb, float *f,
                      const float *h, const float *fn, const float *base, const float *scale, int N, hc_dims dm,
                      mill_err *e) {
    if (N <= CUDA_HC_FUSED_ONE_TOKEN_MAX) /* decode: a block per token, as many blocks as there are */
        return hc_fused_launch<NH, 1>(k, head, x, pre, post, comb, f, h, fn, base, scale, N, dm, e);
    return hc_fused_launch<NH, HC_FUSED_TOK>(k, head, x, pre, post, comb, f, h, fn, base, scale, N, dm, e);
}

/* op_hc_pre (head 0) or op_hc_head (head 1; pre, post, comb unused) when hc_fused_fits. */
static int hc_fused(const kctx *k, int head, float *x, float *pre, float *post, float *comb, float *f, const float *h,
                    const float *fn, const float *base, const float *scale, int N, hc_dims dm, mill_err *e) {
    switch (dm.n) { /* one instance per n: the per-thread accumulators are registers of a known count */
    case 1: return hc_fused_n<1>(k, head, x, pre, post, comb, f, h, fn, base, scale, N, dm, e);
    case 2: return hc_fused_n<2>(k, head, x, pre, post, comb, f, h, fn, base, scale, N, dm, e);
    case 3: return hc_fused_n<3>(k, head, x, pre, post, comb, f, h, fn, base, scale, N, dm, e);
    case 4: return hc_fused_n<4>(k, head, x, pre, post, comb, f, h, fn, base, scale, N, dm, e);
    default: return mill_errf(e, "hc: no fused kernel for hc_mult %d", dm.n);
    }
}

/* The backwards' FL (the normed rows) and f (the logits of the pre's mix, or of the head's n when
 * head): one pass of the fused kernels' sums where they fit, so f has the forward's bits; the split
 * fp32 GEMM otherwise (it took 0.13 to 1.9 ms for the pre and ~30 ms for the head at 8,192 tokens on
 * an H200, varying from run to run). */
template <int NH>
static void hc_logits_fused_launch(const kctx *k, int head, float *f, float *FL, const float *h, const float *fn,
                                   int N, hc_dims dm) {
    unsigned grid = (unsigned)((N + HC_FUSED_TOK - 1) / HC_FUSED_TOK);
    if (head)
        hc_logits_fused_kernel<NH, NH, HC_FUSED_TOK><<<grid, HC_FUSED_THREADS, 0, cu_stream(k)>>>(f, FL, h, fn, N, dm);
    else
        hc_logits_fused_kernel<NH, (2 + NH) * NH, HC_FUSED_TOK>
            <<<grid, HC_FUSED_THREADS, 0, cu_stream(k)>>>(f, FL, h, fn, N, dm);
}

static int hc_logits_bwd(const kctx *k, int head, float *f, float *FL, const float *h, const float *fn, int N,
                         hc_dims dm, mill_err *e) {
    if (!hc_fused_fits(N, dm)) return hc_logits(k, f, FL, h, fn, N, head ? dm.n : (2 + dm.n) * dm.n, dm, e);
    switch (dm.n) {
    case 1: hc_logits_fused_launch<1>(k, head, f, FL, h, fn, N, dm); break;
    case 2: hc_logits_fused_launch<2>(k, head, f, FL, h, fn, N, dm); break;
    case 3: hc_logits_fused_launch<3>(k, head, f, FL, h, fn, N, dm); break;
    default: hc_logits_fused_launch<4>(k, head, f, FL, h, fn, N, dm);
    }
    LAUNCH_CHECK("hc_logits_fused_kernel");
    return 0;
}

/* The per-token Sinkhorn kernels run their n x n matrices (and the backward's whole chain) in shared
 * memory, token i of the block at i * stride floats: the dependent loads and stores of the 40
 * normalisation steps then cost shared-memory latency instead of a round trip to L2 each (the chain
 * in global scratch was ~2.7 KB per token, uncoalesced). An odd stride puts the 32 lanes of a warp on
 * 32 different banks. hc_token_smem picks the block size that fits; stride 0: global memory, as
 * before (only for shapes too big for shared memory). A block stays within the 48 KB any kernel may
 * use without cudaFuncSetAttribute, which was set on every call before (host work in every call,
 * and inside a capture); the opt-in size bought no more tokens per SM (backward, n = 4, 20
 * iterations: 2 blocks of 32 tokens at 86 KB then, 5 of 16 at 43 KB now, by the 228 KB per SM). */
#define HC_TOKEN_SMEM_MAX (48 * 1024)

static int hc_token_smem(int per_token, int want_threads, int *threads, size_t *bytes) {
    int stride = per_token | 1;
    for (int t = want_threads; t >= 1; t >>= 1)
        if ((size_t)t * stride * sizeof(float) <= (size_t)HC_TOKEN_SMEM_MAX) {
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
        pr[j] = hc_pre_weight(ft[j], scale[0], base[j], dm.hc_eps);
        po[j] = hc_post_weight(ft[n + j], scale[1], base[n + j]);
    }
    for (int r = 0; r < n; r++) hc_comb_row(C + r * n, ft + 2 * n + r * n, base + 2 * n + r * n, scale[2], n, dm.hc_eps);
    sinkhorn_inplace(C, n, dm.sinkhorn_iters, dm.hc_eps);
    if (stride)
        for (int i = 0; i < n * n; i++) Cg[i] = C[i];
}

int cuda_op_hc_pre(const kctx *k, float *x, float *pre, float *post, float *comb, const float *h, const float *fn,
                   const float *base, const float *scale, int N, hc_dims dm, float *work, mill_err *e) {
    if (N <= 0) return 0;
    int n = dm.n, mix = (2 + n) * n;
    float *f = work + (long)N * n * dm.D;
    if (hc_fused_fits(N, dm)) return hc_fused(k, 0, x, pre, post, comb, f, h, fn, base, scale, N, dm, e);
    TRY(hc_logits(k, f, work, h, fn, N, mix, dm, e));
    int threads;
    size_t smem;
    int stride = hc_token_smem(n * n, 64, &threads, &smem);
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
    pre[id] = hc_pre_weight(f[t * ldf + j], scale[0], base[j], eps);
}

int cuda_op_hc_head(const kctx *k, float *x, const float *h, const float *fn, const float *base, const float *scale,
                    int N, hc_dims dm, float *work, mill_err *e) {
    if (N <= 0) return 0;
    int n = dm.n;
    float *f = work + (long)N * n * dm.D;
    if (hc_fused_fits(N, dm)) return hc_fused(k, 1, x, NULL, NULL, NULL, f, h, fn, base, scale, N, dm, e);
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

/* The same for hc_mult NH <= 4 with dh's rows in registers: one load and one store each instead of a
 * read-modify-write per (kk, j); the additions are the same, in the same order. */
template <int NH>
__global__ void hc_post_bwd_elem_n_kernel(float *dh, float *dy, const float *dh_out, const float *post,
                                          const float *comb, int N, int D) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)N * D) return;
    long t = id / D;
    int c = (int)(id % D);
    const float *C = comb + t * NH * NH;
    float dyv = dy[id], d[NH];
#pragma unroll
    for (int j = 0; j < NH; j++) d[j] = dh[(t * NH + j) * D + c];
#pragma unroll
    for (int kk = 0; kk < NH; kk++) {
        float g = dh_out[(t * NH + kk) * D + c];
        dyv += post[t * NH + kk] * g;
#pragma unroll
        for (int j = 0; j < NH; j++) d[j] += C[j * NH + kk] * g;
    }
#pragma unroll
    for (int j = 0; j < NH; j++) dh[(t * NH + j) * D + c] = d[j];
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

/* The same dots for hc_mult NH <= 4, a block per token for all n + n*n of them: each input row is read
 * once instead of once per dot (n + 1 times). Each dot keeps cu_block_sum's order (a thread's
 * strided slice, warp butterfly, warps in order), so the bits equal hc_post_bwd_dot_kernel's. */
#define HC_DOTS_THREADS 256
template <int NO>
__device__ __forceinline__ void hc_dots_store(float *out0, int n0, float *out1, const float *acc) {
    __shared__ float sh[(HC_DOTS_THREADS / 32) * NO];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
    for (int o = 0; o < NO; o++) {
        float v = acc[o];
        for (int x = 16; x > 0; x >>= 1) v += __shfl_xor_sync(0xffffffffu, v, x);
        if (lane == 0) sh[w * NO + o] = v;
    }
    __syncthreads();
    if (threadIdx.x < NO) {
        float r = 0;
        for (int i = 0; i < HC_DOTS_THREADS / 32; i++) r += sh[i * NO + threadIdx.x];
        if (threadIdx.x < n0) out0[threadIdx.x] = r;
        else out1[threadIdx.x - n0] = r;
    }
}

template <int NH>
__global__ void __launch_bounds__(HC_DOTS_THREADS)
    hc_post_bwd_dots_kernel(float *dpost, float *dcomb, const float *dh_out, const float *h, const float *y, int D) {
    constexpr int NO = NH + NH * NH;
    const long t = blockIdx.x;
    const float *g = dh_out + t * NH * D, *ht = h + t * NH * D, *yt = y + t * D;
    float acc[NO];
#pragma unroll
    for (int o = 0; o < NO; o++) acc[o] = 0.f;
    for (int c = threadIdx.x; c < D; c += HC_DOTS_THREADS) {
        float gv[NH];
#pragma unroll
        for (int kk = 0; kk < NH; kk++) gv[kk] = g[(long)kk * D + c];
        const float yv = yt[c];
#pragma unroll
        for (int kk = 0; kk < NH; kk++) acc[kk] += gv[kk] * yv;
#pragma unroll
        for (int j = 0; j < NH; j++) {
            const float hv = ht[(long)j * D + c];
#pragma unroll
            for (int kk = 0; kk < NH; kk++) acc[NH + j * NH + kk] += gv[kk] * hv;
        }
    }
    hc_dots_store<NO>(dpost + t * NH, NH, dcomb + t * NH * NH, acc);
}

/* d(collapse)'s dots likewise: dpre[t, j] = dx_t . h_j for all j in one block per token. */
template <int NH>
__global__ void __launch_bounds__(HC_DOTS_THREADS)
    hc_collapse_bwd_dots_kernel(float *dpre, const float *dx, const float *h, int D) {
    const long t = blockIdx.x;
    const float *a = dx + t * D, *ht = h + t * NH * D;
    float acc[NH];
#pragma unroll
    for (int j = 0; j < NH; j++) acc[j] = 0.f;
    for (int c = threadIdx.x; c < D; c += HC_DOTS_THREADS) {
        const float av = a[c];
#pragma unroll
        for (int j = 0; j < NH; j++) acc[j] += av * ht[(long)j * D + c];
    }
    hc_dots_store<NH>(dpre + t * NH, NH, NULL, acc);
}

int cuda_op_hc_post_backward(const kctx *k, float *dh, float *dy, float *dpost, float *dcomb, const float *dh_out,
                             const float *h, const float *y, const float *post, const float *comb, int N, int n,
                             int D, mill_err *e) {
    if (N <= 0 || n <= 0 || D <= 0) return 0;
    unsigned eb = cu_blocks((long)N * D, 256);
    switch (n) {
    case 1: hc_post_bwd_elem_n_kernel<1><<<eb, 256, 0, cu_stream(k)>>>(dh, dy, dh_out, post, comb, N, D); break;
    case 2: hc_post_bwd_elem_n_kernel<2><<<eb, 256, 0, cu_stream(k)>>>(dh, dy, dh_out, post, comb, N, D); break;
    case 3: hc_post_bwd_elem_n_kernel<3><<<eb, 256, 0, cu_stream(k)>>>(dh, dy, dh_out, post, comb, N, D); break;
    case 4: hc_post_bwd_elem_n_kernel<4><<<eb, 256, 0, cu_stream(k)>>>(dh, dy, dh_out, post, comb, N, D); break;
    default: hc_post_bwd_elem_kernel<<<eb, 256, 0, cu_stream(k)>>>(dh, dy, dh_out, post, comb, N, n, D);
    }
    LAUNCH_CHECK("hc_post_bwd_elem(_n)_kernel");
    switch (n) {
    case 1: hc_post_bwd_dots_kernel<1><<<N, HC_DOTS_THREADS, 0, cu_stream(k)>>>(dpost, dcomb, dh_out, h, y, D); break;
    case 2: hc_post_bwd_dots_kernel<2><<<N, HC_DOTS_THREADS, 0, cu_stream(k)>>>(dpost, dcomb, dh_out, h, y, D); break;
    case 3: hc_post_bwd_dots_kernel<3><<<N, HC_DOTS_THREADS, 0, cu_stream(k)>>>(dpost, dcomb, dh_out, h, y, D); break;
    case 4: hc_post_bwd_dots_kernel<4><<<N, HC_DOTS_THREADS, 0, cu_stream(k)>>>(dpost, dcomb, dh_out, h, y, D); break;
    default: hc_post_bwd_dot_kernel<<<dim3(N, n + n * n), 256, 0, cu_stream(k)>>>(dpost, dcomb, dh_out, h, y, n, D);
    }
    LAUNCH_CHECK("hc_post_bwd_dot(s)_kernel");
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
    switch (n) {
    case 1: hc_collapse_bwd_dots_kernel<1><<<N, HC_DOTS_THREADS, 0, cu_stream(k)>>>(dpre, dx, h, D); break;
    case 2: hc_collapse_bwd_dots_kernel<2><<<N, HC_DOTS_THREADS, 0, cu_stream(k)>>>(dpre, dx, h, D); break;
    case 3: hc_collapse_bwd_dots_kernel<3><<<N, HC_DOTS_THREADS, 0, cu_stream(k)>>>(dpre, dx, h, D); break;
    case 4: hc_collapse_bwd_dots_kernel<4><<<N, HC_DOTS_THREADS, 0, cu_stream(k)>>>(dpre, dx, h, D); break;
    default: hc_collapse_bwd_dot_kernel<<<dim3(N, n), 256, 0, cu_stream(k)>>>(dpre, dx, h, n, D);
    }
    LAUNCH_CHECK("hc_collapse_bwd_dot(s)_kernel");
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

/* The logits backward's two products with mix (<= HC_MIX_MAX) outputs per token, as kernels of their
 * own: the fp32 GEMMs took ~30-40 ms each at mix = 4 (the head) and 8,192 tokens on an H200.
 * dFL[t, c] = sum_j dF[t, j] fn[j, c], j in order: a thread per column c keeps fn's column in
 * registers for HC_ROWS tokens. */
#define HC_MIX_MAX 24
#define HC_ROWS 16
__global__ void hc_dfl_kernel(float *dFL, const float *dF, const float *fn, int N, int mix, int nd) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    long t0 = (long)blockIdx.y * HC_ROWS;
    if (c >= nd) return;
    float w[HC_MIX_MAX];
#pragma unroll
    for (int j = 0; j < HC_MIX_MAX; j++) w[j] = j < mix ? fn[(long)j * nd + c] : 0.f;
    for (long t = t0; t < t0 + HC_ROWS && t < N; t++) {
        float a = 0.f;
#pragma unroll
        for (int j = 0; j < HC_MIX_MAX; j++)
            if (j < mix) a += dF[t * mix + j] * w[j];
        dFL[t * nd + c] = a;
    }
}

/* dfn[j, c] += sum_t dF[t, j] FL[t, c]: chunk z of HC_DFN_CHUNK tokens, in token order, into
 * part[z, j, c]; then the chunks in order (hc_dfn_sum_kernel). No atomics: the same bits every run. */
#define HC_DFN_CHUNK 128
__global__ void hc_dfn_part_kernel(float *part, const float *dF, const float *FL, int N, int mix, int nd) {
    __shared__ float sdf[HC_DFN_CHUNK * HC_MIX_MAX];
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    long t0 = (long)blockIdx.y * HC_DFN_CHUNK;
    int nt = N - t0 < HC_DFN_CHUNK ? (int)(N - t0) : HC_DFN_CHUNK;
    for (int i = threadIdx.x; i < nt * mix; i += blockDim.x) sdf[i] = dF[t0 * mix + i];
    __syncthreads();
    if (c >= nd) return;
    float acc[HC_MIX_MAX];
#pragma unroll
    for (int j = 0; j < HC_MIX_MAX; j++) acc[j] = 0.f;
    for (int t = 0; t < nt; t++) {
        const float f = FL[(t0 + t) * nd + c];
#pragma unroll
        for (int j = 0; j < HC_MIX_MAX; j++)
            if (j < mix) acc[j] += sdf[t * mix + j] * f;
    }
    float *pz = part + (long)blockIdx.y * mix * nd;
#pragma unroll
    for (int j = 0; j < HC_MIX_MAX; j++)
        if (j < mix) pz[(long)j * nd + c] = acc[j];
}

__global__ void hc_dfn_sum_kernel(float *dfn, const float *part, int chunks, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.f;
    for (int z = 0; z < chunks; z++) s += part[z * n + i];
    dfn[i] += s;
}

static int hc_dfn_add(const kctx *k, float *dfn, const float *dF, const float *FL, int N, int mix, int nd, mill_err *e) {
    int chunks = (N + HC_DFN_CHUNK - 1) / HC_DFN_CHUNK;
    long n = (long)mix * nd;
    float *part = NULL;
    TRY(cu_scratch((void **)&part, sizeof(float) * (size_t)(chunks * n), k, e));
    hc_dfn_part_kernel<<<dim3(cu_blocks(nd, 256), chunks), 256, 0, cu_stream(k)>>>(part, dF, FL, N, mix, nd);
    cudaError_t le = cudaGetLastError();
    if (le == cudaSuccess) {
        hc_dfn_sum_kernel<<<cu_blocks(n, 256), 256, 0, cu_stream(k)>>>(dfn, part, chunks, n);
        le = cudaGetLastError();
    }
    cu_scratch_free(part, k);
    if (le != cudaSuccess) return mill_errf(e, "hc dfn kernels: launch failed: %s", cudaGetErrorString(le));
    return 0;
}

/* dFL = dF @ fn; dfn += dF^T FL; dh += rmsnorm backward of dFL (all fp32). */
static int hc_logits_backward(const kctx *k, float *dh, float *dfn, const float *dF, const float *FL, const float *h,
                              const float *fn, int N, int mix, hc_dims dm, float *dFL, mill_err *e) {
    int nd = dm.n * dm.D;
    double tp = cu_phase(k);
    if (mix <= HC_MIX_MAX) {
        hc_dfl_kernel<<<dim3(cu_blocks(nd, 256), (N + HC_ROWS - 1) / HC_ROWS), 256, 0, cu_stream(k)>>>(dFL, dF, fn, N,
                                                                                                     mix, nd);
        LAUNCH_CHECK("hc_dfl_kernel");
    } else {
        TRY(cu_gemm(k, GEMM_NN, N, nd, mix, dF, mix, fn, nd, dFL, nd, 0.0f, 0, e));
    }
    cu_phase_end(k, "hc bwd: dFL = dF fn", tp);
    tp = cu_phase(k);
    if (mix <= HC_MIX_MAX) TRY(hc_dfn_add(k, dfn, dF, FL, N, mix, nd, e));
    else TRY(hc_gemm_split(k, GEMM_TN, mix, nd, N, dF, mix, mix, FL, nd, nd, dfn, 1.0f, e));
    cu_phase_end(k, "hc bwd: dfn += dF^T FL", tp);
    tp = cu_phase(k);
    int rc = cuda_op_rmsnorm_backward(k, dh, NULL, dFL, h, NULL, N, nd, 0, dm.norm_eps, e);
    cu_phase_end(k, "hc bwd: rmsnorm backward", tp);
    return rc;
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
    int stride = hc_token_smem((steps + 3) * nn, 32, &threads, &smem);
    float *s = NULL; /* the chains need global scratch only when they do not fit in shared memory */
    long per_tok = 2L * n + (mix + 3) + (stride ? 0 : (long)(steps + 3) * nn);
    TRY(cu_scratch((void **)&s, sizeof(float) * (size_t)(N * per_tok), k, e));
    float *pre = s, *dpre = pre + (long)N * n, *part = dpre + (long)N * n, *chains = part + (long)N * (mix + 3);
    double tp = cu_phase(k);
    int rc = hc_logits_bwd(k, 0, F, FL, h, fn, N, dm, e);
    cu_phase_end(k, "hc_pre bwd: logits again", tp);
    if (!rc) {
        hc_pre_weights_kernel<<<cu_blocks((long)N * n, 256), 256, 0, cu_stream(k)>>>(pre, F, mix, base, scale, N, n,
                                                                                     dm.hc_eps);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "hc_pre_weights_kernel: launch failed: %s", cudaGetErrorString(le));
    }
    tp = cu_phase(k);
    if (!rc) rc = hc_collapse_backward(k, dpre, dh, dx, h, pre, N, n, D, e);
    cu_phase_end(k, "hc_pre bwd: collapse", tp);
    tp = cu_phase(k);
    if (!rc) {
        hc_pre_bwd_token_kernel<<<cu_blocks(N, threads), threads, smem, cu_stream(k)>>>(
            dF, part, chains, F, pre, dpre, dpost, dcomb, base, scale, N, dm, stride);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "hc_pre backward: launch failed: %s", cudaGetErrorString(le));
    }
    /* dbase, dscale += the tokens' shares, summed in chunks of tokens then chunk by chunk */
    if (!rc) rc = cu_colsum_add(k, dbase, mix, dscale, part, N, mix + 3, e);
    cu_phase_end(k, "hc_pre bwd: mixing", tp);
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
    int rc = hc_logits_bwd(k, 1, F, FL, h, fn, N, dm, e);
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
