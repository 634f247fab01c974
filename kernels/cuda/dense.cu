/* kernels/cuda/dense.cu — CUDA paths of kernels/dense.h: linear / matmul / their backward on cuBLAS
 * (fp32 storage, bf16 tensor cores, fp32 accumulation), except op_linear of <= 32 rows (decode),
 * which is one memory-bound kernel of its own (cu_skinny_linear: the same bf16 operands, a fixed
 * summation order, so a row's bits do not depend on its batch), RMSNorm, embedding, clamped SwiGLU,
 * cross-entropy and the token head (log-softmax at targets + entropy) as fp32 kernels, and the
 * memory ops (copies on kctx.stream, row repeat, int32 gather). */
#include "cuda_internal.cuh"
#include "../shared_math.h"

#include <cuda_bf16.h>
#include <math.h>

__global__ void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, long rows, int cols, int ld) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    long r = i / cols;
    dst[i] = __float2bfloat16_rn(src[r * ld + (i - r * cols)]);
}

int cu_to_bf16(const kctx *k, void *dst, const float *src, long rows, int cols, int ld, mill_err *e) {
    if (rows <= 0 || cols <= 0) return 0;
    to_bf16_kernel<<<cu_blocks(rows * cols, 256), 256, 0, cu_stream(k)>>>((__nv_bfloat16 *)dst, src, rows, cols, ld);
    LAUNCH_CHECK("to_bf16_kernel");
    return 0;
}

/* ---- bf16 shadows of registered weight buffers (kctx_shadow_add) */

const void *cu_shadow_of(const kctx *k, const float *p, long extent) {
    for (int i = 0; k->shadows && i < KCTX_SHADOWS; i++) {
        const kctx_shadow *s = &k->shadows[i];
        if (s->src && p >= s->src && p + extent <= s->src + s->n) return (const __nv_bfloat16 *)s->bf16 + (p - s->src);
    }
    return NULL;
}

/* Rounds floats [lo, hi) of shadow s again, in chunks of at most 2^30 (cu_to_bf16 takes int columns). */
static int shadow_round(const kctx *k, const kctx_shadow *s, size_t lo, size_t hi, mill_err *e) {
    for (size_t a = lo; a < hi;) {
        size_t n = hi - a < ((size_t)1 << 30) ? hi - a : ((size_t)1 << 30);
        TRY(cu_to_bf16(k, (__nv_bfloat16 *)s->bf16 + a, s->src + a, 1, (int)n, (int)n, e));
        a += n;
    }
    return 0;
}

int cu_shadow_refresh(const kctx *k, const void *dst, size_t bytes, mill_err *e) {
    const char *d0 = (const char *)dst, *d1 = d0 + bytes;
    for (int i = 0; k->shadows && i < KCTX_SHADOWS; i++) {
        const kctx_shadow *s = &k->shadows[i];
        if (!s->src) continue;
        const char *s0 = (const char *)s->src, *s1 = (const char *)(s->src + s->n);
        if (d1 <= s0 || d0 >= s1) continue;
        size_t lo = d0 > s0 ? (size_t)(d0 - s0) / sizeof(float) : 0;
        size_t hi = d1 < s1 ? ((size_t)(d1 - s0) + sizeof(float) - 1) / sizeof(float) : s->n;
        TRY(shadow_round(k, s, lo, hi, e));
    }
    return 0;
}

int cuda_shadow_add(const kctx *k, const float *src, size_t n, mill_err *e) {
    kctx_shadow *slot = NULL;
    for (int i = 0; k->shadows && i < KCTX_SHADOWS; i++) {
        if (k->shadows[i].src == src && k->shadows[i].n == n) return shadow_round(k, &k->shadows[i], 0, n, e);
        if (!k->shadows[i].src && !slot) slot = &k->shadows[i];
    }
    if (!slot || !n) return 0; /* all slots taken: this buffer's GEMMs round it per call, as before */
    void *p = NULL;
    CU_CHECK(cudaMalloc(&p, sizeof(__nv_bfloat16) * n));
    kctx_shadow s = {src, p, n};
    if (shadow_round(k, &s, 0, n, e)) {
        cudaFree(p);
        return -1;
    }
    *slot = s;
    return 0;
}

/* Both operands as bf16: a registered weight's shadow (kctx_shadow_add), else a compact copy rounded
 * now (stream-ordered scratch); then one bf16 x bf16 -> fp32 GEMM with fp32 accumulation on the
 * tensor cores. */
int cu_gemm_bf16(const kctx *k, cu_gemm_shape s, int M, int N, int K, const float *A, int lda, const float *B,
                 int ldb, float *C, int ldc, float beta, mill_err *e) {
    int ra, ca, rb, cb;
    cu_gemm_operand_rows(s, M, N, K, &ra, &ca, &rb, &cb);
    const __nv_bfloat16 *sa = (const __nv_bfloat16 *)cu_shadow_of(k, A, (long)(ra - 1) * lda + ca);
    const __nv_bfloat16 *sb = (const __nv_bfloat16 *)cu_shadow_of(k, B, (long)(rb - 1) * ldb + cb);
    size_t na = sa ? 0 : (size_t)ra * ca, nb = sb ? 0 : (size_t)rb * cb;
    __nv_bfloat16 *buf = NULL;
    TRY(cu_scratch((void **)&buf, sizeof(__nv_bfloat16) * (na + nb + 8), k, e));
    __nv_bfloat16 *a16 = buf, *b16 = buf + ((na + 7) / 8) * 8; /* 16-byte aligned */
    int rc = sa ? 0 : cu_to_bf16(k, a16, A, ra, ca, lda, e);
    if (!rc && !sb) rc = cu_to_bf16(k, b16, B, rb, cb, ldb, e);
    if (!rc) {
        cu_colmajor_gemm g = cu_gemm_plan(s, M, N, K, sa ? (const void *)sa : a16, sa ? lda : ca,
                                          sb ? (const void *)sb : b16, sb ? ldb : cb, C, ldc);
        const float alpha = 1.0f;
        cublasStatus_t st = cublasGemmEx(cu_blas(k), g.ta, g.tb, g.m, g.n, g.k, &alpha, g.A, CUDA_R_16BF, g.lda, g.B,
                                         CUDA_R_16BF, g.ldb, &beta, g.C, CUDA_R_32F, g.ldc, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT);
        if (st != CUBLAS_STATUS_SUCCESS) rc = mill_errf(e, "cublasGemmEx (bf16) failed: cuBLAS status %d", (int)st);
    }
    cu_scratch_free(buf, k);
    return rc;
}

/* ---- cu_rows_gemm (cuda_internal.cuh) */
#define CU_ROWS_WARP_COLS 4
#define CU_ROWS_WARPS 4
#define CU_ROWS_R 8     /* rows per register tile */
#define CU_ROWS_KT 1024 /* K tile staged in shared memory: 8 x 1024 floats = 32 KiB */

