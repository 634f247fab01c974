/* kernels/cuda/moe.cu — CUDA paths of kernels/moe.h.
 * Routing: one thread per token (scores, top-k with ties to the lower expert id, weights). The
 * scores' exp/log1p round through double so they land on the correctly rounded float the CPU's libm
 * gives: selection compares scores, and a one-ulp difference could flip a near tie.
 * Experts: a device-side stable counting sort groups the N*K (token, slot) rows by expert (a warp
 * per chunk of rows: per-chunk counts, one scan block, then ranks within each chunk; each expert's
 * rows in token order, exactly the CPU's grouping); the expert starts come back to the host once
 * (the grid's row extent, and the cuBLAS fallback's group shapes). Every expert GEMM runs as ONE
 * launch of our own grouped tensor-core kernels (128 x 128 tiles of wmma bf16 fragments, fp32
 * accumulation, a 3-deep cp.async ring, each expert's rows read from the device offsets, fixed
 * summation order): moe_wmma_kernel for the products over token rows (GEMM_NT: the forward's
 * x w^T; GEMM_NN: the backward's dy w), moe_wmma_tn_kernel for the weight gradients (GEMM_TN:
 * dw += dy^T act, the reduction over each expert's rows inside one block). The rest (shapes the
 * kernels do not take, kctx.moe_cublas / MILL_MOE_GEMM=cublas) is tried as ONE
 * cublasGemmGroupedBatchedEx call with one group per non-empty expert, on bf16 copies of the
 * operands (bf16 tensor cores, fp32 accumulation and output), falling back to one cublasGemmEx per
 * expert with the same types when the library refuses. cuBLAS 13.0 (H100, 2026-11) refuses grouped
 * bf16 x bf16 -> fp32 (it takes bf16 -> bf16 and fp32 -> fp32 plain or TF32, see
 * cuda_moe_grouped_gemm_types), so the per-expert path runs there: E launches per projection, each
 * a bf16 tensor-core GEMM (measured at 3-20 TFLOP/s for the NT/NN shapes of dsv4-small on an H100;
 * its TN ones took ~1.6 ms per projection, 32 expert calls, on an H200 under MILL_PROFILE: ~57 ms of
 * a ~295 ms training step; which is why they moved).
 * Grouped operands that several GEMMs read are rounded to bf16 once per op (the gather and the dy
 * kernel write their bf16 copies as they go). The gather, the weighted combine and dx are one block
 * per row; the combine sums each token's K slots in slot order: no atomics. */
#include "cuda_internal.cuh"

#include <cuda_bf16.h>
#include <math.h>
#include "../shared_math.h"
#include <stdio.h>
#include <stdlib.h>

__device__ __forceinline__ float moe_expf(float x) { return (float)exp((double)x); }

__device__ __forceinline__ float moe_score_fn(float x, dsv4_score_func f) {
    if (f == SCORE_SIGMOID) return 1.0f / (1.0f + moe_expf(-x));
    float sp = x > 20.0f ? x : (float)log1p((double)moe_expf(x)); /* torch's softplus threshold */
    return sqrtf(sp);
}

__global__ void moe_route_kernel(float *scores, int32_t *ids, float *weights, const float *logits, const float *bias,
                                 const int32_t *given_ids, int N, moe_route_cfg rc, int *bad, cu_check *dc) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    int E = rc.E, K = rc.K;
    const float *l = logits + (long)t * E;
    float *s = scores + (long)t * E;
    if (rc.score_func == SCORE_SOFTMAX) {
        float mx = l[0], den = 0.f;
        for (int x = 1; x < E; x++) mx = l[x] > mx ? l[x] : mx;
        for (int x = 0; x < E; x++) den += (s[x] = moe_expf(l[x] - mx));
        for (int x = 0; x < E; x++) s[x] /= den;
    } else {
        for (int x = 0; x < E; x++) s[x] = moe_score_fn(l[x], rc.score_func);
    }
    int32_t *id = ids + (long)t * K;
    if (given_ids) {
        for (int j = 0; j < K; j++) {
            int32_t g = given_ids[(long)t * K + j];
            if (g < 0 || g >= E) {
                if (dc) cu_check_record(dc, t, g, E);
                else atomicMin(bad, t);
                g = 0; /* keeps the weights below in range; the op reports the error */
            }
            id[j] = g;
        }
    } else {
        route_topk(s, bias, E, K, id);
    }
    route_weights(s, id, K, rc.norm_topk, rc.routed_scale, weights + (long)t * K);
}

int cuda_op_moe_route(const kctx *k, float *scores, int32_t *ids, float *weights, const float *logits,
                      const float *bias, const int32_t *given_ids, int N, moe_route_cfg rc, mill_err *e) {
    if (N <= 0) return 0;
    cu_check *dc = given_ids ? cu_deferred(k, CU_CHECK_ROUTE) : NULL;
    if (!given_ids || dc) { /* selection makes no bad ids; deferred, given ones are reported when deferral ends */
        moe_route_kernel<<<cu_blocks(N, 128), 128, 0, cu_stream(k)>>>(scores, ids, weights, logits, bias, given_ids, N,
                                                                      rc, NULL, dc);
        LAUNCH_CHECK("moe_route_kernel");
        return 0;
    }
    int *bad = NULL, hbad = N, rc_ = 0;
    TRY(cu_scratch((void **)&bad, sizeof(int), k, e));
    if (cudaMemcpyAsync(bad, &hbad, sizeof(int), cudaMemcpyHostToDevice, cu_stream(k)) != cudaSuccess)
        rc_ = mill_errf(e, "op_moe_route: copy failed");
    if (!rc_) {
        moe_route_kernel<<<cu_blocks(N, 128), 128, 0, cu_stream(k)>>>(scores, ids, weights, logits, bias, given_ids, N,
                                                                      rc, bad, NULL);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc_ = mill_errf(e, "moe_route_kernel: launch failed: %s", cudaGetErrorString(le));
    }
    if (!rc_) rc_ = cu_copy_to_host_sync(&hbad, bad, sizeof(int), k, e);
    int32_t row[64];
    int nrow = rc.K < 64 ? rc.K : 64;
    if (!rc_ && hbad < N)
        rc_ = cu_copy_to_host_sync(row, given_ids + (long)hbad * rc.K, sizeof(int32_t) * (size_t)nrow, k, e);
    cu_scratch_free(bad, k);
    if (rc_) return rc_;
    if (hbad < N)
        for (int j = 0; j < nrow; j++)
            if (row[j] < 0 || row[j] >= rc.E)
                return mill_errf(e, "routing: expert id %d for token %d is outside [0, %d)", row[j], hbad, rc.E);
    return 0;
}

__device__ __forceinline__ float moe_score_grad(float l, float s, dsv4_score_func f) {
    if (f == SCORE_SIGMOID) return s * (1.0f - s);
    float sp_grad = l > 20.0f ? 1.0f : 1.0f / (1.0f + expf(-l));
    return s > 0.f ? sp_grad / (2.0f * s) : 0.f;
}

/* One token per thread. ds[x] (the gradient of expert x's score) is rebuilt on the fly from the K
 * slots naming x, in slot order as the CPU adds them, so no per-token array of E is needed. */
__global__ void moe_route_bwd_kernel(float *dlogits, const float *dweights, const float *scores, const float *logits,
                                     const int32_t *ids, int N, moe_route_cfg rc) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    int E = rc.E, K = rc.K;
    const float *s = scores + (long)t * E, *l = logits + (long)t * E, *dw = dweights + (long)t * K;
    const int32_t *id = ids + (long)t * K;
    float *dl = dlogits + (long)t * E;
    /* ds of expert x: the sum over slots j with id[j] == x, in slot order */
    float S = 1e-20f, dot = 0.f;
    if (rc.norm_topk) {
        for (int j = 0; j < K; j++) S += s[id[j]];
        for (int j = 0; j < K; j++) dot += dw[j] * s[id[j]];
    }
    float sdot = 0.f; /* softmax: sum_x s[x] ds[x] */
    if (rc.score_func == SCORE_SOFTMAX)
        for (int x = 0; x < E; x++) {
            float ds = 0.f;
            for (int j = 0; j < K; j++)
                if (id[j] == x) ds += rc.norm_topk ? rc.routed_scale * (dw[j] / S - dot / (S * S)) : rc.routed_scale * dw[j];
            sdot += s[x] * ds;
        }
    for (int x = 0; x < E; x++) {
        float ds = 0.f;
        for (int j = 0; j < K; j++)
            if (id[j] == x) ds += rc.norm_topk ? rc.routed_scale * (dw[j] / S - dot / (S * S)) : rc.routed_scale * dw[j];
        if (rc.score_func == SCORE_SOFTMAX)
            dl[x] += s[x] * (ds - sdot);
        else
            dl[x] += ds * moe_score_grad(l[x], s[x], rc.score_func);
    }
}

