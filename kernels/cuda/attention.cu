/* kernels/cuda/attention.cu — CUDA paths of kernels/attention.h.
 * Sink attention: one block per (query, head) forward — the query in shared memory, one warp per
 * key for the scores, an exact (two-pass) softmax with the sink column, threads over channels for
 * the output; the backward runs one block per query over chunks of heads and adds key gradients
 * with float atomics (many queries share a key). Compressor pooling and the indexer are one thread
 * per output (channel-coalesced) and one warp per compressed entry; top-k ranks every visible
 * entry against the others, which reproduces the CPU order exactly (value descending, ties to the
 * lower index). Correctness first: none of these is tuned yet. */
#include "cuda_internal.cuh"

#include <math.h>

#define ATT_THREADS 128
#define ATT_BWD_HEADS 8 /* heads per chunk in the backward: bounds shared memory for any H */

/* Key list of query i, in the CPU's order: window rows as codes j >= 0, then the chosen compressed
 * entries w as codes -1 - w. Written by thread 0 (at most window + n_comp entries). */
__device__ int att_build_list(int *list, int i, const int32_t *comp_idx, int n_comp, int window) {
    __shared__ int nk_sh;
    if (threadIdx.x == 0) {
        int nk = 0;
        for (int j = i - window + 1 < 0 ? 0 : i - window + 1; j <= i; j++) list[nk++] = j;
        for (int c = 0; c < n_comp; c++) {
            int32_t w = comp_idx[(long)i * n_comp + c];
            if (w >= 0) list[nk++] = -1 - w;
        }
        nk_sh = nk;
    }
    __syncthreads();
    return nk_sh;
}

__device__ __forceinline__ const float *att_key(int code, const float *kv, const float *comp, int d) {
    return code >= 0 ? kv + (long)code * d : comp + (long)(-1 - code) * d;
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
 * `layer`); otherwise query i of a sequence over the window of kv plus comp_idx (op_sink_attention).
 * Grid (queries, H). */
