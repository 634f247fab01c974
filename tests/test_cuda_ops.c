/* tests/test_cuda_ops.c — every op's CUDA path (kernels/cuda/) against its CPU path, forward and
 * backward, on the same random inputs at a few shapes (DSV4-like ones included: head dim 512, 8-16
 * heads, window 128, up to 64 compressed slots with -1 holes, vocab 32000, 8-64 experts, top-2..6).
 * Built only with CUDA; on a machine without a GPU it prints "no CUDA device: skipped" and passes.
 *
 * Error measure: ||gpu - cpu|| / ||cpu|| over the whole output (METHOD.md's norm-wise relative error);
 * a NaN anywhere, or a -inf in one and not the other, counts as infinite. Write-only outputs are
 * poisoned with NaN on the device first, so an unwritten element fails.
 * Tolerances, and why:
 *   TOL_GEMM 1e-2 — GEMMs run on bf16 tensor cores (operands rounded to bf16, fp32 accumulation):
 *     each operand keeps 8 significant bits (unit roundoff 2^-8), so each product is off by ~2e-3
 *     RMS and a K-term sum by ~2e-3 relative (a host simulation of these inputs gives 2.1e-3;
 *     TF32 would give 2.6e-4).
 *     test_gemm also probes which precision op_linear really runs (see gemm_precision).
 *   TOL_MOE 3e-2 — the experts chain bf16 GEMMs (forward two deep; backward three: recomputed g/u,
 *     dact = dy w2, then dx = dg w1 + du w3), and the clamp (limit 3 here, so it binds) turns
 *     rounding into whole-element differences: where the bf16-recomputed pre-activation lands on
 *     the other side of +-L than the CPU's, that element's gradient is passed on one side and
 *     zeroed on the other. About 0.1% of elements sit that close, which alone gives ~1e-2 norm-wise
 *     (an H100 run measured up to 9.6e-3 for dx); 3e-2 leaves room without hiding a wrong term.
 *   TOL_MOE_PATHS 2e-3 — the experts through the grouped tensor-core kernels (NT/NN, and TN for the
 *     weight gradients) against the cuBLAS path they replaced (kctx.moe_cublas): the same bf16
 *     operands, fp32 sums in another order (~1e-7 per element), so only a clamp decision within a
 *     few ulps of +-L can differ, rarely and by one element; a grouped row computed wrong or not at
 *     all (1 of ~1000) is ~3e-2.
 *   TOL_WMMA 1e-5 — cuda_moe_wmma_gemm and cuda_moe_wmma_tn_gemm against a double product of the
 *     same bf16 values: fp32 accumulation over K (TN: an expert's rows) <= 1024 only (~1e-6).
 *   TOL_SKINNY 1e-4 — op_linear's few-row kernel (cu_skinny_linear) against a double product of the
 *     same bf16-rounded operands: only the fp32 accumulation on the tensor cores differs (~1e-6 at
 *     K 4096; room left for their truncating adds), while one k of 4096 missed or doubled is ~1e-2.
 *     Against the CPU op it gets TOL_GEMM like every GEMM (where N >= 256: a lone dot product of
 *     8 terms can cancel to a relative error above it).
 *   TOL_ATT_TC 4e-3 — the tensor-core sink attention against the CPU on the same bf16-rounded
 *     q, keys and dout: P and dS are rounded to bf16 (2^-9 relative each, ~1e-3 of the output);
 *     one key of a few hundred missed or doubled moves the output by about its 1 / keys share.
 *   TOL_FP32 1e-5 — pure fp32 kernels: the same formula, only the summation order (warp trees vs
 *     the CPU's loops) and libm vs CUDA's expf/sinf (<= 2 ulp) differ; that is ~1e-7 per element,
 *     growing like sqrt(terms).
 *   TOL_HC 1e-4 — hyper-connections are fp32 too (full-fp32 cuBLAS for their logits), but their
 *     parameter gradients (dscale) are sums over all tokens of terms that cancel, and Sinkhorn's 40
 *     normalisation steps compound rounding; 1e-4 keeps headroom over the ~1e-6 expected.
 *   Exact (0) — integer outputs (top-k, causal entries, routing ids), the embedding gather, counts.
 * The last lines print the worst error per op over all shapes. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "common/cuda_util.h"
#include "common/rng.h"
#include "kernels/attention.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/dense.h"
#include "kernels/hc.h"
#include "kernels/moe.h"
#include "kernels/optim.h"
#include "kernels/rope.h"
#include "kernels/sample.h"

#define TOL_GEMM 1e-2
#define TOL_FP32 1e-5
#define TOL_HC 1e-4
#define TOL_MOE 3e-2
#define TOL_MOE_PATHS 2e-3
#define TOL_WMMA 1e-5
#define TOL_SKINNY 1e-4
#define TOL_ATT_TC 4e-3
#define SKINNY_MAX_ROWS 32 /* CU_SKINNY_MAX_ROWS (kernels/cuda/cuda_internal.cuh): op_linear's few-row kernel */
#define MAX_OPS 160

typedef struct {
    kctx cpu, gpu;
    rng r;
    int fails; /* checks over tolerance in the current test */
    int nops;
    char op[MAX_OPS][40];
    double worst[MAX_OPS], tol[MAX_OPS];
} fixture;

/* ---- helpers ---- */

