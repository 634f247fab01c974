/* kernels/cuda/sample.cu — op_sample on the device: one block of 1024 threads per row, so a GPU
 * engine copies back M token ids and logprobs instead of [M, V] logits.
 *
 * Greedy rows: a block argmax (ties to the lower index) and a block sum for the logsumexp.
 * Other rows: three passes make p = softmax(logits / T) in scratch (float [rows, V]) with the CPU
 * formula, then a full sort is replaced by MSB-first radix SELECTS on p's bit patterns (p >= 0, so
 * the patterns order like the values): four 8-bit passes, each a 256-bin histogram of the
 * elements under the prefix chosen so far, holding counts and probability mass per bin. Each
 * select finds the first element, in the CPU's order (p descending, ties to the lower index), at
 * which the running count or running mass reaches a target:
 *   (a) top_k: the count reaches k, which gives the mass kept;
 *   (b) top_p: the mass reaches top_p (only when the top_k prefix reaches it at all);
 *   (c) the pick: the mass exceeds u * mass kept (inverse CDF).
 * After the fourth pass the key t is known with how many elements (and how much mass) come before
 * every element equal to t; the tied elements are then taken in index order (the lowest one is
 * tracked during the last pass; a later one is found by a block scan in index order), which is
 * the CPU's stable order.
 *
 * Mass is fixed point: each p is truncated to a multiple of 2^-63 and summed as 64-bit integers
 * (p <= 1, and the masses sum to about 1, so nothing overflows). Integer sums do not depend on the
 * order of the histogram atomics, so a row gives the same token on every run. Counts and masses
 * go to 32 copies of each histogram, one per lane, so the lanes of a warp never hit one slot.
 *
 * Where the bits may differ from the CPU's (kernels/sample.c), and what that means:
 *   - exp: the CPU rounds glibc's expf (within 0.502 ulp); here exp((double)x) is rounded to float
 *     (CUDA's expf is off by up to 2 ulp). Both are monotone, so they disagree only in the last bit
 *     of an occasional p.
 *   - the softmax denominator, logsumexp_t's sum and greedy's sum are fixed-order block trees in
 *     double, not the CPU's sequential loops: the last bits of a double differ, so a p differs by
 *     one float ulp only where the quotient lies that close to a float rounding boundary.
 *   - the running masses compared with top_p and u * mass: the CPU sums p in double in order; here
 *     the integer sums are exact for the truncated p. The two differ by less than V * 2^-63 plus
 *     the CPU's own rounding, about 1e-14 at V = 129280.
 * So a row gets a different token only where top_p or u * mass lands within rounding (~1e-13) of
 * a running-mass boundary, or where two p within one ulp of each other (logits within ~1e-7)
 * come out tied on one side and ordered on the other; exact ties (equal logits) stay tied on both
 * sides and go to the lower index. Logprobs agree to float rounding. */
#include <limits.h>
#include <math.h>

#include "cuda_internal.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_BINS 256
#define SAMPLE_REPS 32 /* histogram copies: one per lane (the lane indexes its copy) */
/* p scratch per launch; more rows than fit run as several launches */
#define SAMPLE_SCRATCH_BYTES ((size_t)256 << 20)

typedef unsigned long long u64;

/* Dynamic shared memory of one block, about 101 KiB (two blocks fit an H100 SM). */
struct sample_smem {
    u64 ms_r[SAMPLE_BINS * SAMPLE_REPS];          /* mass per (bin, lane copy) */
    unsigned cnt_r[SAMPLE_BINS * SAMPLE_REPS];    /* count per (bin, lane copy) */
    u64 ms[SAMPLE_BINS];                          /* the copies summed */
    unsigned cnt[SAMPLE_BINS];
    int minidx[SAMPLE_BINS];                      /* last pass: the lowest index per bin */
    u64 red_u[32];                                /* block reductions */
    double red_d[32];
    float red_f[32];
    int wcount[32];                               /* sample_nth_equal: hits per warp */
    u64 n_above, m_above; /* elements (and mass) ordered before the current prefix's range */
    unsigned prefix, n_tied;
    int bin, found, nth;
};

/* p as fixed-point mass, p * 2^63 truncated; NaN and p <= 0 carry none. */
__device__ __forceinline__ u64 sample_fx(float p) {
    return p > 0.0f ? __float2ull_rz(fminf(p, 1.0f) * 0x1p63f) : 0ull;
}

/* A logit as an unsigned key that orders like the CPU's `>` scan: -0 equals +0; a NaN never wins,
 * except at index 0, where the CPU loop starts and nothing compares greater. */
