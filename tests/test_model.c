/* Full-model parity: mill's fp32 CPU forward against HF transformers' logits
 * (tests/data/<cfg>/expected.safetensors, made by tests/reference/make_goldens.py
 * from a float64 copy of DeepseekV4ForCausalLM). Bound: ||ours - ref|| / ||ref|| <= 1e-4. */
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

#include "common/safetensors.h"
#include "trainer/model.h"

static int32_t *load_ids(const char *path, int *B, int *T) {
    int32_t *ids = test_load_ids(path, B, T);
    assert_non_null(ids);
    return ids;
}

static double golden_rel_err(const char *cfg, dsv4_model *m_out_extra_count) {
    char dir[1024], path[1100];
    snprintf(dir, sizeof dir, "%s/%s", MILL_TEST_DATA, cfg);
    mill_err e = {{0}};
    dsv4_model m;
    if (model_load(&m, dir, &e)) fail_msg("%s", e.msg);
    int B, T;
    snprintf(path, sizeof path, "%s/input.json", dir);
    int32_t *ids = load_ids(path, &B, &T);
    long n = (long)B * T * m.cfg.vocab_size;
    float *logits = malloc(sizeof(float) * (size_t)n);
    int32_t *routing = malloc(sizeof(int32_t) * (size_t)m.cfg.num_hidden_layers * B * T * m.cfg.num_experts_per_tok);
    kctx k;
    arena a;
    assert_int_equal(kctx_init(&k, DEVICE_CPU, &e), 0);
    assert_int_equal(arena_init(&a, 1 << 20, &e), 0);
    if (model_forward(&m, &k, ids, B, T, logits, routing, &a, &e)) fail_msg("%s", e.msg);

    /* Hash layers route by the table: the recorded ids must be tid2eid rows. */
    for (int l = 0; l < m.cfg.num_hash_layers; l++)
        for (int t = 0; t < B * T; t++)
            for (int j = 0; j < m.cfg.num_experts_per_tok; j++)
                assert_int_equal(routing[((long)l * B * T + t) * m.cfg.num_experts_per_tok + j],
                                 m.layers[l].tid2eid[(long)ids[t] * m.cfg.num_experts_per_tok + j]);

    safetensors *st;
    snprintf(path, sizeof path, "%s/expected.safetensors", dir);
    if (safetensors_open(path, &st, &e)) fail_msg("%s", e.msg);
    const safetensors_entry *ref = safetensors_find(st, "logits");
    assert_non_null(ref);
    assert_int_equal(ref->nbytes, (size_t)n * 4);
    const float *r = ref->data;
    double num = 0, den = 0, worst = 0;
    for (long i = 0; i < n; i++) {
        double d = (double)logits[i] - r[i];
        num += d * d;
        den += (double)r[i] * r[i];
        if (fabs(d) > worst) worst = fabs(d);
    }
    double rel = sqrt(num / den);
    printf("# %s: %d x %d tokens, logits rel err %.3e (max abs diff %.3e), %d mtp tensors loaded\n", cfg, B, T, rel,
           worst, m.n_extra);
    m_out_extra_count->n_extra = m.n_extra;
    safetensors_close(st);
    free(ids);
    free(logits);
    free(routing);
    arena_free(&a);
    model_free(&m);
    return rel;
}

/* Gradients against HF autograd (float64 copy of the model): loss within 1e-5, worst
 * per-tensor ||ours - ref|| / ||ref|| at most 1e-3, every HF gradient present and nothing extra. */
static void golden_grads(const char *cfg) {
    char dir[1024], path[1100];
    snprintf(dir, sizeof dir, "%s/%s", MILL_TEST_DATA, cfg);
    mill_err e = {{0}};
    dsv4_model m;
    if (model_load(&m, dir, &e)) fail_msg("%s", e.msg);
    int B, T;
    snprintf(path, sizeof path, "%s/input.json", dir);
    int32_t *ids = load_ids(path, &B, &T), *targets = malloc(sizeof(int32_t) * (size_t)(B * T));
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) targets[b * T + t] = t + 1 < T ? ids[b * T + t + 1] : -1;
    float *grads = calloc(m.n_floats, sizeof(float));
    kctx k;
    arena a;
    assert_int_equal(kctx_init(&k, DEVICE_CPU, &e), 0);
    assert_int_equal(arena_init(&a, 1 << 20, &e), 0);
    model_loss loss;
    if (model_forward_backward(&m, &k, ids, targets, B, T, NULL, grads, &loss, &a, &e)) fail_msg("%s", e.msg);
    assert_int_equal(loss.count, (long)B * (T - 1));

    safetensors *st;
    snprintf(path, sizeof path, "%s/grads.safetensors", dir);
    if (safetensors_open(path, &st, &e)) fail_msg("%s", e.msg);
    const safetensors_entry *ref_loss = safetensors_find(st, "loss");
    assert_non_null(ref_loss);
    double dl = fabs(loss.loss - (double)((const float *)ref_loss->data)[0]);
    int n_ref = 0, n_ours = 0;
    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < m.n_params; i++) {
        const param_info *p = &m.params[i];
        char name[128];
        snprintf(name, sizeof name, "grad.%s", p->name);
        const safetensors_entry *ref = safetensors_find(st, name);
        if (!model_param_has_grad(p)) {
            if (ref) fail_msg("HF has a gradient for %s, mill does not", p->name);
            continue;
        }
        n_ours++;
        if (!ref) fail_msg("mill has a gradient for %s, HF does not", p->name);
        assert_int_equal(ref->nbytes, p->numel * 4);
        const float *r = ref->data, *g = grads + p->offset;
        double num = 0, den = 0;
        for (size_t j = 0; j < p->numel; j++) {
            num += ((double)g[j] - r[j]) * ((double)g[j] - r[j]);
            den += (double)r[j] * r[j];
        }
        double rel = den > 0 ? sqrt(num / den) : sqrt(num);
        if (rel > worst) {
            worst = rel;
            worst_name = p->name;
        }
    }
    for (int j = 0; j < safetensors_count(st); j++) n_ref += strncmp(safetensors_at(st, j)->name, "grad.", 5) == 0;
    printf("# %s: loss %.7f (|diff| %.1e), %d gradient tensors, worst relative error %.3e (%s)\n", cfg, loss.loss, dl,
           n_ours, worst, worst_name);
    assert_int_equal(n_ref, n_ours);
    assert_true(dl <= 1e-5);
    assert_true(worst <= 1e-3);
    safetensors_close(st);
    free(ids);
    free(targets);
    free(grads);
    arena_free(&a);
    model_free(&m);
}

static void test_grads_tiny_a(void **s) {
    (void)s;
    golden_grads("tiny-a");
}

static void test_grads_tiny_b(void **s) {
    (void)s;
    golden_grads("tiny-b");
}

static void test_golden_tiny_a(void **s) {
    (void)s;
    dsv4_model info = {0};
    double rel = golden_rel_err("tiny-a", &info);
    assert_true(rel <= 1e-4);
    assert_int_equal(info.n_extra, 3); /* mtp.0.{enorm,hnorm,e_proj} parsed and loaded */
}

static void test_golden_tiny_b(void **s) {
    (void)s;
    dsv4_model info = {0};
    double rel = golden_rel_err("tiny-b", &info); /* sharded checkpoint with an index */
    assert_true(rel <= 1e-4);
    assert_int_equal(info.n_extra, 3);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_tiny_a),
        cmocka_unit_test(test_golden_tiny_b),
        cmocka_unit_test(test_grads_tiny_a),
        cmocka_unit_test(test_grads_tiny_b),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
