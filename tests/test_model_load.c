/* tests/test_model_load.c — model_load against checkpoints that are tiny-a's
 * model.safetensors with one change each: a missing, misshapen, mistyped or
 * unexpected tensor, a bad tid2eid, BF16 weights, a malformed config.json.
 * Each bad checkpoint must fail with a message naming the tensor (and file,
 * shapes, dtype where relevant); BF16 weights must load exactly. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "test_util.h"
#include "common/safetensors.h"
#include "common/tensor.h"
#include "trainer/model.h"

#define SRC_DIR MILL_TEST_DATA "/tiny-a"


static int setup(void **state) { return test_dir_setup(state, "test_model_load", "model.safetensors"); }

static int teardown(void **state) { return test_dir_teardown(state); }

/* ------------------------------------------------------------- helpers */

static void copy_file(const char *from, const char *to, long max_bytes) {
    FILE *in = fopen(from, "rb");
    assert_non_null(in);
    FILE *out = fopen(to, "wb");
    assert_non_null(out);
    char buf[4096];
    size_t n;
    long total = 0;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) {
        if (max_bytes >= 0 && total + (long)n > max_bytes) n = (size_t)(max_bytes - total);
        assert_int_equal(fwrite(buf, 1, n, out), n);
        total += (long)n;
        if (max_bytes >= 0 && total >= max_bytes) break;
    }
    assert_int_equal(fclose(in), 0);
    assert_int_equal(fclose(out), 0);
}

static void copy_config(const test_dir *f) {
    char to[128];
    snprintf(to, sizeof to, "%s/config.json", f->dir);
    copy_file(SRC_DIR "/config.json", to, -1);
}

typedef enum {
    MOD_NONE,
    MOD_DROP,        /* leave `target` out */
    MOD_TRANSPOSE,   /* write `target` (2-D) with its shape reversed */
    MOD_AS_I32,      /* write `target` (F32) with the same bytes as I32 */
    MOD_AS_F32,      /* write `target` (I64 index) as F32 values */
    MOD_EXTRA,       /* add an F32 tensor `target` of shape [4] */
    MOD_ID_RANGE,    /* set element 5 of `target` (I64 index) to `value` */
    MOD_ALL_BF16     /* every F32 tensor as BF16 */
} mod_kind;

/* tiny-a's model.safetensors with one modification, written to f->path, plus config.json. */
static void write_variant(const test_dir *f, mod_kind kind, const char *target, long long value) {
    safetensors *st = NULL;
    mill_err e = {{0}};
    if (safetensors_open(SRC_DIR "/model.safetensors", &st, &e)) fail_msg("%s", e.msg);
    safetensors_writer *w = safetensors_writer_new();
    assert_non_null(w);
    int found = target == NULL || kind == MOD_EXTRA;
    for (int i = 0; i < safetensors_count(st); i++) {
        const safetensors_entry *en = safetensors_at(st, i);
        int hit = target && strcmp(en->name, target) == 0;
        found |= hit;
        int64_t shape[TENSOR_MAX_DIMS];
        memcpy(shape, en->shape, sizeof shape);
        mill_dtype dt = en->dtype;
        const void *data = en->data;
        void *owned = NULL;
        size_t numel = 1;
        for (int d = 0; d < en->ndim; d++) numel *= (size_t)en->shape[d];
        if (hit && kind == MOD_DROP) continue;
        if (hit && kind == MOD_TRANSPOSE) {
            assert_int_equal(en->ndim, 2);
            shape[0] = en->shape[1];
            shape[1] = en->shape[0];
        } else if (hit && kind == MOD_AS_I32) {
            assert_int_equal(en->dtype, DTYPE_F32);
            dt = DTYPE_I32;
        } else if (hit && kind == MOD_AS_F32) {
            assert_int_equal(en->dtype, DTYPE_I64);
            float *v = malloc(numel * sizeof *v);
            assert_non_null(v);
            for (size_t j = 0; j < numel; j++) {
                int64_t x;
                memcpy(&x, (const char *)en->data + 8 * j, 8);
                v[j] = (float)x;
            }
            dt = DTYPE_F32;
            data = owned = v;
        } else if (hit && kind == MOD_ID_RANGE) {
            assert_int_equal(en->dtype, DTYPE_I64);
            assert_true(numel > 5);
            int64_t *v = malloc(numel * sizeof *v);
            assert_non_null(v);
            memcpy(v, en->data, numel * sizeof *v);
            v[5] = value;
            data = owned = v;
        } else if (kind == MOD_ALL_BF16 && en->dtype == DTYPE_F32) {
            uint16_t *v = malloc(numel * sizeof *v + 1);
            assert_non_null(v);
            for (size_t j = 0; j < numel; j++) {
                float x;
                memcpy(&x, (const char *)en->data + 4 * j, 4);
                v[j] = f32_to_bf16(x);
            }
            dt = DTYPE_BF16;
            data = owned = v;
        }
        if (safetensors_writer_add(w, en->name, dt, en->ndim, shape, data, &e)) fail_msg("%s", e.msg);
        free(owned);
    }
    if (!found) fail_msg("tensor %s is not in %s", target, SRC_DIR);
    if (kind == MOD_EXTRA) {
        float four[4] = {1, 2, 3, 4};
        int64_t s = 4;
        if (safetensors_writer_add(w, target, DTYPE_F32, 1, &s, four, &e)) fail_msg("%s", e.msg);
    }
    if (safetensors_writer_save(w, f->path, &e)) fail_msg("%s", e.msg);
    safetensors_writer_free(w);
    safetensors_close(st);
    copy_config(f);
}

