/* GRPO math against hand-computed values and finite differences. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <math.h>
#include <string.h>

#include "algos/grpo.h"

static void test_advantages(void **s) {
    (void)s;
    float r[8] = {1, 0, 0, 1, 1, 1, 1, 1}, adv[8];
    grpo_advantages(r, 2, 4, 0, adv);
    float want[8] = {0.5f, -0.5f, -0.5f, 0.5f, 0, 0, 0, 0};
    for (int i = 0; i < 8; i++) assert_float_equal(adv[i], want[i], 1e-7);
    grpo_advantages(r, 2, 4, 1, adv); /* std (unbiased) of {1,0,0,1} = sqrt(1/3) */
    assert_float_equal(adv[0], 0.5 / (sqrt(1.0 / 3.0) + 1e-6), 1e-6);
    assert_float_equal(adv[4], 0.0, 1e-7); /* an all-equal group has no signal */
}

static double run(grpo_config *c, const int32_t *seq, int nseq, const float *adv, const float *old, const float *ref,
                  const float *logp, int n, float *dlogp, grpo_stats *st) {
    grpo_batch b = {.cfg = c, .seq = seq, .n_seqs = nseq, .adv = adv, .old_logp = old, .ref_logp = ref};
    double loss;
    mill_err e;
    assert_int_equal(grpo_loss(&b, logp, n, dlogp, &loss, &e), 0);
    if (st) *st = b.stats;
    return loss;
}

static void test_clipped_loss(void **s) {
    (void)s;
    grpo_config c;
    grpo_config_default(&c);
    int32_t seq[4] = {0, 0, 1, 1};
    float adv[2] = {2.0f, -1.0f}, old[4] = {-1, -1, -1, -1}, dl[4];
    grpo_stats st;
    /* on-policy: ratio 1, loss = -mean(A) over tokens = -(2+2-1-1)/4, dlogp = -A/4 */
    float lp0[4] = {-1, -1, -1, -1};
    assert_float_equal(run(&c, seq, 2, adv, old, NULL, lp0, 4, dl, &st), -0.5, 1e-7);
    assert_float_equal(dl[0], -0.5, 1e-7);
    assert_float_equal(dl[2], 0.25, 1e-7);
    assert_float_equal(st.clip_frac, 0.0, 1e-12);
    /* token 0: ratio e^0.5 = 1.65 > 1.28 with A > 0 -> clipped, no gradient;
     * token 2: ratio e^-0.5 = 0.61 < 0.8 with A < 0 -> clipped, no gradient */
    float lp1[4] = {-0.5f, -1, -1.5f, -1};
    double loss = run(&c, seq, 2, adv, old, NULL, lp1, 4, dl, &st);
    double want = -(1.28 * 2 + 2 + 0.8 * -1 + -1) / 4;
    assert_float_equal(loss, want, 1e-6);
    assert_float_equal(dl[0], 0.0, 0);
    assert_float_equal(dl[2], 0.0, 0);
    assert_float_equal(st.clip_frac, 0.5, 1e-12);
    /* sequence mean: sequence 1 has one token, so it weighs as much as both tokens of sequence 0 */
    c.seq_mean = 1;
    int32_t seq2[3] = {0, 0, 1};
    assert_float_equal(run(&c, seq2, 2, adv, old, NULL, lp0, 3, dl, NULL), -(2.0 + -1.0) / 2, 1e-7);
    assert_float_equal(dl[0], -2.0 / 4, 1e-7);
    assert_float_equal(dl[2], 1.0 / 2, 1e-7);
}

/* d loss / d logp against central differences, with KL (each estimator) and clipping mixed in. */
static void test_gradient_fd(void **s) {
    (void)s;
    for (int kt = 1; kt <= 3; kt++) {
        grpo_config c;
        grpo_config_default(&c);
        c.kl_coef = 0.3;
        c.kl_type = (grpo_kl)kt;
        int32_t seq[6] = {0, 0, 1, 1, 1, 2};
        float adv[3] = {1.5f, -0.7f, 0.4f}, old[6] = {-1, -2, -0.5f, -1.2f, -3, -0.1f};
        float ref[6] = {-1.1f, -1.8f, -0.6f, -1.0f, -2.5f, -0.3f}, lp[6] = {-0.9f, -2.05f, -0.45f, -1.3f, -2.9f, -0.15f};
        float dl[6], tmp[6];
        run(&c, seq, 3, adv, old, ref, lp, 6, dl, NULL);
        for (int t = 0; t < 6; t++) {
            float p[6], m[6];
            memcpy(p, lp, sizeof p);
            memcpy(m, lp, sizeof m);
            p[t] += 1e-3f;
            m[t] -= 1e-3f;
            double fd = (run(&c, seq, 3, adv, old, ref, p, 6, tmp, NULL) - run(&c, seq, 3, adv, old, ref, m, 6, tmp, NULL)) /
                        (double)(p[t] - m[t]);
            assert_float_equal(dl[t], fd, 2e-3 * (fabs(fd) + 1e-2));
        }
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_advantages),
        cmocka_unit_test(test_clipped_loss),
        cmocka_unit_test(test_gradient_fd),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
