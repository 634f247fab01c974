/* kernels/cuda/cuda_internal.cuh — shared by the kernels/cuda/ sources only.
 * Owns: the checked-call macros for the CUDA ops (every CUDA / cuBLAS call and every launch
 * returns its failure through mill_err), the stream/handle accessors on kctx, stream-ordered
 * scratch allocation, block reductions, and the fp32-storage GEMM helper all GEMMs go through. */
#ifndef MILL_CUDA_INTERNAL_CUH
#define MILL_CUDA_INTERNAL_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "cuda_ops.h"

#include "../../common/cuda_check.h"
#define CU_CHECK(call) CUDA_CHECK(call)

/* After every <<<...>>>: launch-configuration errors surface here, not at the next sync. */
#define LAUNCH_CHECK(what)                                                                                 \
    do {                                                                                                   \
        cudaError_t err_ = cudaGetLastError();                                                             \
        if (err_ != cudaSuccess)                                                                           \
            return mill_errf(e, "%s:%d: launch of %s failed: %s", __FILE__, __LINE__, what, cudaGetErrorString(err_)); \
    } while (0)

static inline cudaStream_t cu_stream(const kctx *k) { return (cudaStream_t)k->stream; }
static inline cublasHandle_t cu_blas(const kctx *k) { return (cublasHandle_t)k->cublas; }

static inline unsigned cu_blocks(long n, int threads) {
    long b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : (b > 2147483647L ? 2147483647L : b));
}

/* Scratch comes from the stream-ordered pool, so ops need no buffers kept between calls. */
static inline int cu_scratch(void **p, size_t bytes, const kctx *k, mill_err *e) {
    *p = NULL;
    CU_CHECK(cudaMallocAsync(p, bytes ? bytes : 1, cu_stream(k)));
    return 0;
}
static inline void cu_scratch_free(void *p, const kctx *k) {
    if (p) cudaFreeAsync(p, cu_stream(k)); /* a failure here has no caller left to tell */
}

/* Deferred id checks (kctx_defer_checks): one record per op kind; `first` packs the lowest bad
 * position (high word) with its id (low word), so one atomicMin keeps the first failure. */
typedef struct {
    unsigned long long first; /* all ones: none */
    int bound, pad;           /* the id range [0, bound) the op expected */
} cu_check;
enum { CU_CHECK_EMBEDDING = 0, CU_CHECK_GATHER, CU_CHECK_ROUTE, CU_CHECK_EXPERTS, CU_CHECKS };

/* The record for `kind` when k defers its checks, else NULL (the op then checks at once). */
static inline cu_check *cu_deferred(const kctx *k, int kind) {
    return k->checks && k->checks->on ? (cu_check *)k->checks->slots + kind : NULL;
}
__device__ __forceinline__ void cu_check_record(cu_check *c, long pos, int id, int bound) {
    atomicMin(&c->first, ((unsigned long long)(unsigned)pos << 32) | (unsigned)id);
    c->bound = bound; /* every writer stores the same value */
}

/* MILL_PROFILE: time a phase inside an op under its own name, device-synced like the ops:
 * `double t = cu_phase(k); ...; cu_phase_end(k, "moe: group", t);` (no-ops otherwise). */
static inline double cu_phase(const kctx *k) { return k->prof ? kprof_begin(k) : 0.0; }
static inline void cu_phase_end(const kctx *k, const char *name, double t0) {
    if (k->prof) kprof_end(k, name, t0, 0);
}
/* A linear's phase named by its shape (x [M, K], w [N, K]): MILL_PROFILE's table then tells which
 * GEMMs take the time. */
static inline void cu_gemm_phase_end(const kctx *k, const char *what, int M, int N, int K, double t0) {
    if (!k->prof) return;
    char name[64];
    snprintf(name, sizeof name, "%s M%d N%d K%d", what, M, N, K);
    cu_phase_end(k, name, t0);
}

/* Host-side results (losses, norms, validity flags) need the stream drained first. */
static inline int cu_copy_to_host_sync(void *dst, const void *src, size_t bytes, const kctx *k, mill_err *e) {
    CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cu_stream(k)));
    CU_CHECK(cudaStreamSynchronize(cu_stream(k)));
    return 0;
}