static void assert_msg_has(const mill_err *e, const char *needle) {
    if (!strstr(e->msg, needle)) fail_msg("error message \"%s\" does not contain \"%s\"", e->msg, needle);
}

/* model_load(f->dir) must fail with a one-line message holding every needle (NULL-terminated). */
static void load_fails(const test_dir *f, ...) {
    dsv4_model m;
    memset(&m, 0, sizeof m);
    mill_err e;
    memset(&e, 0, sizeof e);
    int rc = model_load(&m, f->dir, &e);
    if (rc == 0) {
        model_free(&m);
        fail_msg("model_load of %s succeeded, expected an error", f->dir);
    }
    assert_int_equal(rc, -1);
    assert_null(strchr(e.msg, '\n'));
    va_list ap;
    va_start(ap, f);
    for (const char *s; (s = va_arg(ap, const char *)) != NULL;) assert_msg_has(&e, s);
    va_end(ap);
}

/* --------------------------------------------------------------- tests */

/* The control: an unmodified copy loads, with the weights as stored. */
static void test_copy_loads(void **state) {
    test_dir *f = *state;
    write_variant(f, MOD_NONE, NULL, 0);
    dsv4_model m;
    mill_err e = {{0}};
    if (model_load(&m, f->dir, &e)) fail_msg("%s", e.msg);
    safetensors *st = NULL;
    if (safetensors_open(SRC_DIR, &st, &e)) fail_msg("%s", e.msg);
    const safetensors_entry *en = safetensors_find(st, "layers.0.attn.wkv.weight");
    const param_info *p = model_find_param(&m, "layers.0.attn.wkv.weight");
    assert_non_null(en);
    assert_non_null(p);
    assert_int_equal(p->numel * 4, en->nbytes);
    assert_memory_equal(m.data + p->offset, en->data, en->nbytes);
    assert_true(m.n_extra > 0); /* mtp.* kept */
    for (int i = 0; i < m.n_extra; i++) assert_int_equal(strncmp(m.extra[i].name, "mtp.", 4), 0);
    safetensors_close(st);
    model_free(&m);
}

static void test_missing_tensor(void **state) {
    test_dir *f = *state;
    write_variant(f, MOD_DROP, "layers.1.attn.wq_a.weight", 0);
    load_fails(f, "layers.1.attn.wq_a.weight", "missing", "[32, 64]", (char *)NULL);
}

/* A missing 1-D tensor: the message must show its shape as [64]. */
static void test_missing_1d_tensor(void **state) {
    test_dir *f = *state;
    write_variant(f, MOD_DROP, "layers.0.attn_norm.weight", 0);
    load_fails(f, "layers.0.attn_norm.weight", "missing", "[64]", (char *)NULL);
}

static void test_wrong_shape(void **state) {
    test_dir *f = *state;
    write_variant(f, MOD_TRANSPOSE, "layers.0.attn.wkv.weight", 0); /* stored [32, 64] */
    load_fails(f, "layers.0.attn.wkv.weight", f->path, "[64, 32]", "[32, 64]", (char *)NULL);
}

static void test_wrong_dtype_weight(void **state) {
    test_dir *f = *state;
    write_variant(f, MOD_AS_I32, "embed.weight", 0);
    load_fails(f, "embed.weight", "I32", f->path, (char *)NULL);
}

static void test_wrong_dtype_index(void **state) {
    test_dir *f = *state;
    write_variant(f, MOD_AS_F32, "layers.1.ffn.gate.tid2eid", 0);
    load_fails(f, "layers.1.ffn.gate.tid2eid", "F32", f->path, (char *)NULL);
}

