/* tests/test_safetensors.c — reader/writer round trips, sharded checkpoints
 * and hostile files (each must fail with a message naming file and problem). */
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


static int setup(void **state) { return test_dir_setup(state, "test_st", NULL); }

static int teardown(void **state) { return test_dir_teardown(state); }

static void path_in(const test_dir *f, const char *name, char *out, size_t n) { snprintf(out, n, "%s/%s", f->dir, name); }

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    if (n) assert_int_equal(fwrite(p, 1, n, fp), n);
    assert_int_equal(fclose(fp), 0);
}

/* A safetensors file with the given header text and `data_len` zero bytes of data. */
static void write_raw(const char *path, const char *header, size_t data_len) {
    size_t hl = strlen(header);
    unsigned char *buf = calloc(1, 8 + hl + data_len);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    write_bytes(path, buf, 8 + hl + data_len);
    free(buf);
}

/* open must fail, and the message must name the file and contain each key word. */
static void expect_fail(const char *path, const char *file_name, ...) {
    safetensors *st = (safetensors *)0x1;
    mill_err e = {{0}};
    assert_int_equal(safetensors_open(path, &st, &e), -1);
    assert_null(st);
    print_message("    error: %s\n", e.msg);
    assert_non_null(strstr(e.msg, file_name));
    va_list ap;
    va_start(ap, file_name);
    for (const char *kw; (kw = va_arg(ap, const char *));) {
        if (!strstr(e.msg, kw)) print_message("    missing key word \"%s\"\n", kw);
        assert_non_null(strstr(e.msg, kw));
    }
    va_end(ap);
}

static void save_simple(const char *path, const char *const *names, int n, float base) {
    safetensors_writer *w = safetensors_writer_new();
    assert_non_null(w);
    mill_err e = {{0}};
    for (int i = 0; i < n; i++) {
        float v[3] = {base + (float)i, base + (float)i + 0.5f, -(base + (float)i)};
        int64_t shape[1] = {3};
        assert_int_equal(safetensors_writer_add(w, names[i], DTYPE_F32, 1, shape, v, &e), 0);
    }
    assert_int_equal(safetensors_writer_set_metadata(w, "format", "pt", &e), 0);
    assert_int_equal(safetensors_writer_save(w, path, &e), 0);
    safetensors_writer_free(w);
}

static void check_entry(const safetensors_entry *en, const char *name, mill_dtype dt, int ndim, const int64_t *shape,
                        const void *data, size_t nbytes) {
    assert_non_null(en);
    assert_string_equal(en->name, name);
    assert_int_equal(en->dtype, dt);
    assert_int_equal(en->ndim, ndim);
    for (int i = 0; i < ndim; i++) assert_int_equal(en->shape[i], shape[i]);
    assert_int_equal(en->nbytes, nbytes);
    assert_memory_equal(en->data, data, nbytes);
}