__device__ __forceinline__ unsigned sample_ord(float x, int v) {
    if (x != x) return v == 0 ? 0xFFFFFFFFu : 0u;
    unsigned b = x == 0.0f ? 0u : __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ u64 sample_block_max_u64(u64 v, u64 *sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        u64 w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    u64 r = sh[0];
    for (int i = 1; i < nw; i++) r = sh[i] > r ? sh[i] : r;
    __syncthreads();
    return r;
}

/* The i-th (from 0) index v, in increasing order, whose p[v] has bits t; -1 if there are fewer.
 * Chunks of blockDim indices: a ballot per warp, the warps' counts in shared memory. */
__device__ int sample_nth_equal(const float *p, int V, unsigned t, u64 i, sample_smem *s) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    long long left = (long long)i;
    if (threadIdx.x == 0) s->nth = -1;
    for (int base = 0; base < V; base += blockDim.x) {
        int v = base + threadIdx.x;
        bool hit = v < V && __float_as_uint(p[v]) == t;
        unsigned bal = __ballot_sync(0xffffffffu, hit);
        if (lane == 0) s->wcount[wid] = __popc(bal);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < nw; w++) {
            int c = s->wcount[w];
            before += w < wid ? c : 0;
            total += c;
        }
        if (hit && before + __popc(bal & ((1u << lane) - 1u)) == left) s->nth = v;
        left -= total;
        __syncthreads(); /* s->nth written; every wcount read before the next chunk rewrites it */
        if (s->nth >= 0) break;
    }
    int r = s->nth;
    __syncthreads(); /* read by all before anyone reuses s->nth */
    return r;
}

/* Warp 0, after a pass: the first non-empty bin, keys descending, at which the running count
 * (by_mass false) or mass reaches target; it extends the prefix and what lies before it. Lane l
 * holds bins 255 - 8l down to 248 - 8l. */
__device__ void sample_scan_bins(sample_smem *s, bool by_mass, u64 target, int shift, int lane) {
    const unsigned FULL = 0xffffffffu;
    int top = SAMPLE_BINS - 1 - 8 * lane;
    u64 c = 0, m = 0;
    for (int j = 0; j < 8; j++) {
        c += s->cnt[top - j];
        m += s->ms[top - j];
    }
    u64 ci = c, mi = m; /* inclusive scans over the lanes */
    for (int o = 1; o < 32; o <<= 1) {
        u64 c2 = __shfl_up_sync(FULL, ci, o), m2 = __shfl_up_sync(FULL, mi, o);
        if (lane >= o) {
            ci += c2;
            mi += m2;
        }
    }
    u64 rc = s->n_above + ci - c, rm = s->m_above + mi - m; /* everything before this lane's bins */
    /* a lane holds the answer iff its last non-empty bin (running total rc + c) reaches target */
    unsigned ok = __ballot_sync(FULL, c > 0 && (by_mass ? rm + m : rc + c) >= target);
    if (!ok) {
        if (lane == 0) s->found = 0;
        return;
    }
    if (lane != __ffs(ok) - 1) return;
    for (int j = 0; j < 8; j++) {
        int b = top - j;
        u64 nc = rc + s->cnt[b], nm = rm + s->ms[b];
        if (s->cnt[b] > 0 && (by_mass ? nm : nc) >= target) {
            s->prefix |= (unsigned)b << shift;
            s->n_above = rc;
            s->m_above = rm;
            s->n_tied = s->cnt[b];
            s->bin = b;
            return;
        }
        rc = nc;
        rm = nm;
    }
    s->found = 0; /* not reached: the lane's last non-empty bin qualifies */
}

/* Result of a select, the same in every thread: the element's index and position in the order,
 * and F, the running fixed-point mass through it. */
struct sample_sel {
    int found, idx;
    long long pos;
    u64 F;
};

/* The first element of p[0..V) in the order (p descending, ties to the lower index) whose
 * running count (by_mass false) or running mass reaches target. Called by the whole block. */