#define OK(call)                                                         \
    do {                                                                 \
        mill_err e_;                                                     \
        memset(&e_, 0, sizeof e_);                                       \
        if (call_with_err((call), &e_)) fail_msg("%s: %s", #call, e_.msg); \
    } while (0)
/* The ops take their mill_err last; inside OK(...) that argument is written ERR. */
#define ERR (&e_)
static int call_with_err(int rc, mill_err *e) {
    (void)e;
    return rc != 0;
}

static float *hnew(long n) {
    float *p = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    assert_non_null(p);
    return p;
}
static int32_t *hnewi(long n) {
    int32_t *p = malloc(sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    assert_non_null(p);
    return p;
}
static void fill(fixture *f, float *p, long n, float lo, float hi) {
    for (long i = 0; i < n; i++) p[i] = lo + (hi - lo) * rng_uniform(&f->r);
}
static void fillv(float *p, long n, float v) {
    for (long i = 0; i < n; i++) p[i] = v;
}

static void *dnew(size_t bytes) {
    void *p = NULL;
    mill_err e;
    if (cuda_alloc_zero(&p, bytes, &e)) fail_msg("%s", e.msg);
    return p;
}
static float *up(const float *h, long n) {
    mill_err e;
    float *d = dnew(sizeof(float) * (size_t)(n > 0 ? n : 1));
    if (n > 0 && cuda_copy_to_device(d, h, sizeof(float) * (size_t)n, &e)) fail_msg("%s", e.msg);
    if (cuda_sync(&e)) fail_msg("%s", e.msg);
    return d;
}
static int32_t *upi(const int32_t *h, long n) {
    mill_err e;
    int32_t *d = dnew(sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    if (n > 0 && cuda_copy_to_device(d, h, sizeof(int32_t) * (size_t)n, &e)) fail_msg("%s", e.msg);
    if (cuda_sync(&e)) fail_msg("%s", e.msg);
    return d;
}
static float *poison(long n) {
    float *h = hnew(n);
    fillv(h, n, NAN);
    float *d = up(h, n);
    free(h);
    return d;
}
/* Overwrites device buffer d [n] with NaN once the queued ops are done. */
static void repoison(float *d, long n) {
    mill_err e;
    float *h = hnew(n);
    fillv(h, n, NAN);
    if (cuda_sync(&e) || cuda_copy_to_device(d, h, sizeof(float) * (size_t)n, &e)) fail_msg("%s", e.msg);
    free(h);
}
static void down(void *h, const void *d, size_t bytes) {
    mill_err e;
    if (cuda_sync(&e)) fail_msg("%s", e.msg); /* ops run on kctx.stream */
    if (cuda_copy_to_host(h, d, bytes, &e)) fail_msg("%s", e.msg);
}

static double rel_err(const float *a, const float *ref, long n) {
    double num = 0.0, den = 0.0;
    for (long i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(ref[i])) return INFINITY;
        if (isinf(ref[i]) || isinf(a[i])) {
            if (a[i] != ref[i]) return INFINITY;
            continue;
        }
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static void record(fixture *f, const char *op, const char *shape, double err, double tol) {
    int i = 0;
    while (i < f->nops && strcmp(f->op[i], op)) i++;
    if (i == f->nops && f->nops < MAX_OPS) {
        snprintf(f->op[i], sizeof f->op[i], "%s", op);
        f->worst[i] = 0;
        f->tol[i] = tol;
        f->nops++;
    }
    if (i < MAX_OPS && !(err <= f->worst[i])) f->worst[i] = err;
    int bad = !(err <= tol);
    printf("  %-34s %-40s rel err %.3e (tol %.0e)%s\n", op, shape, err, tol, bad ? "  FAIL" : "");
    fflush(stdout);
    f->fails += bad;
}

/* Downloads n floats of device buffer d and compares them with the CPU result ref. */
static void cmp(fixture *f, const char *op, const char *shape, const float *d, const float *ref, long n, double tol) {
    float *h = hnew(n);
    down(h, d, sizeof(float) * (size_t)n);
    record(f, op, shape, rel_err(h, ref, n), tol);
    free(h);
}
/* Two device results of the same op (e.g. two GEMM paths), b the reference. */
static void cmp_dev(fixture *f, const char *op, const char *shape, const float *a, const float *b, long n, double tol) {
    float *h = hnew(n);
    down(h, b, sizeof(float) * (size_t)n);
    cmp(f, op, shape, a, h, n, tol);
    free(h);
}
static void cmpi(fixture *f, const char *op, const char *shape, const int32_t *d, const int32_t *ref, long n) {
    int32_t *h = hnewi(n);
    down(h, d, sizeof(int32_t) * (size_t)n);
    long diff = 0;
    for (long i = 0; i < n; i++) diff += h[i] != ref[i];
    record(f, op, shape, (double)diff, 0.0); /* integer outputs: the count of mismatches */
    free(h);
}

#define END_TEST(f) assert_int_equal((f)->fails, 0)

/* ---- dense ---- */

static uint16_t bf16_bits(float v) { /* round to nearest even, as __float2bfloat16_rn (finite v) */
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float bf16_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}


/* Which operand precision op_linear's GEMM really uses: x[0,0] = 1 + 2^-10 survives TF32 (10
 * mantissa bits) but not bf16 (7); x[1,0] = 1 + 2^-13 survives only fp32. */
static const char *gemm_precision(fixture *f, int M) {
    int N = 64, K = 64;
    float *x = hnew((long)M * K), *w = hnew((long)N * K), y[2];
    fillv(x, (long)M * K, 0);
    fillv(w, (long)N * K, 0);
    x[0] = 1.0f + ldexpf(1.0f, -10);
    x[K] = 1.0f + ldexpf(1.0f, -13);
    for (int n = 0; n < N; n++) w[(long)n * K] = 1.0f;
    float *dx = up(x, (long)M * K), *dw = up(w, (long)N * K), *dy = poison((long)M * N);
    OK(op_linear(&f->gpu, dy, dx, dw, M, N, K, 0, 0, 0, ERR));
    down(&y[0], dy, sizeof(float));
    down(&y[1], dy + N, sizeof(float));
    free(x), free(w);
    cuda_free(dx), cuda_free(dw), cuda_free(dy);
    if (y[0] == 1.0f) return "bf16";
    if (y[1] == 1.0f) return "tf32";
    return "fp32";
}

static void test_gemm(void **state) {
    fixture *f = *state;
    f->fails = 0;
    for (int M = 2; M <= 64; M += 62) { /* the few-row kernel, then cuBLAS */
        const char *prec = gemm_precision(f, M);
        char name[64];
        snprintf(name, sizeof name, "M%d: %s", M, prec);
        printf("  op_linear operand precision at M = %d: %s\n", M, prec);
        record(f, "op_linear runs bf16 operands", name, strcmp(prec, "bf16") ? 1.0 : 0.0, 0.0);
    }
    struct {
        int M, N, K, padx, pady, acc;
    } sh[] = {{64, 96, 128, 0, 0, 0}, {257, 512, 1024, 8, 4, 1}, {128, 4096, 512, 0, 0, 1}};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int M = sh[s].M, N = sh[s].N, K = sh[s].K, lx = K + sh[s].padx, ly = N + sh[s].pady;
        char name[64];
        snprintf(name, sizeof name, "M%d N%d K%d ldx%d ldy%d acc%d", M, N, K, lx, ly, sh[s].acc);
        float *x = hnew((long)M * lx), *w = hnew((long)N * K), *y = hnew((long)M * ly);
        fill(f, x, (long)M * lx, -1, 1);
        fill(f, w, (long)N * K, -1, 1);
        fill(f, y, (long)M * ly, -1, 1);
        float *dx = up(x, (long)M * lx), *dw = up(w, (long)N * K);
        float *dy = sh[s].acc ? up(y, (long)M * ly) : poison((long)M * ly);
        OK(op_linear(&f->cpu, y, x, w, M, N, K, lx, ly, sh[s].acc, ERR));
        OK(op_linear(&f->gpu, dy, dx, dw, M, N, K, lx, ly, sh[s].acc, ERR));
        cmp(f, "op_linear", name, dy, y, (long)M * ly, TOL_GEMM);
        /* backward: dx, dw accumulate onto random values */
        float *g = hnew((long)M * ly), *gx = hnew((long)M * lx), *gw = hnew((long)N * K);
        fill(f, g, (long)M * ly, -1, 1);
        fill(f, gx, (long)M * lx, -1, 1);
        fill(f, gw, (long)N * K, -1, 1);
        float *dg = up(g, (long)M * ly), *dgx = up(gx, (long)M * lx), *dgw = up(gw, (long)N * K);
        OK(op_linear_backward(&f->cpu, gx, gw, g, x, w, M, N, K, lx, ly, ERR));
        OK(op_linear_backward(&f->gpu, dgx, dgw, dg, dx, dw, M, N, K, lx, ly, ERR));
        cmp(f, "op_linear_backward dx", name, dgx, gx, (long)M * lx, TOL_GEMM);
        cmp(f, "op_linear_backward dw", name, dgw, gw, (long)N * K, TOL_GEMM);
        free(x), free(w), free(y), free(g), free(gx), free(gw);
        cuda_free(dx), cuda_free(dw), cuda_free(dy), cuda_free(dg), cuda_free(dgx), cuda_free(dgw);
    }
    int mm[][3] = {{33, 24, 40}, {128, 256, 512}};
    for (int s = 0; s < 2; s++) {
        int M = mm[s][0], N = mm[s][1], K = mm[s][2];
        char name[64];
        snprintf(name, sizeof name, "M%d N%d K%d", M, N, K);
        float *a = hnew((long)M * K), *b = hnew((long)K * N), *y = hnew((long)M * N);
        fill(f, a, (long)M * K, -1, 1);
        fill(f, b, (long)K * N, -1, 1);
        float *da = up(a, (long)M * K), *db = up(b, (long)K * N), *dy = poison((long)M * N);
        OK(op_matmul_nn(&f->cpu, y, a, b, M, N, K, ERR));
        OK(op_matmul_nn(&f->gpu, dy, da, db, M, N, K, ERR));
        cmp(f, "op_matmul_nn", name, dy, y, (long)M * N, TOL_GEMM);
        free(a), free(b), free(y);
        cuda_free(da), cuda_free(db), cuda_free(dy);
    }
    END_TEST(f);
}

/* op_linear at decode's few rows: cu_skinny_linear for M <= 32, and M = 33 through the cuBLAS path
 * it falls back to. Every M x N x K of {1,2,3,7,8,16,31,32,33} x {1,5,256,1000} x {8,100,1024,4096}
 * (K 8 and 100: part of one 32-wide chunk, 100 not a multiple of 8), and N x K 4100 x 1024,
 * 8200 x 100, 16400 x 1024, 32768 x 256 (the kernel's 16-, 32- and 64-column blocks with a
 * partial last one; an LM head's width) for every M, with accumulate and three
 * layouts rotating over the shapes: compact; padded aligned strides; odd strides with x and w one
 * float off alignment (the scalar path). Each shape runs with w unregistered (rounded in the kernel)
 * and with w's bf16 shadow (kctx_shadow_add): against a double product of the bf16-rounded operands
 * (TOL_SKINNY) and the CPU op (TOL_GEMM), the two runs bit-equal. For M <= 32 the rows must equal
 * (memcmp) the same rows computed one per call: the batch invariance the kernel promises. x's and
 * w's padding hold NaN (reading it shows); y's stride padding and 64 floats past y keep sentinel
 * bits. The timing of the kernel is bench_decode's, not this test's. */
typedef struct {
    double worst_ref, worst_cpu;            /* vs the bf16 double product; vs the CPU op (N >= 256) */
    long shadow_diff, batch_diff, outside; /* mismatching floats; floats changed outside y */
} skinny_tally;

/* One op_linear shape of test_skinny_linear. lay 0: compact; 1: padded strides (ldx K + 8, ldy
 * N + 4); 2: ldx K + 1, ldy N + 1, x and w one float past a 16-byte boundary (the scalar path). */
static void skinny_case(fixture *f, skinny_tally *t, int M, int N, int K, int acc, int lay) {
    const float SENTINEL = 12345.0f;
    const int TAIL = 64;
    int lx = lay == 0 ? K : lay == 1 ? K + 8 : K + 1, ly = lay == 0 ? N : lay == 1 ? N + 4 : N + 1, off = lay == 2;
    long nx = off + (long)M * lx, nw = off + (long)N * K + 8, ny = (long)M * ly + TAIL;
    char name[96];
    snprintf(name, sizeof name, "M%d N%d K%d ldx%d ldy%d acc%d%s", M, N, K, lx, ly, acc, off ? " unaligned" : "");
    float *x = hnew(nx), *w = hnew(nw), *y0 = hnew(ny), *yc = hnew(ny), *got = hnew(ny), *g2 = hnew(ny);
    double *ref = malloc(sizeof(double) * (size_t)M * N);
    assert_non_null(ref);
    fillv(x, nx, NAN), fillv(w, nw, NAN), fillv(y0, ny, SENTINEL); /* padding: NaN if read, sentinel if written */
    for (int r = 0; r < M; r++) fill(f, x + off + (long)r * lx, K, -1, 1);
    fill(f, w + off, (long)N * K, -1, 1);
    for (int r = 0; r < M; r++)
        for (int n = 0; n < N; n++) y0[(long)r * ly + n] = acc ? -1.0f + 2.0f * rng_uniform(&f->r) : NAN;
    float *xr = hnew((long)M * K), *wr = hnew((long)N * K); /* the operands as bf16 values */
    for (int r = 0; r < M; r++)
        for (int c = 0; c < K; c++) xr[(long)r * K + c] = bf16_float(bf16_bits(x[off + (long)r * lx + c]));
    for (long i = 0; i < (long)N * K; i++) wr[i] = bf16_float(bf16_bits(w[off + i]));
    for (int r = 0; r < M; r++)
        for (int n = 0; n < N; n++) {
            double s = acc ? (double)y0[(long)r * ly + n] : 0.0;
            for (int c = 0; c < K; c++) s += (double)xr[(long)r * K + c] * wr[(long)n * K + c];
            ref[(long)r * N + n] = s;
        }
    free(xr), free(wr);
    memcpy(yc, y0, sizeof(float) * (size_t)ny);
    OK(op_linear(&f->cpu, yc, x + off, w + off, M, N, K, lx, ly, acc, ERR));
    float *dx = up(x, nx), *dw = up(w, nw);
    for (int sh = 0; sh < 2; sh++) { /* w unregistered, then through its bf16 shadow */
        float *dy = up(y0, ny);
        if (sh) OK(kctx_shadow_add(&f->gpu, dw, (size_t)nw, ERR));
        OK(op_linear(&f->gpu, dy, dx + off, dw + off, M, N, K, lx, ly, acc, ERR));
        down(sh ? g2 : got, dy, sizeof(float) * (size_t)ny);
        if (sh) kctx_shadow_remove(&f->gpu, dw);
        cuda_free(dy);
    }
    double num = 0, den = 0, cn = 0, cd = 0;
    for (long i = 0; i < ny; i++) {
        long r = i / ly, n = i % ly;
        if (r < M && n < N) {
            double d = (double)got[i] - ref[r * N + n], dc = (double)got[i] - yc[i];
            num += d * d, den += ref[r * N + n] * ref[r * N + n];
            cn += dc * dc, cd += (double)yc[i] * yc[i];
            if (isnan(got[i])) num = cn = INFINITY;
        } else if (memcmp(&got[i], &SENTINEL, sizeof(float)) || memcmp(&g2[i], &SENTINEL, sizeof(float))) {
            t->outside++;
        }
        if (M <= SKINNY_MAX_ROWS) t->shadow_diff += memcmp(&got[i], &g2[i], sizeof(float)) != 0;
    }
    double er = den > 0 ? sqrt(num / den) : sqrt(num), ec = cd > 0 ? sqrt(cn / cd) : sqrt(cn);
    if (!(er <= TOL_SKINNY) || (N >= 256 && !(ec <= TOL_GEMM)))
        printf("  op_linear few rows %s: rel err %.3e vs bf16 double, %.3e vs CPU  FAIL\n", name, er, ec);
    if (!(er <= t->worst_ref)) t->worst_ref = er;
    if (N >= 256 && !(ec <= t->worst_cpu)) t->worst_cpu = ec;
    if (M <= SKINNY_MAX_ROWS) { /* the same rows, one per call: the same bits */
        float *d1 = up(y0, ny);
        for (int r = 0; r < M; r++)
            OK(op_linear(&f->gpu, d1 + (long)r * ly, dx + off + (long)r * lx, dw + off, 1, N, K, lx, ly, acc, ERR));
        down(g2, d1, sizeof(float) * (size_t)ny);
        for (long i = 0; i < ny; i++) t->batch_diff += memcmp(&got[i], &g2[i], sizeof(float)) != 0;
        cuda_free(d1);
    }
    free(x), free(w), free(y0), free(yc), free(got), free(g2), free(ref);
    cuda_free(dx), cuda_free(dw);
}

/* kctx.exact: every row of op_linear has the same bits whatever M and the other rows are
 * (the first m rows alone = those rows of the whole batch, memcmp), and the product is a bf16 GEMM
 * (TOL_GEMM from the CPU). Shapes: the grouped tensor-core kernel's (N, K multiples of 16) with a
 * partial 128-row tile, and one it does not take (the few-row kernel 32 rows at a time). */
static void test_linear_exact(void **state) {
    fixture *f = *state;
    f->fails = 0;
    int sh[][3] = {{300, 256, 128}, {77, 100, 72}, {129, 512, 1024}};
    int subs[][2] = {{0, 1}, {37, 33}, {5, 129}}; /* first row, rows: other places in the tiles too */
    for (int s = 0; s < 3; s++) {
        int M = sh[s][0], N = sh[s][1], K = sh[s][2];
        char name[64];
        snprintf(name, sizeof name, "M%d N%d K%d", M, N, K);
        float *x = hnew((long)M * K), *w = hnew((long)N * K), *y = hnew((long)M * N), *ya = hnew((long)M * N);
        float *yb = hnew((long)M * N);
        fill(f, x, (long)M * K, -1, 1);
        fill(f, w, (long)N * K, -1, 1);
        fill(f, y, (long)M * N, -1, 1);
        float *dx = up(x, (long)M * K), *dw = up(w, (long)N * K), *dy = up(y, (long)M * N);
        f->gpu.exact = 1;
        OK(op_linear(&f->cpu, y, x, w, M, N, K, 0, 0, 1, ERR)); /* accumulating onto y */
        OK(op_linear(&f->gpu, dy, dx, dw, M, N, K, 0, 0, 1, ERR));
        cmp(f, "op_linear exact", name, dy, y, (long)M * N, TOL_GEMM);
        down(ya, dy, sizeof(float) * (size_t)M * N);
        OK(op_linear(&f->gpu, dy, dx, dw, M, N, K, 0, 0, 0, ERR));
        down(ya, dy, sizeof(float) * (size_t)M * N);
        for (int t = 0; t < 3; t++) {
            int r0 = subs[t][0], m = subs[t][1] < M - r0 ? subs[t][1] : M - r0;
            float *dsub = poison((long)m * N);
            OK(op_linear(&f->gpu, dsub, dx + (long)r0 * K, dw, m, N, K, 0, 0, 0, ERR));
            down(yb, dsub, sizeof(float) * (size_t)m * N);
            char sname[96];
            snprintf(sname, sizeof sname, "%s: rows %d..%d alone (bits)", name, r0, r0 + m);
            record(f, "op_linear exact row invariance", sname,
                   memcmp(ya + (long)r0 * N, yb, sizeof(float) * (size_t)m * N) ? 1.0 : 0.0, 0.0);
            cuda_free(dsub);
        }
        f->gpu.exact = 0;
        free(x), free(w), free(y), free(ya), free(yb);
        cuda_free(dx), cuda_free(dw), cuda_free(dy);
    }
    END_TEST(f);
}

static void test_skinny_linear(void **state) {
    fixture *f = *state;
    f->fails = 0;
    static const int Ms[] = {1, 2, 3, 7, 8, 16, 31, 32, 33}, Ns[] = {1, 5, 256, 1000}, Ks[] = {8, 100, 1024, 4096};
    /* then wider N, where a block covers 16, 32 or 64 columns (the last block partly; 32768: an LM
     * head's width, K kept small for the host's double product) */
    static const int wide[][2] = {{4100, 1024}, {8200, 100}, {16400, 1024}, {32768, 256}};
    const int nnk = 16, nsh = nnk + (int)(sizeof wide / sizeof *wide);
    for (int mi = 0; mi < (int)(sizeof Ms / sizeof *Ms); mi++) {
        int M = Ms[mi];
        skinny_tally t = {0};
        for (int sp = 0; sp < nsh; sp++) {
            int N = sp < nnk ? Ns[sp / 4] : wide[sp - nnk][0], K = sp < nnk ? Ks[sp % 4] : wide[sp - nnk][1];
            int s6 = (mi + sp) % 6; /* (accumulate, layout): over the Ms each N x K meets all six */
            skinny_case(f, &t, M, N, K, s6 & 1, s6 % 3);
        }
        char name[64];
        snprintf(name, sizeof name, "M%d (%d N x K, %s)", M, nsh, M <= SKINNY_MAX_ROWS ? "few-row kernel" : "cuBLAS");
        record(f, "op_linear few rows vs bf16 double", name, t.worst_ref, TOL_SKINNY);
        record(f, "op_linear few rows vs CPU", name, t.worst_cpu, TOL_GEMM);
        record(f, "op_linear few rows writes outside", name, (double)t.outside, 0.0);
        if (M <= SKINNY_MAX_ROWS) { /* cuBLAS may pick other kernels for the shadow's alignment */
            record(f, "op_linear few rows: shadow != fp32 w", name, (double)t.shadow_diff, 0.0);
            record(f, "op_linear few rows: batch != 1 row", name, (double)t.batch_diff, 0.0);
        }
    }
    END_TEST(f);
}

static void test_rmsnorm(void **state) {
    fixture *f = *state;
    f->fails = 0;
    struct {
        int rows, dim, ld, weighted, alias;
    } sh[] = {{37, 4096, 4100, 1, 0}, {16, 16384, 16384, 0, 0}, {9, 512, 512, 1, 1}, {6000, 1024, 1024, 1, 0}};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) { /* 6000 rows: dw over many chunks, the last partial */
        int rows = sh[s].rows, dim = sh[s].dim, ld = sh[s].ld;
        long n = (long)rows * ld;
        char name[64];
        snprintf(name, sizeof name, "rows%d dim%d ld%d w%d alias%d", rows, dim, ld, sh[s].weighted, sh[s].alias);
        float *x = hnew(n), *w = hnew(dim), *y = hnew(n);
        fill(f, x, n, -3, 3);
        fill(f, w, dim, 0.5f, 1.5f);
        memcpy(y, x, sizeof(float) * (size_t)n); /* padding keeps x's values on both sides */
        float *dx = up(x, n), *dw = up(w, dim), *dy = sh[s].alias ? dx : up(x, n);
        const float *wc = sh[s].weighted ? w : NULL, *wg = sh[s].weighted ? dw : NULL;
        /* backward first (it reads x before an aliased forward overwrites it) */
        float *g = hnew(n), *gx = hnew(n), *gw = hnew(dim);
        fill(f, g, n, -1, 1);
        fill(f, gx, n, -1, 1);
        fill(f, gw, dim, -1, 1);
        float *dg = up(g, n), *dgx = up(gx, n), *dgw = up(gw, dim);
        OK(op_rmsnorm_backward(&f->cpu, gx, sh[s].weighted ? gw : NULL, g, x, wc, rows, dim, ld, 1e-6f, ERR));
        OK(op_rmsnorm_backward(&f->gpu, dgx, sh[s].weighted ? dgw : NULL, dg, dx, wg, rows, dim, ld, 1e-6f, ERR));
        cmp(f, "op_rmsnorm_backward dx", name, dgx, gx, n, TOL_FP32);
        if (sh[s].weighted) cmp(f, "op_rmsnorm_backward dw", name, dgw, gw, dim, TOL_FP32);
        OK(op_rmsnorm(&f->cpu, y, sh[s].alias ? y : x, wc, rows, dim, ld, 1e-6f, ERR));
        OK(op_rmsnorm(&f->gpu, dy, dx, wg, rows, dim, ld, 1e-6f, ERR));
        cmp(f, "op_rmsnorm", name, dy, y, n, TOL_FP32);
        free(x), free(w), free(y), free(g), free(gx), free(gw);
        cuda_free(dx), cuda_free(dw), cuda_free(dg), cuda_free(dgx), cuda_free(dgw);
        if (!sh[s].alias) cuda_free(dy);
    }
    END_TEST(f);
}

static void test_embedding(void **state) {
    fixture *f = *state;
    f->fails = 0;
    int vocab = 32000, dim = 256, n = 300;
    float *table = hnew((long)vocab * dim), *out = hnew((long)n * dim);
    int32_t *ids = hnewi(n);
    fill(f, table, (long)vocab * dim, -1, 1);
    for (int t = 0; t < n; t++) ids[t] = (int32_t)rng_below(&f->r, t < 100 ? 8 : (uint64_t)vocab); /* repeats */
    float *dt = up(table, (long)vocab * dim), *dout = poison((long)n * dim);
    int32_t *did = upi(ids, n);
    OK(op_embedding(&f->cpu, out, table, ids, n, dim, vocab, ERR));
    OK(op_embedding(&f->gpu, dout, dt, did, n, dim, vocab, ERR));
    cmp(f, "op_embedding", "vocab32000 dim256 n300", dout, out, (long)n * dim, 0.0);
    /* a bad id is an error on both paths */
    int32_t bad[3] = {5, vocab, 7};
    int32_t *dbad = upi(bad, 3);
    mill_err e1, e2;
    int r1 = op_embedding(&f->cpu, out, table, bad, 3, dim, vocab, &e1);
    int r2 = op_embedding(&f->gpu, dout, dt, dbad, 3, dim, vocab, &e2);
    printf("  op_embedding bad id: cpu \"%s\" / gpu \"%s\"\n", r1 ? e1.msg : "ok", r2 ? e2.msg : "ok");
    record(f, "op_embedding bad id", "id 32000 at 1", (r1 && r2 && !strcmp(e1.msg, e2.msg)) ? 0.0 : 1.0, 0.0);
    /* backward: repeated ids collide */
    float *g = hnew((long)n * dim), *gt = hnew((long)vocab * dim);
    fill(f, g, (long)n * dim, -1, 1);
    fill(f, gt, (long)vocab * dim, -1, 1);
    float *dg = up(g, (long)n * dim), *dgt = up(gt, (long)vocab * dim);
    OK(op_embedding_backward(&f->cpu, gt, g, ids, n, dim, ERR));
    OK(op_embedding_backward(&f->gpu, dgt, dg, did, n, dim, ERR));
    cmp(f, "op_embedding_backward", "vocab32000 dim256 n300", dgt, gt, (long)vocab * dim, TOL_FP32);
    free(table), free(out), free(ids), free(g), free(gt);
    cuda_free(dt), cuda_free(dout), cuda_free(did), cuda_free(dbad), cuda_free(dg), cuda_free(dgt);
    END_TEST(f);
}

static void test_swiglu(void **state) {
    fixture *f = *state;
    f->fails = 0;
    long n = 300007;
    float L = 10.0f;
    float *g = hnew(n), *u = hnew(n), *h = hnew(n), *dh = hnew(n), *gg = hnew(n), *gu = hnew(n);
    fill(f, g, n, -15, 15); /* past the limit on both sides */
    fill(f, u, n, -15, 15);
    fill(f, dh, n, -1, 1);
    fill(f, gg, n, -1, 1);
    fill(f, gu, n, -1, 1);
    float *d_g = up(g, n), *d_u = up(u, n), *d_h = poison(n), *d_dh = up(dh, n), *d_gg = up(gg, n), *d_gu = up(gu, n);
    OK(op_swiglu_clamp(&f->cpu, h, g, u, n, L, ERR));
    OK(op_swiglu_clamp(&f->gpu, d_h, d_g, d_u, n, L, ERR));
    cmp(f, "op_swiglu_clamp", "n300007 L10", d_h, h, n, TOL_FP32);
    OK(op_swiglu_clamp_backward(&f->cpu, gg, gu, dh, g, u, n, L, ERR));
    OK(op_swiglu_clamp_backward(&f->gpu, d_gg, d_gu, d_dh, d_g, d_u, n, L, ERR));
    cmp(f, "op_swiglu_clamp_backward dg", "n300007 L10", d_gg, gg, n, TOL_FP32);
    cmp(f, "op_swiglu_clamp_backward du", "n300007 L10", d_gu, gu, n, TOL_FP32);
    free(g), free(u), free(h), free(dh), free(gg), free(gu);
    cuda_free(d_g), cuda_free(d_u), cuda_free(d_h), cuda_free(d_dh), cuda_free(d_gg), cuda_free(d_gu);
    END_TEST(f);
}

static void test_cross_entropy(void **state) {
    fixture *f = *state;
    f->fails = 0;
    int sh[][2] = {{64, 32000}, {37, 1000}};
    for (int s = 0; s < 2; s++) {
        int n = sh[s][0], V = sh[s][1];
        char name[64];
        snprintf(name, sizeof name, "n%d vocab%d", n, V);
        long nv = (long)n * V;
        float *l = hnew(nv), *d = hnew(nv);
        int32_t *y = hnewi(n);
        fill(f, l, nv, -8, 8);
        for (int t = 0; t < n; t++) y[t] = t % 5 == 3 ? -1 : (int32_t)rng_below(&f->r, (uint64_t)V);
        float *dl = up(l, nv), *dd = poison(nv);
        int32_t *dy = upi(y, n);
        double ls1 = 0, ls2 = 0;
        long c1 = 0, c2 = 0;
        OK(op_cross_entropy(&f->cpu, d, &ls1, &c1, l, y, n, V, 0.01f, ERR));
        OK(op_cross_entropy(&f->gpu, dd, &ls2, &c2, dl, dy, n, V, 0.01f, ERR));
        record(f, "op_cross_entropy loss_sum", name, fabs(ls2 - ls1) / fabs(ls1), 1e-9);
        record(f, "op_cross_entropy count", name, (double)labs(c2 - c1), 0.0);
        cmp(f, "op_cross_entropy dlogits", name, dd, d, nv, TOL_FP32);
        /* in place (dlogits aliases logits) */
        OK(op_cross_entropy(&f->gpu, dl, &ls2, &c2, dl, dy, n, V, 0.01f, ERR));
        cmp(f, "op_cross_entropy in place", name, dl, d, nv, TOL_FP32);
        free(l), free(d), free(y);
        cuda_free(dl), cuda_free(dd), cuda_free(dy);
    }
    END_TEST(f);
}

/* The token head over a vocabulary of V in one slice: the slice's numbers, then the join (parts:
 * [3 n] doubles in k's memory). */
static int head_logp(const kctx *k, float *l, float *lp, float *en, int32_t *rows, long *c, const int32_t *y, int n,
                     int V, float T, double *parts, mill_err *e) {
    if (op_token_logp_part(k, l, parts, y, n, V, 0, V, T, e)) return -1;
    return op_token_logp(k, l, lp, en, rows, c, parts, 1, y, n, V, V, T, e);
}

/* The token head (log-softmax at targets + entropy, in place -> probabilities) and its backward,
 * at two temperatures, with uncounted rows, whole and in three vocabulary slices joined (tensor
 * parallelism's path, all on the GPU, against the CPU's whole row); then a target >= vocab is an
 * error on both paths. */
static void test_token_logp(void **state) {
    fixture *f = *state;
    f->fails = 0;
    int sh[][2] = {{64, 32000}, {37, 1000}};
    float temps[] = {1.0f, 0.7f};
    for (int s = 0; s < 2; s++) {
        int n = sh[s][0], V = sh[s][1], S = 3;
        float temp = temps[s];
        char name[64];
        snprintf(name, sizeof name, "n%d vocab%d T%.1f", n, V, temp);
        long nv = (long)n * V;
        float *l = hnew(nv), *lp = hnew(n), *en = hnew(n), *dlp = hnew(n), *den = hnew(n);
        int32_t *y = hnewi(n), *rows = hnewi(n);
        double *parts = calloc(3 * (size_t)n, sizeof(double));
        fill(f, l, nv, -8, 8);
        for (int t = 0; t < n; t++) y[t] = t % 5 == 3 ? -1 : (int32_t)rng_below(&f->r, (uint64_t)V);
        float *dl = up(l, nv), *dlpd = poison(n), *dend = poison(n), *dparts = poison(6L * n * S);
        int32_t *dy = upi(y, n), *drows = upi(y, n);
        /* the slices' logits, each [n, vl], uploaded before the whole row turns into probabilities */
        float *dsl[3];
        int lo[4];
        for (int q = 0; q <= S; q++) lo[q] = V * q / S;
        for (int q = 0; q < S; q++) {
            int vl = lo[q + 1] - lo[q];
            float *h = hnew((long)n * vl);
            for (int t = 0; t < n; t++) memcpy(h + (long)t * vl, l + (long)t * V + lo[q], sizeof(float) * (size_t)vl);
            dsl[q] = up(h, (long)n * vl);
            free(h);
        }
        long c1 = 0, c2 = 0;
        OK(head_logp(&f->cpu, l, lp, en, rows, &c1, y, n, V, temp, parts, ERR));
        OK(head_logp(&f->gpu, dl, dlpd, dend, drows, &c2, dy, n, V, temp, (double *)dparts, ERR));
        record(f, "op_token_logp count", name, (double)labs(c2 - c1), 0.0);
        cmp(f, "op_token_logp logp", name, dlpd, lp, c1, TOL_FP32);
        cmp(f, "op_token_logp entropy", name, dend, en, c1, TOL_FP32);
        cmpi(f, "op_token_logp rows", name, drows, rows, c1);
        cmp(f, "op_token_logp probs", name, dl, l, nv, TOL_FP32);
        fill(f, dlp, c1, -1, 1);
        fill(f, den, c1, -1, 1);
        float *d_dlp = up(dlp, c1), *d_den = up(den, c1);
        float *probs = hnew(nv);
        memcpy(probs, l, sizeof(float) * (size_t)nv);
        OK(op_token_logp_backward(&f->cpu, l, rows, c1, dlp, den, en, y, n, V, 0, temp, ERR));
        OK(op_token_logp_backward(&f->gpu, dl, drows, c1, d_dlp, d_den, dend, dy, n, V, 0, temp, ERR));
        cmp(f, "op_token_logp_backward", name, dl, l, nv, TOL_FP32);
        /* three slices on the GPU: each slice's numbers, then each joins all three */
        for (int q = 0; q < S; q++)
            OK(op_token_logp_part(&f->gpu, dsl[q], (double *)dparts + 3L * n * q, dy, n, lo[q + 1] - lo[q], lo[q], V,
                                  temp, ERR));
        for (int q = 0; q < S; q++) {
            int vl = lo[q + 1] - lo[q];
            float *want = hnew((long)n * vl), *wantd = hnew((long)n * vl);
            for (int t = 0; t < n; t++) {
                memcpy(want + (long)t * vl, probs + (long)t * V + lo[q], sizeof(float) * (size_t)vl);
                memcpy(wantd + (long)t * vl, l + (long)t * V + lo[q], sizeof(float) * (size_t)vl);
            }
            OK(op_token_logp(&f->gpu, dsl[q], dlpd, dend, drows, &c2, (double *)dparts, S, dy, n, vl, V, temp, ERR));
            record(f, "op_token_logp slices count", name, (double)labs(c2 - c1), 0.0);
            cmp(f, "op_token_logp slices logp", name, dlpd, lp, c1, TOL_FP32);
            cmp(f, "op_token_logp slices entropy", name, dend, en, c1, TOL_FP32);
            cmp(f, "op_token_logp slices probs", name, dsl[q], want, (long)n * vl, TOL_FP32);
            OK(op_token_logp_backward(&f->gpu, dsl[q], drows, c1, d_dlp, d_den, dend, dy, n, vl, lo[q], temp, ERR));
            cmp(f, "op_token_logp_backward slices", name, dsl[q], wantd, (long)n * vl, TOL_FP32);
            free(want), free(wantd);
            cuda_free(dsl[q]);
        }
        if (s == 1) { /* a target past the vocabulary */
            y[5] = V;
            int32_t *dbad = upi(y, n);
            mill_err e1, e2;
            fill(f, l, nv, -8, 8);
            float *dl2 = up(l, nv);
            int r1 = head_logp(&f->cpu, l, lp, en, rows, &c1, y, n, V, temp, parts, &e1);
            int r2 = head_logp(&f->gpu, dl2, dlpd, dend, drows, &c2, dbad, n, V, temp, (double *)dparts, &e2);
            printf("  op_token_logp bad target: cpu \"%s\" / gpu \"%s\"\n", r1 ? e1.msg : "ok", r2 ? e2.msg : "ok");
            record(f, "op_token_logp bad target", name, (r1 && r2 && !strcmp(e1.msg, e2.msg)) ? 0.0 : 1.0, 0.0);
            cuda_free(dbad), cuda_free(dl2);
        }
        free(l), free(lp), free(en), free(dlp), free(den), free(y), free(rows), free(parts), free(probs);
        cuda_free(dl), cuda_free(dlpd), cuda_free(dend), cuda_free(dy), cuda_free(drows), cuda_free(d_dlp),
            cuda_free(d_den), cuda_free(dparts);
    }
    END_TEST(f);
}

/* The memory ops the model uses between other ops: copy, zero, host round trip, the stream
 * repeat and its backward (same summation order: exact), the int32 gather (exact; bad id). */
/* Expert parallelism's combine and its backward: the CPU's results (the same sums; FMA aside). */
static void test_moe_combine(void **state) {
    fixture *f = *state;
    f->fails = 0;
    int N = 300, K = 6, D = 257;
    long NK = (long)N * K;
    float *y = hnew(NK * D), *w = hnew(NK), *g = hnew((long)N * D), *out = hnew((long)N * D), *dy = hnew(NK * D),
          *dw = hnew(NK);
    fill(f, y, NK * D, -1, 1);
    fill(f, w, NK, 0, 1);
    fill(f, g, (long)N * D, -1, 1);
    float *dY = up(y, NK * D), *dW = up(w, NK), *dG = up(g, (long)N * D), *dout = poison((long)N * D),
          *ddy = poison(NK * D), *ddw = poison(NK);
    OK(op_moe_combine(&f->cpu, out, y, w, N, K, D, ERR));
    OK(op_moe_combine(&f->gpu, dout, dY, dW, N, K, D, ERR));
    cmp(f, "op_moe_combine", "N300 K6 D257", dout, out, (long)N * D, 1e-6);
    OK(op_moe_combine_backward(&f->cpu, dy, dw, g, y, w, N, K, D, ERR));
    OK(op_moe_combine_backward(&f->gpu, ddy, ddw, dG, dY, dW, N, K, D, ERR));
    cmp(f, "op_moe_combine_backward dy", "N300 K6 D257", ddy, dy, NK * D, 0.0);
    cmp(f, "op_moe_combine_backward dweights", "N300 K6 D257", ddw, dw, NK, 1e-5);
    free(y), free(w), free(g), free(out), free(dy), free(dw);
    cuda_free(dY), cuda_free(dW), cuda_free(dG), cuda_free(dout), cuda_free(ddy), cuda_free(ddw);
    END_TEST(f);
}

static void test_memory_ops(void **state) {
    fixture *f = *state;
    f->fails = 0;
    int rows = 300, reps = 4, dim = 257, tab = 1000, width = 6;
    long n = (long)rows * dim, nr = n * reps;
    float *x = hnew(n), *xr = hnew(nr), *g = hnew(nr), *acc = hnew(n), *back = hnew(n);
    fill(f, x, n, -1, 1);
    fill(f, g, nr, -1, 1);
    fill(f, acc, n, -1, 1);
    float *dx = up(x, n), *dxr = poison(nr), *dg = up(g, nr), *dacc = up(acc, n), *dc = poison(n);
    OK(op_copy(&f->gpu, dc, dx, sizeof(float) * (size_t)n, ERR));
    cmp(f, "op_copy", "n77100", dc, x, n, 0.0);
    OK(op_copy_to_host(&f->gpu, back, dc, sizeof(float) * (size_t)n, ERR));
    record(f, "op_copy_to_host", "n77100", rel_err(back, x, n), 0.0);
    OK(op_copy_from_host(&f->gpu, dc, acc, sizeof(float) * (size_t)n, ERR));
    cmp(f, "op_copy_from_host", "n77100", dc, acc, n, 0.0);
    /* a block of 100 columns of x's rows into columns 57.. of rows as wide (the tp pieces' interleave) */
    memcpy(back, acc, sizeof(float) * (size_t)n); /* acc stays: the repeat-rows backward accumulates into it */
    OK(op_copy_from_host(&f->gpu, dc, back, sizeof(float) * (size_t)n, ERR));
    OK(op_copy_2d(&f->cpu, back + 57, sizeof(float) * dim, x + 3, sizeof(float) * dim, sizeof(float) * 100, rows, ERR));
    OK(op_copy_2d(&f->gpu, dc + 57, sizeof(float) * dim, dx + 3, sizeof(float) * dim, sizeof(float) * 100, rows, ERR));
    cmp(f, "op_copy_2d", "rows300 width100", dc, back, n, 0.0);
    OK(op_zero(&f->gpu, dc, sizeof(float) * (size_t)n, ERR));
    fillv(back, n, 0.0f);
    cmp(f, "op_zero", "n77100", dc, back, n, 0.0);
    OK(op_repeat_rows(&f->cpu, xr, x, rows, reps, dim, ERR));
    OK(op_repeat_rows(&f->gpu, dxr, dx, rows, reps, dim, ERR));
    cmp(f, "op_repeat_rows", "rows300 reps4 dim257", dxr, xr, nr, 0.0);
    OK(op_repeat_rows_backward(&f->cpu, acc, g, rows, reps, dim, ERR));
    OK(op_repeat_rows_backward(&f->gpu, dacc, dg, rows, reps, dim, ERR));
    cmp(f, "op_repeat_rows_backward", "rows300 reps4 dim257", dacc, acc, n, 0.0);
    /* bf16 both ways (the pipeline's streams): the CPU's bits, NaN and infinities included */
    x[0] = NAN, x[1] = INFINITY, x[2] = -INFINITY, x[3] = 1.00390625f; /* a tie: rounds to even */
    uint16_t *hb = malloc(sizeof(uint16_t) * (size_t)n), *db = dnew(sizeof(uint16_t) * (size_t)n);
    uint16_t *gb = malloc(sizeof(uint16_t) * (size_t)n);
    float *hf = hnew(n), *gf = hnew(n);
    OK(op_copy_from_host(&f->gpu, dx, x, sizeof(float) * (size_t)n, ERR));
    OK(op_to_bf16(&f->cpu, hb, x, (size_t)n, ERR));
    OK(op_to_bf16(&f->gpu, db, dx, (size_t)n, ERR));
    down(gb, db, sizeof(uint16_t) * (size_t)n);
    record(f, "op_to_bf16", "n77100", memcmp(hb, gb, sizeof(uint16_t) * (size_t)n) ? 1.0 : 0.0, 0.0);
    OK(op_from_bf16(&f->cpu, hf, hb, (size_t)n, ERR));
    OK(op_from_bf16(&f->gpu, dc, db, (size_t)n, ERR));
    down(gf, dc, sizeof(float) * (size_t)n);
    record(f, "op_from_bf16", "n77100", memcmp(hf, gf, sizeof(float) * (size_t)n) ? 1.0 : 0.0, 0.0);
    free(hb), free(gb), free(hf), free(gf), cuda_free(db);
    int32_t *t = hnewi((long)tab * width), *ids = hnewi(rows), *o = hnewi((long)rows * width);
    for (long i = 0; i < (long)tab * width; i++) t[i] = (int32_t)rng_below(&f->r, 64);
    for (int i = 0; i < rows; i++) ids[i] = (int32_t)rng_below(&f->r, (uint64_t)tab);
    int32_t *dt = upi(t, (long)tab * width), *dids = upi(ids, rows), *dout = upi(o, (long)rows * width);
    OK(op_gather_i32(&f->cpu, o, t, ids, rows, width, tab, ERR));
    OK(op_gather_i32(&f->gpu, dout, dt, dids, rows, width, tab, ERR));
    cmpi(f, "op_gather_i32", "table1000x6 n300", dout, o, (long)rows * width);
    ids[7] = tab;
    int32_t *dbad = upi(ids, rows);
    mill_err e1, e2;
    int r1 = op_gather_i32(&f->cpu, o, t, ids, rows, width, tab, &e1);
    int r2 = op_gather_i32(&f->gpu, dout, dt, dbad, rows, width, tab, &e2);
    printf("  op_gather_i32 bad id: cpu \"%s\" / gpu \"%s\"\n", r1 ? e1.msg : "ok", r2 ? e2.msg : "ok");
    record(f, "op_gather_i32 bad id", "id 1000 at 7", (r1 && r2 && !strcmp(e1.msg, e2.msg)) ? 0.0 : 1.0, 0.0);
    free(x), free(xr), free(g), free(acc), free(back), free(t), free(ids), free(o);
    cuda_free(dx), cuda_free(dxr), cuda_free(dg), cuda_free(dacc), cuda_free(dc), cuda_free(dt), cuda_free(dids),
        cuda_free(dout), cuda_free(dbad);
    END_TEST(f);
}

static void test_rope(void **state) {
    fixture *f = *state;
    f->fails = 0;
    int n_tok = 50, n_vec = 16, dim = 512, rd = 64;
    long n = (long)n_tok * n_vec * dim;
    float inv[32];
    rope_inv_freq(inv, rd, 10000.0, 1, 16.0, 32.0, 1.0, 65536);
    int32_t pos[50];
    for (int t = 0; t < n_tok; t++) pos[t] = (int32_t)rng_below(&f->r, 70000);
    float *dinv = up(inv, rd / 2);
    int32_t *dpos = upi(pos, n_tok);
    for (int sign = -1; sign <= 1; sign += 2) {
        float *x = hnew(n);
        fill(f, x, n, -2, 2);
        float *dx = up(x, n);
        OK(op_rope(&f->cpu, x, n_tok, n_vec, dim, rd, pos, inv, sign, ERR));
        OK(op_rope(&f->gpu, dx, n_tok, n_vec, dim, rd, dpos, dinv, sign, ERR));
        cmp(f, "op_rope", sign > 0 ? "tok50 vec16 dim512 rope64 yarn +" : "tok50 vec16 dim512 rope64 yarn -", dx, x, n,
            TOL_FP32);
        free(x);
        cuda_free(dx);
    }
    cuda_free(dinv), cuda_free(dpos);
    END_TEST(f);
}

static void test_optim(void **state) {
    fixture *f = *state;
    f->fails = 0;
    long n = 1000003;
    float *p = hnew(n), *g = hnew(n), *m = hnew(n), *v = hnew(n);
    fill(f, p, n, -1, 1);
    fill(f, g, n, -0.1f, 0.1f);
    fill(f, m, n, -0.01f, 0.01f);
    fill(f, v, n, 0, 1e-4f);
    float *dp = up(p, n), *dg = up(g, n), *dm = up(m, n), *dv = up(v, n);
    adamw_hparams hp = {.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f,
                        .bias_c1 = 1.0f - powf(0.9f, 7), .bias_c2 = 1.0f - powf(0.95f, 7), .grad_scale = 0.37f};
    OK(op_adamw(&f->cpu, p, g, m, v, n, hp, ERR));
    OK(op_adamw(&f->gpu, dp, dg, dm, dv, n, hp, ERR));
    cmp(f, "op_adamw p", "n1000003", dp, p, n, TOL_FP32);
    cmp(f, "op_adamw m", "n1000003", dm, m, n, TOL_FP32);
    cmp(f, "op_adamw v", "n1000003", dv, v, n, TOL_FP32);
    double a1 = 1.5, a2 = 1.5;
    OK(op_sumsq(&f->cpu, g, n, &a1, ERR));
    OK(op_sumsq(&f->gpu, dg, n, &a2, ERR));
    record(f, "op_sumsq", "n1000003 (double sums)", fabs(a2 - a1) / fabs(a1), 1e-12);
    /* segments as the optimizer passes them (one per tensor): empty ones, one over several chunks,
     * out of order, one ending at n; the CPU must give the bits of a loop of op_sumsq calls */
    long off[] = {0, 17, 17, 300000, 5, 900000, 999000}, len[] = {17, 0, 200003, 1, 12, 99000, 1003};
    int nseg = (int)(sizeof off / sizeof off[0]);
    double l1 = 0.25, s1 = 0.25, s2 = 0.25;
    for (int i = 0; i < nseg; i++) OK(op_sumsq(&f->cpu, g + off[i], len[i], &l1, ERR));
    OK(op_sumsq_segments(&f->cpu, g, off, len, nseg, &s1, ERR));
    record(f, "op_sumsq_segments cpu = op_sumsq loop", "7 segments (bits)", l1 == s1 ? 0.0 : 1.0, 0.0);
    OK(op_sumsq_segments(&f->gpu, dg, off, len, nseg, &s2, ERR));
    record(f, "op_sumsq_segments", "7 segments (double sums)", fabs(s2 - s1) / fabs(s1), 1e-12);
    OK(op_scale(&f->cpu, p, n, 0.37f, ERR));
    OK(op_scale(&f->gpu, dp, n, 0.37f, ERR));
    cmp(f, "op_scale", "n1000003", dp, p, n, TOL_FP32);
    free(p), free(g), free(m), free(v);
    cuda_free(dp), cuda_free(dg), cuda_free(dm), cuda_free(dv);
    END_TEST(f);
}

/* ---- attention ---- */

/* Rounds x to bf16 values in place: the tensor-core kernels' operands, so their CPU reference sees
 * the same inputs and only the products' bf16 P / dS and fp32 sums differ. */
static void round_bf16(float *x, long n) {
    for (long i = 0; i < n; i++) x[i] = bf16_float(bf16_bits(x[i]));
}

/* Sink attention on both GPU paths: kctx.gemm_fp32 (the fp32 kernels, TOL_FP32 from the CPU) and the
 * default tensor-core kernels (bf16 operands; TOL_ATT_TC from the CPU on the same bf16-rounded
 * inputs). */
static void test_attention(void **state) {
    fixture *f = *state;
    f->fails = 0;
    for (int tc = 0; tc < 2; tc++) {
        const double tol = tc ? TOL_ATT_TC : TOL_FP32;
        const char *fw = tc ? "op_sink_attention tc" : "op_sink_attention";
        const char *bq = tc ? "op_sink_attention_backward tc dq" : "op_sink_attention_backward dq";
        const char *bkv = tc ? "op_sink_attention_backward tc dkv" : "op_sink_attention_backward dkv";
        const char *bc = tc ? "op_sink_attention_backward tc dcomp" : "op_sink_attention_backward dcomp";
        const char *bs = tc ? "op_sink_attention_backward tc dsinks" : "op_sink_attention_backward dsinks";
        f->gpu.attention_tc = tc;
        struct {
            int T, H, d, window, n_comp, Tc;
        } sh[] = {/* the tiled kernels: d 512 (shared memory over 48 KB), window only, partial head chunks */
                  {256, 8, 512, 128, 64, 64},
                  {160, 16, 512, 128, 0, 0},
                  {96, 4, 64, 16, 8, 24},
                  /* the training shape's CSA (n_comp 256 with holes) and HCA layers, T off the 32-key tile */
                  {300, 16, 128, 128, 256, 75},
                  {200, 16, 128, 128, 3, 3},
                  /* Flash's 64 heads (four head chunks), at d 128 and d 512; 20 heads: a part-empty chunk */
                  {150, 64, 128, 128, 40, 37},
                  {130, 64, 512, 128, 16, 32},
                  {70, 20, 128, 32, 5, 12},
                  /* 100 heads (a second chunk of 36) at d 96 (a partial instance of the tensor-core
                   * kernels); one and a few queries */
                  {90, 100, 96, 64, 20, 22},
                  {1, 64, 512, 128, 4, 2},
                  {5, 16, 64, 4, 3, 2},
                  /* d not a multiple of 4: the per-head kernels */
                  {50, 3, 30, 16, 4, 10}};
        for (int s = 0; s < (int)(sizeof sh / sizeof sh[0]); s++) {
            int T = sh[s].T, H = sh[s].H, d = sh[s].d, W = sh[s].window, nc = sh[s].n_comp, Tc = sh[s].Tc;
            long nq = (long)T * H * d;
            char name[64];
            snprintf(name, sizeof name, "T%d H%d d%d win%d comp%d/%d", T, H, d, W, nc, Tc);
            float scale = 1.0f / sqrtf((float)d);
            float *q = hnew(nq), *kv = hnew((long)T * d), *comp = hnew((long)(Tc ? Tc : 1) * d), *sinks = hnew(H);
            float *out = hnew(nq);
            int32_t *cidx = hnewi((long)T * (nc ? nc : 1));
            fill(f, q, nq, -2, 2);
            fill(f, kv, (long)T * d, -2, 2);
            fill(f, comp, (long)(Tc ? Tc : 1) * d, -2, 2);
            fill(f, sinks, H, -1, 1);
            for (long i = 0; i < (long)T * nc; i++) /* -1: holes */
                cidx[i] = (int32_t)rng_below(&f->r, (uint64_t)Tc + 1) - 1;
            if (tc) {
                round_bf16(q, nq);
                round_bf16(kv, (long)T * d);
                round_bf16(comp, (long)(Tc ? Tc : 1) * d);
            }
            float *dq = up(q, nq), *dkv = up(kv, (long)T * d), *dcomp = nc ? up(comp, (long)Tc * d) : NULL;
            float *dsinks = up(sinks, H), *dout = poison(nq);
            int32_t *dcidx = nc ? upi(cidx, (long)T * nc) : NULL;
            OK(op_sink_attention(&f->cpu, out, q, kv, nc ? comp : NULL, nc ? cidx : NULL, nc, sinks, T, 0, H, d, W, scale,
                                 ERR));
            OK(op_sink_attention(&f->gpu, dout, dq, dkv, dcomp, dcidx, nc, dsinks, T, 0, H, d, W, scale, ERR));
            cmp(f, fw, name, dout, out, nq, tol);
            /* backward: gradients accumulate onto random values */
            float *go = hnew(nq), *gq = hnew(nq), *gkv = hnew((long)T * d), *gc = hnew((long)(Tc ? Tc : 1) * d);
            float *gs = hnew(H);
            fill(f, go, nq, -1, 1);
            if (tc) round_bf16(go, nq);
            fill(f, gq, nq, -1, 1);
            fill(f, gkv, (long)T * d, -1, 1);
            fill(f, gc, (long)(Tc ? Tc : 1) * d, -1, 1);
            fill(f, gs, H, -1, 1);
            float *dgo = up(go, nq), *dgq = up(gq, nq), *dgkv = up(gkv, (long)T * d);
            float *dgc = nc ? up(gc, (long)Tc * d) : NULL, *dgs = up(gs, H);
            OK(op_sink_attention_backward(&f->cpu, gq, gkv, nc ? gc : NULL, gs, go, q, kv, nc ? comp : NULL,
                                          nc ? cidx : NULL, nc, sinks, T, 0, H, d, W, scale, ERR));
            OK(op_sink_attention_backward(&f->gpu, dgq, dgkv, dgc, dgs, dgo, dq, dkv, dcomp, dcidx, nc, dsinks, T, 0, H, d,
                                          W, scale, ERR));
            cmp(f, bq, name, dgq, gq, nq, tol);
            cmp(f, bkv, name, dgkv, gkv, (long)T * d, tol);
            if (nc) cmp(f, bc, name, dgc, gc, (long)Tc * d, tol);
            cmp(f, bs, name, dgs, gs, H, tol);
            /* a slice of the queries, rows [a, b) at positions q0 = a (context parallelism), against the
             * whole sequence's keys; kv rows from b on are NaN, so a read past q0 + T shows */
            int a = T / 3, b = a + (T - a + 1) / 2, Ts = b - a; /* 1 <= Ts, b <= T for any T >= 1 */
            long at = (long)a * H * d, ns = (long)Ts * H * d;
            char sname[96];
            snprintf(sname, sizeof sname, "%s rows %d..%d", name, a, b);
            float *kvs = hnew((long)T * d);
            memcpy(kvs, kv, sizeof(float) * (size_t)T * d);
            fillv(kvs + (long)b * d, (long)(T - b) * d, NAN);
            float *dkvs = up(kvs, (long)T * d), *dsout = poison(ns);
            const int32_t *sidx = nc ? cidx + (long)a * nc : NULL, *dsidx = nc ? dcidx + (long)a * nc : NULL;
            OK(op_sink_attention(&f->cpu, out, q + at, kvs, nc ? comp : NULL, sidx, nc, sinks, Ts, a, H, d, W, scale, ERR));
            OK(op_sink_attention(&f->gpu, dsout, dq + at, dkvs, dcomp, dsidx, nc, dsinks, Ts, a, H, d, W, scale, ERR));
            cmp(f, fw, sname, dsout, out, ns, tol);
            /* both sides accumulate onto the CPU's gradients so far */
            float *sgq = up(gq, nq), *sgkv = up(gkv, (long)T * d), *sgc = nc ? up(gc, (long)Tc * d) : NULL;
            float *sgs = up(gs, H);
            OK(op_sink_attention_backward(&f->cpu, gq + at, gkv, nc ? gc : NULL, gs, go + at, q + at, kvs, nc ? comp : NULL,
                                          sidx, nc, sinks, Ts, a, H, d, W, scale, ERR));
            OK(op_sink_attention_backward(&f->gpu, sgq + at, sgkv, sgc, sgs, dgo + at, dq + at, dkvs, dcomp, dsidx, nc,
                                          dsinks, Ts, a, H, d, W, scale, ERR));
            cmp(f, bq, sname, sgq + at, gq + at, ns, tol);
            cmp(f, bkv, sname, sgkv, gkv, (long)b * d, tol);
            if (nc) cmp(f, bc, sname, sgc, gc, (long)Tc * d, tol);
            cmp(f, bs, sname, sgs, gs, H, tol);
            free(kvs);
            cuda_free(dkvs), cuda_free(dsout), cuda_free(sgq), cuda_free(sgkv), cuda_free(sgc), cuda_free(sgs);
            free(q), free(kv), free(comp), free(sinks), free(out), free(cidx), free(go), free(gq), free(gkv), free(gc),
                free(gs);
            cuda_free(dq), cuda_free(dkv), cuda_free(dcomp), cuda_free(dsinks), cuda_free(dout), cuda_free(dcidx);
            cuda_free(dgo), cuda_free(dgq), cuda_free(dgkv), cuda_free(dgc), cuda_free(dgs);
        }
    }
    f->gpu.attention_tc = 0;
    END_TEST(f);
}

static void test_compress_pool(void **state) {
    fixture *f = *state;
    f->fails = 0;
    int sh[][4] = {{512, 512, 4, 1}, {512, 512, 128, 0}, {100, 64, 4, 0}, {36, 32, 8, 1}}; /* T, d, ratio, overlap */
    for (int s = 0; s < 4; s++) {
        int T = sh[s][0], d = sh[s][1], ratio = sh[s][2], ov = sh[s][3], width = ov ? 2 * d : d, n_win = T / ratio;
        char name[64];
        snprintf(name, sizeof name, "T%d d%d ratio%d overlap%d", T, d, ratio, ov);
        long na = (long)T * width;
        float *a = hnew(na), *g = hnew(na), *ape = hnew((long)ratio * width), *out = hnew((long)n_win * d);
        fill(f, a, na, -2, 2);
        fill(f, g, na, -3, 3);
        fill(f, ape, (long)ratio * width, -1, 1);
        float *da = up(a, na), *dg = up(g, na), *dape = up(ape, (long)ratio * width), *dout = poison((long)n_win * d);
        OK(op_compress_pool(&f->cpu, out, a, g, ape, T, d, ratio, ov, ERR));
        OK(op_compress_pool(&f->gpu, dout, da, dg, dape, T, d, ratio, ov, ERR));
        cmp(f, "op_compress_pool", name, dout, out, (long)n_win * d, TOL_FP32);
        float *go = hnew((long)n_win * d), *ga = hnew(na), *gg = hnew(na), *gape = hnew((long)ratio * width);
        fill(f, go, (long)n_win * d, -1, 1);
        fill(f, ga, na, -1, 1);
        fill(f, gg, na, -1, 1);
        fill(f, gape, (long)ratio * width, -1, 1);
        float *dgo = up(go, (long)n_win * d), *dga = up(ga, na), *dgg = up(gg, na), *dgape = up(gape, (long)ratio * width);
        OK(op_compress_pool_backward(&f->cpu, ga, gg, gape, go, a, g, ape, T, d, ratio, ov, ERR));
        OK(op_compress_pool_backward(&f->gpu, dga, dgg, dgape, dgo, da, dg, dape, T, d, ratio, ov, ERR));
        cmp(f, "op_compress_pool_backward da", name, dga, ga, na, TOL_FP32);
        cmp(f, "op_compress_pool_backward dg", name, dgg, gg, na, TOL_FP32);
        cmp(f, "op_compress_pool_backward dape", name, dgape, gape, (long)ratio * width, TOL_FP32);
        free(a), free(g), free(ape), free(out), free(go), free(ga), free(gg), free(gape);
        cuda_free(da), cuda_free(dg), cuda_free(dape), cuda_free(dout), cuda_free(dgo), cuda_free(dga), cuda_free(dgg),
            cuda_free(dgape);
    }
    END_TEST(f);
}

static void test_indexer_topk(void **state) {
    fixture *f = *state;
    f->fails = 0;
    int sh[][5] = {{256, 64, 64, 128, 4}, {300, 75, 8, 32, 4}}; /* T, Tc, nh, hd, ratio */
    for (int s = 0; s < 2; s++) {
        int T = sh[s][0], Tc = sh[s][1], nh = sh[s][2], hd = sh[s][3], ratio = sh[s][4];
        char name[64];
        snprintf(name, sizeof name, "T%d Tc%d nh%d hd%d ratio%d", T, Tc, nh, hd, ratio);
        float *q = hnew((long)T * nh * hd), *keys = hnew((long)Tc * hd), *wts = hnew((long)T * nh);
        float *sc = hnew((long)T * Tc);
        fill(f, q, (long)T * nh * hd, -1, 1);
        fill(f, keys, (long)Tc * hd, -1, 1);
        fill(f, wts, (long)T * nh, -0.5f, 1);
        float *dq = up(q, (long)T * nh * hd), *dk = up(keys, (long)Tc * hd), *dw = up(wts, (long)T * nh);
        float *dsc = poison((long)T * Tc);
        float sqk = 1.0f / sqrtf((float)hd);
        OK(op_indexer_scores(&f->cpu, sc, q, keys, wts, T, 0, Tc, nh, hd, sqk, ratio, ERR));
        OK(op_indexer_scores(&f->gpu, dsc, dq, dk, dw, T, 0, Tc, nh, hd, sqk, ratio, ERR));
        cmp(f, "op_indexer_scores", name, dsc, sc, (long)T * Tc, TOL_FP32);
        /* top-k on one score array for both (integer outputs must match exactly); quantised copies
         * force many ties, which must go to the lower index */
        for (int tie = 0; tie < 2; tie++) {
            if (tie)
                for (long i = 0; i < (long)T * Tc; i++)
                    if (isfinite(sc[i])) sc[i] = roundf(sc[i] * 2.0f) / 2.0f;
            float *dsc2 = up(sc, (long)T * Tc);
            int topks[] = {16, 40, 512};
            for (int kk = 0; kk < 3; kk++) {
                int topk = topks[kk];
                char nm[96];
                snprintf(nm, sizeof nm, "%s topk%d%s", name, topk, tie ? " ties" : "");
                int32_t *idx = hnewi((long)T * topk), *didx = upi(idx, (long)T * topk);
                OK(op_topk_visible(&f->cpu, idx, sc, T, 0, Tc, topk, ratio, ERR));
                OK(op_topk_visible(&f->gpu, didx, dsc2, T, 0, Tc, topk, ratio, ERR));
                cmpi(f, "op_topk_visible", nm, didx, idx, (long)T * topk);
                free(idx);
                cuda_free(didx);
            }
            cuda_free(dsc2);
        }
        int32_t *ce = hnewi((long)T * Tc), *dce = upi(ce, (long)T * Tc);
        OK(op_causal_entries(&f->cpu, ce, T, 0, Tc, ratio, ERR));
        OK(op_causal_entries(&f->gpu, dce, T, 0, Tc, ratio, ERR));
        cmpi(f, "op_causal_entries", name, dce, ce, (long)T * Tc);
        /* a slice of the queries, rows [a, b) at positions q0 = a, over the whole sequence's entries */
        int a = T / 3 + 1, b = a + (T - a) / 2 + 1, Ts = b - a, topk = 16;
        char sname[128];
        snprintf(sname, sizeof sname, "%s rows %d..%d", name, a, b);
        float *ssc = hnew((long)Ts * Tc), *dssc = poison((long)Ts * Tc);
        OK(op_indexer_scores(&f->cpu, ssc, q + (long)a * nh * hd, keys, wts + (long)a * nh, Ts, a, Tc, nh, hd, sqk,
                             ratio, ERR));
        OK(op_indexer_scores(&f->gpu, dssc, dq + (long)a * nh * hd, dk, dw + (long)a * nh, Ts, a, Tc, nh, hd, sqk,
                             ratio, ERR));
        cmp(f, "op_indexer_scores", sname, dssc, ssc, (long)Ts * Tc, TOL_FP32);
        float *dssc2 = up(ssc, (long)Ts * Tc); /* one score array for both, as above */
        int32_t *sidx = hnewi((long)Ts * topk), *dsidx = upi(sidx, (long)Ts * topk);
        OK(op_topk_visible(&f->cpu, sidx, ssc, Ts, a, Tc, topk, ratio, ERR));
        OK(op_topk_visible(&f->gpu, dsidx, dssc2, Ts, a, Tc, topk, ratio, ERR));
        snprintf(sname, sizeof sname, "%s rows %d..%d topk%d", name, a, b, topk);
        cmpi(f, "op_topk_visible", sname, dsidx, sidx, (long)Ts * topk);
        OK(op_causal_entries(&f->cpu, ce, Ts, a, Tc, ratio, ERR));
        OK(op_causal_entries(&f->gpu, dce, Ts, a, Tc, ratio, ERR));
        snprintf(sname, sizeof sname, "%s rows %d..%d", name, a, b);
        cmpi(f, "op_causal_entries", sname, dce, ce, (long)Ts * Tc);
        free(ssc), free(sidx);
        cuda_free(dssc), cuda_free(dssc2), cuda_free(dsidx);
        free(q), free(keys), free(wts), free(sc), free(ce);
        cuda_free(dq), cuda_free(dk), cuda_free(dw), cuda_free(dsc), cuda_free(dce);
    }
    END_TEST(f);
}

/* ---- the cached engine's wave ops ----
 * S sequences of different lengths, joining at different waves (so a wave mixes positions), fed
 * on CPU caches and on GPU caches side by side; each wave's attention output and indexer
 * selection are compared, and at the end every cache array. The two sides' indexer scores differ
 * in the last bits, so a selection may differ where two entries' scores are a near tie (within
 * 1e-5 relative on the CPU); such a wave's attention is not compared, and the count is printed. */

typedef struct {
    float *block;         /* one allocation (host or device) */
    attn_layer_cache lc;  /* pointers into block */
} cache_seq;

static size_t cache_seq_floats(int W, int d, int ratio, int csa, int ih, int maxT) {
    size_t f = (size_t)W * d, width = csa ? 2 * d : d, iw = 2 * ih;
    if (ratio) f += (size_t)ratio * width * (csa ? 4 : 2) + (size_t)(maxT / ratio + 1) * d;
    if (csa) f += (size_t)ratio * iw * 4 + (size_t)(maxT / ratio + 1) * ih;
    return f;
}
static void cache_comp_at(attn_comp_cache *cc, float **p, int ratio, int width, int dim, int maxT, int overlap) {
    cc->cur_a = *p, *p += (long)ratio * width;
    cc->cur_g = *p, *p += (long)ratio * width;
    if (overlap) cc->prev_a = *p, *p += (long)ratio * width, cc->prev_g = *p, *p += (long)ratio * width;
    cc->entries = *p, *p += (long)(maxT / ratio + 1) * dim;
}
static void cache_layout(attn_layer_cache *lc, float *block, int W, int d, int ratio, int csa, int ih, int maxT) {
    memset(lc, 0, sizeof *lc);
    float *p = block;
    lc->ring = p, p += (long)W * d;
    if (ratio) cache_comp_at(&lc->comp, &p, ratio, csa ? 2 * d : d, d, maxT, csa);
    if (csa) cache_comp_at(&lc->index, &p, ratio, 2 * ih, ih, maxT, 1);
}

static void test_cache_ops(void **state) {
    fixture *f = *state;
    f->fails = 0;
    struct {
        int d, H, W, ratio, ih, nh, topk, rope, P;
    } sh[] = {{64, 4, 8, 4, 32, 4, 4, 16, 70}, {512, 16, 128, 128, 0, 0, 0, 64, 300}, {96, 4, 16, 0, 0, 0, 0, 32, 40}};
    enum { S = 5 };
    for (int si = 0; si < 3; si++) {
        int d = sh[si].d, H = sh[si].H, W = sh[si].W, ratio = sh[si].ratio, ih = sh[si].ih, nh = sh[si].nh;
        int topk = sh[si].topk, rd = sh[si].rope, P = sh[si].P, csa = ratio == 4, width = csa ? 2 * d : d;
        int maxT = P, me = ratio ? maxT / ratio + 1 : 0;
        char name[64];
        snprintf(name, sizeof name, "d%d H%d win%d ratio%d%s", d, H, W, ratio, csa ? " csa" : "");
        size_t nf = cache_seq_floats(W, d, ratio, csa, ih, maxT);
        cache_seq hs[S], ds[S];
        attn_layer_cache hl[S], dl[S];
        attn_layer_cache *hptr[S], *dptr[S], *dlay[S];
        int len[S], start[S];
        for (int i = 0; i < S; i++) {
            len[i] = P - 13 * i;
            start[i] = 3 * i; /* wave p holds position p - start[i] of sequence i */
            hs[i].block = hnew((long)nf);
            fillv(hs[i].block, (long)nf, 0);
            ds[i].block = up(hs[i].block, (long)nf);
            cache_layout(&hl[i], hs[i].block, W, d, ratio, csa, ih, maxT);
            cache_layout(&dl[i], ds[i].block, W, d, ratio, csa, ih, maxT);
            hptr[i] = &hl[i];
            dlay[i] = dnew(sizeof(attn_layer_cache));
            mill_err e;
            if (cuda_copy_to_device(dlay[i], &dl[i], sizeof dl[i], &e)) fail_msg("%s", e.msg);
            dptr[i] = dlay[i];
        }
        float *inv = hnew(rd / 2 > 0 ? rd / 2 : 1), *sinks = hnew(H), *cape = hnew((long)(ratio ? ratio : 1) * width);
        float *cnorm = hnew(d), *iape = hnew((long)(csa ? ratio : 1) * 2 * (ih ? ih : 1)), *inorm = hnew(ih ? ih : 1);
        rope_inv_freq(inv, rd, 10000.0, 0, 1, 1, 1, 1);
        fill(f, sinks, H, -1, 1);
        fill(f, cape, (long)(ratio ? ratio : 1) * width, -1, 1);
        fill(f, cnorm, d, 0.5f, 1.5f);
        fill(f, iape, (long)(csa ? ratio : 1) * 2 * (ih ? ih : 1), -1, 1);
        fill(f, inorm, ih ? ih : 1, 0.5f, 1.5f);
        float *dinv = up(inv, rd / 2 > 0 ? rd / 2 : 1), *dsinks = up(sinks, H);
        float *dcape = up(cape, (long)(ratio ? ratio : 1) * width), *dcnorm = up(cnorm, d);
        float *diape = up(iape, (long)(csa ? ratio : 1) * 2 * (ih ? ih : 1)), *dinorm = up(inorm, ih ? ih : 1);
        double worst_att = 0.0;
        long sel_diff = 0, tie_waves = 0;
        for (int p = 0; p < P + 3 * S; p++) {
            int32_t row[S], pos[S];
            attn_layer_cache *hseq[S], *dseq_h[S];
            int n = 0;
            for (int i = S - 1; i >= 0; i--) /* rows in reverse: row != wave index */
                if (p >= start[i] && p - start[i] < len[i]) {
                    row[n] = n, pos[n] = p - start[i], hseq[n] = hptr[i], dseq_h[n] = dptr[i];
                    n++;
                }
            if (!n) continue;
            for (int j = 0; j < n; j++) row[j] = n - 1 - j;
            float *kv = hnew((long)n * d), *q = hnew((long)n * H * d), *ca = hnew((long)n * width), *cg = hnew((long)n * width);
            float *ia = hnew((long)n * 2 * (ih ? ih : 1)), *ig = hnew((long)n * 2 * (ih ? ih : 1));
            float *iq = hnew((long)n * (nh ? nh : 1) * (ih ? ih : 1)), *iw = hnew((long)n * (nh ? nh : 1));
            float *out = hnew((long)n * H * d), *score = hnew((long)n * (me ? me : 1));
            int32_t *sel = hnewi((long)n * (topk ? topk : 1));
            fill(f, kv, (long)n * d, -2, 2), fill(f, q, (long)n * H * d, -1, 1);
            fill(f, ca, (long)n * width, -2, 2), fill(f, cg, (long)n * width, -3, 3);
            fill(f, ia, (long)n * 2 * (ih ? ih : 1), -2, 2), fill(f, ig, (long)n * 2 * (ih ? ih : 1), -3, 3);
            fill(f, iq, (long)n * (nh ? nh : 1) * (ih ? ih : 1), -1, 1), fill(f, iw, (long)n * (nh ? nh : 1), -0.5f, 1);
            int32_t *drow = upi(row, n), *dpos = upi(pos, n);
            void *dseq = dnew(sizeof(void *) * S);
            mill_err e;
            if (cuda_copy_to_device(dseq, dseq_h, sizeof(void *) * (size_t)n, &e)) fail_msg("%s", e.msg);
            attn_wave hw = {n, row, pos, hseq}, dw = {n, drow, dpos, (attn_layer_cache *const *)dseq};
            float *dkv = up(kv, (long)n * d), *dq = up(q, (long)n * H * d), *dca = up(ca, (long)n * width);
            float *dcg = up(cg, (long)n * width), *dia = up(ia, (long)n * 2 * (ih ? ih : 1));
            float *dig = up(ig, (long)n * 2 * (ih ? ih : 1)), *diq = up(iq, (long)n * (nh ? nh : 1) * (ih ? ih : 1));
            float *diw = up(iw, (long)n * (nh ? nh : 1)), *dout = poison((long)n * H * d), *dscore = poison((long)n * (me ? me : 1));
            int32_t *dsel = upi(sel, (long)n * (topk ? topk : 1));
            float scale = 1.0f / sqrtf((float)d), sqk = ih ? 1.0f / sqrtf((float)ih) : 1.0f;
            const kctx *ks[2] = {&f->cpu, &f->gpu};
            for (int g = 0; g < 2; g++) {
                const kctx *k = ks[g];
                attn_wave w = g ? dw : hw;
                OK(op_cache_push_kv(k, w, 0, g ? dkv : kv, d, W, ERR));
                if (ratio)
                    OK(op_cache_push_comp(k, w, 0, 0, g ? dca : ca, g ? dcg : cg, g ? dcape : cape, g ? dcnorm : cnorm,
                                          g ? dinv : inv, ratio, d, csa, rd, 1e-6f, ERR));
                if (csa) {
                    OK(op_cache_push_comp(k, w, 0, 1, g ? dia : ia, g ? dig : ig, g ? diape : iape, g ? dinorm : inorm,
                                          g ? dinv : inv, ratio, ih, 1, rd, 1e-6f, ERR));
                    OK(op_cache_index_topk(k, g ? dsel : sel, g ? dscore : score, w, 0, g ? diq : iq, g ? diw : iw, nh,
                                           ih, sqk, ratio, me, topk, ERR));
                }
                OK(op_cache_attend(k, g ? dout : out, g ? dq : q, w, 0, csa ? (g ? dsel : sel) : NULL, topk, ratio, me,
                                   g ? dsinks : sinks, H, d, W, scale, ERR));
            }
            int tie = 0;
            if (csa) {
                int32_t *hsel = hnewi((long)n * topk);
                down(hsel, dsel, sizeof(int32_t) * (size_t)n * topk);
                for (int j = 0; j < n; j++) {
                    const float *sc = score + (long)j * me;
                    float kth = 0; /* the CPU's last selected score: a flip within 1e-5 of it is a tie */
                    for (int c = 0; c < topk; c++)
                        if (sel[(long)j * topk + c] >= 0) kth = sc[sel[(long)j * topk + c]];
                    for (int c = 0; c < topk; c++) {
                        int32_t a = hsel[(long)j * topk + c], b = sel[(long)j * topk + c];
                        if (a == b) continue;
                        int near = a >= 0 && b >= 0 && fabsf(sc[a] - kth) <= 1e-5f * fabsf(kth) &&
                                   fabsf(sc[b] - kth) <= 1e-5f * fabsf(kth);
                        if (near) tie = 1;
                        else sel_diff++;
                    }
                }
                free(hsel);
            }
            tie_waves += tie;
            float *hout = hnew((long)n * H * d);
            down(hout, dout, sizeof(float) * (size_t)n * H * d);
            double err = rel_err(hout, out, (long)n * H * d);
            if (!tie && !(err <= worst_att)) worst_att = err;
            free(hout), free(kv), free(q), free(ca), free(cg), free(ia), free(ig), free(iq), free(iw), free(out);
            free(score), free(sel);
            cuda_free(drow), cuda_free(dpos), cuda_free(dseq), cuda_free(dkv), cuda_free(dq), cuda_free(dca);
            cuda_free(dcg), cuda_free(dia), cuda_free(dig), cuda_free(diq), cuda_free(diw), cuda_free(dout);
            cuda_free(dscore), cuda_free(dsel);
        }
        record(f, "op_cache_attend (worst wave)", name, worst_att, TOL_FP32);
        if (csa) {
            record(f, "op_cache_index_topk sel", name, (double)sel_diff, 0.0);
            printf("  (%ld waves with a near-tie selection flip, their attention not compared)\n", tie_waves);
        }
        for (int i = 0; i < S; i++) /* ring, windows and entries, all sequences */
            cmp(f, "op_cache_push_kv/_comp caches", name, ds[i].block, hs[i].block, (long)nf, TOL_FP32);
        for (int i = 0; i < S; i++) {
            free(hs[i].block);
            cuda_free(ds[i].block), cuda_free(dlay[i]);
        }
        free(inv), free(sinks), free(cape), free(cnorm), free(iape), free(inorm);
        cuda_free(dinv), cuda_free(dsinks), cuda_free(dcape), cuda_free(dcnorm), cuda_free(diape), cuda_free(dinorm);
    }
    END_TEST(f);
}

/* ---- hyper-connections ---- */

/* Replays op_hc_pre and op_hc_head captured in a CUDA graph (outputs poisoned first) and counts
 * the elements whose bits differ from the op-by-op run's (ref_*: device buffers it wrote). */
static long hc_graph_diff(fixture *f, float *x, float *pre, float *post, float *comb, float *xh, const float *h,
                          const float *fn, const float *base, const float *scale, int N, hc_dims dm, float *work,
                          const float *ref_x, const float *ref_pre, const float *ref_post, const float *ref_comb,
                          const float *ref_xh) {
    int n = dm.n, D = dm.D;
    long sz[5] = {(long)N * D, (long)N * n, (long)N * n, (long)N * n * n, (long)N * D};
    float *out[5] = {x, pre, post, comb, xh};
    const float *ref[5] = {ref_x, ref_pre, ref_post, ref_comb, ref_xh};
    mill_err e = {{0}};
    void *g = NULL;
    if (kctx_graph_begin(&f->gpu, &e)) fail_msg("%s", e.msg);
    int rc = op_hc_pre(&f->gpu, x, pre, post, comb, h, fn, base, scale, N, dm, work, &e);
    if (!rc) rc = op_hc_head(&f->gpu, xh, h, fn, base, scale, N, dm, work, &e);
    mill_err e2 = {{0}};
    int rc2 = kctx_graph_end(&f->gpu, &g, &e2); /* ends the capture even when an op failed inside it */
    if (rc) fail_msg("captured op: %s", e.msg);
    if (rc2) fail_msg("%s", e2.msg);
    for (int i = 0; i < 5; i++) repoison(out[i], sz[i]);
    if (kctx_graph_launch(&f->gpu, g, &e)) fail_msg("%s", e.msg);
    long diff = 0;
    for (int i = 0; i < 5; i++) {
        float *a = hnew(sz[i]), *b = hnew(sz[i]);
        down(a, out[i], sizeof(float) * (size_t)sz[i]);
        down(b, ref[i], sizeof(float) * (size_t)sz[i]);
        for (long j = 0; j < sz[i]; j++) diff += memcmp(&a[j], &b[j], sizeof(float)) != 0;
        free(a), free(b);
    }
    kctx_graph_free(g);
    return diff;
}

/* Batch invariance of the fused path: the first m tokens run alone (a block per token) give the
 * same bits as in the N-token call (a block per HC_FUSED_TOK tokens); returns differing floats. */
static long hc_prefix_diff(fixture *f, int m, const float *h, const float *fn, const float *base, const float *scale,
                           hc_dims dm, float *work, const float *ref_x, const float *ref_pre, const float *ref_post,
                           const float *ref_comb) {
    int n = dm.n, D = dm.D;
    long sz[4] = {(long)m * D, (long)m * n, (long)m * n, (long)m * n * n};
    float *out[4] = {poison(sz[0]), poison(sz[1]), poison(sz[2]), poison(sz[3])};
    const float *ref[4] = {ref_x, ref_pre, ref_post, ref_comb};
    mill_err e = {{0}};
    if (op_hc_pre(&f->gpu, out[0], out[1], out[2], out[3], h, fn, base, scale, m, dm, work, &e)) fail_msg("%s", e.msg);
    long diff = 0;
    for (int i = 0; i < 4; i++) {
        float *a = hnew(sz[i]), *b = hnew(sz[i]);
        down(a, out[i], sizeof(float) * (size_t)sz[i]);
        down(b, ref[i], sizeof(float) * (size_t)sz[i]);
        for (long j = 0; j < sz[i]; j++) diff += memcmp(&a[j], &b[j], sizeof(float)) != 0;
        free(a), free(b);
        cuda_free(out[i]);
    }
    return diff;
}

static void test_hc(void **state) {
    fixture *f = *state;
    f->fails = 0;
    /* n <= 4 takes the fused one-kernel path of op_hc_pre / op_hc_head (a block per token up to
     * CUDA_HC_FUSED_ONE_TOKEN_MAX tokens, per 4 tokens past it, N not a multiple of 4 included),
     * larger n the general one: decode-like N 1, 7, 64 and the threshold itself at the DSV4-small
     * width (n 4, D 1024), one past it; hc_mult 3 as tiny-b, n*D not a multiple of the block (300)
     * or below it (192, 64); N 1024: dfn's product split over tokens too; n 5: the general path. */
    struct {
        int N, n, D;
    } sh[] = {{1, 4, 1024},   {7, 4, 1024}, {64, 4, 1024}, {CUDA_HC_FUSED_ONE_TOKEN_MAX, 4, 1024},
              {CUDA_HC_FUSED_ONE_TOKEN_MAX + 1, 4, 1024},      {64, 4, 4096}, {7, 4, 256},   {1024, 4, 256},
              {5, 3, 1024},   {300, 3, 1024}, {9, 3, 100},  {3, 2, 96},    {2, 1, 64},
              {300, 5, 64}};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        hc_dims dm = {sh[s].n, sh[s].D, 20, 1e-6f, 1e-6f};
        int N = sh[s].N, n = dm.n, D = dm.D, mix = (2 + n) * n, nn = n * n;
        int fused = n <= CUDA_HC_FUSED_MAX_STREAMS;
        long nh = (long)N * n * D;
        char name[64];
        snprintf(name, sizeof name, "N%d n%d D%d sinkhorn%d %s", N, n, D, dm.sinkhorn_iters,
                 fused ? "fused" : "general");
        float *h = hnew(nh), *fn = hnew((long)mix * n * D), *base = hnew(mix), *scale = hnew(3);
        fill(f, h, nh, -2, 2);
        fill(f, fn, (long)mix * n * D, -0.05f, 0.05f);
        fill(f, base, mix, -1, 1);
        fill(f, scale, 3, 0.5f, 1.5f);
        long wn = hc_backward_work_floats(N, dm);
        float *work = hnew(wn), *dwork = dnew(sizeof(float) * (size_t)wn);
        float *x = hnew((long)N * D), *pre = hnew((long)N * n), *post = hnew((long)N * n), *comb = hnew((long)N * nn);
        float *d_h = up(h, nh), *d_fn = up(fn, (long)mix * n * D), *d_base = up(base, mix), *d_scale = up(scale, 3);
        float *d_x = poison((long)N * D), *d_pre = poison((long)N * n), *d_post = poison((long)N * n);
        float *d_comb = poison((long)N * nn);
        OK(op_hc_pre(&f->cpu, x, pre, post, comb, h, fn, base, scale, N, dm, work, ERR));
        OK(op_hc_pre(&f->gpu, d_x, d_pre, d_post, d_comb, d_h, d_fn, d_base, d_scale, N, dm, dwork, ERR));
        cmp(f, "op_hc_pre x", name, d_x, x, (long)N * D, TOL_HC);
        cmp(f, "op_hc_pre pre", name, d_pre, pre, (long)N * n, TOL_HC);
        cmp(f, "op_hc_pre post", name, d_post, post, (long)N * n, TOL_HC);
        cmp(f, "op_hc_pre comb", name, d_comb, comb, (long)N * nn, TOL_HC);
        /* the logits f stay in work after the normed rows on both paths */
        cmp(f, "op_hc_pre f (work)", name, dwork + nh, work + nh, (long)N * mix, TOL_HC);
        /* post: consume the CPU's pre/post/comb on both sides so only op_hc_post is measured */
        float *y = hnew((long)N * D), *ho = hnew(nh);
        fill(f, y, (long)N * D, -1, 1);
        float *d_y = up(y, (long)N * D), *d_ho = poison(nh);
        float *c_post = up(post, (long)N * n), *c_comb = up(comb, (long)N * nn);
        OK(op_hc_post(&f->cpu, ho, h, y, post, comb, N, n, D, ERR));
        OK(op_hc_post(&f->gpu, d_ho, d_h, d_y, c_post, c_comb, N, n, D, ERR));
        cmp(f, "op_hc_post", name, d_ho, ho, nh, TOL_HC);
        /* post backward */
        float *gho = hnew(nh), *gh = hnew(nh), *gy = hnew((long)N * D), *gpost = hnew((long)N * n);
        float *gcomb = hnew((long)N * nn);
        fill(f, gho, nh, -1, 1);
        fill(f, gh, nh, -1, 1);
        fill(f, gy, (long)N * D, -1, 1);
        float *d_gho = up(gho, nh), *d_gh = up(gh, nh), *d_gy = up(gy, (long)N * D);
        float *d_gpost = poison((long)N * n), *d_gcomb = poison((long)N * nn);
        OK(op_hc_post_backward(&f->cpu, gh, gy, gpost, gcomb, gho, h, y, post, comb, N, n, D, ERR));
        OK(op_hc_post_backward(&f->gpu, d_gh, d_gy, d_gpost, d_gcomb, d_gho, d_h, d_y, c_post, c_comb, N, n, D, ERR));
        cmp(f, "op_hc_post_backward dh", name, d_gh, gh, nh, TOL_HC);
        cmp(f, "op_hc_post_backward dy", name, d_gy, gy, (long)N * D, TOL_HC);
        cmp(f, "op_hc_post_backward dpost", name, d_gpost, gpost, (long)N * n, TOL_HC);
        cmp(f, "op_hc_post_backward dcomb", name, d_gcomb, gcomb, (long)N * nn, TOL_HC);
        /* pre backward from random dx, dpost, dcomb */
        float *gx = hnew((long)N * D), *gp = hnew((long)N * n), *gc = hnew((long)N * nn);
        float *gh2 = hnew(nh), *gfn = hnew((long)mix * n * D), *gbase = hnew(mix), *gscale = hnew(3);
        fill(f, gx, (long)N * D, -1, 1);
        fill(f, gp, (long)N * n, -1, 1);
        fill(f, gc, (long)N * nn, -1, 1);
        fill(f, gh2, nh, -1, 1);
        fill(f, gfn, (long)mix * n * D, -1, 1);
        fill(f, gbase, mix, -1, 1);
        fill(f, gscale, 3, -1, 1);
        float *d_gx = up(gx, (long)N * D), *d_gp = up(gp, (long)N * n), *d_gc = up(gc, (long)N * nn);
        float *d_gh2 = up(gh2, nh), *d_gfn = up(gfn, (long)mix * n * D), *d_gbase = up(gbase, mix);
        float *d_gscale = up(gscale, 3);
        OK(op_hc_pre_backward(&f->cpu, gh2, gfn, gbase, gscale, gx, gp, gc, h, fn, base, scale, N, dm, work, ERR));
        OK(op_hc_pre_backward(&f->gpu, d_gh2, d_gfn, d_gbase, d_gscale, d_gx, d_gp, d_gc, d_h, d_fn, d_base, d_scale, N,
                              dm, dwork, ERR));
        cmp(f, "op_hc_pre_backward dh", name, d_gh2, gh2, nh, TOL_HC);
        cmp(f, "op_hc_pre_backward dfn", name, d_gfn, gfn, (long)mix * n * D, TOL_HC);
        cmp(f, "op_hc_pre_backward dbase", name, d_gbase, gbase, mix, TOL_HC);
        cmp(f, "op_hc_pre_backward dscale", name, d_gscale, gscale, 3, TOL_HC);
        /* head: fn [n, n*D], base [n], scale [1] (the first rows / entries of the ones above) */
        float *xh = hnew((long)N * D), *d_xh = poison((long)N * D);
        OK(op_hc_head(&f->cpu, xh, h, fn, base, scale, N, dm, work, ERR));
        OK(op_hc_head(&f->gpu, d_xh, d_h, d_fn, d_base, d_scale, N, dm, dwork, ERR));
        cmp(f, "op_hc_head", name, d_xh, xh, (long)N * D, TOL_HC);
        cmp(f, "op_hc_head pre (work)", name, dwork + nh, work + nh, (long)N * n, TOL_HC);
        OK(op_hc_head_backward(&f->cpu, gh2, gfn, gbase, gscale, gx, h, fn, base, scale, N, dm, work, ERR));
        OK(op_hc_head_backward(&f->gpu, d_gh2, d_gfn, d_gbase, d_gscale, d_gx, d_h, d_fn, d_base, d_scale, N, dm, dwork,
                               ERR));
        cmp(f, "op_hc_head_backward dh", name, d_gh2, gh2, nh, TOL_HC);
        cmp(f, "op_hc_head_backward dfn", name, d_gfn, gfn, (long)n * n * D, TOL_HC);
        cmp(f, "op_hc_head_backward dbase", name, d_gbase, gbase, n, TOL_HC);
        cmp(f, "op_hc_head_backward dscale", name, d_gscale, gscale, 1, TOL_HC);
        if (fused) { /* the decode path in a CUDA graph: capturable, and the same bits as op by op */
            float *g_x = poison((long)N * D), *g_pre = poison((long)N * n), *g_post = poison((long)N * n);
            float *g_comb = poison((long)N * nn), *g_xh = poison((long)N * D);
            long diff = hc_graph_diff(f, g_x, g_pre, g_post, g_comb, g_xh, d_h, d_fn, d_base, d_scale, N, dm, dwork,
                                      d_x, d_pre, d_post, d_comb, d_xh);
            record(f, "op_hc_pre/_head graph != op by op", name, (double)diff, 0.0);
            cuda_free(g_x), cuda_free(g_pre), cuda_free(g_post), cuda_free(g_comb), cuda_free(g_xh);
            if (N > 1) {
                int m = N < 5 ? N - 1 : 5;
                diff = hc_prefix_diff(f, m, d_h, d_fn, d_base, d_scale, dm, dwork, d_x, d_pre, d_post, d_comb);
                record(f, "op_hc_pre first tokens alone != in the batch", name, (double)diff, 0.0);
            }
        }
        free(h), free(fn), free(base), free(scale), free(work), free(x), free(pre), free(post), free(comb), free(y),
            free(ho), free(gho), free(gh), free(gy), free(gpost), free(gcomb), free(gx), free(gp), free(gc), free(gh2),
            free(gfn), free(gbase), free(gscale), free(xh);
        cuda_free(dwork), cuda_free(d_h), cuda_free(d_fn), cuda_free(d_base), cuda_free(d_scale), cuda_free(d_x),
            cuda_free(d_pre), cuda_free(d_post), cuda_free(d_comb), cuda_free(d_y), cuda_free(d_ho), cuda_free(c_post),
            cuda_free(c_comb), cuda_free(d_gho), cuda_free(d_gh), cuda_free(d_gy),
            cuda_free(d_gpost), cuda_free(d_gcomb), cuda_free(d_gx), cuda_free(d_gp), cuda_free(d_gc),
            cuda_free(d_gh2), cuda_free(d_gfn), cuda_free(d_gbase), cuda_free(d_gscale), cuda_free(d_xh);
    }
    END_TEST(f);
}

/* ---- MoE ---- */

static void test_moe_route(void **state) {
    fixture *f = *state;
    f->fails = 0;
    struct {
        int N, E, K;
        dsv4_score_func sf;
        int norm, bias, given;
    } sh[] = {{256, 64, 6, SCORE_SQRTSOFTPLUS, 1, 1, 0}, {256, 8, 2, SCORE_SIGMOID, 1, 0, 0},
              {200, 16, 4, SCORE_SOFTMAX, 0, 1, 0},     {128, 64, 6, SCORE_SQRTSOFTPLUS, 1, 0, 1},
              {300, 32, 3, SCORE_SIGMOID, 0, 1, 0}};
    const char *sfn[] = {"sqrtsoftplus", "sigmoid", "softmax"};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int N = sh[s].N, Ex = sh[s].E, K = sh[s].K;
        moe_route_cfg rc = {Ex, K, sh[s].sf, sh[s].norm, 1.5f};
        char name[80];
        snprintf(name, sizeof name, "N%d E%d K%d %s norm%d bias%d given%d", N, Ex, K, sfn[sh[s].sf], sh[s].norm,
                 sh[s].bias, sh[s].given);
        float *l = hnew((long)N * Ex), *bias = hnew(Ex), *sc = hnew((long)N * Ex), *w = hnew((long)N * K);
        int32_t *ids = hnewi((long)N * K), *given = hnewi((long)N * K);
        fill(f, l, (long)N * Ex, -4, 4);
        fill(f, bias, Ex, -0.1f, 0.1f);
        for (int t = 0; t < N; t++) /* distinct ids per token, like a routing record */
            for (int j = 0; j < K; j++) given[(long)t * K + j] = (int32_t)((t * 7 + j * 5) % Ex);
        float *dl = up(l, (long)N * Ex), *db = sh[s].bias ? up(bias, Ex) : NULL, *dsc = poison((long)N * Ex);
        float *dwt = poison((long)N * K);
        int32_t *dids = upi(ids, (long)N * K), *dgiven = sh[s].given ? upi(given, (long)N * K) : NULL;
        OK(op_moe_route(&f->cpu, sc, ids, w, l, sh[s].bias ? bias : NULL, sh[s].given ? given : NULL, N, rc, ERR));
        OK(op_moe_route(&f->gpu, dsc, dids, dwt, dl, db, dgiven, N, rc, ERR));
        cmp(f, "op_moe_route scores", name, dsc, sc, (long)N * Ex, TOL_FP32);
        cmpi(f, "op_moe_route ids", name, dids, ids, (long)N * K);
        cmp(f, "op_moe_route weights", name, dwt, w, (long)N * K, TOL_FP32);
        /* backward on the CPU's selection */
        float *dw = hnew((long)N * K), *gl = hnew((long)N * Ex);
        fill(f, dw, (long)N * K, -1, 1);
        fill(f, gl, (long)N * Ex, -1, 1);
        float *ddw = up(dw, (long)N * K), *dgl = up(gl, (long)N * Ex), *csc = up(sc, (long)N * Ex);
        int32_t *cids = upi(ids, (long)N * K);
        OK(op_moe_route_backward(&f->cpu, gl, dw, sc, l, ids, N, rc, ERR));
        OK(op_moe_route_backward(&f->gpu, dgl, ddw, csc, dl, cids, N, rc, ERR));
        cmp(f, "op_moe_route_backward", name, dgl, gl, (long)N * Ex, TOL_FP32);
        free(l), free(bias), free(sc), free(w), free(ids), free(given), free(dw), free(gl);
        cuda_free(dl), cuda_free(db), cuda_free(dsc), cuda_free(dwt), cuda_free(dids), cuda_free(dgiven), cuda_free(ddw),
            cuda_free(dgl), cuda_free(csc), cuda_free(cids);
    }
    END_TEST(f);
}

