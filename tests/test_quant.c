/* tests/test_quant.c — the released FP8 / packed-FP4 format, dequantized on load (kernels/quant.h,
 * model_load).
 * 1. The decodes, every code: fp8 e4m3fn (256), e8m0 (256), e2m1 (16), each against values this
 *    file derives another way (the e4m3 grid by accumulating its steps, e8m0 with ldexp, e2m1 from
 *    the OCP MX table), and against common/tensor.c's fp8 decode.
 * 2. Block dequantization against a naive double-precision reference (one rounding to fp32 of an
 *    exact product, which is what an fp32 multiply is): partial 128 x 128 blocks, E8M0 and F32
 *    scales, other block sizes, the FP4 nibble order (even column in the low nibble), -0.0.
 * 3. A quantized copy of tests/data/tiny-a made here with this file's own encoder, in the release's
 *    names, dtypes and shapes (FP8 for the attention projections, indexer wq_b, shared experts and
 *    mtp e_proj; FP4 experts; BF16 / F32 / I64 for the rest; config.json's quantization_config;
 *    sharded with every scale in the other shard from its weight): model_load gives this file's
 *    dequantization bit for bit, and the logits against HF's on the unquantized tiny-a are printed
 *    (the quantization error, not a parity figure).
 * 4. Bad checkpoints: a missing, misshapen or mistyped scale, packed FP4 of the wrong width, an
 *    orphan scale, NaN codes, a quantized 1-D tensor, an unsupported quantization_config: one line
 *    naming the file and tensor.
 * 5. When tests/data/quant-tiny-* exist (tests/reference/make_quant_goldens.py, GPU machine):
 *    mill's dequantization equals torch's bit for bit (memcmp), the decode tables equal torch's,
 *    and mill's logits are within 1e-4 relative of HF's on the quantized checkpoints. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "test_util.h"
#include "common/safetensors.h"
#include "common/tensor.h"
#include "kernels/quant.h"
#include "trainer/model.h"

#define TINY_A MILL_TEST_DATA "/tiny-a"

static int setup(void **state) { return test_dir_setup(state, "test_quant", NULL); }
static int teardown(void **state) { return test_dir_teardown(state); }

static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static void assert_same_bits(float got, float want, const char *what, int code) {
    if (fbits(got) != fbits(want))
        fail_msg("%s code 0x%02x: got %.9g (0x%08x), expected %.9g (0x%08x)", what, code, (double)got, fbits(got),
                 (double)want, fbits(want));
}

/* ------------------------------------------------ 1. the decodes, derived another way */

/* e4m3fn's non-negative finite values by code 0..0x7e, built by adding each code's step to the
 * previous value: 2^-9 below the first normal binade, 2^(e-10) inside binade e (codes 8e..8e+7). */
static void e4m3_grid(double v[127]) {
    v[0] = 0;
    for (int c = 0; c < 126; c++) {
        int e = c >> 3;
        v[c + 1] = v[c] + ldexp(1.0, (e ? e : 1) - 10);
    }
}

static void test_fp8_table(void **state) {
    (void)state;
    double v[127];
    e4m3_grid(v);
    assert_true(v[0x7e] == 448.0);          /* largest finite */
    assert_true(v[0x08] == ldexp(1.0, -6)); /* smallest normal */
    assert_true(v[0x01] == ldexp(1.0, -9)); /* smallest subnormal */
    assert_true(v[0x38] == 1.0);
    for (int c = 0; c < 256; c++) {
        float got = quant_fp8_e4m3((uint8_t)c);
        if ((c & 0x7f) == 0x7f) {
            if (!isnan(got)) fail_msg("fp8 code 0x%02x: got %g, expected NaN", c, (double)got);
            continue;
        }
        float want = (float)v[c & 0x7f];
        if (c & 0x80) want = -want; /* 0x80 is -0.0 */
        assert_same_bits(got, want, "fp8 e4m3", c);
        assert_same_bits(got, f8e4m3_to_f32((uint8_t)c), "fp8 e4m3 vs common/tensor.c", c);
    }
}

static void test_e8m0_table(void **state) {
    (void)state;
    for (int c = 0; c < 256; c++) {
        float got = quant_e8m0((uint8_t)c);
        if (c == 0xff) {
            assert_true(isnan(got));
            continue;
        }
        assert_same_bits(got, (float)ldexp(1.0, c - 127), "e8m0", c);
        assert_true(got > 0);
    }
    assert_true(fpclassify(quant_e8m0(0)) == FP_SUBNORMAL); /* 2^-127 */
    assert_true(quant_e8m0(127) == 1.0f && quant_e8m0(254) == 0x1p127f);
}

static void test_e2m1_table(void **state) {
    (void)state;
    /* OCP Microscaling spec, FP4 E2M1: the 8 magnitudes in code order. */
    static const float mx[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    for (int c = 0; c < 16; c++) {
        int e = (c >> 1) & 3, m = c & 1;
        double d = e ? ldexp(1.0 + m / 2.0, e - 1) : m * 0.5; /* bias 1; subnormal 0.5 * m */
        assert_true(d == mx[c & 7]);
        float want = c & 8 ? -mx[c & 7] : mx[c & 7];
        assert_same_bits(quant_e2m1((uint8_t)c), want, "e2m1", c);
        assert_same_bits(quant_e2m1((uint8_t)(c | 0xf0)), want, "e2m1 (high bits ignored)", c);
    }
    assert_true(signbit(quant_e2m1(8)) && quant_e2m1(8) == 0.0f);
}

/* ------------------------------------------------ 2. block dequantization */

static uint64_t rng_state = 88172645463325252ull;
static uint32_t rnd(void) { /* xorshift64 */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 32);
}

