/* tests/test_sample.c — op_sample on the CPU (kernels/sample.h) against sample_token
 * (rollout/generate.c) and against a plain reference sampler, bit for bit, over many random rows:
 * greedy, untruncated, top-k, top-p and both, temperatures from 0.05 to 2.5, rows with many exact
 * ties, -inf logits, constant rows and a one-token vocabulary. The CUDA twin is checked against
 * this CPU op in tests/test_cuda_ops.c. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/rng.h"
#include "kernels/dense.h"
#include "kernels/sample.h"
#include "rollout/generate.h"

static const float TEMPS[] = {0.0f, -0.5f, 0.05f, 0.3f, 0.7f, 1.0f, 1.3f, 2.5f};
static const float TOPP[] = {1.0f, 1.5f, 0.95f, 0.9f, 0.5f, 0.1f, 0.0f, -0.2f};

/* A row of one of five kinds: wide uniform, peaked (a few large logits), quantised to a few
 * levels (exact ties everywhere), constant, and uniform with some -inf. */
static void fill_row(rng *g, float *l, int V, int kind) {
    for (int v = 0; v < V; v++) {
        float u = rng_uniform(g);
        switch (kind) {
        case 0: l[v] = -8.0f + 16.0f * u; break;
        case 1: l[v] = rng_normal(g) + (u < 0.01f ? 12.0f : 0.0f); break;
        case 2: l[v] = floorf(u * 6.0f) * 0.75f - 2.0f; break;
        case 3: l[v] = 0.5f; break;
        default: l[v] = u < 0.2f ? -INFINITY : -3.0f + 6.0f * u; break;
        }
    }
    if (kind == 4) l[V / 2] = 1.0f; /* at least one finite logit */
}

/* Parameters of row i: every temperature, top_k (off, negative, 1, 2, 5, 40, V-1, V, V+5) and
 * top_p meet across the rows. */
static sample_params row_params(int i, int V) {
    int ks[] = {0, -2, 1, 2, 5, 40, V - 1, V, V + 5};
    sample_params sp = {.temperature = TEMPS[i % 8], .top_p = TOPP[(i / 8) % 8], .top_k = ks[(i / 3) % 9]};
    return sp;
}

/* The sampler written plainly: a comparison sort for the order, the same float and double
 * arithmetic as kernels/sample.c otherwise, so every bit must agree. */
static int ref_desc(const void *a, const void *b, void *ctx) {
    const float *p = ctx;
    int i = *(const int *)a, j = *(const int *)b;
    if (p[i] != p[j]) return p[i] > p[j] ? -1 : 1;
    return i - j;
}

static int32_t ref_pick(const float *l, int V, const sample_row *sr, float *logprob) {
    if (sr->temperature <= 0.0f) {
        int best = 0;
        for (int v = 1; v < V; v++)
            if (l[v] > l[best]) best = v;
        double den = 0;
        for (int v = 0; v < V; v++) den += exp((double)l[v] - (double)l[best]);
        *logprob = (float)(-log(den));
        return best;
    }
    float *p = malloc(sizeof(float) * (size_t)V), mx = -INFINITY;
    int *order = malloc(sizeof(int) * (size_t)V);
    assert_non_null(p);
    assert_non_null(order);
    for (int v = 0; v < V; v++) {
        p[v] = l[v] / sr->temperature;
        if (p[v] > mx) mx = p[v];
    }
    double den = 0;
    for (int v = 0; v < V; v++) {
        p[v] = expf(p[v] - mx);
        den += p[v];
    }
    for (int v = 0; v < V; v++) {
        p[v] = (float)(p[v] / den);
        order[v] = v;
    }
    qsort_r(order, (size_t)V, sizeof(int), ref_desc, p);
    int keep = sr->top_k > 0 && sr->top_k < V ? sr->top_k : V;
    if (sr->top_p < 1.0f) { /* the shortest prefix whose running mass reaches top_p */
        double c = 0;
        for (int j = 0; j < keep; j++) {
            c += p[order[j]];
            if (c >= sr->top_p) {
                keep = j + 1;
                break;
            }
        }
    }
    double mass = 0;
    for (int j = 0; j < keep; j++) mass += p[order[j]];
    double u = (double)sr->u * mass, c = 0;
    int pick = order[keep - 1];
    for (int j = 0; j < keep; j++)
        if (u < (c += p[order[j]])) {
            pick = order[j];
            break;
        }
    *logprob = (float)(l[pick] / sr->temperature - logsumexp_t(l, V, sr->temperature)); /* the whole distribution's */
    free(p);
    free(order);
    return pick;
}

/* op_sample on a CPU kctx gives sample_token's token and logprob bits, with u drawn from a copy of
 * the row's rng, and sample_token advances the rng exactly by that one draw (none when greedy). */
