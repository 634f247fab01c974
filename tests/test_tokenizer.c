/* tests/test_tokenizer.c — the byte tokenizer: round trips (every byte, UTF-8),
 * special tokens, and bad input (small vocab, bad or reserved ids, small buffers). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/tokenizer.h"

static tokenizer *make(int vocab) {
    tokenizer *t = NULL;
    mill_err e = {{0}};
    assert_int_equal(tokenizer_bytes_new(&t, vocab, &e), 0);
    assert_non_null(t);
    return t;
}

static void test_specials(void **state) {
    (void)state;
    tokenizer *t = make(264);
    assert_int_equal(tokenizer_vocab_size(t), 264);
    assert_int_equal(tokenizer_bos(t), 256);
    assert_int_equal(tokenizer_eos(t), 257);
    assert_int_equal(tokenizer_pad(t), 258);
    assert_int_equal(tokenizer_special_id(t, "<|bos|>"), 256);
    assert_int_equal(tokenizer_special_id(t, "<|eos|>"), 257);
    assert_int_equal(tokenizer_special_id(t, "<|pad|>"), 258);
    assert_int_equal(tokenizer_special_id(t, "<|eos|"), -1);
    assert_int_equal(tokenizer_special_id(t, "eos"), -1);
    assert_int_equal(tokenizer_special_id(t, "<|EOS|>"), -1);
    assert_int_equal(tokenizer_special_id(t, ""), -1);
    assert_int_equal(tokenizer_special_id(t, NULL), -1);
    tokenizer_free(t);
    /* the smallest vocabulary works too */
    t = make(259);
    assert_int_equal(tokenizer_vocab_size(t), 259);
    assert_int_equal(tokenizer_pad(t), 258);
    tokenizer_free(t);
}

static void test_vocab_too_small(void **state) {
    (void)state;
    const int bad[] = {258, 256, 0, -5};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        tokenizer *t = (tokenizer *)&t; /* must be cleared on failure */
        mill_err e = {{0}};
        assert_int_equal(tokenizer_bytes_new(&t, bad[i], &e), -1);
        assert_null(t);
        char num[16];
        snprintf(num, sizeof num, "%d", bad[i]);
        assert_non_null(strstr(e.msg, "vocab_size"));
        assert_non_null(strstr(e.msg, num));
    }
}

static void test_all_bytes_round_trip(void **state) {
    (void)state;
    tokenizer *t = make(264);
    char text[256];
    for (int i = 0; i < 256; i++) text[i] = (char)(unsigned char)i;
    int32_t ids[256];
    int n = -1;
    mill_err e = {{0}};
    assert_int_equal(tokenizer_encode(t, text, sizeof text, ids, 256, &n, &e), 0);
    assert_int_equal(n, 256);
    for (int i = 0; i < 256; i++) assert_int_equal(ids[i], i);
    char out[257];
    memset(out, 'x', sizeof out);
    assert_int_equal(tokenizer_decode(t, ids, n, out, sizeof out, &e), 0);
    assert_memory_equal(out, text, 256);
    assert_int_equal(out[256], 0);
    tokenizer_free(t);
}

static void test_utf8_round_trip(void **state) {
    (void)state;
    tokenizer *t = make(264);
    const char *text = "h\xc3\xa9llo w\xc3\xb6rld \xe2\x80\x94 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x99\x82!"; /* héllo wörld — 日本 🙂! */
    size_t len = strlen(text);
    int32_t ids[64];
    int n = -1;
    mill_err e = {{0}};
    assert_int_equal(tokenizer_encode(t, text, len, ids, 64, &n, &e), 0);
    assert_int_equal(n, (int)len);
    assert_int_equal(ids[1], 0xc3); /* one id per byte, high bytes unsigned */
    assert_int_equal(ids[2], 0xa9);
    for (int i = 0; i < n; i++) assert_true(ids[i] >= 0 && ids[i] < 256);
    char out[64];
    assert_int_equal(tokenizer_decode(t, ids, n, out, sizeof out, &e), 0);
    assert_string_equal(out, text);
    /* empty text, NULL allowed when len is 0 */
    assert_int_equal(tokenizer_encode(t, NULL, 0, ids, 0, &n, &e), 0);
    assert_int_equal(n, 0);
    assert_int_equal(tokenizer_decode(t, ids, 0, out, sizeof out, &e), 0);
    assert_string_equal(out, "");
    tokenizer_free(t);
}

