/* kernels/cuda/attention_tc.cu — the training path's sink attention on the tensor cores.
 * DeepSeek-V4's attention is multi-query: every head of a query reads the same keys (one latent KV
 * row per position, and the chosen compressed entries), so a query's heads form the M dimension of
 * the products (FlashMLA's idea): S = Q K^T is [heads x keys], O = P K is [heads x d]. One block per
 * (query, chunk of 16 RB heads), RB = min(4, ceil(H / 16)) row blocks of 16, 2 RB warps: warp w
 * owns row block w % RB and half w / RB of a 64-key tile's keys (for S) and of the d columns (for
 * O, dq and the key gradients). Operands are bf16 in shared memory (Q and the staged key tile
 * rounded from fp32 on load, P and dS rounded after the softmax), products mma.sync m16n8k16 with
 * fp32 accumulation; the softmax, its running max and sum, and every output stay fp32. The key
 * gradients go out with float2 atomics (keys are shared between queries), as the fp32 kernels'. */
#include "attention_tc.cuh"

#include <cuda_bf16.h>
#include <math.h>

typedef __nv_bfloat16 atc_bf16;

#define ATC_KT 64  /* keys per tile */
#define ATC_LDP 72 /* row stride (bf16) of P and dS: 144 bytes, conflict-free for ldmatrix */
#define ATC_NOMAX 32 /* n8 tiles of a warp's half of d: d <= 512 */

static __device__ __forceinline__ unsigned atc_addr(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }

/* Four 8x8 bf16 matrices from shared memory, lanes 8m .. 8m + 7 naming matrix m's rows. */
static __device__ __forceinline__ void atc_ldsm(unsigned (&r)[4], const atc_bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(atc_addr(p)));
}
static __device__ __forceinline__ void atc_ldsm_t(unsigned (&r)[4], const atc_bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(atc_addr(p)));
}
/* c += a b: a 16x16 (row-major fragment), b 16x8, c 16x8 fp32. */
static __device__ __forceinline__ void atc_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ void atc_put4(atc_bf16 *dst, float4 v) {
    __nv_bfloat162 *d2 = (__nv_bfloat162 *)dst;
    d2[0] = __floats2bfloat162_rn(v.x, v.y);
    d2[1] = __floats2bfloat162_rn(v.z, v.w);
}

/* dst rows [0, R) (stride ld) = bf16 of src rows r < nvalid (d floats each, stride d), zero after. */
static __device__ __forceinline__ void atc_stage_rows(atc_bf16 *dst, int ld, const float *src, int nvalid, int R,
                                                      int d) {
    int d4 = d >> 2;
    for (int t = threadIdx.x; t < R * d4; t += blockDim.x) {
        int r = t / d4, c4 = t - r * d4;
        float4 v = r < nvalid ? ((const float4 *)src)[(long)r * d4 + c4] : make_float4(0.f, 0.f, 0.f, 0.f);
        atc_put4(dst + (long)r * ld + 4 * c4, v);
    }
}

/* The key tile: rows j < nt from the list, zero rows up to ATC_KT (their scores are masked and
 * their products add zeros). */
static __device__ __forceinline__ void atc_stage_keys(atc_bf16 *Ks, int ld, const int *list, int nt, const float *kv,
                                                      const float *comp, int d) {
    int d4 = d >> 2;
    for (int t = threadIdx.x; t < ATC_KT * d4; t += blockDim.x) {
        int j = t / d4, c4 = t - j * d4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (j < nt) v = ((const float4 *)att_key(list[j], kv, comp, d))[c4];
        atc_put4(Ks + (long)j * ld + 4 * c4, v);
    }
}

/* s[n] (n8 tiles n < 4: keys 8n .. 8n + 7 of Kr) += A Kr^T over d channels: A 16 rows, Kr 32 key
 * rows, both stride ld. */