/* cuda_moe_wmma_gemm (the experts' grouped tensor-core GEMM) on its own, against a double-precision
 * product of the same bf16 values: the two differ only by fp32 accumulation (~1e-6 norm-wise), so a
 * missed or doubled k step, a wrong row or column, or a mis-read fragment layout is far above
 * TOL_WMMA. Experts of 0, 1, 15, 17, 129 and more rows (row tails of the 128-row tile, empty
 * experts first, between and last), N and K multiples of 16 but not of 32 or 128 (column and K
 * tails), padded strides whose padding holds NaN (read it and the result is NaN), and C rows and
 * columns outside the experts that must keep their sentinel bits; beta 0 over NaN and beta 1. */
static void test_moe_wmma_gemm(void **state) {
    fixture *f = *state;
    f->fails = 0;
    static const int counts_a[] = {0, 1, 15, 17, 129, 0, 300, 0};
    static const int counts_b[] = {130, 0, 257, 64};
    struct {
        const int *counts;
        int E, N, K, nn;
        float beta;
    } sh[] = {{counts_a, 8, 272, 80, 0, 0.0f}, {counts_a, 8, 80, 272, 0, 1.0f}, {counts_a, 8, 272, 80, 1, 1.0f},
              {counts_a, 8, 80, 272, 1, 0.0f}, {counts_a, 8, 16, 16, 0, 0.0f}, {counts_a, 8, 16, 48, 1, 1.0f},
              {counts_b, 4, 512, 1024, 0, 0.0f}, {counts_b, 4, 1024, 512, 1, 1.0f}};
    const uint16_t NAN16 = 0x7fc0; /* a bf16 quiet NaN */
    const float SENTINEL = 12345.0f;
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int E = sh[s].E, N = sh[s].N, K = sh[s].K, nn = sh[s].nn;
        float beta = sh[s].beta;
        int32_t *offs = hnewi(E + 1);
        int max_rows = 0;
        offs[0] = 0;
        for (int x = 0; x < E; x++) {
            offs[x + 1] = offs[x] + sh[s].counts[x];
            max_rows = sh[s].counts[x] > max_rows ? sh[s].counts[x] : max_rows;
        }
        int R = offs[E], Rall = R + 3; /* 3 rows past the experts: never read (A) or written (C) */
        int lda = K + 8, bro = nn ? K : N, bco = nn ? N : K, ldb = bco + 8, ldc = N + 16;
        long bstr = (long)(bro + 1) * ldb; /* one padding row per expert */
        char name[80];
        snprintf(name, sizeof name, "%s E%d rows%d N%d K%d beta%g", nn ? "NN" : "NT", E, R, N, K, (double)beta);
        uint16_t *a = malloc(sizeof(uint16_t) * (size_t)Rall * lda), *b = malloc(sizeof(uint16_t) * (size_t)E * bstr);
        assert_non_null(a);
        assert_non_null(b);
        for (long i = 0; i < (long)Rall * lda; i++) a[i] = NAN16;
        for (long i = 0; i < (long)E * bstr; i++) b[i] = NAN16;
        for (int r = 0; r < R; r++)
            for (int c = 0; c < K; c++) a[(long)r * lda + c] = bf16_bits(-1.0f + 2.0f * rng_uniform(&f->r));
        for (int x = 0; x < E; x++)
            for (int r = 0; r < bro; r++)
                for (int c = 0; c < bco; c++)
                    b[(long)x * bstr + (long)r * ldb + c] = bf16_bits(-1.0f + 2.0f * rng_uniform(&f->r));
        float *c0 = hnew((long)Rall * ldc), *ref = hnew((long)R * N), *got = hnew((long)Rall * ldc);
        for (long i = 0; i < (long)Rall * ldc; i++) c0[i] = SENTINEL;
        for (int r = 0; r < R; r++)
            for (int n = 0; n < N; n++) c0[(long)r * ldc + n] = beta != 0.0f ? -1.0f + 2.0f * rng_uniform(&f->r) : NAN;
        for (int x = 0; x < E; x++)
            for (int r = offs[x]; r < offs[x + 1]; r++)
                for (int n = 0; n < N; n++) {
                    double acc = beta != 0.0f ? (double)c0[(long)r * ldc + n] : 0.0;
                    for (int q = 0; q < K; q++) {
                        long bi = nn ? (long)q * ldb + n : (long)n * ldb + q;
                        acc += (double)bf16_float(a[(long)r * lda + q]) * bf16_float(b[(long)x * bstr + bi]);
                    }
                    ref[(long)r * N + n] = (float)acc;
                }
        mill_err e;
        void *da = dnew(sizeof(uint16_t) * (size_t)Rall * lda), *db = dnew(sizeof(uint16_t) * (size_t)E * bstr);
        if (cuda_copy_to_device(da, a, sizeof(uint16_t) * (size_t)Rall * lda, &e) ||
            cuda_copy_to_device(db, b, sizeof(uint16_t) * (size_t)E * bstr, &e))
            fail_msg("%s", e.msg);
        float *dc = up(c0, (long)Rall * ldc);
        int32_t *doffs = upi(offs, E + 1);
        OK(cuda_moe_wmma_gemm(&f->gpu, nn, doffs, E, max_rows, N, K, da, lda, db, bstr, ldb, dc, ldc, beta, ERR));
        down(got, dc, sizeof(float) * (size_t)Rall * ldc);
        long outside = 0; /* C elements outside [R, N] that changed */
        for (int r = 0; r < Rall; r++)
            for (int n = 0; n < ldc; n++)
                if ((r >= R || n >= N) && memcmp(&got[(long)r * ldc + n], &SENTINEL, sizeof(float))) outside++;
        for (int r = 0; r < R; r++) memmove(got + (long)r * N, got + (long)r * ldc, sizeof(float) * (size_t)N);
        record(f, "cuda_moe_wmma_gemm", name, rel_err(got, ref, (long)R * N), TOL_WMMA);
        record(f, "cuda_moe_wmma_gemm writes outside", name, (double)outside, 0.0);
        free(offs), free(a), free(b), free(c0), free(ref), free(got);
        cuda_free(da), cuda_free(db), cuda_free(dc), cuda_free(doffs);
    }
    /* a shape the kernel does not take is refused, not run */
    mill_err e;
    int32_t *doffs = upi((const int32_t[]){0, 0}, 2);
    assert_int_equal(cuda_moe_wmma_gemm(&f->gpu, 0, doffs, 1, 1, 24, 16, NULL, 16, NULL, 384, 16, NULL, 24, 0.0f, &e), -1);
    cuda_free(doffs);
    END_TEST(f);
}