__device__ sample_sel sample_select(const float *p, int V, bool by_mass, u64 target, sample_smem *s) {
    const unsigned FULL = 0xffffffffu;
    int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, nw = blockDim.x >> 5;
    if (tid == 0) {
        s->prefix = 0;
        s->n_above = 0;
        s->m_above = 0;
        s->found = 1;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < SAMPLE_BINS * SAMPLE_REPS; i += blockDim.x) {
            s->cnt_r[i] = 0;
            s->ms_r[i] = 0;
        }
        if (shift == 0)
            for (int i = tid; i < SAMPLE_BINS; i += blockDim.x) s->minidx[i] = INT_MAX;
        __syncthreads();
        unsigned prefix = s->prefix, hi = shift == 24 ? 0u : ~0u << (shift + 8);
        for (int v = tid; v < V; v += blockDim.x) {
            float pv = p[v];
            unsigned key = __float_as_uint(pv);
            if ((key & hi) != prefix) continue;
            unsigned d = (key >> shift) & 0xFFu, slot = d * SAMPLE_REPS + lane;
            atomicAdd(&s->cnt_r[slot], 1u);
            u64 f = sample_fx(pv);
            if (f) atomicAdd(&s->ms_r[slot], f);
            if (shift == 0) atomicMin(&s->minidx[d], v);
        }
        __syncthreads();
        for (int b = wid; b < SAMPLE_BINS; b += nw) { /* a warp sums one bin's 32 copies */
            unsigned c = s->cnt_r[b * SAMPLE_REPS + lane];
            u64 m = s->ms_r[b * SAMPLE_REPS + lane];
            for (int o = 16; o > 0; o >>= 1) {
                c += __shfl_xor_sync(FULL, c, o);
                m += __shfl_xor_sync(FULL, m, o);
            }
            if (lane == 0) {
                s->cnt[b] = c;
                s->ms[b] = m;
            }
        }
        __syncthreads();
        if (wid == 0) sample_scan_bins(s, by_mass, target, shift, lane);
        __syncthreads();
        if (!s->found) break; /* target past the end: uniform, read after the barrier */
    }
    sample_sel r = {s->found, -1, 0, 0};
    unsigned t = s->prefix;
    u64 na = s->n_above, ma = s->m_above, nt = s->n_tied;
    int first = r.found ? s->minidx[s->bin] : -1;
    __syncthreads(); /* all have read the state before the next select or scan rewrites it */
    if (!r.found) return r;
    /* the tied elements (all of mass ft) follow the na before them in index order */
    u64 ft = sample_fx(__uint_as_float(t)), i;
    if (!by_mass) i = target > na ? target - na - 1 : 0;
    else i = target <= ma || ft == 0 ? 0 : (target - ma - 1) / ft;
    if (i >= nt) i = nt - 1;
    r.idx = i == 0 ? first : sample_nth_equal(p, V, t, i, s);
    r.pos = (long long)(na + i);
    r.F = ma + (i + 1) * ft;
    return r;
}