static float ref_fp8(uint8_t c) {
    double v[127];
    e4m3_grid(v);
    return (float)((c & 0x80) ? -v[c & 0x7f] : v[c & 0x7f]);
}

/* out = fp32 of the exact double product: an IEEE fp32 multiply of a and b. */
static float mul_ref(float a, float b) { return (float)((double)a * (double)b); }

static void check_fp8(int64_t R, int64_t C, int br, int bc, mill_dtype sdt) {
    int64_t g[2] = {(R + br - 1) / br, (C + bc - 1) / bc};
    uint8_t *q = malloc((size_t)(R * C));
    void *s = malloc((size_t)(g[0] * g[1] * 4));
    float *out = malloc(sizeof(float) * (size_t)(R * C)), *sf = malloc(sizeof(float) * (size_t)(g[0] * g[1]));
    assert_non_null(q);
    for (int64_t i = 0; i < R * C; i++) {
        q[i] = (uint8_t)rnd();
        if ((q[i] & 0x7f) == 0x7f) q[i] ^= 1; /* no NaN codes */
    }
    for (int64_t i = 0; i < g[0] * g[1]; i++) {
        if (sdt == DTYPE_F8_E8M0) {
            ((uint8_t *)s)[i] = (uint8_t)(100 + rnd() % 40);
            sf[i] = (float)ldexp(1.0, ((uint8_t *)s)[i] - 127);
        } else {
            sf[i] = (float)(1e-3 + (rnd() % 100000) * 1e-5); /* not powers of two: the product rounds */
            memcpy((char *)s + 4 * i, &sf[i], 4);
        }
    }
    mill_err e = {{0}};
    if (quant_dequant_fp8(q, s, sdt, R, C, br, bc, out, &e)) fail_msg("%s", e.msg);
    for (int64_t r = 0; r < R; r++)
        for (int64_t c = 0; c < C; c++) {
            float want = mul_ref(ref_fp8(q[r * C + c]), sf[(r / br) * g[1] + c / bc]);
            if (fbits(out[r * C + c]) != fbits(want))
                fail_msg("fp8 [%lld, %lld] of [%lld, %lld] in %dx%d blocks: got %.9g, expected %.9g", (long long)r,
                         (long long)c, (long long)R, (long long)C, br, bc, (double)out[r * C + c], (double)want);
        }
    free(q);
    free(s);
    free(out);
    free(sf);
}

static void test_fp8_dequant(void **state) {
    (void)state;
    int64_t g[2];
    quant_fp8_scale_shape(200, 300, 128, 128, g);
    assert_true(g[0] == 2 && g[1] == 3);
    quant_fp8_scale_shape(256, 128, 128, 128, g);
    assert_true(g[0] == 2 && g[1] == 1);
    check_fp8(200, 300, 128, 128, DTYPE_F8_E8M0); /* partial blocks both ways */
    check_fp8(256, 128, 128, 128, DTYPE_F8_E8M0); /* full blocks only */
    check_fp8(200, 300, 128, 128, DTYPE_F32);     /* Base variants' F32 scales */
    check_fp8(70, 90, 64, 32, DTYPE_F32);         /* another weight_block_size */
    check_fp8(5, 7, 128, 128, DTYPE_F8_E8M0);     /* one partial block */

    /* -0.0 survives, and NaN codes are refused with the element named */
    uint8_t q[4] = {0x80, 0x38, 0x7f, 0x01}, s1 = 127;
    float out[4];
    mill_err e = {{0}};
    assert_int_equal(quant_dequant_fp8(q, &s1, DTYPE_F8_E8M0, 1, 2, 128, 128, out, &e), 0);
    assert_true(signbit(out[0]) && out[0] == 0.0f && out[1] == 1.0f);
    assert_int_equal(quant_dequant_fp8(q, &s1, DTYPE_F8_E8M0, 2, 2, 128, 128, out, &e), -1);
    assert_non_null(strstr(e.msg, "[1, 0]"));
    assert_non_null(strstr(e.msg, "0x7f"));
    uint8_t nan_scale = 0xff;
    assert_int_equal(quant_dequant_fp8(q, &nan_scale, DTYPE_F8_E8M0, 1, 2, 128, 128, out, &e), -1);
    assert_non_null(strstr(e.msg, "0xff"));
    float inf = INFINITY;
    assert_int_equal(quant_dequant_fp8(q, &inf, DTYPE_F32, 1, 2, 128, 128, out, &e), -1);
    assert_int_equal(quant_dequant_fp8(q, &s1, DTYPE_BF16, 1, 2, 128, 128, out, &e), -1);
    assert_non_null(strstr(e.msg, "BF16"));
}

