/* tests/test_backward.c — every *_backward op against central finite differences of its forward.
 *
 * For each op the scalar loss is a fixed random projection of the forward's outputs,
 *   L = sum(dy * forward_output)   (accumulated in double),
 * so the op's backward called with upstream gradient dy must return dL/d(input) for every input and
 * parameter. The numeric gradient is (L(p+h) - L(p-h)) / (2h) per element with h = 1e-3 in fp32
 * (the step actually taken after rounding p +- h to fp32 is used as the denominator).
 * Per tensor the check is ||analytic - numeric|| / ||numeric|| <= 2e-2 (fp32 FD noise); every
 * error is printed. Inputs are ~N(0,1), scaled so nothing saturates unless the test is about a
 * clamp, and kept away from kinks (clamp edges, top-k ties) by more than the FD step.
 *
 * Backward ops ACCUMULATE into their gradient outputs; the documented exceptions (dpost, dcomb of
 * op_hc_post_backward, dweights of op_moe_experts_backward, dlogits of op_cross_entropy) are
 * written. Each test also runs the backward a second time into buffers prefilled with 1.0 and
 * checks accumulated outputs came back as 1 + gradient and written ones as the gradient. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/attention.h"
#include "kernels/backend.h"
#include "kernels/dense.h"
#include "kernels/hc.h"
#include "kernels/moe.h"
#include "kernels/rope.h"

#define FD_H 1e-3f   /* central-difference step (fp32) */
#define FD_TOL 2e-2  /* ||analytic - numeric|| / ||numeric|| */
#define ACC_TOL 1e-5 /* accumulate-vs-write check, relative to 1 + |grad| */

static kctx g_k;
static mill_err g_e;

