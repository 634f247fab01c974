/* tests/test_kernels.c — every CPU op against an independent double-precision brute force.
 *
 * Each reference below is written from the formula documented in the op's header (not from the
 * implementation). Inputs come from a small deterministic xorshift PRNG, reseeded per test.
 *
 * Error measures (see the helpers):
 *   err_norm: max_i |got_i - ref_i| / max_i |ref_i|   (normwise; used where sums of signed terms
 *             can cancel, e.g. matmuls, attention, pooling)
 *   err_elem: max_i |got_i - ref_i| / |ref_i|         (elementwise; used for pointwise functions)
 * Unless stated otherwise the tolerance is TOL_F32 = 1e-5 relative (fp32 op vs double reference);
 * rope_inv_freq is held to 1e-6 relative elementwise. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/tensor.h"
#include "kernels/attention.h"
#include "kernels/backend.h"
#include "kernels/dense.h"
#include "kernels/hc.h"
#include "kernels/moe.h"
#include "kernels/rope.h"

#define TOL_F32 1e-5   /* fp32 op vs double brute force, relative */
#define TOL_FREQ 1e-6  /* rope_inv_freq vs double, relative elementwise */
#define SENTINEL 12345.0f

/* ---------------------------------------------------------------- helpers */

static uint64_t g_rng = 1;

static void rng_seed(uint64_t s) { g_rng = s ? s : 0x9E3779B97F4A7C15ull; }

static uint64_t rng_next(void) { /* xorshift64 */
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

static double rng_uniform(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); } /* [0, 1) */

static int rng_int(int n) { return (int)(rng_next() % (uint64_t)n); }

static void fill_uniform(float *p, long n, float lo, float hi) {
    for (long i = 0; i < n; i++) p[i] = lo + (hi - lo) * (float)rng_uniform();
}

static void fill_value(float *p, long n, float v) {
    for (long i = 0; i < n; i++) p[i] = v;
}

static float *falloc(long n) {
    float *p = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    assert_non_null(p);
    return p;
}

static double *dalloc(long n) {
    double *p = calloc((size_t)(n > 0 ? n : 1), sizeof(double));
    assert_non_null(p);
    return p;
}

/* Normwise: max |got - ref| / max |ref|. NaN anywhere counts as infinite error. */
static double err_norm(const float *got, const double *ref, long n) {
    double num = 0.0, den = 0.0;
    for (long i = 0; i < n; i++) {
        if (isnan(got[i]) || isnan(ref[i])) return INFINITY;
        double d = fabs((double)got[i] - ref[i]);
        num = d > num ? d : num;
        den = fabs(ref[i]) > den ? fabs(ref[i]) : den;
    }
    if (den == 0.0) return num == 0.0 ? 0.0 : INFINITY;
    return num / den;
}

/* Elementwise: max |got - ref| / |ref| (a zero reference requires an exact zero). */
static double err_elem(const float *got, const double *ref, long n) {
    double worst = 0.0;
    for (long i = 0; i < n; i++) {
        if (isnan(got[i]) || isnan(ref[i])) return INFINITY;
        double d = fabs((double)got[i] - ref[i]);
        double r = ref[i] == 0.0 ? (d == 0.0 ? 0.0 : INFINITY) : d / fabs(ref[i]);
        worst = r > worst ? r : worst;
    }
    return worst;
}

static void check_err(const char *what, double err, double tol) {
    if (!(err <= tol)) fail_msg("%s: relative error %.3g exceeds %.1g", what, err, tol);
}

#define CHECK_NORM(what, got, ref, n, tol) check_err(what, err_norm(got, ref, n), tol)
#define CHECK_ELEM(what, got, ref, n, tol) check_err(what, err_elem(got, ref, n), tol)

static kctx cpu_ctx(mill_err *e) {
    kctx k;
    assert_int_equal(kctx_init(&k, DEVICE_CPU, e), 0);
    return k;
}

static double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }

/* ---------------------------------------------------------------- dense */

/* y[M,N] (+)= x[M,K] @ w[N,K]^T in double; strides ldx/ldy (already resolved). */
static void ref_linear(double *y, const float *x, const float *w, int M, int N, int K, int ldx) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double acc = 0.0;
            for (int kk = 0; kk < K; kk++) acc += (double)x[(long)m * ldx + kk] * w[(long)n * K + kk];
            y[(long)m * N + n] += acc;
        }
}

/* fp32 <-> bf16 (the pipeline's streams): round to nearest even, ties to even, NaN and infinities
 * kept, and a round trip within half a bf16 ulp (at most 2^-8 relative). */
static void test_bf16(void **state) {
    (void)state;
    mill_err e;
    kctx k = cpu_ctx(&e);
    float x[8] = {1.0f, 1.00390625f, 1.01171875f, -2.5f, NAN, INFINITY, -INFINITY, 0.0f};
    uint16_t b[8], want[8] = {0x3f80, 0x3f80, 0x3f82, 0xc020, 0, 0x7f80, 0xff80, 0x0000};
    assert_int_equal(op_to_bf16(&k, b, x, 8, &e), 0);
    for (int i = 0; i < 8; i++)
        if (i != 4) assert_int_equal(b[i], want[i]);
    assert_true((b[4] & 0x7f80) == 0x7f80 && (b[4] & 0x7f)); /* still a NaN */
    float y[8];
    assert_int_equal(op_from_bf16(&k, y, b, 8, &e), 0);
    assert_true(y[0] == 1.0f && y[1] == 1.0f && y[2] == 1.015625f && y[3] == -2.5f && isnan(y[4]) && isinf(y[5]));
    rng_seed(3);
    for (int i = 0; i < 1000; i++) {
        float v = (float)((rng_uniform() * 2 - 1) * 1e3), w;
        uint16_t h;
        assert_int_equal(op_to_bf16(&k, &h, &v, 1, &e), 0);
        assert_int_equal(op_from_bf16(&k, &w, &h, 1, &e), 0);
        assert_true(fabs((double)w - v) <= fabs((double)v) * 0x1p-8);
    }
    kctx_free(&k);
}

static void test_linear(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(11);
    /* (M, N, K) including shapes past BLAS blocking sizes */
    const int shapes[][3] = {{1, 1, 1}, {5, 7, 13}, {33, 65, 129}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float *x = falloc((long)M * K), *w = falloc((long)N * K), *y = falloc((long)M * N);
        double *ref = dalloc((long)M * N);
        fill_uniform(x, (long)M * K, -1, 1);
        fill_uniform(w, (long)N * K, -1, 1);
        fill_value(y, (long)M * N, NAN); /* accumulate = 0 must overwrite */
        assert_int_equal(op_linear(&k, y, x, w, M, N, K, 0, 0, 0, &e), 0);
        ref_linear(ref, x, w, M, N, K, K);
        CHECK_NORM("op_linear plain", y, ref, (long)M * N, TOL_F32);
        free(x), free(w), free(y), free(ref);
    }

    /* strided rows (ldx > K, ldy > N) and accumulate = 1 */
    int M = 6, N = 9, K = 11, ldx = K + 3, ldy = N + 4;
    float *x = falloc((long)M * ldx), *w = falloc((long)N * K), *y = falloc((long)M * ldy);
    double *ref = dalloc((long)M * N);
    fill_value(x, (long)M * ldx, NAN); /* padding must never be read */
    for (int m = 0; m < M; m++) fill_uniform(x + (long)m * ldx, K, -1, 1);
    fill_uniform(w, (long)N * K, -1, 1);
    fill_value(y, (long)M * ldy, SENTINEL);
    for (int m = 0; m < M; m++) fill_uniform(y + (long)m * ldy, N, -2, 2);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) ref[(long)m * N + n] = y[(long)m * ldy + n];
    assert_int_equal(op_linear(&k, y, x, w, M, N, K, ldx, ldy, 1, &e), 0);
    ref_linear(ref, x, w, M, N, K, ldx);
    float *got = falloc((long)M * N);
    for (int m = 0; m < M; m++) {
        memcpy(got + (long)m * N, y + (long)m * ldy, sizeof(float) * (size_t)N);
        for (int c = N; c < ldy; c++) assert_true(y[(long)m * ldy + c] == SENTINEL); /* padding untouched */
    }
    CHECK_NORM("op_linear strided accumulate", got, ref, (long)M * N, TOL_F32);

    /* strided without accumulate: the previous contents are discarded */
    for (int m = 0; m < M; m++) fill_value(y + (long)m * ldy, N, NAN);
    memset(ref, 0, sizeof(double) * (size_t)M * N);
    assert_int_equal(op_linear(&k, y, x, w, M, N, K, ldx, ldy, 0, &e), 0);
    ref_linear(ref, x, w, M, N, K, ldx);
    for (int m = 0; m < M; m++) memcpy(got + (long)m * N, y + (long)m * ldy, sizeof(float) * (size_t)N);
    CHECK_NORM("op_linear strided overwrite", got, ref, (long)M * N, TOL_F32);
    free(x), free(w), free(y), free(ref), free(got);
    kctx_free(&k);
}

static void test_matmul_nn(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(12);
    int M = 6, N = 9, K = 11;
    float *a = falloc((long)M * K), *b = falloc((long)K * N), *y = falloc((long)M * N);
    double *ref = dalloc((long)M * N);
    fill_uniform(a, (long)M * K, -1, 1);
    fill_uniform(b, (long)K * N, -1, 1);
    fill_value(y, (long)M * N, NAN);
    assert_int_equal(op_matmul_nn(&k, y, a, b, M, N, K, &e), 0);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double acc = 0.0;
            for (int kk = 0; kk < K; kk++) acc += (double)a[(long)m * K + kk] * b[(long)kk * N + n];
            ref[(long)m * N + n] = acc;
        }
    CHECK_NORM("op_matmul_nn", y, ref, (long)M * N, TOL_F32);
    free(a), free(b), free(y), free(ref);
    kctx_free(&k);
}