__device__ __forceinline__ float cu_bf16r(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

/* Eight consecutive weights as floats; VEC: p is 16-byte aligned (a weight's place in the flat
 * parameter buffer need not be); fp32 weights are rounded to bf16 values when ROUND. */
template <bool VEC, bool ROUND>
__device__ __forceinline__ void cu_load8(const __nv_bfloat16 *p, float *w) {
    if (VEC) {
        uint4 v = *(const uint4 *)p;
        const __nv_bfloat16 *h = (const __nv_bfloat16 *)&v;
        for (int q = 0; q < 8; q++) w[q] = __bfloat162float(h[q]);
    } else {
        for (int q = 0; q < 8; q++) w[q] = __bfloat162float(p[q]);
    }
}
template <bool VEC, bool ROUND>
__device__ __forceinline__ void cu_load8(const float *p, float *w) {
    if (VEC) {
        float4 a = *(const float4 *)p, b = *(const float4 *)(p + 4);
        w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
    } else {
        for (int q = 0; q < 8; q++) w[q] = p[q];
    }
    if (ROUND)
        for (int q = 0; q < 8; q++) w[q] = cu_bf16r(w[q]);
}

template <typename WT, bool VEC, bool ROUND>
__global__ void rows_gemm_kernel(float *Y, int ldy, const float *X, int ldx, const WT *W, long w_stride,
                                 const int32_t *offs, int M, int N, int K, float beta) {
    extern __shared__ float xs[]; /* [CU_ROWS_R][CU_ROWS_KT] */
    int g = blockIdx.y, r0 = offs ? offs[g] : 0, r1 = offs ? offs[g + 1] : M;
    if (r0 >= r1) return; /* the same for the whole block: no barrier is skipped by part of it */
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int n0 = (blockIdx.x * CU_ROWS_WARPS + warp) * CU_ROWS_WARP_COLS;
    const WT *Wg = W + (long)g * w_stride;
    for (int rb = r0; rb < r1; rb += CU_ROWS_R) {
        int nr = r1 - rb < CU_ROWS_R ? r1 - rb : CU_ROWS_R;
        float acc[CU_ROWS_WARP_COLS][CU_ROWS_R];
        for (int j = 0; j < CU_ROWS_WARP_COLS; j++)
            for (int r = 0; r < CU_ROWS_R; r++) acc[j][r] = 0.f;
        for (int k0 = 0; k0 < K; k0 += CU_ROWS_KT) {
            int kt = K - k0 < CU_ROWS_KT ? K - k0 : CU_ROWS_KT;
            __syncthreads(); /* the previous tile is consumed */
            for (int i = threadIdx.x; i < CU_ROWS_R * kt; i += blockDim.x) {
                int r = i / kt, c = i - r * kt;
                float v = r < nr ? X[(long)(rb + r) * ldx + k0 + c] : 0.f;
                xs[r * CU_ROWS_KT + c] = ROUND ? cu_bf16r(v) : v;
            }
            __syncthreads();
            for (int c = lane * 8; c < kt; c += 256) {
                float w[CU_ROWS_WARP_COLS][8];
                for (int j = 0; j < CU_ROWS_WARP_COLS; j++) /* every load first: they are in flight together */
                    if (n0 + j < N) cu_load8<VEC, ROUND>(Wg + (long)(n0 + j) * K + k0 + c, w[j]);
                for (int r = 0; r < CU_ROWS_R; r++) {
                    const float *xr = xs + r * CU_ROWS_KT + c;
                    float xv[8];
                    for (int q = 0; q < 8; q++) xv[q] = xr[q];
                    for (int j = 0; j < CU_ROWS_WARP_COLS; j++) {
                        float a = acc[j][r];
                        for (int q = 0; q < 8; q++) a = fmaf(w[j][q], xv[q], a);
                        acc[j][r] = a;
                    }
                }
            }
        }
        for (int j = 0; j < CU_ROWS_WARP_COLS; j++)
            for (int r = 0; r < CU_ROWS_R; r++) {
                float v = cu_warp_sum(acc[j][r]);
                if (lane == 0 && r < nr && n0 + j < N) {
                    float *yp = Y + (long)(rb + r) * ldy + n0 + j;
                    *yp = beta != 0.f ? *yp + v : v;
                }
            }
    }
}

int cu_rows_gemm(const kctx *k, float *Y, int ldy, const float *X, int ldx, const float *W, long w_stride,
                 const int32_t *offs, int groups, int M, int N, int K, float beta, int round, mill_err *e) {
    if (N <= 0 || K <= 0 || groups <= 0 || groups > 65535 || K % 8) return mill_errf(e, "cu_rows_gemm: bad shape");
    const __nv_bfloat16 *w16 =
        round ? (const __nv_bfloat16 *)cu_shadow_of(k, W, (long)(groups - 1) * w_stride + (long)N * K) : NULL;
    int vec = ((uintptr_t)(w16 ? (const void *)w16 : (const void *)W) & 15) == 0; /* K % 8: rows keep it */
    int cols = CU_ROWS_WARPS * CU_ROWS_WARP_COLS;
    dim3 grid((unsigned)((N + cols - 1) / cols), (unsigned)groups);
    size_t smem = sizeof(float) * CU_ROWS_R * CU_ROWS_KT;
    unsigned th = 32 * CU_ROWS_WARPS;
    cudaStream_t st = cu_stream(k);
    if (w16 && vec) rows_gemm_kernel<__nv_bfloat16, true, true><<<grid, th, smem, st>>>(Y, ldy, X, ldx, w16, w_stride, offs, M, N, K, beta);
    else if (w16) rows_gemm_kernel<__nv_bfloat16, false, true><<<grid, th, smem, st>>>(Y, ldy, X, ldx, w16, w_stride, offs, M, N, K, beta);
    else if (round && vec) rows_gemm_kernel<float, true, true><<<grid, th, smem, st>>>(Y, ldy, X, ldx, W, w_stride, offs, M, N, K, beta);
    else if (round) rows_gemm_kernel<float, false, true><<<grid, th, smem, st>>>(Y, ldy, X, ldx, W, w_stride, offs, M, N, K, beta);
    else if (vec) rows_gemm_kernel<float, true, false><<<grid, th, smem, st>>>(Y, ldy, X, ldx, W, w_stride, offs, M, N, K, beta);
    else rows_gemm_kernel<float, false, false><<<grid, th, smem, st>>>(Y, ldy, X, ldx, W, w_stride, offs, M, N, K, beta);
    LAUNCH_CHECK("rows_gemm_kernel");
    return 0;
}

/* ---- cu_skinny_linear (cuda_internal.cuh): op_linear for decode's few rows.
 * Memory-bound: the weight is read once, 16 bytes per lane per load, SK_LOADS loads in flight per
 * lane, while the products run on the tensor cores (mma.sync m16n8k16 bf16 -> fp32), which keeps
 * 32 rows as cheap as one (fp32 FMAs would need 32 per weight, more than the SMs issue at HBM
 * speed). Layout: a block is SK_WARPS warps over a tile of 8 T output columns; K is cut into chunks
 * of 32 and chunk c belongs to warp c % SK_WARPS. In a chunk, lane (g = lane / 4, t = lane % 4)
 * loads w[col0 + 8 j + g][kc + 8 t .. + 7] for each n-tile j (one 16-byte vector of the bf16
 * shadow, or two of fp32 rounded as cu_to_bf16 does) and x[row][kc + 8 t .. + 7] for its rows g
 * and g + 8 of each 16-row tile, rounded to bf16; the MMA's k slots {2t, 2t+1, 2t+8, 2t+9} take
 * elements 0-3 of those eight, a second MMA elements 4-7: both operands use the same k
 * permutation, so the product is the plain dot product. Rows past M, columns past N and k past K
 * are zeros (predicated loads: nothing outside the operands is read).
 * Latency: a warp takes its chunks U = 8 / T at a time and issues all U x T weight loads first,
 * then the x loads of G chunks at once (G = U for up to 8 rows, fewer for more rows, to bound the
 * registers), then their MMAs; so one iteration waits about one memory round trip, not U of them.
 * Row bucket R (8, 16, 32: M <= R) sets what is loaded; rows g + 8 are not loaded at all for R 8.
 * Summation order of y[m, n] (depends on K only, never on M, R, T or the other rows, so a token's
 * output is the same bits in any batch, and with the shadow or fp32 weights alike): warp w sums
 * its chunks w, w + 4, w + 8, ... in increasing order from 0, each chunk as two MMAs (elements
 * 0-3, then 4-7, of each lane's eight; inside one MMA the tensor core's fixed order; the chunks
 * past the end in a warp's last round add zeros); then ((p0 + p1) + p2) + p3 over the warps; then
 * y + that when accumulating. ptxas (CUDA 13.0, sm_90): 90-250 registers by variant, no spills;
 * static shared memory (the warps' partial sums) at most 24 KiB. */
#define SK_WARPS 4 /* warps per block, each every 4th chunk of K */
#define SK_LOADS 8 /* 16-byte weight vectors in flight per lane: T n-tiles x U chunks */
#define SK_XREGS 64 /* registers for x loads in flight per lane: G chunks x rows x 8 floats */
/* Blocks per SM that ptxas must fit: without a bound it trades the loads in flight for occupancy
 * (32 registers: the loads wait one by one); 2 allows 255 (spill-free in every variant), and 3
 * keeps R 32, T 1 (whose x loads it would otherwise hoist until 254) at 168. */
#define SK_MIN_BLOCKS(R, T) ((R) == 32 && (T) == 1 ? 3 : 2)

__device__ __forceinline__ uint32_t sk_pack(uint32_t lo, uint32_t hi) { /* two fp32 bit patterns */
    __nv_bfloat162 h = __floats2bfloat162_rn(__uint_as_float(lo), __uint_as_float(hi)); /* lo: low half */
    uint32_t u;
    memcpy(&u, &h, sizeof u);
    return u;
}

/* 16 bytes at p when ok, else zeros: one predicated load (p is not touched when !ok); volatile,
 * so loads stay in issue order ahead of the MMAs that use them. STREAM (the weights, read once):
 * past L1, which keeps x (every block reads it). */
template <bool STREAM>
__device__ __forceinline__ uint4 sk_ld16(const void *p, bool ok) {
    uint4 v;
    if (STREAM)
        asm volatile("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %5, 0;\n\tmov.b32 %0, 0;\n\tmov.b32 %1, 0;\n\t"
                     "mov.b32 %2, 0;\n\tmov.b32 %3, 0;\n\t"
                     "@q ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p), "r"((int)ok));
    else
        asm volatile("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %5, 0;\n\tmov.b32 %0, 0;\n\tmov.b32 %1, 0;\n\t"
                     "mov.b32 %2, 0;\n\tmov.b32 %3, 0;\n\t@q ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p), "r"((int)ok));
    return v;
}

/* Eight consecutive fp32 values p[k0 .. k0 + 7] as bit patterns (zeros where !ok or past K), kept
 * raw until the MMA needs them so no conversion waits on a load ahead of the other loads. VEC: the
 * eight are in range and p + k0 is 16-byte aligned. */
struct sk_f8 {
    uint4 lo, hi;
};
template <bool VEC, bool STREAM>
__device__ __forceinline__ sk_f8 sk_load8(const float *p, int k0, int K, bool ok) {
    sk_f8 r;
    if (VEC) {
        r.lo = sk_ld16<STREAM>(p + k0, ok && k0 < K);
        r.hi = sk_ld16<STREAM>(p + k0 + 4, ok && k0 < K);
    } else {
        uint32_t v[8];
        for (int q = 0; q < 8; q++) v[q] = ok && k0 + q < K ? __float_as_uint(p[k0 + q]) : 0u;
        r.lo = make_uint4(v[0], v[1], v[2], v[3]), r.hi = make_uint4(v[4], v[5], v[6], v[7]);
    }
    return r;
}
/* ... as four bf16 pairs, each rounded as cu_to_bf16 rounds (element 2q in the low half). */
__device__ __forceinline__ uint4 sk_bf16x8(const sk_f8 &f) {
    return make_uint4(sk_pack(f.lo.x, f.lo.y), sk_pack(f.lo.z, f.lo.w), sk_pack(f.hi.x, f.hi.y),
                      sk_pack(f.hi.z, f.hi.w));
}

/* A weight row's eight elements, raw: the shadow's bf16 (already the MMA's format) or fp32. */
template <typename WT>
struct sk_w8;
template <>
struct sk_w8<__nv_bfloat16> {
    uint4 v;
};
template <>
struct sk_w8<float> {
    sk_f8 v;
};
template <bool VEC>
__device__ __forceinline__ sk_w8<__nv_bfloat16> sk_load_w(const __nv_bfloat16 *p, int k0, int K, bool ok) {
    sk_w8<__nv_bfloat16> r;
    if (VEC) {
        r.v = sk_ld16<true>(p + k0, ok && k0 < K);
    } else {
        uint32_t h[4];
        for (int q = 0; q < 4; q++) {
            unsigned short lo = ok && k0 + 2 * q < K ? __bfloat16_as_ushort(p[k0 + 2 * q]) : 0;
            unsigned short hi = ok && k0 + 2 * q + 1 < K ? __bfloat16_as_ushort(p[k0 + 2 * q + 1]) : 0;
            h[q] = (uint32_t)lo | (uint32_t)hi << 16;
        }
        r.v = make_uint4(h[0], h[1], h[2], h[3]);
    }
    return r;
}
template <bool VEC>
__device__ __forceinline__ sk_w8<float> sk_load_w(const float *p, int k0, int K, bool ok) {
    sk_w8<float> r;
    r.v = sk_load8<VEC, true>(p, k0, K, ok);
    return r;
}
__device__ __forceinline__ uint4 sk_w_bf16(const sk_w8<__nv_bfloat16> &w) { return w.v; }
__device__ __forceinline__ uint4 sk_w_bf16(const sk_w8<float> &w) { return sk_bf16x8(w.v); }

/* d += a b: one m16n8k16 bf16 MMA with fp32 accumulators (a: rows g, g+8 at k slots 2t.., 2t+8..). */
__device__ __forceinline__ void sk_mma(float *d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* R: row bucket (M <= R: 8, 16 or 32); T n-tiles of 8 columns per block; see the section comment. */
template <int R, int T, bool VEC, typename WT>
__global__ void __launch_bounds__(32 * SK_WARPS, SK_MIN_BLOCKS(R, T)) skinny_kernel(float *__restrict__ Y, int ldy,
                                                              const float *__restrict__ X, int ldx,
                                                              const WT *__restrict__ W, int M, int N, int K,
                                                              int accumulate) {
    constexpr int MT = R > 16 ? 2 : 1;                     /* 16-row tiles */
    constexpr int HB = R > 8 ? 2 : 1;                      /* row halves loaded: g, and g + 8 */
    constexpr int U = SK_LOADS / T;                        /* chunks per iteration */
    constexpr int GX = SK_XREGS / (8 * MT * HB);           /* chunks whose x fits the register budget */
    constexpr int G = GX < 1 ? 1 : GX > U ? U : GX;        /* chunks per x group */
    static_assert(U % G == 0, "x groups must tile an iteration");
    __shared__ float red[SK_WARPS - 1][MT * T * 4][32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int col0 = blockIdx.x * 8 * T;
    int nchunks = (K + 31) >> 5;
    float acc[MT][T][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < T; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = 0.f;
    const WT *wrow[T];
    bool wok[T];
#pragma unroll
    for (int j = 0; j < T; j++) {
        int n = col0 + 8 * j + g;
        wok[j] = n < N;
        wrow[j] = W + (long)(wok[j] ? n : 0) * K;
    }
    const float *xrow[MT][HB]; /* this lane's rows (row 0 stands in for rows past M: never loaded) */
    bool xok[MT][HB];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int h = 0; h < HB; h++) {
            int r = 16 * i + 8 * h + g;
            xok[i][h] = r < M;
            xrow[i][h] = X + (long)(r < M ? r : 0) * ldx;
        }
    for (int c0 = warp; c0 < nchunks; c0 += SK_WARPS * U) {
        sk_w8<WT> wv[U][T];
#pragma unroll
        for (int u = 0; u < U; u++) /* every weight load first: they are in flight together */
#pragma unroll
            for (int j = 0; j < T; j++) {
                int c = c0 + SK_WARPS * u;
                wv[u][j] = sk_load_w<VEC>(wrow[j], c * 32 + 8 * t, K, wok[j] && c < nchunks);
            }
#pragma unroll
        for (int u0 = 0; u0 < U; u0 += G) {
            sk_f8 xv[G][MT][HB];
#pragma unroll
            for (int uu = 0; uu < G; uu++) { /* the group's x loads, all before its MMAs */
                int c = c0 + SK_WARPS * (u0 + uu);
#pragma unroll
                for (int i = 0; i < MT; i++)
#pragma unroll
                    for (int h = 0; h < HB; h++)
                        xv[uu][i][h] = sk_load8<VEC, false>(xrow[i][h], c * 32 + 8 * t, K, xok[i][h] && c < nchunks);
            }
#pragma unroll
            for (int uu = 0; uu < G; uu++) /* a chunk past the end is zeros: it adds +0, no branch */
#pragma unroll
                for (int i = 0; i < MT; i++) {
                    uint4 xa = sk_bf16x8(xv[uu][i][0]);
                    uint4 xb = HB > 1 ? sk_bf16x8(xv[uu][i][HB - 1]) : make_uint4(0, 0, 0, 0);
#pragma unroll
                    for (int j = 0; j < T; j++) {
                        uint4 b = sk_w_bf16(wv[u0 + uu][j]);
                        sk_mma(acc[i][j], xa.x, xb.x, xa.y, xb.y, b.x, b.y);
                        sk_mma(acc[i][j], xa.z, xb.z, xa.w, xb.w, b.z, b.w);
                    }
                }
        }
    }
    /* the warps' partial sums, in warp order, by warp 0 */
    if (warp > 0) {
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int j = 0; j < T; j++)
#pragma unroll
                for (int q = 0; q < 4; q++) red[warp - 1][(i * T + j) * 4 + q][lane] = acc[i][j][q];
    }
    __syncthreads();
    if (warp > 0) return;
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < T; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) {
                float v = acc[i][j][q];
#pragma unroll
                for (int p = 0; p < SK_WARPS - 1; p++) v += red[p][(i * T + j) * 4 + q][lane];
                int row = 16 * i + g + (q >= 2 ? 8 : 0), col = col0 + 8 * j + 2 * t + (q & 1);
                if (row < M && col < N) {
                    float *yp = Y + (long)row * ldy + col;
                    *yp = accumulate ? *yp + v : v;
                }
            }
}

template <int R, typename WT>
static void skinny_launch(int T, bool vec, dim3 grid, cudaStream_t st, float *Y, int ldy, const float *X, int ldx,
                          const WT *W, int M, int N, int K, int acc) {
    dim3 th(32 * SK_WARPS);
#define SK_CASE(TT)                                                                                        \
    if (T == TT) {                                                                                         \
        if (vec) skinny_kernel<R, TT, true, WT><<<grid, th, 0, st>>>(Y, ldy, X, ldx, W, M, N, K, acc);     \
        else skinny_kernel<R, TT, false, WT><<<grid, th, 0, st>>>(Y, ldy, X, ldx, W, M, N, K, acc);        \
        return;                                                                                            \
    }
    SK_CASE(8) SK_CASE(4) SK_CASE(2) SK_CASE(1)
#undef SK_CASE
}

template <typename WT>
static void skinny_rows(int T, bool vec, dim3 grid, cudaStream_t st, float *Y, int ldy, const float *X, int ldx,
                        const WT *W, int M, int N, int K, int acc) {
    if (M <= 8) skinny_launch<8>(T, vec, grid, st, Y, ldy, X, ldx, W, M, N, K, acc);
    else if (M <= 16) skinny_launch<16>(T, vec, grid, st, Y, ldy, X, ldx, W, M, N, K, acc);
    else skinny_launch<32>(T, vec, grid, st, Y, ldy, X, ldx, W, M, N, K, acc);
}

int cu_skinny_linear(const kctx *k, float *Y, int ldy, const float *X, int ldx, const float *W, int M, int N, int K,
                     int accumulate, mill_err *e) {
    if (M <= 0 || N <= 0) return 0;
    if (M > CU_SKINNY_MAX_ROWS || K <= 0 || ldx < K || ldy < N)
        return mill_errf(e, "cu_skinny_linear: bad shape M %d N %d K %d ldx %d ldy %d", M, N, K, ldx, ldy);
    const __nv_bfloat16 *w16 = (const __nv_bfloat16 *)cu_shadow_of(k, W, (long)N * K);
    const void *wp = w16 ? (const void *)w16 : (const void *)W;
    /* 16-byte vectors: every weight row and x row starts aligned, K a multiple of 8 */
    bool vec = K % 8 == 0 && ldx % 4 == 0 && ((uintptr_t)wp & 15) == 0 && ((uintptr_t)X & 15) == 0;
    /* wider column tiles share each x load among more MMAs, but keep >= 256 blocks to fill the GPU
     * (the summation order does not depend on T) */
    int T = N >= 16384 ? 8 : N >= 8192 ? 4 : N >= 4096 ? 2 : 1;
    dim3 grid((unsigned)((N + 8 * T - 1) / (8 * T)));
    if (w16) skinny_rows(T, vec, grid, cu_stream(k), Y, ldy, X, ldx, w16, M, N, K, accumulate);
    else skinny_rows(T, vec, grid, cu_stream(k), Y, ldy, X, ldx, W, M, N, K, accumulate);
    LAUNCH_CHECK("skinny_kernel");
    return 0;
}

__global__ void linear_exact_offs_kernel(int32_t *offs, int M) {
    offs[0] = 0;
    offs[1] = M;
}

/* kctx.exact: y = x w^T (+ y) with a row's bits independent of M and of the other rows, for
 * every M: the grouped tensor-core kernel as one group (fixed 128 x 128 tiles, each element summed
 * over K in the same order whatever the tile holds), or, for shapes it does not take, the few-row
 * kernel 32 rows at a time. Capturable: no host copies. */
static int cu_linear_exact(const kctx *k, float *y, int ly, const float *x, int lx, const float *w, int M, int N, int K,
                           int accumulate, mill_err *e) {
    const void *ws = cu_shadow_of(k, w, (long)(N - 1) * K + K);
    int fits = N % 16 == 0 && K % 16 == 0 && ly >= N;
    if (!fits) {
        for (int r = 0; r < M; r += CU_SKINNY_MAX_ROWS)
            TRY(cu_skinny_linear(k, y + (long)r * ly, ly, x + (long)r * lx, lx, w,
                                 M - r < CU_SKINNY_MAX_ROWS ? M - r : CU_SKINNY_MAX_ROWS, N, K, accumulate, e));
        return 0;
    }
    int wcopy = !ws || ((uintptr_t)ws & 15);
    size_t na = (size_t)M * K, nb = wcopy ? (size_t)N * K : 0;
    char *buf = NULL;
    TRY(cu_scratch((void **)&buf, sizeof(__nv_bfloat16) * (na + nb + 8) + 64, k, e));
    int32_t *offs = (int32_t *)buf;
    __nv_bfloat16 *a16 = (__nv_bfloat16 *)(buf + 64), *b16 = a16 + ((na + 7) / 8) * 8; /* 16-byte aligned */
    int rc = cu_to_bf16(k, a16, x, M, K, lx, e);
    if (!rc && wcopy) rc = cu_to_bf16(k, b16, w, N, K, K, e);
    if (!rc) {
        linear_exact_offs_kernel<<<1, 1, 0, cu_stream(k)>>>(offs, M);
        rc = cuda_moe_wmma_gemm(k, 0, offs, 1, M, N, K, a16, K, wcopy ? (const void *)b16 : ws, 0, K, y, ly,
                                accumulate ? 1.0f : 0.0f, e);
    }
    cu_scratch_free(buf, k);
    return rc;
}

int cuda_op_linear(const kctx *k, float *y, const float *x, const float *w, int M, int N, int K, int ldx, int ldy,
                   int accumulate, mill_err *e) {
    if (M <= 0 || N <= 0) return 0;
    int lx = ldx ? ldx : K, ly = ldy ? ldy : N;
    if (K <= 0) {
        if (!accumulate)
            CU_CHECK(cudaMemset2DAsync(y, sizeof(float) * (size_t)ly, 0, sizeof(float) * (size_t)N, (size_t)M,
                                       cu_stream(k)));
        return 0;
    }
    double tp = cu_phase(k);
    int rc;
    if (k->exact && !k->gemm_fp32)
        rc = cu_linear_exact(k, y, ly, x, lx, w, M, N, K, accumulate, e);
    /* decode's few rows: one memory-bound kernel, the same bits for a row in any batch */
    else if (M <= CU_SKINNY_MAX_ROWS && !k->gemm_fp32 && !k->linear_cublas && lx >= K && ly >= N)
        rc = cu_skinny_linear(k, y, ly, x, lx, w, M, N, K, accumulate, e);
    else
        rc = cu_gemm(k, GEMM_NT, M, N, K, x, lx, w, K, y, ly, accumulate ? 1.0f : 0.0f, 1, e);
    cu_gemm_phase_end(k, "y = x w^T", M, N, K, tp);
    return rc;
}

int cuda_op_matmul_nn(const kctx *k, float *y, const float *a, const float *b, int M, int N, int K, mill_err *e) {
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    return cu_gemm(k, GEMM_NN, M, N, K, a, K, b, N, y, N, 0.0f, 1, e);
}

int cuda_op_linear_backward(const kctx *k, float *dx, float *dw, const float *dy, const float *x, const float *w,
                            int M, int N, int K, int ldx, int ldy, mill_err *e) {
    if (M <= 0 || N <= 0 || K <= 0) return 0;
    int lx = ldx ? ldx : K, ly = ldy ? ldy : N;
    double tp = cu_phase(k);
    if (dx) TRY(cu_gemm(k, GEMM_NN, M, K, N, dy, ly, w, K, dx, lx, 1.0f, 1, e));
    cu_gemm_phase_end(k, "dx += dy w", M, N, K, tp);
    tp = cu_phase(k);
    if (dw) TRY(cu_gemm(k, GEMM_TN, N, K, M, dy, ly, x, lx, dw, K, 1.0f, 1, e));
    cu_gemm_phase_end(k, "dw += dy^T x", M, N, K, tp);
    return 0;
}

/* ---- RMSNorm: one block per row; the sum of squares in double, as on the CPU (rows can be
 * n*D long for the hyper-connection flatten). */
__global__ void rmsnorm_fwd_kernel(float *y, const float *x, const float *w, int dim, int ld, float eps) {
    __shared__ double sh[32];
    const float *xr = x + (long)blockIdx.x * ld;
    float *yr = y + (long)blockIdx.x * ld;
    double ss = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += (double)xr[i] * xr[i];
    ss = cu_block_sum(ss, sh); /* also a barrier: every read of x is done before y (may alias) is written */
    float inv = 1.0f / sqrtf((float)(ss / dim) + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = w ? w[i] * (xr[i] * inv) : xr[i] * inv;
}

int cu_rmsnorm_rows(const kctx *k, float *y, const float *x, const float *w, int rows, int dim, int ld, float eps,
                    mill_err *e) {
    if (rows <= 0 || dim <= 0) return 0;
    rmsnorm_fwd_kernel<<<rows, dim >= 1024 ? 1024 : 256, 0, cu_stream(k)>>>(y, x, w, dim, ld ? ld : dim, eps);
    LAUNCH_CHECK("rmsnorm_fwd_kernel");
    return 0;
}

int cuda_op_rmsnorm(const kctx *k, float *y, const float *x, const float *w, int rows, int dim, int ld, float eps,
                    mill_err *e) {
    return cu_rmsnorm_rows(k, y, x, w, rows, dim, ld, eps, e);
}

/* dx += inv g - x inv^3 (g.x)/dim with g = w*dy; the row's inv goes to inv_out for dw. */
__global__ void rmsnorm_bwd_kernel(float *dx, float *inv_out, const float *dy, const float *x, const float *w,
                                   int dim, int ld, float eps) {
    __shared__ double sh[32];
    long off = (long)blockIdx.x * ld;
    const float *xr = x + off, *gr = dy + off;
    float *dxr = dx + off;
    double ss = 0.0, dot = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        ss += (double)xr[i] * xr[i];
        dot += (double)(w ? w[i] * gr[i] : gr[i]) * xr[i];
    }
    ss = cu_block_sum(ss, sh);
    dot = cu_block_sum(dot, sh);
    float inv = 1.0f / sqrtf((float)(ss / dim) + eps);
    float c = (float)(dot / dim) * inv * inv * inv;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float g = w ? w[i] * gr[i] : gr[i];
        dxr[i] += inv * g - xr[i] * c;
    }
    if (inv_out && threadIdx.x == 0) inv_out[blockIdx.x] = inv;
}

/* ---- Column sums in two fixed-order stages (no float atomics): rows are cut into chunks of
 * `per` rows, one thread per (column, chunk) sums its chunk into part[chunk, col], then one thread per
 * column adds the chunk partials in chunk order. Enough chunks to fill the GPU even when there
 * are few columns (the RMSNorm weight gradient over 8192 rows used to be one serial loop per column). */
static int colsum_chunks(long rows, int *per) {
    long p = (rows + 255) / 256;
    if (p < 32) p = 32;
    *per = (int)p;
    return (int)((rows + p - 1) / p);
}

/* dst0[i] += sum_c part[c, i] for i < n0, dst1[i - n0] likewise after (dst1 may be NULL if cols == n0). */
__global__ void colsum_final_kernel(float *dst0, int n0, float *dst1, const float *part, int chunks, int cols) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= cols) return;
    float *dst = i < n0 ? dst0 + i : dst1 + (i - n0);
    float acc = 0.f;
    for (int c = 0; c < chunks; c++) acc += part[(long)c * cols + i];
    *dst += acc;
}