int cuda_op_moe_route_backward(const kctx *k, float *dlogits, const float *dweights, const float *scores,
                               const float *logits, const int32_t *ids, int N, moe_route_cfg rc, mill_err *e) {
    if (N <= 0) return 0;
    moe_route_bwd_kernel<<<cu_blocks(N, 128), 128, 0, cu_stream(k)>>>(dlogits, dweights, scores, logits, ids, N, rc);
    LAUNCH_CHECK("moe_route_bwd_kernel");
    return 0;
}

/* The weighted sum in slot order per element (the CPU's order: the same bits). */
__global__ void moe_combine_kernel(float *out, const float *y, const float *w, int N, int K, int D) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)N * D) return;
    long t = i / D, c = i % D;
    float s = 0.f;
    for (int j = 0; j < K; j++) s += w[t * K + j] * y[(t * K + j) * D + c];
    out[i] = s;
}

int cuda_op_moe_combine(const kctx *k, float *out, const float *y, const float *weights, int N, int K, int D,
                        mill_err *e) {
    if (N <= 0 || D <= 0) return 0;
    moe_combine_kernel<<<cu_blocks((long)N * D, 256), 256, 0, cu_stream(k)>>>(out, y, weights, N, K, D);
    LAUNCH_CHECK("moe_combine_kernel");
    return 0;
}

/* One warp per (token, slot): dy = w * dout, dweights = dout . y (a warp sum). */
__global__ void moe_combine_bwd_kernel(float *dy, float *dw, const float *dout, const float *y, const float *w, long NK,
                                       int K, int D) {
    long r = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= NK) return;
    const float *g = dout + (r / K) * D, *yr = y + r * D;
    float s = 0.f, wr = w[r];
    for (int c = lane; c < D; c += 32) {
        dy[r * D + c] = wr * g[c];
        s += g[c] * yr[c];
    }
    for (int o = 16; o; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    if (!lane) dw[r] = s;
}

int cuda_op_moe_combine_backward(const kctx *k, float *dy, float *dweights, const float *dout, const float *y,
                                 const float *weights, int N, int K, int D, mill_err *e) {
    long NK = (long)N * K;
    if (NK <= 0) return 0;
    moe_combine_bwd_kernel<<<cu_blocks(NK * 32, 256), 256, 0, cu_stream(k)>>>(dy, dweights, dout, y, weights, NK, K, D);
    LAUNCH_CHECK("moe_combine_bwd_kernel");
    return 0;
}

/* ---- Grouping: a stable counting sort of the N*K (token, slot) rows by expert, all of it parallel.
 * The rows are cut into chunks of `ch` rows (a multiple of 32), one warp per chunk:
 *  1. moe_count_kernel: each warp counts its chunk's rows per expert (shared int atomics: exact) and
 *     records the lowest row with a bad id;
 *  2. moe_scan_kernel (one block): the experts' totals -> their starts offs[E + 1] (a block scan),
 *     then each expert's first slot in every chunk = its start + its rows in the earlier chunks;
 *  3. moe_place_kernel: each warp walks its chunk 32 rows at a time, in order; lanes naming the same
 *     expert (__match_any_sync) take consecutive slots in lane order after the earlier rounds' rows.
 * So an expert's rows keep increasing r, exactly the CPU's grouping. (This replaced one block in
 * which each expert's thread scanned all N*K ids.) */
#define MOE_GROUP_SMEM 49152 /* per block: warps x E ints of counters */

__global__ void moe_count_kernel(int32_t *cnt, int *bad, const int32_t *ids, long NK, int E, int ch, int nchunks) {
    extern __shared__ int moe_hist[];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    long c = (long)blockIdx.x * (blockDim.x >> 5) + w;
    if (c >= nchunks) return; /* the whole warp; no block-wide barrier below */
    int *h = moe_hist + (long)w * E;
    for (int x = lane; x < E; x += 32) h[x] = 0;
    __syncwarp();
    long r0 = c * ch, r1 = r0 + ch < NK ? r0 + ch : NK;
    for (long r = r0 + lane; r < r1; r += 32) {
        int id = ids[r];
        if (id < 0 || id >= E)
            atomicMin(bad, (int)r);
        else
            atomicAdd(&h[id], 1);
    }
    __syncwarp();
    for (int x = lane; x < E; x += 32) cnt[c * E + x] = h[x];
}

/* Inclusive sum over the block (blockDim.x a multiple of 32); sh: 32 ints. */
__device__ __forceinline__ int moe_block_scan(int v, int *sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += y;
    }
    __syncthreads(); /* sh's previous readers are done */
    if (lane == 31) sh[wid] = v;
    __syncthreads();
    for (int i = 0; i < wid; i++) v += sh[i];
    return v;
}

/* cnt [nchunks, E] of counts becomes each (chunk, expert)'s first slot; offs [E + 1] the starts. */
__global__ void moe_scan_kernel(int32_t *offs, int32_t *cnt, int E, int nchunks) {
    __shared__ int sh[32];
    __shared__ int carry;
    if (threadIdx.x == 0) carry = 0;
    __syncthreads();
    for (int x0 = 0; x0 < E; x0 += blockDim.x) { /* the same trip count for every thread */
        int x = x0 + threadIdx.x, tot = 0;
        if (x < E)
            for (int c = 0; c < nchunks; c++) tot += cnt[(long)c * E + x];
        int incl = moe_block_scan(tot, sh), start = carry + incl - tot;
        if (x < E) {
            offs[x] = start;
            for (int c = 0; c < nchunks; c++) {
                int v = cnt[(long)c * E + x];
                cnt[(long)c * E + x] = start;
                start += v;
            }
        }
        __syncthreads(); /* every thread has read carry */
        if (threadIdx.x == blockDim.x - 1) carry += incl;
        __syncthreads();
    }
    if (threadIdx.x == 0) offs[E] = carry;
}

__global__ void moe_place_kernel(int32_t *slot_row, const int32_t *first, const int32_t *ids, long NK, int E, int ch,
                                 int nchunks) {
    extern __shared__ int moe_next[];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    long c = (long)blockIdx.x * (blockDim.x >> 5) + w;
    if (c >= nchunks) return; /* the whole warp */
    int *next = moe_next + (long)w * E;
    for (int x = lane; x < E; x += 32) next[x] = first[c * E + x];
    __syncwarp();
    long r0 = c * ch, r1 = r0 + ch < NK ? r0 + ch : NK;
    for (long rb = r0; rb < r1; rb += 32) { /* warp-uniform: every lane reaches the match */
        long r = rb + lane;
        int id = r < r1 ? ids[r] : -1;
        if (id < 0 || id >= E) id = -1; /* past the end, or bad (the op fails on it): no slot */
        unsigned peers = __match_any_sync(0xffffffffu, id);
        int rank = __popc(peers & ((1u << lane) - 1u));
        if (id >= 0) slot_row[r] = next[id] + rank;
        __syncwarp(); /* all reads of next[] before the leaders move it */
        if (id >= 0 && rank == 0) next[id] += __popc(peers);
        __syncwarp();
    }
}

/* One block per (token, slot) row: its token's x row to grouped row slot_row[r] (and its bf16 copy
 * for the GEMMs when xg16 is set). */
__global__ void moe_gather_kernel(float *xg, __nv_bfloat16 *xg16, const float *x, const int32_t *slot_row, int D,
                                  int K) {
    long r = blockIdx.x, dst = (long)slot_row[r] * D;
    const float *src = x + (r / K) * D;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float v = src[c];
        xg[dst + c] = v;
        if (xg16) xg16[dst + c] = __float2bfloat16_rn(v);
    }
}

/* Groups the rows and gathers xg (and xg16 when not NULL); offs_h gets the expert starts on the host
 * (one sync, which also brings the bad-id flag). */
