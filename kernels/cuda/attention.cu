/* kernels/cuda/attention.cu — CUDA paths of kernels/attention.h.
 * Sink attention (training path): on the tensor cores (attention_tc.cu) with kctx.attention_tc
 * where those kernels apply (d a multiple of 32 up to 512, not kctx.gemm_fp32); otherwise the fp32
 * kernels here. Tiled fp32: one block per (query, chunk of 16 heads) — all heads of the
 * chunk share each tile of 32 keys staged in shared memory (a query's keys are read once per chunk,
 * not once per head); online softmax per head started from the sink, fp32 throughout. The backward
 * uses the same blocks: a pass for each head's softmax sum and D = sum p dp, then a pass for dq and
 * the tile's key gradients summed over the chunk's heads, added with float4 atomics (many queries
 * share a key; so not bit-reproducible, as before). Rows that are not 16-byte aligned, d not a
 * multiple of 4 or over 512, and the engine's decode (op_cache_attend) run the per-head kernels:
 * one block per (query, head), a two-pass softmax; the backward one block per query over chunks of
 * heads. Compressor pooling and the indexer are one thread per output (channel-coalesced) and one
 * warp per compressed entry; top-k ranks every visible entry against the others, which reproduces
 * the CPU order exactly (value descending, ties to the lower index). */
#include "attention_tc.cuh"

#include <math.h>

#define ATT_THREADS 128
#define ATT_BWD_HEADS 8 /* heads per chunk in the backward: bounds shared memory for any H */

/* Key list of query row i at position p, in the CPU's order: window rows as codes j >= 0, then the
 * chosen compressed entries w as codes -1 - w. Written by thread 0 (at most window + n_comp entries). */
__device__ int att_build_list(int *list, int i, int p, const int32_t *comp_idx, int n_comp, int window) {
    __shared__ int nk_sh;
    if (threadIdx.x == 0) {
        int nk = 0;
        for (int j = p - window + 1 < 0 ? 0 : p - window + 1; j <= p; j++) list[nk++] = j;
        for (int c = 0; c < n_comp; c++) {
            int32_t w = comp_idx[(long)i * n_comp + c];
            if (w >= 0) list[nk++] = -1 - w;
        }
        nk_sh = nk;
    }
    __syncthreads();
    return nk_sh;
}

/* Key list of wave token j in the engine's cache (op_cache_attend): ring rows as codes >= 0 (row
 * i % window), then entries w as codes -1 - w: all visible ones, or the indexer's selection. */
__device__ int att_build_cache_list(int *list, int p, const int32_t *sel, int topk, int ratio, int max_entries,
                                    int window) {
    __shared__ int nk_sh;
    if (threadIdx.x == 0) {
        int nk = 0;
        for (int j = p - window + 1 < 0 ? 0 : p - window + 1; j <= p; j++) list[nk++] = j % window;
        int visible = ratio ? (p + 1) / ratio : 0;
        if (ratio && !sel)
            for (int w = 0; w < visible && w < max_entries; w++) list[nk++] = -1 - w;
        if (ratio && sel)
            for (int c = 0; c < topk; c++)
                if (sel[c] >= 0) list[nk++] = -1 - sel[c];
        nk_sh = nk;
    }
    __syncthreads();
    return nk_sh;
}

/* out[q, h] over its keys. CACHE: query j of an engine wave over its sequence's caches (layer
 * `layer`); otherwise query row i at position q0 + i of a sequence over the window of kv plus
 * comp_idx (op_sink_attention). Grid (queries, H). */
template <bool CACHE>
__global__ void attend_kernel(float *out, const float *q, const float *kv, const float *comp,
                              const int32_t *comp_idx, int n_comp, int q0, attn_wave wv, int layer, int ratio,
                              int max_entries, const float *sinks, int H, int d, int window, int max_keys,
                              float scale) {
    extern __shared__ float sm[];
    float *qs = sm, *s = qs + d;
    int *list = (int *)(s + max_keys);
    __shared__ float red[32];
    int i = blockIdx.x, h = blockIdx.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int nk;
    if (CACHE) {
        const attn_layer_cache *lc = &wv.seq[i][layer];
        kv = lc->ring;
        comp = lc->comp.entries;
        nk = att_build_cache_list(list, wv.pos[i], comp_idx ? comp_idx + (long)i * n_comp : NULL, n_comp, ratio,
                                  max_entries, window);
        i = wv.row[i]; /* q and out rows */
    } else {
        nk = att_build_list(list, i, q0 + i, comp_idx, n_comp, window);
    }
    const float *qi = q + ((long)i * H + h) * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) qs[c] = qi[c];
    __syncthreads();
    for (int j = warp; j < nk; j += nw) {
        const float *kj = att_key(list[j], kv, comp, d);
        float dot = 0.f;
        for (int c = lane; c < d; c += 32) dot += qs[c] * kj[c];
        dot = cu_warp_sum(dot);
        if (lane == 0) s[j] = dot * scale;
    }
    __syncthreads();
    float mx = sinks[h];
    for (int j = threadIdx.x; j < nk; j += blockDim.x) mx = fmaxf(mx, s[j]);
    mx = cu_block_max(mx, red);
    float den = 0.f;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        float v = expf(s[j] - mx);
        s[j] = v;
        den += v;
    }
    den = cu_block_sum(den, red) + expf(sinks[h] - mx);
    float *o = out + ((long)i * H + h) * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < nk; j++) acc += (s[j] / den) * att_key(list[j], kv, comp, d)[c];
        o[c] = acc;
    }
}

/* ---- Tiled sink attention for the training path: one block per (query, chunk of ATF_HEADS heads),
 * so a query's keys are read once per chunk instead of once per head. Warp w owns heads
 * 4w .. 4w+3 of the chunk: it computes their scores (lane = key of the tile), keeps their online
 * softmax state (the sink starts it: max = sink, sum = 1) and accumulates their outputs (lane =
 * channel quad). Keys are staged ATF_KT rows at a time in shared memory. fp32 throughout. */
#define ATF_WARPS 4
#define ATF_THREADS (32 * ATF_WARPS)
#define ATF_HPW 4                       /* heads per warp */
#define ATF_HEADS (ATF_WARPS * ATF_HPW) /* heads per block */
#define ATF_KT 32                       /* keys per tile: one per lane for the scores */
#define ATF_DMAX 512                    /* channel quads lane + 32 m, m < 4 */

/* Row stride of the key tile in floats: an odd number of float4s, so the 8 lanes of a quarter-warp
 * reading 8 different rows at one column hit 8 different 16-byte bank groups. */
static __host__ __device__ __forceinline__ int att_ldk(int d) { return 4 * ((d >> 2) | 1); }