#define OK(call)                                              \
    do {                                                      \
        if ((call) != 0) fail_msg("%s: %s", #call, g_e.msg); \
    } while (0)

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

static double rng_normal(void) { /* Box-Muller */
    double u1 = 1.0 - rng_uniform(), u2 = rng_uniform();
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

static int rng_int(int n) { return (int)(rng_next() % (uint64_t)n); }

static float *falloc(long n) {
    float *p = calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    assert_non_null(p);
    return p;
}

static float *fdup(const float *src, long n) {
    float *p = falloc(n);
    memcpy(p, src, sizeof(float) * (size_t)n);
    return p;
}

static void fill_normal(float *p, long n, double sd) {
    for (long i = 0; i < n; i++) p[i] = (float)(sd * rng_normal());
}

static void fill_value(float *p, long n, float v) {
    for (long i = 0; i < n; i++) p[i] = v;
}

static double dotd(const float *a, const float *b, long n) {
    double s = 0.0;
    for (long i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

typedef double (*loss_fn)(void *ctx);

/* Numeric gradient of L w.r.t. the n floats at p (restored afterwards), compared with ana. */
static double fd_check(const char *op, const char *name, loss_fn L, void *ctx, float *p, long n, const float *ana) {
    double *num = calloc((size_t)(n > 0 ? n : 1), sizeof(double));
    assert_non_null(num);
    for (long i = 0; i < n; i++) {
        float v = p[i];
        p[i] = v + FD_H;
        double hp = (double)p[i] - v, lp = L(ctx);
        p[i] = v - FD_H;
        double hm = (double)v - p[i], lm = L(ctx);
        p[i] = v;
        num[i] = (lp - lm) / (hp + hm);
    }
    double dn = 0.0, nn = 0.0, na = 0.0;
    for (long i = 0; i < n; i++) {
        double df = (double)ana[i] - num[i];
        dn += df * df;
        nn += num[i] * num[i];
        na += (double)ana[i] * ana[i];
    }
    free(num);
    dn = sqrt(dn);
    nn = sqrt(nn);
    na = sqrt(na);
    double rel = nn > 0 ? dn / nn : dn;
    printf("  %-56s %-8s n=%-4ld rel err %.3e   (|num| %.3e, |ana| %.3e)\n", op, name, n, rel, nn, na);
    fflush(stdout);
    if (!(nn > 0)) fail_msg("%s %s: numeric gradient is zero; the test does not exercise it", op, name);
    if (!(rel <= FD_TOL)) fail_msg("%s d%s: relative error %.3e > %.1e", op, name, rel, FD_TOL);
    return rel;
}

/* a0: gradient from a run into zeroed buffers; a1: from a run into buffers prefilled with 1.0.
 * Accumulating outputs must give 1 + a0, written ones a0. */
static void accum_check(const char *op, const char *name, const float *a0, const float *a1, long n, int written) {
    for (long i = 0; i < n; i++) {
        double want = written ? (double)a0[i] : 1.0 + a0[i];
        if (!(fabs((double)a1[i] - want) <= ACC_TOL * (1.0 + fabs((double)a0[i]))))
            fail_msg("%s d%s[%ld]: %s output gave %.9g after prefill 1.0, want %.9g", op, name, i,
                     written ? "written" : "accumulated", (double)a1[i], want);
    }
}

/* ---------------------------------------------------------------- op_linear_backward */

typedef struct {
    int M, N, K, ldx, ldy;
    float *x, *w, *y, *dy; /* x [M, ldx], y [M, ldy], dy compact [M, N] */
} lin_ctx;

static double lin_loss(void *p) {
    lin_ctx *c = p;
    OK(op_linear(&g_k, c->y, c->x, c->w, c->M, c->N, c->K, c->ldx, c->ldy, 0, &g_e));
    double L = 0.0;
    for (int i = 0; i < c->M; i++)
        for (int j = 0; j < c->N; j++) L += (double)c->dy[i * c->N + j] * c->y[(long)i * c->ldy + j];
    return L;
}

static void test_linear_backward(void **state) {
    (void)state;
    rng_seed(101);
    lin_ctx c = {.M = 5, .N = 4, .K = 6, .ldx = 9, .ldy = 7};
    long nx = (long)c.M * c.ldx, nw = (long)c.N * c.K, ny = (long)c.M * c.ldy;
    c.x = falloc(nx);
    c.w = falloc(nw);
    c.y = falloc(ny);
    c.dy = falloc((long)c.M * c.N);
    fill_normal(c.x, nx, 1.0); /* padding columns too: they must get no gradient */
    fill_normal(c.w, nw, 1.0);
    fill_normal(c.dy, (long)c.M * c.N, 1.0);
    /* the strided upstream gradient: padding is NaN so reading it would poison the result */
    float *dys = falloc(ny);
    fill_value(dys, ny, NAN);
    for (int i = 0; i < c.M; i++)
        for (int j = 0; j < c.N; j++) dys[(long)i * c.ldy + j] = c.dy[i * c.N + j];

    float *dx = falloc(nx), *dw = falloc(nw), *dx1 = falloc(nx), *dw1 = falloc(nw);
    OK(op_linear_backward(&g_k, dx, dw, dys, c.x, c.w, c.M, c.N, c.K, c.ldx, c.ldy, &g_e));
    fd_check("op_linear_backward", "x", lin_loss, &c, c.x, nx, dx);
    fd_check("op_linear_backward", "w", lin_loss, &c, c.w, nw, dw);

    fill_value(dx1, nx, 1.0f);
    fill_value(dw1, nw, 1.0f);
    OK(op_linear_backward(&g_k, dx1, dw1, dys, c.x, c.w, c.M, c.N, c.K, c.ldx, c.ldy, &g_e));
    accum_check("op_linear_backward", "x", dx, dx1, nx, 0);
    accum_check("op_linear_backward", "w", dw, dw1, nw, 0);

    /* dx or dw alone (NULL for the other) give the same values */
    memset(dx1, 0, sizeof(float) * (size_t)nx);
    memset(dw1, 0, sizeof(float) * (size_t)nw);
    OK(op_linear_backward(&g_k, dx1, NULL, dys, c.x, c.w, c.M, c.N, c.K, c.ldx, c.ldy, &g_e));
    OK(op_linear_backward(&g_k, NULL, dw1, dys, c.x, c.w, c.M, c.N, c.K, c.ldx, c.ldy, &g_e));
    accum_check("op_linear_backward (dx only)", "x", dx, dx1, nx, 1);
    accum_check("op_linear_backward (dw only)", "w", dw, dw1, nw, 1);

    free(c.x), free(c.w), free(c.y), free(c.dy), free(dys), free(dx), free(dw), free(dx1), free(dw1);
}

/* ---------------------------------------------------------------- op_rmsnorm_backward */

typedef struct {
    int rows, dim, ld;
    float eps;
    float *x, *w, *y, *dy; /* x, y [rows, ld]; dy compact [rows, dim]; w [dim] or NULL */
} rms_ctx;

static double rms_loss(void *p) {
    rms_ctx *c = p;
    OK(op_rmsnorm(&g_k, c->y, c->x, c->w, c->rows, c->dim, c->ld, c->eps, &g_e));
    double L = 0.0;
    for (int r = 0; r < c->rows; r++)
        for (int i = 0; i < c->dim; i++) L += (double)c->dy[r * c->dim + i] * c->y[(long)r * c->ld + i];
    return L;
}

static void rmsnorm_case(int weighted) {
    const char *op = weighted ? "op_rmsnorm_backward (weighted)" : "op_rmsnorm_backward (unweighted)";
    rng_seed(weighted ? 202 : 203);
    rms_ctx c = {.rows = 4, .dim = 8, .ld = 11, .eps = 1e-6f};
    long nx = (long)c.rows * c.ld;
    c.x = falloc(nx);
    c.y = falloc(nx);
    c.dy = falloc((long)c.rows * c.dim);
    fill_normal(c.x, nx, 1.0);
    for (int i = 0; i < c.dim; i++) c.x[2 * c.ld + i] *= 4.0f; /* one row at a larger scale */
    fill_normal(c.dy, (long)c.rows * c.dim, 1.0);
    c.w = NULL;
    if (weighted) {
        c.w = falloc(c.dim);
        for (int i = 0; i < c.dim; i++) c.w[i] = (float)(1.0 + 0.3 * rng_normal());
    }
    float *dys = falloc(nx);
    fill_value(dys, nx, NAN);
    for (int r = 0; r < c.rows; r++)
        for (int i = 0; i < c.dim; i++) dys[(long)r * c.ld + i] = c.dy[r * c.dim + i];

    float *dx = falloc(nx), *dw = weighted ? falloc(c.dim) : NULL;
    OK(op_rmsnorm_backward(&g_k, dx, dw, dys, c.x, c.w, c.rows, c.dim, c.ld, c.eps, &g_e));
    fd_check(op, "x", rms_loss, &c, c.x, nx, dx);
    if (weighted) fd_check(op, "w", rms_loss, &c, c.w, c.dim, dw);

    float *dx1 = falloc(nx), *dw1 = weighted ? falloc(c.dim) : NULL;
    fill_value(dx1, nx, 1.0f);
    if (weighted) fill_value(dw1, c.dim, 1.0f);
    OK(op_rmsnorm_backward(&g_k, dx1, dw1, dys, c.x, c.w, c.rows, c.dim, c.ld, c.eps, &g_e));
    /* row padding of dx is outside the op: it must stay as it was */
    for (int r = 0; r < c.rows; r++)
        for (int i = c.dim; i < c.ld; i++) {
            assert_true(dx[(long)r * c.ld + i] == 0.0f);
            assert_true(dx1[(long)r * c.ld + i] == 1.0f);
        }
    accum_check(op, "x", dx, dx1, nx, 0);
    if (weighted) accum_check(op, "w", dw, dw1, c.dim, 0);

    free(c.x), free(c.y), free(c.dy), free(c.w), free(dys), free(dx), free(dw), free(dx1), free(dw1);
}

static void test_rmsnorm_backward(void **state) {
    (void)state;
    rmsnorm_case(1);
    rmsnorm_case(0);
}

/* ---------------------------------------------------------------- op_embedding_backward */

typedef struct {
    int n, dim, vocab;
    const int32_t *ids;
    float *table, *out, *dout;
} emb_ctx;

static double emb_loss(void *p) {
    emb_ctx *c = p;
    OK(op_embedding(&g_k, c->out, c->table, c->ids, c->n, c->dim, c->vocab, &g_e));
    return dotd(c->dout, c->out, (long)c->n * c->dim);
}

static void test_embedding_backward(void **state) {
    (void)state;
    rng_seed(303);
    static const int32_t ids[9] = {3, 1, 3, 0, 6, 3, 1, 5, 0}; /* repeats; rows 2 and 4 unused */
    emb_ctx c = {.n = 9, .dim = 5, .vocab = 7, .ids = ids};
    long nt = (long)c.vocab * c.dim, no = (long)c.n * c.dim;
    c.table = falloc(nt);
    c.out = falloc(no);
    c.dout = falloc(no);
    fill_normal(c.table, nt, 1.0);
    fill_normal(c.dout, no, 1.0);

    float *dt = falloc(nt), *ref = falloc(nt), *dt1 = falloc(nt);
    OK(op_embedding_backward(&g_k, dt, c.dout, ids, c.n, c.dim, &g_e));
    /* exact: the same float additions in token order */
    for (int t = 0; t < c.n; t++)
        for (int i = 0; i < c.dim; i++) ref[(long)ids[t] * c.dim + i] += c.dout[(long)t * c.dim + i];
    for (long i = 0; i < nt; i++)
        if (dt[i] != ref[i]) fail_msg("op_embedding_backward dtable[%ld] = %.9g, exact %.9g", i, dt[i], ref[i]);
    printf("  %-56s %-8s exact (bitwise) match\n", "op_embedding_backward", "table");
    fd_check("op_embedding_backward", "table", emb_loss, &c, c.table, nt, dt);

    fill_value(dt1, nt, 1.0f);
    OK(op_embedding_backward(&g_k, dt1, c.dout, ids, c.n, c.dim, &g_e));
    accum_check("op_embedding_backward", "table", dt, dt1, nt, 0);

    free(c.table), free(c.out), free(c.dout), free(dt), free(ref), free(dt1);
}

/* ---------------------------------------------------------------- op_swiglu_clamp_backward */

typedef struct {
    long n;
    float limit;
    float *g, *u, *h, *dh;
} swi_ctx;

static double swi_loss(void *p) {
    swi_ctx *c = p;
    OK(op_swiglu_clamp(&g_k, c->h, c->g, c->u, c->n, c->limit, &g_e));
    return dotd(c->dh, c->h, c->n);
}

static void test_swiglu_clamp_backward(void **state) {
    (void)state;
    rng_seed(404);
    swi_ctx c = {.n = 64, .limit = 2.0f};
    const float L = c.limit, margin = 0.05f; /* > 2h from every clamp edge */
    c.g = falloc(c.n);
    c.u = falloc(c.n);
    c.h = falloc(c.n);
    c.dh = falloc(c.n);
    fill_normal(c.g, c.n, 1.6);
    fill_normal(c.u, c.n, 1.6);
    fill_normal(c.dh, c.n, 1.0);
    /* beyond the limit on purpose: gate above L, up above L and below -L, and both at once */
    c.g[0] = L + 0.7f;
    c.g[1] = L + 3.0f;
    c.u[2] = L + 0.5f;
    c.u[3] = -L - 1.2f;
    c.g[4] = L + 1.0f;
    c.u[4] = -L - 2.0f;
    c.g[5] = -6.0f; /* far negative gate: silu' small but nonzero */
    for (long i = 0; i < c.n; i++) {
        if (fabsf(c.g[i] - L) < margin) c.g[i] += c.g[i] < L ? -2 * margin : 2 * margin;
        if (fabsf(c.u[i] - L) < margin) c.u[i] += c.u[i] < L ? -2 * margin : 2 * margin;
        if (fabsf(c.u[i] + L) < margin) c.u[i] += c.u[i] < -L ? -2 * margin : 2 * margin;
    }
    int g_out = 0, u_out = 0;
    for (long i = 0; i < c.n; i++) g_out += c.g[i] > L, u_out += fabsf(c.u[i]) > L;

    float *dg = falloc(c.n), *du = falloc(c.n);
    OK(op_swiglu_clamp_backward(&g_k, dg, du, c.dh, c.g, c.u, c.n, c.limit, &g_e));
    for (long i = 0; i < c.n; i++) { /* the clamped side has exactly zero gradient */
        if (c.g[i] > L && dg[i] != 0.0f) fail_msg("dg[%ld] = %g for g = %g > limit", i, dg[i], c.g[i]);
        if (fabsf(c.u[i]) > L && du[i] != 0.0f) fail_msg("du[%ld] = %g for |u| = %g > limit", i, du[i], c.u[i]);
    }
    printf("  op_swiglu_clamp_backward: %d gates and %d ups beyond limit %.1f, zero gradient there\n", g_out, u_out,
           L);
    fd_check("op_swiglu_clamp_backward", "g", swi_loss, &c, c.g, c.n, dg);
    fd_check("op_swiglu_clamp_backward", "u", swi_loss, &c, c.u, c.n, du);

    float *dg1 = falloc(c.n), *du1 = falloc(c.n);
    fill_value(dg1, c.n, 1.0f);
    fill_value(du1, c.n, 1.0f);
    OK(op_swiglu_clamp_backward(&g_k, dg1, du1, c.dh, c.g, c.u, c.n, c.limit, &g_e));
    accum_check("op_swiglu_clamp_backward", "g", dg, dg1, c.n, 0);
    accum_check("op_swiglu_clamp_backward", "u", du, du1, c.n, 0);

    free(c.g), free(c.u), free(c.h), free(c.dh), free(dg), free(du), free(dg1), free(du1);
}

/* ---------------------------------------------------------------- op_cross_entropy */

typedef struct {
    int n, vocab;
    long count;
    const int32_t *targets;
    float *logits;
} ce_ctx;

static double ce_loss(void *p) { /* the mean loss over counted rows */
    ce_ctx *c = p;
    double sum;
    long cnt;
    OK(op_cross_entropy(&g_k, NULL, &sum, &cnt, c->logits, c->targets, c->n, c->vocab, 1.0f, &g_e));
    assert_int_equal(cnt, c->count);
    return sum / (double)cnt;
}

static void test_cross_entropy(void **state) {
    (void)state;
    rng_seed(505);
    static const int32_t targets[6] = {3, -1, 0, 10, -1, 7};
    ce_ctx c = {.n = 6, .vocab = 11, .targets = targets};
    long nl = (long)c.n * c.vocab;
    c.logits = falloc(nl);
    fill_normal(c.logits, nl, 2.0);

    double sum;
    long cnt;
    OK(op_cross_entropy(&g_k, NULL, &sum, &cnt, c.logits, targets, c.n, c.vocab, 1.0f, &g_e));
    assert_int_equal(cnt, 4);
    c.count = cnt;
    float scale = 1.0f / (float)cnt;

    float *dl = falloc(nl);
    fill_value(dl, nl, 1.0f); /* dlogits is written, ignored rows included */
    OK(op_cross_entropy(&g_k, dl, &sum, &cnt, c.logits, targets, c.n, c.vocab, scale, &g_e));
    for (int t = 0; t < c.n; t++)
        if (targets[t] < 0)
            for (int v = 0; v < c.vocab; v++) assert_true(dl[(long)t * c.vocab + v] == 0.0f);
    fd_check("op_cross_entropy", "logits", ce_loss, &c, c.logits, nl, dl);

    /* dlogits may alias logits */
    float *al = fdup(c.logits, nl);
    double sum2;
    long cnt2;
    OK(op_cross_entropy(&g_k, al, &sum2, &cnt2, al, targets, c.n, c.vocab, scale, &g_e));
    assert_true(sum2 == sum);
    assert_int_equal(cnt2, cnt);
    for (long i = 0; i < nl; i++)
        if (al[i] != dl[i]) fail_msg("op_cross_entropy aliased dlogits[%ld] = %.9g, separate %.9g", i, al[i], dl[i]);

    free(c.logits), free(dl), free(al);
}

/* ---------------------------------------------------------------- op_sink_attention_backward */

typedef struct {
    int T, H, d, window, n_comp, Tc;
    float scale;
    const int32_t *comp_idx;
    float *q, *kv, *comp, *sinks, *out, *dout;
} attn_ctx;

static double attn_loss(void *p) {
    attn_ctx *c = p;
    OK(op_sink_attention(&g_k, c->out, c->q, c->kv, c->comp, c->comp_idx, c->n_comp, c->sinks, c->T, 0, c->H, c->d,
                         c->window, c->scale, &g_e));
    return dotd(c->dout, c->out, (long)c->T * c->H * c->d);
}

static void attn_case(const char *op, attn_ctx c, uint64_t seed) {
    rng_seed(seed);
    long nq = (long)c.T * c.H * c.d, nkv = (long)c.T * c.d, nc = (long)c.Tc * c.d;
    c.q = falloc(nq);
    c.kv = falloc(nkv);
    c.comp = c.n_comp ? falloc(nc) : NULL;
    c.sinks = falloc(c.H);
    c.out = falloc(nq);
    c.dout = falloc(nq);
    fill_normal(c.q, nq, 1.0);
    fill_normal(c.kv, nkv, 1.0);
    if (c.comp) fill_normal(c.comp, nc, 1.0);
    fill_normal(c.sinks, c.H, 0.7);
    fill_normal(c.dout, nq, 1.0);

    float *dq = falloc(nq), *dkv = falloc(nkv), *dcomp = c.n_comp ? falloc(nc) : NULL, *ds = falloc(c.H);
    OK(op_sink_attention_backward(&g_k, dq, dkv, dcomp, ds, c.dout, c.q, c.kv, c.comp, c.comp_idx, c.n_comp, c.sinks,
                                  c.T, 0, c.H, c.d, c.window, c.scale, &g_e));
    fd_check(op, "q", attn_loss, &c, c.q, nq, dq);
    fd_check(op, "kv", attn_loss, &c, c.kv, nkv, dkv);
    if (c.n_comp) fd_check(op, "comp", attn_loss, &c, c.comp, nc, dcomp);
    fd_check(op, "sinks", attn_loss, &c, c.sinks, c.H, ds);

    float *dq1 = falloc(nq), *dkv1 = falloc(nkv), *dcomp1 = c.n_comp ? falloc(nc) : NULL, *ds1 = falloc(c.H);
    fill_value(dq1, nq, 1.0f);
    fill_value(dkv1, nkv, 1.0f);
    if (dcomp1) fill_value(dcomp1, nc, 1.0f);
    fill_value(ds1, c.H, 1.0f);
    OK(op_sink_attention_backward(&g_k, dq1, dkv1, dcomp1, ds1, c.dout, c.q, c.kv, c.comp, c.comp_idx, c.n_comp,
                                  c.sinks, c.T, 0, c.H, c.d, c.window, c.scale, &g_e));
    accum_check(op, "q", dq, dq1, nq, 0);
    accum_check(op, "kv", dkv, dkv1, nkv, 0);
    if (c.n_comp) accum_check(op, "comp", dcomp, dcomp1, nc, 0);
    accum_check(op, "sinks", ds, ds1, c.H, 0);

    free(c.q), free(c.kv), free(c.comp), free(c.sinks), free(c.out), free(c.dout);
    free(dq), free(dkv), free(dcomp), free(ds), free(dq1), free(dkv1), free(dcomp1), free(ds1);
}

static void test_sink_attention_backward(void **state) {
    (void)state;
    /* window 3 < T = 7; compressed entries per query with empty (-1) slots in either position,
     * rows with none, and entry 2 reached only late */
    static const int32_t comp_idx[7 * 2] = {-1, -1, -1, -1, 0, -1, -1, 0, 0, 1, 1, -1, 2, 0};
    attn_ctx c = {.T = 7, .H = 2, .d = 4, .window = 3, .n_comp = 2, .Tc = 3, .comp_idx = comp_idx};
    c.scale = 1.0f / sqrtf((float)c.d);
    attn_case("op_sink_attention_backward", c, 606);
    /* no compressed entries at all (comp, comp_idx, dcomp NULL), window 2 */
    attn_ctx c0 = {.T = 6, .H = 3, .d = 4, .window = 2, .n_comp = 0, .Tc = 0, .comp_idx = NULL};
    c0.scale = 0.6f;
    attn_case("op_sink_attention_backward (n_comp 0)", c0, 607);
}

/* ---------------------------------------------------------------- op_compress_pool_backward */

typedef struct {
    int T, d, ratio, overlap;
    float *a, *g, *ape, *out, *dout;
} pool_ctx;

static double pool_loss(void *p) {
    pool_ctx *c = p;
    OK(op_compress_pool(&g_k, c->out, c->a, c->g, c->ape, c->T, c->d, c->ratio, c->overlap, &g_e));
    return dotd(c->dout, c->out, (long)(c->T / c->ratio) * c->d);
}

static void pool_case(const char *op, pool_ctx c, uint64_t seed) {
    rng_seed(seed);
    int width = c.overlap ? 2 * c.d : c.d;
    long na = (long)c.T * width, nape = (long)c.ratio * width, no = (long)(c.T / c.ratio) * c.d;
    c.a = falloc(na);
    c.g = falloc(na);
    c.ape = falloc(nape);
    c.out = falloc(no);
    c.dout = falloc(no);
    fill_normal(c.a, na, 1.0);
    fill_normal(c.g, na, 1.0);
    fill_normal(c.ape, nape, 0.5);
    fill_normal(c.dout, no, 1.0);

    float *da = falloc(na), *dg = falloc(na), *dape = falloc(nape);
    OK(op_compress_pool_backward(&g_k, da, dg, dape, c.dout, c.a, c.g, c.ape, c.T, c.d, c.ratio, c.overlap, &g_e));
    fd_check(op, "a", pool_loss, &c, c.a, na, da);
    fd_check(op, "g", pool_loss, &c, c.g, na, dg);
    fd_check(op, "ape", pool_loss, &c, c.ape, nape, dape);

    float *da1 = falloc(na), *dg1 = falloc(na), *dape1 = falloc(nape);
    fill_value(da1, na, 1.0f);
    fill_value(dg1, na, 1.0f);
    fill_value(dape1, nape, 1.0f);
    OK(op_compress_pool_backward(&g_k, da1, dg1, dape1, c.dout, c.a, c.g, c.ape, c.T, c.d, c.ratio, c.overlap,
                                 &g_e));
    accum_check(op, "a", da, da1, na, 0);
    accum_check(op, "g", dg, dg1, na, 0);
    accum_check(op, "ape", dape, dape1, nape, 0);

    free(c.a), free(c.g), free(c.ape), free(c.out), free(c.dout);
    free(da), free(dg), free(dape), free(da1), free(dg1), free(dape1);
}

static void test_compress_pool_backward(void **state) {
    (void)state;
    /* HCA: ratio 3 over T = 10 (3 windows and a trailing token that gets no gradient) */
    pool_case("op_compress_pool_backward (overlap 0)", (pool_ctx){.T = 10, .d = 3, .ratio = 3, .overlap = 0}, 707);
    /* CSA: overlapping windows of 2 * ratio slots over [T, 2d] */
    pool_case("op_compress_pool_backward (overlap 1)", (pool_ctx){.T = 8, .d = 3, .ratio = 2, .overlap = 1}, 708);
}

/* ---------------------------------------------------------------- op_rope (its own backward) */

typedef struct {
    int n_tok, n_vec, dim, rope_dim, sign;
    const int32_t *pos;
    const float *inv_freq;
    float *x, *tmp, *dy;
} rope_ctx;

static double rope_loss(void *p) {
    rope_ctx *c = p;
    long n = (long)c->n_tok * c->n_vec * c->dim;
    memcpy(c->tmp, c->x, sizeof(float) * (size_t)n);
    OK(op_rope(&g_k, c->tmp, c->n_tok, c->n_vec, c->dim, c->rope_dim, c->pos, c->inv_freq, c->sign, &g_e));
    return dotd(c->dy, c->tmp, n);
}

static void test_rope_backward(void **state) {
    (void)state;
    rng_seed(808);
    static const int32_t pos[4] = {0, 1, 5, 37};
    float inv_freq[3];
    rope_inv_freq(inv_freq, 6, 10000.0, 0, 0, 0, 0, 0);
    rope_ctx c = {.n_tok = 4, .n_vec = 3, .dim = 10, .rope_dim = 6, .pos = pos, .inv_freq = inv_freq};
    long n = (long)c.n_tok * c.n_vec * c.dim;
    c.x = falloc(n);
    c.tmp = falloc(n);
    c.dy = falloc(n);
    fill_normal(c.x, n, 1.0);
    fill_normal(c.dy, n, 1.0);
    float *gx = falloc(n);
    for (int sign = 1; sign >= -1; sign -= 2) {
        c.sign = sign;
        memcpy(gx, c.dy, sizeof(float) * (size_t)n); /* backward of sign s: op_rope with -s on dy */
        OK(op_rope(&g_k, gx, c.n_tok, c.n_vec, c.dim, c.rope_dim, pos, inv_freq, -sign, &g_e));
        fd_check(sign > 0 ? "op_rope (sign +1, backward -1)" : "op_rope (sign -1, backward +1)", "x", rope_loss, &c,
                 c.x, n, gx);
    }
    free(c.x), free(c.tmp), free(c.dy), free(gx);
}

/* ---------------------------------------------------------------- op_hc_post_backward */

typedef struct {
    int N, n, D;
    float *h, *y, *post, *comb, *out, *dout;
} hpost_ctx;

static double hpost_loss(void *p) {
    hpost_ctx *c = p;
    OK(op_hc_post(&g_k, c->out, c->h, c->y, c->post, c->comb, c->N, c->n, c->D, &g_e));
    return dotd(c->dout, c->out, (long)c->N * c->n * c->D);
}

static void test_hc_post_backward(void **state) {
    (void)state;
    rng_seed(909);
    hpost_ctx c = {.N = 3, .n = 4, .D = 5};
    long nh = (long)c.N * c.n * c.D, ny = (long)c.N * c.D, np = (long)c.N * c.n, nc = (long)c.N * c.n * c.n;
    c.h = falloc(nh);
    c.y = falloc(ny);
    c.post = falloc(np);
    c.comb = falloc(nc);
    c.out = falloc(nh);
    c.dout = falloc(nh);
    fill_normal(c.h, nh, 1.0);
    fill_normal(c.y, ny, 1.0);
    fill_normal(c.post, np, 1.0);
    fill_normal(c.comb, nc, 1.0); /* not symmetric: a transposition error would show */
    fill_normal(c.dout, nh, 1.0);

    float *dh = falloc(nh), *dy = falloc(ny), *dp = falloc(np), *dc = falloc(nc);
    OK(op_hc_post_backward(&g_k, dh, dy, dp, dc, c.dout, c.h, c.y, c.post, c.comb, c.N, c.n, c.D, &g_e));
    const char *op = "op_hc_post_backward";
    fd_check(op, "h", hpost_loss, &c, c.h, nh, dh);
    fd_check(op, "y", hpost_loss, &c, c.y, ny, dy);
    fd_check(op, "post", hpost_loss, &c, c.post, np, dp);
    fd_check(op, "comb", hpost_loss, &c, c.comb, nc, dc);

    float *dh1 = falloc(nh), *dy1 = falloc(ny), *dp1 = falloc(np), *dc1 = falloc(nc);
    fill_value(dh1, nh, 1.0f);
    fill_value(dy1, ny, 1.0f);
    fill_value(dp1, np, 1.0f);
    fill_value(dc1, nc, 1.0f);
    OK(op_hc_post_backward(&g_k, dh1, dy1, dp1, dc1, c.dout, c.h, c.y, c.post, c.comb, c.N, c.n, c.D, &g_e));
    accum_check(op, "h", dh, dh1, nh, 0);
    accum_check(op, "y", dy, dy1, ny, 0);
    accum_check(op, "post", dp, dp1, np, 1);
    accum_check(op, "comb", dc, dc1, nc, 1);

    free(c.h), free(c.y), free(c.post), free(c.comb), free(c.out), free(c.dout);
    free(dh), free(dy), free(dp), free(dc), free(dh1), free(dy1), free(dp1), free(dc1);
}

/* ---------------------------------------------------------------- op_hc_pre_backward / op_hc_head_backward */

typedef struct {
    int N, head;
    hc_dims dm;
    float *h, *fn, *base, *scale;
    float *x, *pre, *post, *comb, *work;
    float *gx, *gpost, *gcomb;
} hpre_ctx;

static double hpre_loss(void *p) {
    hpre_ctx *c = p;
    int N = c->N, n = c->dm.n;
    if (c->head) {
        OK(op_hc_head(&g_k, c->x, c->h, c->fn, c->base, c->scale, N, c->dm, c->work, &g_e));
        return dotd(c->gx, c->x, (long)N * c->dm.D);
    }
    OK(op_hc_pre(&g_k, c->x, c->pre, c->post, c->comb, c->h, c->fn, c->base, c->scale, N, c->dm, c->work, &g_e));
    return dotd(c->gx, c->x, (long)N * c->dm.D) + dotd(c->gpost, c->post, (long)N * n) +
           dotd(c->gcomb, c->comb, (long)N * n * n);
}

static void hc_case(const char *op, int head, int N, hc_dims dm, uint64_t seed) {
    rng_seed(seed);
    hpre_ctx c = {.N = N, .head = head, .dm = dm};
    int n = dm.n, D = dm.D, nd = n * D, mix = head ? n : (2 + n) * n, nsc = head ? 1 : 3;
    long nh = (long)N * nd, nfn = (long)mix * nd, nx = (long)N * D;
    c.h = falloc(nh);
    c.fn = falloc(nfn);
    c.base = falloc(mix);
    c.scale = falloc(nsc);
    c.x = falloc(nx);
    c.pre = falloc((long)N * n);
    c.post = falloc((long)N * n);
    c.comb = falloc((long)N * n * n);
    c.work = falloc((long)N * (nd + (2 + n) * n));
    c.gx = falloc(nx);
    c.gpost = falloc((long)N * n);
    c.gcomb = falloc((long)N * n * n);
    fill_normal(c.h, nh, 1.0);
    fill_normal(c.fn, nfn, 1.0 / sqrt((double)nd)); /* logits f ~ N(0, 1) */
    fill_normal(c.base, mix, 0.5);
    static const float scales[3] = {0.8f, 0.6f, 1.3f};
    memcpy(c.scale, scales, sizeof(float) * (size_t)nsc);
    fill_normal(c.gx, nx, 1.0);
    fill_normal(c.gpost, (long)N * n, 1.0);
    fill_normal(c.gcomb, (long)N * n * n, 1.0);

    long nw = hc_backward_work_floats(N, dm);
    float *bw = falloc(nw);
    float *dh = falloc(nh), *dfn = falloc(nfn), *db = falloc(mix), *ds = falloc(nsc);
    if (head)
        OK(op_hc_head_backward(&g_k, dh, dfn, db, ds, c.gx, c.h, c.fn, c.base, c.scale, N, dm, bw, &g_e));
    else
        OK(op_hc_pre_backward(&g_k, dh, dfn, db, ds, c.gx, c.gpost, c.gcomb, c.h, c.fn, c.base, c.scale, N, dm, bw,
                              &g_e));
    fd_check(op, "h", hpre_loss, &c, c.h, nh, dh);
    fd_check(op, "fn", hpre_loss, &c, c.fn, nfn, dfn);
    fd_check(op, "base", hpre_loss, &c, c.base, mix, db);
    fd_check(op, "scale", hpre_loss, &c, c.scale, nsc, ds);

    float *dh1 = falloc(nh), *dfn1 = falloc(nfn), *db1 = falloc(mix), *ds1 = falloc(nsc);
    fill_value(dh1, nh, 1.0f);
    fill_value(dfn1, nfn, 1.0f);
    fill_value(db1, mix, 1.0f);
    fill_value(ds1, nsc, 1.0f);
    fill_value(bw, nw, NAN); /* work is scratch: its prior contents must not matter */
    if (head)
        OK(op_hc_head_backward(&g_k, dh1, dfn1, db1, ds1, c.gx, c.h, c.fn, c.base, c.scale, N, dm, bw, &g_e));
    else
        OK(op_hc_pre_backward(&g_k, dh1, dfn1, db1, ds1, c.gx, c.gpost, c.gcomb, c.h, c.fn, c.base, c.scale, N, dm,
                              bw, &g_e));
    accum_check(op, "h", dh, dh1, nh, 0);
    accum_check(op, "fn", dfn, dfn1, nfn, 0);
    accum_check(op, "base", db, db1, mix, 0);
    accum_check(op, "scale", ds, ds1, nsc, 0);

    free(c.h), free(c.fn), free(c.base), free(c.scale), free(c.x), free(c.pre), free(c.post), free(c.comb);
    free(c.work), free(c.gx), free(c.gpost), free(c.gcomb), free(bw);
    free(dh), free(dfn), free(db), free(ds), free(dh1), free(dfn1), free(db1), free(ds1);
}

static void test_hc_pre_backward(void **state) {
    (void)state;
    hc_case("op_hc_pre_backward (sinkhorn 1)", 0, 3, (hc_dims){.n = 4, .D = 6, .sinkhorn_iters = 1, .hc_eps = 1e-6f, .norm_eps = 1e-6f}, 1001);
    hc_case("op_hc_pre_backward (sinkhorn 3)", 0, 3, (hc_dims){.n = 4, .D = 6, .sinkhorn_iters = 3, .hc_eps = 1e-6f, .norm_eps = 1e-6f}, 1002);
    hc_case("op_hc_pre_backward (sinkhorn 20)", 0, 2, (hc_dims){.n = 4, .D = 6, .sinkhorn_iters = 20, .hc_eps = 1e-6f, .norm_eps = 1e-6f}, 1003);
}

static void test_hc_head_backward(void **state) {
    (void)state;
    hc_case("op_hc_head_backward", 1, 3, (hc_dims){.n = 4, .D = 6, .sinkhorn_iters = 20, .hc_eps = 1e-6f, .norm_eps = 1e-6f}, 1101);
}

/* ---------------------------------------------------------------- op_moe_route_backward */

typedef struct {
    int N;
    moe_route_cfg rc;
    const int32_t *given, *base_ids; /* base_ids: the selection at the unperturbed point (select path) */
    float *logits, *bias, *scores, *weights, *dw;
    int32_t *ids;
    int sel_changed;
} route_ctx;

static double route_loss(void *p) {
    route_ctx *c = p;
    OK(op_moe_route(&g_k, c->scores, c->ids, c->weights, c->logits, c->bias, c->given, c->N, c->rc, &g_e));
    if (c->base_ids && memcmp(c->ids, c->base_ids, sizeof(int32_t) * (size_t)c->N * c->rc.K)) c->sel_changed = 1;
    return dotd(c->dw, c->weights, (long)c->N * c->rc.K);
}

static float score_of(float l, dsv4_score_func f) {
    if (f == SCORE_SIGMOID) return 1.0f / (1.0f + expf(-l));
    return sqrtf(l > 20.0f ? l : log1pf(expf(l)));
}

/* select == 0: given ids (distinct per token). select == 1: top-k of s + bias, with logits resampled
 * until every gap among the top K+1 candidates is wide enough that FD steps keep the selection. */
static void route_case(dsv4_score_func sf, int norm_topk, int select, uint64_t seed) {
    char op[96];
    static const char *fname[] = {"sqrtsoftplus", "sigmoid", "softmax"};
    snprintf(op, sizeof op, "op_moe_route_backward (%s, norm %d, %s)", fname[sf], norm_topk,
             select ? "top-k" : "given ids");
    rng_seed(seed);
    const int N = 4, E = 8, K = 3;
    route_ctx c = {.N = N, .rc = {.E = E, .K = K, .score_func = sf, .norm_topk = norm_topk, .routed_scale = 1.5f}};
    long nl = (long)N * E, nk = (long)N * K;
    c.logits = falloc(nl);
    c.scores = falloc(nl);
    c.weights = falloc(nk);
    c.dw = falloc(nk);
    c.ids = calloc((size_t)nk, sizeof(int32_t));
    int32_t *given = calloc((size_t)nk, sizeof(int32_t)), *base = calloc((size_t)nk, sizeof(int32_t));
    assert_non_null(c.ids), assert_non_null(given), assert_non_null(base);
    fill_normal(c.dw, nk, 1.0);
    if (!select) {
        fill_normal(c.logits, nl, 1.5);
        for (int t = 0; t < N; t++) /* K distinct experts per token */
            for (int j = 0; j < K; j++) {
                int x, dup;
                do {
                    x = rng_int(E);
                    dup = 0;
                    for (int q = 0; q < j; q++) dup |= given[t * K + q] == x;
                } while (dup);
                given[t * K + j] = x;
            }
        if (sf == SCORE_SQRTSOFTPLUS) c.logits[0 * E + given[0]] = 21.5f; /* softplus's linear branch (> 20) */
        c.given = given;
    } else {
        c.bias = falloc(E);
        int tries = 0, ok;
        do {
            assert_true(++tries < 1000);
            fill_normal(c.logits, nl, 1.5);
            fill_normal(c.bias, E, 0.1);
            ok = 1;
            for (int t = 0; t < N && ok; t++) {
                float v[8];
                if (sf == SCORE_SOFTMAX) { /* selection margin on softmax scores: require logit gaps instead */
                    for (int x = 0; x < E; x++) v[x] = c.logits[t * E + x];
                    fill_value(c.bias, E, 0.0f);
                } else {
                    for (int x = 0; x < E; x++) v[x] = score_of(c.logits[t * E + x], sf) + c.bias[x];
                }
                /* sort descending (insertion) and check the gaps among the first K+1 */
                for (int a = 1; a < E; a++)
                    for (int b = a; b > 0 && v[b] > v[b - 1]; b--) {
                        float tmp = v[b];
                        v[b] = v[b - 1];
                        v[b - 1] = tmp;
                    }
                for (int j = 0; j < K; j++) ok &= v[j] - v[j + 1] > 0.03f;
            }
        } while (!ok);
    }

    (void)route_loss(&c); /* baseline selection */
    memcpy(base, c.ids, sizeof(int32_t) * (size_t)nk);
    if (select) c.base_ids = base;

    float *dl = falloc(nl), *dl1 = falloc(nl);
    OK(op_moe_route_backward(&g_k, dl, c.dw, c.scores, c.logits, c.ids, N, c.rc, &g_e));
    fd_check(op, "logits", route_loss, &c, c.logits, nl, dl);
    if (c.sel_changed) fail_msg("%s: an FD step changed the top-k selection; the test's margins are too small", op);
    (void)route_loss(&c); /* scores/ids back at the unperturbed point */
    fill_value(dl1, nl, 1.0f);
    OK(op_moe_route_backward(&g_k, dl1, c.dw, c.scores, c.logits, c.ids, N, c.rc, &g_e));
    accum_check(op, "logits", dl, dl1, nl, 0);

    free(c.logits), free(c.scores), free(c.weights), free(c.dw), free(c.ids), free(c.bias);
    free(given), free(base), free(dl), free(dl1);
}

static void test_moe_route_backward(void **state) {
    (void)state;
    uint64_t seed = 1200;
    for (int sf = SCORE_SQRTSOFTPLUS; sf <= SCORE_SOFTMAX; sf++)
        for (int norm = 1; norm >= 0; norm--) {
            route_case((dsv4_score_func)sf, norm, 0, seed++);
            route_case((dsv4_score_func)sf, norm, 1, seed++);
        }
}

/* ---------------------------------------------------------------- op_moe_experts_backward */

typedef struct {
    int N, D, I, E, K;
    float limit;
    const int32_t *ids;
    float *x, *weights, *w1, *w3, *w2, *out, *dout, *work;
} exp_ctx;

static double exp_loss(void *p) {
    exp_ctx *c = p;
    OK(op_moe_experts(&g_k, c->out, c->x, c->ids, c->weights, c->w1, c->w3, c->w2, c->N, c->D, c->I, c->E, c->K,
                      c->limit, 0, c->work, &g_e));
    return dotd(c->dout, c->out, (long)c->N * c->D);
}

static void test_moe_experts_backward(void **state) {
    (void)state;
    rng_seed(1300);
    /* expert 3 is never routed to: its weights must get no gradient */
    static const int32_t ids[5 * 2] = {0, 2, 1, 0, 2, 1, 0, 1, 2, 0};
    exp_ctx c = {.N = 5, .D = 6, .I = 4, .E = 4, .K = 2, .limit = 1.0f, .ids = ids};
    int N = c.N, D = c.D, I = c.I, E = c.E, K = c.K;
    long nx = (long)N * D, nwt = (long)N * K, nw = (long)E * I * D;
    c.x = falloc(nx);
    c.weights = falloc(nwt);
    c.w1 = falloc(nw);
    c.w3 = falloc(nw);
    c.w2 = falloc(nw);
    c.out = falloc(nx);
    c.dout = falloc(nx);
    c.work = falloc(moe_experts_work_floats(N, D, I, E, K));
    /* resample until every gate/up pre-activation of a routed (token, expert) is > margin away from
     * the clamp edges (+L for the gate, +-L for up), with some beyond them */
    const float margin = 0.015f;
    int tries = 0, ok, g_out, u_out;
    do {
        assert_true(++tries < 10000);
        fill_normal(c.x, nx, 1.0);
        fill_normal(c.w1, nw, 1.0 / sqrt((double)D));
        fill_normal(c.w3, nw, 1.0 / sqrt((double)D));
        ok = 1, g_out = 0, u_out = 0;
        for (int t = 0; t < N; t++)
            for (int s = 0; s < K; s++) {
                int ex = ids[t * K + s];
                for (int i = 0; i < I; i++) {
                    double g = 0, u = 0;
                    for (int cc = 0; cc < D; cc++) {
                        g += (double)c.x[t * D + cc] * c.w1[((long)ex * I + i) * D + cc];
                        u += (double)c.x[t * D + cc] * c.w3[((long)ex * I + i) * D + cc];
                    }
                    ok &= fabs(g - c.limit) > margin && fabs(u - c.limit) > margin && fabs(u + c.limit) > margin;
                    g_out += g > c.limit;
                    u_out += fabs(u) > c.limit;
                }
            }
        ok &= g_out > 0 && u_out > 0;
    } while (!ok);
    printf("  op_moe_experts_backward: %d gate and %d up pre-activations beyond limit %.1f (%d draws)\n", g_out,
           u_out, c.limit, tries);
    fill_normal(c.w2, nw, 1.0 / sqrt((double)I));
    for (long i = 0; i < nwt; i++) c.weights[i] = (float)(0.2 + 0.8 * rng_uniform());
    fill_normal(c.dout, nx, 1.0);

    long nbw = moe_experts_backward_work_floats(N, D, I, E, K);
    float *bw = falloc(nbw);
    float *dx = falloc(nx), *dw1 = falloc(nw), *dw3 = falloc(nw), *dw2 = falloc(nw), *dwt = falloc(nwt);
    OK(op_moe_experts_backward(&g_k, dx, dw1, dw3, dw2, dwt, c.dout, c.x, ids, c.weights, c.w1, c.w3, c.w2, N, D, I,
                               E, K, c.limit, bw, &g_e));
    const char *op = "op_moe_experts_backward";
    fd_check(op, "x", exp_loss, &c, c.x, nx, dx);
    fd_check(op, "w1", exp_loss, &c, c.w1, nw, dw1);
    fd_check(op, "w3", exp_loss, &c, c.w3, nw, dw3);
    fd_check(op, "w2", exp_loss, &c, c.w2, nw, dw2);
    fd_check(op, "weights", exp_loss, &c, c.weights, nwt, dwt);
    for (long i = 3L * I * D; i < nw; i++) /* the unrouted expert */
        assert_true(dw1[i] == 0.0f && dw3[i] == 0.0f && dw2[i] == 0.0f);

    float *dx1 = falloc(nx), *dw11 = falloc(nw), *dw31 = falloc(nw), *dw21 = falloc(nw), *dwt1 = falloc(nwt);
    fill_value(dx1, nx, 1.0f);
    fill_value(dw11, nw, 1.0f);
    fill_value(dw31, nw, 1.0f);
    fill_value(dw21, nw, 1.0f);
    fill_value(dwt1, nwt, 1.0f);
    fill_value(bw, nbw, NAN); /* work is scratch */
    OK(op_moe_experts_backward(&g_k, dx1, dw11, dw31, dw21, dwt1, c.dout, c.x, ids, c.weights, c.w1, c.w3, c.w2, N, D,
                               I, E, K, c.limit, bw, &g_e));
    accum_check(op, "x", dx, dx1, nx, 0);
    accum_check(op, "w1", dw1, dw11, nw, 0);
    accum_check(op, "w3", dw3, dw31, nw, 0);
    accum_check(op, "w2", dw2, dw21, nw, 0);
    accum_check(op, "weights", dwt, dwt1, nwt, 1);

    free(c.x), free(c.weights), free(c.w1), free(c.w3), free(c.w2), free(c.out), free(c.dout), free(c.work), free(bw);
    free(dx), free(dw1), free(dw3), free(dw2), free(dwt), free(dx1), free(dw11), free(dw31), free(dw21), free(dwt1);
}

/* ---------------------------------------------------------------- main */

static int group_setup(void **state) {
    (void)state;
    return kctx_init(&g_k, DEVICE_CPU, &g_e);
}

static int group_teardown(void **state) {
    (void)state;
    kctx_free(&g_k);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_linear_backward),
        cmocka_unit_test(test_rmsnorm_backward),
        cmocka_unit_test(test_embedding_backward),
        cmocka_unit_test(test_swiglu_clamp_backward),
        cmocka_unit_test(test_cross_entropy),
        cmocka_unit_test(test_sink_attention_backward),
        cmocka_unit_test(test_compress_pool_backward),
        cmocka_unit_test(test_rope_backward),
        cmocka_unit_test(test_hc_post_backward),
        cmocka_unit_test(test_hc_pre_backward),
        cmocka_unit_test(test_hc_head_backward),
        cmocka_unit_test(test_moe_route_backward),
        cmocka_unit_test(test_moe_experts_backward),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