static __device__ __forceinline__ void atc_rows_keys(float (&s)[4][4], const atc_bf16 *A, const atc_bf16 *Kr, int ld,
                                                     int d, int lane) {
    const atc_bf16 *pa = A + (lane & 15) * ld + (lane >> 4) * 8;
    const atc_bf16 *pb = Kr + ((lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8;
    for (int c = 0; c < d; c += 16) {
        unsigned a[4], b[4];
        atc_ldsm(a, pa + c);
#pragma unroll
        for (int np = 0; np < 2; np++) {
            atc_ldsm(b, pb + np * 16 * ld + c);
            atc_mma(s[2 * np], a, b[0], b[1]);
            atc_mma(s[2 * np + 1], a, b[2], b[3]);
        }
    }
}

/* acc[n] (n < no: columns cb + 8n ..) += W K over the tile's first nk16 keys: W 16 rows of
 * [.. x keys] (stride ATC_LDP), K the key tile (stride ld). The forward's P K and the backward's
 * dS K. */
template <int NO>
static __device__ __forceinline__ void atc_weights_keys(float (&acc)[NO][4], const atc_bf16 *W, const atc_bf16 *Ks,
                                                        int ld, int cb, int no, int nk16, int lane) {
    const atc_bf16 *pa = W + (lane & 15) * ATC_LDP + (lane >> 4) * 8;
    const atc_bf16 *pb = Ks + (lane & 15) * ld + cb + (lane >> 4) * 8;
    for (int kk = 0; kk < nk16; kk += 16) {
        unsigned a[4];
        atc_ldsm(a, pa + kk);
#pragma unroll
        for (int np = 0; np < NO / 2; np++) {
            if (2 * np >= no) break;
            unsigned b[4];
            atc_ldsm_t(b, pb + kk * ld + np * 16);
            atc_mma(acc[2 * np], a, b[0], b[1]);
            atc_mma(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

static __device__ __forceinline__ float atc_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
static __device__ __forceinline__ float atc_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

/* The scores of a warp's 16 x 32 block scaled, keys at or past nt masked to -inf; mx = each of the
 * thread's two rows' max over the block (quad-reduced). Element c of s[n] is row g + 8 (c >> 1),
 * key kb + 8n + 2 (lane & 3) + (c & 1). */
static __device__ __forceinline__ void atc_mask(float (&s)[4][4], float (&mx)[2], int kb, int nt, float scale,
                                                int lane) {
    mx[0] = mx[1] = -INFINITY;
#pragma unroll
    for (int n = 0; n < 4; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int key = kb + 8 * n + 2 * (lane & 3) + (c & 1);
            float v = key < nt ? s[n][c] * scale : -INFINITY;
            s[n][c] = v;
            mx[c >> 1] = fmaxf(mx[c >> 1], v);
        }
    mx[0] = atc_quad_max(mx[0]);
    mx[1] = atc_quad_max(mx[1]);
}

/* Shared memory: Q (and dO) [HB x ld], the key tile [ATC_KT x ld], P (and dS) [HB x ATC_LDP] in bf16,
 * nred x HB floats of cross-warp row reductions, the key list. */
static size_t atc_smem(int HB, int d, int max_keys, int backward) {
    size_t ld = (size_t)d + 8;
    return 2 * (((backward ? 2 : 1) * (size_t)HB + ATC_KT) * ld + (backward ? 2 : 1) * (size_t)HB * ATC_LDP) +
           sizeof(float) * (backward ? 6 : 4) * (size_t)HB + sizeof(int) * (size_t)max_keys;
}

/* Grid (T, ceil(H / HB)), 64 RB threads; block x is query row x at position q0 + x. */
template <int NO>
__global__ void __launch_bounds__(256)
    atc_fwd_kernel(float *out, const float *q, const float *kv, const float *comp, const int32_t *comp_idx, int n_comp,
                   const float *sinks, int q0, int H, int d, int window, float scale) {
    extern __shared__ uint4 atc_sm[];
    const int RB = blockDim.x >> 6, HB = 16 * RB, ld = d + 8, no = d >> 4;
    atc_bf16 *Qs = (atc_bf16 *)atc_sm, *Ks = Qs + HB * ld, *Ps = Ks + ATC_KT * ld;
    float *red = (float *)(Ps + HB * ATC_LDP); /* [2][HB] maxima, then [2][HB] sums */
    int *list = (int *)(red + 4 * HB);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, rb = warp % RB, half = warp / RB, tq = lane & 3;
    int i = blockIdx.x, h0 = blockIdx.y * HB, nh = min(HB, H - h0), pos = q0 + i;
    int lo = pos - window + 1 < 0 ? 0 : pos - window + 1;
    int nk = att_fill_list(list, lo, pos - lo + 1, comp_idx + (long)i * n_comp, n_comp);
    atc_stage_rows(Qs, ld, q + ((long)i * H + h0) * d, nh, HB, d);
    const bool act = rb * 16 < nh;
    const int r0 = rb * 16 + (lane >> 2), r1 = r0 + 8, kb = 32 * half, cb = half * (d >> 1);
    /* the sink starts each head's softmax: max = sink, sum = exp(sink - max) = 1 */
    float m0 = r0 < nh ? sinks[h0 + r0] : 0.f, m1 = r1 < nh ? sinks[h0 + r1] : 0.f, l0 = 1.f, l1 = 1.f;
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    for (int t0 = 0; t0 < nk; t0 += ATC_KT) { /* nk is uniform: the barriers below are too */
        int nt = nk - t0 < ATC_KT ? nk - t0 : ATC_KT;
        __syncthreads(); /* the previous tile is consumed (first time: Qs is written) */
        atc_stage_keys(Ks, ld, list + t0, nt, kv, comp, d);
        __syncthreads();
        float s[4][4] = {}, mx[2];
        if (act) atc_rows_keys(s, Qs + rb * 16 * ld, Ks + kb * ld, ld, d, lane);
        atc_mask(s, mx, kb, nt, scale, lane);
        if (tq == 0) red[half * HB + r0] = mx[0], red[half * HB + r1] = mx[1];
        __syncthreads();
        float mn0 = fmaxf(m0, fmaxf(red[r0], red[HB + r0])), mn1 = fmaxf(m1, fmaxf(red[r1], red[HB + r1]));
        float a0 = expf(m0 - mn0), a1 = expf(m1 - mn1), sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int n = 0; n < 4; n++) {
            float p0 = expf(s[n][0] - mn0), p1 = expf(s[n][1] - mn0), p2 = expf(s[n][2] - mn1),
                  p3 = expf(s[n][3] - mn1);
            sum0 += p0 + p1;
            sum1 += p2 + p3;
            int key = kb + 8 * n + 2 * tq;
            *(__nv_bfloat162 *)(Ps + r0 * ATC_LDP + key) = __floats2bfloat162_rn(p0, p1);
            *(__nv_bfloat162 *)(Ps + r1 * ATC_LDP + key) = __floats2bfloat162_rn(p2, p3);
        }
        sum0 = atc_quad_sum(sum0);
        sum1 = atc_quad_sum(sum1);
        if (tq == 0) red[(2 + half) * HB + r0] = sum0, red[(2 + half) * HB + r1] = sum1;
        __syncthreads();
        l0 = l0 * a0 + (red[2 * HB + r0] + red[3 * HB + r0]);
        l1 = l1 * a1 + (red[2 * HB + r1] + red[3 * HB + r1]);
        m0 = mn0;
        m1 = mn1;
#pragma unroll
        for (int n = 0; n < NO; n++) o[n][0] *= a0, o[n][1] *= a0, o[n][2] *= a1, o[n][3] *= a1;
        if (act) atc_weights_keys<NO>(o, Ps + rb * 16 * ATC_LDP, Ks, ld, cb, no, (nt + 15) & ~15, lane);
    }
    if (!act) return;
    float i0 = 1.f / l0, i1 = 1.f / l1;
#pragma unroll
    for (int n = 0; n < NO; n++) {
        if (n >= no) break;
        int col = cb + 8 * n + 2 * tq;
        if (r0 < nh) *(float2 *)(out + ((long)i * H + h0 + r0) * d + col) = make_float2(o[n][0] * i0, o[n][1] * i0);
        if (r1 < nh) *(float2 *)(out + ((long)i * H + h0 + r1) * d + col) = make_float2(o[n][2] * i1, o[n][3] * i1);
    }
}

static __device__ __forceinline__ void atc_atomic_add2(float *p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd((float2 *)p, make_float2(a, b));
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

/* The backward's tile: waits until the previous tile (keys, P, dS) is consumed, stages this one,
 * and forms the warp's scores s (masked and scaled, as atc_mask) and dP = dO K^T in g. */
static __device__ __forceinline__ void atc_bwd_scores(float (&s)[4][4], float (&g)[4][4], float (&mx)[2],
                                                      atc_bf16 *Ks, const atc_bf16 *Qs, const atc_bf16 *Gs,
                                                      const int *list, int nt, const float *kv, const float *comp,
                                                      int d, int ld, int rb, int kb, bool act, float scale, int lane) {
    __syncthreads();
    atc_stage_keys(Ks, ld, list, nt, kv, comp, d);
    __syncthreads();
    if (act) {
        atc_rows_keys(s, Qs + rb * 16 * ld, Ks + kb * ld, ld, d, lane);
        atc_rows_keys(g, Gs + rb * 16 * ld, Ks + kb * ld, ld, d, lane);
    }
    atc_mask(s, mx, kb, nt, scale, lane);
}

/* Backward, same blocks and warps. Pass 1 runs the forward's online softmax and carries
 * D = sum_j p_j (do . k_j) with it; pass 2 recomputes S and dP = dO K^T per tile, forms
 * P = exp(S - max) / sum and dS = P (dP - D) scale in bf16, adds dS K to the warp's dq columns, and
 * forms the tile's key gradients dS^T Q + P^T dO (warp: key row blocks rb, rb + RB, .. of 16, its
 * half of d in chunks of 64 columns) before float2 atomics. The sink's gradient per (query, head)
 * goes to dsink_part. */
template <int NO>
__global__ void __launch_bounds__(256)
    atc_bwd_kernel(float *dq, float *dkv, float *dcomp, float *dsink_part, const float *dout, const float *q,
                   const float *kv, const float *comp, const int32_t *comp_idx, int n_comp, const float *sinks,
                   int q0, int H, int d, int window, float scale) {
    extern __shared__ uint4 atc_sm[];
    const int RB = blockDim.x >> 6, HB = 16 * RB, ld = d + 8, no = d >> 4;
    atc_bf16 *Qs = (atc_bf16 *)atc_sm, *Gs = Qs + HB * ld, *Ks = Gs + HB * ld, *Ps = Ks + ATC_KT * ld;
    atc_bf16 *DSs = Ps + HB * ATC_LDP;
    float *red = (float *)(DSs + HB * ATC_LDP); /* [2][HB] maxima, sums, p-weighted dp sums */
    int *list = (int *)(red + 6 * HB);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, rb = warp % RB, half = warp / RB, tq = lane & 3;
    int i = blockIdx.x, h0 = blockIdx.y * HB, nh = min(HB, H - h0), pos = q0 + i;
    int lo = pos - window + 1 < 0 ? 0 : pos - window + 1;
    int nk = att_fill_list(list, lo, pos - lo + 1, comp_idx + (long)i * n_comp, n_comp);
    atc_stage_rows(Qs, ld, q + ((long)i * H + h0) * d, nh, HB, d);
    atc_stage_rows(Gs, ld, dout + ((long)i * H + h0) * d, nh, HB, d);
    const bool act = rb * 16 < nh;
    const int r0 = rb * 16 + (lane >> 2), r1 = r0 + 8, kb = 32 * half, cb = half * (d >> 1);
    const int nh16 = (nh + 15) & ~15;
    float m0 = r0 < nh ? sinks[h0 + r0] : 0.f, m1 = r1 < nh ? sinks[h0 + r1] : 0.f;
    float l0 = 1.f, l1 = 1.f, D0 = 0.f, D1 = 0.f;
    for (int t0 = 0; t0 < nk; t0 += ATC_KT) {
        int nt = nk - t0 < ATC_KT ? nk - t0 : ATC_KT;
        float s[4][4] = {}, g[4][4] = {}, mx[2];
        atc_bwd_scores(s, g, mx, Ks, Qs, Gs, list + t0, nt, kv, comp, d, ld, rb, kb, act, scale, lane);
        if (tq == 0) red[half * HB + r0] = mx[0], red[half * HB + r1] = mx[1];
        __syncthreads();
        float mn0 = fmaxf(m0, fmaxf(red[r0], red[HB + r0])), mn1 = fmaxf(m1, fmaxf(red[r1], red[HB + r1]));
        float a0 = expf(m0 - mn0), a1 = expf(m1 - mn1), sum0 = 0.f, sum1 = 0.f, dd0 = 0.f, dd1 = 0.f;
#pragma unroll
        for (int n = 0; n < 4; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                float ex = expf(s[n][c] - (c < 2 ? mn0 : mn1)); /* 0 for a masked key, whose g is 0 too */
                if (c < 2)
                    sum0 += ex, dd0 += ex * g[n][c];
                else
                    sum1 += ex, dd1 += ex * g[n][c];
            }
        sum0 = atc_quad_sum(sum0), sum1 = atc_quad_sum(sum1), dd0 = atc_quad_sum(dd0), dd1 = atc_quad_sum(dd1);
        if (tq == 0) {
            red[(2 + half) * HB + r0] = sum0, red[(2 + half) * HB + r1] = sum1;
            red[(4 + half) * HB + r0] = dd0, red[(4 + half) * HB + r1] = dd1;
        }
        __syncthreads();
        l0 = l0 * a0 + (red[2 * HB + r0] + red[3 * HB + r0]);
        l1 = l1 * a1 + (red[2 * HB + r1] + red[3 * HB + r1]);
        D0 = D0 * a0 + (red[4 * HB + r0] + red[5 * HB + r0]);
        D1 = D1 * a1 + (red[4 * HB + r1] + red[5 * HB + r1]);
        m0 = mn0;
        m1 = mn1;
    }
    D0 /= l0;
    D1 /= l1;
    if (half == 0 && tq == 0) {
        if (r0 < nh) dsink_part[(long)i * H + h0 + r0] = -(expf(sinks[h0 + r0] - m0) / l0) * D0;
        if (r1 < nh) dsink_part[(long)i * H + h0 + r1] = -(expf(sinks[h0 + r1] - m1) / l1) * D1;
    }
    float dqa[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.f;
    for (int t0 = 0; t0 < nk; t0 += ATC_KT) {
        int nt = nk - t0 < ATC_KT ? nk - t0 : ATC_KT;
        float s[4][4] = {}, g[4][4] = {}, mx[2];
        atc_bwd_scores(s, g, mx, Ks, Qs, Gs, list + t0, nt, kv, comp, d, ld, rb, kb, act, scale, lane);
        float il0 = 1.f / l0, il1 = 1.f / l1;
#pragma unroll
        for (int n = 0; n < 4; n++) {
            float p[4], ds[4];
#pragma unroll
            for (int c = 0; c < 4; c++) {
                p[c] = expf(s[n][c] - (c < 2 ? m0 : m1)) * (c < 2 ? il0 : il1);
                ds[c] = p[c] * (g[n][c] - (c < 2 ? D0 : D1)) * scale;
            }
            int key = kb + 8 * n + 2 * tq;
            *(__nv_bfloat162 *)(Ps + r0 * ATC_LDP + key) = __floats2bfloat162_rn(p[0], p[1]);
            *(__nv_bfloat162 *)(Ps + r1 * ATC_LDP + key) = __floats2bfloat162_rn(p[2], p[3]);
            *(__nv_bfloat162 *)(DSs + r0 * ATC_LDP + key) = __floats2bfloat162_rn(ds[0], ds[1]);
            *(__nv_bfloat162 *)(DSs + r1 * ATC_LDP + key) = __floats2bfloat162_rn(ds[2], ds[3]);
        }
        __syncthreads(); /* the key gradients read every warp's rows of P and dS */
        int nt16 = (nt + 15) & ~15;
        if (act) atc_weights_keys<NO>(dqa, DSs + rb * 16 * ATC_LDP, Ks, ld, cb, no, nt16, lane);
        for (int kr = rb; kr * 16 < nt; kr += RB) {
            /* A = dS^T and P^T (keys x heads) read transposed from [heads x keys] */
            const int ah = (lane & 7) + ((lane >> 4) << 3), ak = kr * 16 + ((lane >> 3) & 1) * 8;
            int j0 = kr * 16 + (lane >> 2), j1 = j0 + 8;
            float *k0 = j0 < nt ? (float *)att_key(list[t0 + j0], dkv, dcomp, d) : NULL;
            float *k1 = j1 < nt ? (float *)att_key(list[t0 + j1], dkv, dcomp, d) : NULL;
            for (int c0 = 0; c0 < no; c0 += 8) {
                float acc[8][4] = {};
                for (int hh = 0; hh < nh16; hh += 16) {
                    unsigned a1[4], a2[4];
                    atc_ldsm_t(a1, DSs + (hh + ah) * ATC_LDP + ak);
                    atc_ldsm_t(a2, Ps + (hh + ah) * ATC_LDP + ak);
                    const long boff = (long)(hh + (lane & 15)) * ld + cb + 8 * c0 + (lane >> 4) * 8;
#pragma unroll
                    for (int np = 0; np < 4; np++) {
                        if (c0 + 2 * np >= no) break;
                        unsigned b[4];
                        atc_ldsm_t(b, Qs + boff + 16 * np);
                        atc_mma(acc[2 * np], a1, b[0], b[1]);
                        atc_mma(acc[2 * np + 1], a1, b[2], b[3]);
                        atc_ldsm_t(b, Gs + boff + 16 * np);
                        atc_mma(acc[2 * np], a2, b[0], b[1]);
                        atc_mma(acc[2 * np + 1], a2, b[2], b[3]);
                    }
                }
#pragma unroll
                for (int n = 0; n < 8; n++) {
                    if (c0 + n >= no) break;
                    int col = cb + 8 * (c0 + n) + 2 * tq;
                    if (k0) atc_atomic_add2(k0 + col, acc[n][0], acc[n][1]);
                    if (k1) atc_atomic_add2(k1 + col, acc[n][2], acc[n][3]);
                }
            }
        }
    }
    if (!act) return;
#pragma unroll
    for (int n = 0; n < NO; n++) {
        if (n >= no) break;
        int col = cb + 8 * n + 2 * tq;
        if (r0 < nh) {
            float2 *p = (float2 *)(dq + ((long)i * H + h0 + r0) * d + col);
            float2 v = *p;
            *p = make_float2(v.x + dqa[n][0], v.y + dqa[n][1]);
        }
        if (r1 < nh) {
            float2 *p = (float2 *)(dq + ((long)i * H + h0 + r1) * d + col);
            float2 v = *p;
            *p = make_float2(v.x + dqa[n][2], v.y + dqa[n][3]);
        }
    }
}

static int atc_rb(int H) { return H >= 64 ? 4 : (H + 15) / 16; }

/* The kernel instance for d: the smallest NO >= d / 16 of 2, 4, .., 32. */
static int atc_no(int d) {
    int no = 2;
    while (no < d / 16) no *= 2;
    return no;
}

int atc_applies(int H, int d, int max_keys, int backward, const void *const *ptrs, int n) {
    if (d < 32 || d % 32 || d > 16 * ATC_NOMAX || H <= 0) return 0;
    for (int t = 0; t < n; t++)
        if ((uintptr_t)ptrs[t] % 16) return 0;
    return atc_smem(16 * atc_rb(H), d, max_keys, backward) <= (size_t)att_smem_limit();
}

#define ATC_FOR_NO(no, CALL)                                                                                      \
    switch (no) {                                                                                                 \
    case 2: CALL(2); break;                                                                                       \
    case 4: CALL(4); break;                                                                                       \
    case 8: CALL(8); break;                                                                                       \
    case 16: CALL(16); break;                                                                                     \
    default: CALL(32); break;                                                                                     \
    }

/* A launch's row blocks per block, shared memory and grid (query rows x head chunks). */
typedef struct {
    int rb;
    size_t smem;
    dim3 grid;
} atc_plan;

static atc_plan atc_plan_for(int T, int H, int d, int window, int n_comp, int backward) {
    int rb = atc_rb(H), max_keys = window + n_comp > 0 ? window + n_comp : 1;
    return (atc_plan){rb, atc_smem(16 * rb, d, max_keys, backward), dim3(T, (H + 16 * rb - 1) / (16 * rb))};
}

int atc_sink_attention(const kctx *k, float *out, const float *q, const float *kv, const float *comp,
                       const int32_t *comp_idx, int n_comp, const float *sinks, int T, int q0, int H, int d,
                       int window, float scale, mill_err *e) {
    atc_plan p = atc_plan_for(T, H, d, window, n_comp, 0);
#define ATC_FWD(NO)                                                                                               \
    do {                                                                                                          \
        TRY(att_smem_ok((const void *)atc_fwd_kernel<NO>, p.smem, e));                                            \
        atc_fwd_kernel<NO><<<p.grid, 64 * p.rb, p.smem, cu_stream(k)>>>(out, q, kv, comp, comp_idx, n_comp, sinks,  \
                                                                         q0, H, d, window, scale);                \
    } while (0)
    ATC_FOR_NO(atc_no(d), ATC_FWD)
#undef ATC_FWD
    LAUNCH_CHECK("atc_fwd_kernel");
    return 0;
}

int atc_sink_attention_backward(const kctx *k, float *dq, float *dkv, float *dcomp, float *dsink_part,
                                const float *dout, const float *q, const float *kv, const float *comp,
                                const int32_t *comp_idx, int n_comp, const float *sinks, int T, int q0, int H, int d,
                                int window, float scale, mill_err *e) {
    atc_plan p = atc_plan_for(T, H, d, window, n_comp, 1);
#define ATC_BWD(NO)                                                                                               \
    do {                                                                                                          \
        TRY(att_smem_ok((const void *)atc_bwd_kernel<NO>, p.smem, e));                                            \
        atc_bwd_kernel<NO><<<p.grid, 64 * p.rb, p.smem, cu_stream(k)>>>(dq, dkv, dcomp, dsink_part, dout, q, kv,    \
                                                                         comp, comp_idx, n_comp, sinks, q0, H, d, \
                                                                         window, scale);                          \
    } while (0)
    ATC_FOR_NO(atc_no(d), ATC_BWD)
#undef ATC_BWD
    LAUNCH_CHECK("atc_bwd_kernel");
    return 0;
}