/* y = x / sqrt(mean(x^2) + eps) * w, per row of dim with row stride ld. */
static void ref_rmsnorm(double *y, const float *x, const float *w, int rows, int dim, int ld, double eps) {
    for (int r = 0; r < rows; r++) {
        double ss = 0.0;
        for (int i = 0; i < dim; i++) ss += (double)x[(long)r * ld + i] * x[(long)r * ld + i];
        double inv = 1.0 / sqrt(ss / dim + eps);
        for (int i = 0; i < dim; i++) y[(long)r * dim + i] = x[(long)r * ld + i] * inv * (w ? (double)w[i] : 1.0);
    }
}

static void test_rmsnorm(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(13);
    int rows = 5, dim = 24;
    float eps = 1e-6f;
    long n = (long)rows * dim;
    float *x = falloc(n), *w = falloc(dim), *y = falloc(n);
    double *ref = dalloc(n);
    fill_uniform(x, n, -3, 3);
    fill_uniform(w, dim, 0.5f, 1.5f);

    fill_value(y, n, NAN);
    assert_int_equal(op_rmsnorm(&k, y, x, w, rows, dim, 0, eps, &e), 0);
    ref_rmsnorm(ref, x, w, rows, dim, dim, eps);
    CHECK_ELEM("op_rmsnorm weighted", y, ref, n, TOL_F32);

    fill_value(y, n, NAN);
    assert_int_equal(op_rmsnorm(&k, y, x, NULL, rows, dim, 0, eps, &e), 0);
    ref_rmsnorm(ref, x, NULL, rows, dim, dim, eps);
    CHECK_ELEM("op_rmsnorm unweighted", y, ref, n, TOL_F32);

    /* a row of tiny values: eps dominates, so a dropped or misplaced eps shows */
    fill_uniform(x, dim, -1e-4f, 1e-4f);
    ref_rmsnorm(ref, x, w, rows, dim, dim, eps);
    memcpy(y, x, sizeof(float) * (size_t)n);
    assert_int_equal(op_rmsnorm(&k, y, y, w, rows, dim, 0, eps, &e), 0); /* in place */
    CHECK_ELEM("op_rmsnorm in place (eps-dominated row 0)", y, ref, n, TOL_F32);

    /* strided rows: ld > dim, padding neither read (NaN in x) nor written (sentinel in y) */
    int ld = dim + 5;
    float *xs = falloc((long)rows * ld), *ys = falloc((long)rows * ld), *got = falloc(n);
    fill_value(xs, (long)rows * ld, NAN);
    fill_value(ys, (long)rows * ld, SENTINEL);
    for (int r = 0; r < rows; r++) fill_uniform(xs + (long)r * ld, dim, -2, 2);
    assert_int_equal(op_rmsnorm(&k, ys, xs, w, rows, dim, ld, eps, &e), 0);
    ref_rmsnorm(ref, xs, w, rows, dim, ld, eps);
    for (int r = 0; r < rows; r++) {
        memcpy(got + (long)r * dim, ys + (long)r * ld, sizeof(float) * (size_t)dim);
        for (int c = dim; c < ld; c++) assert_true(ys[(long)r * ld + c] == SENTINEL);
    }
    CHECK_ELEM("op_rmsnorm strided", got, ref, n, TOL_F32);

    /* strided and in place */
    for (int r = 0; r < rows; r++) memcpy(ys + (long)r * ld, xs + (long)r * ld, sizeof(float) * (size_t)dim);
    assert_int_equal(op_rmsnorm(&k, ys, ys, NULL, rows, dim, ld, eps, &e), 0);
    ref_rmsnorm(ref, xs, NULL, rows, dim, ld, eps);
    for (int r = 0; r < rows; r++) memcpy(got + (long)r * dim, ys + (long)r * ld, sizeof(float) * (size_t)dim);
    CHECK_ELEM("op_rmsnorm strided in place", got, ref, n, TOL_F32);
    free(x), free(w), free(y), free(ref), free(xs), free(ys), free(got);
    kctx_free(&k);
}

static void test_embedding(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(14);
    int vocab = 10, dim = 6;
    float *table = falloc((long)vocab * dim), *out = falloc(5L * dim);
    fill_uniform(table, (long)vocab * dim, -1, 1);
    const int32_t ids[5] = {3, 0, 9, 3, 7};
    assert_int_equal(op_embedding(&k, out, table, ids, 5, dim, vocab, &e), 0);
    for (int t = 0; t < 5; t++)
        for (int c = 0; c < dim; c++) assert_true(out[t * dim + c] == table[ids[t] * dim + c]); /* exact copy */

    const int32_t bad_hi[3] = {1, 2, 12345};
    memset(e.msg, 0, sizeof e.msg);
    assert_int_equal(op_embedding(&k, out, table, bad_hi, 3, dim, vocab, &e), -1);
    if (!strstr(e.msg, "12345")) fail_msg("error does not name the id: '%s'", e.msg);

    const int32_t bad_lo[2] = {-7, 1};
    memset(e.msg, 0, sizeof e.msg);
    assert_int_equal(op_embedding(&k, out, table, bad_lo, 2, dim, vocab, &e), -1);
    if (!strstr(e.msg, "-7")) fail_msg("error does not name the id: '%s'", e.msg);

    const int32_t edge[1] = {10}; /* == vocab: just outside */
    assert_int_equal(op_embedding(&k, out, table, edge, 1, dim, vocab, &e), -1);

    /* a slice of the vocabulary (rows [4, 8) at row 0): its ids copied, the others zero, and the
     * sum over the slices the whole lookup; the backward lands only in the slice's rows */
    float *sum = falloc(5L * dim), *dt = falloc(4L * dim), *g = falloc(5L * dim);
    fill_value(sum, 5L * dim, 0.0f);
    for (int lo = 0; lo < vocab; lo += 4) {
        int hi = lo + 4 < vocab ? lo + 4 : vocab;
        assert_int_equal(op_embedding_part(&k, out, table + (long)lo * dim, ids, 5, dim, vocab, lo, hi, &e), 0);
        for (int t = 0; t < 5; t++)
            for (int c = 0; c < dim; c++) {
                float want = ids[t] >= lo && ids[t] < hi ? table[ids[t] * dim + c] : 0.0f;
                assert_true(out[t * dim + c] == want);
                sum[t * dim + c] += out[t * dim + c];
            }
    }
    for (int i = 0; i < 5 * dim; i++) assert_true(sum[i] == table[ids[i / dim] * dim + i % dim]);
    assert_int_equal(op_embedding_part(&k, out, table, bad_hi, 3, dim, vocab, 0, 4, &e), -1); /* still checked */
    fill_uniform(g, 5L * dim, -1, 1);
    fill_value(dt, 4L * dim, 0.0f);
    assert_int_equal(op_embedding_part_backward(&k, dt, g, ids, 5, dim, 3, 7, &e), 0); /* ids 3, 3: row 0 */
    for (int c = 0; c < dim; c++) {
        assert_true(fabsf(dt[c] - (g[c] + g[3 * dim + c])) < 1e-6f);
        assert_true(dt[dim + c] == 0.0f && dt[2 * dim + c] == 0.0f); /* ids 4, 5: none */
        assert_true(dt[3 * dim + c] == 0.0f);                        /* id 6: none */
    }
    free(table), free(out), free(sum), free(dt), free(g);
    kctx_free(&k);
}

/* The token head: log-softmax at the target and entropy of logits / T against double sums, the
 * whole row in one slice and in three uneven slices joined (every slice gets the same numbers; its
 * probabilities and backward are the whole row's columns); a target past the vocabulary is an error. */
static void test_token_logp(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(15);
    enum { N = 6, V = 50, S = 3 };
    float T = 0.8f, *l = falloc((long)N * V), *whole = falloc((long)N * V), *lp = falloc(N), *en = falloc(N);
    float *dlp = falloc(N), *den = falloc(N);
    int32_t y[N] = {3, -1, 49, 0, 17, 33}, rows[N];
    double *part = dalloc(3L * N * S), ref_lp[N], ref_en[N];
    fill_uniform(l, (long)N * V, -6, 6);
    memcpy(whole, l, sizeof(float) * N * V);
    long cnt = 0, c = 0;
    for (int t = 0; t < N; t++) { /* double reference */
        if (y[t] < 0) continue;
        double mx = -INFINITY, s = 0, pz = 0;
        for (int v = 0; v < V; v++) mx = fmax(mx, (double)l[t * V + v] / T);
        for (int v = 0; v < V; v++) s += exp((double)l[t * V + v] / T - mx);
        for (int v = 0; v < V; v++) {
            double z = (double)l[t * V + v] / T;
            pz += exp(z - mx) / s * z;
        }
        ref_lp[c] = (double)l[t * V + y[t]] / T - mx - log(s);
        ref_en[c++] = mx + log(s) - pz;
    }
    assert_int_equal(op_token_logp_part(&k, whole, part, y, N, V, 0, V, T, &e), 0);
    assert_int_equal(op_token_logp(&k, whole, lp, en, rows, &cnt, part, 1, y, N, V, V, T, &e), 0);
    assert_int_equal(cnt, c);
    CHECK_ELEM("token logp", lp, ref_lp, cnt, 1e-6);
    CHECK_NORM("token entropy", en, ref_en, cnt, 1e-6);
    fill_uniform(dlp, cnt, -1, 1);
    fill_uniform(den, cnt, -1, 1);
    float *slice[S];
    int lo[S + 1];
    for (int q = 0; q <= S; q++) lo[q] = V * q / S; /* 16, 17, 17 columns */
    for (int q = 0; q < S; q++) {
        int vl = lo[q + 1] - lo[q];
        slice[q] = falloc((long)N * vl);
        for (int t = 0; t < N; t++) memcpy(slice[q] + t * vl, l + t * V + lo[q], sizeof(float) * (size_t)vl);
        assert_int_equal(op_token_logp_part(&k, slice[q], part + 3L * N * q, y, N, vl, lo[q], V, T, &e), 0);
    }
    float *slp = falloc(N), *sen = falloc(N);
    double wlp[N], wen[N], wd[V];
    for (int i = 0; i < cnt; i++) wlp[i] = lp[i], wen[i] = en[i];
    assert_int_equal(op_token_logp_backward(&k, whole, rows, cnt, dlp, den, en, y, N, V, 0, T, &e), 0);
    for (int q = 0; q < S; q++) {
        int vl = lo[q + 1] - lo[q];
        long sc = 0;
        int32_t srows[N];
        assert_int_equal(op_token_logp(&k, slice[q], slp, sen, srows, &sc, part, S, y, N, vl, V, T, &e), 0);
        assert_int_equal(sc, cnt);
        CHECK_ELEM("sliced logp", slp, wlp, cnt, 1e-6);
        CHECK_NORM("sliced entropy", sen, wen, cnt, 1e-6);
        assert_int_equal(op_token_logp_backward(&k, slice[q], srows, sc, dlp, den, sen, y, N, vl, lo[q], T, &e), 0);
        for (int t = 0; t < N; t++) {
            for (int v = 0; v < vl; v++) wd[v] = whole[t * V + lo[q] + v];
            CHECK_NORM("sliced dlogits", slice[q] + t * vl, wd, vl, 1e-5);
        }
        free(slice[q]);
    }
    y[2] = V;
    assert_int_equal(op_token_logp(&k, whole, lp, en, rows, &cnt, part, 1, y, N, V, V, T, &e), -1);
    if (!strstr(e.msg, "50")) fail_msg("error does not name the target: '%s'", e.msg);
    free(l), free(whole), free(lp), free(en), free(dlp), free(den), free(part), free(slp), free(sen);
    kctx_free(&k);
}