/* Ks[j, :] = key list[j] for j < nt, zero rows after (their scores stay finite; they are masked). */
__device__ __forceinline__ void att_load_tile(float *Ks, const int *list, int nt, const float *kv, const float *comp,
                                              int d, int ldk) {
    int d4 = d >> 2;
    for (int t = threadIdx.x; t < ATF_KT * d4; t += blockDim.x) {
        int j = t / d4, c4 = t - j * d4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (j < nt) v = ((const float4 *)att_key(list[j], kv, comp, d))[c4];
        *(float4 *)(Ks + (long)j * ldk + 4 * c4) = v;
    }
}

/* rows [0, ATF_HEADS) of dst (stride d) = rows h0 + r of src ([H, d] from row 0), zero past H. */
__device__ __forceinline__ void att_load_heads(float *dst, const float *src, int h0, int H, int d) {
    int d4 = d >> 2;
    for (int t = threadIdx.x; t < ATF_HEADS * d4; t += blockDim.x) {
        int r = t / d4, c4 = t - r * d4;
        ((float4 *)dst)[t] =
            h0 + r < H ? ((const float4 *)src)[(long)(h0 + r) * d4 + c4] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

__device__ __forceinline__ float att_dot4(float4 a, float4 b, float acc) {
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
    acc = fmaf(a.z, b.z, acc);
    return fmaf(a.w, b.w, acc);
}

__device__ __forceinline__ void att_axpy4(float4 &acc, float a, float4 x) {
    acc.x = fmaf(a, x.x, acc.x);
    acc.y = fmaf(a, x.y, acc.y);
    acc.z = fmaf(a, x.z, acc.z);
    acc.w = fmaf(a, x.w, acc.w);
}

/* acc[r][c] += sum_j W[j][hw + r] K[j] over a staged key tile (j < nt, in order): the forward's
 * p-weighted values and the backward's ds-weighted dq, for a warp's ATF_HPW heads and its lane's
 * float4 columns c4 = lane + 32 c < d4. */
template <int NC>
__device__ __forceinline__ void att_tile_weighted_keys(float4 (&acc)[ATF_HPW][NC], const float *W, const float *Ks,
                                                       int ldk, int nt, int hw, int lane, int d4) {
    for (int j = 0; j < nt; j++) {
        float4 w4 = *(const float4 *)(W + j * ATF_HEADS + hw);
        const float *kr = Ks + (long)j * ldk;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            int c4 = lane + 32 * c;
            if (c4 < d4) {
                float4 k = *(const float4 *)(kr + 4 * c4);
                att_axpy4(acc[0][c], w4.x, k);
                att_axpy4(acc[1][c], w4.y, k);
                att_axpy4(acc[2][c], w4.z, k);
                att_axpy4(acc[3][c], w4.w, k);
            }
        }
    }
}

__device__ __forceinline__ float att_pick(float4 v, int r) { return r == 0 ? v.x : r == 1 ? v.y : r == 2 ? v.z : v.w; }

/* s[r] = row . Qw[r] for the warp's 4 heads (Qw: stride d), over d channels. */
__device__ __forceinline__ void att_scores(float *s, const float *row, const float *Qw, int d) {
#pragma unroll
    for (int r = 0; r < ATF_HPW; r++) s[r] = 0.f;
    for (int c = 0; c < d; c += 4) {
        float4 k = *(const float4 *)(row + c);
#pragma unroll
        for (int r = 0; r < ATF_HPW; r++) s[r] = att_dot4(*(const float4 *)(Qw + (long)r * d + c), k, s[r]);
    }
}

/* NC channel quads per lane (d <= 128 NC). Grid (T, ceil(H / ATF_HEADS)), ATF_THREADS threads; block
 * x is query row x at position q0 + x. */
template <int NC>
__global__ void __launch_bounds__(ATF_THREADS)
    attend_tiled_kernel(float *out, const float *q, const float *kv, const float *comp, const int32_t *comp_idx,
                        int n_comp, const float *sinks, int q0, int H, int d, int window, float scale) {
    extern __shared__ float4 sm4[]; /* float4: the base is 16-byte aligned */
    int ldk = att_ldk(d), d4 = d >> 2;
    float *Qs = (float *)sm4, *Ks = Qs + ATF_HEADS * d, *Ps = Ks + ATF_KT * ldk;
    int *list = (int *)(Ps + ATF_KT * ATF_HEADS);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int i = blockIdx.x, h0 = blockIdx.y * ATF_HEADS, hw = warp * ATF_HPW, pos = q0 + i;
    int lo = pos - window + 1 < 0 ? 0 : pos - window + 1;
    int nk = att_fill_list(list, lo, pos - lo + 1, comp_idx + (long)i * n_comp, n_comp);
    att_load_heads(Qs, q + (long)i * H * d, h0, H, d);
    float m[ATF_HPW], l[ATF_HPW];
    float4 acc[ATF_HPW][NC];
#pragma unroll
    for (int r = 0; r < ATF_HPW; r++) {
        m[r] = h0 + hw + r < H ? sinks[h0 + hw + r] : 0.f;
        l[r] = 1.f; /* exp(sink - max) with max = sink */
#pragma unroll
        for (int c = 0; c < NC; c++) acc[r][c] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int t0 = 0; t0 < nk; t0 += ATF_KT) { /* nk is uniform: the barriers below are too */
        int nt = nk - t0 < ATF_KT ? nk - t0 : ATF_KT;
        __syncthreads(); /* the previous tile is consumed (first time: Qs is written) */
        att_load_tile(Ks, list + t0, nt, kv, comp, d, ldk);
        __syncthreads();
        float s[ATF_HPW], p[ATF_HPW], alpha[ATF_HPW];
        att_scores(s, Ks + (long)lane * ldk, Qs + (long)hw * d, d);
#pragma unroll
        for (int r = 0; r < ATF_HPW; r++) {
            float sc = lane < nt ? s[r] * scale : -INFINITY;
            float mn = fmaxf(m[r], cu_warp_max(sc));
            alpha[r] = expf(m[r] - mn);
            p[r] = expf(sc - mn); /* 0 for a masked lane */
            l[r] = l[r] * alpha[r] + cu_warp_sum(p[r]);
            m[r] = mn;
        }
        *(float4 *)(Ps + lane * ATF_HEADS + hw) = make_float4(p[0], p[1], p[2], p[3]);
        __syncwarp(); /* the warp reads its own heads' columns only */
#pragma unroll
        for (int r = 0; r < ATF_HPW; r++)
#pragma unroll
            for (int c = 0; c < NC; c++) {
                acc[r][c].x *= alpha[r];
                acc[r][c].y *= alpha[r];
                acc[r][c].z *= alpha[r];
                acc[r][c].w *= alpha[r];
            }
        att_tile_weighted_keys<NC>(acc, Ps, Ks, ldk, nt, hw, lane, d4);
    }
#pragma unroll
    for (int r = 0; r < ATF_HPW; r++) {
        int h = h0 + hw + r;
        if (h >= H) continue;
        float inv = 1.f / l[r];
        float4 *o = (float4 *)(out + ((long)i * H + h) * d);
#pragma unroll
        for (int c = 0; c < NC; c++) {
            int c4 = lane + 32 * c;
            if (c4 < d4) o[c4] = make_float4(acc[r][c].x * inv, acc[r][c].y * inv, acc[r][c].z * inv, acc[r][c].w * inv);
        }
    }
}

__device__ __forceinline__ void att_atomic_add4(float *p, float4 v) {
#if __CUDA_ARCH__ >= 900
    atomicAdd((float4 *)p, v); /* one vector reduction instead of four */
#else
    atomicAdd(p, v.x);
    atomicAdd(p + 1, v.y);
    atomicAdd(p + 2, v.z);
    atomicAdd(p + 3, v.w);
#endif
}

/* Backward, same blocks and warp/head ownership. Pass 1 runs the forward's online softmax and
 * carries D = sum_j p_j (do . k_j) the same way (rescaled with the max); pass 2 recomputes the
 * scores, p and ds = p (dp - D) scale per tile: dq of the warp's heads from its own columns, then
 * the tile's key gradients sum all ATF_HEADS heads (thread: rows warp + 4 r, one channel quad)
 * before one float4 atomic per key quad (keys are shared between queries). The sink's gradient per
 * (query, head) goes to dsink_part, summed in query order afterwards. */
template <int NC>
__global__ void __launch_bounds__(ATF_THREADS)
    attend_bwd_tiled_kernel(float *dq, float *dkv, float *dcomp, float *dsink_part, const float *dout, const float *q,
                            const float *kv, const float *comp, const int32_t *comp_idx, int n_comp,
                            const float *sinks, int q0, int H, int d, int window, float scale) {
    extern __shared__ float4 sm4[];
    int ldk = att_ldk(d), d4 = d >> 2;
    float *Qs = (float *)sm4, *Gs = Qs + ATF_HEADS * d, *Ks = Gs + ATF_HEADS * d;
    float *Ps = Ks + ATF_KT * ldk, *DSs = Ps + ATF_KT * ATF_HEADS;
    int *list = (int *)(DSs + ATF_KT * ATF_HEADS);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int i = blockIdx.x, h0 = blockIdx.y * ATF_HEADS, hw = warp * ATF_HPW, pos = q0 + i;
    int lo = pos - window + 1 < 0 ? 0 : pos - window + 1;
    int nk = att_fill_list(list, lo, pos - lo + 1, comp_idx + (long)i * n_comp, n_comp);
    att_load_heads(Qs, q + (long)i * H * d, h0, H, d);
    att_load_heads(Gs, dout + (long)i * H * d, h0, H, d);
    float m[ATF_HPW], l[ATF_HPW], D[ATF_HPW];
#pragma unroll
    for (int r = 0; r < ATF_HPW; r++) {
        m[r] = h0 + hw + r < H ? sinks[h0 + hw + r] : 0.f;
        l[r] = 1.f;
        D[r] = 0.f;
    }
    for (int t0 = 0; t0 < nk; t0 += ATF_KT) {
        int nt = nk - t0 < ATF_KT ? nk - t0 : ATF_KT;
        __syncthreads();
        att_load_tile(Ks, list + t0, nt, kv, comp, d, ldk);
        __syncthreads();
        float s[ATF_HPW], g[ATF_HPW];
        att_scores(s, Ks + (long)lane * ldk, Qs + (long)hw * d, d);
        att_scores(g, Ks + (long)lane * ldk, Gs + (long)hw * d, d);
#pragma unroll
        for (int r = 0; r < ATF_HPW; r++) {
            float sc = lane < nt ? s[r] * scale : -INFINITY;
            float mn = fmaxf(m[r], cu_warp_max(sc));
            float alpha = expf(m[r] - mn), ex = expf(sc - mn);
            l[r] = l[r] * alpha + cu_warp_sum(ex);
            D[r] = D[r] * alpha + cu_warp_sum(ex * g[r]); /* g is 0 on a zero row, so masked lanes add 0 */
            m[r] = mn;
        }
    }
#pragma unroll
    for (int r = 0; r < ATF_HPW; r++) {
        int h = h0 + hw + r;
        D[r] /= l[r];
        if (h < H && lane == 0) dsink_part[(long)i * H + h] = -(expf(sinks[h] - m[r]) / l[r]) * D[r];
    }
    float4 dqa[ATF_HPW][NC];
#pragma unroll
    for (int r = 0; r < ATF_HPW; r++)
#pragma unroll
        for (int c = 0; c < NC; c++) dqa[r][c] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int t0 = 0; t0 < nk; t0 += ATF_KT) {
        int nt = nk - t0 < ATF_KT ? nk - t0 : ATF_KT;
        __syncthreads(); /* Ks, Ps, DSs of the previous tile are consumed */
        att_load_tile(Ks, list + t0, nt, kv, comp, d, ldk);
        __syncthreads();
        float s[ATF_HPW], g[ATF_HPW], p[ATF_HPW], ds[ATF_HPW];
        att_scores(s, Ks + (long)lane * ldk, Qs + (long)hw * d, d);
        att_scores(g, Ks + (long)lane * ldk, Gs + (long)hw * d, d);
#pragma unroll
        for (int r = 0; r < ATF_HPW; r++) {
            p[r] = lane < nt && h0 + hw + r < H ? expf(s[r] * scale - m[r]) / l[r] : 0.f;
            ds[r] = p[r] * (g[r] - D[r]) * scale;
        }
        *(float4 *)(Ps + lane * ATF_HEADS + hw) = make_float4(p[0], p[1], p[2], p[3]);
        *(float4 *)(DSs + lane * ATF_HEADS + hw) = make_float4(ds[0], ds[1], ds[2], ds[3]);
        __syncthreads(); /* the key gradients read every warp's columns */
        att_tile_weighted_keys<NC>(dqa, DSs, Ks, ldk, nt, hw, lane, d4);
#pragma unroll
        for (int c = 0; c < NC; c++) {
            int c4 = lane + 32 * c;
            if (c4 >= d4) continue; /* no barrier below */
            float4 a[ATF_KT / ATF_WARPS];
#pragma unroll
            for (int rr = 0; rr < ATF_KT / ATF_WARPS; rr++) a[rr] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int hq = 0; hq < ATF_HEADS; hq += 4) {
                float4 qv[4], gv[4];
#pragma unroll
                for (int x = 0; x < 4; x++) {
                    qv[x] = *(const float4 *)(Qs + (long)(hq + x) * d + 4 * c4);
                    gv[x] = *(const float4 *)(Gs + (long)(hq + x) * d + 4 * c4);
                }
#pragma unroll
                for (int rr = 0; rr < ATF_KT / ATF_WARPS; rr++) {
                    int j = warp + ATF_WARPS * rr;
                    float4 dsv = *(const float4 *)(DSs + j * ATF_HEADS + hq);
                    float4 pv = *(const float4 *)(Ps + j * ATF_HEADS + hq);
#pragma unroll
                    for (int x = 0; x < 4; x++) {
                        att_axpy4(a[rr], att_pick(dsv, x), qv[x]);
                        att_axpy4(a[rr], att_pick(pv, x), gv[x]);
                    }
                }
            }
#pragma unroll
            for (int rr = 0; rr < ATF_KT / ATF_WARPS; rr++) {
                int j = warp + ATF_WARPS * rr;
                if (j >= nt) continue;
                int code = list[t0 + j];
                float *dk = code >= 0 ? dkv + (long)code * d : dcomp + (long)(-1 - code) * d;
                att_atomic_add4(dk + 4 * c4, a[rr]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ATF_HPW; r++) {
        int h = h0 + hw + r;
        if (h >= H) continue;
        float4 *o = (float4 *)(dq + ((long)i * H + h) * d);
#pragma unroll
        for (int c = 0; c < NC; c++) {
            int c4 = lane + 32 * c;
            if (c4 >= d4) continue;
            float4 v = o[c4];
            v.x += dqa[r][c].x;
            v.y += dqa[r][c].y;
            v.z += dqa[r][c].z;
            v.w += dqa[r][c].w;
            o[c4] = v;
        }
    }
}

/* Channel quads per lane for the tiled kernels, or 0 when they do not apply (d not a multiple of 4
 * or over ATF_DMAX, or a row pointer not 16-byte aligned): the per-head kernels run then. */
static int att_tiled_nc(int d, const void *const *ptrs, int n) {
    if (d < 4 || d % 4 || d > ATF_DMAX) return 0;
    for (int t = 0; t < n; t++)
        if ((uintptr_t)ptrs[t] % 16) return 0;
    int nc = (d / 4 + 31) / 32;
    return nc == 3 ? 4 : nc;
}

static size_t att_fwd_smem(int d, int max_keys) {
    return sizeof(float) * ((size_t)ATF_HEADS * d + (size_t)ATF_KT * att_ldk(d) + ATF_KT * ATF_HEADS) +
           sizeof(int) * (size_t)max_keys;
}
static size_t att_bwd_smem(int d, int max_keys) {
    return sizeof(float) * (2 * (size_t)ATF_HEADS * d + (size_t)ATF_KT * att_ldk(d) + 2 * ATF_KT * ATF_HEADS) +
           sizeof(int) * (size_t)max_keys;
}

int cuda_op_sink_attention(const kctx *k, float *out, const float *q, const float *kv, const float *comp,
                           const int32_t *comp_idx, int n_comp, const float *sinks, int T, int q0, int H, int d,
                           int window, float scale, mill_err *e) {
    if (T <= 0 || H <= 0) return 0;
    int max_keys = window + n_comp > 0 ? window + n_comp : 1;
    const void *rows[] = {out, q, kv, comp};
    if (k->attention_tc && !k->gemm_fp32 && atc_applies(H, d, max_keys, 0, rows, 4))
        return atc_sink_attention(k, out, q, kv, comp, comp_idx, n_comp, sinks, T, q0, H, d, window, scale, e);
    int nc = att_tiled_nc(d, rows, 4);
    if (nc) {
        size_t smem = att_fwd_smem(d, max_keys);
        dim3 grid(T, (H + ATF_HEADS - 1) / ATF_HEADS);
        const void *fn = nc == 1   ? (const void *)attend_tiled_kernel<1>
                         : nc == 2 ? (const void *)attend_tiled_kernel<2>
                                   : (const void *)attend_tiled_kernel<4>;
        TRY(att_smem_ok(fn, smem, e));
        if (nc == 1)
            attend_tiled_kernel<1><<<grid, ATF_THREADS, smem, cu_stream(k)>>>(out, q, kv, comp, comp_idx, n_comp,
                                                                              sinks, q0, H, d, window, scale);
        else if (nc == 2)
            attend_tiled_kernel<2><<<grid, ATF_THREADS, smem, cu_stream(k)>>>(out, q, kv, comp, comp_idx, n_comp,
                                                                              sinks, q0, H, d, window, scale);
        else
            attend_tiled_kernel<4><<<grid, ATF_THREADS, smem, cu_stream(k)>>>(out, q, kv, comp, comp_idx, n_comp,
                                                                              sinks, q0, H, d, window, scale);
        LAUNCH_CHECK("attend_tiled_kernel");
        return 0;
    }
    size_t smem = sizeof(float) * (size_t)(d + max_keys) + sizeof(int) * (size_t)max_keys;
    TRY(att_smem_ok((const void *)attend_kernel<false>, smem, e));
    attn_wave none = {0, NULL, NULL, NULL};
    attend_kernel<false><<<dim3(T, H), ATT_THREADS, smem, cu_stream(k)>>>(out, q, kv, comp, comp_idx, n_comp, q0, none,
                                                                         0, 0, 0, sinks, H, d, window, max_keys, scale);
    LAUNCH_CHECK("attend_kernel");
    return 0;
}

int cuda_op_cache_attend(const kctx *k, float *out, const float *q, attn_wave w, int layer, const int32_t *sel,
                         int topk, int ratio, int max_entries, const float *sinks, int H, int d, int window,
                         float scale, mill_err *e) {
    if (w.n <= 0 || H <= 0) return 0;
    int max_keys = window + (!ratio ? 0 : sel ? topk : max_entries);
    if (max_keys < 1) max_keys = 1;
    size_t smem = sizeof(float) * (size_t)(d + max_keys) + sizeof(int) * (size_t)max_keys;
    TRY(att_smem_ok((const void *)attend_kernel<true>, smem, e));
    attend_kernel<true><<<dim3(w.n, H), ATT_THREADS, smem, cu_stream(k)>>>(out, q, NULL, NULL, sel, topk, 0, w, layer,
                                                                          ratio, max_entries, sinks, H, d, window,
                                                                          max_keys, scale);
    LAUNCH_CHECK("attend_kernel");
    return 0;
}

/* Backward, one block per query (row i at position q0 + i). Per head of a chunk: p, ds = p (dp - D)
 * scale, dq; then the chunk's key gradients sum over its heads before one atomic add per key
 * element. The sink's gradient per (query, head) goes to dsink_part, summed per head in query order
 * afterwards. */
__global__ void attend_bwd_kernel(float *dq, float *dkv, float *dcomp, float *dsink_part, const float *dout,
                                  const float *q, const float *kv, const float *comp, const int32_t *comp_idx,
                                  int n_comp, const float *sinks, int q0, int H, int d, int window, int max_keys,
                                  float scale) {
    extern __shared__ float sm[];
    float *P = sm, *DS = P + ATT_BWD_HEADS * max_keys;
    int *list = (int *)(DS + ATT_BWD_HEADS * max_keys);
    __shared__ float red[32];
    int i = blockIdx.x;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int nk = att_build_list(list, i, q0 + i, comp_idx, n_comp, window);
    for (int h0 = 0; h0 < H; h0 += ATT_BWD_HEADS) {
        int nh = H - h0 < ATT_BWD_HEADS ? H - h0 : ATT_BWD_HEADS;
        for (int hh = 0; hh < nh; hh++) {
            int h = h0 + hh;
            const float *qi = q + ((long)i * H + h) * d, *go = dout + ((long)i * H + h) * d;
            float *p = P + hh * max_keys, *dp = DS + hh * max_keys;
            for (int j = warp; j < nk; j += nw) {
                const float *kj = att_key(list[j], kv, comp, d);
                float a = 0.f, b = 0.f;
                for (int c = lane; c < d; c += 32) {
                    a += qi[c] * kj[c];
                    b += go[c] * kj[c];
                }
                a = cu_warp_sum(a);
                b = cu_warp_sum(b);
                if (lane == 0) {
                    p[j] = a * scale;
                    dp[j] = b;
                }
            }
            __syncthreads();
            float mx = sinks[h];
            for (int j = threadIdx.x; j < nk; j += blockDim.x) mx = fmaxf(mx, p[j]);
            mx = cu_block_max(mx, red);
            float den = 0.f;
            for (int j = threadIdx.x; j < nk; j += blockDim.x) den += expf(p[j] - mx);
            float psink = expf(sinks[h] - mx);
            den = cu_block_sum(den, red) + psink;
            psink /= den;
            float D = 0.f;
            for (int j = threadIdx.x; j < nk; j += blockDim.x) {
                float pj = expf(p[j] - mx) / den;
                p[j] = pj;
                D += pj * dp[j];
            }
            D = cu_block_sum(D, red);
            if (threadIdx.x == 0) dsink_part[(long)i * H + h] = -psink * D;
            for (int j = threadIdx.x; j < nk; j += blockDim.x) dp[j] = p[j] * (dp[j] - D) * scale;
            __syncthreads();
            float *dqi = dq + ((long)i * H + h) * d;
            for (int c = threadIdx.x; c < d; c += blockDim.x) {
                float acc = dqi[c];
                for (int j = 0; j < nk; j++) acc += dp[j] * att_key(list[j], kv, comp, d)[c];
                dqi[c] = acc;
            }
        }
        __syncthreads();
        for (int j = 0; j < nk; j++) {
            int code = list[j];
            float *dk = code >= 0 ? dkv + (long)code * d : dcomp + (long)(-1 - code) * d;
            for (int c = threadIdx.x; c < d; c += blockDim.x) {
                float acc = 0.f;
                for (int hh = 0; hh < nh; hh++) {
                    long row = ((long)i * H + h0 + hh) * d;
                    acc += DS[hh * max_keys + j] * q[row + c] + P[hh * max_keys + j] * dout[row + c];
                }
                atomicAdd(dk + c, acc);
            }
        }
        __syncthreads(); /* P and DS are rewritten by the next chunk */
    }
}

__global__ void dsink_reduce_kernel(float *dsinks, const float *part, int T, int H) {
    int h = blockIdx.x * blockDim.x + threadIdx.x;
    if (h >= H) return;
    float acc = dsinks[h];
    for (int i = 0; i < T; i++) acc += part[(long)i * H + h];
    dsinks[h] = acc;
}

int cuda_op_sink_attention_backward(const kctx *k, float *dq, float *dkv, float *dcomp, float *dsinks,
                                    const float *dout, const float *q, const float *kv, const float *comp,
                                    const int32_t *comp_idx, int n_comp, const float *sinks, int T, int q0, int H,
                                    int d, int window, float scale, mill_err *e) {
    if (T <= 0 || H <= 0) return 0;
    int max_keys = window + n_comp > 0 ? window + n_comp : 1;
    const void *rows[] = {dq, dkv, dcomp, dout, q, kv, comp};
    int tc = k->attention_tc && !k->gemm_fp32 && atc_applies(H, d, max_keys, 1, rows, 7);
    int nc = tc ? 0 : att_tiled_nc(d, rows, 7);
    size_t smem = nc ? att_bwd_smem(d, max_keys)
                     : sizeof(float) * 2 * ATT_BWD_HEADS * (size_t)max_keys + sizeof(int) * (size_t)max_keys;
    const void *fn = nc == 1   ? (const void *)attend_bwd_tiled_kernel<1>
                     : nc == 2 ? (const void *)attend_bwd_tiled_kernel<2>
                     : nc == 4 ? (const void *)attend_bwd_tiled_kernel<4>
                               : (const void *)attend_bwd_kernel;
    if (!tc) TRY(att_smem_ok(fn, smem, e));
    float *part = NULL;
    TRY(cu_scratch((void **)&part, sizeof(float) * (size_t)T * H, k, e));
    dim3 grid(T, (H + ATF_HEADS - 1) / ATF_HEADS);
    if (tc) {
        if (atc_sink_attention_backward(k, dq, dkv, dcomp, part, dout, q, kv, comp, comp_idx, n_comp, sinks, T, q0, H, d,
                                        window, scale, e)) {
            cu_scratch_free(part, k);
            return -1;
        }
    } else if (nc == 1)
        attend_bwd_tiled_kernel<1><<<grid, ATF_THREADS, smem, cu_stream(k)>>>(
            dq, dkv, dcomp, part, dout, q, kv, comp, comp_idx, n_comp, sinks, q0, H, d, window, scale);
    else if (nc == 2)
        attend_bwd_tiled_kernel<2><<<grid, ATF_THREADS, smem, cu_stream(k)>>>(
            dq, dkv, dcomp, part, dout, q, kv, comp, comp_idx, n_comp, sinks, q0, H, d, window, scale);
    else if (nc == 4)
        attend_bwd_tiled_kernel<4><<<grid, ATF_THREADS, smem, cu_stream(k)>>>(
            dq, dkv, dcomp, part, dout, q, kv, comp, comp_idx, n_comp, sinks, q0, H, d, window, scale);
    else
        attend_bwd_kernel<<<T, 256, smem, cu_stream(k)>>>(dq, dkv, dcomp, part, dout, q, kv, comp, comp_idx, n_comp,
                                                          sinks, q0, H, d, window, max_keys, scale);
    cudaError_t le = cudaGetLastError();
    if (le == cudaSuccess) {
        dsink_reduce_kernel<<<cu_blocks(H, 64), 64, 0, cu_stream(k)>>>(dsinks, part, T, H);
        le = cudaGetLastError();
    }
    cu_scratch_free(part, k);
    if (le != cudaSuccess) return mill_errf(e, "op_sink_attention_backward: launch failed: %s", cudaGetErrorString(le));
    return 0;
}

/* ---- Compressor pooling: one thread per (window, channel). Slot s of window w reads row
 * (w-1)*ratio + s (first half, overlap only, w > 0) or w*ratio + t (own half). */
struct pool_slot {
    long idx; /* element of a / g */
    int apei; /* element of ape */
};

__device__ __forceinline__ pool_slot pool_at(int w, int c, int s, int ratio, int d, int width, int overlap,
                                             int has_prev) {
    pool_slot r;
    if (has_prev && s < ratio) {
        r.idx = ((long)(w - 1) * ratio + s) * width + c;
        r.apei = s * width + c;
    } else {
        int t = has_prev ? s - ratio : s, off = overlap ? d : 0;
        r.idx = ((long)w * ratio + t) * width + off + c;
        r.apei = t * width + off + c;
    }
    return r;
}

__global__ void pool_fwd_kernel(float *out, const float *a, const float *g, const float *ape, int n_win, int d,
                                int ratio, int overlap) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)n_win * d) return;
    int w = (int)(id / d), c = (int)(id % d), width = overlap ? 2 * d : d;
    int has_prev = overlap && w > 0, ns = has_prev ? 2 * ratio : ratio;
    float mx = -INFINITY, den = 0.f, acc = 0.f;
    for (int s = 0; s < ns; s++) {
        pool_slot p = pool_at(w, c, s, ratio, d, width, overlap, has_prev);
        mx = fmaxf(mx, g[p.idx] + ape[p.apei]);
    }
    for (int s = 0; s < ns; s++) {
        pool_slot p = pool_at(w, c, s, ratio, d, width, overlap, has_prev);
        den += expf(g[p.idx] + ape[p.apei] - mx);
    }
    for (int s = 0; s < ns; s++) {
        pool_slot p = pool_at(w, c, s, ratio, d, width, overlap, has_prev);
        acc += (expf(g[p.idx] + ape[p.apei] - mx) / den) * a[p.idx];
    }
    out[id] = acc;
}