static void test_unexpected_tensor(void **state) {
    test_dir *f = *state;
    write_variant(f, MOD_EXTRA, "layers.0.attn.bogus", 0);
    load_fails(f, "layers.0.attn.bogus", "unexpected", f->path, (char *)NULL);
}

static void test_tid2eid_out_of_range(void **state) {
    test_dir *f = *state;
    write_variant(f, MOD_ID_RANGE, "layers.0.ffn.gate.tid2eid", 8); /* 8 routed experts: ids 0..7 */
    load_fails(f, "layers.0.ffn.gate.tid2eid", "8", "element 5", (char *)NULL);
    write_variant(f, MOD_ID_RANGE, "layers.1.ffn.gate.tid2eid", -1);
    load_fails(f, "layers.1.ffn.gate.tid2eid", "-1", "element 5", (char *)NULL);
}

static void test_bf16_weights(void **state) {
    test_dir *f = *state;
    write_variant(f, MOD_ALL_BF16, NULL, 0);
    mill_err e = {{0}};
    safetensors *src = NULL, *bf = NULL;
    if (safetensors_open(SRC_DIR, &src, &e)) fail_msg("%s", e.msg);
    if (safetensors_open(f->path, &bf, &e)) fail_msg("%s", e.msg);
    /* the variant really is BF16 */
    const safetensors_entry *wq = safetensors_find(bf, "layers.0.attn.wq_a.weight");
    assert_non_null(wq);
    assert_int_equal(wq->dtype, DTYPE_BF16);
    safetensors_close(bf);

    dsv4_model m;
    if (model_load(&m, f->dir, &e)) fail_msg("%s", e.msg);
    size_t changed = 0, checked = 0, floats = 0;
    for (int i = 0; i < m.n_params; i++) {
        const param_info *p = &m.params[i];
        if (p->kind == PARAM_INDEX) continue;
        floats += p->numel;
        const safetensors_entry *en = safetensors_find(src, p->name);
        assert_non_null(en);
        assert_int_equal(en->dtype, DTYPE_F32);
        for (size_t j = 0; j < p->numel; j++) {
            float x;
            memcpy(&x, (const char *)en->data + 4 * j, 4);
            float want = bf16_to_f32(f32_to_bf16(x)), got = m.data[p->offset + j];
            if (memcmp(&want, &got, 4) != 0)
                fail_msg("%s[%zu] = %.9g, expected %.9g (bf16 of %.9g)", p->name, j, (double)got, (double)want,
                         (double)x);
            changed += x != got;
            checked++;
        }
    }
    assert_int_equal(checked, floats); /* every float parameter (n_floats also counts alignment gaps) */
    assert_true(floats <= m.n_floats);
    assert_true(changed > 0); /* the rounding happened: not all of tiny-a's weights are bf16-exact */
    /* mtp.* tensors too */
    assert_true(m.n_extra > 0);
    for (int i = 0; i < m.n_extra; i++) {
        const safetensors_entry *en = safetensors_find(src, m.extra[i].name);
        assert_non_null(en);
        const float *got = m.extra[i].t.data;
        for (int64_t j = 0; j < tensor_numel(&m.extra[i].t); j++) {
            float x;
            memcpy(&x, (const char *)en->data + 4 * j, 4);
            assert_true(got[j] == bf16_to_f32(f32_to_bf16(x)));
        }
    }
    /* the tid2eid tables are untouched */
    const param_info *t = model_find_param(&m, "layers.0.ffn.gate.tid2eid");
    const safetensors_entry *ten = safetensors_find(src, "layers.0.ffn.gate.tid2eid");
    assert_non_null(t);
    assert_non_null(ten);
    for (size_t j = 0; j < t->numel; j++) {
        int64_t v;
        memcpy(&v, (const char *)ten->data + 8 * j, 8);
        assert_int_equal(m.index_data[t->offset + j], v);
    }
    model_free(&m);
    safetensors_close(src);
}

static void test_malformed_config(void **state) {
    test_dir *f = *state;
    write_variant(f, MOD_NONE, NULL, 0);
    char cfg[128];
    snprintf(cfg, sizeof cfg, "%s/config.json", f->dir);
    copy_file(SRC_DIR "/config.json", cfg, 100); /* truncated mid-object */
    load_fails(f, "config.json", (char *)NULL);
}

static void test_no_weights(void **state) {
    test_dir *f = *state;
    copy_config(f);
    load_fails(f, f->dir, (char *)NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_copy_loads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_tensor, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_1d_tensor, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_shape, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_dtype_weight, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_dtype_index, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unexpected_tensor, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tid2eid_out_of_range, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bf16_weights, setup, teardown),
        cmocka_unit_test_setup_teardown(test_malformed_config, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_weights, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