static void test_swiglu_clamp(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    const float L = 7.0f;
    /* g and u each run below -L, inside, at the limit and above it, in all combinations */
    const float vals[] = {-50.0f, -7.5f, -7.0f, -3.0f, -0.25f, 0.0f, 0.5f, 2.5f, 6.9f, 7.0f, 7.5f, 50.0f};
    const int nv = (int)(sizeof vals / sizeof vals[0]);
    long n = (long)nv * nv;
    float *g = falloc(n), *u = falloc(n), *h = falloc(n);
    double *ref = dalloc(n);
    for (int a = 0; a < nv; a++)
        for (int b = 0; b < nv; b++) {
            long i = (long)a * nv + b;
            g[i] = vals[a];
            u[i] = vals[b];
            double gg = g[i] < L ? g[i] : L;                      /* min(g, L) */
            double uu = u[i] < -L ? -L : (u[i] > L ? L : u[i]);   /* clamp(u, -L, L) */
            ref[i] = gg * sigmoid_d(gg) * uu;                     /* silu(gg) * uu */
        }
    assert_int_equal(op_swiglu_clamp(&k, h, g, u, n, L, &e), 0);
    CHECK_ELEM("op_swiglu_clamp", h, ref, n, TOL_F32);
    /* hand-checked corners: g=50,u=50 -> silu(7)*7; g=-50 is NOT clamped from below */
    double top = 7.0 / (1.0 + exp(-7.0)) * 7.0;
    long i_top = (long)(nv - 1) * nv + (nv - 1);
    assert_true(fabs(h[i_top] - top) <= TOL_F32 * top);
    long i_neg = 0L * nv + 7; /* g = -50, u = 2.5: silu(-50) * 2.5 ~ -2.4e-20, not silu(-7) * 2.5 */
    assert_true(fabs(h[i_neg]) < 1e-15);
    free(g), free(u), free(h), free(ref);
    kctx_free(&k);
}

/* ---------------------------------------------------------------- rope */

static void test_rope_inv_freq_plain(void **state) {
    (void)state;
    const int dims[] = {8, 16, 64};
    const double thetas[] = {10000.0, 160000.0, 1e6};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++) {
            int r = dims[a];
            float f[64];
            double ref[32];
            rope_inv_freq(f, r, thetas[b], 0, 99.0, 99.0, 99.0, 7);
            for (int i = 0; i < r / 2; i++) ref[i] = pow(thetas[b], -2.0 * i / r);
            CHECK_ELEM("rope_inv_freq plain", f, ref, r / 2, TOL_FREQ);
        }
}

/* HF _compute_yarn_parameters (attention_factor 1), in double. Returns low/high before clamping
 * through *raw_lo / *raw_hi so a case can assert which branch it exercises. */
static void ref_yarn(double *inv, int d, double base, double factor, double beta_fast, double beta_slow, int omax,
                     double *raw_lo, double *raw_hi) {
    double low = floor(d * log(omax / (beta_fast * 2 * M_PI)) / (2 * log(base)));
    double high = ceil(d * log(omax / (beta_slow * 2 * M_PI)) / (2 * log(base)));
    *raw_lo = low;
    *raw_hi = high;
    if (low < 0) low = 0;
    if (high > d - 1) high = d - 1;
    if (low == high) high += 0.001; /* HF's linear_ramp_factor guard */
    for (int i = 0; i < d / 2; i++) {
        double extrap = 1.0 / pow(base, 2.0 * i / d);
        double interp = 1.0 / (factor * pow(base, 2.0 * i / d));
        double ramp = (i - low) / (high - low);
        ramp = ramp < 0 ? 0 : (ramp > 1 ? 1 : ramp);
        inv[i] = interp * ramp + extrap * (1 - ramp);
    }
}

static void test_rope_inv_freq_yarn(void **state) {
    (void)state;
    struct {
        int d;
        double base, factor, beta_fast, beta_slow;
        int omax;
    } cases[] = {
        {64, 10000.0, 16.0, 32.0, 1.0, 65536}, /* DeepSeek-like: ramp inside [0, d/2) */
        {32, 10000.0, 8.0, 32.0, 1.0, 4096},   /* ramp reaches 1: a fully interpolated tail */
        {16, 10.0, 4.0, 32.0, 1.0, 1000},      /* high clamped to d-1 while low < d/2: the clamp shows */
        {16, 100.0, 4.0, 32.0, 1.0, 100},      /* low clamped to 0 */
        {16, 100.0, 4.0, 32.0, 1.0, 5},        /* low == high == 0: HF's +0.001 guard (else 0/0) */
    };
    int saw_full_interp = 0, saw_hi_clamp = 0, saw_lo_clamp = 0, saw_blend = 0;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        float f[64], plain[64];
        double ref[32], lo, hi;
        int d = cases[c].d;
        rope_inv_freq(f, d, cases[c].base, 1, cases[c].factor, cases[c].beta_fast, cases[c].beta_slow, cases[c].omax);
        rope_inv_freq(plain, d, cases[c].base, 0, 0, 0, 0, 0);
        ref_yarn(ref, d, cases[c].base, cases[c].factor, cases[c].beta_fast, cases[c].beta_slow, cases[c].omax, &lo,
                 &hi);
        char what[64];
        snprintf(what, sizeof what, "rope_inv_freq yarn case %zu", c);
        CHECK_ELEM(what, f, ref, d / 2, TOL_FREQ);
        saw_hi_clamp |= hi > d - 1 && lo < d / 2 - 1; /* otherwise the ramp never reaches high */
        saw_lo_clamp |= lo < 0;
        for (int i = 0; i < d / 2; i++) {
            double r = ref[i] * pow(cases[c].base, 2.0 * i / d); /* 1 = extrapolated, 1/factor = interpolated */
            saw_full_interp |= fabs(r - 1.0 / cases[c].factor) < 1e-12;
            saw_blend |= r < 1.0 - 1e-9 && r > 1.0 / cases[c].factor + 1e-9;
        }
        /* frequency 0 (i = 0) is always extrapolated: it matches plain RoPE */
        assert_true(f[0] == plain[0]);
    }
    assert_true(saw_full_interp && saw_hi_clamp && saw_lo_clamp && saw_blend); /* the cases cover the formula */
}

static void test_rope(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(15);
    int n_tok = 4, n_vec = 3, dim = 24, rope_dim = 16, half = rope_dim / 2, off = dim - rope_dim;
    const int32_t pos[4] = {0, 1, 5, 37};
    float inv[8];
    rope_inv_freq(inv, rope_dim, 10000.0, 0, 0, 0, 0, 0);
    long n = (long)n_tok * n_vec * dim;
    float *x0 = falloc(n), *x = falloc(n), *got = falloc(n);
    double *ref = dalloc(n);
    fill_uniform(x0, n, -2, 2);
    memcpy(x, x0, sizeof(float) * (size_t)n);
    assert_int_equal(op_rope(&k, x, n_tok, n_vec, dim, rope_dim, pos, inv, 1, &e), 0);

    long m = 0; /* rope channels only, in order */
    for (int t = 0; t < n_tok; t++)
        for (int v = 0; v < n_vec; v++) {
            const float *a = x0 + ((long)t * n_vec + v) * dim, *b = x + ((long)t * n_vec + v) * dim;
            for (int c = 0; c < off; c++) assert_true(b[c] == a[c]); /* leading channels untouched */
            for (int i = 0; i < half; i++) {
                double ang = (double)pos[t] * inv[i], c = cos(ang), s = sin(ang);
                double p = a[off + 2 * i], q = a[off + 2 * i + 1];
                ref[m] = p * c - q * s;
                got[m++] = b[off + 2 * i];
                ref[m] = q * c + p * s;
                got[m++] = b[off + 2 * i + 1];
                /* the rotation preserves each pair's norm */
                double n0 = hypot(p, q), n1 = hypot(b[off + 2 * i], b[off + 2 * i + 1]);
                if (!(fabs(n1 - n0) <= TOL_F32 * n0)) fail_msg("op_rope pair norm %g -> %g", n0, n1);
            }
            if (pos[t] == 0)
                for (int c = off; c < dim; c++) assert_true(b[c] == a[c]); /* position 0 is the identity */
        }
    CHECK_NORM("op_rope sign +1", got, ref, m, TOL_F32);

    /* sign -1 is the inverse rotation */
    assert_int_equal(op_rope(&k, x, n_tok, n_vec, dim, rope_dim, pos, inv, -1, &e), 0);
    for (long i = 0; i < n; i++) ref[i] = x0[i];
    CHECK_NORM("op_rope sign -1 undoes +1", x, ref, n, TOL_F32);

    /* sign -1 alone rotates by -angle */
    memcpy(x, x0, sizeof(float) * (size_t)n);
    assert_int_equal(op_rope(&k, x, n_tok, n_vec, dim, rope_dim, pos, inv, -1, &e), 0);
    m = 0;
    for (int t = 0; t < n_tok; t++)
        for (int v = 0; v < n_vec; v++) {
            const float *a = x0 + ((long)t * n_vec + v) * dim, *b = x + ((long)t * n_vec + v) * dim;
            for (int i = 0; i < half; i++) {
                double ang = -(double)pos[t] * inv[i], c = cos(ang), s = sin(ang);
                double p = a[off + 2 * i], q = a[off + 2 * i + 1];
                ref[m] = p * c - q * s;
                got[m++] = b[off + 2 * i];
                ref[m] = q * c + p * s;
                got[m++] = b[off + 2 * i + 1];
            }
        }
    CHECK_NORM("op_rope sign -1", got, ref, m, TOL_F32);
    free(x0), free(x), free(got), free(ref);
    kctx_free(&k);
}