__global__ void colsum_part_kernel(float *part, const float *in, long rows, int cols, int per) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= cols) return;
    long r0 = (long)blockIdx.y * per, r1 = r0 + per < rows ? r0 + per : rows;
    float acc = 0.f;
    for (long r = r0; r < r1; r++) acc += in[r * cols + i];
    part[(long)blockIdx.y * cols + i] = acc;
}

int cu_colsum_add(const kctx *k, float *dst0, int n0, float *dst1, const float *in, long rows, int cols,
                  mill_err *e) {
    if (rows <= 0 || cols <= 0) return 0;
    int per, chunks = colsum_chunks(rows, &per);
    float *part = NULL;
    TRY(cu_scratch((void **)&part, sizeof(float) * (size_t)chunks * cols, k, e));
    colsum_part_kernel<<<dim3(cu_blocks(cols, 128), chunks), 128, 0, cu_stream(k)>>>(part, in, rows, cols, per);
    cudaError_t le = cudaGetLastError();
    if (le == cudaSuccess) {
        colsum_final_kernel<<<cu_blocks(cols, 128), 128, 0, cu_stream(k)>>>(dst0, n0, dst1, part, chunks, cols);
        le = cudaGetLastError();
    }
    cu_scratch_free(part, k);
    if (le != cudaSuccess) return mill_errf(e, "cu_colsum_add: launch failed: %s", cudaGetErrorString(le));
    return 0;
}

