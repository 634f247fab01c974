/* Generation: greedy decoding against HF (tests/data/<cfg>/generate.json: HF generate()'s tokens,
 * and the greedy re-forward of a float64 copy of the model with its logprobs; the two agree), sampling reproducibility and truncation,
 * stop tokens, and the routing record (per step, prompt and response) against one full forward. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rollout/generate.h"

typedef struct {
    dsv4_model m;
    kctx k;
    arena a;
    int B, P, N;
    int32_t *prompt; /* [B, P] */
    int32_t *want;   /* [B, N] */
    double *want_lp; /* [B, N] */
} fixture;

static void load_fixture(fixture *f, const char *cfg) {
    char dir[1024], path[1100];
    mill_err e = {{0}};
    snprintf(dir, sizeof dir, "%s/%s", MILL_TEST_DATA, cfg);
    if (model_load(&f->m, dir, &e)) fail_msg("%s", e.msg);
    kctx_init(&f->k, DEVICE_CPU, &e);
    arena_init(&f->a, 1 << 20, &e);
    snprintf(path, sizeof path, "%s/generate.json", dir);
    json_error_t je;
    json_t *g = json_load_file(path, 0, &je);
    assert_non_null(g);
    json_t *in = json_object_get(g, "input_ids"), *out = json_object_get(g, "output_ids"), *lp = json_object_get(g, "logprobs");
    /* the golden's two oracles must agree, or it is not a golden */
    assert_true(json_equal(out, json_object_get(g, "hf_generate_output_ids")));
    f->B = (int)json_array_size(in);
    f->P = (int)json_array_size(json_array_get(in, 0));
    f->N = (int)json_integer_value(json_object_get(g, "max_new_tokens"));
    f->prompt = malloc(sizeof(int32_t) * (size_t)(f->B * f->P));
    f->want = malloc(sizeof(int32_t) * (size_t)(f->B * f->N));
    f->want_lp = malloc(sizeof(double) * (size_t)(f->B * f->N));
    for (int b = 0; b < f->B; b++) {
        for (int t = 0; t < f->P; t++)
            f->prompt[b * f->P + t] = (int32_t)json_integer_value(json_array_get(json_array_get(in, (size_t)b), (size_t)t));
        for (int t = 0; t < f->N; t++) {
            f->want[b * f->N + t] = (int32_t)json_integer_value(json_array_get(json_array_get(out, (size_t)b), (size_t)t));
            f->want_lp[b * f->N + t] = json_number_value(json_array_get(json_array_get(lp, (size_t)b), (size_t)t));
        }
    }
    json_decref(g);
}

static void free_fixture(fixture *f) {
    free(f->prompt);
    free(f->want);
    free(f->want_lp);
    arena_free(&f->a);
    model_free(&f->m);
}

static void run_path(fixture *f, const sample_params *sp, gen_result *res, int cached) {
    mill_err e = {{0}};
    const int32_t **rows = malloc(sizeof *rows * (size_t)f->B);
    int *lens = malloc(sizeof(int) * (size_t)f->B);
    for (int b = 0; b < f->B; b++) {
        rows[b] = f->prompt + b * f->P;
        lens[b] = f->P;
    }
    int rc = cached ? generate_cached(&f->m, &f->k, rows, lens, f->B, sp, (size_t)1 << 30, res, &e)
                    : generate(&f->m, &f->k, rows, lens, f->B, sp, res, &f->a, &e);
    if (rc) fail_msg("%s", e.msg);
    free(rows);
    free(lens);
}

static void run(fixture *f, const sample_params *sp, gen_result *res) { run_path(f, sp, res, 0); }

/* The cached engine against the re-forward path: same tokens, finish reasons and routing, logprobs
 * bit for bit on the CPU; greedy and sampled, with a stop id that ends rows at different steps. */
static void cached_matches_reference(const char *cfg) {
    fixture f;
    load_fixture(&f, cfg);
    int L = f.m.cfg.num_hidden_layers, K = f.m.cfg.num_experts_per_tok;
    sample_params cases[3] = {{.temperature = 0, .top_p = 1, .max_new_tokens = f.N},
                              {.temperature = 0.9f, .top_p = 0.95f, .top_k = 20, .seed = 5, .max_new_tokens = f.N},
                              {.temperature = 0, .top_p = 1, .max_new_tokens = f.N, .n_stop = 1}};
    cases[2].stop[0] = f.want[3]; /* row 0 stops at its 4th token; row 1 most likely runs to length */
    double worst = 0;
    for (int ci = 0; ci < 3; ci++) {
        gen_result a, b;
        run_path(&f, &cases[ci], &a, 0);
        run_path(&f, &cases[ci], &b, 1);
        for (int r = 0; r < f.B; r++) {
            assert_int_equal(a.out_len[r], b.out_len[r]);
            assert_int_equal(a.finish[r], b.finish[r]);
            assert_memory_equal(a.out_ids + r * f.N, b.out_ids + r * f.N, sizeof(int32_t) * (size_t)a.out_len[r]);
            for (int t = 0; t < a.out_len[r]; t++) {
                double d = fabs(a.logprobs[r * f.N + t] - b.logprobs[r * f.N + t]);
                worst = d > worst ? d : worst;
            }
            assert_memory_equal(a.routing[r], b.routing[r], sizeof(int32_t) * (size_t)L * (f.P + a.out_len[r]) * K);
        }
        if (ci == 2) assert_int_equal(a.finish[0], FINISH_STOP);
        gen_result_free(&a);
        gen_result_free(&b);
    }
    printf("# %s: cached generation = re-forward generation (3 sampling setups), worst logprob diff %.2e\n", cfg, worst);
    assert_true(worst == 0.0); /* batch-invariant ops: the same bits whatever the batch */
    free_fixture(&f);
}