int cuda_op_compress_pool(const kctx *k, float *out, const float *a, const float *g, const float *ape, int T, int d,
                          int ratio, int overlap, mill_err *e) {
    int n_win = T / ratio;
    if (n_win <= 0 || d <= 0) return 0;
    pool_fwd_kernel<<<cu_blocks((long)n_win * d, 256), 256, 0, cu_stream(k)>>>(out, a, g, ape, n_win, d, ratio,
                                                                               overlap);
    LAUNCH_CHECK("pool_fwd_kernel");
    return 0;
}

/* Each a/g element belongs to exactly one (window, channel), so da and dg need no atomics; the
 * logit gradients go to part[w][group][t][c] (group 0: previous window's half, 1: own half) and
 * dape sums them over windows in order. */
__global__ void pool_bwd_kernel(float *da, float *dg, float *part, const float *dout, const float *a, const float *g,
                                const float *ape, int n_win, int d, int ratio, int overlap) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)n_win * d) return;
    int w = (int)(id / d), c = (int)(id % d), width = overlap ? 2 * d : d;
    int has_prev = overlap && w > 0, ns = has_prev ? 2 * ratio : ratio;
    float mx = -INFINITY, den = 0.f, pooled = 0.f;
    for (int s = 0; s < ns; s++) {
        pool_slot p = pool_at(w, c, s, ratio, d, width, overlap, has_prev);
        mx = fmaxf(mx, g[p.idx] + ape[p.apei]);
    }
    for (int s = 0; s < ns; s++) {
        pool_slot p = pool_at(w, c, s, ratio, d, width, overlap, has_prev);
        den += expf(g[p.idx] + ape[p.apei] - mx);
    }
    for (int s = 0; s < ns; s++) {
        pool_slot p = pool_at(w, c, s, ratio, d, width, overlap, has_prev);
        pooled += (expf(g[p.idx] + ape[p.apei] - mx) / den) * a[p.idx];
    }
    float go = dout[id];
    for (int s = 0; s < ns; s++) {
        pool_slot p = pool_at(w, c, s, ratio, d, width, overlap, has_prev);
        float pr = expf(g[p.idx] + ape[p.apei] - mx) / den;
        float dl = pr * (a[p.idx] - pooled) * go;
        da[p.idx] += pr * go;
        dg[p.idx] += dl;
        int grp = has_prev && s < ratio ? 0 : 1, t = has_prev && s >= ratio ? s - ratio : s;
        part[(((long)w * 2 + grp) * ratio + t) * d + c] = dl;
    }
}

