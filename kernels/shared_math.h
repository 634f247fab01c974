/* kernels/shared_math.h — per-token math written once for a CPU op and its CUDA twin.
 * Owns: the Sinkhorn chain of the hyper-connection combine matrix (forward and backward) and the
 * top-k routing choice with its weights. Plain C that nvcc also compiles for the device. */
#ifndef MILL_SHARED_MATH_H
#define MILL_SHARED_MATH_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define MILL_HD static inline __host__ __device__
#else
#define MILL_HD static inline
#endif

/* chain [steps + 1][n*n]: chain[0] (softmax + eps) given; step s normalises the columns of chain[s]
 * into chain[s + 1] when s is even, the rows when odd. */
MILL_HD void sinkhorn_chain(float *chain, int n, int steps, float eps) {
    int nn = n * n;
    for (int st = 0; st < steps; st++) {
        const float *in = chain + (long)st * nn;
        float *out = chain + (long)(st + 1) * nn;
        int cols = st % 2 == 0;
        for (int a = 0; a < n; a++) {
            float sum = 0.f;
            for (int b = 0; b < n; b++) sum += cols ? in[b * n + a] : in[a * n + b];
            for (int b = 0; b < n; b++) {
                int ix = cols ? b * n + a : a * n + b;
                out[ix] = in[ix] / (sum + eps);
            }
        }
    }
}

/* One normalisation of C [n*n] in place: row r (or column c) divided by its sum + eps, the sum
 * taken in index order. The forward's Sinkhorn is made of these alone, so a caller that runs the
 * rows (columns) of one step on different threads gets sinkhorn_inplace's bits. */
MILL_HD void sinkhorn_norm_row(float *C, int n, int r, float eps) {
    float s = 0.f;
    for (int c = 0; c < n; c++) s += C[r * n + c];
    for (int c = 0; c < n; c++) C[r * n + c] /= s + eps;
}
MILL_HD void sinkhorn_norm_col(float *C, int n, int c, float eps) {
    float s = 0.f;
    for (int r = 0; r < n; r++) s += C[r * n + c];
    for (int r = 0; r < n; r++) C[r * n + c] /= s + eps;
}

/* The forward's Sinkhorn in place on C [n*n]: columns first, then (rows, columns) iters - 1 more
 * times; the same steps as sinkhorn_chain without keeping them. */
MILL_HD void sinkhorn_inplace(float *C, int n, int iters, float eps) {
    for (int it = 0; it < iters; it++) {
        if (it > 0)
            for (int r = 0; r < n; r++) sinkhorn_norm_row(C, n, r, eps);
        for (int c = 0; c < n; c++) sinkhorn_norm_col(C, n, c, eps);
    }
}

/* Back through the chain: G [n*n] holds d(chain[steps]) and leaves holding d(chain[0]). */
MILL_HD void sinkhorn_chain_backward(const float *chain, float *G, int n, int steps, float eps) {
    int nn = n * n;
    for (int st = steps - 1; st >= 0; st--) {
        const float *in = chain + (long)st * nn;
        int cols = st % 2 == 0;
        for (int a = 0; a < n; a++) {
            float sum = 0.f, gd = 0.f;
            for (int b = 0; b < n; b++) {
                int ix = cols ? b * n + a : a * n + b;
                sum += in[ix];
                gd += G[ix] * in[ix];
            }
            float z = sum + eps;
            for (int b = 0; b < n; b++) {
                int ix = cols ? b * n + a : a * n + b;
                G[ix] = G[ix] / z - gd / (z * z);
            }
        }
    }
}

/* id [K]: the K largest of s + bias (bias may be NULL), descending; ties keep the lower id. */
MILL_HD void route_topk(const float *s, const float *bias, int E, int K, int32_t *id) {
    for (int j = 0; j < K; j++) {
        int best = -1;
        float bv = -INFINITY;
        for (int x = 0; x < E; x++) {
            int taken = 0;
            for (int q = 0; q < j; q++) taken |= id[q] == x;
            float v = s[x] + (bias ? bias[x] : 0.f);
            if (!taken && (best < 0 || v > bv)) {
                best = x;
                bv = v;
            }
        }
        id[j] = best;
    }
}

/* w [K]: the scores of the chosen experts, normalised to sum 1 when norm, times scale. */
MILL_HD void route_weights(const float *s, const int32_t *id, int K, int norm, float scale, float *w) {
    float sum = 0.f;
    for (int j = 0; j < K; j++) sum += (w[j] = s[id[j]]);
    for (int j = 0; j < K; j++) w[j] = (norm ? w[j] / (sum + 1e-20f) : w[j]) * scale;
}

/* The token head's slices joined (op_token_logp): parts [n_parts][n][3] hold, for row t, each
 * vocabulary slice's log-sum-exp of z, sum of exp(z - that) * z, and z at the target (0 where the
 * slice lacks it); out: the whole row's log-sum-exp, sum p z and z at the target. One slice gives
 * its own numbers back bit for bit (exp(0) = 1, log(1) = 0). */
MILL_HD void token_logp_combine(const double *parts, int n_parts, int n, int t, double *lse, double *pz, double *zy) {
    double mx = parts[3L * t], s = 0.0;
    for (int q = 1; q < n_parts; q++) mx = parts[(3L * q * n) + 3L * t] > mx ? parts[(3L * q * n) + 3L * t] : mx;
    for (int q = 0; q < n_parts; q++) s += exp(parts[3L * q * n + 3L * t] - mx);
    *lse = mx + log(s);
    *pz = 0.0;
    *zy = 0.0;
    for (int q = 0; q < n_parts; q++) {
        const double *p = parts + 3L * q * n + 3L * t;
        *pz += exp(p[0] - *lse) * p[1];
        *zy += p[2];
    }
}

#endif