static void test_fp4_dequant(void **state) {
    (void)state;
    /* The nibble order: byte 0x21 holds column 0 = code 1 (0.5) low, column 1 = code 2 (1.0) high. */
    uint8_t packed[2 * 32], scale[2 * 2];
    memset(packed, 0, sizeof packed);
    packed[0] = 0x21;
    packed[15] = 0xf9; /* columns 30, 31: -0.5, -6 in group 0 */
    packed[16] = 0x87; /* columns 32, 33: 6, -0.0 in group 1 */
    scale[0] = 127;    /* row 0, columns 0..31: x1 */
    scale[1] = 129;    /* row 0, columns 32..63: x4 */
    scale[2] = scale[3] = 126;
    float out[2 * 64];
    mill_err e = {{0}};
    assert_int_equal(quant_dequant_fp4(packed, scale, 2, 64, out, &e), 0);
    assert_true(out[0] == 0.5f && out[1] == 1.0f && out[2] == 0.0f && !signbit(out[2]));
    assert_true(out[30] == -0.5f && out[31] == -6.0f);
    assert_true(out[32] == 24.0f && out[33] == 0.0f && signbit(out[33]));

    /* random rows against the naive reference, several groups a row */
    enum { R = 37, C = 192 };
    uint8_t *pk = malloc(R * C / 2), *sc = malloc(R * C / 32);
    float *o = malloc(sizeof(float) * R * C);
    for (int i = 0; i < R * C / 2; i++) pk[i] = (uint8_t)rnd();
    for (int i = 0; i < R * C / 32; i++) sc[i] = (uint8_t)(110 + rnd() % 30);
    assert_int_equal(quant_dequant_fp4(pk, sc, R, C, o, &e), 0);
    static const float mx[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            int nib = (pk[r * C / 2 + c / 2] >> (4 * (c & 1))) & 15;
            float v = nib & 8 ? -mx[nib & 7] : mx[nib & 7];
            float want = mul_ref(v, (float)ldexp(1.0, sc[r * C / 32 + c / 32] - 127));
            if (fbits(o[r * C + c]) != fbits(want)) fail_msg("fp4 [%d, %d]: got %g, expected %g", r, c, (double)o[r * C + c], (double)want);
        }
    free(pk);
    free(sc);
    free(o);

    assert_int_equal(quant_dequant_fp4(packed, scale, 2, 48, out, &e), -1); /* not whole groups */
    assert_non_null(strstr(e.msg, "32"));
    scale[3] = 0xff;
    assert_int_equal(quant_dequant_fp4(packed, scale, 2, 64, out, &e), -1);
    assert_non_null(strstr(e.msg, "[1, 1]"));
    assert_non_null(strstr(e.msg, "NaN"));
}

/* The release's dtypes go through safetensors as stored; "F4" (safetensors' sub-byte type) is named. */
static void test_safetensors_dtypes(void **state) {
    test_dir *f = *state;
    char path[256];
    snprintf(path, sizeof path, "%s/q.safetensors", f->dir);
    safetensors_writer *w = safetensors_writer_new();
    mill_err e = {{0}};
    int8_t i8[6] = {1, -2, 3, -4, 5, -128};
    uint8_t f8[4] = {0x38, 0x80, 0x7e, 0x01}, e8[2] = {127, 0};
    int64_t s_i8[2] = {2, 3}, s_f8[2] = {2, 2}, s_e8[2] = {1, 2};
    assert_int_equal(safetensors_writer_add(w, "a.weight", DTYPE_I8, 2, s_i8, i8, &e), 0);
    assert_int_equal(safetensors_writer_add(w, "b.weight", DTYPE_F8_E4M3, 2, s_f8, f8, &e), 0);
    assert_int_equal(safetensors_writer_add(w, "b.scale", DTYPE_F8_E8M0, 2, s_e8, e8, &e), 0);
    if (safetensors_writer_save(w, path, &e)) fail_msg("%s", e.msg);
    safetensors_writer_free(w);
    safetensors *st = NULL;
    if (safetensors_open(path, &st, &e)) fail_msg("%s", e.msg);
    const safetensors_entry *a = safetensors_find(st, "a.weight"), *b = safetensors_find(st, "b.weight"),
                            *s = safetensors_find(st, "b.scale");
    assert_true(a && b && s);
    assert_int_equal(a->dtype, DTYPE_I8);
    assert_int_equal(b->dtype, DTYPE_F8_E4M3);
    assert_int_equal(s->dtype, DTYPE_F8_E8M0);
    assert_memory_equal(a->data, i8, 6);
    assert_memory_equal(b->data, f8, 4);
    assert_memory_equal(s->data, e8, 2);
    assert_int_equal(safetensors_index(st, s), (int)(s - safetensors_at(st, 0)));
    assert_int_equal(safetensors_index(st, NULL), -1);
    safetensors_close(st);
    assert_string_equal(dtype_name(DTYPE_I8), "I8");

    FILE *fp = fopen(path, "wb");
    const char *hdr = "{\"x\":{\"dtype\":\"F4\",\"shape\":[2,2],\"data_offsets\":[0,2]}}";
    uint64_t n = strlen(hdr);
    fwrite(&n, 8, 1, fp);
    fwrite(hdr, 1, n, fp);
    fwrite("\0\0", 1, 2, fp);
    fclose(fp);
    assert_int_equal(safetensors_open(path, &st, &e), -1);
    assert_non_null(strstr(e.msg, "\"F4\""));
    assert_non_null(strstr(e.msg, "'x'"));
}

/* ------------------------------------------------ 3. a quantized tiny-a, made here */

typedef struct {
    char name[160];
    mill_dtype dt;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    void *data;
    size_t nbytes;
    float *deq; /* what model_load must give (quantized and BF16 tensors; F32: the stored floats) */
    size_t numel;
} qt;

typedef struct {
    qt *t;
    int n;
} qset;

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

/* The release's storage for a tensor: '8' FP8, '4' FP4, 'b' BF16, 'f' F32, 'i' as is (tid2eid). */
static char release_kind(const char *n) {
    static const char *fp8[] = {".attn.wq_a.weight", ".attn.wq_b.weight", ".attn.wkv.weight", ".attn.wo_a.weight",
                                ".attn.wo_b.weight", ".attn.indexer.wq_b.weight", ".ffn.shared_experts.w1.weight",
                                ".ffn.shared_experts.w2.weight", ".ffn.shared_experts.w3.weight", ".e_proj.weight", NULL};
    if (strstr(n, ".ffn.experts.") && ends_with(n, ".weight")) return '4';
    for (const char **s = fp8; *s; s++)
        if (ends_with(n, *s)) return '8';
    if (ends_with(n, "tid2eid")) return 'i';
    if (ends_with(n, "attn_sink") || ends_with(n, ".ape") || ends_with(n, "gate.bias") || strstr(n, "hc_attn_") ||
        strstr(n, "hc_ffn_") || strstr(n, "hc_head_"))
        return 'f';
    return 'b';
}