/* ---------------------------------------------------------------- attention */

/* Brute-force sink attention from attention.h; use_sink = 0 drops the sink (plain softmax). */
static void ref_sink_attention(double *out, const float *q, const float *kv, const float *comp,
                               const int32_t *comp_idx, int n_comp, const float *sinks, int T, int H, int d,
                               int window, double scale, int use_sink) {
    const float **keys = malloc(sizeof(float *) * (size_t)(window + n_comp + 1));
    double *lg = malloc(sizeof(double) * (size_t)(window + n_comp + 1));
    assert_non_null(keys);
    assert_non_null(lg);
    for (int i = 0; i < T; i++) {
        int nk = 0;
        for (int j = i - window + 1 > 0 ? i - window + 1 : 0; j <= i; j++) keys[nk++] = kv + (long)j * d;
        for (int c = 0; c < n_comp; c++)
            if (comp_idx[(long)i * n_comp + c] >= 0) keys[nk++] = comp + (long)comp_idx[(long)i * n_comp + c] * d;
        for (int h = 0; h < H; h++) {
            const float *qi = q + ((long)i * H + h) * d;
            double mx = use_sink ? sinks[h] : -INFINITY;
            for (int j = 0; j < nk; j++) {
                double dot = 0.0;
                for (int c = 0; c < d; c++) dot += (double)qi[c] * keys[j][c];
                lg[j] = dot * scale;
                mx = lg[j] > mx ? lg[j] : mx;
            }
            double den = use_sink ? exp((double)sinks[h] - mx) : 0.0; /* sink: denominator only */
            for (int j = 0; j < nk; j++) den += exp(lg[j] - mx);
            double *o = out + ((long)i * H + h) * d;
            for (int c = 0; c < d; c++) o[c] = 0.0;
            for (int j = 0; j < nk; j++)
                for (int c = 0; c < d; c++) o[c] += exp(lg[j] - mx) / den * keys[j][c];
        }
    }
    free(keys);
    free(lg);
}

static void test_sink_attention(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(16);
    int T = 9, H = 3, d = 8, window = 4, Tc = 5, n_comp = 3;
    float scale = 1.0f / sqrtf((float)d);
    long nq = (long)T * H * d;
    float *q = falloc(nq), *kv = falloc((long)T * d), *comp = falloc((long)Tc * d), *out = falloc(nq);
    float sinks[3];
    int32_t *cidx = malloc(sizeof(int32_t) * (size_t)T * n_comp);
    assert_non_null(cidx);
    double *ref = dalloc(nq), *ref_plain = dalloc(nq);
    fill_uniform(q, nq, -2, 2);
    fill_uniform(kv, (long)T * d, -2, 2);
    fill_uniform(comp, (long)Tc * d, -2, 2);
    fill_uniform(sinks, H, -1, 1);
    int n_empty = 0;
    for (long i = 0; i < (long)T * n_comp; i++) {
        cidx[i] = rng_int(Tc + 1) - 1; /* -1 .. Tc-1 */
        n_empty += cidx[i] < 0;
    }
    cidx[0] = -1, cidx[1] = 4, cidx[2] = -1; /* query 0: one real entry between two empty slots */
    assert_true(n_empty > 0);

    /* window only */
    fill_value(out, nq, NAN);
    assert_int_equal(op_sink_attention(&k, out, q, kv, NULL, NULL, 0, sinks, T, 0, H, d, window, scale, &e), 0);
    ref_sink_attention(ref, q, kv, NULL, NULL, 0, sinks, T, H, d, window, scale, 1);
    CHECK_NORM("op_sink_attention n_comp=0", out, ref, nq, TOL_F32);

    /* window plus compressed entries */
    fill_value(out, nq, NAN);
    assert_int_equal(op_sink_attention(&k, out, q, kv, comp, cidx, n_comp, sinks, T, 0, H, d, window, scale, &e), 0);
    ref_sink_attention(ref, q, kv, comp, cidx, n_comp, sinks, T, H, d, window, scale, 1);
    CHECK_NORM("op_sink_attention with compressed", out, ref, nq, TOL_F32);

    /* window larger than T: every query sees its whole prefix */
    assert_int_equal(op_sink_attention(&k, out, q, kv, comp, cidx, n_comp, sinks, T, 0, H, d, 64, scale, &e), 0);
    ref_sink_attention(ref, q, kv, comp, cidx, n_comp, sinks, T, H, d, 64, scale, 1);
    CHECK_NORM("op_sink_attention window > T", out, ref, nq, TOL_F32);

    /* a huge negative sink: plain softmax over the keys */
    float neg[3] = {-1e30f, -1e30f, -1e30f};
    assert_int_equal(op_sink_attention(&k, out, q, kv, comp, cidx, n_comp, neg, T, 0, H, d, window, scale, &e), 0);
    ref_sink_attention(ref_plain, q, kv, comp, cidx, n_comp, NULL, T, H, d, window, scale, 0);
    CHECK_NORM("op_sink_attention sink -> -inf is plain softmax", out, ref_plain, nq, TOL_F32);

    /* a huge positive sink takes all the mass: the output goes to ~0 */
    float pos_s[3] = {80.0f, 80.0f, 80.0f};
    assert_int_equal(op_sink_attention(&k, out, q, kv, comp, cidx, n_comp, pos_s, T, 0, H, d, window, scale, &e), 0);
    for (long i = 0; i < nq; i++)
        if (!(fabsf(out[i]) < 1e-20f)) fail_msg("op_sink_attention sink=+80: out[%ld] = %g, expected ~0", i, out[i]);
    /* and the ordinary sink really matters (sink vs no-sink references differ) */
    ref_sink_attention(ref, q, kv, comp, cidx, n_comp, sinks, T, H, d, window, scale, 1);
    assert_true(err_norm(out, ref, nq) > 0.5);
    free(q), free(kv), free(comp), free(out), free(cidx), free(ref), free(ref_plain);
    kctx_free(&k);
}

/* Compressor pooling from attention.h. Slot list per (window w, channel c):
 * overlap 0: rows w*ratio + t, channel c, ape[t][c];
 * overlap 1: rows (w-1)*ratio + t at channel c with ape[t][c] (when w > 0), then rows w*ratio + t at
 *            channel d + c with ape[t][d + c]; softmax over slots of g + ape, weighted sum of a. */
static void ref_compress_pool(double *out, const float *a, const float *g, const float *ape, int T, int d, int ratio,
                              int overlap) {
    int width = overlap ? 2 * d : d, n_win = T / ratio;
    for (int w = 0; w < n_win; w++)
        for (int c = 0; c < d; c++) {
            double lg[64], val[64];
            int ns = 0;
            if (overlap && w > 0)
                for (int t = 0; t < ratio; t++) {
                    long row = (long)(w - 1) * ratio + t;
                    lg[ns] = (double)g[row * width + c] + ape[(long)t * width + c];
                    val[ns++] = a[row * width + c];
                }
            int ch = overlap ? d + c : c;
            for (int t = 0; t < ratio; t++) {
                long row = (long)w * ratio + t;
                lg[ns] = (double)g[row * width + ch] + ape[(long)t * width + ch];
                val[ns++] = a[row * width + ch];
            }
            double mx = -INFINITY, den = 0.0, acc = 0.0;
            for (int s = 0; s < ns; s++) mx = lg[s] > mx ? lg[s] : mx;
            for (int s = 0; s < ns; s++) den += exp(lg[s] - mx);
            for (int s = 0; s < ns; s++) acc += exp(lg[s] - mx) / den * val[s];
            out[(long)w * d + c] = acc;
        }
}

static void test_compress_pool(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(17);
    int d = 5, ratio = 4;
    const int Ts[] = {12, 14}; /* 14: two trailing tokens that form no window */
    for (int overlap = 0; overlap <= 1; overlap++)
        for (int ti = 0; ti < 2; ti++) {
            int T = Ts[ti], width = overlap ? 2 * d : d, n_win = T / ratio;
            float *a = falloc((long)T * width), *g = falloc((long)T * width), *ape = falloc((long)ratio * width);
            float *out = falloc((long)(n_win + 1) * d);
            double *ref = dalloc((long)n_win * d);
            fill_uniform(a, (long)T * width, -2, 2);
            fill_uniform(g, (long)T * width, -3, 3);
            fill_uniform(ape, (long)ratio * width, -1, 1);
            fill_value(out, (long)(n_win + 1) * d, SENTINEL);
            assert_int_equal(op_compress_pool(&k, out, a, g, ape, T, d, ratio, overlap, &e), 0);
            ref_compress_pool(ref, a, g, ape, T, d, ratio, overlap);
            char what[64];
            snprintf(what, sizeof what, "op_compress_pool overlap=%d T=%d", overlap, T);
            CHECK_NORM(what, out, ref, (long)n_win * d, TOL_F32);
            for (int c = 0; c < d; c++) assert_true(out[(long)n_win * d + c] == SENTINEL); /* n_win rows only */
            free(a), free(g), free(ape), free(out), free(ref);
        }
    kctx_free(&k);
}