__device__ __forceinline__ float cu_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double cu_warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float cu_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Block-wide sum (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
 * sh: 32 slots of shared memory; the trailing barrier lets the caller reuse sh at once. */
template <typename T>
__device__ __forceinline__ T cu_block_sum(T v, T *sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    T r = 0;
    for (int i = 0; i < nw; i++) r += sh[i]; /* fixed order: deterministic */
    __syncthreads();
    return r;
}
__device__ __forceinline__ float cu_block_max(float v, float *sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = cu_warp_max(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    float r = sh[0];
    for (int i = 1; i < nw; i++) r = fmaxf(r, sh[i]);
    __syncthreads();
    return r;
}

/* Row-major GEMM on fp32 storage, written in the three shapes the ops need:
 *   GEMM_NT: C[M,N] = A[M,K] @ B[N,K]^T     (linear)
 *   GEMM_NN: C[M,N] = A[M,K] @ B[K,N]       (dx = dy @ w)
 *   GEMM_TN: C[M,N] = A[K,M]^T @ B[K,N]     (dw = dy^T @ x)
 * lda/ldb/ldc are row strides; beta 0 or 1. `fast`: bf16 tensor cores with fp32 accumulation —
 * A and B are rounded to bf16 copies first (cu_gemm_bf16) because cuBLAS 13.0, given fp32 matrices
 * and CUBLAS_COMPUTE_32F_FAST_16BF, picks TF32 kernels instead (measured on an H100: the error is
 * TF32's 2.6e-4, not bf16's 2e-3). Otherwise full fp32 (the small precision-critical products:
 * hyper-connection logits), as every GEMM is when kctx.gemm_fp32 is set. */
typedef enum { GEMM_NT = 0, GEMM_NN, GEMM_TN } cu_gemm_shape;

typedef struct {
    cublasOperation_t ta, tb;
    int m, n, k;
    const void *A;
    int lda;
    const void *B;
    int ldb;
    float *C;
    int ldc;
} cu_colmajor_gemm;

/* Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands. */
static inline cu_colmajor_gemm cu_gemm_plan(cu_gemm_shape s, int M, int N, int K, const void *A, int lda,
                                            const void *B, int ldb, float *C, int ldc) {
    cu_colmajor_gemm g;
    g.m = N;
    g.n = M;
    g.k = K;
    g.A = B;
    g.lda = ldb;
    g.B = A;
    g.ldb = lda;
    g.C = C;
    g.ldc = ldc;
    g.ta = s == GEMM_NT ? CUBLAS_OP_T : CUBLAS_OP_N;
    g.tb = s == GEMM_TN ? CUBLAS_OP_T : CUBLAS_OP_N;
    return g;
}

/* Rows of A and B as stored (row-major) for each shape. */
static inline void cu_gemm_operand_rows(cu_gemm_shape s, int M, int N, int K, int *ra, int *ca, int *rb, int *cb) {
    *ra = s == GEMM_TN ? K : M;
    *ca = s == GEMM_TN ? M : K;
    *rb = s == GEMM_NT ? N : K;
    *cb = s == GEMM_NT ? K : N;
}

/* dst[rows, cols] (compact) = bf16(src rows with stride ld); defined in dense.cu. */
int cu_to_bf16(const kctx *k, void *dst, const float *src, long rows, int cols, int ld, mill_err *e);
/* The registered bf16 shadow (kctx_shadow_add) of the floats [p, p + extent), or NULL when they are
 * not all inside one; and the refresh after a write of bytes at dst (no-op outside every shadow). */
const void *cu_shadow_of(const kctx *k, const float *p, long extent);
int cu_shadow_refresh(const kctx *k, const void *dst, size_t bytes, mill_err *e);
int cu_gemm_bf16(const kctx *k, cu_gemm_shape s, int M, int N, int K, const float *A, int lda, const float *B,
                 int ldb, float *C, int ldc, float beta, mill_err *e);

/* Few rows against large weights (the MoE's experts in decode): Y[r, n] = beta Y[r, n] +
 * sum_c X[r, c] W_g[n, c] with W_g = W + g * w_stride for the rows of group g: offs[g] .. offs[g+1]
 * (a device array, so no host wait), or with offs NULL one group of rows 0 .. M. (Measured on an
 * H100 as the decode step's plain linears too: slower than cuBLAS at 1 and 32 rows; those now take
 * cu_skinny_linear.) A warp owns CU_ROWS_WARP_COLS output
 * columns; its lanes split K in 8-element chunks (K % 8 == 0) and reduce in a fixed order, so a
 * row's bits do not depend on the other rows. round: bf16 operands (W's shadow when it has one),
 * fp32 accumulation, like cu_gemm_bf16; else full fp32. Needs no host wait (graph capture). */
int cu_rows_gemm(const kctx *k, float *Y, int ldy, const float *X, int ldx, const float *W, long w_stride,
                 const int32_t *offs, int groups, int M, int N, int K, float beta, int round, mill_err *e);

/* op_linear's few-row case (decode): y[m, n] = (y[m, n] +) sum_c bf16(x[m, c]) bf16(w[n, c]) for
 * M <= CU_SKINNY_MAX_ROWS, one launch, no scratch, no host wait (graph capture): w's bf16 shadow
 * when it has one, else w rounded in the kernel (the same values); fp32 accumulation on the tensor
 * cores. A row's bits depend on K, its own x row and w only, never on M or the other rows
 * (dense.cu states the order). K, ldx, ldy and the pointers need no alignment (a scalar path
 * takes what 16-byte loads can't). */
#define CU_SKINNY_MAX_ROWS 32
int cu_skinny_linear(const kctx *k, float *Y, int ldy, const float *X, int ldx, const float *W, int M, int N, int K,
                     int accumulate, mill_err *e);

static inline int cu_gemm(const kctx *k, cu_gemm_shape s, int M, int N, int K, const float *A, int lda,
                          const float *B, int ldb, float *C, int ldc, float beta, int fast, mill_err *e) {
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    if (fast && !k->gemm_fp32) return cu_gemm_bf16(k, s, M, N, K, A, lda, B, ldb, C, ldc, beta, e);
    cu_colmajor_gemm g = cu_gemm_plan(s, M, N, K, A, lda, B, ldb, C, ldc);
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasGemmEx(cu_blas(k), g.ta, g.tb, g.m, g.n, g.k, &alpha, g.A, CUDA_R_32F, g.lda, g.B, CUDA_R_32F,
                              g.ldb, &beta, g.C, CUDA_R_32F, g.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return 0;
}

/* Row-major helpers shared between files (defined in dense.cu). */
int cu_rmsnorm_rows(const kctx *k, float *y, const float *x, const float *w, int rows, int dim, int ld, float eps,
                    mill_err *e);
/* dst0[i] += sum over rows of in[r, i] for i < n0, dst1[i - n0] likewise for n0 <= i < cols (in [rows, cols]
 * compact); rows are summed in chunks, then the chunks in order: deterministic, no atomics. */
int cu_colsum_add(const kctx *k, float *dst0, int n0, float *dst1, const float *in, long rows, int cols,
                  mill_err *e);
int cu_swiglu_backward_write(const kctx *k, float *dg, float *du, const float *dh, const float *g, const float *u,
                             long n, float limit, mill_err *e);

#endif