static int moe_group(const kctx *k, float *xg, __nv_bfloat16 *xg16, int32_t *slot_row, int32_t *offs,
                     int32_t *offs_h, const float *x, const int32_t *ids, int N, int D, int E, int K, mill_err *e) {
    long NK = (long)N * K;
    if (NK >= 0x7f7f7f7fL) return mill_errf(e, "moe: %ld (token, slot) rows is too many", NK);
    if ((long)E * (long)sizeof(int) > MOE_GROUP_SMEM) return mill_errf(e, "moe: %d experts is too many", E);
    long chl = (NK + 1023) / 1024; /* at most ~1024 chunks, so the scan's loops stay short */
    int ch = (int)((chl < 256 ? 256 : chl + 31) / 32 * 32);
    int nchunks = (int)((NK + ch - 1) / ch), wpb = 8;
    while (wpb > 1 && (long)wpb * E * (long)sizeof(int) > MOE_GROUP_SMEM) wpb >>= 1;
    size_t smem = sizeof(int) * (size_t)wpb * E;
    unsigned blocks = (unsigned)((nchunks + wpb - 1) / wpb);
    int *bad = NULL, hbad = 0, rc = 0;
    TRY(cu_scratch((void **)&bad, sizeof(int) * (1 + (size_t)nchunks * E), k, e));
    int32_t *cnt = (int32_t *)(bad + 1);
    /* 0x7f7f7f7f: above every row index, so atomicMin keeps the lowest bad row */
    if (cudaMemsetAsync(bad, 0x7f, sizeof(int), cu_stream(k)) != cudaSuccess) rc = mill_errf(e, "moe: memset failed");
    if (!rc && nchunks > 0) {
        int threads = E < 1024 ? (E + 31) / 32 * 32 : 1024;
        moe_count_kernel<<<blocks, wpb * 32, smem, cu_stream(k)>>>(cnt, bad, ids, NK, E, ch, nchunks);
        moe_scan_kernel<<<1, threads, 0, cu_stream(k)>>>(offs, cnt, E, nchunks);
        moe_place_kernel<<<blocks, wpb * 32, smem, cu_stream(k)>>>(slot_row, cnt, ids, NK, E, ch, nchunks);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "moe grouping: launch failed: %s", cudaGetErrorString(le));
    } else if (!rc && cudaMemsetAsync(offs, 0, sizeof(int32_t) * (size_t)(E + 1), cu_stream(k)) != cudaSuccess) {
        rc = mill_errf(e, "moe: memset failed");
    }
    if (!rc && (cudaMemcpyAsync(offs_h, offs, sizeof(int32_t) * (size_t)(E + 1), cudaMemcpyDeviceToHost,
                                cu_stream(k)) != cudaSuccess))
        rc = mill_errf(e, "moe: copy of the expert starts failed");
    if (!rc) rc = cu_copy_to_host_sync(&hbad, bad, sizeof(int), k, e);
    int badid = 0;
    if (!rc && hbad < NK) rc = cu_copy_to_host_sync(&badid, ids + hbad, sizeof(int), k, e);
    cu_scratch_free(bad, k);
    if (rc) return rc;
    if (hbad < NK) return mill_errf(e, "moe: expert id %d outside [0, %d)", badid, E);
    if (NK <= 0) return 0;
    moe_gather_kernel<<<(unsigned)NK, D >= 256 ? 256 : 128, 0, cu_stream(k)>>>(xg, xg16, x, slot_row, D, K);
    LAUNCH_CHECK("moe_gather_kernel");
    return 0;
}

/* One operand of a per-expert GEMM: expert ex's matrix starts at element offs[ex] * ld when the
 * operand is grouped token rows, else at ex * stride (a weight [E, rows, ld]). */
typedef struct {
    const float *base;
    long stride;
    int grouped, ld;
    const void *b16; /* NULL, or base's values already rounded to bf16 (same layout): no copy per GEMM */
} moe_operand;

static long moe_off(moe_operand o, const int32_t *offs_h, int ex) {
    return o.grouped ? (long)offs_h[ex] * o.ld : (long)ex * o.stride;
}
static long moe_rows(moe_operand o, const int32_t *offs_h, int E) {
    return o.grouped ? (long)offs_h[E] : (long)E * (o.stride / o.ld);
}

/* ---- The experts' grouped GEMM on tensor cores (moe_gemm's GEMM_NT and GEMM_NN; GEMM_TN's kernel
 * below shares its tiles, ring and store).
 * One launch covers every expert: block (bx, by, e) computes rows by * MOE_BM .. of expert e (its
 * rows offs[e] .. offs[e + 1], read on the device) against output columns bx * MOE_BN ..; a block
 * whose row tile starts past its expert's rows exits before any barrier. 8 warps in a 4 x 2 grid,
 * each a 32 x 64 patch of 2 x 4 wmma 16x16x16 bf16 fragments with fp32 accumulators. K advances in
 * steps of MOE_BK through a MOE_STAGES-deep ring of cp.async copies into shared memory; a 16-byte
 * chunk past the expert's rows, N or K is zero-filled instead of read, so every fragment load sees
 * defined values. Every output element is one fp32 accumulation in increasing k (16-wide tensor-core
 * steps in a fixed order), whatever the grid or the other experts: deterministic. The tile is
 * staged per warp through shared memory on the way out, so row tails and beta 1 are plain masked
 * loads and stores. */
#include <mma.h>

#define MOE_BM 128
#define MOE_BN 128
#define MOE_BK 32
#define MOE_STAGES 3
#define MOE_THREADS 256                  /* 8 warps */
#define MOE_LDA (MOE_BK + 8)             /* staged [m][k] rows (and NT's [n][k]): 80 bytes, 16-aligned, banks spread */
#define MOE_LDB_NN (MOE_BN + 8)          /* NN's staged [k][n] rows: 272 bytes */
#define MOE_A_ELEMS (MOE_BM * MOE_LDA)   /* 5120 */
#define MOE_B_ELEMS (MOE_BN * MOE_LDA)   /* 5120 >= MOE_BK * MOE_LDB_NN = 4352 */
#define MOE_STAGE_ELEMS (MOE_A_ELEMS + MOE_B_ELEMS)
#define MOE_SMEM (MOE_STAGES * MOE_STAGE_ELEMS * 2) /* 61440 bytes: above 48 KiB, so opted in at launch */

/* Every wmma pointer below is a multiple of 32 bytes from the ring's start: stage and B offsets are
 * (multiples of 5120 elements), fragment rows step by 16 rows (16 x 80 or 16 x 272 bytes), columns by
 * 16 elements (32 bytes). */
static_assert(MOE_A_ELEMS * 2 % 32 == 0 && MOE_STAGE_ELEMS * 2 % 32 == 0, "stage offsets 32-byte aligned");
static_assert(16 * MOE_LDA * 2 % 32 == 0 && 16 * MOE_LDB_NN * 2 % 32 == 0, "fragment rows 32-byte aligned");
static_assert(MOE_LDA % 8 == 0 && MOE_LDB_NN % 8 == 0, "wmma bf16 leading dimensions are multiples of 8");
static_assert(MOE_BK * MOE_LDB_NN <= MOE_B_ELEMS, "NN's B tile fits its slot");
static_assert(MOE_THREADS / 32 * 256 * 4 <= MOE_SMEM, "the output staging fits in the ring");

/* 16 bytes global -> shared without passing through registers; ok 0: 16 zero bytes, nothing read
 * (src must still be a valid address). */