static void test_cached_tiny_a(void **s) {
    (void)s;
    cached_matches_reference("tiny-a");
}

static void test_cached_tiny_b(void **s) {
    (void)s;
    cached_matches_reference("tiny-b");
}

static void greedy_matches_hf(const char *cfg) {
    fixture f;
    load_fixture(&f, cfg);
    sample_params sp = {.temperature = 0, .top_p = 1, .max_new_tokens = f.N};
    gen_result res;
    run_path(&f, &sp, &res, 1); /* the cached engine, as mill generate runs */
    double worst = 0;
    for (int b = 0; b < f.B; b++) {
        assert_int_equal(res.out_len[b], f.N);
        assert_int_equal(res.finish[b], FINISH_LENGTH);
        for (int t = 0; t < f.N; t++) {
            assert_int_equal(res.out_ids[b * f.N + t], f.want[b * f.N + t]);
            double d = fabs(res.logprobs[b * f.N + t] - f.want_lp[b * f.N + t]);
            worst = d > worst ? d : worst;
        }
    }
    printf("# %s: %d x %d greedy tokens identical to HF generate(), worst logprob diff %.2e\n", cfg, f.B, f.N, worst);
    assert_true(worst < 1e-4);

    /* The routing recorded step by step equals the routing of one forward over the final sequences:
     * the kernels give a token the same result whatever else is in the batch. */
    int T = f.P + f.N, L = f.m.cfg.num_hidden_layers, K = f.m.cfg.num_experts_per_tok;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(f.B * T)), *routing = malloc(sizeof(int32_t) * (size_t)(L * f.B * T * K));
    float *logits = malloc(sizeof(float) * (size_t)f.B * T * f.m.cfg.vocab_size);
    for (int b = 0; b < f.B; b++) {
        memcpy(ids + b * T, f.prompt + b * f.P, sizeof(int32_t) * (size_t)f.P);
        memcpy(ids + b * T + f.P, res.out_ids + b * f.N, sizeof(int32_t) * (size_t)f.N);
    }
    mill_err e;
    assert_int_equal(model_forward(&f.m, &f.k, ids, f.B, T, logits, routing, &f.a, &e), 0);
    for (int b = 0; b < f.B; b++)
        for (int l = 0; l < L; l++)
            assert_memory_equal(res.routing[b] + (long)l * T * K, routing + ((long)l * f.B + b) * T * K,
                                sizeof(int32_t) * (size_t)(T * K));
    free(ids);
    free(routing);
    free(logits);
    gen_result_free(&res);
    free_fixture(&f);
}

static void test_greedy_tiny_a(void **s) {
    (void)s;
    greedy_matches_hf("tiny-a");
}

static void test_greedy_tiny_b(void **s) {
    (void)s;
    greedy_matches_hf("tiny-b");
}

