/* GRPO math against hand-computed values and finite differences. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "algos/grpo.h"
#include "common/config.h"
#include "trainer/model.h"

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
    assert_int_equal(grpo_loss(&b, logp, NULL, n, dlogp, NULL, &loss, &e), 0);
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

/* d loss / d logp against central differences, with KL (each estimator: k1, k2, k3, abs, unbiased)
 * and clipping mixed in; then the aggregations (each) and GSPO's sequence ratio under
 * seq-mean-token-mean, whose token-level gradient is the true gradient of the sequence objective. */
static void test_gradient_fd(void **s) {
    (void)s;
    for (int kt = 1; kt <= 5 + 4 + 1; kt++) {
        grpo_config c;
        grpo_config_default(&c);
        c.kl_coef = 0.3;
        c.kl_type = (grpo_kl)(kt <= 5 ? kt : KL_K3);
        if (kt > 5 && kt <= 9) c.agg = (grpo_agg)(kt - 6), c.agg_horizon = 7;
        if (kt == 10) c.ratio = RATIO_GSPO, c.agg = AGG_SEQ_MEAN_TOKEN_MEAN, c.kl_coef = 0;
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

/* The loss options against their reference formulas (verl's compute_policy_loss, agg_loss, kl_penalty,
 * compute_policy_loss_gspo). */
static void test_loss_options(void **s) {
    (void)s;
    grpo_config c;
    grpo_config_default(&c);
    int32_t seq[4] = {0, 0, 1, 1};
    float adv[2] = {-1.0f, 2.0f}, old[4] = {-1, -1, -1, -1}, dl[4];
    /* dual-clip: a negative advantage's loss is at most -A * c, with no gradient there */
    float lp[4] = {-1 + logf(5.0f), -1 + logf(0.5f), -1 + logf(5.0f), -1 + logf(0.5f)};
    c.clip_ratio_c = 3.0;
    double l = run(&c, seq, 2, adv, old, NULL, lp, 4, dl, NULL);
    /* tokens: A=-1 ratio 5: min(3, max(5, 1.28)) = 3; A=-1 ratio .5: max(.5, .8) = .8 (clipped);
     * A=2 ratio 5: max(-10, -2.56) = -2.56 (clipped); A=2 ratio .5: max(-1, -1.6) = -1 */
    assert_float_equal(l, (3 + 0.8 - 2.56 - 1) / 4, 1e-6);
    assert_float_equal(dl[0], 0, 0);
    assert_float_equal(dl[1], 0, 0);
    assert_float_equal(dl[2], 0, 0);
    assert_float_equal(dl[3], -2 * 0.5 / 4, 1e-6);
    c.clip_ratio_c = 0; /* off: the first token's loss is 5 */
    assert_float_equal(run(&c, seq, 2, adv, old, NULL, lp, 4, dl, NULL), (5 + 0.8 - 2.56 - 1) / 4, 1e-6);
    /* aggregations of the token losses 5, .8 | -2.56, -1 over a 2- and a 2-token sequence; then 1 + 3 */
    int32_t seq3[4] = {0, 1, 1, 1};
    double tok[4] = {5, 0.8, -2.56, -1};
    float adv3[2] = {-1.0f, -1.0f}, lp3[4] = {lp[0], lp[1], -1 + logf(1.28f), -1 + logf(1.0f)};
    tok[2] = 1.28, tok[3] = 1.0;
    double want[4] = {(tok[0] + tok[1] + tok[2] + tok[3]) / 4, (tok[0] + (tok[1] + tok[2] + tok[3]) / 3) / 2,
                      (tok[0] + tok[1] + tok[2] + tok[3]) / 2, (tok[0] + tok[1] + tok[2] + tok[3]) / 10};
    for (int a = 0; a < 4; a++) {
        c.agg = (grpo_agg)a;
        c.agg_horizon = 10;
        assert_float_equal(run(&c, seq3, 2, adv3, old, NULL, lp3, 4, dl, NULL), want[a], 1e-6);
    }
    c.agg = AGG_TOKEN_MEAN;
    /* a log-ratio clamp: ratio exp(c) past it, no gradient */
    c.log_ratio_clamp = 0.1;
    float lp4[4] = {-0.5f, -1.05f, -1, -1};
    c.eps_low = c.eps_high = 10; /* no PPO clip in the way */
    run(&c, seq, 2, adv, old, NULL, lp4, 4, dl, NULL);
    assert_float_equal(dl[0], 0, 0);
    assert_float_equal(dl[1], 1.0 * exp(-0.05) / 4, 1e-6);
    c.log_ratio_clamp = 0;
    /* GSPO: every token of a sequence has the sequence's ratio exp(mean log-ratio) */
    c.ratio = RATIO_GSPO;
    float lp5[4] = {-0.8f, -1.0f, -1.1f, -1.3f};
    grpo_stats st;
    run(&c, seq, 2, adv, old, NULL, lp5, 4, dl, &st);
    assert_float_equal(st.max_ratio, exp(0.1), 1e-6);
    assert_float_equal(dl[0], 1.0 * exp(0.1) / 4, 1e-6);
    assert_float_equal(dl[1], dl[0], 0);
    assert_float_equal(dl[2], -2.0 * exp(-0.2) / 4, 1e-6);
    /* a NaN logprob fails, naming the token and its sequence */
    lp5[3] = NAN;
    grpo_batch b = {.cfg = &c, .seq = seq, .n_seqs = 2, .adv = adv, .old_logp = old};
    double loss;
    mill_err e;
    assert_int_equal(grpo_loss(&b, lp5, NULL, 4, dl, NULL, &loss, &e), -1);
    assert_non_null(strstr(e.msg, "token 3 of sequence 1 has a NaN logprob"));
    lp5[3] = -1;
    float ref[4] = {-1, -1, NAN, -1};
    c.kl_coef = 0.1;
    b.ref_logp = ref;
    assert_int_equal(grpo_loss(&b, lp5, NULL, 4, dl, NULL, &loss, &e), -1);
    assert_non_null(strstr(e.msg, "token 2 of sequence 1 has a NaN reference logprob"));
}

/* Entropy bonus and TIS against hand-computed values; old_logp NULL means on-policy. */
static void test_entropy_tis(void **s) {
    (void)s;
    grpo_config c;
    grpo_config_default(&c);
    c.entropy_coef = 0.1;
    c.tis_cap = 2.0;
    int32_t seq[2] = {0, 1};
    float adv[2] = {1.0f, -1.0f}, lp[2] = {-1.0f, -2.0f}, ro[2] = {-1.5f, -1.0f}, ent[2] = {0.5f, 1.5f};
    float dl[2], de[2] = {0, 0};
    grpo_batch b = {.cfg = &c, .seq = seq, .n_seqs = 2, .adv = adv, .rollout_logp = ro};
    double loss;
    mill_err e;
    assert_int_equal(grpo_loss(&b, lp, ent, 2, dl, de, &loss, &e), 0);
    /* ratio 1; TIS weights min(e^0.5, 2) = 1.6487 and e^-1 = 0.3679 */
    double w0 = exp(0.5), w1 = exp(-1.0);
    double want = (-(1.0 * w0) - 0.1 * 0.5 + (1.0 * w1) - 0.1 * 1.5) / 2;
    assert_float_equal(loss, want, 1e-6);
    assert_float_equal(dl[0], -w0 / 2, 1e-6);
    assert_float_equal(dl[1], w1 / 2, 1e-6);
    assert_float_equal(de[0], -0.05, 1e-7);
    assert_float_equal(b.stats.entropy, 1.0, 1e-7);
    assert_float_equal(b.stats.max_abs_dlogp_old, 1.0, 1e-7);
    c.tis_cap = 1.5; /* the cap binds on token 0 */
    assert_int_equal(grpo_loss(&b, lp, ent, 2, dl, de, &loss, &e), 0);
    assert_float_equal(dl[0], -1.5 / 2, 1e-6);
}

/* A random dsv4-tiny on the CPU with its context and activation arena. */
static void tiny_model(dsv4_model *m, kctx *k, arena *a, uint64_t seed, float std) {
    mill_err e;
    dsv4_config cfg;
    if (config_load(MILL_SOURCE_DIR "/configs/models/dsv4-tiny.json", &cfg, &e)) fail_msg("%s", e.msg);
    assert_int_equal(model_init(m, &cfg, &e), 0);
    model_init_random(m, seed, std);
    assert_int_equal(kctx_init(k, DEVICE_CPU, &e), 0);
    assert_int_equal(arena_init(a, 1 << 20, &e), 0);
}

/* The model's d loss / d head for a loss over logp and entropy, against central differences:
 * checks the entropy gradient the trainer adds to the logits. */
typedef struct {
    const float *a, *b;
} lin_ctx;
static int lin_loss(void *ctx, const float *logp, const float *ent, int n, float *dlogp, float *dent, double *loss,
                    mill_err *e) {
    (void)e;
    const lin_ctx *c = ctx;
    double s = 0;
    for (int i = 0; i < n; i++) {
        s += c->a[i] * logp[i] + c->b[i] * ent[i];
        dlogp[i] = c->a[i];
        dent[i] = c->b[i];
    }
    *loss = s;
    return 0;
}

static void test_entropy_gradient(void **s) {
    (void)s;
    mill_err e;
    dsv4_model m;
    kctx k;
    arena a = {0};
    tiny_model(&m, &k, &a, 3, 0.2f); /* large weights: peaked distributions, entropy far from log V */
    int32_t ids[6] = {256, 10, 20, 30, 40, 50}, tg[6] = {10, 20, 30, 40, 50, -1};
    float av[5] = {0.3f, -0.2f, 0.5f, 0.1f, -0.4f}, bv[5] = {0.7f, -0.5f, 0.2f, 0.9f, 0.4f};
    lin_ctx lc = {av, bv};
    float *g = calloc(m.n_floats, sizeof(float));
    double loss, lp, lm;
    long cnt;
    if (model_forward_backward_tokens(&m, &k, ids, tg, 1, 6, NULL, 0.7f, g, lin_loss, &lc, NULL, &loss, &cnt, &a, &e))
        fail_msg("%s", e.msg);
    /* a forward only: no grads, no loss_fn, no loss (the trainer's logprob recomputation) */
    float logp_only[5];
    long cnt_only = 0;
    if (model_forward_backward_tokens(&m, &k, ids, tg, 1, 6, NULL, 0.7f, NULL, NULL, NULL, logp_only, NULL, &cnt_only,
                                      &a, &e))
        fail_msg("%s", e.msg);
    assert_int_equal(cnt_only, cnt);
    float *scratch = calloc(m.n_floats, sizeof(float));
    long idx[4] = {10 * 64 + 3, 20 * 64 + 7, 257 * 64 + 1, 100 * 64 + 60};
    for (int j = 0; j < 4; j++) {
        float *w = m.head + idx[j], w0 = *w, h = 1e-2f;
        *w = w0 + h;
        assert_int_equal(model_forward_backward_tokens(&m, &k, ids, tg, 1, 6, NULL, 0.7f, scratch, lin_loss, &lc, NULL,
                                                       &lp, &cnt, &a, &e), 0);
        *w = w0 - h;
        assert_int_equal(model_forward_backward_tokens(&m, &k, ids, tg, 1, 6, NULL, 0.7f, scratch, lin_loss, &lc, NULL,
                                                       &lm, &cnt, &a, &e), 0);
        *w = w0;
        double fd = (lp - lm) / (2 * h), an = g[m.head - m.data + idx[j]];
        assert_true(fabs(an - fd) <= 1e-2 * fabs(fd) + 1e-4);
    }
    free(g);
    free(scratch);
    arena_free(&a);
    kctx_free(&k);
    model_free(&m);
}

/* Context parallelism's split of a batch: each "rank" holds some tokens of every sequence, and the
 * share hook sums the sequences' counts and log-ratio sums over the ranks (here: adds the other
 * half's, captured beforehand). The halves' gradients are the whole batch's, their losses add up to
 * its loss, under GSPO's sequence ratio with the sequence-mean aggregation; without the hook they
 * are not (the test can fail). */
typedef struct {
    double v[8];
    const double *other;
} share_ctx;
static int share_capture(void *ctx, double *v, int n, mill_err *e) {
    (void)e;
    memcpy(((share_ctx *)ctx)->v, v, sizeof(double) * (size_t)n);
    return 0;
}
static int share_add(void *ctx, double *v, int n, mill_err *e) {
    (void)e;
    for (int i = 0; i < n; i++) v[i] += ((share_ctx *)ctx)->other[i];
    return 0;
}

static void test_share_over_ranks(void **s) {
    (void)s;
    grpo_config c;
    grpo_config_default(&c);
    c.ratio = RATIO_GSPO;
    c.agg = AGG_SEQ_MEAN_TOKEN_MEAN;
    enum { N = 9 };
    int32_t seq[N] = {0, 0, 0, 1, 1, 2, 2, 2, 2};
    float adv[3] = {0.7f, -1.1f, 0.4f}, old[N], logp[N], dw[N], dh[N];
    for (int t = 0; t < N; t++) old[t] = -1.0f - 0.1f * t, logp[t] = old[t] + 0.05f * (t % 3) - 0.04f;
    double whole = run(&c, seq, 3, adv, old, NULL, logp, N, dw, NULL);
    /* rank 0: each sequence's first token(s); rank 1: the rest */
    int a[4] = {0, 3, 5, 6}, b[5] = {1, 2, 4, 7, 8};
    int32_t sa[4], sb[5];
    float oa[4], ob[5], la[4], lb[5], da[4], db[5];
    for (int i = 0; i < 4; i++) sa[i] = seq[a[i]], oa[i] = old[a[i]], la[i] = logp[a[i]];
    for (int i = 0; i < 5; i++) sb[i] = seq[b[i]], ob[i] = old[b[i]], lb[i] = logp[b[i]];
    share_ctx ca = {{0}, NULL}, cb = {{0}, NULL};
    grpo_batch ba = {.cfg = &c, .seq = sa, .n_seqs = 3, .adv = adv, .old_logp = oa, .norm_seqs = 3,
                     .share = share_capture, .share_ctx = &ca};
    grpo_batch bb = {.cfg = &c, .seq = sb, .n_seqs = 3, .adv = adv, .old_logp = ob, .norm_seqs = 3,
                     .share = share_capture, .share_ctx = &cb};
    double la_, lb_;
    mill_err e;
    assert_int_equal(grpo_loss(&ba, la, NULL, 4, da, NULL, &la_, &e), 0); /* each half's own sums */
    assert_int_equal(grpo_loss(&bb, lb, NULL, 5, db, NULL, &lb_, &e), 0);
    double wrong = fabs(la_ + lb_ - whole);
    ca.other = cb.v, cb.other = ca.v;
    ba.share = bb.share = share_add;
    assert_int_equal(grpo_loss(&ba, la, NULL, 4, da, NULL, &la_, &e), 0);
    assert_int_equal(grpo_loss(&bb, lb, NULL, 5, db, NULL, &lb_, &e), 0);
    assert_true(fabs(la_ + lb_ - whole) < 1e-12 && wrong > 1e-6);
    for (int i = 0; i < 4; i++) dh[a[i]] = da[i];
    for (int i = 0; i < 5; i++) dh[b[i]] = db[i];
    for (int t = 0; t < N; t++) assert_float_equal(dh[t], dw[t], 1e-7);
}

/* One small policy-gradient step through the model moves probability toward the sample with the
 * positive advantage and away from the negative one (the sign of the whole chain). */
typedef struct {
    grpo_batch b;
} pg_ctx;
static int pg_loss(void *ctx, const float *logp, const float *ent, int n, float *dlogp, float *dent, double *loss,
                   mill_err *e) {
    return grpo_loss(&((pg_ctx *)ctx)->b, logp, ent, n, dlogp, dent, loss, e);
}

static void test_policy_gradient_direction(void **s) {
    (void)s;
    mill_err e;
    dsv4_model m;
    kctx k;
    arena a = {0};
    tiny_model(&m, &k, &a, 5, 0.05f);
    /* two rows, same prompt, different 3-token responses */
    int32_t ids[2 * 6] = {256, 81, 58, 49, 50, 257, 256, 81, 58, 55, 56, 257};
    int32_t tg[2 * 6] = {-1, -1, 49, 50, 257, -1, -1, -1, 55, 56, 257, -1};
    int32_t seq[6] = {0, 0, 0, 1, 1, 1};
    float adv[2] = {1.0f, -1.0f}, lp0[6], lp1[6];
    grpo_config c;
    grpo_config_default(&c);
    pg_ctx pc = {.b = {.cfg = &c, .seq = seq, .n_seqs = 2, .adv = adv}};
    float *g = calloc(m.n_floats, sizeof(float));
    double loss;
    long cnt;
    if (model_forward_backward_tokens(&m, &k, ids, tg, 2, 6, NULL, 1.0f, g, pg_loss, &pc, lp0, &loss, &cnt, &a, &e))
        fail_msg("%s", e.msg);
    assert_int_equal(cnt, 6);
    for (size_t i = 0; i < m.n_floats; i++) m.data[i] -= 0.05f * g[i]; /* plain SGD */
    assert_int_equal(model_forward_backward_tokens(&m, &k, ids, tg, 2, 6, NULL, 1.0f, g, NULL, NULL, lp1, &loss, &cnt,
                                                   &a, &e), 0);
    double up = 0, down = 0;
    for (int t = 0; t < 3; t++) {
        up += lp1[t] - lp0[t];
        down += lp1[3 + t] - lp0[3 + t];
    }
    assert_true(up > 0);
    assert_true(down < 0);
    free(g);
    arena_free(&a);
    kctx_free(&k);
    model_free(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_advantages),
        cmocka_unit_test(test_clipped_loss),
        cmocka_unit_test(test_gradient_fd),
        cmocka_unit_test(test_loss_options),
        cmocka_unit_test(test_entropy_tis),
        cmocka_unit_test(test_entropy_gradient),
        cmocka_unit_test(test_policy_gradient_direction),
        cmocka_unit_test(test_share_over_ranks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