/* RMSNorm's dw, first stage: part[chunk, i] = sum over the chunk's rows of dy x inv (rows in order). */
__global__ void rmsnorm_dw_part_kernel(float *part, const float *dy, const float *x, const float *inv, int rows,
                                       int dim, int ld, int per) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= dim) return;
    int r0 = blockIdx.y * per, r1 = r0 + per < rows ? r0 + per : rows;
    float acc = 0.f;
    for (int r = r0; r < r1; r++) acc += dy[(long)r * ld + i] * x[(long)r * ld + i] * inv[r];
    part[(long)blockIdx.y * dim + i] = acc;
}

int cuda_op_rmsnorm_backward(const kctx *k, float *dx, float *dw, const float *dy, const float *x, const float *w,
                             int rows, int dim, int ld, float eps, mill_err *e) {
    if (rows <= 0 || dim <= 0) return 0;
    if (!ld) ld = dim;
    float *inv = NULL, *part = NULL;
    int per = 0, chunks = dw ? colsum_chunks(rows, &per) : 0;
    /* scratch: the rows' inv [rows], then the dw partials [chunks, dim] */
    if (dw) TRY(cu_scratch((void **)&inv, sizeof(float) * ((size_t)rows + (size_t)chunks * dim), k, e));
    part = inv ? inv + rows : NULL;
    rmsnorm_bwd_kernel<<<rows, dim >= 1024 ? 1024 : 256, 0, cu_stream(k)>>>(dx, inv, dy, x, w, dim, ld, eps);
    cudaError_t le = cudaGetLastError();
    if (le == cudaSuccess && dw) {
        rmsnorm_dw_part_kernel<<<dim3(cu_blocks(dim, 128), chunks), 128, 0, cu_stream(k)>>>(part, dy, x, inv, rows,
                                                                                          dim, ld, per);
        le = cudaGetLastError();
    }
    if (le == cudaSuccess && dw) {
        colsum_final_kernel<<<cu_blocks(dim, 128), 128, 0, cu_stream(k)>>>(dw, dim, NULL, part, chunks, dim);
        le = cudaGetLastError();
    }
    cu_scratch_free(inv, k);
    if (le != cudaSuccess) return mill_errf(e, "op_rmsnorm_backward: launch failed: %s", cudaGetErrorString(le));
    return 0;
}