__device__ __forceinline__ void moe_cp16(void *dst, const void *src, bool ok) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    int n = ok ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void moe_cp_commit(void) { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void moe_cp_wait(void) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

/* Queues one K step (k0 .. k0 + MOE_BK) of the A tile (mt valid rows at Ab, row stride lda) and of B
 * (expert's matrix at Bb: NT [N, K] rows, NN [K, N] rows, stride ldb) into stage s. N, K and every
 * chunk start are multiples of 8, so a 16-byte chunk is wholly inside or wholly outside. */
template <bool NN>
__device__ __forceinline__ void moe_wmma_stage(__nv_bfloat16 *s, const __nv_bfloat16 *Ab, int lda, int mt,
                                               const __nv_bfloat16 *Bb, int ldb, int n0, int N, int K, int k0) {
    __nv_bfloat16 *as = s, *bs = s + MOE_A_ELEMS;
    for (int c = threadIdx.x; c < MOE_BM * (MOE_BK / 8); c += MOE_THREADS) {
        int r = c / (MOE_BK / 8), kc = c % (MOE_BK / 8) * 8;
        bool ok = r < mt && k0 + kc < K;
        moe_cp16(as + r * MOE_LDA + kc, ok ? Ab + (long)r * lda + k0 + kc : Ab, ok);
    }
    if (NN) {
        for (int c = threadIdx.x; c < MOE_BK * (MOE_BN / 8); c += MOE_THREADS) {
            int kr = c / (MOE_BN / 8), nc = c % (MOE_BN / 8) * 8;
            bool ok = k0 + kr < K && n0 + nc < N;
            moe_cp16(bs + kr * MOE_LDB_NN + nc, ok ? Bb + (long)(k0 + kr) * ldb + n0 + nc : Bb, ok);
        }
    } else {
        for (int c = threadIdx.x; c < MOE_BN * (MOE_BK / 8); c += MOE_THREADS) {
            int nr = c / (MOE_BK / 8), kc = c % (MOE_BK / 8) * 8;
            bool ok = n0 + nr < N && k0 + kc < K;
            moe_cp16(bs + nr * MOE_LDA + kc, ok ? Bb + (long)(n0 + nr) * ldb + k0 + kc : Bb, ok);
        }
    }
}

/* NT stages B as [n][k]: the (k, n) fragment is column-major there; NN stages [k][n]: row-major. */
template <bool NN>
struct moe_blayout {
    typedef nvcuda::wmma::col_major type;
};
template <>
struct moe_blayout<true> {
    typedef nvcuda::wmma::row_major type;
};

typedef nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> moe_acc;

/* A warp's 2 x 4 accumulator tiles, zeroed. */
__device__ __forceinline__ void moe_acc_zero(moe_acc (&acc)[2][4]) {
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
}

/* The block's output tile, through shared memory one 16 x 16 fragment per warp at a time: tile row r
 * (< mt), column n0 + c (< N) lands at C[(row0 + r) * ldc + n0 + c] as beta C[...] + acc (beta 0: C is
 * not read, so NaN there goes). Warp (wm, wn) holds rows wm * 32 .., columns wn * 64 .. of the tile in
 * acc[2][4]. Every thread of the block calls it (it waits and synchronises: the ring is reused). */
__device__ __forceinline__ void moe_wmma_store(moe_acc (&acc)[2][4], unsigned char *ring, float *C, int row0, int ldc,
                                               int mt, int n0, int N, float beta) {
    using namespace nvcuda;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wm = warp >> 1, wn = warp & 1;
    moe_cp_wait<0>(); /* only empty groups are left, but the ring is reused below */
    __syncthreads();  /* every warp is done reading the ring */
    float *st = (float *)ring + warp * 256; /* this warp's 16 x 16 floats */
    int cl = lane & 15;
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            wmma::store_matrix_sync(st, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            int col = n0 + wn * 64 + j * 16 + cl;
            for (int rr = lane >> 4; rr < 16; rr += 2) {
                int r = wm * 32 + i * 16 + rr;
                if (r < mt && col < N) {
                    float *cp = C + (long)(row0 + r) * ldc + col;
                    float v = st[rr * 16 + cl];
                    *cp = beta != 0.0f ? fmaf(beta, *cp, v) : v;
                }
            }
            __syncwarp(); /* every lane has read st before the next fragment lands there */
        }
}

/* C[offs[e] + r, n] = beta C[...] + sum_k A[offs[e] + r, k] B_e(k, n), B_e = B + e * b_stride read as
 * [N, K] rows (NT) or [K, N] rows (NN). */
template <bool NN>
__global__ void __launch_bounds__(MOE_THREADS, 2)
    moe_wmma_kernel(float *C, int ldc, const __nv_bfloat16 *A, int lda, const __nv_bfloat16 *B, long b_stride,
                    int ldb, const int32_t *offs, int N, int K, float beta) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char moe_ring[];
    int ex = blockIdx.z, r0 = offs[ex], rows = offs[ex + 1] - r0, m0 = blockIdx.y * MOE_BM;
    if (m0 >= rows) return; /* the same for the whole block, before any barrier */
    int mt = rows - m0 < MOE_BM ? rows - m0 : MOE_BM, n0 = blockIdx.x * MOE_BN;
    const __nv_bfloat16 *Ab = A + (long)(r0 + m0) * lda, *Bb = B + (long)ex * b_stride;
    __nv_bfloat16 *ring = (__nv_bfloat16 *)moe_ring;
    int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
    int nk = (K + MOE_BK - 1) / MOE_BK;

    moe_acc acc[2][4];
    moe_acc_zero(acc);

    /* one commit group per K step (empty past the end), so "all but the newest STAGES - 2 groups
     * done" always means "step kt has landed" */
#pragma unroll
    for (int s = 0; s < MOE_STAGES - 1; s++) {
        if (s < nk) moe_wmma_stage<NN>(ring + s * MOE_STAGE_ELEMS, Ab, lda, mt, Bb, ldb, n0, N, K, s * MOE_BK);
        moe_cp_commit();
    }
    for (int kt = 0; kt < nk; kt++) {
        moe_cp_wait<MOE_STAGES - 2>();
        /* step kt is visible to every thread, and every warp is done with step kt - 1, whose stage
         * the prefetch below overwrites */
        __syncthreads();
        int pf = kt + MOE_STAGES - 1;
        if (pf < nk)
            moe_wmma_stage<NN>(ring + pf % MOE_STAGES * MOE_STAGE_ELEMS, Ab, lda, mt, Bb, ldb, n0, N, K, pf * MOE_BK);
        moe_cp_commit();
        const __nv_bfloat16 *as = ring + kt % MOE_STAGES * MOE_STAGE_ELEMS, *bs = as + MOE_A_ELEMS;
#pragma unroll
        for (int kk = 0; kk < MOE_BK; kk += 16) {
            if (kt * MOE_BK + kk >= K) break; /* K % 32 == 16: the last step's second half (block-uniform) */
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, typename moe_blayout<NN>::type> b[4];
#pragma unroll
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(a[i], as + (wm * 32 + i * 16) * MOE_LDA + kk, MOE_LDA);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                if (NN)
                    wmma::load_matrix_sync(b[j], bs + kk * MOE_LDB_NN + wn * 64 + j * 16, MOE_LDB_NN);
                else
                    wmma::load_matrix_sync(b[j], bs + (wn * 64 + j * 16) * MOE_LDA + kk, MOE_LDA);
            }
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
    moe_wmma_store(acc, moe_ring, C, r0 + m0, ldc, mt, n0, N, beta);
}

/* ---- The weight gradients (moe_gemm's GEMM_TN) on the same tiles: for every expert e,
 *   C_e[m, n] = beta C_e[m, n] + sum_r A[offs[e] + r, m] B[offs[e] + r, n],  C_e = C + e * c_stride,
 * the sum over the expert's token rows r < offs[e + 1] - offs[e] (read on the device). Block
 * (bx, by, e) owns output rows by * MOE_BM .., columns bx * MOE_BN .. of C_e and reduces over ALL
 * the expert's rows itself, MOE_BK rows a step through the same ring (no split over blocks, no
 * atomics: each element is one fp32 accumulation in increasing r, whatever the grid). A step's rows
 * of A (columns m0 ..) and of B (columns n0 ..) are staged as [row][col] with stride MOE_LDB_NN, so
 * A^T's (m, k) fragment is column-major there and B's (k, n) row-major (NN's B layout). Rows past
 * the expert's count are zero-filled (the next expert's rows, or padding, are never read); M and N
 * need only be multiples of 8 (a 16-byte chunk is wholly in or out; a fragment past M or N computes
 * zeros that the store masks). An empty expert's block returns at once with beta 1 (nothing to add)
 * and writes beta C (zeros for beta 0) otherwise. */
static_assert(MOE_BK * MOE_LDB_NN <= MOE_A_ELEMS && MOE_BK * MOE_LDB_NN <= MOE_B_ELEMS, "TN's tiles fit their slots");

/* Queues rows k0 .. k0 + MOE_BK of the expert's A (Ab: its row 0; columns m0 .., M wide, stride lda)
 * and B (Bb; columns n0 .., N wide, stride ldb) into stage s; a row at or past `rows`, or a chunk at
 * or past M / N, is zero-filled. 16 consecutive threads copy one 256-byte row piece: coalesced. */
__device__ __forceinline__ void moe_wmma_stage_tn(__nv_bfloat16 *s, const __nv_bfloat16 *Ab, int lda, int m0, int M,
                                                  const __nv_bfloat16 *Bb, int ldb, int n0, int N, int rows, int k0) {
    __nv_bfloat16 *as = s, *bs = s + MOE_A_ELEMS;
    for (int c = threadIdx.x; c < MOE_BK * (MOE_BM / 8); c += MOE_THREADS) {
        int kr = c / (MOE_BM / 8), mc = c % (MOE_BM / 8) * 8;
        bool ok = k0 + kr < rows && m0 + mc < M;
        moe_cp16(as + kr * MOE_LDB_NN + mc, ok ? Ab + (long)(k0 + kr) * lda + m0 + mc : Ab, ok);
    }
    for (int c = threadIdx.x; c < MOE_BK * (MOE_BN / 8); c += MOE_THREADS) {
        int kr = c / (MOE_BN / 8), nc = c % (MOE_BN / 8) * 8;
        bool ok = k0 + kr < rows && n0 + nc < N;
        moe_cp16(bs + kr * MOE_LDB_NN + nc, ok ? Bb + (long)(k0 + kr) * ldb + n0 + nc : Bb, ok);
    }
}

__global__ void __launch_bounds__(MOE_THREADS, 2)
    moe_wmma_tn_kernel(float *C, long c_stride, int ldc, const __nv_bfloat16 *A, int lda, const __nv_bfloat16 *B,
                       int ldb, const int32_t *offs, int M, int N, float beta) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char moe_ring[];
    int ex = blockIdx.z, r0 = offs[ex], rows = offs[ex + 1] - r0;
    if (rows <= 0 && beta == 1.0f) return; /* adds nothing; the whole block, before any barrier */
    int m0 = blockIdx.y * MOE_BM, n0 = blockIdx.x * MOE_BN, mt = M - m0 < MOE_BM ? M - m0 : MOE_BM;
    /* Ab / Bb are read only when rows > 0, i.e. when they point at the expert's first row */
    const __nv_bfloat16 *Ab = A + (long)r0 * lda, *Bb = B + (long)r0 * ldb;
    __nv_bfloat16 *ring = (__nv_bfloat16 *)moe_ring;
    int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
    int nk = rows > 0 ? (rows + MOE_BK - 1) / MOE_BK : 0;

    moe_acc acc[2][4];
    moe_acc_zero(acc);

    /* the NT/NN kernel's pipeline: one commit group per step (empty past the end), wait for all
     * but the newest MOE_STAGES - 2, one barrier per step */
#pragma unroll
    for (int s = 0; s < MOE_STAGES - 1; s++) {
        if (s < nk) moe_wmma_stage_tn(ring + s * MOE_STAGE_ELEMS, Ab, lda, m0, M, Bb, ldb, n0, N, rows, s * MOE_BK);
        moe_cp_commit();
    }
    for (int kt = 0; kt < nk; kt++) {
        moe_cp_wait<MOE_STAGES - 2>();
        __syncthreads(); /* step kt visible to all; every warp done with step kt - 1's stage, refilled below */
        int pf = kt + MOE_STAGES - 1;
        if (pf < nk)
            moe_wmma_stage_tn(ring + pf % MOE_STAGES * MOE_STAGE_ELEMS, Ab, lda, m0, M, Bb, ldb, n0, N, rows,
                              pf * MOE_BK);
        moe_cp_commit();
        const __nv_bfloat16 *as = ring + kt % MOE_STAGES * MOE_STAGE_ELEMS, *bs = as + MOE_A_ELEMS;
#pragma unroll
        for (int kk = 0; kk < MOE_BK; kk += 16) {
            if (kt * MOE_BK + kk >= rows) break; /* a last step of <= 16 rows: its zero half (block-uniform) */
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b[4];
#pragma unroll
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(a[i], as + kk * MOE_LDB_NN + wm * 32 + i * 16, MOE_LDB_NN);
#pragma unroll
            for (int j = 0; j < 4; j++) wmma::load_matrix_sync(b[j], bs + kk * MOE_LDB_NN + wn * 64 + j * 16, MOE_LDB_NN);
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
    moe_wmma_store(acc, moe_ring, C + (long)ex * c_stride, m0, ldc, mt, n0, N, beta);
}

/* Whether the kernel takes this shape: N and K multiples of 16 (whole fragments), row strides and
 * expert strides multiples of 8 elements and both bf16 operands 16-byte aligned (16-byte copies),
 * the grid within its limits. */
static int moe_wmma_fits(int E, int max_rows, int N, int K, const void *A, int lda, const void *B, long b_stride,
                         int ldb, int ldc, int nn) {
    return E > 0 && E <= 65535 && max_rows >= 0 && (max_rows + MOE_BM - 1) / MOE_BM <= 65535 && N > 0 && K > 0 &&
           N % 16 == 0 && K % 16 == 0 && lda % 8 == 0 && ldb % 8 == 0 && b_stride % 8 == 0 && lda >= K &&
           ldb >= (nn ? N : K) && ldc >= N && ((uintptr_t)A & 15) == 0 && ((uintptr_t)B & 15) == 0;
}

int cuda_moe_wmma_gemm(const kctx *k, int nn, const int32_t *offs, int E, int max_rows, int N, int K, const void *A,
                       int lda, const void *B, long b_stride, int ldb, float *C, int ldc, float beta, mill_err *e) {
    if (!moe_wmma_fits(E, max_rows, N, K, A, lda, B, b_stride, ldb, ldc, nn))
        return mill_errf(e, "moe: grouped tensor-core GEMM: unsupported shape (E %d, rows %d, N %d, K %d, lda %d, ldb %d)",
                         E, max_rows, N, K, lda, ldb);
    if (max_rows == 0) return 0;
    dim3 grid((unsigned)((N + MOE_BN - 1) / MOE_BN), (unsigned)((max_rows + MOE_BM - 1) / MOE_BM), (unsigned)E);
    const __nv_bfloat16 *a = (const __nv_bfloat16 *)A, *b = (const __nv_bfloat16 *)B;
    if (nn) {
        CU_CHECK(cudaFuncSetAttribute(moe_wmma_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, MOE_SMEM));
        moe_wmma_kernel<true><<<grid, MOE_THREADS, MOE_SMEM, cu_stream(k)>>>(C, ldc, a, lda, b, b_stride, ldb, offs, N,
                                                                             K, beta);
    } else {
        CU_CHECK(cudaFuncSetAttribute(moe_wmma_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, MOE_SMEM));
        moe_wmma_kernel<false><<<grid, MOE_THREADS, MOE_SMEM, cu_stream(k)>>>(C, ldc, a, lda, b, b_stride, ldb, offs,
                                                                              N, K, beta);
    }
    LAUNCH_CHECK("moe_wmma_kernel");
    return 0;
}

/* Whether the TN kernel takes this shape: M and N multiples of 8, row strides multiples of 8
 * elements and both bf16 operands 16-byte aligned (16-byte copies), the experts' C blocks apart
 * (an overlap would be a race), the grid within its limits. */
static int moe_wmma_tn_fits(int E, int M, int N, const void *A, int lda, const void *B, int ldb, long c_stride,
                            int ldc) {
    return E > 0 && E <= 65535 && M > 0 && N > 0 && M % 8 == 0 && N % 8 == 0 && (M + MOE_BM - 1) / MOE_BM <= 65535 &&
           lda % 8 == 0 && ldb % 8 == 0 && lda >= M && ldb >= N && ldc >= N &&
           (E == 1 || c_stride >= (long)(M - 1) * ldc + N) && ((uintptr_t)A & 15) == 0 && ((uintptr_t)B & 15) == 0;
}

int cuda_moe_wmma_tn_gemm(const kctx *k, const int32_t *offs, int E, int M, int N, const void *A, int lda,
                          const void *B, int ldb, float *C, long c_stride, int ldc, float beta, mill_err *e) {
    if (!moe_wmma_tn_fits(E, M, N, A, lda, B, ldb, c_stride, ldc))
        return mill_errf(e, "moe: grouped tensor-core TN GEMM: unsupported shape (E %d, M %d, N %d, lda %d, ldb %d, ldc %d)",
                         E, M, N, lda, ldb, ldc);
    dim3 grid((unsigned)((N + MOE_BN - 1) / MOE_BN), (unsigned)((M + MOE_BM - 1) / MOE_BM), (unsigned)E);
    CU_CHECK(cudaFuncSetAttribute(moe_wmma_tn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, MOE_SMEM));
    moe_wmma_tn_kernel<<<grid, MOE_THREADS, MOE_SMEM, cu_stream(k)>>>(C, c_stride, ldc, (const __nv_bfloat16 *)A, lda,
                                                                      (const __nv_bfloat16 *)B, ldb, offs, M, N, beta);
    LAUNCH_CHECK("moe_wmma_tn_kernel");
    return 0;
}

/* For every non-empty expert: C_ex = shape(A_ex, B_ex) (+ C_ex when beta = 1), where M, N or K
 * given as -1 means "this expert's row count". A and B are rounded to bf16 copies (whole operands:
 * with fp32 storage that is one pass each; bf16 storage will remove it). Then GEMM_NT and GEMM_NN
 * over grouped token rows (M = -1) go to moe_wmma_kernel and GEMM_TN reducing over them (K = -1,
 * C a weight-shaped [E, M, N]) to moe_wmma_tn_kernel, one launch for all experts reading the
 * device starts offs_d, when the shape fits (moe_wmma_fits / moe_wmma_tn_fits) and kctx.moe_cublas
 * is off. Unlike the cuBLAS path, the TN kernel also applies beta 0 to empty experts (zeros; the op
 * passes beta 1, where both leave them alone). Otherwise (odd shapes, offs_d NULL,
 * MILL_MOE_GEMM=cublas) ONE grouped cuBLAS GEMM (bf16 x bf16 -> fp32, fp32 accumulation) covers all
 * experts, and if cuBLAS refuses the grouped call, one cublasGemmEx per expert with the same types. */
static int moe_gemm(const kctx *k, cu_gemm_shape shape, const int32_t *offs_h, const int32_t *offs_d, int E, int M,
                    int N, int K, moe_operand A, moe_operand B, moe_operand C, float beta, int *used_grouped,
                    mill_err *e) {
    if (k->gemm_fp32) { /* parity mode: one full-fp32 GEMM per expert on the fp32 operands */
        if (used_grouped) *used_grouped = 0;
        for (int ex = 0; ex < E; ex++) {
            int rows = offs_h[ex + 1] - offs_h[ex];
            if (!rows) continue;
            TRY(cu_gemm(k, shape, M < 0 ? rows : M, N < 0 ? rows : N, K < 0 ? rows : K,
                        (const float *)A.base + moe_off(A, offs_h, ex), A.ld, (const float *)B.base + moe_off(B, offs_h, ex),
                        B.ld, (float *)C.base + moe_off(C, offs_h, ex), C.ld, beta, 0, e));
        }
        return 0;
    }
    int G = 0;
    for (int ex = 0; ex < E; ex++) G += offs_h[ex + 1] > offs_h[ex];
    if (!G) return 0;
    long ra = moe_rows(A, offs_h, E), rb = moe_rows(B, offs_h, E);
    /* an operand with its bf16 copy at hand, or inside a registered bf16 shadow (the experts' weights),
     * is read from it */
    const uint16_t *sa = (const uint16_t *)(A.b16 ? A.b16 : cu_shadow_of(k, A.base, ra * A.ld));
    const uint16_t *sb = (const uint16_t *)(B.b16 ? B.b16 : cu_shadow_of(k, B.base, rb * B.ld));
    size_t na = sa ? 0 : (size_t)ra * A.ld, nb = sb ? 0 : (size_t)rb * B.ld, na_al = ((na + 7) / 8) * 8;
    uint16_t *buf = NULL; /* bf16 bits */
    TRY(cu_scratch((void **)&buf, 2 * (na_al + nb + 8) + sizeof(void *) * 3 * (size_t)G + 16, k, e));
    void **dptrs = (void **)(((uintptr_t)(buf + na_al + nb) + 15) & ~(uintptr_t)15);
    const uint16_t *a16 = sa ? sa : buf, *b16 = sb ? sb : buf + na_al;
    double tp = cu_phase(k);
    int rc = sa ? 0 : cu_to_bf16(k, buf, A.base, ra, A.ld, A.ld, e);
    if (!rc && !sb) rc = cu_to_bf16(k, buf + na_al, B.base, rb, B.ld, B.ld, e);
    cu_phase_end(k, sa && sb ? "moe_gemm: no bf16 copy" : "moe_gemm: bf16 copies", tp);
    int max_rows = 0;
    for (int ex = 0; ex < E; ex++)
        max_rows = offs_h[ex + 1] - offs_h[ex] > max_rows ? offs_h[ex + 1] - offs_h[ex] : max_rows;
    /* products over token rows (NT / NN: the rows are C's) or weight gradients (TN: the rows are the
     * reduction) on our kernels, one launch for all experts */
    int rows_nx = (shape == GEMM_NT || shape == GEMM_NN) && M < 0 && N > 0 && K > 0 && A.grouped && !B.grouped &&
                  C.grouped && moe_wmma_fits(E, max_rows, N, K, a16, A.ld, b16, B.stride, B.ld, C.ld, shape == GEMM_NN);
    int rows_tn = shape == GEMM_TN && M > 0 && N > 0 && K < 0 && A.grouped && B.grouped && !C.grouped &&
                  moe_wmma_tn_fits(E, M, N, a16, A.ld, b16, B.ld, C.stride, C.ld);
    if (!rc && offs_d && !k->moe_cublas && (rows_nx || rows_tn)) {
        tp = cu_phase(k);
        if (rows_tn)
            rc = cuda_moe_wmma_tn_gemm(k, offs_d, E, M, N, a16, A.ld, b16, B.ld, (float *)C.base, C.stride, C.ld, beta,
                                       e);
        else
            rc = cuda_moe_wmma_gemm(k, shape == GEMM_NN, offs_d, E, max_rows, N, K, a16, A.ld, b16, B.stride, B.ld,
                                    (float *)C.base, C.ld, beta, e);
        cu_phase_end(k, shape == GEMM_NT ? "moe_gemm: wmma NT" : shape == GEMM_NN ? "moe_gemm: wmma NN" : "moe_gemm: wmma TN",
                     tp);
        cu_scratch_free(buf, k); /* stream-ordered: after the kernel */
        return rc;
    }
    tp = cu_phase(k);
    /* host arrays for the group shapes and the three pointer lists */
    int *iv = (int *)malloc(sizeof(int) * 6 * (size_t)G + sizeof(cublasOperation_t) * 2 * G +
                            sizeof(float) * 2 * G + sizeof(void *) * 3 * G + sizeof(int) * G);
    if (!rc && !iv) rc = mill_errf(e, "moe: out of memory");
    if (rc) {
        free(iv);
        cu_scratch_free(buf, k);
        return rc;
    }
    int *m = iv, *n = m + G, *kk = n + G, *lda = kk + G, *ldb = lda + G, *ldc = ldb + G;
    cublasOperation_t *ta = (cublasOperation_t *)(ldc + G), *tb = ta + G;
    float *alpha = (float *)(tb + G), *betas = alpha + G;
    const void **ptrs = (const void **)(betas + G); /* 40 G bytes in: 8-aligned */
    int *ones = (int *)(ptrs + 3 * G);
    int g = 0;
    for (int ex = 0; ex < E; ex++) {
        int rows = offs_h[ex + 1] - offs_h[ex];
        if (!rows) continue;
        cu_colmajor_gemm p = cu_gemm_plan(shape, M < 0 ? rows : M, N < 0 ? rows : N, K < 0 ? rows : K,
                                          a16 + moe_off(A, offs_h, ex), A.ld, b16 + moe_off(B, offs_h, ex), B.ld,
                                          (float *)C.base + moe_off(C, offs_h, ex), C.ld);
        ta[g] = p.ta;
        tb[g] = p.tb;
        m[g] = p.m;
        n[g] = p.n;
        kk[g] = p.k;
        lda[g] = p.lda;
        ldb[g] = p.ldb;
        ldc[g] = p.ldc;
        alpha[g] = 1.0f;
        betas[g] = beta;
        ones[g] = 1;
        ptrs[g] = p.A;
        ptrs[G + g] = p.B;
        ptrs[2 * G + g] = p.C;
        g++;
    }
    /* the device pointer list is for the grouped call alone (its probe): the per-expert calls take
     * the host one */
    if (used_grouped &&
        cudaMemcpyAsync(dptrs, ptrs, sizeof(void *) * 3 * G, cudaMemcpyHostToDevice, cu_stream(k)) != cudaSuccess)
        rc = mill_errf(e, "moe: pointer copy failed");
    cu_phase_end(k, "moe_gemm: shapes and pointers", tp);
    tp = cu_phase(k);
    if (!rc) {
        /* the grouped call only where its support is probed (used_grouped): the model's own GEMMs go
         * one per expert */
        cublasStatus_t st = CUBLAS_STATUS_NOT_SUPPORTED;
        if (used_grouped) {
            st = cublasGemmGroupedBatchedEx(cu_blas(k), ta, tb, m, n, kk, alpha, (const void *const *)dptrs,
                                            CUDA_R_16BF, lda, (const void *const *)(dptrs + G), CUDA_R_16BF, ldb,
                                            betas, dptrs + 2 * G, CUDA_R_32F, ldc, G, ones, CUBLAS_COMPUTE_32F);
            *used_grouped = st == CUBLAS_STATUS_SUCCESS;
        }
        if (st == CUBLAS_STATUS_NOT_SUPPORTED) { /* one GEMM per expert instead */
            for (int i = 0; i < G && !rc; i++) {
                cublasStatus_t s2 = cublasGemmEx(cu_blas(k), ta[i], tb[i], m[i], n[i], kk[i], &alpha[i], ptrs[i],
                                                 CUDA_R_16BF, lda[i], ptrs[G + i], CUDA_R_16BF, ldb[i], &betas[i],
                                                 (void *)ptrs[2 * G + i], CUDA_R_32F, ldc[i], CUBLAS_COMPUTE_32F,
                                                 CUBLAS_GEMM_DEFAULT);
                if (s2 != CUBLAS_STATUS_SUCCESS) rc = mill_errf(e, "moe: cublasGemmEx failed: cuBLAS status %d", (int)s2);
            }
        } else if (st != CUBLAS_STATUS_SUCCESS) {
            rc = mill_errf(e, "moe: cublasGemmGroupedBatchedEx failed: cuBLAS status %d", (int)st);
        }
        cu_phase_end(k, shape == GEMM_NT ? "moe_gemm: cuBLAS NT" : shape == GEMM_NN ? "moe_gemm: cuBLAS NN" : "moe_gemm: cuBLAS TN",
                     tp);
    }
    /* the grouped call reads the shape arrays on the host before it returns; the device pointer
     * list is freed stream-ordered */
    free(iv);
    cu_scratch_free(buf, k);
    return rc;
}

int cuda_moe_grouped_gemm_supported(const kctx *k, mill_err *e) {
    /* a tiny grouped GEMM through the experts' own path: 1 when it ran grouped */
    int32_t offs_h[3] = {0, 2, 2};
    float *buf = NULL;
    TRY(cu_scratch((void **)&buf, sizeof(float) * 64, k, e));
    int used = 0, rc = 0;
    if (cudaMemsetAsync(buf, 0, sizeof(float) * 64, cu_stream(k)) != cudaSuccess) rc = mill_errf(e, "probe: memset");
    moe_operand X = {buf, 0, 1, 4, NULL}, W = {buf + 16, 16, 0, 4, NULL}, Y = {buf + 48, 0, 1, 4, NULL};
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, NULL, 2, -1, 4, 4, X, W, Y, 0.0f, &used, e);
    if (!rc && cudaStreamSynchronize(cu_stream(k)) != cudaSuccess) rc = mill_errf(e, "probe: sync failed");
    cu_scratch_free(buf, k);
    return rc ? -1 : used;
}

/* One block per token: out[t, c] (+)= sum_k weights[t, k] y[slot_row[t, k], c], slots in order. */
__global__ void moe_combine_kernel(float *out, const float *y, const float *weights, const int32_t *slot_row, int D,
                                   int K, int accumulate) {
    long t = blockIdx.x;
    const int32_t *sr = slot_row + t * K;
    const float *wt = weights + t * K;
    float *o = out + t * D;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float acc = accumulate ? o[c] : 0.f;
        for (int j = 0; j < K; j++) acc += wt[j] * y[(long)sr[j] * D + c];
        o[c] = acc;
    }
}