__global__ void pool_dape_kernel(float *dape, const float *part, int n_win, int d, int ratio, int overlap) {
    int width = overlap ? 2 * d : d;
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)ratio * width) return;
    int t = (int)(id / width), ch = (int)(id % width);
    int grp = overlap && ch < d ? 0 : 1, c = overlap && ch >= d ? ch - d : ch;
    float acc = dape[id];
    for (int w = grp == 0 ? 1 : 0; w < n_win; w++) acc += part[(((long)w * 2 + grp) * ratio + t) * d + c];
    dape[id] = acc;
}

int cuda_op_compress_pool_backward(const kctx *k, float *da, float *dg, float *dape, const float *dout,
                                   const float *a, const float *g, const float *ape, int T, int d, int ratio,
                                   int overlap, mill_err *e) {
    int n_win = T / ratio, width = overlap ? 2 * d : d;
    if (n_win <= 0 || d <= 0) return 0;
    float *part = NULL;
    TRY(cu_scratch((void **)&part, sizeof(float) * (size_t)n_win * 2 * ratio * d, k, e));
    pool_bwd_kernel<<<cu_blocks((long)n_win * d, 256), 256, 0, cu_stream(k)>>>(da, dg, part, dout, a, g, ape, n_win, d,
                                                                               ratio, overlap);
    cudaError_t le = cudaGetLastError();
    if (le == cudaSuccess) {
        pool_dape_kernel<<<cu_blocks((long)ratio * width, 256), 256, 0, cu_stream(k)>>>(dape, part, n_win, d, ratio,
                                                                                        overlap);
        le = cudaGetLastError();
    }
    cu_scratch_free(part, k);
    if (le != cudaSuccess) return mill_errf(e, "op_compress_pool_backward: launch failed: %s", cudaGetErrorString(le));
    return 0;
}

