/* Optimizer, checkpoints and the SFT loop: schedule and AdamW arithmetic, clipping, freezing,
 * save/load round trips, and resume-after-interrupt that is bit-identical to an
 * uninterrupted run. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "trainer/checkpoint.h"
#include "launch/sft.h"

#define TINY_CONFIG MILL_SOURCE_DIR "/configs/models/dsv4-tiny.json"

static void recipe(sft_recipe *r, const char *out_dir) {
    memset(r, 0, sizeof *r);
    optim_config_default(&r->optim);
    snprintf(r->model_config, sizeof r->model_config, "%s", TINY_CONFIG);
    r->init_seed = 3;
    r->init_std = 0.02;
    r->levels[0] = 1;
    r->levels[1] = 2;
    r->n_levels = 2;
    r->data_seed = 11;
    r->steps = 4;
    r->batch_size = 4;
    r->max_len = 48;
    r->log_every = 1;
    r->optim.lr = 3e-3;
    r->optim.warmup_steps = 2;
    r->optim.total_steps = 4;
    r->eval_problems = 8;
    r->eval_seed = 5;
    snprintf(r->out_dir, sizeof r->out_dir, "%s", out_dir);
    r->par = par_sizes_one();
    r->micro_batches = 1;
}

static void test_lr_schedule(void **st) {
    (void)st;
    optim_config c;
    optim_config_default(&c);
    c.lr = 1.0;
    c.min_lr = 0.1;
    c.warmup_steps = 10;
    c.total_steps = 110;
    assert_float_equal(optimizer_lr(&c, 0), 0.1, 1e-12);  /* (0+1)/10 */
    assert_float_equal(optimizer_lr(&c, 9), 1.0, 1e-12);  /* end of warm-up */
    assert_float_equal(optimizer_lr(&c, 10), 1.0, 1e-12); /* cosine starts at lr */
    assert_float_equal(optimizer_lr(&c, 60), 0.55, 1e-12);
    assert_float_equal(optimizer_lr(&c, 110), 0.1, 1e-12);
    assert_float_equal(optimizer_lr(&c, 500), 0.1, 1e-12);
    c.schedule = LR_CONSTANT;
    assert_float_equal(optimizer_lr(&c, 60), 1.0, 1e-12);
}

static void test_adamw_clip_freeze(void **st) {
    (void)st;
    mill_err e = {{0}};
    dsv4_config cfg;
    dsv4_model m;
    assert_int_equal(config_load(TINY_CONFIG, &cfg, &e), 0);
    assert_int_equal(model_init(&m, &cfg, &e), 0);
    model_init_random(&m, 1, 0.02f);
    optim_config oc;
    optim_config_default(&oc);
    oc.lr = 0.01;
    oc.schedule = LR_CONSTANT;
    oc.weight_decay = 0.1;
    oc.clip_grad = 1.0;
    snprintf(oc.freeze[0], sizeof oc.freeze[0], "layers.*.ffn.gate.weight");
    oc.n_freeze = 1;
    optimizer o;
    assert_int_equal(optimizer_init(&o, &m, &oc, &e), 0);
    float *g = malloc(sizeof(float) * m.n_floats), *before = malloc(sizeof(float) * m.n_floats);
    for (size_t i = 0; i < m.n_floats; i++) g[i] = 0.5f;
    memcpy(before, m.data, sizeof(float) * m.n_floats);
    kctx k;
    kctx_init(&k, DEVICE_CPU, &e);
    double norm, lr;
    assert_int_equal(optimizer_step(&o, &m, &k, g, &norm, &lr, &e), 0);
    size_t upd;
    optimizer_n_updated(&o, &m, &upd);
    assert_float_equal(norm, 0.5 * sqrt((double)upd), 1e-3 * norm); /* norm over updated params only */
    for (int i = 0; i < m.n_params; i++) {
        const param_info *p = &m.params[i];
        if (p->kind == PARAM_INDEX) continue; /* int tables live outside the float buffer */
        float *w = m.data + p->offset, *w0 = before + p->offset;
        int frozen = strstr(p->name, ".ffn.gate.weight") != NULL;
        if (!model_param_has_grad(p) || frozen) {
            if (memcmp(w, w0, p->numel * sizeof(float))) fail_msg("%s changed", p->name); /* buffers, indexer, frozen */
            continue;
        }
        /* first step: m/c1 = g', v/c2 = g'^2 so the update is lr * sign(g) (eps aside), plus decay */
        float wd = p->ndim >= 2 ? 0.1f : 0.0f;
        float want = w0[0] * (1.0f - 0.01f * wd) - 0.01f * 1.0f;
        assert_float_equal(w[0], want, 1e-5);
    }
    snprintf(oc.freeze[0], sizeof oc.freeze[0], "no.such.*");
    optimizer o2;
    assert_int_equal(optimizer_init(&o2, &m, &oc, &e), -1);
    assert_non_null(strstr(e.msg, "no.such.*"));
    optimizer_free(&o);
    free(g);
    free(before);
    model_free(&m);
}