/* cuda_moe_wmma_tn_gemm (the experts' weight gradients on tensor cores: C_e += A_e^T B_e over each
 * expert's rows) against a double-precision product of the same bf16 values, like the test above:
 * experts of 0, 1, 31, 32, 33, 200 and 1000 rows (row tails of the 32-row step, last steps of at
 * most 16 rows, empty experts first, between and last), M and N multiples of 8 but not of 16 or 128
 * (fragments and tiles partly outside), padded strides and rows past the experts holding NaN (read
 * one and the result is NaN), each expert's C block followed by a padding row and the last by a
 * sentinel row, all of which must keep their bits; beta 0 over NaN (an empty expert's block becomes
 * zeros) and beta 1 over known values (an empty expert's block keeps them); a second run must give
 * the same bits (fixed order, no atomics). */
static void test_moe_wmma_tn_gemm(void **state) {
    fixture *f = *state;
    f->fails = 0;
    static const int counts_a[] = {0, 1, 31, 32, 33, 200, 0};
    static const int counts_b[] = {1000, 0, 77};
    struct {
        const int *counts;
        int E, M, N;
        float beta;
    } sh[] = {{counts_a, 7, 136, 72, 0.0f},  {counts_a, 7, 72, 136, 1.0f}, {counts_a, 7, 8, 8, 1.0f},
              {counts_a, 7, 264, 200, 0.0f}, {counts_b, 3, 256, 512, 1.0f}, {counts_b, 3, 512, 128, 0.0f}};
    const uint16_t NAN16 = 0x7fc0; /* a bf16 quiet NaN */
    const float SENTINEL = 12345.0f;
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int E = sh[s].E, M = sh[s].M, N = sh[s].N;
        float beta = sh[s].beta;
        int32_t *offs = hnewi(E + 1);
        offs[0] = 0;
        for (int x = 0; x < E; x++) offs[x + 1] = offs[x] + sh[s].counts[x];
        int R = offs[E], Rall = R + 3; /* 3 rows past the experts: never read */
        int lda = M + 8, ldb = N + 8, ldc = N + 16;
        long cstr = (long)(M + 1) * ldc, cn = E * cstr + ldc; /* a padding row per expert, a sentinel row last */
        char name[80];
        snprintf(name, sizeof name, "TN E%d rows%d M%d N%d beta%g", E, R, M, N, (double)beta);
        uint16_t *a = malloc(sizeof(uint16_t) * (size_t)Rall * lda), *b = malloc(sizeof(uint16_t) * (size_t)Rall * ldb);
        assert_non_null(a);
        assert_non_null(b);
        for (long i = 0; i < (long)Rall * lda; i++) a[i] = NAN16;
        for (long i = 0; i < (long)Rall * ldb; i++) b[i] = NAN16;
        for (int r = 0; r < R; r++) {
            for (int m = 0; m < M; m++) a[(long)r * lda + m] = bf16_bits(-1.0f + 2.0f * rng_uniform(&f->r));
            for (int n = 0; n < N; n++) b[(long)r * ldb + n] = bf16_bits(-1.0f + 2.0f * rng_uniform(&f->r));
        }
        float *c0 = hnew(cn), *ref = hnew((long)E * M * N), *got = hnew(cn), *got2 = hnew(cn);
        for (long i = 0; i < cn; i++) c0[i] = SENTINEL;
        for (int x = 0; x < E; x++)
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++)
                    c0[x * cstr + (long)m * ldc + n] = beta != 0.0f ? -1.0f + 2.0f * rng_uniform(&f->r) : NAN;
        double *acc = malloc(sizeof(double) * (size_t)M * N);
        assert_non_null(acc);
        for (int x = 0; x < E; x++) { /* row by row into a double [M, N]: sequential reads */
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++)
                    acc[(long)m * N + n] = beta != 0.0f ? (double)c0[x * cstr + (long)m * ldc + n] : 0.0;
            for (int r = offs[x]; r < offs[x + 1]; r++)
                for (int m = 0; m < M; m++) {
                    double am = bf16_float(a[(long)r * lda + m]);
                    for (int n = 0; n < N; n++) acc[(long)m * N + n] += am * bf16_float(b[(long)r * ldb + n]);
                }
            for (long i = 0; i < (long)M * N; i++) ref[(long)x * M * N + i] = (float)acc[i];
        }
        mill_err e;
        void *da = dnew(sizeof(uint16_t) * (size_t)Rall * lda), *db = dnew(sizeof(uint16_t) * (size_t)Rall * ldb);
        if (cuda_copy_to_device(da, a, sizeof(uint16_t) * (size_t)Rall * lda, &e) ||
            cuda_copy_to_device(db, b, sizeof(uint16_t) * (size_t)Rall * ldb, &e))
            fail_msg("%s", e.msg);
        float *dc = up(c0, cn), *dc2 = up(c0, cn);
        int32_t *doffs = upi(offs, E + 1);
        OK(cuda_moe_wmma_tn_gemm(&f->gpu, doffs, E, M, N, da, lda, db, ldb, dc, cstr, ldc, beta, ERR));
        OK(cuda_moe_wmma_tn_gemm(&f->gpu, doffs, E, M, N, da, lda, db, ldb, dc2, cstr, ldc, beta, ERR));
        down(got, dc, sizeof(float) * (size_t)cn);
        down(got2, dc2, sizeof(float) * (size_t)cn);
        long outside = 0, rerun = 0; /* C elements outside the experts' [M, N] blocks that changed; bits
                                      * that differ between the two runs */
        for (long i = 0; i < cn; i++) {
            long x = i / cstr, m = i % cstr / ldc, n = i % ldc;
            if ((x >= E || m >= M || n >= N) && memcmp(&got[i], &SENTINEL, sizeof(float))) outside++;
            rerun += memcmp(&got[i], &got2[i], sizeof(float)) != 0;
        }
        for (int x = 0; x < E; x++) /* compact the blocks to [E, M, N] like ref */
            for (int m = 0; m < M; m++)
                memmove(got + ((long)x * M + m) * N, got + x * cstr + (long)m * ldc, sizeof(float) * (size_t)N);
        record(f, "cuda_moe_wmma_tn_gemm", name, rel_err(got, ref, (long)E * M * N), TOL_WMMA);
        record(f, "cuda_moe_wmma_tn_gemm writes outside", name, (double)outside, 0.0);
        record(f, "cuda_moe_wmma_tn_gemm rerun bits", name, (double)rerun, 0.0);
        free(offs), free(a), free(b), free(c0), free(ref), free(got), free(got2), free(acc);
        cuda_free(da), cuda_free(db), cuda_free(dc), cuda_free(dc2), cuda_free(doffs);
    }
    /* shapes the kernel does not take are refused, not run: M not a multiple of 8; experts' C blocks
     * that overlap */
    mill_err e;
    int32_t *doffs = upi((const int32_t[]){0, 0, 0}, 3);
    assert_int_equal(cuda_moe_wmma_tn_gemm(&f->gpu, doffs, 1, 12, 16, NULL, 16, NULL, 16, NULL, 192, 16, 0.0f, &e), -1);
    assert_int_equal(cuda_moe_wmma_tn_gemm(&f->gpu, doffs, 2, 16, 16, NULL, 16, NULL, 16, NULL, 240, 16, 0.0f, &e), -1);
    cuda_free(doffs);
    END_TEST(f);
}

