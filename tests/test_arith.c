/* tests/test_arith.c — the arithmetic dataset (determinism, operand ranges, values
 * checked by an independent parser of the prompt, the checker, the held-out split,
 * the JSONL export) and SFT batches (exact ids/targets, padding, T_max). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "test_util.h"
#include "algos/arith.h"
#include "algos/sft_data.h"
#include "common/tokenizer.h"

/* ---- an independent reader of the prompt's expression ---- */

typedef struct {
    long long num[4];
    char op[3];
    int n;           /* operands */
    size_t end;      /* index just past the expression */
} expr;

/* Reads "N op N [op N]" starting at the first digit; ops are ' + ', ' - ', ' * '. */
static int expr_parse(const char *s, expr *x) {
    memset(x, 0, sizeof *x);
    const char *p = s;
    while (*p && (*p < '0' || *p > '9')) p++;
    if (!*p) return -1;
    for (;;) {
        if (x->n == 4 || *p < '0' || *p > '9') return -1;
        long long v = 0;
        while (*p >= '0' && *p <= '9') v = v * 10 + (*p++ - '0');
        x->num[x->n++] = v;
        if (p[0] == ' ' && (p[1] == '+' || p[1] == '-' || p[1] == '*') && p[2] == ' ' && p[3] >= '0' && p[3] <= '9') {
            if (x->n > 3) return -1;
            x->op[x->n - 1] = p[1];
            p += 3;
        } else {
            break;
        }
    }
    x->end = (size_t)(p - s);
    return 0;
}

/* Precedence-correct evaluation: products first, then sums left to right. */
static long long expr_eval(const expr *x) {
    long long terms[4];
    char signs[4];
    int nt = 0;
    terms[0] = x->num[0];
    signs[0] = '+';
    nt = 1;
    for (int i = 1; i < x->n; i++) {
        char o = x->op[i - 1];
        if (o == '*') {
            terms[nt - 1] *= x->num[i];
        } else {
            signs[nt] = o;
            terms[nt++] = x->num[i];
        }
    }
    long long v = 0;
    for (int i = 0; i < nt; i++) v += signs[i] == '-' ? -terms[i] : terms[i];
    return v;
}

static void test_expr_parser_itself(void **state) {
    (void)state;
    expr x;
    assert_int_equal(expr_parse("What is 2 + 3 * 4?", &x), 0);
    assert_int_equal(expr_eval(&x), 14);
    assert_int_equal(expr_parse("10 - 20 - 5", &x), 0);
    assert_int_equal(expr_eval(&x), -15);
    assert_int_equal(expr_parse("no digits", &x), -1);
}

static int same_problem(const arith_problem *a, const arith_problem *b) {
    return strcmp(a->prompt, b->prompt) == 0 && strcmp(a->answer, b->answer) == 0 && a->value == b->value &&
           a->level == b->level;
}

static void test_determinism(void **state) {
    (void)state;
    for (int level = 1; level <= 4; level++) {
        rng r1, r2, r3;
        rng_seed(&r1, 42);
        rng_seed(&r2, 42);
        rng_seed(&r3, 43);
        int differ = 0;
        for (int i = 0; i < 200; i++) {
            arith_problem a, b, c;
            arith_make(&a, level, &r1);
            arith_make(&b, level, &r2);
            arith_make(&c, level, &r3);
            assert_true(same_problem(&a, &b));
            differ += !same_problem(&a, &c);
        }
        assert_true(differ > 100); /* level 1 has 500 prompts, so a few repeats are fine */
    }
    /* draws too */
    rng r1, r2;
    rng_seed(&r1, 9);
    rng_seed(&r2, 9);
    for (int i = 0; i < 100; i++) {
        arith_problem a, b;
        arith_draw(&a, 1 + i % 4, i % 3 == 0, &r1);
        arith_draw(&b, 1 + i % 4, i % 3 == 0, &r2);
        assert_true(same_problem(&a, &b));
    }
}

static int in(long long v, long long lo, long long hi) { return v >= lo && v <= hi; }