static void test_indexer_scores(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(18);
    int T = 10, ratio = 3, Tc = 4, nh = 2, hd = 6; /* Tc > T/ratio: entry 3 is never visible */
    float scale_qk = 0.3f;
    float *q = falloc((long)T * nh * hd), *keys = falloc((long)Tc * hd), *wts = falloc((long)T * nh);
    float *score = falloc((long)T * Tc), *got = falloc((long)T * Tc);
    double *ref = dalloc((long)T * Tc);
    fill_uniform(q, (long)T * nh * hd, -1, 1);
    fill_uniform(keys, (long)Tc * hd, -1, 1);
    fill_uniform(wts, (long)T * nh, -1, 1);
    fill_value(score, (long)T * Tc, NAN);
    assert_int_equal(op_indexer_scores(&k, score, q, keys, wts, T, 0, Tc, nh, hd, scale_qk, ratio, &e), 0);
    long nvis = 0;
    int saw_negative_dot = 0;
    for (int i = 0; i < T; i++)
        for (int w = 0; w < Tc; w++) {
            float s = score[(long)i * Tc + w];
            if (w >= (i + 1) / ratio) { /* masked */
                if (!(isinf(s) && s < 0)) fail_msg("score[%d,%d] = %g, expected -inf", i, w, s);
                continue;
            }
            double acc = 0.0;
            for (int h = 0; h < nh; h++) {
                double dot = 0.0;
                for (int c = 0; c < hd; c++) dot += (double)q[((long)i * nh + h) * hd + c] * keys[(long)w * hd + c];
                saw_negative_dot |= dot < 0;
                acc += wts[(long)i * nh + h] * (dot > 0 ? dot : 0.0) * scale_qk;
            }
            ref[nvis] = acc;
            got[nvis++] = s;
        }
    assert_true(nvis == 3 * 1 + 3 * 2 + 2 * 3); /* rows 2-4: 1, rows 5-7: 2, rows 8-9: 3 visible */
    assert_true(saw_negative_dot);             /* relu is exercised */
    CHECK_NORM("op_indexer_scores visible", got, ref, nvis, TOL_F32);
    free(q), free(keys), free(wts), free(score), free(got), free(ref);
    kctx_free(&k);
}

/* Checks one row of op_topk_visible against the expected set expect[0..n_exp), -1 padded after. */
static void check_topk_row(const int32_t *row, int topk, const int *expect, int n_exp, int i) {
    for (int c = n_exp; c < topk; c++)
        if (row[c] != -1) fail_msg("topk row %d slot %d = %d, expected -1 padding", i, c, row[c]);
    for (int a = 0; a < n_exp; a++) {
        int found = 0;
        for (int b = 0; b < n_exp; b++) found += row[b] == expect[a];
        if (found != 1) fail_msg("topk row %d: entry %d found %d times among the first %d", i, expect[a], found, n_exp);
    }
}

static void test_topk_visible(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(19);
    int T = 23, Tc = 6, ratio = 3, topk = 3; /* rows 20-22: (i+1)/ratio = 7 > Tc, capped at Tc */
    float *score = falloc((long)T * Tc);
    int32_t *idx = malloc(sizeof(int32_t) * (size_t)T * topk);
    assert_non_null(idx);
    /* distinct scores: a random permutation of 0..Tc-1 per row plus a small jitter; entries past the
     * visible range get huge scores that must be ignored */
    for (int i = 0; i < T; i++) {
        int perm[6] = {0, 1, 2, 3, 4, 5};
        for (int a = Tc - 1; a > 0; a--) {
            int b = rng_int(a + 1), t = perm[a];
            perm[a] = perm[b], perm[b] = t;
        }
        int vis = (i + 1) / ratio < Tc ? (i + 1) / ratio : Tc;
        for (int w = 0; w < Tc; w++)
            score[(long)i * Tc + w] = w < vis ? (float)perm[w] - 2.5f + 0.1f * (float)rng_uniform() : 1e30f;
    }
    for (long i = 0; i < (long)T * topk; i++) idx[i] = 0x7777; /* garbage: the op must pad itself */
    assert_int_equal(op_topk_visible(&k, idx, score, T, 0, Tc, topk, ratio, &e), 0);
    int rows_full = 0, rows_partial = 0;
    for (int i = 0; i < T; i++) {
        int vis = (i + 1) / ratio < Tc ? (i + 1) / ratio : Tc;
        int order[6], expect[6];
        for (int w = 0; w < vis; w++) order[w] = w;
        /* brute force: selection sort, descending, lower index first on ties */
        for (int a = 0; a < vis; a++)
            for (int b = a + 1; b < vis; b++) {
                float sa = score[(long)i * Tc + order[a]], sb = score[(long)i * Tc + order[b]];
                if (sb > sa || (sb == sa && order[b] < order[a])) {
                    int t = order[a];
                    order[a] = order[b], order[b] = t;
                }
            }
        int n_exp = vis < topk ? vis : topk;
        for (int a = 0; a < n_exp; a++) expect[a] = order[a];
        check_topk_row(idx + (long)i * topk, topk, expect, n_exp, i);
        rows_full += vis > topk;
        rows_partial += vis < topk;
    }
    assert_true(rows_full > 0 && rows_partial > 0);

    /* ties keep the lower index */
    const float tie_all[5] = {1, 1, 1, 1, 1};
    const float tie_edge[5] = {0, 2, 1, 1, 1}; /* 1 first, then the lowest of the three 1s: 2 */
    const float tie_late[5] = {1, 0, 3, 0, 1}; /* 2, then 0 (not 4) */
    int32_t r2[2];
    const int ex_all[2] = {0, 1}, ex_edge[2] = {1, 2}, ex_late[2] = {2, 0};
    /* T = 5 rows with ratio 1: the last row (i = 4) sees all 5 entries; test that row alone */
    float sc[5 * 5];
    int32_t id5[5 * 2];
    const float *cases[3] = {tie_all, tie_edge, tie_late};
    const int *expects[3] = {ex_all, ex_edge, ex_late};
    for (int c = 0; c < 3; c++) {
        for (int r = 0; r < 5; r++) memcpy(sc + r * 5, cases[c], sizeof(float) * 5);
        assert_int_equal(op_topk_visible(&k, id5, sc, 5, 0, 5, 2, 1, &e), 0);
        memcpy(r2, id5 + 4 * 2, sizeof r2);
        check_topk_row(r2, 2, expects[c], 2, c);
    }
    free(score), free(idx);
    kctx_free(&k);
}

static void test_causal_entries(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    int T = 10, Tc = 4, ratio = 3;
    int32_t idx[10 * 4];
    memset(idx, 0x55, sizeof idx);
    assert_int_equal(op_causal_entries(&k, idx, T, 0, Tc, ratio, &e), 0);
    /* hand-checked: rows 0-1 see nothing, 2-4 entry 0, 5-7 entries 0-1, 8-9 entries 0-2 */
    const int32_t expect[10][4] = {{-1, -1, -1, -1}, {-1, -1, -1, -1}, {0, -1, -1, -1}, {0, -1, -1, -1},
                                   {0, -1, -1, -1},  {0, 1, -1, -1},   {0, 1, -1, -1},  {0, 1, -1, -1},
                                   {0, 1, 2, -1},    {0, 1, 2, -1}};
    for (int i = 0; i < T; i++)
        for (int w = 0; w < Tc; w++)
            if (idx[i * Tc + w] != expect[i][w])
                fail_msg("op_causal_entries[%d,%d] = %d, expected %d", i, w, idx[i * Tc + w], expect[i][w]);
    kctx_free(&k);
}

/* ---------------------------------------------------------------- query slices (q0)
 * A rank holding a slice [a, b) of a sequence's queries (context parallelism) runs the ops with
 * q0 = a against the whole sequence's keys. The CPU computes each query on its own, so every
 * slice's rows must be the whole run's bit for bit; the backward's key and sink gradients, summed
 * over the slices (as ranks would sum them), must match the whole run's. kv rows from b on are NaN
 * in a slice's run, so a read past q0 + T shows. */

typedef struct {
    int n, cut[4]; /* slices [cut[s], cut[s + 1]) */
} slicing;

static const slicing g_slicings[] = {{3, {0, 5, 11, 17}}, {2, {0, 12, 17}}};
#define SLICE_T 17
#define N_SLICINGS (int)(sizeof g_slicings / sizeof g_slicings[0])

static void check_same(const char *what, const void *got, const void *want, size_t bytes, int slicing_i) {
    if (memcmp(got, want, bytes))
        fail_msg("%s (slicing %d): the slices' rows differ from the whole run's", what, slicing_i);
}