/* ---- Small batches (decode): the grouping and the expert GEMMs read the expert offsets on the
 * device, so nothing waits for the host and a decode step can be captured in a CUDA graph. The
 * products are the grouped path's (bf16 operands, fp32 accumulation), summed in another order. */
#define MOE_SMALL_ROWS 1024 /* N * K up to this: one block groups them */

/* Stable counting sort of the NK rows by expert in one block: slot_row[r] = offs[x] + the number of
 * earlier rows of expert x. A bad id is recorded and its row is parked after offs[E], where no
 * GEMM reads it and every index stays in bounds. */
__global__ void moe_small_group_kernel(int32_t *slot_row, int32_t *offs, int *bad, cu_check *dc, const int32_t *ids,
                                       int NK, int E, int K) {
    extern __shared__ int sm[]; /* key [NK], cnt [E + 1], start [E + 1] */
    int *key = sm, *cnt = key + NK, *start = cnt + E + 1;
    for (int x = threadIdx.x; x <= E; x += blockDim.x) cnt[x] = 0;
    __syncthreads();
    for (int r = threadIdx.x; r < NK; r += blockDim.x) {
        int x = ids[r];
        if (x < 0 || x >= E) {
            if (dc) cu_check_record(dc, r / K, x, E);
            else atomicMin(bad, r);
            x = E;
        }
        key[r] = x;
        atomicAdd(&cnt[x], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int x = 0; x <= E; x++) {
            start[x] = acc;
            offs[x] = acc;
            acc += cnt[x];
        }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < NK; r += blockDim.x) {
        int x = key[r], rank = 0;
        for (int q = 0; q < r; q++) rank += key[q] == x;
        slot_row[r] = start[x] + rank;
    }
}