static void test_levels(void **state) {
    (void)state;
    rng r;
    rng_seed(&r, 1234);
    for (int level = 1; level <= 4; level++) {
        int seen_sub = 0, seen_add = 0, seen_mul = 0, seen_three = 0, seen_neg = 0;
        for (int i = 0; i < 3000; i++) {
            arith_problem p;
            arith_make(&p, level, &r);
            assert_int_equal(p.level, level);
            assert_true(strlen(p.prompt) < 60);
            expr x;
            assert_int_equal(expr_parse(p.prompt, &x), 0);
            for (const char *q = p.prompt + x.end; *q; q++) assert_false(*q >= '0' && *q <= '9');
            long long v = expr_eval(&x);
            assert_int_equal(p.value, v);
            char want[32];
            snprintf(want, sizeof want, "%lld", v);
            assert_string_equal(p.answer, want);
            seen_neg += v < 0;
            int mul = x.n == 2 && x.op[0] == '*';
            seen_mul += mul;
            seen_three += x.n == 3;
            for (int k = 0; k + 1 < x.n; k++) {
                seen_add += x.op[k] == '+';
                seen_sub += x.op[k] == '-';
            }
            switch (level) {
            case 1:
                assert_int_equal(x.n, 2);
                assert_int_equal(x.op[0], '+');
                assert_true(in(x.num[0], 0, 9) && in(x.num[1], 0, 9));
                break;
            case 2:
                assert_int_equal(x.n, 2);
                assert_true(x.op[0] == '+' || x.op[0] == '-');
                assert_true(in(x.num[0], 10, 99) && in(x.num[1], 10, 99));
                break;
            case 3:
                assert_int_equal(x.n, 2);
                if (mul)
                    assert_true(in(x.num[0], 10, 99) && in(x.num[1], 2, 9));
                else
                    assert_true(in(x.num[0], 100, 999) && in(x.num[1], 100, 999));
                break;
            case 4:
                if (mul) {
                    assert_true(in(x.num[0], 10, 99) && in(x.num[1], 10, 99));
                } else {
                    assert_int_equal(x.n, 3);
                    assert_true(x.op[0] != '*' && x.op[1] != '*');
                    for (int k = 0; k < 3; k++) assert_true(in(x.num[k], 10, 99));
                }
                break;
            }
        }
        assert_true(seen_add > 0);
        if (level == 1) {
            assert_int_equal(seen_sub + seen_mul + seen_three + seen_neg, 0);
        } else {
            assert_true(seen_sub > 0 && seen_neg > 0);
        }
        if (level == 2) assert_int_equal(seen_mul + seen_three, 0);
        if (level == 3) assert_true(seen_mul > 0 && seen_three == 0);
        if (level == 4) assert_true(seen_mul > 0 && seen_three > 0);
    }
    /* out-of-range levels are clamped */
    arith_problem p;
    arith_make(&p, 0, &r);
    assert_int_equal(p.level, 1);
    arith_make(&p, 9, &r);
    assert_int_equal(p.level, 4);
}

static arith_problem problem(const char *prompt, long long value) {
    arith_problem p;
    memset(&p, 0, sizeof p);
    snprintf(p.prompt, sizeof p.prompt, "%s", prompt);
    snprintf(p.answer, sizeof p.answer, "%lld", value);
    p.value = value;
    p.level = 2;
    return p;
}

static void test_format_prompt(void **state) {
    (void)state;
    arith_problem p = problem("What is 37 + 48?", 85);
    char out[64];
    assert_int_equal(arith_format_prompt(&p, out, sizeof out), 0);
    assert_string_equal(out, "Q: What is 37 + 48?\nA: ");
    assert_int_equal(arith_format_prompt(&p, out, strlen("Q: What is 37 + 48?\nA: ") + 1), 0);
    assert_int_equal(arith_format_prompt(&p, out, strlen("Q: What is 37 + 48?\nA: ")), -1);
    assert_string_equal(out, "");
}