static void test_specials_decode_by_name(void **state) {
    (void)state;
    tokenizer *t = make(264);
    const int32_t ids[] = {256, 'h', 'i', 257, 258, 258};
    char out[64];
    mill_err e = {{0}};
    assert_int_equal(tokenizer_decode(t, ids, 6, out, sizeof out, &e), 0);
    assert_string_equal(out, "<|bos|>hi<|eos|><|pad|><|pad|>");
    /* a special's name in text is text: a prompt cannot inject an eos */
    int32_t enc[16];
    int n = 0;
    assert_int_equal(tokenizer_encode(t, "<|eos|>", 7, enc, 16, &n, &e), 0);
    assert_int_equal(n, 7);
    for (int i = 0; i < n; i++) assert_true(enc[i] < 256);
    tokenizer_free(t);
}

static void test_decode_bad_ids(void **state) {
    (void)state;
    tokenizer *t = make(264);
    char out[64];
    mill_err e = {{0}};
    const int32_t over[] = {'a', 'b', 264};
    assert_int_equal(tokenizer_decode(t, over, 3, out, sizeof out, &e), -1);
    assert_non_null(strstr(e.msg, "264"));
    assert_non_null(strstr(e.msg, "position 2"));
    assert_non_null(strstr(e.msg, "outside")); /* out of range, not merely reserved */
    const int32_t neg[] = {-1, 'a'};
    assert_int_equal(tokenizer_decode(t, neg, 2, out, sizeof out, &e), -1);
    assert_non_null(strstr(e.msg, "-1"));
    assert_non_null(strstr(e.msg, "position 0"));
    const int32_t reserved[] = {'a', 259};
    assert_int_equal(tokenizer_decode(t, reserved, 2, out, sizeof out, &e), -1);
    assert_non_null(strstr(e.msg, "259"));
    assert_non_null(strstr(e.msg, "position 1"));
    assert_non_null(strstr(e.msg, "reserved"));
    const int32_t last_reserved[] = {263};
    assert_int_equal(tokenizer_decode(t, last_reserved, 1, out, sizeof out, &e), -1);
    assert_non_null(strstr(e.msg, "reserved"));
    /* with the smallest vocabulary, 259 is simply out of range */
    tokenizer *small = make(259);
    assert_int_equal(tokenizer_decode(small, reserved, 2, out, sizeof out, &e), -1);
    assert_non_null(strstr(e.msg, "259"));
    assert_non_null(strstr(e.msg, "outside"));
    tokenizer_free(small);
    tokenizer_free(t);
}

/* Model output may hold any id: the lossy decode names the ones without text instead of failing. */
static void test_decode_lossy(void **state) {
    (void)state;
    tokenizer *t = make(264);
    const int32_t ids[] = {'8', 259, '5', 257, 263, 264, -1};
    char out[128];
    mill_err e = {{0}};
    assert_int_equal(tokenizer_decode(t, ids, 7, out, sizeof out, &e), -1);
    assert_int_equal(tokenizer_decode_lossy(t, ids, 7, out, sizeof out, &e), 0);
    assert_string_equal(out, "8<|id:259|>5<|eos|><|id:263|><|id:264|><|id:-1|>");
    assert_int_equal(tokenizer_decode_lossy(t, ids, 7, out, 8, &e), -1); /* cap still counts */
    tokenizer_free(t);
}

static void test_cap_too_small(void **state) {
    (void)state;
    tokenizer *t = make(264);
    mill_err e = {{0}};
    int32_t ids[8];
    int n = -1;
    assert_int_equal(tokenizer_encode(t, "hello", 5, ids, 4, &n, &e), -1);
    assert_non_null(strstr(e.msg, "5"));
    assert_int_equal(n, 0);
    assert_int_equal(tokenizer_encode(t, "hello", 5, ids, 5, &n, &e), 0);
    assert_int_equal(n, 5);
    char out[16];
    assert_int_equal(tokenizer_decode(t, ids, 5, out, 5, &e), -1); /* no room for the NUL */
    assert_non_null(strstr(e.msg, "too small"));
    assert_int_equal(tokenizer_decode(t, ids, 5, out, 6, &e), 0);
    assert_string_equal(out, "hello");
    const int32_t eos[] = {257};
    assert_int_equal(tokenizer_decode(t, eos, 1, out, 7, &e), -1); /* "<|eos|>" is 7 bytes + NUL */
    assert_int_equal(tokenizer_decode(t, eos, 1, out, 8, &e), 0);
    assert_string_equal(out, "<|eos|>");
    assert_int_equal(tokenizer_decode(t, eos, 1, out, 0, &e), -1);
    tokenizer_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_specials),
        cmocka_unit_test(test_vocab_too_small),
        cmocka_unit_test(test_all_bytes_round_trip),
        cmocka_unit_test(test_utf8_round_trip),
        cmocka_unit_test(test_specials_decode_by_name),
        cmocka_unit_test(test_decode_bad_ids),
        cmocka_unit_test(test_decode_lossy),
        cmocka_unit_test(test_cap_too_small),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