static int moe_small_ok(const kctx *k, long NK, int D, int I, int E) {
    /* kctx.exact: the grouped path at every size, so a token's bits do not depend on the batch */
    return !k->gemm_fp32 && !k->exact && NK <= MOE_SMALL_ROWS && D % 8 == 0 && I % 8 == 0 && E <= 65535;
}

/* Groups and gathers without waiting (deferred checks) or with one wait for the bad-id flag. */
static int moe_small_group(const kctx *k, float *xg, int32_t *slot_row, int32_t *offs, const float *x,
                           const int32_t *ids, int N, int D, int E, int K, mill_err *e) {
    int NK = N * K;
    cu_check *dc = cu_deferred(k, CU_CHECK_EXPERTS);
    int *bad = NULL, hbad = NK, rc = 0;
    size_t smem = sizeof(int) * ((size_t)NK + 2 * ((size_t)E + 1));
    if (smem > 48 * 1024) return mill_errf(e, "moe: %d experts need too much shared memory for the small path", E);
    if (!dc) {
        TRY(cu_scratch((void **)&bad, sizeof(int), k, e));
        if (cudaMemcpyAsync(bad, &hbad, sizeof(int), cudaMemcpyHostToDevice, cu_stream(k)) != cudaSuccess)
            rc = mill_errf(e, "moe: copy failed");
    }
    if (!rc) {
        moe_small_group_kernel<<<1, 1024, smem, cu_stream(k)>>>(slot_row, offs, bad, dc, ids, NK, E, K);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "moe_small_group_kernel: launch failed: %s", cudaGetErrorString(le));
    }
    if (!rc && !dc) rc = cu_copy_to_host_sync(&hbad, bad, sizeof(int), k, e);
    int badid = 0;
    if (!rc && !dc && hbad < NK) rc = cu_copy_to_host_sync(&badid, ids + hbad, sizeof(int), k, e);
    cu_scratch_free(bad, k);
    if (rc) return rc;
    if (!dc && hbad < NK) return mill_errf(e, "moe: expert id %d outside [0, %d)", badid, E);
    moe_gather_kernel<<<(unsigned)NK, D >= 256 ? 256 : 128, 0, cu_stream(k)>>>(xg, NULL, x, slot_row, D, K);
    LAUNCH_CHECK("moe_gather_kernel");
    return 0;
}

