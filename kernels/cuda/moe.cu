/* kernels/cuda/moe.cu — CUDA paths of kernels/moe.h.
 * Routing: one thread per token (scores, top-k with ties to the lower expert id, weights). The
 * scores' exp/log1p round through double so they land on the correctly rounded float the CPU's libm
 * gives: selection compares scores, and a one-ulp difference could flip a near tie.
 * Experts: a device-side stable counting sort groups the N*K (token, slot) rows by expert (a warp
 * per chunk of rows: per-chunk counts, one scan block, then ranks within each chunk; each expert's
 * rows in token order, exactly the CPU's grouping); the expert starts come back to the host once
 * (cuBLAS takes group shapes from host memory); each projection over all experts is then tried as
 * ONE cublasGemmGroupedBatchedEx call with one group per non-empty expert, on bf16 copies of the operands (bf16 tensor cores, fp32
 * accumulation and output), falling back to one cublasGemmEx per expert with the same types when
 * the library refuses. cuBLAS 13.0 (H100, 2026-11) refuses grouped bf16 x bf16 -> fp32 (it takes
 * bf16 -> bf16 and fp32 -> fp32 plain or TF32, see cuda_moe_grouped_gemm_types), so today the
 * per-expert path runs: E launches per projection, each a bf16 tensor-core GEMM.
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

/* For every non-empty expert: C_ex = shape(A_ex, B_ex) (+ C_ex when beta = 1), where M, N or K
 * given as -1 means "this expert's row count". A and B are rounded to bf16 copies (whole operands:
 * with fp32 storage that is one pass each; bf16 storage will remove it), then ONE grouped GEMM
 * (bf16 x bf16 -> fp32, fp32 accumulation) covers all experts; if cuBLAS refuses the grouped call,
 * one cublasGemmEx per expert with the same types. */
static int moe_gemm(const kctx *k, cu_gemm_shape shape, const int32_t *offs_h, int E, int M, int N, int K,
                    moe_operand A, moe_operand B, moe_operand C, float beta, int *used_grouped, mill_err *e) {
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
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, 2, -1, 4, 4, X, W, Y, 0.0f, &used, e);
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
    return !k->gemm_fp32 && NK <= MOE_SMALL_ROWS && D % 8 == 0 && I % 8 == 0 && E <= 65535;
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
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, E, -1, I, D, XG, W1, G_, 0.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, E, -1, I, D, XG, W3, U, 0.0f, NULL, e);
    if (!rc) rc = cuda_op_swiglu_clamp(k, g, g, u, NK * I, limit, e);
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, E, -1, D, I, G_, W2, Y, 0.0f, NULL, e);
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
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, E, -1, I, D, XG, W1, G_, 0.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, E, -1, I, D, XG, W3, U, 0.0f, NULL, e);
    if (!rc) rc = cuda_op_swiglu_clamp(k, act, g, u, NK * I, limit, e);
    if (!rc && a16) rc = cu_to_bf16(k, a16, act, NK, I, I, e);
    if (!rc) rc = moe_gemm(k, GEMM_NT, offs_h, E, -1, D, I, ACT, W2, Y, 0.0f, NULL, e);
    if (!rc && NK > 0) {
        moe_dweights_kernel<<<cu_blocks(NK, 8), 256, 0, cu_stream(k)>>>(dweights, dy, dy16, dout, y, weights,
                                                                         slot_row, NK, D, K);
        cudaError_t le = cudaGetLastError();
        if (le != cudaSuccess) rc = mill_errf(e, "moe_dweights_kernel: launch failed: %s", cudaGetErrorString(le));
    }
    /* dw2 += dy^T act, then act's rows become dact = dy @ w2 (a16 still holds act until dg replaces it) */
    if (!rc) rc = moe_gemm(k, GEMM_TN, offs_h, E, D, I, -1, DY, ACT, DW2, 1.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_NN, offs_h, E, -1, I, D, DY, W2, DACT, 0.0f, NULL, e);
    if (!rc) rc = cu_swiglu_backward_write(k, dg, du, act, g, u, NK * I, limit, e);
    if (!rc && a16) rc = cu_to_bf16(k, a16, dg, NK, I, I, e);
    if (!rc && du16) rc = cu_to_bf16(k, du16, du, NK, I, I, e);
    if (!rc) rc = moe_gemm(k, GEMM_NN, offs_h, E, -1, D, I, DG, W1, DXG, 0.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_NN, offs_h, E, -1, D, I, DU, W3, DXG, 1.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_TN, offs_h, E, I, D, -1, DG, XG, DW1, 1.0f, NULL, e);
    if (!rc) rc = moe_gemm(k, GEMM_TN, offs_h, E, I, D, -1, DU, XG, DW3, 1.0f, NULL, e);
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