/* ---- Embedding. A bad id records its position (the lowest, like the CPU's first) and is skipped;
 * deferred (dc), it is recorded with its id for kctx_defer_checks(k, 0) to report. */
__global__ void embedding_kernel(float *out, const float *table, const int32_t *ids, int n, int dim, int vocab,
                                 int v0, int v1, int *bad, cu_check *dc) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)n * dim) return;
    int t = (int)(i / dim), c = (int)(i % dim);
    int id = ids[t];
    if (id < 0 || id >= vocab) {
        if (c == 0 && dc) cu_check_record(dc, t, id, vocab);
        else if (c == 0) atomicMin(bad, t);
        return;
    }
    out[i] = id >= v0 && id < v1 ? table[(long)(id - v0) * dim + c] : 0.0f; /* another rank's slice: 0 */
}

int cuda_op_embedding_part(const kctx *k, float *out, const float *table, const int32_t *ids, int n, int dim,
                           int vocab, int v0, int v1, mill_err *e) {
    if (n <= 0) return 0;
    cu_check *dc = cu_deferred(k, CU_CHECK_EMBEDDING);
    if (dc) { /* no wait: reported when deferral ends */
        embedding_kernel<<<cu_blocks((long)n * dim, 256), 256, 0, cu_stream(k)>>>(out, table, ids, n, dim, vocab, v0,
                                                                                 v1, NULL, dc);
        LAUNCH_CHECK("embedding_kernel");
        return 0;
    }
    int *bad = NULL, hbad[2] = {n, 0};
    TRY(cu_scratch((void **)&bad, sizeof(int) * 2, k, e));
    int rc = 0;
    if (cudaMemcpyAsync(bad, hbad, sizeof(int), cudaMemcpyHostToDevice, cu_stream(k)) != cudaSuccess)
        rc = mill_errf(e, "op_embedding: copy failed");
    if (!rc) {
        embedding_kernel<<<cu_blocks((long)n * dim, 256), 256, 0, cu_stream(k)>>>(out, table, ids, n, dim, vocab, v0,
                                                                                 v1, bad, NULL);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "op_embedding: launch failed: %s", cudaGetErrorString(le));
    }
    if (!rc) rc = cu_copy_to_host_sync(hbad, bad, sizeof(int), k, e);
    if (!rc && hbad[0] < n) rc = cu_copy_to_host_sync(&hbad[1], ids + hbad[0], sizeof(int), k, e);
    cu_scratch_free(bad, k);
    if (rc) return rc;
    if (hbad[0] < n)
        return mill_errf(e, "token id %d at position %d is outside the vocabulary [0, %d)", hbad[1], hbad[0], vocab);
    return 0;
}