static void test_moe_experts(void **state) {
    fixture *f = *state;
    f->fails = 0;
    mill_err e0;
    int gs = cuda_moe_grouped_gemm_supported(&f->gpu, &e0);
    printf("  op_moe_experts GEMM path: %s\n",
           gs == 1 ? "one cublasGemmGroupedBatchedEx per projection (bf16 x bf16 -> fp32)"
                   : gs == 0 ? "one cublasGemmEx per expert (the grouped call was refused)" : e0.msg);
    char types[256];
    if (cuda_moe_grouped_gemm_types(&f->gpu, types, sizeof types, &e0) == 0)
        printf("  cublasGemmGroupedBatchedEx accepts: %s\n", types);
    /* Experts' row counts for the tail shapes (N * K > MOE_SMALL_ROWS, so the forward takes the
     * grouped path too): 0, 1, 15, 17 and 129 rows against the NT/NN kernel's 128-row tile, and 31, 32,
     * 33 against the TN kernel's 32-row reduction step (15, 17 too: last steps of <= 16 rows); D and I
     * multiples of 16 but not of 32 or 128 (K steps and column tiles with tails); D 136, I 72: multiples
     * of 8 only, which the NT/NN kernel leaves to cuBLAS and the TN kernel takes (tails inside a
     * fragment). The weight gradients' wmma~cuBLAS checks compare the TN kernel with cuBLAS. */
    static const int counts_a[] = {0, 1, 15, 17, 129, 300, 400, 538};      /* 1400 = 700 x 2 */
    static const int counts_b[] = {129, 17, 0, 15, 1, 470, 408};           /* 1040 = 520 x 2 */
    static const int counts_c[] = {0, 1, 31, 32, 33, 200, 0, 263, 500};    /* 1060 = 530 x 2 */
    struct {
        int N, D, I, E, K, acc;
        const int *counts; /* NULL: random ids */
    } sh[] = {{128, 256, 128, 8, 2, 0, NULL},  {96, 512, 256, 64, 6, 1, NULL},    {33, 128, 64, 16, 4, 0, NULL},
              {4096, 128, 64, 32, 4, 1, NULL}, {700, 272, 80, 8, 2, 0, counts_a}, {520, 144, 208, 7, 2, 1, counts_b},
              {530, 136, 72, 9, 2, 1, counts_c}, {530, 144, 80, 9, 2, 0, counts_c}};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) { /* N 4096 x K 4: the grouping over many chunks */
        int N = sh[s].N, D = sh[s].D, I = sh[s].I, Ex = sh[s].E, K = sh[s].K;
        char name[64];
        snprintf(name, sizeof name, "N%d D%d I%d E%d K%d acc%d%s", N, D, I, Ex, K, sh[s].acc,
                 sh[s].counts ? " tails" : "");
        float *x = hnew((long)N * D), *w1 = hnew((long)Ex * I * D), *w3 = hnew((long)Ex * I * D);
        float *w2 = hnew((long)Ex * D * I), *wt = hnew((long)N * K), *out = hnew((long)N * D);
        int32_t *ids = hnewi((long)N * K);
        fill(f, x, (long)N * D, -1, 1);
        fill(f, w1, (long)Ex * I * D, -0.2f, 0.2f); /* pre-activations reach the clamp (limit 3 below) */
        fill(f, w3, (long)Ex * I * D, -0.2f, 0.2f);
        fill(f, w2, (long)Ex * D * I, -0.1f, 0.1f);
        fill(f, wt, (long)N * K, 0, 1);
        fill(f, out, (long)N * D, -1, 1);
        for (int t = 0; t < N; t++) { /* distinct experts per token; skewed so some get none */
            for (int j = 0; j < K; j++) {
                int id, again;
                do {
                    id = (int)rng_below(&f->r, (uint64_t)(t % 3 ? Ex : Ex / 2 + 1));
                    again = 0;
                    for (int q = 0; q < j; q++) again |= ids[(long)t * K + q] == id;
                } while (again);
                ids[(long)t * K + j] = id;
            }
        }
        if (sh[s].counts) { /* exactly counts[x] rows of expert x: the experts in order, slot j of the
                             * t-th token (in a shuffled order) taking entry j N + t; no count exceeds N,
                             * so a token's K entries are K distinct experts */
            long NKc = (long)N * K, at = 0;
            int32_t *seq = hnewi(NKc), *perm = hnewi(N);
            for (int x = 0; x < Ex; x++)
                for (int c = 0; c < sh[s].counts[x]; c++) seq[at++] = x;
            assert_int_equal(at, NKc);
            for (int t = 0; t < N; t++) perm[t] = t;
            for (int t = N - 1; t > 0; t--) {
                int q = (int)rng_below(&f->r, (uint64_t)t + 1), v = perm[t];
                perm[t] = perm[q], perm[q] = v;
            }
            for (int t = 0; t < N; t++)
                for (int j = 0; j < K; j++) ids[(long)perm[t] * K + j] = seq[(long)j * N + t];
            free(seq), free(perm);
        }
        float L = 3.0f;
        long wf = moe_experts_backward_work_floats(N, D, I, Ex, K);
        /* the tail shapes start from NaN scratch: a grouped row no GEMM writes poisons the result */
        float *work = hnew(wf), *dwork = sh[s].counts ? poison(wf) : dnew(sizeof(float) * (size_t)wf);
        float *dwork2 = sh[s].counts ? poison(wf) : dnew(sizeof(float) * (size_t)wf);
        float *dx = up(x, (long)N * D), *dw1 = up(w1, (long)Ex * I * D), *dw3 = up(w3, (long)Ex * I * D);
        float *dw2 = up(w2, (long)Ex * D * I), *dwt = up(wt, (long)N * K);
        float *dout = sh[s].acc ? up(out, (long)N * D) : poison((long)N * D);
        float *dout2 = sh[s].acc ? up(out, (long)N * D) : poison((long)N * D);
        int32_t *dids = upi(ids, (long)N * K);
        OK(op_moe_experts(&f->cpu, out, x, ids, wt, w1, w3, w2, N, D, I, Ex, K, L, sh[s].acc, work, ERR));
        int moe_cublas = f->gpu.moe_cublas;
        f->gpu.moe_cublas = 0; /* the grouped tensor-core kernel, then the cuBLAS path it replaced */
        OK(op_moe_experts(&f->gpu, dout, dx, dids, dwt, dw1, dw3, dw2, N, D, I, Ex, K, L, sh[s].acc, dwork, ERR));
        f->gpu.moe_cublas = 1;
        OK(op_moe_experts(&f->gpu, dout2, dx, dids, dwt, dw1, dw3, dw2, N, D, I, Ex, K, L, sh[s].acc, dwork2, ERR));
        f->gpu.moe_cublas = moe_cublas;
        cmp(f, "op_moe_experts", name, dout, out, (long)N * D, TOL_MOE);
        cmp_dev(f, "op_moe_experts wmma~cuBLAS", name, dout, dout2, (long)N * D, TOL_MOE_PATHS);
        /* the grouping in work (slot_row [NK] then offs [E + 1], after xg, g, u, y) must be the CPU's
         * exactly: a stable sort keeps each expert's rows in token order */
        long NKs = (long)N * K, grp = NKs * (2L * D + 2L * I);
        cmpi(f, "op_moe_experts grouping", name, (const int32_t *)(dwork + grp), (const int32_t *)(work + grp),
             NKs + Ex + 1);
        float *go = hnew((long)N * D), *gx = hnew((long)N * D), *g1 = hnew((long)Ex * I * D);
        float *g3 = hnew((long)Ex * I * D), *g2 = hnew((long)Ex * D * I), *gw = hnew((long)N * K);
        fill(f, go, (long)N * D, -1, 1);
        fill(f, gx, (long)N * D, -1, 1);
        fill(f, g1, (long)Ex * I * D, -1, 1);
        fill(f, g3, (long)Ex * I * D, -1, 1);
        fill(f, g2, (long)Ex * D * I, -1, 1);
        float *dgo = up(go, (long)N * D), *dgx = up(gx, (long)N * D), *dg1 = up(g1, (long)Ex * I * D);
        float *dg3 = up(g3, (long)Ex * I * D), *dg2 = up(g2, (long)Ex * D * I), *dgw = poison((long)N * K);
        /* the same accumulating outputs again for the cuBLAS run */
        float *cgx = up(gx, (long)N * D), *cg1 = up(g1, (long)Ex * I * D), *cg3 = up(g3, (long)Ex * I * D);
        float *cg2 = up(g2, (long)Ex * D * I), *cgw = poison((long)N * K);
        OK(op_moe_experts_backward(&f->cpu, gx, g1, g3, g2, gw, go, x, ids, wt, w1, w3, w2, N, D, I, Ex, K, L, work,
                                   ERR));
        f->gpu.moe_cublas = 0;
        OK(op_moe_experts_backward(&f->gpu, dgx, dg1, dg3, dg2, dgw, dgo, dx, dids, dwt, dw1, dw3, dw2, N, D, I, Ex, K,
                                   L, dwork, ERR));
        f->gpu.moe_cublas = 1;
        OK(op_moe_experts_backward(&f->gpu, cgx, cg1, cg3, cg2, cgw, dgo, dx, dids, dwt, dw1, dw3, dw2, N, D, I, Ex, K,
                                   L, dwork2, ERR));
        f->gpu.moe_cublas = moe_cublas;
        long bgrp = NKs * (4L * D + 5L * I);
        cmpi(f, "op_moe_experts_backward grouping", name, (const int32_t *)(dwork + bgrp),
             (const int32_t *)(work + bgrp), NKs + Ex + 1);
        cmp(f, "op_moe_experts_backward dx", name, dgx, gx, (long)N * D, TOL_MOE);
        cmp(f, "op_moe_experts_backward dw1", name, dg1, g1, (long)Ex * I * D, TOL_MOE);
        cmp(f, "op_moe_experts_backward dw3", name, dg3, g3, (long)Ex * I * D, TOL_MOE);
        cmp(f, "op_moe_experts_backward dw2", name, dg2, g2, (long)Ex * D * I, TOL_MOE);
        cmp(f, "op_moe_experts_backward dweights", name, dgw, gw, (long)N * K, TOL_MOE);
        cmp_dev(f, "moe_experts_bwd wmma~cuBLAS dx", name, dgx, cgx, (long)N * D, TOL_MOE_PATHS);
        cmp_dev(f, "moe_experts_bwd wmma~cuBLAS dw1", name, dg1, cg1, (long)Ex * I * D, TOL_MOE_PATHS);
        cmp_dev(f, "moe_experts_bwd wmma~cuBLAS dw3", name, dg3, cg3, (long)Ex * I * D, TOL_MOE_PATHS);
        cmp_dev(f, "moe_experts_bwd wmma~cuBLAS dw2", name, dg2, cg2, (long)Ex * D * I, TOL_MOE_PATHS);
        cmp_dev(f, "moe_experts_bwd wmma~cuBLAS dwts", name, dgw, cgw, (long)N * K, TOL_MOE_PATHS);
        cuda_free(dwork2), cuda_free(dout2), cuda_free(cgx), cuda_free(cg1), cuda_free(cg3), cuda_free(cg2),
            cuda_free(cgw);
        free(x), free(w1), free(w3), free(w2), free(wt), free(out), free(ids), free(work), free(go), free(gx),
            free(g1), free(g3), free(g2), free(gw);
        cuda_free(dwork), cuda_free(dx), cuda_free(dw1), cuda_free(dw3), cuda_free(dw2), cuda_free(dwt),
            cuda_free(dout), cuda_free(dids), cuda_free(dgo), cuda_free(dgx), cuda_free(dg1), cuda_free(dg3),
            cuda_free(dg2), cuda_free(dgw);
    }
    END_TEST(f);
}