static void test_round_trip(void **state) {
    test_dir *f = *state;
    char path[128];
    path_in(f, "rt.safetensors", path, sizeof path);
    mill_err e = {{0}};

    float f32[6] = {1.5f, -2.25f, 3.0f, 0.0f, 1e-3f, -7e8f};
    int64_t s_f32[2] = {2, 3};
    uint16_t bf16[4];
    const float bf_src[4] = {1.0f, -0.5f, 3.140625f, 65536.0f};
    for (int i = 0; i < 4; i++) bf16[i] = f32_to_bf16(bf_src[i]);
    int64_t s_bf16[1] = {4};
    int64_t i64[3] = {INT64_MIN, -1, INT64_MAX};
    int64_t s_i64[1] = {3};
    float scalar = 42.5f;
    int32_t cube[24];
    for (int i = 0; i < 24; i++) cube[i] = i * 1000 - 7;
    int64_t s_cube[3] = {2, 3, 4};

    safetensors_writer *w = safetensors_writer_new();
    assert_non_null(w);
    assert_int_equal(safetensors_writer_add(w, "layer.w", DTYPE_F32, 2, s_f32, f32, &e), 0);
    assert_int_equal(safetensors_writer_add(w, "emb", DTYPE_BF16, 1, s_bf16, bf16, &e), 0);
    assert_int_equal(safetensors_writer_add(w, "ids", DTYPE_I64, 1, s_i64, i64, &e), 0);
    assert_int_equal(safetensors_writer_add(w, "scale", DTYPE_F32, 0, NULL, &scalar, &e), 0);
    assert_int_equal(safetensors_writer_add(w, "cube", DTYPE_I32, 3, s_cube, cube, &e), 0);
    assert_int_equal(safetensors_writer_set_metadata(w, "format", "pt", &e), 0);
    assert_int_equal(safetensors_writer_set_metadata(w, "step", "1", &e), 0);
    assert_int_equal(safetensors_writer_set_metadata(w, "step", "1200", &e), 0); /* last write wins */
    /* The writer copies at add time: clobbering the sources must not change the file. */
    float f32_exp[6];
    int32_t cube_exp[24];
    memcpy(f32_exp, f32, sizeof f32);
    memcpy(cube_exp, cube, sizeof cube);
    f32[0] = 99.0f;
    cube[5] = 0;
    /* Duplicates and bad dtypes are refused at add time. */
    assert_int_equal(safetensors_writer_add(w, "emb", DTYPE_BF16, 1, s_bf16, bf16, &e), -1);
    assert_non_null(strstr(e.msg, "duplicate"));
    assert_int_equal(safetensors_writer_add(w, "bad", (mill_dtype)DTYPE_COUNT, 1, s_bf16, bf16, &e), -1);
    assert_non_null(strstr(e.msg, "dtype"));
    int64_t neg[1] = {-1};
    assert_int_equal(safetensors_writer_add(w, "neg", DTYPE_F32, 1, neg, f32, &e), -1);
    assert_int_equal(safetensors_writer_save(w, path, &e), 0);
    safetensors_writer_free(w);

    char tmp[160];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_equal(access(tmp, F_OK), -1); /* renamed away */

    /* Header is padded so the data section starts 8-byte aligned. */
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    unsigned char len8[8];
    assert_int_equal(fread(len8, 1, 8, fp), 8);
    fclose(fp);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | len8[i];
    assert_int_equal(hl % 8, 0);

    safetensors *st = NULL;
    int rc = safetensors_open(path, &st, &e);
    if (rc) print_message("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(safetensors_count(st), 5);
    /* Listing is in file order, which is insertion order. */
    const char *order[5] = {"layer.w", "emb", "ids", "scale", "cube"};
    for (int i = 0; i < 5; i++) assert_string_equal(safetensors_at(st, i)->name, order[i]);
    assert_null(safetensors_at(st, 5));
    assert_null(safetensors_at(st, -1));

    check_entry(safetensors_find(st, "layer.w"), "layer.w", DTYPE_F32, 2, s_f32, f32_exp, sizeof f32_exp);
    check_entry(safetensors_find(st, "emb"), "emb", DTYPE_BF16, 1, s_bf16, bf16, sizeof bf16);
    check_entry(safetensors_find(st, "ids"), "ids", DTYPE_I64, 1, s_i64, i64, sizeof i64);
    check_entry(safetensors_find(st, "scale"), "scale", DTYPE_F32, 0, NULL, &scalar, sizeof scalar);
    check_entry(safetensors_find(st, "cube"), "cube", DTYPE_I32, 3, s_cube, cube_exp, sizeof cube_exp);

    const safetensors_entry *en = safetensors_find(st, "emb");
    for (int i = 0; i < 4; i++) {
        uint16_t v;
        memcpy(&v, (const char *)en->data + 2 * i, 2);
        assert_true(bf16_to_f32(v) == bf_src[i]);
    }
    en = safetensors_find(st, "ids");
    int64_t last;
    memcpy(&last, (const char *)en->data + 16, 8);
    assert_true(last == INT64_MAX);
    en = safetensors_find(st, "layer.w");
    assert_int_equal((uintptr_t)en->data % 8, 0);
    float x;
    memcpy(&x, (const char *)en->data + 5 * 4, 4);
    assert_true(x == -7e8f);
    assert_string_equal(safetensors_file_of(st, en), path);
    assert_int_equal(en->file, 0);

    assert_string_equal(safetensors_metadata(st, "format"), "pt");
    assert_string_equal(safetensors_metadata(st, "step"), "1200");
    assert_null(safetensors_metadata(st, "nope"));
    safetensors_close(st);
}

static void test_find_missing(void **state) {
    test_dir *f = *state;
    char path[128];
    path_in(f, "m.safetensors", path, sizeof path);
    const char *names[2] = {"a", "b"};
    save_simple(path, names, 2, 1.0f);
    safetensors *st = NULL;
    mill_err e = {{0}};
    assert_int_equal(safetensors_open(path, &st, &e), 0);
    assert_non_null(safetensors_find(st, "a"));
    assert_non_null(safetensors_find(st, "b"));
    assert_null(safetensors_find(st, "c"));
    assert_null(safetensors_find(st, ""));
    assert_null(safetensors_find(st, "a "));
    safetensors_close(st);
}

/* Many tensors: the name table must find every one and nothing else. */
static void test_many_tensors(void **state) {
    test_dir *f = *state;
    char path[128];
    path_in(f, "many.safetensors", path, sizeof path);
    mill_err e = {{0}};
    safetensors_writer *w = safetensors_writer_new();
    enum { N = 5000 };
    for (int i = 0; i < N; i++) {
        char name[32];
        snprintf(name, sizeof name, "layers.%d.w", i);
        int32_t v = i * 3;
        assert_int_equal(safetensors_writer_add(w, name, DTYPE_I32, 0, NULL, &v, &e), 0);
    }
    assert_int_equal(safetensors_writer_add(w, "layers.17.w", DTYPE_I32, 0, NULL, &e, &e), -1);
    assert_int_equal(safetensors_writer_save(w, path, &e), 0);
    safetensors_writer_free(w);
    safetensors *st = NULL;
    assert_int_equal(safetensors_open(path, &st, &e), 0);
    assert_int_equal(safetensors_count(st), N);
    assert_null(safetensors_metadata(st, "format"));
    for (int i = 0; i < N; i++) {
        char name[32];
        snprintf(name, sizeof name, "layers.%d.w", i);
        const safetensors_entry *en = safetensors_find(st, name);
        assert_non_null(en);
        int32_t v;
        memcpy(&v, en->data, 4);
        assert_int_equal(v, i * 3);
    }
    assert_null(safetensors_find(st, "layers.5000.w"));
    safetensors_close(st);
}

static void write_index(const char *path, const char *weight_map) {
    char buf[1024];
    snprintf(buf, sizeof buf, "{\"metadata\": {\"total_size\": 36}, \"weight_map\": %s}", weight_map);
    write_bytes(path, buf, strlen(buf));
}

static void test_sharded(void **state) {
    test_dir *f = *state;
    char s1[128], s2[128], idx[128];
    path_in(f, "model-00001-of-00002.safetensors", s1, sizeof s1);
    path_in(f, "model-00002-of-00002.safetensors", s2, sizeof s2);
    path_in(f, "model.safetensors.index.json", idx, sizeof idx);
    const char *n1[2] = {"a", "b"}, *n2[1] = {"c"};
    save_simple(s1, n1, 2, 10.0f);
    save_simple(s2, n2, 1, 20.0f);
    write_index(idx, "{\"a\": \"model-00001-of-00002.safetensors\", \"c\": \"model-00002-of-00002.safetensors\","
                     " \"b\": \"model-00001-of-00002.safetensors\"}");

    const char *opens[2] = {f->dir, idx}; /* the directory and the index itself */
    for (int k = 0; k < 2; k++) {
        safetensors *st = NULL;
        mill_err e = {{0}};
        int rc = safetensors_open(opens[k], &st, &e);
        if (rc) print_message("%s\n", e.msg);
        assert_int_equal(rc, 0);
        assert_int_equal(safetensors_count(st), 3);
        const safetensors_entry *a = safetensors_find(st, "a"), *b = safetensors_find(st, "b"),
                                *c = safetensors_find(st, "c");
        assert_non_null(a);
        assert_non_null(b);
        assert_non_null(c);
        assert_string_equal(safetensors_file_of(st, a), s1);
        assert_string_equal(safetensors_file_of(st, b), s1);
        assert_string_equal(safetensors_file_of(st, c), s2);
        assert_int_not_equal(a->file, c->file);
        float v[3];
        memcpy(v, c->data, sizeof v);
        assert_true(v[0] == 20.0f && v[1] == 20.5f && v[2] == -20.0f);
        memcpy(v, b->data, sizeof v);
        assert_true(v[0] == 11.0f && v[1] == 11.5f && v[2] == -11.0f);
        assert_string_equal(safetensors_metadata(st, "format"), "pt");
        assert_null(safetensors_find(st, "d"));
        safetensors_close(st);
    }

    /* A tensor in two shards is an error naming both. */
    const char *n3[1] = {"a"};
    save_simple(s2, n3, 1, 30.0f);
    write_index(idx, "{\"a\": \"model-00001-of-00002.safetensors\", \"c\": \"model-00002-of-00002.safetensors\"}");
    expect_fail(f->dir, "model-00002-of-00002.safetensors", "'a'", "duplicate", "model-00001-of-00002.safetensors",
                NULL);
}

static void test_dir_single_and_empty(void **state) {
    test_dir *f = *state;
    char sub[128], path[160];
    path_in(f, "single", sub, sizeof sub);
    assert_int_equal(mkdir(sub, 0700), 0);
    expect_fail(sub, "single", "model.safetensors", NULL); /* neither file present */
    snprintf(path, sizeof path, "%s/model.safetensors", sub);
    const char *names[1] = {"x"};
    save_simple(path, names, 1, 5.0f);
    safetensors *st = NULL;
    mill_err e = {{0}};
    assert_int_equal(safetensors_open(sub, &st, &e), 0);
    assert_int_equal(safetensors_count(st), 1);
    assert_string_equal(safetensors_file_of(st, safetensors_at(st, 0)), path);
    safetensors_close(st);
    path_in(f, "does-not-exist.safetensors", path, sizeof path);
    expect_fail(path, "does-not-exist.safetensors", "cannot open", NULL);
}

/* ---- hostile files ---- */

static void test_truncated_data(void **state) {
    test_dir *f = *state;
    char path[128];
    path_in(f, "trunc.safetensors", path, sizeof path);
    const char *names[2] = {"first", "last"};
    save_simple(path, names, 2, 1.0f);
    FILE *fp = fopen(path, "rb");
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fclose(fp);
    assert_int_equal(truncate(path, size - 4), 0);
    expect_fail(path, "trunc.safetensors", "'last'", "truncated", NULL);
}

static void test_header_length_too_big(void **state) {
    test_dir *f = *state;
    char path[128];
    path_in(f, "hlen.safetensors", path, sizeof path);
    unsigned char buf[20] = {0xe8, 0x03}; /* 1000, with 12 bytes following */
    memcpy(buf + 8, "{}          ", 12);
    write_bytes(path, buf, sizeof buf);
    expect_fail(path, "hlen.safetensors", "header length 1000", "truncated", NULL);
    memset(buf, 0xff, 8); /* u64 max must not wrap the size check */
    write_bytes(path, buf, sizeof buf);
    expect_fail(path, "hlen.safetensors", "header length", NULL);
}

static void test_corrupt_json(void **state) {
    test_dir *f = *state;
    char path[128];
    path_in(f, "json.safetensors", path, sizeof path);
    write_raw(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]", 4);
    expect_fail(path, "json.safetensors", "not valid JSON", NULL);
    write_raw(path, "[1, 2]", 0);
    expect_fail(path, "json.safetensors", "not an object", NULL);
    write_raw(path, "{\"a\": 3}", 0);
    expect_fail(path, "json.safetensors", "'a'", "not an object", NULL);
    write_raw(path, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
                    " \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}",
              4);
    expect_fail(path, "json.safetensors", "duplicate", NULL);
    write_raw(path, "{\"__metadata__\": {\"k\": 1}}", 0);
    expect_fail(path, "json.safetensors", "__metadata__", NULL);
}

static void test_unknown_dtype(void **state) {
    test_dir *f = *state;
    char path[128];
    path_in(f, "dtype.safetensors", path, sizeof path);
    write_raw(path, "{\"w\": {\"dtype\": \"F33\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4);
    expect_fail(path, "dtype.safetensors", "'w'", "unknown dtype \"F33\"", "BF16", NULL);
    write_raw(path, "{\"w\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4);
    expect_fail(path, "dtype.safetensors", "'w'", "dtype", NULL);
}

static void test_shape_mismatch(void **state) {
    test_dir *f = *state;
    char path[128];
    path_in(f, "shape.safetensors", path, sizeof path);
    write_raw(path, "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 20]}}", 24);
    expect_fail(path, "shape.safetensors", "'w'", "[2, 3]", "needs 24 bytes", "span 20", NULL);
    write_raw(path, "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, -3], \"data_offsets\": [0, 24]}}", 24);
    expect_fail(path, "shape.safetensors", "'w'", "non-negative", NULL);
    write_raw(path, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1, 1, 1, 1, 1, 1, 1], \"data_offsets\": [0, 4]}}", 4);
    expect_fail(path, "shape.safetensors", "'w'", "shape", NULL);
    write_raw(path, "{\"w\": {\"dtype\": \"F32\", \"shape\": 6, \"data_offsets\": [0, 24]}}", 24);
    expect_fail(path, "shape.safetensors", "'w'", "shape", NULL);
    /* 2^62 * 2^2 * 4 bytes wraps to 0 in 64 bits: must be caught, not matched. */
    write_raw(path,
              "{\"w\": {\"dtype\": \"F32\", \"shape\": [4611686018427387904, 4], \"data_offsets\": [0, 0]}}", 0);
    expect_fail(path, "shape.safetensors", "'w'", "overflow", NULL);
}

static void test_offsets_out_of_range(void **state) {
    test_dir *f = *state;
    char path[128];
    path_in(f, "offs.safetensors", path, sizeof path);
    write_raw(path, "{\"w\": {\"dtype\": \"F32\", \"shape\": [6], \"data_offsets\": [0, 24]}}", 16);
    expect_fail(path, "offs.safetensors", "'w'", "beyond the 16-byte data section", NULL);
    write_raw(path, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}", 16);
    expect_fail(path, "offs.safetensors", "'w'", "begin <= end", NULL);
    write_raw(path, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}", 16);
    expect_fail(path, "offs.safetensors", "'w'", "data_offsets", NULL);
    write_raw(path, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", 16);
    expect_fail(path, "offs.safetensors", "'w'", "data_offsets", NULL);
    write_raw(path, "{\"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [9223372036854775807, 0]}}", 16);
    expect_fail(path, "offs.safetensors", "'w'", "data_offsets", NULL);
}

static void test_empty_file(void **state) {
    test_dir *f = *state;
    char path[128];
    path_in(f, "empty.safetensors", path, sizeof path);
    write_bytes(path, "", 0);
    expect_fail(path, "empty.safetensors", "empty", "0 bytes", NULL);
    write_bytes(path, "\x02\0\0", 3);
    expect_fail(path, "empty.safetensors", "shorter than", NULL);
    write_raw(path, "", 0); /* zero-length header: not JSON */
    expect_fail(path, "empty.safetensors", "JSON", NULL);
}

static void test_index_missing_shard(void **state) {
    test_dir *f = *state;
    char s1[128], idx[128];
    path_in(f, "part-1.safetensors", s1, sizeof s1);
    path_in(f, "model.safetensors.index.json", idx, sizeof idx);
    const char *n1[1] = {"a"};
    save_simple(s1, n1, 1, 1.0f);
    write_index(idx, "{\"a\": \"part-1.safetensors\", \"b\": \"part-2.safetensors\"}");
    expect_fail(f->dir, "part-2.safetensors", "model.safetensors.index.json", "cannot open", NULL);
}

static void test_index_missing_tensor(void **state) {
    test_dir *f = *state;
    char s1[128], s2[128], idx[128];
    path_in(f, "part-1.safetensors", s1, sizeof s1);
    path_in(f, "part-2.safetensors", s2, sizeof s2);
    path_in(f, "model.safetensors.index.json", idx, sizeof idx);
    const char *n1[1] = {"a"}, *n2[1] = {"b"};
    save_simple(s1, n1, 1, 1.0f);
    save_simple(s2, n2, 1, 2.0f);
    write_index(idx, "{\"a\": \"part-1.safetensors\", \"b\": \"part-2.safetensors\", \"ghost\": \"part-2.safetensors\"}");
    expect_fail(idx, "part-2.safetensors", "'ghost'", "missing", NULL);
    /* Present, but in the other shard than the index claims. */
    const char *n3[2] = {"a", "c"};
    save_simple(s1, n3, 2, 1.0f);
    write_index(idx, "{\"a\": \"part-2.safetensors\", \"b\": \"part-2.safetensors\", \"c\": \"part-1.safetensors\"}");
    expect_fail(idx, "part-2.safetensors", "'a'", "missing", "found in", "part-1.safetensors", NULL);
    write_bytes(idx, "{\"weight_map\": [}", 17);
    expect_fail(idx, "model.safetensors.index.json", "JSON", NULL);
    write_index(idx, "{\"a\": 5}");
    expect_fail(idx, "model.safetensors.index.json", "'a'", "shard", NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_find_missing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_many_tensors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sharded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dir_single_and_empty, setup, teardown),
        cmocka_unit_test_setup_teardown(test_truncated_data, setup, teardown),
        cmocka_unit_test_setup_teardown(test_header_length_too_big, setup, teardown),
        cmocka_unit_test_setup_teardown(test_corrupt_json, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unknown_dtype, setup, teardown),
        cmocka_unit_test_setup_teardown(test_shape_mismatch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_offsets_out_of_range, setup, teardown),
        cmocka_unit_test_setup_teardown(test_empty_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_index_missing_shard, setup, teardown),
        cmocka_unit_test_setup_teardown(test_index_missing_tensor, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