/* bf16 copies of grouped operands the experts' GEMMs read more than once (or that a kernel can write
 * as it goes), so each is rounded once per op instead of once per GEMM; NULL in the fp32 parity mode. */
static int moe_bf16_scratch(const kctx *k, __nv_bfloat16 **buf, long n, mill_err *e) {
    *buf = NULL;
    if (k->gemm_fp32) return 0;
    return cu_scratch((void **)buf, sizeof(__nv_bfloat16) * (size_t)n, k, e);
}
static long moe_al8(long n) { return (n + 7) / 8 * 8; } /* keeps sub-buffers 16-byte aligned */

int cuda_op_moe_experts(const kctx *k, float *out, const float *x, const int32_t *ids, const float *weights,
                        const float *w1, const float *w3, const float *w2, int N, int D, int I, int E, int K,
                        float limit, int accumulate, float *work, mill_err *e) {
    if (N <= 0 || D <= 0) return 0;
    long NK = (long)N * K;
    float *xg = work, *g = xg + NK * D, *u = g + NK * I, *y = u + NK * I;
    int32_t *slot_row = (int32_t *)(y + NK * D), *offs = slot_row + NK;
    if (moe_small_ok(k, NK, D, I, E)) {
        TRY(moe_small_group(k, xg, slot_row, offs, x, ids, N, D, E, K, e));
        TRY(cu_rows_gemm(k, g, I, xg, D, w1, (long)I * D, offs, E, 0, I, D, 0.0f, 1, e));
        TRY(cu_rows_gemm(k, u, I, xg, D, w3, (long)I * D, offs, E, 0, I, D, 0.0f, 1, e));
        TRY(cuda_op_swiglu_clamp(k, g, g, u, NK * I, limit, e));
        TRY(cu_rows_gemm(k, y, D, g, I, w2, (long)D * I, offs, E, 0, D, I, 0.0f, 1, e));
        moe_combine_kernel<<<(unsigned)N, D >= 256 ? 256 : 128, 0, cu_stream(k)>>>(out, y, weights, slot_row, D, K,
                                                                                    accumulate);
        LAUNCH_CHECK("moe_combine_kernel");
        return 0;
    }
    int32_t *offs_h = (int32_t *)malloc(sizeof(int32_t) * (size_t)(E + 1));
    if (!offs_h) return mill_errf(e, "moe: out of memory");
    __nv_bfloat16 *xg16 = NULL; /* the gather writes it: the two first GEMMs share it */
    int rc = moe_bf16_scratch(k, &xg16, NK * D, e);
    if (!rc) rc = moe_group(k, xg, xg16, slot_row, offs, offs_h, x, ids, N, D, E, K, e);
    moe_operand XG = {xg, 0, 1, D, xg16}, G_ = {g, 0, 1, I, NULL}, U = {u, 0, 1, I, NULL}, Y = {y, 0, 1, D, NULL};
    moe_operand W1 = {w1, (long)I * D, 0, D, NULL}, W3 = {w3, (long)I * D, 0, D, NULL};
    moe_operand W2 = {w2, (long)D * I, 0, I, NULL};
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, offs, E, -1, I, D, XG, W1, G_, 0.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, offs, E, -1, I, D, XG, W3, U, 0.0f, NULL, e);
    if (!rc) rc = cuda_op_swiglu_clamp(k, g, g, u, NK * I, limit, e);
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, offs, E, -1, D, I, G_, W2, Y, 0.0f, NULL, e);
    free(offs_h);
    cu_scratch_free(xg16, k);
    if (rc) return rc;
    moe_combine_kernel<<<(unsigned)N, D >= 256 ? 256 : 128, 0, cu_stream(k)>>>(out, y, weights, slot_row, D, K,
                                                                              accumulate);
    LAUNCH_CHECK("moe_combine_kernel");
    return 0;
}