/* Rows of one id collide: float atomics (gradient sums need not be bitwise reproducible). */
__global__ void embedding_bwd_kernel(float *dtable, const float *dout, const int32_t *ids, int n, int dim, int v0,
                                     int v1) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)n * dim) return;
    int t = (int)(i / dim), c = (int)(i % dim);
    if (ids[t] >= v0 && ids[t] < v1) atomicAdd(dtable + (long)(ids[t] - v0) * dim + c, dout[i]);
}

int cuda_op_embedding_part_backward(const kctx *k, float *dtable, const float *dout, const int32_t *ids, int n,
                                    int dim, int v0, int v1, mill_err *e) {
    if (n <= 0 || dim <= 0) return 0;
    embedding_bwd_kernel<<<cu_blocks((long)n * dim, 256), 256, 0, cu_stream(k)>>>(dtable, dout, ids, n, dim, v0, v1);
    LAUNCH_CHECK("embedding_bwd_kernel");
    return 0;
}

/* ---- Clamped SwiGLU */
__global__ void swiglu_kernel(float *h, const float *g, const float *u, long n, float limit) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float a = g[i] < limit ? g[i] : limit;
    float b = u[i] < -limit ? -limit : (u[i] > limit ? limit : u[i]);
    h[i] = a / (1.0f + expf(-a)) * b;
}

int cuda_op_swiglu_clamp(const kctx *k, float *h, const float *g, const float *u, long n, float limit, mill_err *e) {
    if (n <= 0) return 0;
    swiglu_kernel<<<cu_blocks(n, 256), 256, 0, cu_stream(k)>>>(h, g, u, n, limit);
    LAUNCH_CHECK("swiglu_kernel");
    return 0;
}

/* accumulate 0 writes the gradients (the grouped experts' scratch), 1 adds (the op's contract). */
__global__ void swiglu_bwd_kernel(float *dg, float *du, const float *dh, const float *g, const float *u, long n,
                                  float limit, int accumulate) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    /* torch's clamp passes the gradient where the input lies within [min, max] */
    int g_in = g[i] <= limit, u_in = u[i] >= -limit && u[i] <= limit;
    float a = g_in ? g[i] : limit;
    float b = u_in ? u[i] : (u[i] < 0 ? -limit : limit);
    float sg = 1.0f / (1.0f + expf(-a)), silu = a * sg;
    float vg = g_in ? dh[i] * b * (sg * (1.0f + a * (1.0f - sg))) : 0.0f;
    float vu = u_in ? dh[i] * silu : 0.0f;
    dg[i] = accumulate ? dg[i] + vg : vg;
    du[i] = accumulate ? du[i] + vu : vu;
}

int cuda_op_swiglu_clamp_backward(const kctx *k, float *dg, float *du, const float *dh, const float *g,
                                  const float *u, long n, float limit, mill_err *e) {
    if (n <= 0) return 0;
    swiglu_bwd_kernel<<<cu_blocks(n, 256), 256, 0, cu_stream(k)>>>(dg, du, dh, g, u, n, limit, 1);
    LAUNCH_CHECK("swiglu_bwd_kernel");
    return 0;
}

int cu_swiglu_backward_write(const kctx *k, float *dg, float *du, const float *dh, const float *g, const float *u,
                             long n, float limit, mill_err *e) {
    if (n <= 0) return 0;
    swiglu_bwd_kernel<<<cu_blocks(n, 256), 256, 0, cu_stream(k)>>>(dg, du, dh, g, u, n, limit, 0);
    LAUNCH_CHECK("swiglu_bwd_kernel");
    return 0;
}

/* ---- Cross-entropy: one block per row. Each row's loss lands in its own slot; one block then sums
 * the slots in a fixed order, so the total is reproducible (no float atomics on the loss). */
__global__ void ce_row_kernel(float *dlogits, double *row_loss, int *row_cnt, int *bad, const float *logits,
                              const int32_t *targets, int vocab, float grad_scale) {
    __shared__ float shf[32];
    __shared__ double shd[32];
    long t = blockIdx.x;
    const float *l = logits + t * vocab;
    float *d = dlogits ? dlogits + t * vocab : NULL;
    int y = targets[t];
    if (y < 0 || y >= vocab) {
        if (y >= vocab && threadIdx.x == 0) atomicMin(bad, (int)t);
        if (d)
            for (int v = threadIdx.x; v < vocab; v += blockDim.x) d[v] = 0.0f;
        if (threadIdx.x == 0) {
            row_loss[t] = 0.0;
            row_cnt[t] = 0;
        }
        return;
    }
    float ly = l[y]; /* read before any thread writes d (d may alias logits) */
    float mx = -INFINITY;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) mx = fmaxf(mx, l[v]);
    mx = cu_block_max(mx, shf);
    double den = 0.0;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) den += exp((double)(l[v] - mx));
    den = cu_block_sum(den, shd);
    double lse = log(den) + mx;
    if (threadIdx.x == 0) {
        row_loss[t] = lse - ly;
        row_cnt[t] = 1;
    }
    if (d)
        for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
            float p = __fmul_rn((float)exp((double)l[v] - lse), grad_scale);
            d[v] = v == y ? p - grad_scale : p;
        }
}

__global__ void ce_total_kernel(double *out_loss, long long *out_cnt, const double *row_loss, const int *row_cnt,
                                int n) {
    __shared__ double sh[32];
    __shared__ long long shc[32];
    double s = 0.0;
    long long c = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        s += row_loss[i];
        c += row_cnt[i];
    }
    s = cu_block_sum(s, sh);
    c = cu_block_sum(c, shc);
    if (threadIdx.x == 0) {
        *out_loss = s;
        *out_cnt = c;
    }
}