/* ---- Indexer: grid (queries, entry tiles); the query's heads in shared memory, one warp per entry.
 * Query i is row i of one sequence's slice, at position pos0 + i, or (wv.seq set) token i of an
 * engine wave, whose q and weights are at its row and whose keys are its sequence's index entries
 * of `layer`. */
#define IDX_TILE 64

struct idx_query {
    const float *q, *keys, *weights;
    int visible;
};

__device__ __forceinline__ idx_query idx_query_at(int i, const float *q, const float *keys, const float *weights,
                                                  int pos0, int nh, int hd, int ratio, int Tc, attn_wave wv,
                                                  int layer) {
    idx_query r;
    int row = wv.seq ? wv.row[i] : i, pos = wv.seq ? wv.pos[i] : pos0 + i;
    r.q = q + (long)row * nh * hd;
    r.weights = weights + (long)row * nh;
    r.keys = wv.seq ? wv.seq[i][layer].index.entries : keys;
    r.visible = (pos + 1) / ratio;
    if (r.visible > Tc) r.visible = Tc;
    return r;
}

__global__ void indexer_kernel(float *score, const float *q, const float *keys, const float *weights, int pos0,
                               int Tc, int nh, int hd, float scale_qk, int ratio, attn_wave wv, int layer) {
    extern __shared__ float qs[];
    int i = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    idx_query iq = idx_query_at(i, q, keys, weights, pos0, nh, hd, ratio, Tc, wv, layer);
    for (int c = threadIdx.x; c < nh * hd; c += blockDim.x) qs[c] = iq.q[c];
    __syncthreads();
    int w1 = (blockIdx.y + 1) * IDX_TILE < Tc ? (blockIdx.y + 1) * IDX_TILE : Tc;
    for (int w = blockIdx.y * IDX_TILE + warp; w < w1; w += nw) {
        float acc = 0.f;
        if (w < iq.visible) {
            const float *kw = iq.keys + (long)w * hd;
            for (int h = 0; h < nh; h++) {
                float dot = 0.f;
                for (int c = lane; c < hd; c += 32) dot += qs[h * hd + c] * kw[c];
                dot = cu_warp_sum(dot);
                acc += (dot > 0.f ? dot : 0.f) * scale_qk * iq.weights[h];
            }
        } else {
            acc = -INFINITY;
        }
        if (lane == 0) score[(long)i * Tc + w] = acc;
    }
}