static void test_save_load_roundtrip(void **st) {
    (void)st;
    mill_err e = {{0}};
    char dir[] = "/tmp/mill-test-XXXXXX";
    assert_non_null(mkdtemp(dir));
    dsv4_config cfg;
    dsv4_model m, m2;
    assert_int_equal(config_load(TINY_CONFIG, &cfg, &e), 0);
    assert_int_equal(model_init(&m, &cfg, &e), 0);
    model_init_random(&m, 9, 0.02f);
    assert_int_equal(model_save(&m, dir, &e), 0);
    if (model_load(&m2, dir, &e)) fail_msg("%s", e.msg);
    assert_int_equal(m2.n_floats, m.n_floats);
    assert_memory_equal(m2.data, m.data, sizeof(float) * m.n_floats);
    assert_memory_equal(m2.index_data, m.index_data, sizeof(int32_t) * m.n_index);
    /* tid2eid rows hold k distinct experts */
    const dsv4_layer *L = &m.layers[0];
    assert_true(L->is_hash);
    for (int v = 0; v < cfg.vocab_size; v++)
        assert_int_not_equal(L->tid2eid[v * cfg.num_experts_per_tok], L->tid2eid[v * cfg.num_experts_per_tok + 1]);
    model_free(&m);
    model_free(&m2);
}

/* A run of 4 steps against 2 steps + checkpoint + resume + 2 steps: every parameter, Adam moment
 * and the data stream's state must be identical to the bit. */
static void test_resume_bit_identical(void **st) {
    (void)st;
    mill_err e = {{0}};
    char dir[] = "/tmp/mill-test-XXXXXX", ck[256];
    assert_non_null(mkdtemp(dir));
    snprintf(ck, sizeof ck, "%s/step-2", dir);
    sft_recipe r;
    recipe(&r, dir);
    sft_state a, b;
    sft_step_stats s;
    if (sft_open(&a, &r, NULL, NULL, &e)) fail_msg("%s", e.msg);
    for (int i = 0; i < 4; i++)
        if (sft_step(&a, &r, &s, &e)) fail_msg("%s", e.msg);
    if (sft_open(&b, &r, NULL, NULL, &e)) fail_msg("%s", e.msg);
    for (int i = 0; i < 2; i++)
        if (sft_step(&b, &r, &s, &e)) fail_msg("%s", e.msg);
    if (sft_checkpoint(&b, ck, &e)) fail_msg("%s", e.msg);
    sft_close(&b);
    if (sft_open(&b, &r, ck, NULL, &e)) fail_msg("%s", e.msg);
    assert_int_equal(b.ts.step, 2);
    for (int i = 0; i < 2; i++)
        if (sft_step(&b, &r, &s, &e)) fail_msg("%s", e.msg);
    assert_int_equal(a.ts.step, b.ts.step);
    assert_int_equal(a.ts.data_position, b.ts.data_position);
    assert_memory_equal(&a.ts.data_rng, &b.ts.data_rng, sizeof(rng));
    assert_memory_equal(a.model.data, b.model.data, sizeof(float) * a.model.n_floats);
    assert_memory_equal(a.opt.m, b.opt.m, sizeof(float) * a.model.n_floats);
    assert_memory_equal(a.opt.v, b.opt.v, sizeof(float) * a.model.n_floats);
    /* and training did move the weights */
    sft_state c;
    if (sft_open(&c, &r, NULL, NULL, &e)) fail_msg("%s", e.msg);
    assert_memory_not_equal(a.model.data, c.model.data, sizeof(float) * a.model.n_floats);
    sft_close(&a);
    sft_close(&b);
    sft_close(&c);
}

/* A few dozen steps on single-digit addition must lower the response loss. */
static void test_sft_learns(void **st) {
    (void)st;
    mill_err e = {{0}};
    sft_recipe r;
    recipe(&r, "/tmp");
    r.n_levels = 1;
    r.batch_size = 16;
    r.steps = 40;
    r.optim.total_steps = 40;
    r.optim.warmup_steps = 5;
    sft_state a;
    sft_step_stats s;
    if (sft_open(&a, &r, NULL, NULL, &e)) fail_msg("%s", e.msg);
    double first = 0, last = 0;
    for (int i = 0; i < 40; i++) {
        if (sft_step(&a, &r, &s, &e)) fail_msg("%s", e.msg);
        if (i < 5) first += s.loss / 5;
        if (i >= 35) last += s.loss / 5;
    }
    printf("# sft loss: first 5 steps %.3f, last 5 steps %.3f\n", first, last);
    assert_true(last < 0.6 * first);
    double acc;
    if (sft_eval(&a, &r, 16, &acc, &e)) fail_msg("%s", e.msg);
    assert_true(acc >= 0.0 && acc <= 1.0);
    sft_close(&a);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lr_schedule),         cmocka_unit_test(test_adamw_clip_freeze),
        cmocka_unit_test(test_save_load_roundtrip), cmocka_unit_test(test_resume_bit_identical),
        cmocka_unit_test(test_sft_learns),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