static void test_op_equals_sample_token(void **state) {
    (void)state;
    kctx k;
    mill_err e;
    assert_int_equal(kctx_init(&k, DEVICE_CPU, &e), 0);
    int Vs[] = {1, 2, 3, 17, 1000, 32000}, Ms[] = {64, 128, 128, 256, 256, 48};
    rng g;
    rng_seed(&g, 4242);
    long rows_checked = 0, greedy = 0;
    for (int s = 0; s < 6; s++) {
        int V = Vs[s], M = Ms[s];
        float *l = malloc(sizeof(float) * (size_t)M * V), *lp = malloc(sizeof(float) * M);
        float *work = malloc(sizeof(float) * SAMPLE_WORK_FLOATS(V));
        int32_t *tok = malloc(sizeof(int32_t) * M);
        sample_row *rows = malloc(sizeof(sample_row) * M);
        rng *ra = malloc(sizeof(rng) * M), *rb = malloc(sizeof(rng) * M);
        assert_true(l && lp && work && tok && rows && ra && rb);
        for (int i = 0; i < M; i++) {
            fill_row(&g, l + (long)i * V, V, i % 5);
            sample_params sp = row_params(i, V);
            rng_seed(&ra[i], 1000u * (uint64_t)s + (uint64_t)i);
            rb[i] = ra[i];
            rows[i] = (sample_row){.temperature = sp.temperature, .top_p = sp.top_p, .top_k = sp.top_k, .u = 0.0f};
            if (!sample_greedy(sp.temperature)) rows[i].u = rng_uniform(&rb[i]);
        }
        assert_int_equal(op_sample(&k, tok, lp, l, M, V, rows, &e), 0);
        for (int i = 0; i < M; i++) {
            sample_params sp = row_params(i, V);
            float want_lp;
            int32_t want = sample_token(l + (long)i * V, V, &sp, &ra[i], &want_lp, work);
            if (tok[i] != want || memcmp(&lp[i], &want_lp, sizeof(float)))
                fail_msg("V %d row %d (T %g top_k %d top_p %g): op %d / %.9g, sample_token %d / %.9g", V, i,
                         sp.temperature, sp.top_k, sp.top_p, tok[i], lp[i], want, want_lp);
            assert_memory_equal(&ra[i], &rb[i], sizeof(rng));
            assert_true(tok[i] >= 0 && tok[i] < V);
            greedy += sample_greedy(sp.temperature);
            rows_checked++;
        }
        free(l), free(lp), free(work), free(tok), free(rows), free(ra), free(rb);
    }
    printf("# op_sample = sample_token bit for bit on %ld rows (%ld greedy), vocabularies 1 to 32000\n",
           rows_checked, greedy);
    assert_int_equal(op_sample(&k, NULL, NULL, NULL, 0, 5, NULL, &e), 0); /* no rows: nothing to do */
    assert_int_equal(op_sample(&k, NULL, NULL, NULL, 1, 0, NULL, &e), -1);
    printf("# empty vocabulary: %s\n", e.msg);
    kctx_free(&k);
}

/* sample_row_pick against the comparison-sort reference, u at 0, just under 1 and random. */
static void test_pick_equals_reference(void **state) {
    (void)state;
    int Vs[] = {1, 2, 5, 64, 777, 5000};
    rng g;
    rng_seed(&g, 99);
    long n = 0;
    for (int s = 0; s < 6; s++) {
        int V = Vs[s];
        float *l = malloc(sizeof(float) * (size_t)V), *work = malloc(sizeof(float) * SAMPLE_WORK_FLOATS(V));
        assert_true(l && work);
        for (int i = 0; i < 360; i++) {
            fill_row(&g, l, V, i % 5);
            sample_params sp = row_params(i, V);
            float us[] = {rng_uniform(&g), 0.0f, nextafterf(1.0f, 0.0f)};
            sample_row sr = {.temperature = sp.temperature, .top_p = sp.top_p, .top_k = sp.top_k,
                             .u = us[(i / 64) % 3]};
            float lp, want_lp;
            int32_t t = sample_row_pick(l, V, &sr, &lp, work), want = ref_pick(l, V, &sr, &want_lp);
            if (t != want || memcmp(&lp, &want_lp, sizeof(float)))
                fail_msg("V %d row %d (T %g top_k %d top_p %g u %.9g): pick %d / %.9g, reference %d / %.9g", V, i,
                         sr.temperature, sr.top_k, sr.top_p, sr.u, t, lp, want, want_lp);
            n++;
        }
        free(l), free(work);
    }
    printf("# sample_row_pick = comparison-sort reference bit for bit on %ld rows\n", n);
}

/* Exact ties go to the lower index, in the order and at every cut: with logits {1, 3, 3, 3, 1}
 * at T = 1, top_k 2 keeps tokens 1 and 2 (not 3), and u just under 2/3 of the kept mass picks 2. */
static void test_tie_order(void **state) {
    (void)state;
    float l[5] = {1.0f, 3.0f, 3.0f, 3.0f, 1.0f}, work[SAMPLE_WORK_FLOATS(5)], lp;
    sample_row sr = {.temperature = 1.0f, .top_p = 1.0f, .top_k = 2, .u = 0.0f};
    assert_int_equal(sample_row_pick(l, 5, &sr, &lp, work), 1);
    assert_float_equal(lp, 3.0 - log(2 * exp(1.0) + 3 * exp(3.0)), 1e-6); /* the whole distribution's, not log 1/2 */
    sr.u = 0.49f;
    assert_int_equal(sample_row_pick(l, 5, &sr, &lp, work), 1);
    sr.u = 0.51f;
    assert_int_equal(sample_row_pick(l, 5, &sr, &lp, work), 2);
    sr.u = 0.99f;
    assert_int_equal(sample_row_pick(l, 5, &sr, &lp, work), 2); /* token 3 is cut */
    sr.top_k = 0;
    sr.top_p = 0.5f; /* 1 and 2 reach 0.5 of the mass (each ~0.32) */
    assert_int_equal(sample_row_pick(l, 5, &sr, &lp, work), 2);
    sr.temperature = 0.0f; /* greedy: the lowest of the tied maxima */
    assert_int_equal(sample_row_pick(l, 5, &sr, &lp, work), 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_op_equals_sample_token),
        cmocka_unit_test(test_pick_equals_reference),
        cmocka_unit_test(test_tie_order),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