__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(int32_t *tok, float *logprob, const float *logits, float *pbuf, int V, const sample_row *rows,
                  int row0) {
    extern __shared__ u64 sample_raw[];
    sample_smem *s = reinterpret_cast<sample_smem *>(sample_raw);
    int r = row0 + blockIdx.x, tid = threadIdx.x;
    const float *l = logits + (long)r * V;
    sample_row sr = rows[r];
    if (sr.temperature <= 0.0f) { /* sample_greedy: argmax + logsumexp, as sample_row_pick */
        u64 best = 0;
        for (int v = tid; v < V; v += blockDim.x) {
            u64 c = ((u64)sample_ord(l[v], v) << 32) | (0xFFFFFFFFu - (unsigned)v); /* ties: lower v */
            best = c > best ? c : best;
        }
        best = sample_block_max_u64(best, s->red_u);
        int b = (int)(0xFFFFFFFFu - (unsigned)(best & 0xFFFFFFFFull));
        double mx = l[b], den = 0.0;
        for (int v = tid; v < V; v += blockDim.x) den += exp((double)l[v] - mx);
        den = cu_block_sum(den, s->red_d);
        if (tid == 0) {
            tok[r] = b;
            logprob[r] = (float)(-log(den));
        }
        return;
    }
    float *p = pbuf + (long)blockIdx.x * V, T = sr.temperature, mx = -INFINITY;
    for (int v = tid; v < V; v += blockDim.x) mx = fmaxf(mx, __fdiv_rn(l[v], T));
    mx = cu_block_max(mx, s->red_f);
    /* the CPU's p: expf(l / T - mx) summed in double, then divided; logsumexp_t sums the double
     * exp of the same float difference */
    double den = 0.0, den_t = 0.0;
    for (int v = tid; v < V; v += blockDim.x) {
        double ex = exp((double)__fsub_rn(__fdiv_rn(l[v], T), mx));
        float ef = __double2float_rn(ex);
        p[v] = ef;
        den += (double)ef;
        den_t += ex;
    }
    den = cu_block_sum(den, s->red_d);
    den_t = cu_block_sum(den_t, s->red_d);
    u64 total = 0;
    for (int v = tid; v < V; v += blockDim.x) {
        float pv = __double2float_rn(__ddiv_rn((double)p[v], den));
        p[v] = pv;
        total += sample_fx(pv);
    }
    total = cu_block_sum(total, s->red_u); /* its barriers also publish p to the block */

    int keep = sr.top_k > 0 && sr.top_k < V ? sr.top_k : V, edge = -1; /* edge: index at keep - 1 */
    u64 mass = total;
    if (keep < V) {
        sample_sel a = sample_select(p, V, false, (u64)keep, s);
        mass = a.F;
        edge = a.idx;
    }
    if (sr.top_p < 1.0f) {
        /* running mass >= top_p  <=>  fixed-point mass >= ceil(top_p * 2^63) */
        u64 tgt = sr.top_p > 0.0f ? (u64)ceil((double)sr.top_p * 0x1p63) : 0ull;
        if (mass >= tgt) { /* else the kept prefix never reaches top_p: keep stays */
            sample_sel b = sample_select(p, V, true, tgt, s);
            if (b.found) {
                keep = (int)b.pos + 1;
                mass = b.F;
                edge = b.idx;
            }
        }
    }
    /* the CPU picks the first token whose running mass c has u * mass < c; with integer masses that
     * is the first whose running mass reaches floor(u * mass) + 1 */
    double uu = sr.u;
    u64 tgt_u = uu > 0.0 ? (uu < 1.0 ? (u64)(uu * (double)mass) : mass) : 0ull;
    int pick = -1;
    if (tgt_u < mass) {
        sample_sel c = sample_select(p, V, true, tgt_u + 1, s);
        if (c.found && c.pos < keep) pick = c.idx;
    }
    if (pick < 0) { /* the CPU's fallback, order[keep - 1] (u * mass rounded up to the whole mass) */
        if (edge < 0) edge = sample_select(p, V, false, (u64)keep, s).idx;
        pick = edge;
    }
    if (pick < 0 || pick >= V) pick = 0; /* not reached; keeps the reads below inside the row */
    if (tid == 0) { /* the whole distribution's: the trainer's logits / T - logsumexp_t, as the CPU */
        tok[r] = pick;
        logprob[r] = (float)((double)__fdiv_rn(l[pick], T) - (log(den_t) + (double)mx));
    }
}

/* The parameters' copy and the launches, chunk rows at a time over the p scratch. */
static int sample_run(const kctx *k, int32_t *tok, float *logprob, const float *logits, int M, int V,
                      const sample_row *rows, sample_row *drows, float *pbuf, int chunk, size_t smem, mill_err *e) {
    CU_CHECK(cudaMemcpyAsync(drows, rows, sizeof(sample_row) * (size_t)M, cudaMemcpyHostToDevice, cu_stream(k)));
    for (int r0 = 0; r0 < M; r0 += chunk) {
        int n = M - r0 < chunk ? M - r0 : chunk;
        sample_kernel<<<n, SAMPLE_THREADS, smem, cu_stream(k)>>>(tok, logprob, logits, pbuf, V, drows, r0);
        LAUNCH_CHECK("sample_kernel");
    }
    return 0;
}

int cuda_op_sample(const kctx *k, int32_t *tok, float *logprob, const float *logits, int M, int V,
                   const sample_row *rows, mill_err *e) {
    if (M < 0 || V < 1) return mill_errf(e, "op_sample: %d rows of a %d-token vocabulary", M, V);
    if (M == 0) return 0;
    size_t smem = sizeof(sample_smem);
    CU_CHECK(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    size_t per = SAMPLE_SCRATCH_BYTES / (sizeof(float) * (size_t)V);
    int chunk = per < 1 ? 1 : per < (size_t)M ? (int)per : M;
    size_t rows_bytes = (sizeof(sample_row) * (size_t)M + 255) & ~(size_t)255; /* p stays aligned */
    unsigned char *buf = NULL;
    TRY(cu_scratch((void **)&buf, rows_bytes + sizeof(float) * (size_t)chunk * (size_t)V, k, e));
    int rc = sample_run(k, tok, logprob, logits, M, V, rows, (sample_row *)buf, (float *)(buf + rows_bytes), chunk,
                        smem, e);
    cu_scratch_free(buf, k);
    return rc;
}