int cuda_op_cross_entropy(const kctx *k, float *dlogits, double *loss_sum, long *count, const float *logits,
                          const int32_t *targets, int n, int vocab, float grad_scale, mill_err *e) {
    *loss_sum = 0.0;
    *count = 0;
    if (n <= 0) return 0;
    /* scratch: [0] loss (double), [1] count (long long), then row losses, row counts, the bad flag */
    char *buf = NULL;
    size_t sz = 16 + sizeof(double) * (size_t)n + sizeof(int) * (size_t)n + sizeof(int);
    TRY(cu_scratch((void **)&buf, sz, k, e));
    double *tot = (double *)buf, *row_loss = tot + 2;
    long long *cnt = (long long *)(buf + 8);
    int *row_cnt = (int *)(row_loss + n), *bad = row_cnt + n;
    struct {
        double loss;
        long long cnt;
    } res = {0.0, 0};
    int hbad = n, rc = 0;
    if (cudaMemcpyAsync(bad, &hbad, sizeof(int), cudaMemcpyHostToDevice, cu_stream(k)) != cudaSuccess)
        rc = mill_errf(e, "op_cross_entropy: copy failed");
    if (!rc) {
        ce_row_kernel<<<n, 1024, 0, cu_stream(k)>>>(dlogits, row_loss, row_cnt, bad, logits, targets, vocab,
                                                    grad_scale);
        ce_total_kernel<<<1, 1024, 0, cu_stream(k)>>>(tot, cnt, row_loss, row_cnt, n);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "op_cross_entropy: launch failed: %s", cudaGetErrorString(le));
    }
    if (!rc) rc = cu_copy_to_host_sync(&res, buf, 16, k, e);
    if (!rc) rc = cu_copy_to_host_sync(&hbad, bad, sizeof(int), k, e);
    int ybad = 0;
    if (!rc && hbad < n) rc = cu_copy_to_host_sync(&ybad, targets + hbad, sizeof(int), k, e);
    cu_scratch_free(buf, k);
    if (rc) return rc;
    if (hbad < n) return mill_errf(e, "cross entropy: target %d at row %d is outside [0, %d)", ybad, hbad, vocab);
    *loss_sum = res.loss;
    *count = (long)res.cnt;
    return 0;
}

/* ---- Token head. Pass 1 (one block): each counted row's slot = how many counted rows precede it
 * (per-thread chunk counts, then a serial prefix over the 1024 chunk sums), the rows list, the
 * total, and the first target >= vocab. Pass 2: one block per counted row, as the CPU loop. */
__global__ void token_slots_kernel(int32_t *slot, int32_t *rows, int *total, int *bad, const int32_t *targets, int n,
                                   int vocab) {
    __shared__ int part[1024];
    int tid = threadIdx.x, per = (n + blockDim.x - 1) / blockDim.x;
    int t0 = tid * per, t1 = min(n, t0 + per), c = 0;
    for (int t = t0; t < t1; t++) c += targets[t] >= 0;
    part[tid] = c;
    __syncthreads();
    if (tid == 0) {
        int s = 0;
        for (int i = 0; i < (int)blockDim.x; i++) {
            int v = part[i];
            part[i] = s;
            s += v;
        }
        *total = s;
    }
    __syncthreads();
    int s = part[tid];
    for (int t = t0; t < t1; t++) {
        int y = targets[t];
        if (y >= vocab) atomicMin(bad, t);
        slot[t] = y >= 0 ? s : -1;
        if (y >= 0) rows[s++] = t;
    }
}

/* One block per row with a target in [0, vocab): the slice's three numbers, as the CPU loop. */
__global__ void token_logp_part_kernel(const float *logits, double *part, const int32_t *targets, int vl, int v0,
                                       int vocab, float temperature) {
    __shared__ float shf[32];
    __shared__ double shd[32];
    long t = blockIdx.x;
    int y = targets[t];
    if (y < 0 || y >= vocab) return; /* uniform over the block */
    const float *l = logits + t * vl;
    float mx = -INFINITY;
    for (int v = threadIdx.x; v < vl; v += blockDim.x) mx = fmaxf(mx, l[v] / temperature);
    mx = cu_block_max(mx, shf);
    double den = 0.0;
    for (int v = threadIdx.x; v < vl; v += blockDim.x) den += exp((double)(l[v] / temperature - mx));
    den = cu_block_sum(den, shd);
    double lse = log(den) + mx, pz = 0.0;
    for (int v = threadIdx.x; v < vl; v += blockDim.x) {
        double z = (double)(l[v] / temperature);
        pz += exp(z - lse) * z;
    }
    pz = cu_block_sum(pz, shd);
    if (threadIdx.x == 0) {
        part[3 * t] = lse;
        part[3 * t + 1] = pz;
        part[3 * t + 2] = y >= v0 && y < v0 + vl ? (double)(l[y - v0] / temperature) : 0.0;
    }
}

int cuda_op_token_logp_part(const kctx *k, const float *logits, double *part, const int32_t *targets, int n, int vl,
                            int v0, int vocab, float temperature, mill_err *e) {
    if (n <= 0) return 0;
    token_logp_part_kernel<<<n, 1024, 0, cu_stream(k)>>>(logits, part, targets, vl, v0, vocab, temperature);
    LAUNCH_CHECK("token_logp_part_kernel");
    return 0;
}

/* One block per counted row: the slices joined (every thread alike), then the row's probabilities. */
__global__ void token_logp_kernel(float *logits, float *logp, float *ent, const int32_t *slot, const double *parts,
                                  int n_parts, int n, const int32_t *targets, int vl, int vocab, float temperature) {
    long t = blockIdx.x;
    int s = slot[t], y = targets[t];
    if (s < 0 || y >= vocab) return; /* uniform over the block */
    double lse, pz, zy;
    token_logp_combine(parts, n_parts, n, (int)t, &lse, &pz, &zy);
    float *l = logits + t * vl;
    for (int v = threadIdx.x; v < vl; v += blockDim.x) l[v] = (float)exp((double)(l[v] / temperature) - lse);
    if (threadIdx.x == 0) {
        logp[s] = (float)(zy - lse);
        ent[s] = (float)(lse - pz);
    }
}

int cuda_op_token_logp(const kctx *k, float *logits, float *logp, float *ent, int32_t *rows, long *count,
                       const double *parts, int n_parts, const int32_t *targets, int n, int vl, int vocab,
                       float temperature, mill_err *e) {
    *count = 0;
    if (n <= 0) return 0;
    /* scratch: [0] total, [1] bad row, then slot[n] */
    int *buf = NULL, h[2] = {0, n}, ybad = 0;
    TRY(cu_scratch((void **)&buf, sizeof(int) * (2 + (size_t)n), k, e));
    int rc = 0;
    if (cudaMemcpyAsync(buf, h, sizeof h, cudaMemcpyHostToDevice, cu_stream(k)) != cudaSuccess)
        rc = mill_errf(e, "op_token_logp: copy failed");
    if (!rc) {
        token_slots_kernel<<<1, 1024, 0, cu_stream(k)>>>(buf + 2, rows, buf, buf + 1, targets, n, vocab);
        token_logp_kernel<<<n, 1024, 0, cu_stream(k)>>>(logits, logp, ent, buf + 2, parts, n_parts, n, targets, vl,
                                                        vocab, temperature);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "op_token_logp: launch failed: %s", cudaGetErrorString(le));
    }
    if (!rc) rc = cu_copy_to_host_sync(h, buf, sizeof h, k, e);
    if (!rc && h[1] < n) rc = cu_copy_to_host_sync(&ybad, targets + h[1], sizeof(int), k, e);
    cu_scratch_free(buf, k);
    if (rc) return rc;
    if (h[1] < n) return mill_errf(e, "loss: target %d at position %d is outside [0, %d)", ybad, h[1], vocab);
    *count = h[0];
    return 0;
}