static void test_attention_slices(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(24);
    const struct {
        int window, n_comp;
    } cases[] = {{3, 0}, {8, 3}, {3, 4}, {20, 2}}; /* window under every slice, over some, over T */
    int T = SLICE_T, H = 3, d = 8, Tc = 5;
    float scale = 1.0f / sqrtf((float)d);
    long nq = (long)T * H * d, nkv = (long)T * d, ncp = (long)Tc * d;
    float *q = falloc(nq), *kv = falloc(nkv), *kvs = falloc(nkv), *comp = falloc(ncp), *sinks = falloc(H);
    float *go = falloc(nq), *whole = falloc(nq), *got = falloc(nq), *dq0 = falloc(nq);
    float *dq_w = falloc(nq), *dkv_w = falloc(nkv), *dc_w = falloc(ncp), *ds_w = falloc(H);
    float *dq_s = falloc(nq), *dkv_s = falloc(nkv), *dc_s = falloc(ncp), *ds_s = falloc(H);
    float *dkv_sum = falloc(nkv), *dc_sum = falloc(ncp), *ds_sum = falloc(H);
    double *ref = dalloc(nkv > ncp ? nkv : ncp);
    int32_t *cidx = malloc(sizeof(int32_t) * (size_t)T * 4);
    assert_non_null(cidx);
    fill_uniform(q, nq, -2, 2);
    fill_uniform(kv, nkv, -2, 2);
    fill_uniform(comp, ncp, -2, 2);
    fill_uniform(sinks, H, -1, 1);
    fill_uniform(go, nq, -1, 1);
    fill_uniform(dq0, nq, -1, 1); /* dq accumulates: onto the same values in both runs */
    for (int ci = 0; ci < (int)(sizeof cases / sizeof cases[0]); ci++) {
        int W = cases[ci].window, nc = cases[ci].n_comp;
        const float *cp = nc ? comp : NULL;
        const int32_t *ip = nc ? cidx : NULL;
        for (long i = 0; i < (long)T * nc; i++) cidx[i] = rng_int(Tc + 1) - 1;
        char what[96];
        assert_int_equal(op_sink_attention(&k, whole, q, kv, cp, ip, nc, sinks, T, 0, H, d, W, scale, &e), 0);
        memcpy(dq_w, dq0, sizeof(float) * (size_t)nq);
        fill_value(dkv_w, nkv, 0.f), fill_value(dc_w, ncp, 0.f), fill_value(ds_w, H, 0.f);
        assert_int_equal(op_sink_attention_backward(&k, dq_w, dkv_w, nc ? dc_w : NULL, ds_w, go, q, kv, cp, ip, nc,
                                                    sinks, T, 0, H, d, W, scale, &e),
                         0);
        for (int si = 0; si < N_SLICINGS; si++) {
            const slicing *sl = &g_slicings[si];
            fill_value(got, nq, NAN);
            memcpy(dq_s, dq0, sizeof(float) * (size_t)nq);
            fill_value(dkv_sum, nkv, 0.f), fill_value(dc_sum, ncp, 0.f), fill_value(ds_sum, H, 0.f);
            for (int s = 0; s < sl->n; s++) {
                int a = sl->cut[s], b = sl->cut[s + 1];
                long at = (long)a * H * d;
                memcpy(kvs, kv, sizeof(float) * (size_t)nkv);
                fill_value(kvs + (long)b * d, (long)(T - b) * d, NAN); /* rows this slice must not read */
                assert_int_equal(op_sink_attention(&k, got + at, q + at, kvs, cp, nc ? cidx + (long)a * nc : NULL, nc,
                                                   sinks, b - a, a, H, d, W, scale, &e),
                                 0);
                fill_value(dkv_s, nkv, 0.f), fill_value(dc_s, ncp, 0.f), fill_value(ds_s, H, 0.f);
                assert_int_equal(op_sink_attention_backward(&k, dq_s + at, dkv_s, nc ? dc_s : NULL, ds_s, go + at,
                                                            q + at, kvs, cp, nc ? cidx + (long)a * nc : NULL, nc, sinks,
                                                            b - a, a, H, d, W, scale, &e),
                                 0);
                for (long x = (long)b * d; x < nkv; x++) /* dkv: rows [0, q0 + T) only */
                    if (dkv_s[x] != 0.f) fail_msg("slice [%d, %d): dkv[%ld] = %g past its rows", a, b, x, dkv_s[x]);
                for (long x = 0; x < nkv; x++) dkv_sum[x] += dkv_s[x];
                for (long x = 0; x < ncp; x++) dc_sum[x] += dc_s[x];
                for (int h = 0; h < H; h++) ds_sum[h] += ds_s[h];
            }
            snprintf(what, sizeof what, "op_sink_attention window=%d n_comp=%d", W, nc);
            check_same(what, got, whole, sizeof(float) * (size_t)nq, si);
            snprintf(what, sizeof what, "op_sink_attention_backward dq window=%d n_comp=%d", W, nc);
            check_same(what, dq_s, dq_w, sizeof(float) * (size_t)nq, si);
            snprintf(what, sizeof what, "op_sink_attention_backward dkv summed, window=%d n_comp=%d", W, nc);
            for (long x = 0; x < nkv; x++) ref[x] = dkv_w[x];
            CHECK_NORM(what, dkv_sum, ref, nkv, 1e-6);
            if (nc) {
                snprintf(what, sizeof what, "op_sink_attention_backward dcomp summed, window=%d n_comp=%d", W, nc);
                for (long x = 0; x < ncp; x++) ref[x] = dc_w[x];
                CHECK_NORM(what, dc_sum, ref, ncp, 1e-6);
            }
            snprintf(what, sizeof what, "op_sink_attention_backward dsinks summed, window=%d n_comp=%d", W, nc);
            for (int h = 0; h < H; h++) ref[h] = ds_w[h];
            CHECK_NORM(what, ds_sum, ref, H, 1e-6);
        }
    }
    free(q), free(kv), free(kvs), free(comp), free(sinks), free(go), free(whole), free(got), free(dq0);
    free(dq_w), free(dkv_w), free(dc_w), free(ds_w), free(dq_s), free(dkv_s), free(dc_s), free(ds_s);
    free(dkv_sum), free(dc_sum), free(ds_sum), free(ref), free(cidx);
    kctx_free(&k);
}

static void test_indexer_slices(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(25);
    int T = SLICE_T, ratio = 3, Tc = 6, nh = 2, hd = 6, topk = 2; /* entry 5 is never visible */
    float scale_qk = 0.3f;
    float *q = falloc((long)T * nh * hd), *keys = falloc((long)Tc * hd), *wts = falloc((long)T * nh);
    float *score = falloc((long)T * Tc), *got = falloc((long)T * Tc);
    int32_t *sel = malloc(sizeof(int32_t) * (size_t)T * topk), *sel_s = malloc(sizeof(int32_t) * (size_t)T * topk);
    int32_t *ce = malloc(sizeof(int32_t) * (size_t)T * Tc), *ce_s = malloc(sizeof(int32_t) * (size_t)T * Tc);
    assert_true(sel && sel_s && ce && ce_s);
    fill_uniform(q, (long)T * nh * hd, -1, 1);
    fill_uniform(keys, (long)Tc * hd, -1, 1);
    fill_uniform(wts, (long)T * nh, -1, 1);
    assert_int_equal(op_indexer_scores(&k, score, q, keys, wts, T, 0, Tc, nh, hd, scale_qk, ratio, &e), 0);
    assert_int_equal(op_topk_visible(&k, sel, score, T, 0, Tc, topk, ratio, &e), 0);
    assert_int_equal(op_causal_entries(&k, ce, T, 0, Tc, ratio, &e), 0);
    for (int si = 0; si < N_SLICINGS; si++) {
        const slicing *sl = &g_slicings[si];
        fill_value(got, (long)T * Tc, NAN);
        memset(sel_s, 0x55, sizeof(int32_t) * (size_t)T * topk);
        memset(ce_s, 0x55, sizeof(int32_t) * (size_t)T * Tc);
        for (int s = 0; s < sl->n; s++) {
            int a = sl->cut[s], b = sl->cut[s + 1];
            assert_int_equal(op_indexer_scores(&k, got + (long)a * Tc, q + (long)a * nh * hd, keys, wts + (long)a * nh,
                                               b - a, a, Tc, nh, hd, scale_qk, ratio, &e),
                             0);
            /* top-k of the whole run's scores, so it is checked on its own */
            assert_int_equal(
                op_topk_visible(&k, sel_s + (long)a * topk, score + (long)a * Tc, b - a, a, Tc, topk, ratio, &e), 0);
            assert_int_equal(op_causal_entries(&k, ce_s + (long)a * Tc, b - a, a, Tc, ratio, &e), 0);
        }
        check_same("op_indexer_scores", got, score, sizeof(float) * (size_t)T * Tc, si);
        check_same("op_topk_visible", sel_s, sel, sizeof(int32_t) * (size_t)T * topk, si);
        check_same("op_causal_entries", ce_s, ce, sizeof(int32_t) * (size_t)T * Tc, si);
    }
    free(q), free(keys), free(wts), free(score), free(got), free(sel), free(sel_s), free(ce), free(ce_s);
    kctx_free(&k);
}

/* ---------------------------------------------------------------- hyper-connections */

/* f[mix] = rmsnorm_unweighted(flatten(h_t)) @ fn^T for one token. */
static void ref_hc_logits(double *f, const float *ht, const float *fn, int nD, int mix, double norm_eps) {
    double ss = 0.0;
    for (int c = 0; c < nD; c++) ss += (double)ht[c] * ht[c];
    double inv = 1.0 / sqrt(ss / nD + norm_eps);
    for (int m = 0; m < mix; m++) {
        double acc = 0.0;
        for (int c = 0; c < nD; c++) acc += ht[c] * inv * fn[(long)m * nD + c];
        f[m] = acc;
    }
}

/* The brief's / header's op_hc_pre formula in double. */
static void ref_hc_pre(double *x, double *pre, double *post, double *comb, const float *h, const float *fn,
                       const float *base, const float *scale, int N, hc_dims dm) {
    int n = dm.n, D = dm.D, mix = (2 + n) * n;
    double f[64], C[16];
    for (int t = 0; t < N; t++) {
        const float *ht = h + (long)t * n * D;
        ref_hc_logits(f, ht, fn, n * D, mix, dm.norm_eps);
        double *pr = pre + (long)t * n, *po = post + (long)t * n, *cb = comb + (long)t * n * n;
        for (int j = 0; j < n; j++) {
            pr[j] = sigmoid_d(f[j] * scale[0] + base[j]) + dm.hc_eps;
            po[j] = 2.0 * sigmoid_d(f[n + j] * scale[1] + base[n + j]);
        }
        for (int r = 0; r < n; r++) {
            double mx = -INFINITY, den = 0.0;
            for (int c = 0; c < n; c++) {
                C[r * n + c] = f[2 * n + r * n + c] * scale[2] + base[2 * n + r * n + c];
                mx = C[r * n + c] > mx ? C[r * n + c] : mx;
            }
            for (int c = 0; c < n; c++) den += exp(C[r * n + c] - mx);
            for (int c = 0; c < n; c++) C[r * n + c] = exp(C[r * n + c] - mx) / den + dm.hc_eps;
        }
        for (int it = 0; it < dm.sinkhorn_iters; it++) {
            if (it > 0) /* rows, only after the first column pass */
                for (int r = 0; r < n; r++) {
                    double s = 0.0;
                    for (int c = 0; c < n; c++) s += C[r * n + c];
                    for (int c = 0; c < n; c++) C[r * n + c] /= s + dm.hc_eps;
                }
            for (int c = 0; c < n; c++) {
                double s = 0.0;
                for (int r = 0; r < n; r++) s += C[r * n + c];
                for (int r = 0; r < n; r++) C[r * n + c] /= s + dm.hc_eps;
            }
        }
        memcpy(cb, C, sizeof(double) * (size_t)n * n);
        for (int c = 0; c < D; c++) {
            double acc = 0.0;
            for (int j = 0; j < n; j++) acc += pr[j] * ht[(long)j * D + c];
            x[(long)t * D + c] = acc;
        }
    }
}