static void test_sampling(void **s) {
    (void)s;
    fixture f;
    load_fixture(&f, "tiny-b");
    f.N = 6;
    sample_params sp = {.temperature = 1.0f, .top_p = 1, .seed = 42, .max_new_tokens = f.N};
    gen_result r1, r2, r3, g;
    run(&f, &sp, &r1);
    run(&f, &sp, &r2); /* same seed: same tokens and logprobs */
    assert_memory_equal(r1.out_ids, r2.out_ids, sizeof(int32_t) * (size_t)(f.B * f.N));
    assert_memory_equal(r1.logprobs, r2.logprobs, sizeof(float) * (size_t)(f.B * f.N));
    sp.seed = 43;
    run(&f, &sp, &r3);
    assert_memory_not_equal(r1.out_ids, r3.out_ids, sizeof(int32_t) * (size_t)(f.B * f.N));
    /* top-k 1 and a tiny top-p both collapse to greedy; the logprob is the whole distribution's at
     * temperature 0.7 (not 0, the one kept token's renormalised) */
    sample_params gp = {.temperature = 0, .top_p = 1, .max_new_tokens = f.N};
    run(&f, &gp, &g);
    sample_params k1 = {.temperature = 0.7f, .top_p = 1, .top_k = 1, .seed = 1, .max_new_tokens = f.N};
    sample_params p0 = {.temperature = 0.7f, .top_p = 1e-6f, .seed = 1, .max_new_tokens = f.N};
    gen_result rk, rp;
    run(&f, &k1, &rk);
    run(&f, &p0, &rp);
    assert_memory_equal(rk.out_ids, g.out_ids, sizeof(int32_t) * (size_t)(f.B * f.N));
    assert_memory_equal(rp.out_ids, g.out_ids, sizeof(int32_t) * (size_t)(f.B * f.N));
    for (int i = 0; i < f.B * f.N; i++) {
        assert_true(rk.logprobs[i] < 0.0f && rk.logprobs[i] == rp.logprobs[i]);
        assert_true(r1.logprobs[i] <= 0.0f);
    }
    /* a stop id ends the row there and is kept */
    sample_params st = gp;
    st.n_stop = 1;
    st.stop[0] = g.out_ids[2];
    gen_result rs;
    run(&f, &st, &rs);
    assert_int_equal(rs.finish[0], FINISH_STOP);
    assert_true(rs.out_len[0] <= 3);
    assert_int_equal(rs.out_ids[rs.out_len[0] - 1], g.out_ids[2]);
    gen_result_free(&r1);
    gen_result_free(&r2);
    gen_result_free(&r3);
    gen_result_free(&g);
    gen_result_free(&rk);
    gen_result_free(&rp);
    gen_result_free(&rs);
    free_fixture(&f);
}

/* The sampler's distribution: with top-k 3 at temperature 1, tokens outside the top 3 never appear
 * and frequencies follow the renormalised softmax; logprobs are the whole softmax's logs. */
static void test_sampler_distribution(void **s) {
    (void)s;
    float logits[6] = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, 3.0f}, work[SAMPLE_WORK_FLOATS(6)], lp;
    sample_params sp = {.temperature = 1.0f, .top_p = 1.0f, .top_k = 3};
    rng r;
    rng_seed(&r, 7);
    int count[6] = {0};
    double z = exp(3.0) + exp(2.0) + exp(1.0), zall = z + exp(0.5) + exp(0.0) + exp(-1.0);
    for (int i = 0; i < 20000; i++) {
        int t = sample_token(logits, 6, &sp, &r, &lp, work);
        count[t]++;
        double want = t == 5 ? 3.0 : t == 0 ? 2.0 : 1.0;
        assert_float_equal(lp, want - log(zall), 1e-5);
    }
    assert_int_equal(count[2] + count[3] + count[4], 0);
    assert_float_equal(count[5] / 20000.0, exp(3.0) / z, 0.02);
    assert_float_equal(count[1] / 20000.0, exp(1.0) / z, 0.02);
}

/* The sampler's order is a radix sort; it must equal the comparison sort it replaced (value
 * descending, ties to the lower index) exactly, so picks and logprobs are unchanged: checked on
 * probabilities with many exact ties, zeros and subnormals. */
static int ref_desc(const void *a, const void *b, void *ctx) {
    const float *v = ctx;
    int i = *(const int *)a, j = *(const int *)b;
    if (v[i] != v[j]) return v[i] > v[j] ? -1 : 1;
    return i - j;
}

static void test_sampler_order(void **s) {
    (void)s;
    enum { V = 5000 };
    float *p = malloc(sizeof(float) * V);
    int *order = malloc(sizeof(int) * V), *tmp = malloc(sizeof(int) * V), *ref = malloc(sizeof(int) * V);
    rng g;
    rng_seed(&g, 11);
    int trials = 0;
    for (int trial = 0; trial < 30; trial++, trials++) {
        for (int v = 0; v < V; v++) { /* quantised exponents: ties; a wide range: 0 and subnormals */
            float x = roundf(rng_uniform(&g) * 40.0f) / 2.0f;
            p[v] = trial % 3 == 0 ? ldexpf(1.0f, -(int)(x * 8.0f)) : expf(-x * 5.0f);
        }
        for (int v = 0; v < V; v++) ref[v] = v;
        qsort_r(ref, V, sizeof(int), ref_desc, p);
        sample_order_desc(order, tmp, p, V);
        assert_memory_equal(order, ref, sizeof(int) * V);
    }
    printf("# sampler order: radix = comparison sort on %d arrays of %d probabilities with ties, 0 and subnormals\n",
           trials, (int)V);
    free(p), free(order), free(tmp), free(ref);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_tiny_a),
        cmocka_unit_test(test_greedy_tiny_b),
        cmocka_unit_test(test_sampling),
        cmocka_unit_test(test_sampler_distribution),
        cmocka_unit_test(test_sampler_order),
        cmocka_unit_test(test_cached_tiny_a),
        cmocka_unit_test(test_cached_tiny_b),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