static void test_check(void **state) {
    (void)state;
    arith_problem p = problem("What is 37 + 48?", 85);
    assert_int_equal(arith_check("85", &p), 1);
    assert_int_equal(arith_check(" 85 apples", &p), 1);
    assert_int_equal(arith_check("\n\t85", &p), 1);
    assert_int_equal(arith_check("85.", &p), 1);
    assert_int_equal(arith_check("85<|eos|>", &p), 1);
    assert_int_equal(arith_check("84", &p), 0);
    assert_int_equal(arith_check("850", &p), 0);
    assert_int_equal(arith_check("-85", &p), 0);
    assert_int_equal(arith_check("", &p), 0);
    assert_int_equal(arith_check("   ", &p), 0);
    assert_int_equal(arith_check("abc", &p), 0);
    assert_int_equal(arith_check("abc 85", &p), 0); /* the first integer must lead */
    assert_int_equal(arith_check("+85", &p), 0);
    assert_int_equal(arith_check("- 85", &p), 0);
    assert_int_equal(arith_check(NULL, &p), 0);
    assert_int_equal(arith_check("99999999999999999999999999999", &p), 0); /* no overflow */
    assert_int_equal(arith_check("18446744073709551701", &p), 0);         /* 2^64 + 85 must not wrap to 85 */
    arith_problem q = problem("What is 20 - 32?", -12);
    assert_int_equal(arith_check("-12", &q), 1);
    assert_int_equal(arith_check(" -12\n", &q), 1);
    assert_int_equal(arith_check("12", &q), 0);
    assert_int_equal(arith_check("--12", &q), 0);
    assert_int_equal(arith_check("-", &q), 0);
    arith_problem z = problem("What is 5 - 5?", 0);
    assert_int_equal(arith_check("0", &z), 1);
    assert_int_equal(arith_check("-0", &z), 1);
    assert_int_equal(arith_check("", &z), 0);
}

static void test_heldout_fraction(void **state) {
    (void)state;
    rng r;
    rng_seed(&r, 77);
    for (int level = 1; level <= 4; level++) {
        int held = 0;
        for (int i = 0; i < 5000; i++) {
            arith_problem p;
            arith_make(&p, level, &r);
            held += arith_is_heldout(&p);
        }
        print_message("level %d: %d of 5000 held out\n", level, held);
        assert_true(held >= 250 && held <= 750);
    }
    /* the split depends on the expression, not the phrasing */
    arith_problem a = problem("What is 37 + 48?", 85), b = problem("Work out 37 + 48.", 85);
    assert_int_equal(arith_is_heldout(&a), arith_is_heldout(&b));
    int differ = 0;
    for (int x = 10; x < 60; x++) {
        char s1[64], s2[64];
        snprintf(s1, sizeof s1, "Compute %d + 17.", x);
        snprintf(s2, sizeof s2, "What does %d + 17 equal?", x);
        arith_problem c = problem(s1, x + 17), d = problem(s2, x + 17);
        assert_int_equal(arith_is_heldout(&c), arith_is_heldout(&d));
        differ += arith_is_heldout(&c);
    }
    assert_true(differ > 0 && differ < 50); /* it is not constant */
}

static void test_draw_respects_split(void **state) {
    (void)state;
    rng r;
    rng_seed(&r, 5);
    /* level 1 has 100 sums: the train and eval sets of sums must be disjoint */
    int train[10][10] = {{0}}, eval[10][10] = {{0}};
    for (int i = 0; i < 4000; i++) {
        arith_problem p;
        int h = i % 2;
        arith_draw(&p, 1, h, &r);
        assert_int_equal(arith_is_heldout(&p), h);
        expr x;
        assert_int_equal(expr_parse(p.prompt, &x), 0);
        (h ? eval : train)[x.num[0]][x.num[1]]++;
    }
    int n_train = 0, n_eval = 0;
    for (int a = 0; a < 10; a++)
        for (int b = 0; b < 10; b++) {
            assert_false(train[a][b] && eval[a][b]);
            n_train += train[a][b] > 0;
            n_eval += eval[a][b] > 0;
        }
    print_message("level 1: %d train sums, %d held-out sums\n", n_train, n_eval);
    assert_true(n_eval >= 3 && n_eval <= 25);
    assert_int_equal(n_train + n_eval, 100);
    for (int level = 2; level <= 4; level++)
        for (int i = 0; i < 500; i++) {
            arith_problem p;
            arith_draw(&p, level, 1, &r);
            assert_int_equal(arith_is_heldout(&p), 1);
            assert_int_equal(p.level, level);
            arith_draw(&p, level, 0, &r);
            assert_int_equal(arith_is_heldout(&p), 0);
        }
}

/* ---- export ---- */


static int setup(void **state) { return test_dir_setup(state, "test_arith", NULL); }

static int teardown(void **state) { return test_dir_teardown(state); }