static int indexer_launch(const kctx *k, float *score, const float *q, const float *keys, const float *weights,
                          int pos0, int nq, int Tc, int nh, int hd, float scale_qk, int ratio, attn_wave wv, int layer,
                          mill_err *e) {
    if (nq <= 0 || Tc <= 0) return 0;
    size_t smem = sizeof(float) * (size_t)nh * hd;
    TRY(att_smem_ok((const void *)indexer_kernel, smem, e));
    indexer_kernel<<<dim3(nq, (Tc + IDX_TILE - 1) / IDX_TILE), 256, smem, cu_stream(k)>>>(
        score, q, keys, weights, pos0, Tc, nh, hd, scale_qk, ratio, wv, layer);
    LAUNCH_CHECK("indexer_kernel");
    return 0;
}

int cuda_op_indexer_scores(const kctx *k, float *score, const float *q, const float *keys, const float *weights,
                           int T, int q0, int Tc, int nh, int hd, float scale_qk, int ratio, mill_err *e) {
    attn_wave none = {0, NULL, NULL, NULL};
    return indexer_launch(k, score, q, keys, weights, q0, T, Tc, nh, hd, scale_qk, ratio, none, 0, e);
}

/* ---- Top-k: one block per row. Entry w's rank is the number of entries before it in the order
 * (value descending, index ascending); ranks below topk are the answer, in the CPU's order. With
 * no more visible entries than topk the CPU lists them by index, and so does this. Row i is
 * position q0 + i of a sequence, or (pos set) a wave token at position pos[i]. */