/* ---- sampling ---- */

/* Rows for op_sample: uniform logits (kind 0); every logit twice, the top included (1); eight
 * levels only (2): tie groups of ~V/8, so top-k, top-p and the pick mostly land inside one and
 * the tied indices after its first are found by the kernel's index-order scan. */
static void sample_fill(fixture *f, float *l, int V, int kind) {
    fill(f, l, V, -8, 8);
    if (kind == 1)
        for (int v = V / 2; v < V; v++) l[v] = l[v - V / 2];
    if (kind == 2)
        for (int v = 0; v < V; v++) l[v] = floorf((l[v] + 8.0f) / 2.0f) * 0.5f;
}

/* op_sample's radix selects against the CPU sampler on the same rows and u. Tokens must be equal:
 * a different token needs top_p or u * mass within ~1e-13 of a running-mass boundary, or two p a
 * float ulp apart ordered differently (kernels/cuda/sample.cu), practically never on these rows.
 * Logprobs: the largest elementwise relative difference, TOL_FP32. 560 rows of 129280 run as two
 * launches (the p scratch holds 519). */
static void test_sample(void **state) {
    fixture *f = *state;
    f->fails = 0;
    int sh[][2] = {{64, 129280}, {37, 1000}, {5, 1}, {560, 129280}};
    float temps[] = {0.0f, 0.6f, 1.0f, 1.4f}, topp[] = {1.0f, 0.9f, 0.5f, 0.0f};
    for (int s = 0; s < 4; s++) {
        int M = sh[s][0], V = sh[s][1];
        char name[64];
        snprintf(name, sizeof name, "M%d vocab%d", M, V);
        long n = (long)M * V;
        float *l = hnew(n), *lc = hnew(M), *lg = hnew(M);
        int32_t *tc = hnewi(M), *tg = hnewi(M);
        sample_row *rows = malloc(sizeof(sample_row) * (size_t)M);
        assert_non_null(rows);
        int ks[] = {0, 1, 50, V / 3};
        for (int i = 0; i < M; i++) {
            sample_fill(f, l + (long)i * V, V, i % 3);
            rows[i] = (sample_row){.temperature = temps[i % 4], .top_p = topp[(i / 4) % 4], .top_k = ks[(i / 2) % 4],
                                   .u = rng_uniform(&f->r)};
            tg[i] = -1;
        }
        float *dl = up(l, n), *dlp = poison(M);
        int32_t *dtok = upi(tg, M);
        OK(op_sample(&f->cpu, tc, lc, l, M, V, rows, ERR));
        OK(op_sample(&f->gpu, dtok, dlp, dl, M, V, rows, ERR));
        down(tg, dtok, sizeof(int32_t) * (size_t)M);
        down(lg, dlp, sizeof(float) * (size_t)M);
        long diff = 0;
        double worst = 0;
        for (int i = 0; i < M; i++) {
            if (tg[i] != tc[i]) {
                printf("  op_sample %s row %d (T %g top_k %d top_p %g u %.9g): gpu %d, cpu %d\n", name, i,
                       rows[i].temperature, rows[i].top_k, rows[i].top_p, rows[i].u, tg[i], tc[i]);
                diff++;
                continue;
            }
            double d = lg[i] == lc[i] ? 0.0 : fabs((double)lg[i] - lc[i]) / fmax(fabs((double)lc[i]), 1e-30);
            if (!(d <= worst)) worst = d; /* NaN stays */
        }
        printf("  op_sample %s: %ld of %d tokens differ\n", name, diff, M);
        record(f, "op_sample tokens", name, (double)diff, 0.0);
        record(f, "op_sample logprob", name, worst, TOL_FP32);
        if (s == 0) { /* time the decode-sized case: wall clock per call, the stream drained */
            struct timespec t0, t1;
            OK(kctx_sync(&f->gpu, ERR));
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (int it = 0; it < 20; it++) OK(op_sample(&f->gpu, dtok, dlp, dl, M, V, rows, ERR));
            OK(kctx_sync(&f->gpu, ERR));
            clock_gettime(CLOCK_MONOTONIC, &t1);
            printf("  op_sample %s: %.1f us per call on the GPU\n", name,
                   ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / 20 / 1e3);
        }
        free(l), free(lc), free(lg), free(tc), free(tg), free(rows);
        cuda_free(dl), cuda_free(dlp), cuda_free(dtok);
    }
    END_TEST(f);
}

