/* The cached engine against the full forward: every position's logits, fed as a prefill chunk
 * then token by token (crossing CSA and HCA window closings), with two sequences of different
 * lengths sharing steps, joining late and leaving early; and admission against the budget.
 * On the CPU the two must agree to the bit: every op computes a token the same way whatever else
 * is in the batch (op_linear is row-invariant; the cache ops share the full ops' arithmetic). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "test_util.h"
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rollout/engine.h"

static int32_t *load_ids(const char *path, int *B, int *T) {
    int32_t *ids = test_load_ids(path, B, T);
    assert_non_null(ids);
    return ids;
}

static void cached_matches_full(const char *cfg) {
    char dir[1024], path[1100];
    mill_err e = {{0}};
    snprintf(dir, sizeof dir, "%s/%s", MILL_TEST_DATA, cfg);
    dsv4_model m;
    if (model_load(&m, dir, &e)) fail_msg("%s", e.msg);
    snprintf(path, sizeof path, "%s/input.json", dir);
    int B, T;
    int32_t *ids = load_ids(path, &B, &T);
    int V = m.cfg.vocab_size, L = m.cfg.num_hidden_layers, K = m.cfg.num_experts_per_tok;
    /* row 0 runs the whole T tokens; row 1 only its first T1, so lengths differ */
    int T1 = T - 37;
    kctx k;
    arena a;
    kctx_init(&k, DEVICE_CPU, &e);
    arena_init(&a, 1 << 20, &e);
    float *full0 = malloc(sizeof(float) * (size_t)T * V), *full1 = malloc(sizeof(float) * (size_t)T1 * V);
    int32_t *r0 = malloc(sizeof(int32_t) * (size_t)(L * T * K)), *r1 = malloc(sizeof(int32_t) * (size_t)(L * T1 * K));
    if (model_forward(&m, &k, ids, 1, T, full0, r0, &a, &e) || model_forward(&m, &k, ids + T, 1, T1, full1, r1, &a, &e))
        fail_msg("%s", e.msg);

    engine en;
    assert_int_equal(engine_init(&en, &m, &k, (size_t)1 << 30, &e), 0);
    engine_seq *s0, *s1;
    assert_int_equal(engine_seq_new(&en, T, &s0, &e), 0);
    assert_int_equal(engine_seq_new(&en, T1, &s1, &e), 0);
    float *lg = malloc(sizeof(float) * (size_t)2 * 64 * V);
    int32_t *rt = malloc(sizeof(int32_t) * (size_t)(L * 2 * 64 * K));
    double worst = 0;
    int route_diff = 0;
    /* step 0: row 0 prefills 61 tokens alone (the fresh-prefill path); row 1 joins at step 1 with
     * a 50-token prefill; row 0 continues with a 13-token chunk at step 2 and row 1 with a 9-token
     * chunk at step 3 (waves that mix a chunk with the other's decode token); then both decode one
     * token per step until row 1 leaves at T1 and row 0 at T */
    int p0 = 0, p1 = 0;
    for (int step = 0; p0 < T; step++) {
        engine_seq *seqs[2];
        const int32_t *toks[2];
        int nt[2], ns = 0, start[2];
        int n0 = step == 0 ? 61 : step == 2 ? 13 : 1;
        seqs[ns] = s0, toks[ns] = ids + p0, nt[ns] = n0, start[ns] = p0, ns++;
        if (step >= 1 && p1 < T1) {
            int n1 = step == 1 ? 50 : step == 3 ? 9 : 1;
            seqs[ns] = s1, toks[ns] = ids + T + p1, nt[ns] = n1, start[ns] = p1, ns++;
        }
        if (engine_step(&en, seqs, toks, nt, ns, lg, 0, rt, &e)) fail_msg("step %d: %s", step, e.msg);
        int tot = nt[0] + (ns > 1 ? nt[1] : 0);
        for (int i = 0, off = 0; i < ns; off += nt[i], i++) {
            const float *ref = i == 0 ? full0 : full1;
            const int32_t *rref = i == 0 ? r0 : r1;
            int Tr = i == 0 ? T : T1;
            for (int j = 0; j < nt[i]; j++) {
                int p = start[i] + j;
                double num = 0, den = 0;
                for (int v = 0; v < V; v++) {
                    double dlt = lg[(long)(off + j) * V + v] - ref[(long)p * V + v];
                    num += dlt * dlt;
                    den += (double)ref[(long)p * V + v] * ref[(long)p * V + v];
                }
                double rel = sqrt(num / den);
                worst = rel > worst ? rel : worst;
                for (int l = 0; l < L; l++)
                    route_diff += memcmp(rt + ((long)l * tot + off + j) * K, rref + ((long)l * Tr + p) * K,
                                         sizeof(int32_t) * (size_t)K) != 0;
            }
        }
        p0 += n0;
        if (ns > 1) p1 += nt[1];
        if (p1 == T1 && s1) { /* row 1 leaves; its cache returns to the budget */
            engine_seq_free(&en, s1);
            s1 = NULL;
            p1 = T1 + 1;
        }
    }
    printf("# %s: cached logits vs full forward over %d + %d positions: worst relative error %.3e, %d routing "
           "differences\n", cfg, T, T1, worst, route_diff);
    assert_true(worst == 0.0);
    assert_int_equal(route_diff, 0);
    assert_int_equal(engine_seq_len(s0), T);
    /* a sequence cannot outgrow what it was admitted with */
    const int32_t *one = ids;
    int n1 = 1;
    assert_int_equal(engine_step(&en, &s0, &one, &n1, 1, lg, 0, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "admitted"));
    engine_seq_free(&en, s0);
    assert_int_equal(en.used, 0);
    engine_free(&en);
    free(ids);
    free(full0);
    free(full1);
    free(r0);
    free(r1);
    free(lg);
    free(rt);
    arena_free(&a);
    model_free(&m);
}

static void test_cached_tiny_a(void **s) {
    (void)s;
    cached_matches_full("tiny-a");
}

static void test_cached_tiny_b(void **s) {
    (void)s;
    cached_matches_full("tiny-b");
}

static void test_admission(void **s) {
    (void)s;
    char dir[1024];
    mill_err e = {{0}};
    snprintf(dir, sizeof dir, "%s/tiny-a", MILL_TEST_DATA);
    dsv4_model m;
    if (model_load(&m, dir, &e)) fail_msg("%s", e.msg);
    kctx k;
    kctx_init(&k, DEVICE_CPU, &e);
    engine en;
    size_t one = 0;
    assert_int_equal(engine_init(&en, &m, &k, 0, &e), 0);
    one = engine_seq_bytes(&en, 256);
    engine_free(&en);
    assert_int_equal(engine_init(&en, &m, &k, 2 * one + one / 2, &e), 0);
    engine_seq *a, *b, *c;
    assert_int_equal(engine_seq_new(&en, 256, &a, &e), 0);
    assert_int_equal(engine_seq_new(&en, 256, &b, &e), 0);
    assert_int_equal(engine_seq_new(&en, 256, &c, &e), -1); /* over budget: refused, not grown */
    assert_non_null(strstr(e.msg, "budget"));
    assert_null(c);
    engine_seq_free(&en, a);
    assert_int_equal(engine_seq_new(&en, 256, &c, &e), 0); /* room again once one leaves */
    engine_seq_free(&en, b);
    engine_seq_free(&en, c);
    engine_free(&en);
    model_free(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cached_tiny_a),
        cmocka_unit_test(test_cached_tiny_b),
        cmocka_unit_test(test_admission),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