template <bool CACHE>
__global__ void attend_kernel(float *out, const float *q, const float *kv, const float *comp,
                              const int32_t *comp_idx, int n_comp, attn_wave wv, int layer, int ratio,
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
        nk = att_build_list(list, i, comp_idx, n_comp, window);
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

static int att_smem_ok(const void *fn, size_t smem, mill_err *e) {
    if (smem <= 48 * 1024) return 0;
    int dev = 0, lim = 0;
    CU_CHECK(cudaGetDevice(&dev));
    CU_CHECK(cudaDeviceGetAttribute(&lim, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (smem > (size_t)lim)
        return mill_errf(e, "attention: %zu bytes of shared memory needed, the device allows %d", smem, lim);
    CU_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    return 0;
}

int cuda_op_sink_attention(const kctx *k, float *out, const float *q, const float *kv, const float *comp,
                           const int32_t *comp_idx, int n_comp, const float *sinks, int T, int H, int d, int window,
                           float scale, mill_err *e) {
    if (T <= 0 || H <= 0) return 0;
    int max_keys = window + n_comp > 0 ? window + n_comp : 1;
    size_t smem = sizeof(float) * (size_t)(d + max_keys) + sizeof(int) * (size_t)max_keys;
    TRY(att_smem_ok((const void *)attend_kernel<false>, smem, e));
    attn_wave none = {0, NULL, NULL, NULL};
    attend_kernel<false><<<dim3(T, H), ATT_THREADS, smem, cu_stream(k)>>>(out, q, kv, comp, comp_idx, n_comp, none, 0,
                                                                         0, 0, sinks, H, d, window, max_keys, scale);
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
    attend_kernel<true><<<dim3(w.n, H), ATT_THREADS, smem, cu_stream(k)>>>(out, q, NULL, NULL, sel, topk, w, layer,
                                                                          ratio, max_entries, sinks, H, d, window,
                                                                          max_keys, scale);
    LAUNCH_CHECK("attend_kernel");
    return 0;
}

/* Backward, one block per query. Per head of a chunk: p, ds = p (dp - D) scale, dq; then the chunk's
 * key gradients sum over its heads before one atomic add per key element. The sink's gradient per
 * (query, head) goes to dsink_part, summed per head in query order afterwards. */
__global__ void attend_bwd_kernel(float *dq, float *dkv, float *dcomp, float *dsink_part, const float *dout,
                                  const float *q, const float *kv, const float *comp, const int32_t *comp_idx,
                                  int n_comp, const float *sinks, int H, int d, int window, int max_keys,
                                  float scale) {
    extern __shared__ float sm[];
    float *P = sm, *DS = P + ATT_BWD_HEADS * max_keys;
    int *list = (int *)(DS + ATT_BWD_HEADS * max_keys);
    __shared__ float red[32];
    int i = blockIdx.x;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int nk = att_build_list(list, i, comp_idx, n_comp, window);
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
                                    const int32_t *comp_idx, int n_comp, const float *sinks, int T, int H, int d,
                                    int window, float scale, mill_err *e) {
    if (T <= 0 || H <= 0) return 0;
    int max_keys = window + n_comp > 0 ? window + n_comp : 1;
    size_t smem = sizeof(float) * 2 * ATT_BWD_HEADS * (size_t)max_keys + sizeof(int) * (size_t)max_keys;
    TRY(att_smem_ok((const void *)attend_bwd_kernel, smem, e));
    float *part = NULL;
    TRY(cu_scratch((void **)&part, sizeof(float) * (size_t)T * H, k, e));
    attend_bwd_kernel<<<T, 256, smem, cu_stream(k)>>>(dq, dkv, dcomp, part, dout, q, kv, comp, comp_idx, n_comp,
                                                      sinks, H, d, window, max_keys, scale);
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
 * Query i is row pos0 + i of one sequence, or (wv.seq set) token i of an engine wave, whose q and
 * weights are at its row and whose keys are its sequence's index entries of `layer`. */
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
                           int T, int Tc, int nh, int hd, float scale_qk, int ratio, mill_err *e) {
    attn_wave none = {0, NULL, NULL, NULL};
    return indexer_launch(k, score, q, keys, weights, 0, T, Tc, nh, hd, scale_qk, ratio, none, 0, e);
}

/* ---- Top-k: one block per row. Entry w's rank is the number of entries before it in the order
 * (value descending, index ascending); ranks below topk are the answer, in the CPU's order. With
 * no more visible entries than topk the CPU lists them by index, and so does this. Row i is
 * position i of a sequence, or (pos set) a wave token at position pos[i]. */
#define TOPK_SMEM_MAX 12288 /* row entries staged in shared memory (48 KB) */

__global__ void topk_kernel(int32_t *idx, const float *score, const int32_t *pos, int Tc, int topk, int ratio) {
    extern __shared__ float srow[];
    int i = blockIdx.x;
    int visible = ((pos ? pos[i] : i) + 1) / ratio;
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

static int topk_launch(const kctx *k, int32_t *idx, const float *score, const int32_t *pos, int nq, int Tc, int topk,
                       int ratio, mill_err *e) {
    if (nq <= 0 || topk <= 0) return 0;
    int vis_max = Tc < TOPK_SMEM_MAX ? Tc : TOPK_SMEM_MAX;
    size_t smem = sizeof(float) * (size_t)(vis_max > 0 ? vis_max : 1);
    topk_kernel<<<nq, 256, smem, cu_stream(k)>>>(idx, score, pos, Tc, topk, ratio);
    LAUNCH_CHECK("topk_kernel");
    return 0;
}

int cuda_op_topk_visible(const kctx *k, int32_t *idx, const float *score, int T, int Tc, int topk, int ratio,
                         mill_err *e) {
    return topk_launch(k, idx, score, NULL, T, Tc, topk, ratio, e);
}

int cuda_op_cache_index_topk(const kctx *k, int32_t *sel, float *score, attn_wave w, int layer, const float *q,
                             const float *weights, int nh, int hd, float scale_qk, int ratio, int max_entries,
                             int topk, mill_err *e) {
    TRY(indexer_launch(k, score, q, NULL, weights, 0, w.n, max_entries, nh, hd, scale_qk, ratio, w, layer, e));
    return topk_launch(k, sel, score, w.pos, w.n, max_entries, topk, ratio, e);
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

__global__ void causal_entries_kernel(int32_t *idx, int T, int Tc, int ratio) {
    long id = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long)T * Tc) return;
    int i = (int)(id / Tc), w = (int)(id % Tc);
    idx[id] = w < (i + 1) / ratio ? w : -1;
}

int cuda_op_causal_entries(const kctx *k, int32_t *idx, int T, int Tc, int ratio, mill_err *e) {
    if (T <= 0 || Tc <= 0) return 0;
    causal_entries_kernel<<<cu_blocks((long)T * Tc, 256), 256, 0, cu_stream(k)>>>(idx, T, Tc, ratio);
    LAUNCH_CHECK("causal_entries_kernel");
    return 0;
}