static void test_hc_pre_post(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    int N = 3, n = 4, D = 8, mix = (2 + n) * n, nD = n * D;
    /* iters 2 with a large eps: not converged, so the iteration schedule and every eps show;
     * iters 20 with the model's small eps: converged to (nearly) doubly stochastic */
    const int iters_cases[2] = {2, 20};
    const float eps_cases[2] = {0.05f, 1e-6f};
    for (int ic = 0; ic < 2; ic++) {
        rng_seed(20);
        hc_dims dm = {.n = n, .D = D, .sinkhorn_iters = iters_cases[ic], .hc_eps = eps_cases[ic], .norm_eps = 1e-6f};
        float *h = falloc((long)N * nD), *fn = falloc((long)mix * nD), base[24], scale[3];
        fill_uniform(h, (long)N * nD, -2, 2);
        fill_uniform(fn, (long)mix * nD, -0.5f, 0.5f);
        fill_uniform(base, mix, -1, 1);
        fill_uniform(scale, 3, 0.5f, 2.0f);
        long work_n = (long)N * (nD + mix);
        float *work = falloc(work_n + 16); /* exactly the documented size, plus a guard */
        fill_value(work + work_n, 16, SENTINEL);
        float *x = falloc((long)N * D), *pre = falloc((long)N * n), *post = falloc((long)N * n),
              *comb = falloc((long)N * n * n);
        double *rx = dalloc((long)N * D), *rpre = dalloc((long)N * n), *rpost = dalloc((long)N * n),
               *rcomb = dalloc((long)N * n * n);
        assert_int_equal(op_hc_pre(&k, x, pre, post, comb, h, fn, base, scale, N, dm, work, &e), 0);
        for (int i = 0; i < 16; i++) assert_true(work[work_n + i] == SENTINEL); /* no overrun */
        ref_hc_pre(rx, rpre, rpost, rcomb, h, fn, base, scale, N, dm);
        CHECK_ELEM("op_hc_pre pre", pre, rpre, (long)N * n, TOL_F32);
        CHECK_ELEM("op_hc_pre post", post, rpost, (long)N * n, TOL_F32);
        CHECK_NORM("op_hc_pre comb", comb, rcomb, (long)N * n * n, TOL_F32);
        CHECK_NORM("op_hc_pre x", x, rx, (long)N * D, TOL_F32);

        double worst_row = 0.0, worst_col = 0.0;
        for (int t = 0; t < N; t++)
            for (int a = 0; a < n; a++) {
                double rs = 0.0, cs = 0.0;
                for (int b = 0; b < n; b++) {
                    rs += comb[(long)t * n * n + a * n + b];
                    cs += comb[(long)t * n * n + b * n + a];
                }
                worst_row = fabs(rs - 1) > worst_row ? fabs(rs - 1) : worst_row;
                worst_col = fabs(cs - 1) > worst_col ? fabs(cs - 1) : worst_col;
            }
        if (iters_cases[ic] == 20) { /* close to doubly stochastic */
            if (!(worst_row < 1e-4 && worst_col < 1e-4))
                fail_msg("comb after 20 iters: row sums off by %g, columns by %g", worst_row, worst_col);
        }

        /* op_hc_post, from the op's own post/comb: h_out[k] = post_k y + sum_j comb[j][k] h_j */
        float *y = falloc((long)N * D), *hout = falloc((long)N * nD);
        double *rh = dalloc((long)N * nD);
        fill_uniform(y, (long)N * D, -2, 2);
        fill_value(hout, (long)N * nD, NAN);
        assert_int_equal(op_hc_post(&k, hout, h, y, post, comb, N, n, D, &e), 0);
        for (int t = 0; t < N; t++)
            for (int kk = 0; kk < n; kk++)
                for (int c = 0; c < D; c++) {
                    double acc = (double)post[t * n + kk] * y[t * D + c];
                    for (int j = 0; j < n; j++)
                        acc += (double)comb[(long)t * n * n + j * n + kk] * h[((long)t * n + j) * D + c];
                    rh[((long)t * n + kk) * D + c] = acc;
                }
        CHECK_NORM("op_hc_post", hout, rh, (long)N * nD, TOL_F32);
        free(h), free(fn), free(work), free(x), free(pre), free(post), free(comb);
        free(rx), free(rpre), free(rpost), free(rcomb), free(y), free(hout), free(rh);
    }

    /* op_hc_post with a non-symmetric hand-made comb: comb[j][k] (not comb[k][j]) weights h_j into k */
    {
        float h2[2 * 1] = {1.0f, 10.0f}, y2[1] = {100.0f}, post2[2] = {0.5f, 2.0f};
        float comb2[4] = {0.0f, 1.0f, 0.25f, 0.0f}; /* comb[0][1] = 1, comb[1][0] = 0.25 */
        float out2[2];
        assert_int_equal(op_hc_post(&k, out2, h2, y2, post2, comb2, 1, 2, 1, &e), 0);
        /* out[0] = 0.5*100 + comb[0][0]*1 + comb[1][0]*10 = 52.5; out[1] = 200 + 1*1 + 0 = 201 */
        assert_true(out2[0] == 52.5f && out2[1] == 201.0f);
    }
    kctx_free(&k);
}

static void test_hc_head(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(21);
    int N = 3, n = 4, D = 8, nD = n * D;
    hc_dims dm = {.n = n, .D = D, .sinkhorn_iters = 20, .hc_eps = 0.05f, .norm_eps = 1e-6f}; /* eps large enough to show */
    float *h = falloc((long)N * nD), *fn = falloc((long)n * nD), base[4], scale[1];
    fill_uniform(h, (long)N * nD, -2, 2);
    fill_uniform(fn, (long)n * nD, -0.5f, 0.5f);
    fill_uniform(base, n, -1, 1);
    fill_uniform(scale, 1, 0.5f, 2.0f);
    long work_n = (long)N * (nD + (2 + n) * n);
    float *work = falloc(work_n), *x = falloc((long)N * D);
    double *rx = dalloc((long)N * D), f[4], pre[4];
    fill_value(x, (long)N * D, NAN);
    assert_int_equal(op_hc_head(&k, x, h, fn, base, scale, N, dm, work, &e), 0);
    for (int t = 0; t < N; t++) {
        const float *ht = h + (long)t * nD;
        ref_hc_logits(f, ht, fn, nD, n, dm.norm_eps);
        for (int j = 0; j < n; j++) pre[j] = sigmoid_d(f[j] * scale[0] + base[j]) + dm.hc_eps;
        for (int c = 0; c < D; c++) {
            double acc = 0.0;
            for (int j = 0; j < n; j++) acc += pre[j] * ht[(long)j * D + c];
            rx[(long)t * D + c] = acc;
        }
    }
    CHECK_NORM("op_hc_head", x, rx, (long)N * D, TOL_F32);
    free(h), free(fn), free(work), free(x), free(rx);
    kctx_free(&k);
}

/* ---------------------------------------------------------------- MoE */

static double ref_score(double x, dsv4_score_func f) {
    if (f == SCORE_SIGMOID) return sigmoid_d(x);
    return sqrt(x > 20 ? x : log1p(exp(x))); /* sqrtsoftplus with torch's softplus threshold */
}

/* Checks op_moe_route's output for one token against scores s (double) and an expected id set. */
static void check_route_token(const int32_t *ids, const float *w, const double *s, const int *expect, int K,
                              int norm, double rscale, const char *what) {
    for (int a = 0; a < K; a++) {
        int found = 0;
        for (int b = 0; b < K; b++) found += ids[b] == expect[a];
        if (found != 1) fail_msg("%s: expert %d chosen %d times", what, expect[a], found);
    }
    double sum = 0.0, ref[16];
    for (int j = 0; j < K; j++) sum += s[ids[j]];
    for (int j = 0; j < K; j++) ref[j] = (norm ? s[ids[j]] / (sum + 1e-20) : s[ids[j]]) * rscale;
    check_err(what, err_elem(w, ref, K), TOL_F32);
}

/* Brute-force top-k of v[E] (descending, lower id first on ties). */
static void ref_topk(int *out, const double *v, int E, int K) {
    int taken[64] = {0};
    for (int j = 0; j < K; j++) {
        int best = -1;
        for (int x = 0; x < E; x++)
            if (!taken[x] && (best < 0 || v[x] > v[best])) best = x;
        taken[best] = 1;
        out[j] = best;
    }
}