/* One block per row; a row finds its slot by binary search in the sorted rows list. */
__global__ void token_logp_bwd_kernel(float *probs, const int32_t *rows, long count, const float *dlogp,
                                      const float *dent, const float *ent, const int32_t *targets, int vl, int v0,
                                      float temperature) {
    long t = blockIdx.x;
    float *row = probs + t * vl;
    long lo = 0, hi = count;
    while (lo < hi) {
        long mid = (lo + hi) / 2;
        if (rows[mid] < t) lo = mid + 1;
        else hi = mid;
    }
    if (lo >= count || rows[lo] != t) {
        for (int v = threadIdx.x; v < vl; v += blockDim.x) row[v] = 0.0f;
        return;
    }
    float g = dlogp[lo] / temperature, gh = dent[lo] / temperature, H = ent[lo];
    for (int v = threadIdx.x; v < vl; v += blockDim.x) {
        float p = row[v];
        row[v] = -g * p - (gh != 0.0f && p > 0.0f ? gh * p * (logf(p) + H) : 0.0f);
    }
    __syncthreads();
    if (threadIdx.x == 0 && targets[t] >= v0 && targets[t] < v0 + vl) row[targets[t] - v0] += g;
}

int cuda_op_token_logp_backward(const kctx *k, float *probs, const int32_t *rows, long count, const float *dlogp,
                                const float *dent, const float *ent, const int32_t *targets, int n, int vl, int v0,
                                float temperature, mill_err *e) {
    if (n <= 0) return 0;
    token_logp_bwd_kernel<<<n, 256, 0, cu_stream(k)>>>(probs, rows, count, dlogp, dent, ent, targets, vl, v0,
                                                       temperature);
    LAUNCH_CHECK("token_logp_bwd_kernel");
    return 0;
}

/* ---- Memory ops, all ordered on kctx.stream. */
/* The writes below refresh any bf16 shadow they land in (kctx_shadow_add). */
int cuda_op_copy(const kctx *k, void *dst, const void *src, size_t bytes, mill_err *e) {
    if (bytes) CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cu_stream(k)));
    return cu_shadow_refresh(k, dst, bytes, e);
}

int cuda_op_copy_2d(const kctx *k, void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, long rows,
                    mill_err *e) {
    if (!width || rows <= 0) return 0;
    CU_CHECK(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, (size_t)rows, cudaMemcpyDeviceToDevice, cu_stream(k)));
    return cu_shadow_refresh(k, dst, dpitch * (size_t)(rows - 1) + width, e);
}

int cuda_op_zero(const kctx *k, void *x, size_t bytes, mill_err *e) {
    if (bytes) CU_CHECK(cudaMemsetAsync(x, 0, bytes, cu_stream(k)));
    return cu_shadow_refresh(k, x, bytes, e);
}

/* From pageable memory the call returns once the source is staged, so the caller may free it. */
int cuda_op_copy_from_host(const kctx *k, void *dst, const void *host_src, size_t bytes, mill_err *e) {
    if (bytes) CU_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, cu_stream(k)));
    return cu_shadow_refresh(k, dst, bytes, e);
}

int cuda_op_copy_to_host(const kctx *k, void *host_dst, const void *src, size_t bytes, mill_err *e) {
    return bytes ? cu_copy_to_host_sync(host_dst, src, bytes, k, e) : 0;
}

int cuda_op_copy_to_host_async(const kctx *k, void *host_dst, const void *src, size_t bytes, mill_err *e) {
    if (bytes) CU_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, cu_stream(k)));
    return 0;
}

__global__ void repeat_rows_kernel(float *dst, const float *src, int rows, int reps, int dim) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * reps * dim) return;
    long r = i / ((long)reps * dim);
    dst[i] = src[r * dim + i % dim];
}

/* f32_to_bf16's bit manipulation (not __float2bfloat16_rn, whose NaN differs): CPU and GPU agree. */
__global__ void to_bf16_kernel(uint16_t *dst, const float *src, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint32_t u = __float_as_uint(src[i]);
    dst[i] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__global__ void from_bf16_kernel(float *dst, const uint16_t *src, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __uint_as_float((uint32_t)src[i] << 16);
}

int cuda_op_to_bf16(const kctx *k, uint16_t *dst, const float *src, size_t n, mill_err *e) {
    if (!n) return 0;
    to_bf16_kernel<<<cu_blocks((long)n, 256), 256, 0, cu_stream(k)>>>(dst, src, (long)n);
    LAUNCH_CHECK("to_bf16_kernel");
    return 0;
}

int cuda_op_from_bf16(const kctx *k, float *dst, const uint16_t *src, size_t n, mill_err *e) {
    if (!n) return 0;
    from_bf16_kernel<<<cu_blocks((long)n, 256), 256, 0, cu_stream(k)>>>(dst, src, (long)n);
    LAUNCH_CHECK("from_bf16_kernel");
    return 0;
}

int cuda_op_repeat_rows(const kctx *k, float *dst, const float *src, int rows, int reps, int dim, mill_err *e) {
    long n = (long)rows * reps * dim;
    if (n <= 0) return 0;
    repeat_rows_kernel<<<cu_blocks(n, 256), 256, 0, cu_stream(k)>>>(dst, src, rows, reps, dim);
    LAUNCH_CHECK("repeat_rows_kernel");
    return 0;
}

/* Same order as the CPU (j = 0, 1, ...): bit-identical sums. */
__global__ void repeat_rows_bwd_kernel(float *dsrc, const float *ddst, int rows, int reps, int dim) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * dim) return;
    long r = i / dim, c = i % dim;
    float s = dsrc[i];
    for (int j = 0; j < reps; j++) s += ddst[(r * reps + j) * dim + c];
    dsrc[i] = s;
}

int cuda_op_repeat_rows_backward(const kctx *k, float *dsrc, const float *ddst, int rows, int reps, int dim,
                                 mill_err *e) {
    long n = (long)rows * dim;
    if (n <= 0 || reps <= 0) return 0;
    repeat_rows_bwd_kernel<<<cu_blocks(n, 256), 256, 0, cu_stream(k)>>>(dsrc, ddst, rows, reps, dim);
    LAUNCH_CHECK("repeat_rows_bwd_kernel");
    return 0;
}

/* A bad id records its position (the lowest, like the CPU's first) and is skipped. */
__global__ void gather_i32_kernel(int32_t *out, const int32_t *table, const int32_t *ids, int n, int width, int rows,
                                  int *bad, cu_check *dc) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)n * width) return;
    int t = (int)(i / width), c = (int)(i % width), id = ids[t];
    if (id < 0 || id >= rows) {
        if (c == 0 && dc) cu_check_record(dc, t, id, rows);
        else if (c == 0) atomicMin(bad, t);
        return;
    }
    out[i] = table[(long)id * width + c];
}

int cuda_op_gather_i32(const kctx *k, int32_t *out, const int32_t *table, const int32_t *ids, int n, int width,
                       int rows, mill_err *e) {
    if (n <= 0 || width <= 0) return 0;
    cu_check *dc = cu_deferred(k, CU_CHECK_GATHER);
    if (dc) {
        gather_i32_kernel<<<cu_blocks((long)n * width, 256), 256, 0, cu_stream(k)>>>(out, table, ids, n, width, rows,
                                                                                   NULL, dc);
        LAUNCH_CHECK("gather_i32_kernel");
        return 0;
    }
    int *bad = NULL, h[2] = {n, 0};
    TRY(cu_scratch((void **)&bad, sizeof(int), k, e));
    int rc = 0;
    if (cudaMemcpyAsync(bad, h, sizeof(int), cudaMemcpyHostToDevice, cu_stream(k)) != cudaSuccess)
        rc = mill_errf(e, "op_gather_i32: copy failed");
    if (!rc) {
        gather_i32_kernel<<<cu_blocks((long)n * width, 256), 256, 0, cu_stream(k)>>>(out, table, ids, n, width, rows,
                                                                                   bad, NULL);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "op_gather_i32: launch failed: %s", cudaGetErrorString(le));
    }
    if (!rc) rc = cu_copy_to_host_sync(h, bad, sizeof(int), k, e);
    if (!rc && h[0] < n) rc = cu_copy_to_host_sync(&h[1], ids + h[0], sizeof(int), k, e);
    cu_scratch_free(bad, k);
    if (rc) return rc;
    if (h[0] < n) return mill_errf(e, "id %d at position %d is outside the table's rows [0, %d)", h[1], h[0], rows);
    return 0;
}