static void test_export(void **state) {
    test_dir *f = *state;
    char path[128], tmp[140];
    snprintf(path, sizeof path, "%s/arith.jsonl", f->dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    mill_err e = {{0}};
    assert_int_equal(arith_export_jsonl(path, 50, 3, 7, &e), 0);
    assert_int_equal(access(tmp, F_OK), -1);
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    rng r;
    rng_seed(&r, 7);
    char line[512];
    int lines = 0;
    while (fgets(line, sizeof line, fp)) {
        size_t L = strlen(line);
        assert_true(L > 0 && line[L - 1] == '\n');
        assert_int_equal(strncmp(line, "{\"prompt\":\"", 11), 0); /* compact, prompt first */
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        assert_non_null(o);
        assert_true(json_is_object(o));
        assert_int_equal(json_object_size(o), 2);
        const char *prompt = json_string_value(json_object_get(o, "prompt"));
        const char *label = json_string_value(json_object_get(o, "label"));
        assert_non_null(prompt);
        assert_non_null(label);
        arith_problem want;
        arith_draw(&want, 3, 0, &r); /* the same training stream */
        assert_string_equal(prompt, want.prompt);
        assert_string_equal(label, want.answer);
        arith_problem back = problem(prompt, atoll(label));
        assert_int_equal(arith_is_heldout(&back), 0);
        expr x;
        assert_int_equal(expr_parse(prompt, &x), 0);
        assert_int_equal(expr_eval(&x), atoll(label));
        json_decref(o);
        lines++;
    }
    assert_int_equal(fclose(fp), 0);
    assert_int_equal(lines, 50);

    /* n = 0: an empty file */
    assert_int_equal(arith_export_jsonl(path, 0, 1, 7, &e), 0);
    fp = fopen(path, "r");
    assert_non_null(fp);
    assert_int_equal(fgetc(fp), EOF);
    fclose(fp);
}

static void test_export_errors(void **state) {
    test_dir *f = *state;
    char path[128];
    mill_err e = {{0}};
    snprintf(path, sizeof path, "%s/no/such/dir/a.jsonl", f->dir);
    assert_int_equal(arith_export_jsonl(path, 5, 1, 1, &e), -1);
    assert_non_null(strstr(e.msg, path));
    snprintf(path, sizeof path, "%s/b.jsonl", f->dir);
    assert_int_equal(arith_export_jsonl(path, 5, 5, 1, &e), -1);
    assert_non_null(strstr(e.msg, "level 5"));
    assert_int_equal(arith_export_jsonl(path, -1, 1, 1, &e), -1);
    assert_non_null(strstr(e.msg, path));
    assert_int_equal(access(path, F_OK), -1);
}

/* ---- SFT batches ---- */

static tokenizer *tok_new(void) {
    tokenizer *t = NULL;
    mill_err e = {{0}};
    assert_int_equal(tokenizer_bytes_new(&t, 264, &e), 0);
    return t;
}

static void test_sft_exact(void **state) {
    (void)state;
    tokenizer *tok = tok_new();
    arith_problem probs[2] = {problem("What is 1 + 2?", 3), problem("Compute 10 - 20.", -10)};
    sft_batch b;
    mill_err e = {{0}};
    assert_int_equal(sft_batch_make(&b, tok, probs, 2, 64, &e), 0);
    /* row 0: bos, "Q: What is 1 + 2?\nA: " (21 bytes), "3", eos = 24; row 1: bos + 23 + "-10" + eos = 28 */
    assert_int_equal(b.B, 2);
    assert_int_equal(b.T, 28);
    assert_int_equal(b.n_target, 2 + 4);
    const char *r0 = "Q: What is 1 + 2?\nA: 3", *r1 = "Q: Compute 10 - 20.\nA: -10";
    int32_t want_ids[2][28], want_tg[2][28];
    for (int t = 0; t < 28; t++) want_ids[0][t] = want_ids[1][t] = 258;
    want_ids[0][0] = want_ids[1][0] = 256;
    for (int t = 0; t < 22; t++) want_ids[0][1 + t] = (unsigned char)r0[t];
    want_ids[0][23] = 257;
    for (int t = 0; t < 26; t++) want_ids[1][1 + t] = (unsigned char)r1[t];
    want_ids[1][27] = 257;
    for (int t = 0; t < 28; t++) want_tg[0][t] = want_tg[1][t] = -1;
    want_tg[0][21] = '3'; /* position 21 (the space after "A:") predicts the answer */
    want_tg[0][22] = 257;
    want_tg[1][23] = '-';
    want_tg[1][24] = '1';
    want_tg[1][25] = '0';
    want_tg[1][26] = 257;
    for (int i = 0; i < 2; i++)
        for (int t = 0; t < 28; t++) {
            assert_int_equal(b.ids[i * 28 + t], want_ids[i][t]);
            assert_int_equal(b.targets[i * 28 + t], want_tg[i][t]);
        }
    sft_batch_free(&b);
    assert_null(b.ids);
    assert_null(b.targets);
    tokenizer_free(tok);
}

static void test_sft_random_rows(void **state) {
    (void)state;
    tokenizer *tok = tok_new();
    rng r;
    rng_seed(&r, 3);
    enum { N = 64 };
    arith_problem probs[N];
    int want_targets = 0, want_T = 0;
    for (int i = 0; i < N; i++) {
        arith_draw(&probs[i], 1 + i % 4, 0, &r);
        want_targets += (int)strlen(probs[i].answer) + 1;
        int L = 1 + (int)strlen("Q: \nA: ") + (int)strlen(probs[i].prompt) + (int)strlen(probs[i].answer) + 1;
        want_T = L > want_T ? L : want_T;
    }
    sft_batch b;
    mill_err e = {{0}};
    assert_int_equal(sft_batch_make(&b, tok, probs, N, 128, &e), 0);
    assert_int_equal(b.T, want_T);
    assert_int_equal(b.n_target, want_targets);
    int count = 0;
    for (int i = 0; i < N; i++) {
        const int32_t *ids = b.ids + (size_t)i * b.T, *tg = b.targets + (size_t)i * b.T;
        int32_t resp[40];
        int nr = 0;
        for (int t = 0; t < b.T; t++)
            if (tg[t] >= 0) {
                assert_true(t + 1 < b.T);
                assert_int_equal(tg[t], ids[t + 1]);
                resp[nr++] = tg[t];
                count++;
            }
        assert_int_equal(tg[b.T - 1], -1);
        char text[128], want[64];
        assert_int_equal(tokenizer_decode(tok, resp, nr, text, sizeof text, &e), 0);
        snprintf(want, sizeof want, "%.31s<|eos|>", probs[i].answer);
        assert_string_equal(text, want);
        /* the unpadded row decodes to bos + prompt + answer + eos, then only pad */
        int L = 0;
        while (L < b.T && ids[L] != 258) L++;
        for (int t = L; t < b.T; t++) assert_int_equal(ids[t], 258);
        char full[256], wantfull[256];
        assert_int_equal(tokenizer_decode(tok, ids, L, full, sizeof full, &e), 0);
        snprintf(wantfull, sizeof wantfull, "<|bos|>Q: %.159s\nA: %.31s<|eos|>", probs[i].prompt, probs[i].answer);
        assert_string_equal(full, wantfull);
    }
    assert_int_equal(count, b.n_target);
    sft_batch_free(&b);
    tokenizer_free(tok);
}

static void test_sft_errors(void **state) {
    (void)state;
    tokenizer *tok = tok_new();
    arith_problem probs[2] = {problem("What is 1 + 2?", 3), problem("Compute 10 - 20.", -10)};
    sft_batch b;
    mill_err e = {{0}};
    assert_int_equal(sft_batch_make(&b, tok, probs, 2, 27, &e), -1); /* row 1 needs 28 */
    assert_non_null(strstr(e.msg, "row 1"));
    assert_non_null(strstr(e.msg, "T_max"));
    assert_null(b.ids);
    assert_null(b.targets);
    sft_batch_free(&b); /* safe after an error */
    assert_int_equal(sft_batch_make(&b, tok, probs, 2, 28, &e), 0);
    assert_int_equal(b.T, 28);
    sft_batch_free(&b);
    assert_int_equal(sft_batch_make(&b, tok, probs, 1, 23, &e), -1); /* row 0 needs 24 */
    assert_non_null(strstr(e.msg, "row 0"));
    assert_int_equal(sft_batch_make(&b, tok, probs, 0, 64, &e), -1);
    assert_null(b.ids);
    tokenizer_free(tok);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_expr_parser_itself),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_levels),
        cmocka_unit_test(test_format_prompt),
        cmocka_unit_test(test_check),
        cmocka_unit_test(test_heldout_fraction),
        cmocka_unit_test(test_draw_respects_split),
        cmocka_unit_test_setup_teardown(test_export, setup, teardown),
        cmocka_unit_test_setup_teardown(test_export_errors, setup, teardown),
        cmocka_unit_test(test_sft_exact),
        cmocka_unit_test(test_sft_random_rows),
        cmocka_unit_test(test_sft_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