/* This file's encoders: nearest representable code (ties to the even code), scale = the smallest power
 * of two that brings the block's largest magnitude within the format's range. */
static uint8_t enc_e4m3(float x) {
    double v[127], a = fabs((double)x);
    e4m3_grid(v);
    int best = 0;
    for (int c = 1; c < 127; c++) {
        double d = fabs(v[c] - a), db = fabs(v[best] - a);
        if (d < db || (d == db && !(c & 1))) best = c;
    }
    return (uint8_t)(best | (x < 0 ? 0x80 : 0));
}

static uint8_t enc_e2m1(float x) {
    static const float mx[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    int best = 0;
    for (int c = 1; c < 8; c++) {
        float d = fabsf(mx[c] - fabsf(x)), db = fabsf(mx[best] - fabsf(x));
        if (d < db || (d == db && !(c & 1))) best = c;
    }
    return (uint8_t)(best | (x < 0 ? 8 : 0));
}

static uint8_t pow2_code(double x) { /* e8m0 code of the smallest power of two >= x */
    if (x <= 0) return 1;
    int ex;
    double fr = frexp(x, &ex); /* x = fr 2^ex, fr in [0.5, 1) */
    int k = fr == 0.5 ? ex - 1 : ex;
    k += 127;
    return (uint8_t)(k < 1 ? 1 : k > 254 ? 254 : k);
}

static void qset_push(qset *q, const char *name, mill_dtype dt, int ndim, const int64_t *shape, void *data, size_t nbytes,
                      float *deq, size_t numel) {
    q->t = realloc(q->t, sizeof *q->t * (size_t)(q->n + 1));
    qt *t = &q->t[q->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->dt = dt;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->data = data;
    t->nbytes = nbytes;
    t->deq = deq;
    t->numel = numel;
}

static qt *qset_find(qset *q, const char *name) {
    for (int i = 0; i < q->n; i++)
        if (strcmp(q->t[i].name, name) == 0) return &q->t[i];
    return NULL;
}

static void qset_free(qset *q) {
    for (int i = 0; i < q->n; i++) {
        free(q->t[i].data);
        free(q->t[i].deq);
    }
    free(q->t);
    memset(q, 0, sizeof *q);
}

/* tiny-a's fp32 checkpoint in the release's storage. */
static void qset_build(qset *q, int *n_fp8, int *n_fp4) {
    memset(q, 0, sizeof *q);
    safetensors *st = NULL;
    mill_err e = {{0}};
    if (safetensors_open(TINY_A "/model.safetensors", &st, &e)) fail_msg("%s", e.msg);
    *n_fp8 = *n_fp4 = 0;
    for (int i = 0; i < safetensors_count(st); i++) {
        const safetensors_entry *en = safetensors_at(st, i);
        size_t numel = 1;
        for (int d = 0; d < en->ndim; d++) numel *= (size_t)en->shape[d];
        char kind = release_kind(en->name);
        if (kind == 'i') {
            void *c = malloc(en->nbytes);
            memcpy(c, en->data, en->nbytes);
            qset_push(q, en->name, en->dtype, en->ndim, en->shape, c, en->nbytes, NULL, numel);
            continue;
        }
        assert_int_equal(en->dtype, DTYPE_F32);
        float *w = malloc(sizeof(float) * numel), *deq = malloc(sizeof(float) * numel);
        memcpy(w, en->data, sizeof(float) * numel);
        char sname[160];
        snprintf(sname, sizeof sname, "%.*s.scale", (int)strlen(en->name) - 7, en->name);
        if (kind == 'f') {
            memcpy(deq, w, sizeof(float) * numel);
            qset_push(q, en->name, DTYPE_F32, en->ndim, en->shape, w, sizeof(float) * numel, deq, numel);
        } else if (kind == 'b') {
            uint16_t *b = malloc(2 * numel);
            for (size_t j = 0; j < numel; j++) deq[j] = bf16_to_f32(b[j] = f32_to_bf16(w[j]));
            free(w);
            qset_push(q, en->name, DTYPE_BF16, en->ndim, en->shape, b, 2 * numel, deq, numel);
        } else if (kind == '8') {
            assert_int_equal(en->ndim, 2);
            int64_t R = en->shape[0], C = en->shape[1], g[2] = {(R + 127) / 128, (C + 127) / 128};
            uint8_t *codes = malloc((size_t)(R * C)), *sc = malloc((size_t)(g[0] * g[1]));
            for (int64_t bi = 0; bi < g[0]; bi++)
                for (int64_t bj = 0; bj < g[1]; bj++) {
                    double amax = 0;
                    for (int64_t r = bi * 128; r < R && r < bi * 128 + 128; r++)
                        for (int64_t c = bj * 128; c < C && c < bj * 128 + 128; c++) amax = fmax(amax, fabs(w[r * C + c]));
                    sc[bi * g[1] + bj] = pow2_code(amax / 448.0);
                }
            for (int64_t r = 0; r < R; r++)
                for (int64_t c = 0; c < C; c++) {
                    double s = ldexp(1.0, sc[(r / 128) * g[1] + c / 128] - 127);
                    codes[r * C + c] = enc_e4m3((float)(w[r * C + c] / s));
                    deq[r * C + c] = mul_ref(ref_fp8(codes[r * C + c]), (float)s);
                }
            free(w);
            qset_push(q, en->name, DTYPE_F8_E4M3, 2, en->shape, codes, (size_t)(R * C), deq, numel);
            qset_push(q, sname, DTYPE_F8_E8M0, 2, g, sc, (size_t)(g[0] * g[1]), NULL, 0);
            ++*n_fp8;
        } else { /* '4' */
            assert_int_equal(en->ndim, 2);
            int64_t R = en->shape[0], C = en->shape[1], ps[2] = {R, C / 2}, ss[2] = {R, C / 32};
            assert_int_equal(C % 32, 0);
            uint8_t *pk = calloc((size_t)(R * C / 2), 1), *sc = malloc((size_t)(R * C / 32));
            static const float mx[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
            for (int64_t r = 0; r < R; r++)
                for (int64_t gi = 0; gi < C / 32; gi++) {
                    double amax = 0;
                    for (int c = 0; c < 32; c++) amax = fmax(amax, fabs(w[r * C + gi * 32 + c]));
                    uint8_t code = pow2_code(amax / 6.0);
                    sc[r * (C / 32) + gi] = code;
                    double s = ldexp(1.0, code - 127);
                    for (int c = 0; c < 32; c++) {
                        int64_t col = gi * 32 + c;
                        uint8_t nib = enc_e2m1((float)(w[r * C + col] / s));
                        pk[r * (C / 2) + col / 2] |= (uint8_t)(nib << (4 * (col & 1)));
                        deq[r * C + col] = mul_ref(nib & 8 ? -mx[nib & 7] : mx[nib & 7], (float)s);
                    }
                }
            free(w);
            qset_push(q, en->name, DTYPE_I8, 2, ps, pk, (size_t)(R * C / 2), deq, numel);
            qset_push(q, sname, DTYPE_F8_E8M0, 2, ss, sc, (size_t)(R * C / 32), NULL, 0);
            ++*n_fp4;
        }
    }
    safetensors_close(st);
}

static void qset_drop(qset *q, const char *name) {
    qt *t = qset_find(q, name);
    if (!t) fail_msg("no tensor %s", name);
    free(t->data);
    free(t->deq);
    *t = q->t[--q->n];
}

/* config.json: tiny-a's, with quantization_config set to qc (a JSON text; NULL: the release's). */
static void write_config(const char *dir, const char *qc) {
    json_error_t je;
    json_t *root = json_load_file(TINY_A "/config.json", 0, &je);
    assert_non_null(root);
    json_t *q = json_loads(qc ? qc
                              : "{\"activation_scheme\": \"dynamic\", \"fmt\": \"e4m3\", \"quant_method\": \"fp8\", "
                                "\"scale_fmt\": \"ue8m0\", \"weight_block_size\": [128, 128]}",
                           0, &je);
    assert_non_null(q);
    json_object_set_new(root, "quantization_config", q);
    char path[256];
    snprintf(path, sizeof path, "%s/config.json", dir);
    assert_int_equal(json_dump_file(root, path, JSON_INDENT(2)), 0);
    json_decref(root);
}

/* Two shards, every .scale in the second (the loader pairs them across files), and the index. */
static void qset_write(const qset *q, const char *dir, const char *qc) {
    static const char *shard[2] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
    json_t *wm = json_object();
    mill_err e = {{0}};
    for (int s = 0; s < 2; s++) {
        safetensors_writer *w = safetensors_writer_new();
        for (int i = 0; i < q->n; i++) {
            const qt *t = &q->t[i];
            if (ends_with(t->name, ".scale") != s) continue;
            if (safetensors_writer_add(w, t->name, t->dt, t->ndim, t->shape, t->data, &e)) fail_msg("%s", e.msg);
            json_object_set_new(wm, t->name, json_string(shard[s]));
        }
        char path[256];
        snprintf(path, sizeof path, "%s/%s", dir, shard[s]);
        if (safetensors_writer_save(w, path, &e)) fail_msg("%s", e.msg);
        safetensors_writer_free(w);
    }
    json_t *idx = json_pack("{s:{s:i}, s:o}", "metadata", "total_size", 0, "weight_map", wm);
    char path[256];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    assert_int_equal(json_dump_file(idx, path, 0), 0);
    json_decref(idx);
    write_config(dir, qc);
}

static double logits_rel_err(const dsv4_model *m, const char *ref_dir) {
    char path[512];
    int B, T;
    snprintf(path, sizeof path, "%s/input.json", ref_dir);
    int32_t *ids = test_load_ids(path, &B, &T);
    assert_non_null(ids);
    long n = (long)B * T * m->cfg.vocab_size;
    float *logits = malloc(sizeof(float) * (size_t)n);
    int32_t *routing = malloc(sizeof(int32_t) * (size_t)m->cfg.num_hidden_layers * B * T * m->cfg.num_experts_per_tok);
    kctx k;
    arena a;
    mill_err e = {{0}};
    assert_int_equal(kctx_init(&k, DEVICE_CPU, &e), 0);
    assert_int_equal(arena_init(&a, 1 << 20, &e), 0);
    if (model_forward(m, &k, ids, B, T, logits, routing, &a, &e)) fail_msg("%s", e.msg);
    safetensors *st = NULL;
    snprintf(path, sizeof path, "%s/expected.safetensors", ref_dir);
    if (safetensors_open(path, &st, &e)) fail_msg("%s", e.msg);
    const safetensors_entry *ref = safetensors_find(st, "logits");
    assert_non_null(ref);
    assert_int_equal(ref->nbytes, (size_t)n * 4);
    double num = 0, den = 0;
    for (long i = 0; i < n; i++) {
        float r;
        memcpy(&r, (const char *)ref->data + 4 * i, 4);
        double d = (double)logits[i] - r;
        num += d * d;
        den += (double)r * r;
    }
    safetensors_close(st);
    free(ids);
    free(logits);
    free(routing);
    arena_free(&a);
    kctx_free(&k);
    return sqrt(num / den);
}

static void test_tiny_a_quantized(void **state) {
    test_dir *f = *state;
    qset q;
    int n8, n4;
    qset_build(&q, &n8, &n4);
    assert_int_equal(n8, 35); /* 4 layers x (5 attention + 3 shared), 2 indexer wq_b, mtp e_proj */
    assert_int_equal(n4, 96); /* 4 layers x 8 experts x 3 */
    qset_write(&q, f->dir, NULL);
    dsv4_model m;
    mill_err e = {{0}};
    if (model_load(&m, f->dir, &e)) fail_msg("%s", e.msg);
    size_t floats = 0, quantized = 0;
    for (int i = 0; i < m.n_params; i++) {
        const param_info *p = &m.params[i];
        qt *t = qset_find(&q, p->name);
        assert_non_null(t);
        if (p->kind == PARAM_INDEX) continue;
        assert_int_equal(t->numel, p->numel);
        if (memcmp(m.data + p->offset, t->deq, sizeof(float) * p->numel) != 0)
            fail_msg("%s (%s) is not this file's dequantization bit for bit", p->name, dtype_name(t->dt));
        floats += p->numel;
        quantized += t->dt == DTYPE_F8_E4M3 || t->dt == DTYPE_I8;
    }
    int mtp = 0;
    for (int i = 0; i < m.n_extra; i++) {
        qt *t = qset_find(&q, m.extra[i].name);
        assert_non_null(t);
        assert_int_equal((size_t)tensor_numel(&m.extra[i].t), t->numel);
        assert_memory_equal(m.extra[i].t.data, t->deq, sizeof(float) * t->numel);
        mtp += t->dt == DTYPE_F8_E4M3;
    }
    assert_int_equal(quantized, 34 + 96);
    assert_int_equal(mtp, 1); /* mtp.0.e_proj, dequantized beside the BF16 norms */
    double rel = logits_rel_err(&m, TINY_A);
    printf("# quantized tiny-a (made here): %zu floats in %zu quantized + %d other tensors equal this file's "
           "dequantization bit for bit; logits vs HF on the unquantized tiny-a: rel %.3e (the quantization error)\n",
           floats, quantized, m.n_params - (int)quantized, rel);
    assert_true(isfinite(rel) && rel < 0.5);

    /* Tensor parallelism: each rank dequantizes the whole tensor and keeps its slice. */
    int sliced = 0;
    for (int r = 0; r < 2; r++) {
        model_stage stg = model_stage_all(&m.cfg);
        stg.tp = 2;
        stg.tp_rank = r;
        dsv4_model ms;
        if (model_load_stage(&ms, f->dir, &stg, &e)) fail_msg("%s", e.msg);
        for (int i = 0; i < ms.n_params; i++) {
            const param_info *p = &ms.params[i], *w = model_find_param(&m, p->name);
            assert_non_null(w);
            if (p->kind == PARAM_INDEX) continue;
            float *want = malloc(sizeof(float) * p->numel);
            if (p->split >= 0) model_slice_copy(p, 2, r, want, m.data + w->offset, 0);
            else memcpy(want, m.data + w->offset, sizeof(float) * p->numel);
            if (memcmp(ms.data + p->offset, want, sizeof(float) * p->numel) != 0)
                fail_msg("tp rank %d of 2: %s is not its slice of the whole model's", r, p->name);
            sliced += p->split >= 0 && qset_find(&q, p->name)->dt == DTYPE_F8_E4M3;
            free(want);
        }
        model_free(&ms);
    }
    assert_true(sliced >= 2 * 4 * 3); /* wq_b, wo_a, wo_b of every layer at least */
    model_free(&m);
    qset_free(&q);
}

/* ------------------------------------------------ 4. bad quantized checkpoints */

static void load_fails(const test_dir *f, ...) {
    dsv4_model m;
    mill_err e = {{0}};
    int rc = model_load(&m, f->dir, &e);
    if (rc == 0) {
        model_free(&m);
        fail_msg("model_load of %s succeeded, expected an error", f->dir);
    }
    if (strchr(e.msg, '\n')) fail_msg("error is not one line: %s", e.msg);
    printf("# refused: %s\n", e.msg);
    va_list ap;
    va_start(ap, f);
    for (const char *s; (s = va_arg(ap, const char *)) != NULL;)
        if (!strstr(e.msg, s)) fail_msg("error \"%s\" does not contain \"%s\"", e.msg, s);
    va_end(ap);
}

typedef void (*qmod)(qset *q);

/* Writes tiny-a quantized with one modification and expects model_load to fail naming every needle. */
static void bad_variant(const test_dir *f, qmod mod, const char *qc, const char *n1, const char *n2, const char *n3,
                        const char *n4) {
    qset q;
    int n8, n4c;
    qset_build(&q, &n8, &n4c);
    if (mod) mod(&q);
    qset_write(&q, f->dir, qc);
    qset_free(&q);
    load_fails(f, n1, n2 ? n2 : n1, n3 ? n3 : n1, n4 ? n4 : n1, (char *)NULL);
}

static void set_dtype(qset *q, const char *name, mill_dtype dt, size_t elem) {
    qt *t = qset_find(q, name);
    assert_non_null(t);
    size_t numel = t->nbytes / dtype_size(t->dt);
    void *d = calloc(numel, elem);
    if (elem == 2 && dt == DTYPE_BF16)
        for (size_t i = 0; i < numel; i++) ((uint16_t *)d)[i] = f32_to_bf16(1.0f);
    if (elem == 4 && dt == DTYPE_F32)
        for (size_t i = 0; i < numel; i++) ((float *)d)[i] = 1.0f;
    free(t->data);
    t->data = d;
    t->dt = dt;
    t->nbytes = numel * elem;
}

static void mod_drop_scale(qset *q) { qset_drop(q, "layers.1.attn.wq_a.scale"); }
static void mod_scale_shape(qset *q) {
    qt *t = qset_find(q, "layers.2.attn.wo_b.scale");
    t->shape[0] = 1;
    t->shape[1] = 1;
    t->ndim = 1; /* [1] for [1, 1] */
}
static void mod_scale_dtype(qset *q) { set_dtype(q, "layers.0.ffn.shared_experts.w2.scale", DTYPE_BF16, 2); }
static void mod_fp4_scale_f32(qset *q) { set_dtype(q, "layers.3.ffn.experts.5.w3.scale", DTYPE_F32, 4); }
static void mod_fp4_width(qset *q) { /* w2 [64, 32] is packed [64, 16]; store [64, 17] */
    qt *t = qset_find(q, "layers.0.ffn.experts.1.w2.weight");
    t->data = realloc(t->data, 64 * 17);
    t->shape[1] = 17;
    t->nbytes = 64 * 17;
}
static void mod_orphan_scale(qset *q) { /* wkv back to BF16, its scale left behind */
    qt *t = qset_find(q, "layers.3.attn.wkv.weight");
    uint16_t *b = malloc(2 * t->numel);
    for (size_t i = 0; i < t->numel; i++) b[i] = f32_to_bf16(t->deq[i]);
    free(t->data);
    t->data = b;
    t->dt = DTYPE_BF16;
    t->nbytes = 2 * t->numel;
}
static void mod_nan_scale(qset *q) { ((uint8_t *)qset_find(q, "layers.2.ffn.experts.7.w1.scale")->data)[3] = 0xff; }
static void mod_nan_code(qset *q) { ((uint8_t *)qset_find(q, "layers.1.attn.wq_b.weight")->data)[40] = 0xff; }
static void mod_quantized_norm(qset *q) { /* a 1-D tensor in FP8, with a scale beside it */
    qt *t = qset_find(q, "layers.0.attn_norm.weight");
    free(t->data);
    t->data = calloc(64, 1);
    t->dt = DTYPE_F8_E4M3;
    t->nbytes = 64;
    int64_t s[2] = {1, 1};
    qset_push(q, "layers.0.attn_norm.scale", DTYPE_F8_E8M0, 2, s, calloc(1, 1), 1, NULL, 0);
}
static void mod_mtp_no_scale(qset *q) { qset_drop(q, "mtp.0.e_proj.scale"); }

static void test_missing_scale(void **state) {
    bad_variant(*state, mod_drop_scale, NULL, "layers.1.attn.wq_a.weight", "layers.1.attn.wq_a.scale", "missing",
                "model-00001-of-00002.safetensors");
}
static void test_scale_shape(void **state) {
    bad_variant(*state, mod_scale_shape, NULL, "layers.2.attn.wo_b.scale", "[1]", "[1, 1]",
                "model-00002-of-00002.safetensors");
}
static void test_scale_dtype(void **state) {
    bad_variant(*state, mod_scale_dtype, NULL, "layers.0.ffn.shared_experts.w2.scale", "BF16", "F8_E8M0 or F32",
                "model-00002-of-00002.safetensors");
    bad_variant(*state, mod_fp4_scale_f32, NULL, "layers.3.ffn.experts.5.w3.scale", "F32", "expected F8_E8M0",
                NULL);
}
static void test_fp4_width(void **state) {
    bad_variant(*state, mod_fp4_width, NULL, "layers.0.ffn.experts.1.w2.weight", "[64, 17]", "[64, 16]",
                "packed FP4");
}
static void test_orphan_scale(void **state) {
    bad_variant(*state, mod_orphan_scale, NULL, "unexpected tensor layers.3.attn.wkv.scale", "BF16",
                "layers.3.attn.wkv.weight", NULL);
}
static void test_nan_codes(void **state) {
    bad_variant(*state, mod_nan_scale, NULL, "layers.2.ffn.experts.7.w1.weight", "layers.2.ffn.experts.7.w1.scale",
                "0xff", "NaN");
    bad_variant(*state, mod_nan_code, NULL, "layers.1.attn.wq_b.weight", "0xff", "[1, 8]", "NaN");
}
static void test_quantized_1d(void **state) {
    bad_variant(*state, mod_quantized_norm, NULL, "layers.0.attn_norm.weight", "only 2-D", "F8_E4M3", NULL);
}
static void test_mtp_no_scale(void **state) {
    bad_variant(*state, mod_mtp_no_scale, NULL, "mtp.0.e_proj.weight", "mtp.0.e_proj.scale", "missing", NULL);
}
static void test_bad_quant_config(void **state) {
    bad_variant(*state, NULL, "{\"quant_method\": \"awq\"}", "config.json", "quant_method", "\"awq\"", "\"fp8\"");
    bad_variant(*state, NULL, "{\"quant_method\": \"fp8\", \"fmt\": \"e5m2\"}", "config.json", "fmt", "e5m2", NULL);
    bad_variant(*state, NULL, "{\"weight_block_size\": [128]}", "weight_block_size", "config.json", NULL, NULL);
    /* 64 x 64 blocks: the release-shaped [1, 1] scales no longer fit wq_b [128, 32] */
    bad_variant(*state, NULL, "{\"quant_method\": \"fp8\", \"weight_block_size\": [64, 64]}",
                "layers.0.attn.wq_b.scale", "[2, 1]", "64x64", NULL);
}

/* ------------------------------------------------ 5. the torch / HF goldens (GPU machine) */

static int have_dir(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static void torch_golden(const char *name, int *done) {
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/%s", MILL_TEST_DATA, name);
    if (!have_dir(dir)) return;
    ++*done;
    mill_err e = {{0}};
    safetensors *ck = NULL, *gold = NULL;
    snprintf(path, sizeof path, "%s/dequant.safetensors", dir);
    if (safetensors_open(dir, &ck, &e) || safetensors_open(path, &gold, &e)) fail_msg("%s", e.msg);
    /* a. kernels/quant.c on each stored pair == torch's dequantization, memcmp */
    size_t floats = 0;
    for (int i = 0; i < safetensors_count(gold); i++) {
        const safetensors_entry *g = safetensors_at(gold, i), *w = safetensors_find(ck, g->name);
        char sn[200];
        snprintf(sn, sizeof sn, "%.*s.scale", (int)strlen(g->name) - 7, g->name);
        const safetensors_entry *s = safetensors_find(ck, sn);
        assert_non_null(w);
        assert_non_null(s);
        size_t n = g->nbytes / 4;
        float *out = malloc(g->nbytes);
        int rc = w->dtype == DTYPE_I8 ? quant_dequant_fp4(w->data, s->data, g->shape[0], g->shape[1], out, &e)
                                      : quant_dequant_fp8(w->data, s->data, s->dtype, g->shape[0], g->shape[1],
                                                          QUANT_FP8_BLOCK, QUANT_FP8_BLOCK, out, &e);
        if (rc) fail_msg("%s: %s", g->name, e.msg);
        if (memcmp(out, g->data, g->nbytes) != 0) fail_msg("%s: %s's dequantization differs from torch's", name, g->name);
        floats += n;
        free(out);
    }
    /* b. model_load's parameters and mtp.* extras == torch's */
    dsv4_model m;
    if (model_load(&m, dir, &e)) fail_msg("%s", e.msg);
    int matched = 0;
    for (int i = 0; i < safetensors_count(gold); i++) {
        const safetensors_entry *g = safetensors_at(gold, i);
        const param_info *p = model_find_param(&m, g->name);
        const float *got = NULL;
        if (p) got = m.data + p->offset;
        for (int x = 0; !got && x < m.n_extra; x++)
            if (strcmp(m.extra[x].name, g->name) == 0) got = m.extra[x].t.data;
        if (!got) fail_msg("%s: %s was not loaded", name, g->name);
        if (memcmp(got, g->data, g->nbytes) != 0) fail_msg("%s: loaded %s differs from torch's", name, g->name);
        matched++;
    }
    /* c. logits against HF's on the quantized checkpoint */
    double rel = logits_rel_err(&m, dir);
    printf("# %s: %d quantized tensors (%zu floats) bit-equal to torch's dequantization, loaded too; logits vs HF "
           "rel err %.3e\n", name, matched, floats, rel);
    assert_true(rel <= 1e-4);
    model_free(&m);
    safetensors_close(ck);
    safetensors_close(gold);
}

static void test_torch_goldens(void **state) {
    (void)state;
    int done = 0;
    char path[512];
    snprintf(path, sizeof path, "%s/quant-tiny-a/decode_tables.safetensors", MILL_TEST_DATA);
    struct stat sb;
    if (stat(path, &sb) == 0) {
        mill_err e = {{0}};
        safetensors *st = NULL;
        if (safetensors_open(path, &st, &e)) fail_msg("%s", e.msg);
        static const struct {
            const char *name;
            int n;
            float (*dec)(uint8_t);
        } tabs[] = {{"fp8_e4m3", 256, quant_fp8_e4m3}, {"e8m0", 256, quant_e8m0}, {"e2m1_hf", 16, quant_e2m1}};
        for (size_t t = 0; t < sizeof tabs / sizeof tabs[0]; t++) {
            const safetensors_entry *en = safetensors_find(st, tabs[t].name);
            if (!en) continue;
            assert_int_equal(en->nbytes, (size_t)tabs[t].n * 4);
            for (int c = 0; c < tabs[t].n; c++) {
                float want;
                memcpy(&want, (const char *)en->data + 4 * c, 4);
                float got = tabs[t].dec((uint8_t)c);
                if (isnan(want) || isnan(got)) assert_true(isnan(want) && isnan(got));
                else assert_same_bits(got, want, tabs[t].name, c);
            }
            printf("# torch's %s table: %d codes equal\n", tabs[t].name, tabs[t].n);
        }
        safetensors_close(st);
    }
    torch_golden("quant-tiny-a", &done);
    torch_golden("quant-tiny-wide", &done);
    if (!done) {
        printf("# tests/data/quant-tiny-*: absent (make them with tests/reference/make_quant_goldens.py on the GPU "
               "machine); torch / HF parity not checked\n");
        skip();
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp8_table),
        cmocka_unit_test(test_e8m0_table),
        cmocka_unit_test(test_e2m1_table),
        cmocka_unit_test(test_fp8_dequant),
        cmocka_unit_test(test_fp4_dequant),
        cmocka_unit_test_setup_teardown(test_safetensors_dtypes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tiny_a_quantized, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_scale, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scale_shape, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scale_dtype, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fp4_width, setup, teardown),
        cmocka_unit_test_setup_teardown(test_orphan_scale, setup, teardown),
        cmocka_unit_test_setup_teardown(test_nan_codes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_quantized_1d, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mtp_no_scale, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_quant_config, setup, teardown),
        cmocka_unit_test(test_torch_goldens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