static void test_moe_route(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(22);
    int N = 6, E = 8, K = 2;
    float *logits = falloc((long)N * E), *scores = falloc((long)N * E), *w = falloc((long)N * K), bias[8];
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)N * K);
    assert_non_null(ids);
    double *rs = dalloc((long)N * E), v[8];
    int expect[8];
    fill_uniform(logits, (long)N * E, -4, 4);
    logits[0] = 25.0f, logits[1] = -30.0f, logits[2] = 20.5f, logits[3] = 19.5f; /* softplus threshold region */
    fill_uniform(bias, E, -0.3f, 0.3f);

    const dsv4_score_func funcs[2] = {SCORE_SQRTSOFTPLUS, SCORE_SIGMOID};
    for (int fi = 0; fi < 2; fi++)
        for (int norm = 0; norm <= 1; norm++)
            for (int use_bias = 0; use_bias <= 1; use_bias++) {
                moe_route_cfg rc = {.E = E, .K = K, .score_func = funcs[fi], .norm_topk = norm, .routed_scale = 2.5f};
                assert_int_equal(op_moe_route(&k, scores, ids, w, logits, use_bias ? bias : NULL, NULL, N, rc, &e), 0);
                for (long i = 0; i < (long)N * E; i++) rs[i] = ref_score(logits[i], funcs[fi]);
                check_err(fi ? "moe scores sigmoid" : "moe scores sqrtsoftplus", err_elem(scores, rs, (long)N * E),
                          TOL_F32);
                for (int t = 0; t < N; t++) {
                    for (int x = 0; x < E; x++) v[x] = rs[(long)t * E + x] + (use_bias ? bias[x] : 0.0);
                    ref_topk(expect, v, E, K);
                    check_route_token(ids + (long)t * K, w + (long)t * K, rs + (long)t * E, expect, K, norm,
                                      2.5, "moe route selection/weights");
                }
                if (norm) /* normalised then scaled: each token's weights sum to routed_scale */
                    for (int t = 0; t < N; t++) assert_true(fabsf(w[t * K] + w[t * K + 1] - 2.5f) < 1e-5f);
            }

    /* bias changes the choice but not the weights: hand-made sigmoid case */
    {
        float l1[4] = {2.0f, 1.0f, 0.0f, -1.0f}, b1[4] = {0.0f, 0.0f, 0.0f, 3.0f}, s1[4], w1[2];
        int32_t id1[2];
        moe_route_cfg rc = {.E = 4, .K = 2, .score_func = SCORE_SIGMOID, .norm_topk = 1, .routed_scale = 1.0f};
        double sd[4];
        for (int x = 0; x < 4; x++) sd[x] = sigmoid_d(l1[x]);
        const int no_bias[2] = {0, 1}, with_bias[2] = {3, 0};
        assert_int_equal(op_moe_route(&k, s1, id1, w1, l1, NULL, NULL, 1, rc, &e), 0);
        check_route_token(id1, w1, sd, no_bias, 2, 1, 1.0, "moe route no bias");
        assert_int_equal(op_moe_route(&k, s1, id1, w1, l1, b1, NULL, 1, rc, &e), 0);
        check_route_token(id1, w1, sd, with_bias, 2, 1, 1.0, "moe route bias picks expert 3");
        /* weight of expert 3 is from its score (sigmoid(-1)), not score + bias */
        double w3 = sd[3] / (sd[3] + sd[0]);
        for (int j = 0; j < 2; j++)
            if (id1[j] == 3) assert_true(fabs(w1[j] - w3) <= TOL_F32 * w3);
    }

    /* given ids (hash layers / replay): taken as is, weights from their scores */
    {
        moe_route_cfg rc = {.E = E, .K = K, .score_func = SCORE_SQRTSOFTPLUS, .norm_topk = 1, .routed_scale = 1.5f};
        int32_t given[12] = {7, 0, 1, 2, 3, 4, 5, 6, 6, 5, 2, 7};
        assert_int_equal(op_moe_route(&k, scores, ids, w, logits, bias, given, N, rc, &e), 0);
        for (long i = 0; i < (long)N * E; i++) rs[i] = ref_score(logits[i], SCORE_SQRTSOFTPLUS);
        for (int t = 0; t < N; t++) {
            for (int j = 0; j < K; j++) assert_int_equal(ids[t * K + j], given[t * K + j]);
            int ex[2] = {given[t * K], given[t * K + 1]};
            check_route_token(ids + (long)t * K, w + (long)t * K, rs + (long)t * E, ex, K, 1, 1.5,
                              "moe route given ids");
        }
        given[5] = 8; /* == E */
        memset(e.msg, 0, sizeof e.msg);
        assert_int_equal(op_moe_route(&k, scores, ids, w, logits, bias, given, N, rc, &e), -1);
        assert_true(e.msg[0] != 0);
        given[5] = -1;
        assert_int_equal(op_moe_route(&k, scores, ids, w, logits, bias, given, N, rc, &e), -1);
    }
    free(logits), free(scores), free(w), free(ids), free(rs);
    kctx_free(&k);
}

static void test_moe_experts(void **state) {
    (void)state;
    mill_err e = {0};
    kctx k = cpu_ctx(&e);
    rng_seed(23);
    int N = 6, D = 8, I = 5, E = 5, K = 2, idle = 2, idle_last = 4; /* experts 2 and 4 get no tokens */
    float L = 0.7f;
    long nw1 = (long)E * I * D;
    float *x = falloc((long)N * D), *w1 = falloc(nw1), *w3 = falloc(nw1), *w2 = falloc((long)E * D * I);
    float *wt = falloc((long)N * K), *out = falloc((long)N * D), *prev = falloc((long)N * D);
    fill_uniform(x, (long)N * D, -1, 1);
    fill_uniform(w1, nw1, -1, 1);
    fill_uniform(w3, nw1, -1, 1);
    fill_uniform(w2, (long)E * D * I, -1, 1);
    fill_uniform(wt, (long)N * K, 0.1f, 1.0f);
    /* experts 2 and 4 receive no tokens: their weights are NaN, so touching them would show */
    const int idles[2] = {idle, idle_last};
    for (int q = 0; q < 2; q++) {
        fill_value(w1 + (long)idles[q] * I * D, (long)I * D, NAN);
        fill_value(w3 + (long)idles[q] * I * D, (long)I * D, NAN);
        fill_value(w2 + (long)idles[q] * D * I, (long)D * I, NAN);
    }
    const int32_t ids[12] = {0, 1, 3, 0, 1, 3, 3, 1, 0, 3, 1, 0};

    long work_n = moe_experts_work_floats(N, D, I, E, K);
    float *work = falloc(work_n + 16);
    fill_value(work + work_n, 16, SENTINEL);

    /* brute force per token */
    double *ref = dalloc((long)N * D);
    int clamp_g = 0, clamp_u_hi = 0, clamp_u_lo = 0;
    for (int t = 0; t < N; t++)
        for (int j = 0; j < K; j++) {
            int ex = ids[t * K + j];
            assert_true(ex != idle && ex != idle_last);
            double hbuf[16];
            for (int i = 0; i < I; i++) {
                double g = 0.0, u = 0.0;
                for (int c = 0; c < D; c++) {
                    g += (double)x[t * D + c] * w1[((long)ex * I + i) * D + c];
                    u += (double)x[t * D + c] * w3[((long)ex * I + i) * D + c];
                }
                clamp_g |= g > L, clamp_u_hi |= u > L, clamp_u_lo |= u < -L;
                double a = g < L ? g : L, b = u < -L ? -L : (u > L ? L : u);
                hbuf[i] = a * sigmoid_d(a) * b;
            }
            for (int c = 0; c < D; c++) {
                double acc = 0.0;
                for (int i = 0; i < I; i++) acc += hbuf[i] * w2[((long)ex * D + c) * I + i];
                ref[t * D + c] += wt[t * K + j] * acc;
            }
        }
    assert_true(clamp_g && clamp_u_hi && clamp_u_lo); /* the limit is exercised on both inputs */

    fill_value(out, (long)N * D, NAN); /* accumulate = 0 overwrites */
    assert_int_equal(op_moe_experts(&k, out, x, ids, wt, w1, w3, w2, N, D, I, E, K, L, 0, work, &e), 0);
    for (int i = 0; i < 16; i++) assert_true(work[work_n + i] == SENTINEL); /* work size suffices */
    CHECK_NORM("op_moe_experts", out, ref, (long)N * D, TOL_F32);

    fill_uniform(prev, (long)N * D, -1, 1);
    memcpy(out, prev, sizeof(float) * (size_t)N * D);
    for (long i = 0; i < (long)N * D; i++) ref[i] += prev[i];
    assert_int_equal(op_moe_experts(&k, out, x, ids, wt, w1, w3, w2, N, D, I, E, K, L, 1, work, &e), 0);
    CHECK_NORM("op_moe_experts accumulate", out, ref, (long)N * D, TOL_F32);

    /* expert parallelism's halves: each (token, slot)'s expert output alone (one slot, weight 1),
     * then op_moe_combine: op_moe_experts' bits; and the combine's backward against its formulas */
    float *xp = falloc((long)N * K * D), *one = falloc((long)N * K), *Y = falloc((long)N * K * D);
    float *work2 = falloc(moe_experts_work_floats(N * K, D, I, E, 1)), *g = falloc((long)N * D), *dY = falloc((long)N * K * D);
    float *dw = falloc((long)N * K);
    for (long r = 0; r < (long)N * K; r++) memcpy(xp + r * D, x + (r / K) * D, sizeof(float) * (size_t)D);
    fill_value(one, (long)N * K, 1.0f);
    assert_int_equal(op_moe_experts(&k, Y, xp, ids, one, w1, w3, w2, N * K, D, I, E, 1, L, 0, work2, &e), 0);
    float *out2 = falloc((long)N * D);
    assert_int_equal(op_moe_experts(&k, out, x, ids, wt, w1, w3, w2, N, D, I, E, K, L, 0, work, &e), 0);
    assert_int_equal(op_moe_combine(&k, out2, Y, wt, N, K, D, &e), 0);
    assert_memory_equal(out2, out, sizeof(float) * (size_t)N * D);
    fill_uniform(g, (long)N * D, -1, 1);
    assert_int_equal(op_moe_combine_backward(&k, dY, dw, g, Y, wt, N, K, D, &e), 0);
    for (long r = 0; r < (long)N * K; r++) {
        double s = 0;
        for (int c = 0; c < D; c++) {
            assert_true(dY[r * D + c] == wt[r] * g[(r / K) * D + c]);
            s += (double)g[(r / K) * D + c] * Y[r * D + c];
        }
        assert_true(fabs(dw[r] - s) <= 1e-5 * (1 + fabs(s)));
    }
    free(xp), free(one), free(Y), free(work2), free(g), free(dY), free(dw), free(out2);

    const int32_t bad[12] = {0, 1, 3, 0, 1, 5, 3, 1, 0, 3, 1, 0}; /* 5 == E */
    assert_int_equal(op_moe_experts(&k, out, x, bad, wt, w1, w3, w2, N, D, I, E, K, L, 0, work, &e), -1);
    free(x), free(w1), free(w3), free(w2), free(wt), free(out), free(prev), free(work), free(ref);
    kctx_free(&k);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_linear),
        cmocka_unit_test(test_matmul_nn),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_token_logp),
        cmocka_unit_test(test_swiglu_clamp),
        cmocka_unit_test(test_rope_inv_freq_plain),
        cmocka_unit_test(test_rope_inv_freq_yarn),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_sink_attention),
        cmocka_unit_test(test_compress_pool),
        cmocka_unit_test(test_indexer_scores),
        cmocka_unit_test(test_topk_visible),
        cmocka_unit_test(test_causal_entries),
        cmocka_unit_test(test_attention_slices),
        cmocka_unit_test(test_indexer_slices),
        cmocka_unit_test(test_hc_pre_post),
        cmocka_unit_test(test_hc_head),
        cmocka_unit_test(test_moe_route),
        cmocka_unit_test(test_moe_experts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