static int setup(void **state) {
    static fixture fx; /* one per process; handed to the tests through cmocka's state */
    mill_err e;
    memset(&fx, 0, sizeof fx);
    rng_seed(&fx.r, 20261123);
    if (kctx_init(&fx.cpu, DEVICE_CPU, &e) || kctx_init(&fx.gpu, DEVICE_CUDA, &e)) {
        fprintf(stderr, "kctx_init: %s\n", e.msg);
        return -1;
    }
    *state = &fx;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    printf("\nworst relative error per op (integer ops: mismatches), over all shapes:\n");
    for (int i = 0; i < f->nops; i++)
        printf("  %-36s %.3e  (tol %.0e)%s\n", f->op[i], f->worst[i], f->tol[i],
               f->worst[i] <= f->tol[i] ? "" : "  FAIL");
    kctx_free(&f->cpu);
    kctx_free(&f->gpu);
    return 0;
}

int main(int argc, char **argv) {
    char dev[256];
    mill_err e;
    if (argc > 1) cmocka_set_test_filter(argv[1]); /* e.g. test_attention: one test's cases */
    if (cuda_device_describe(dev, sizeof dev, &e)) {
        printf("no CUDA device: skipped (%s)\n", e.msg);
        return 0;
    }
    printf("device: %s\n", dev);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gemm),          cmocka_unit_test(test_skinny_linear), cmocka_unit_test(test_linear_exact), cmocka_unit_test(test_rmsnorm),     cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_swiglu),        cmocka_unit_test(test_cross_entropy), cmocka_unit_test(test_rope),
        cmocka_unit_test(test_optim),         cmocka_unit_test(test_attention),   cmocka_unit_test(test_compress_pool),
        cmocka_unit_test(test_indexer_topk),  cmocka_unit_test(test_cache_ops),  cmocka_unit_test(test_hc),          cmocka_unit_test(test_moe_route),
        cmocka_unit_test(test_moe_wmma_gemm), cmocka_unit_test(test_moe_wmma_tn_gemm), cmocka_unit_test(test_moe_experts),   cmocka_unit_test(test_token_logp),  cmocka_unit_test(test_memory_ops),
        cmocka_unit_test(test_sample),        cmocka_unit_test(test_moe_combine),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