/* One warp per (token, slot) row r: dweights[r] = dout[t] . y[row]; dy[row] = weights[r] dout[t] (and
 * its bf16 copy when dy16 is set). */
__global__ void moe_dweights_kernel(float *dweights, float *dy, __nv_bfloat16 *dy16, const float *dout,
                                    const float *y, const float *weights, const int32_t *slot_row, long NK, int D,
                                    int K) {
    long r = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= NK) return; /* the whole warp */
    long t = r / K, row = (long)slot_row[r] * D;
    const float *go = dout + t * D, *yr = y + row;
    float wr = weights[r], dot = 0.f;
    for (int c = lane; c < D; c += 32) {
        float gv = go[c], v = wr * gv;
        dot += gv * yr[c];
        dy[row + c] = v;
        if (dy16) dy16[row + c] = __float2bfloat16_rn(v);
    }
    dot = cu_warp_sum(dot);
    if (lane == 0) dweights[r] = dot;
}

/* One block per token: dx[t] += its K slots' grouped gradients, in slot order. */
__global__ void moe_dx_kernel(float *dx, const float *dxg, const int32_t *slot_row, int D, int K) {
    long t = blockIdx.x;
    const int32_t *sr = slot_row + t * K;
    float *o = dx + t * D;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float acc = o[c];
        for (int j = 0; j < K; j++) acc += dxg[(long)sr[j] * D + c];
        o[c] = acc;
    }
}

int cuda_op_moe_experts_backward(const kctx *k, float *dx, float *dw1, float *dw3, float *dw2, float *dweights,
                                 const float *dout, const float *x, const int32_t *ids, const float *weights,
                                 const float *w1, const float *w3, const float *w2, int N, int D, int I, int E,
                                 int K, float limit, float *work, mill_err *e) {
    if (N <= 0 || D <= 0) return 0;
    long NK = (long)N * K;
    float *xg = work, *y = xg + NK * D, *dy = y + NK * D, *dxg = dy + NK * D;
    float *g = dxg + NK * D, *u = g + NK * I, *act = u + NK * I, *dg = act + NK * I, *du = dg + NK * I;
    int32_t *slot_row = (int32_t *)(du + NK * I), *offs = slot_row + NK;
    int32_t *offs_h = (int32_t *)malloc(sizeof(int32_t) * (size_t)(E + 1));
    if (!offs_h) return mill_errf(e, "moe: out of memory");
    /* bf16 copies: xg16 (from the gather; 4 GEMMs read it), dy16 (from the dweights kernel; 2), a16
     * (act for 2 GEMMs, then dg for 2), du16 (2) */
    __nv_bfloat16 *b16 = NULL, *xg16 = NULL, *dy16 = NULL, *a16 = NULL, *du16 = NULL;
    int rc = moe_bf16_scratch(k, &b16, 2 * moe_al8(NK * D) + 2 * moe_al8(NK * I), e);
    if (b16) {
        xg16 = b16;
        dy16 = xg16 + moe_al8(NK * D);
        a16 = dy16 + moe_al8(NK * D);
        du16 = a16 + moe_al8(NK * I);
    }
    moe_operand XG = {xg, 0, 1, D, xg16}, G_ = {g, 0, 1, I, NULL}, U = {u, 0, 1, I, NULL}, ACT = {act, 0, 1, I, a16};
    moe_operand Y = {y, 0, 1, D, NULL}, DY = {dy, 0, 1, D, dy16}, DXG = {dxg, 0, 1, D, NULL}, DG = {dg, 0, 1, I, a16};
    moe_operand DU = {du, 0, 1, I, du16}, DACT = {act, 0, 1, I, NULL};
    moe_operand W1 = {w1, (long)I * D, 0, D, NULL}, W3 = {w3, (long)I * D, 0, D, NULL};
    moe_operand W2 = {w2, (long)D * I, 0, I, NULL}, DW2 = {dw2, (long)D * I, 0, I, NULL};
    moe_operand DW1 = {dw1, (long)I * D, 0, D, NULL}, DW3 = {dw3, (long)I * D, 0, D, NULL};
    if (!rc) rc = moe_group(k, xg, xg16, slot_row, offs, offs_h, x, ids, N, D, E, K, e);
    /* recompute the forward per expert */
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, offs, E, -1, I, D, XG, W1, G_, 0.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, offs, E, -1, I, D, XG, W3, U, 0.0f, NULL, e);
    if (!rc) rc = cuda_op_swiglu_clamp(k, act, g, u, NK * I, limit, e);
    if (!rc && a16) rc = cu_to_bf16(k, a16, act, NK, I, I, e);
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, offs, E, -1, D, I, ACT, W2, Y, 0.0f, NULL, e);
    if (!rc && NK > 0) {
        moe_dweights_kernel<<<cu_blocks(NK, 8), 256, 0, cu_stream(k)>>>(dweights, dy, dy16, dout, y, weights,
                                                                         slot_row, NK, D, K);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "moe_dweights_kernel: launch failed: %s", cudaGetErrorString(le));
    }
    /* dw2 += dy^T act, then act's rows become dact = dy @ w2 (a16 still holds act until dg replaces it) */
    if (!rc) rc = moe_gemm(k, GEMM_TN, offs_h, offs, E, D, I, -1, DY, ACT, DW2, 1.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_NN, offs_h, offs, E, -1, I, D, DY, W2, DACT, 0.0f, NULL, e);
    if (!rc) rc = cu_swiglu_backward_write(k, dg, du, act, g, u, NK * I, limit, e);
    if (!rc && a16) rc = cu_to_bf16(k, a16, dg, NK, I, I, e);
    if (!rc && du16) rc = cu_to_bf16(k, du16, du, NK, I, I, e);
    if (!rc) rc = moe_gemm(k, GEMM_NN, offs_h, offs, E, -1, D, I, DG, W1, DXG, 0.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_NN, offs_h, offs, E, -1, D, I, DU, W3, DXG, 1.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_TN, offs_h, offs, E, I, D, -1, DG, XG, DW1, 1.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_TN, offs_h, offs, E, I, D, -1, DU, XG, DW3, 1.0f, NULL, e);
    free(offs_h);
    cu_scratch_free(b16, k);
    if (rc) return rc;
    moe_dx_kernel<<<(unsigned)N, D >= 256 ? 256 : 128, 0, cu_stream(k)>>>(dx, dxg, slot_row, D, K);
    LAUNCH_CHECK("moe_dx_kernel");
    return 0;
}

/* Which type / compute combinations this cuBLAS accepts for grouped GEMMs (for the bf16-storage
 * step): one 4x4x4 group per combination, "name:ok|no" pairs written into buf. */
int cuda_moe_grouped_gemm_types(const kctx *k, char *buf, size_t n, mill_err *e) {
    struct {
        const char *name;
        cudaDataType_t ab, c;
        cublasComputeType_t ct;
    } combos[] = {{"bf16->fp32/32F", CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F},
                  {"bf16->bf16/32F", CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F},
                  {"fp32->fp32/32F", CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F},
                  {"fp32->fp32/FAST_TF32", CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32},
                  {"fp32->fp32/FAST_16BF", CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16BF}};
    float *mem = NULL;
    TRY(cu_scratch((void **)&mem, sizeof(float) * 64 + 64, k, e));
    void **dp = (void **)(mem + 48);
    void *hp[3] = {mem, mem + 16, mem + 32};
    int rc = 0;
    if (cudaMemsetAsync(mem, 0, sizeof(float) * 48, cu_stream(k)) != cudaSuccess ||
        cudaMemcpyAsync(dp, hp, sizeof hp, cudaMemcpyHostToDevice, cu_stream(k)) != cudaSuccess)
        rc = mill_errf(e, "grouped probe: copy failed");
    size_t used = 0;
    buf[0] = 0;
    for (size_t i = 0; !rc && i < sizeof combos / sizeof combos[0]; i++) {
        cublasOperation_t t = CUBLAS_OP_N;
        int four = 4, one = 1;
        float a = 1.0f, b = 0.0f;
        cublasStatus_t st = cublasGemmGroupedBatchedEx(cu_blas(k), &t, &t, &four, &four, &four, &a,
                                                       (const void *const *)dp, combos[i].ab, &four,
                                                       (const void *const *)(dp + 1), combos[i].ab, &four, &b, dp + 2,
                                                       combos[i].c, &four, 1, &one, combos[i].ct);
        int w = snprintf(buf + used, n - used, "%s%s:%s", used ? " " : "", combos[i].name,
                         st == CUBLAS_STATUS_SUCCESS ? "ok" : "no");
        if (w > 0 && (size_t)w < n - used) used += (size_t)w;
    }
    if (!rc && cudaStreamSynchronize(cu_stream(k)) != cudaSuccess) rc = mill_errf(e, "grouped probe: sync failed");
    cu_scratch_free(mem, k);
    return rc;
}