#define TOPK_SMEM_MAX 12288 /* row entries staged in shared memory (48 KB) */

__global__ void topk_kernel(int32_t *idx, const float *score, const int32_t *pos, int q0, int Tc, int topk, int ratio) {
    extern __shared__ float srow[];
    int i = blockIdx.x;
    int visible = ((pos ? pos[i] : q0 + i) + 1) / ratio;
    if (visible > Tc) visible = Tc;
    int32_t *row = idx + (long)i * topk;
    const float *s = score + (long)i * Tc;
    if (visible <= topk) {
        for (int c = threadIdx.x; c < topk; c += blockDim.x) row[c] = c < visible ? c : -1;
        return;
    }
    if (visible <= TOPK_SMEM_MAX) {
        for (int w = threadIdx.x; w < visible; w += blockDim.x) srow[w] = s[w];
        __syncthreads();
        s = srow;
    }
    for (int w = threadIdx.x; w < visible; w += blockDim.x) {
        float v = s[w];
        int rank = 0;
        for (int u = 0; u < visible && rank < topk; u++) {
            float x = s[u];
            rank += x > v || (x == v && u < w);
        }
        if (rank < topk) row[rank] = w;
    }
}

static int topk_launch(const kctx *k, int32_t *idx, const float *score, const int32_t *pos, int q0, int nq, int Tc,
                       int topk, int ratio, mill_err *e) {
    if (nq <= 0 || topk <= 0) return 0;
    int vis_max = Tc < TOPK_SMEM_MAX ? Tc : TOPK_SMEM_MAX;
    size_t smem = sizeof(float) * (size_t)(vis_max > 0 ? vis_max : 1);
    topk_kernel<<<nq, 256, smem, cu_stream(k)>>>(idx, score, pos, q0, Tc, topk, ratio);
    LAUNCH_CHECK("topk_kernel");
    return 0;
}

int cuda_op_topk_visible(const kctx *k, int32_t *idx, const float *score, int T, int q0, int Tc, int topk, int ratio,
                         mill_err *e) {
    return topk_launch(k, idx, score, NULL, q0, T, Tc, topk, ratio, e);
}

