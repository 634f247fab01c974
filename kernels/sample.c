#include "sample.h"

#ifdef MILL_CUDA
#include "cuda/cuda_ops.h"
#endif

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "dense.h"

/* An LSD radix sort (stable, four 8-bit passes) on the complemented bit patterns, which order like
 * the values for non-negative floats: O(V), where a comparison sort of a 129k vocabulary per
 * sampled token costs milliseconds. */
void sample_order_desc(int *order, int *tmp, const float *p, int V) {
    for (int v = 0; v < V; v++) order[v] = v;
    for (int shift = 0; shift < 32; shift += 8) {
        int count[257] = {0};
        for (int v = 0; v < V; v++) {
            uint32_t b;
            memcpy(&b, &p[order[v]], sizeof b);
            count[((~b >> shift) & 0xFFu) + 1]++;
        }
        for (int d = 0; d < 256; d++) count[d + 1] += count[d];
        for (int v = 0; v < V; v++) {
            uint32_t b;
            memcpy(&b, &p[order[v]], sizeof b);
            tmp[count[(~b >> shift) & 0xFFu]++] = order[v];
        }
        memcpy(order, tmp, sizeof(int) * (size_t)V);
    }
}

int32_t sample_row_pick(const float *logits, int V, const sample_row *sr, float *logprob, float *work) {
    if (sample_greedy(sr->temperature)) {
        int best = 0;
        double mx = logits[0], den = 0;
        for (int v = 1; v < V; v++)
            if (logits[v] > logits[best]) best = v;
        mx = logits[best];
        for (int v = 0; v < V; v++) den += exp((double)logits[v] - mx);
        *logprob = (float)(-log(den));
        return best;
    }
    float *p = work;
    int *order = (int *)(work + V), *tmp = (int *)(work + 2 * (size_t)V);
    float mx = -INFINITY;
    for (int v = 0; v < V; v++) {
        p[v] = logits[v] / sr->temperature;
        mx = p[v] > mx ? p[v] : mx;
    }
    double den = 0;
    for (int v = 0; v < V; v++) den += (p[v] = expf(p[v] - mx));
    for (int v = 0; v < V; v++) p[v] = (float)(p[v] / den);
    sample_order_desc(order, tmp, p, V);
    int keep = sr->top_k > 0 && sr->top_k < V ? sr->top_k : V;
    double mass = 0;
    if (sr->top_p < 1.0f) {
        int n = 0;
        while (n < keep) {
            mass += p[order[n++]];
            if (mass >= sr->top_p) break;
        }
        keep = n;
    }
    mass = 0;
    for (int j = 0; j < keep; j++) mass += p[order[j]];
    double u = (double)sr->u * mass, c = 0;
    int pick = order[keep - 1];
    for (int j = 0; j < keep; j++) {
        c += p[order[j]];
        if (u < c) {
            pick = order[j];
            break;
        }
    }
    /* under the whole distribution, truncated or not (the trainer's formula, so both sides agree,
     * and truncated importance sampling compares like with like) */
    *logprob = (float)(logits[pick] / sr->temperature - logsumexp_t(logits, V, sr->temperature));
    return pick;
}

int op_sample(const kctx *k, int32_t *tok, float *logprob, const float *logits, int M, int V, const sample_row *rows,
              mill_err *e) {
    MILL_CUDA_DISPATCH(cuda_op_sample(k, tok, logprob, logits, M, V, rows, e));
    TRY(kctx_require_cpu(k, "op_sample", e));
    if (M < 0 || V < 1) return mill_errf(e, "op_sample: %d rows of a %d-token vocabulary", M, V);
    if (M == 0) return 0;
    int nt = omp_get_max_threads();
    nt = nt < M ? nt : M;
    float *work = malloc(sizeof(float) * SAMPLE_WORK_FLOATS(V) * (size_t)nt);
    if (!work) return mill_errf(e, "op_sample: out of memory for %d rows of scratch", nt);
    /* rows are independent (each its own logits and u), so threads change no bits */
#pragma omp parallel for schedule(dynamic) num_threads(nt)
    for (int r = 0; r < M; r++)
        tok[r] = sample_row_pick(logits + (long)r * V, V, &rows[r], &logprob[r],
                                 work + SAMPLE_WORK_FLOATS(V) * (size_t)omp_get_thread_num());
    free(work);
    return 0;
}