int cuda_op_cache_index_topk(const kctx *k, int32_t *sel, float *score, attn_wave w, int layer, const float *q,
                             const float *weights, int nh, int hd, float scale_qk, int ratio, int max_entries,
                             int topk, mill_err *e) {
    TRY(indexer_launch(k, score, q, NULL, weights, 0, w.n, max_entries, nh, hd, scale_qk, ratio, w, layer, e));
    return topk_launch(k, sel, score, w.pos, 0, w.n, max_entries, topk, ratio, e);
}

/* ---- The engine's cache writes: one block per wave token. */
__global__ void cache_push_kv_kernel(attn_wave wv, int layer, const float *kv, int d, int window) {
    int j = blockIdx.x;
    float *dst = wv.seq[j][layer].ring + (long)(wv.pos[j] % window) * d;
    const float *src = kv + (long)wv.row[j] * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
}

int cuda_op_cache_push_kv(const kctx *k, attn_wave w, int layer, const float *kv, int d, int window, mill_err *e) {
    if (w.n <= 0) return 0;
    cache_push_kv_kernel<<<w.n, 128, 0, cu_stream(k)>>>(w, layer, kv, d, window);
    LAUNCH_CHECK("cache_push_kv_kernel");
    return 0;
}

/* Window slot write; on a closing token the pooling (as pool_fwd_kernel: max, exp-sum, weighted
 * sum per channel), the RMS norm (double sum, as op_rmsnorm), the rotation at w * ratio (as
 * rope_kernel) and, on overlap layers, cur -> prev. The block's threads see each other's global
 * writes after __syncthreads. Shared: the entry [dim]. */
__global__ void cache_push_comp_kernel(attn_wave wv, int layer, int index, const float *a, const float *g,
                                       const float *ape, const float *norm, const float *inv_freq, int ratio, int dim,
                                       int overlap, int rope_dim, float eps) {
    extern __shared__ float ent[];
    __shared__ double red[32];
    int j = blockIdx.x, p = wv.pos[j], slot = p % ratio, win = p / ratio;
    int width = overlap ? 2 * dim : dim, off = overlap ? dim : 0;
    attn_layer_cache *lc = &wv.seq[j][layer];
    attn_comp_cache cc = index ? lc->index : lc->comp;
    const float *ar = a + (long)wv.row[j] * width, *gr = g + (long)wv.row[j] * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        cc.cur_a[(long)slot * width + c] = ar[c];
        cc.cur_g[(long)slot * width + c] = gr[c];
    }
    if (slot != ratio - 1) return; /* uniform over the block */
    __syncthreads();
    int has_prev = overlap && win > 0, ns = has_prev ? 2 * ratio : ratio;
    double ss = 0.0;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float mx = -INFINITY;
        for (int s = 0; s < ns; s++) {
            int t = has_prev ? (s < ratio ? s : s - ratio) : s, own = !has_prev || s >= ratio;
            float l = (own ? cc.cur_g[(long)t * width + off + c] : cc.prev_g[(long)t * width + c]) +
                      ape[(long)t * width + (own ? off : 0) + c];
            mx = s ? fmaxf(mx, l) : l;
        }
        float den = 0.f, acc = 0.f;
        for (int s = 0; s < ns; s++) {
            int t = has_prev ? (s < ratio ? s : s - ratio) : s, own = !has_prev || s >= ratio;
            float l = (own ? cc.cur_g[(long)t * width + off + c] : cc.prev_g[(long)t * width + c]) +
                      ape[(long)t * width + (own ? off : 0) + c];
            den += expf(l - mx);
        }
        for (int s = 0; s < ns; s++) {
            int t = has_prev ? (s < ratio ? s : s - ratio) : s, own = !has_prev || s >= ratio;
            long at = own ? (long)t * width + off + c : (long)t * width + c;
            float l = (own ? cc.cur_g[at] : cc.prev_g[at]) + ape[(long)t * width + (own ? off : 0) + c];
            acc += (expf(l - mx) / den) * (own ? cc.cur_a[at] : cc.prev_a[at]);
        }
        ent[c] = acc;
        ss += (double)acc * acc;
    }
    ss = cu_block_sum(ss, red);
    float inv = 1.0f / sqrtf((float)(ss / dim) + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ent[c] = norm[c] * (ent[c] * inv);
    __syncthreads();
    float *out = cc.entries + (long)win * dim;
    int half = rope_dim / 2, roff = dim - rope_dim;
    for (int c = threadIdx.x; c < roff; c += blockDim.x) out[c] = ent[c];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float ang = (float)(win * ratio) * inv_freq[i];
        float cs = cosf(ang), sn = sinf(ang);
        float x0 = ent[roff + 2 * i], x1 = ent[roff + 2 * i + 1];
        out[roff + 2 * i] = x0 * cs - x1 * sn;
        out[roff + 2 * i + 1] = x1 * cs + x0 * sn;
    }
    if (!overlap) return;
    __syncthreads(); /* every read of the window is done */
    for (long c = threadIdx.x; c < (long)ratio * width; c += blockDim.x) {
        cc.prev_a[c] = cc.cur_a[c];
        cc.prev_g[c] = cc.cur_g[c];
    }
}

int cuda_op_cache_push_comp(const kctx *k, attn_wave w, int layer, int index, const float *a, const float *g,
                            const float *ape, const float *norm, const float *inv_freq, int ratio, int dim,
                            int overlap, int rope_dim, float eps, mill_err *e) {
    if (w.n <= 0) return 0;
    cache_push_comp_kernel<<<w.n, 128, sizeof(float) * (size_t)dim, cu_stream(k)>>>(
        w, layer, index, a, g, ape, norm, inv_freq, ratio, dim, overlap, rope_dim, eps);
    LAUNCH_CHECK("cache_push_comp_kernel");
    return 0;
}

__global__ void causal_entries_kernel(int32_t *idx, int T, int q0, int Tc, int ratio) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)T * Tc) return;
    int i = (int)(id / Tc), w = (int)(id % Tc);
    idx[id] = w < (q0 + i + 1) / ratio ? w : -1;
}

int cuda_op_causal_entries(const kctx *k, int32_t *idx, int T, int q0, int Tc, int ratio, mill_err *e) {
    if (T <= 0 || Tc <= 0) return 0;
    causal_entries_kernel<<<cu_blocks((long)T * Tc, 256), 256, 0, cu_stream(k)>>>(idx, T, q0, Tc, ratio);
    LAUNCH_CHECK("causal_entries_kernel");
    return 0;
}
