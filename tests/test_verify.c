/* tests/test_verify.c — the math answer verifier: a table of {response, label, expected
 * reward} cases through verify_math_reward (every normalisation, numeric equalities,
 * negative cases), the extractor and normaliser on their own (results, return codes,
 * small buffers), and random and huge inputs that must not crash or take long. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "algos/verify.h"
#include "common/rng.h"

typedef struct {
    const char *response, *label;
    int expected; /* reward 1 or 0 */
} vcase;

static const vcase cases[] = {
    /* plain boxed answers */
    {"The answer is \\boxed{34}.", "34", 1},
    {"So we get $\\boxed{34}$", "34", 1},
    {"\\boxed{35}", "34", 0},
    {"\\boxed{-7}", "-7", 1},
    {"\\boxed{-7}", "7", 0},
    {"\\boxed{0}", "0", 1},
    {"\\boxed{-0}", "0", 1},
    {"\\boxed{007}", "7", 1},
    {"\\fbox{12}", "12", 1},
    {"thus \\boxed 5 is it", "5", 1},
    {"thus $\\boxed 5$", "5", 1},
    {"\\boxed {9}", "9", 1},
    /* the last box counts */
    {"first \\boxed{3}, then corrected: \\boxed{4}", "4", 1},
    {"first \\boxed{3}, then corrected: \\boxed{4}", "3", 0},
    {"\\boxed{4} but wait \\fbox{5}", "5", 1},
    {"\\boxed{2} and finally \\boxed{2}", "2", 1},
    /* nested braces */
    {"\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1},
    {"\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}2", 1},
    {"\\boxed{\\{1,2\\}}", "\\{1,2\\}", 1},
    {"\\boxed{{{5}}}", "5", 1},
    /* no answer, empty answer, broken braces */
    {"I think it is 34.", "34", 0},
    {"", "34", 0},
    {"\\boxed{}", "34", 0},
    {"\\boxed{ }", "34", 0},
    {"\\boxed{34", "34", 0},
    {"\\boxed{3} then \\boxed{34", "34", 0},
    {"\\boxed{3} then \\boxed{34", "3", 0},
    {"\\boxed}34{", "34", 0},
    {"\\boxed", "34", 0},
    {"\\boxedx{34}", "34", 0},
    {"\\boxed{34}}}}", "34", 1},
    {"\\boxed{34}", "", 0},
    {"}}}{{{", "34", 0},
    /* "Answer:" lines */
    {"Work...\nAnswer: 34", "34", 1},
    {"Work...\nanswer: 34\n", "34", 1},
    {"Work...\nANSWER:   $\\frac{3}{4}$  \nThanks", "\\frac{3}{4}", 1},
    {"Answer: 1\nmore work\nAnswer: 2", "2", 1},
    {"Answer: 1\nmore work\nAnswer: 2", "1", 0},
    {"**Answer:** 42", "42", 1},
    {"  Answer: 8", "8", 1},
    {"The Answer: 8", "8", 0},
    {"Answer:", "8", 0},
    {"Answer: 7\n\\boxed{8}", "8", 1},
    {"Answer: 7\n\\boxed{8}", "7", 0},
    /* whitespace and $ */
    {"\\boxed{ 3 4 }", "34", 1},
    {"\\boxed{$34$}", "34", 1},
    {"\\boxed{(1, 2)}", "(1,2)", 1},
    {"\\boxed{\\pi r^2}", "\\pi  r^2", 1},
    {"\\boxed{\\pi r}", "\\pir", 0},
    /* \left \right \displaystyle and spacing commands */
    {"\\boxed{\\left( 1,2 \\right)}", "(1,2)", 1},
    {"\\boxed{\\left[0,1\\right)}", "[0,1)", 1},
    {"\\boxed{\\left.\\frac{1}{2}\\right.}", "\\frac{1}{2}", 1},
    {"\\boxed{\\displaystyle\\frac{1}{2}}", "0.5", 1},
    {"\\boxed{3\\!\\cdot\\! 4}", "3\\cdot4", 1},
    {"\\boxed{a\\;b}", "ab", 1},
    {"\\boxed{x\\ y}", "xy", 1},
    {"\\boxed{1\\quad 2}", "12", 1},
    {"\\boxed{x \\rightarrow y}", "x\\rightarrow y", 1},
    /* \text and friends */
    {"\\boxed{\\text{Monday}}", "Monday", 1},
    {"\\boxed{\\textbf{7}}", "7", 1},
    {"\\boxed{\\mathrm{B}}", "B", 1},
    {"\\boxed{\\mbox{yes}}", "yes", 1},
    {"\\boxed{\\text{(C)}}", "(C)", 1},
    {"\\boxed{\\textbf{\\text{9}}}", "9", 1},
    {"\\boxed{5\\text{ cm}}", "5", 1},
    {"\\boxed{5 \\text{cm}^2}", "5", 1},
    {"\\boxed{12\\mbox{ dollars}}", "12", 1},
    {"\\boxed{90\\text{ degrees}}", "90", 1},
    {"\\boxed{8\\text{ square units}}", "8", 1},
    {"\\boxed{3\\mathrm{m}}", "3", 1},
    {"\\boxed{3\\text{ apples}}", "3", 0},
    /* bare units after a number */
    {"\\boxed{5 cm}", "5", 1},
    {"\\boxed{12 dollars}", "12", 1},
    {"\\boxed{30 square feet}", "30", 1},
    {"\\boxed{5 inches.}", "5", 1},
    {"Answer: 45 degrees", "45", 1},
    {"\\boxed{5cm}", "5", 0},
    /* degrees, percent, money */
    {"\\boxed{45^\\circ}", "45", 1},
    {"\\boxed{45^{\\circ}}", "45", 1},
    {"\\boxed{45\xc2\xb0}", "45", 1},
    {"\\boxed{50\\%}", "50", 1},
    {"\\boxed{50\\%}", "0.5", 0},
    {"\\boxed{\\$5.00}", "5", 1},
    {"\\boxed{\\$ 1,250}", "1250", 1},
    /* trailing dot, leading +, variable prefixes */
    {"\\boxed{5.}", "5", 1},
    {"Answer: 12.", "12", 1},
    {"\\boxed{+3}", "3", 1},
    {"\\boxed{x=5}", "5", 1},
    {"\\boxed{y = -2}", "-2", 1},
    {"\\boxed{x = \\frac{1}{2}}", "0.5", 1},
    {"\\boxed{x=5}", "x=5", 1},
    {"\\boxed{x=1,y=2}", "1,y=2", 0},
    {"\\boxed{xy=5}", "5", 0},
    /* thousands separators */
    {"\\boxed{1,000}", "1000", 1},
    {"\\boxed{1{,}000}", "1000", 1},
    {"\\boxed{1\\,000}", "1000", 1},
    {"\\boxed{1,000,000}", "1000000", 1},
    {"\\boxed{-12,345.50}", "-12345.5", 1},
    {"\\boxed{1,2}", "12", 0},
    {"\\boxed{1,0000}", "10000", 0},
    /* a list is never one number: a blank after the comma keeps the parts apart */
    {"\\boxed{32, 349}", "32349", 0},
    {"\\boxed{1, 000}", "1000", 0},
    {"\\boxed{(3, 2)}", "(3,2)", 1},
    {"\\boxed{3, 5}", "3, 5", 1},
    /* decimals */
    {"\\boxed{2.50}", "2.5", 1},
    {"\\boxed{3.0}", "3", 1},
    {"\\boxed{3.000}", "3", 1},
    {"\\boxed{.5}", "0.5", 1},
    {"\\boxed{-.25}", "-\\frac{1}{4}", 1},
    {"\\boxed{0.1}", "0.10", 1},
    {"\\boxed{0.333}", "\\frac{1}{3}", 0},
    {"\\boxed{2.5}", "2.05", 0},
    {"\\boxed{1.2.3}", "1.2.3", 1},
    /* fractions: 0.5 = \frac{1}{2} = 1/2 = \dfrac{1}{2} */
    {"\\boxed{0.5}", "\\frac{1}{2}", 1},
    {"\\boxed{\\frac{1}{2}}", "0.5", 1},
    {"\\boxed{1/2}", "\\frac{1}{2}", 1},
    {"\\boxed{\\dfrac{1}{2}}", "1/2", 1},
    {"\\boxed{\\tfrac{1}{2}}", "0.5", 1},
    {"\\boxed{\\frac12}", "\\frac{1}{2}", 1},
    {"\\boxed{\\dfrac12}", "0.5", 1},
    {"\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1},
    {"\\boxed{\\frac{6}{3}}", "2", 1},
    {"\\boxed{\\frac{3}{4}}", "\\frac{4}{3}", 0},
    {"\\boxed{\\frac{1.5}{3}}", "0.5", 1},
    {"\\boxed{3/4}", "0.75", 1},
    {"\\boxed{\\frac{1}{0}}", "1", 0},
    {"\\boxed{\\frac{1}{0}}", "\\frac10", 1},
    /* negative numbers: -\frac{1}{2} = \frac{-1}{2} = -0.5 */
    {"\\boxed{-\\frac{1}{2}}", "-0.5", 1},
    {"\\boxed{\\frac{-1}{2}}", "-\\frac{1}{2}", 1},
    {"\\boxed{\\frac{1}{-2}}", "-0.5", 1},
    {"\\boxed{-\\frac{-1}{2}}", "0.5", 1},
    {"\\boxed{-1/2}", "\\frac{-1}{2}", 1},
    {"\\boxed{-0.5}", "0.5", 0},
    {"\\boxed{--5}", "5", 0},
    /* string equality of normal forms */
    {"\\boxed{\\sqrt{2}}", "\\sqrt2", 1},
    {"\\boxed{\\sqrt2}", "\\sqrt{3}", 0},
    {"\\boxed{2\\sqrt{2}}", "2\\sqrt 2", 1},
    {"\\boxed{\\sqrt[3]{2}}", "\\sqrt[3]2", 1},
    {"\\boxed{\\pi}", "\\pi", 1},
    {"\\boxed{\\frac{\\pi}{2}}", "\\frac\\pi2", 1},
    {"\\boxed{\\frac{\\pi}{2}}", "\\frac{\\pi}{3}", 0},
    {"\\boxed{\\binom{5}{2}}", "\\binom52", 1},
    {"\\boxed{x^2+1}", "x^2 + 1", 1},
    {"\\boxed{x^2+1}", "x^2 - 1", 0},
    {"\\boxed{\\infty}", "\\infty", 1},
    {"\\boxed{(-\\infty, 3]}", "(-\\infty,3]", 1},
    /* labels in boxes, and huge numbers (text comparison) */
    {"\\boxed{34}", "\\boxed{34}", 1},
    {"\\boxed{\\frac{1}{2}}", "$\\boxed{0.5}$", 1},
    {"\\boxed{123456789012345678901234567890}", "123456789012345678901234567890", 1},
    {"\\boxed{123456789012345678901234567890}", "123456789012345678901234567891", 0},
    {"\\boxed{99999999999999999999.50}", "99999999999999999999.5", 1},
    {"\\boxed{9223372036854775807}", "9223372036854775807", 1},
    {"\\boxed{\\frac{999999999999999999}{999999999999999998}}", "\\frac{999999999999999999}{999999999999999998}", 1},
    {"\\boxed{\\frac{999999999999999999}{3}}", "333333333333333333", 1},
};

static void test_table(void **state) {
    (void)state;
    size_t n = sizeof cases / sizeof cases[0], failed = 0;
    assert_true(n >= 120);
    for (size_t i = 0; i < n; i++) {
        float r = verify_math_reward(cases[i].response, cases[i].label);
        if (r != (float)cases[i].expected) {
            char a[512], b[512], x[512];
            verify_normalize(cases[i].label, b, sizeof b);
            if (verify_extract(cases[i].response, x, sizeof x) == 1)
                verify_normalize(x, a, sizeof a);
            else
                snprintf(a, sizeof a, "(no answer)");
            print_error("case %zu: response \"%s\" label \"%s\": reward %g, expected %d (normal forms \"%s\" / \"%s\")\n", i,
                        cases[i].response, cases[i].label, (double)r, cases[i].expected, a, b);
            failed++;
        }
    }
    print_message("%zu table cases, %zu failed\n", n, failed);
    assert_int_equal(failed, 0);
}

static void test_extract(void **state) {
    (void)state;
    char out[64];
    assert_int_equal(verify_extract("a \\boxed{\\frac{1}{2}} b", out, sizeof out), 1);
    assert_string_equal(out, "\\frac{1}{2}");
    assert_int_equal(verify_extract("\\boxed{1} \\fbox{2} \\boxed{ 3 }", out, sizeof out), 1);
    assert_string_equal(out, " 3 ");
    assert_int_equal(verify_extract("\\boxed 17, done", out, sizeof out), 1);
    assert_string_equal(out, "17,");
    assert_int_equal(verify_extract("\\boxed{}", out, sizeof out), 1);
    assert_string_equal(out, "");
    assert_int_equal(verify_extract("x\nAnswer:  -4 \r\ny", out, sizeof out), 1);
    assert_string_equal(out, "-4");
    strcpy(out, "junk");
    assert_int_equal(verify_extract("nothing here", out, sizeof out), 0);
    assert_string_equal(out, "");
    strcpy(out, "junk");
    assert_int_equal(verify_extract("\\boxed{12", out, sizeof out), 0);
    assert_string_equal(out, "");
    assert_int_equal(verify_extract(NULL, out, sizeof out), 0);
    /* cap: "12345" needs 6 bytes */
    assert_int_equal(verify_extract("\\boxed{12345}", out, 6), 1);
    assert_string_equal(out, "12345");
    strcpy(out, "junk");
    assert_int_equal(verify_extract("\\boxed{12345}", out, 5), -1);
    assert_string_equal(out, "");
    assert_int_equal(verify_extract("\\boxed{1}", out, 0), -1);
    assert_int_equal(verify_extract("\\boxed{1}", NULL, 8), -1);
}

static void test_normalize(void **state) {
    (void)state;
    static const char *const pairs[][2] = {
        {"\\frac12", "\\frac{1}{2}"},   {"\\dfrac{1}{2}", "\\frac{1}{2}"}, {"\\tfrac34", "\\frac{3}{4}"},
        {"1,000", "1000"},              {"1{,}000", "1000"},               {"1\\,000", "1000"},
        {"2.50", "2.5"},                {"3.0", "3"},                      {".5", "0.5"},
        {"+5", "5"},                    {"x = 5", "5"},                    {"5.", "5"},
        {"5 \\text{ cm}", "5"},         {"\\text{Monday}", "Monday"},      {"45^\\circ", "45"},
        {"50\\%", "50"},                {"$\\$5$", "5"},                   {"\\left( 1, 2 \\right)", "(1,2)"},
        {"\\sqrt2", "\\sqrt{2}"},       {"\\frac{\\sqrt3}2", "\\frac{\\sqrt{3}}{2}"},
        {"-3/4", "-\\frac{3}{4}"},      {"\\frac{-1}{2}", "-\\frac{1}{2}"}, {"\\pi r", "\\pi r"},
        {"\\displaystyle x", "x"},      {"\\leftarrow", "\\leftarrow"},    {"", ""},
    };
    char out[128];
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        assert_int_equal(verify_normalize(pairs[i][0], out, sizeof out), 0);
        if (strcmp(out, pairs[i][1]) != 0) print_error("normalize \"%s\" -> \"%s\", want \"%s\"\n", pairs[i][0], out, pairs[i][1]);
        assert_string_equal(out, pairs[i][1]);
    }
    /* cap: "\frac{1}{2}" is 11 chars and needs 12 bytes */
    assert_int_equal(verify_normalize("\\frac12", out, 12), 0);
    strcpy(out, "junk");
    assert_int_equal(verify_normalize("\\frac12", out, 11), -1);
    assert_string_equal(out, "");
    assert_int_equal(verify_normalize("1", NULL, 4), -1);
    assert_int_equal(verify_normalize(NULL, out, sizeof out), 0);
    assert_string_equal(out, "");
}

static void test_equal(void **state) {
    (void)state;
    const char *halves[] = {"0.5", "\\frac{1}{2}", "1/2", "\\dfrac{1}{2}", "\\frac12", "0.50", "\\frac{2}{4}", "$\\tfrac{1}{2}$"};
    size_t n = sizeof halves / sizeof halves[0];
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++) assert_int_equal(verify_equal(halves[i], halves[j]), 1);
    const char *neg[] = {"-\\frac{1}{2}", "\\frac{-1}{2}", "-0.5", "-1/2", "\\frac{1}{-2}"};
    for (size_t i = 0; i < 5; i++)
        for (size_t j = 0; j < 5; j++) assert_int_equal(verify_equal(neg[i], neg[j]), 1);
    for (size_t i = 0; i < 5; i++) assert_int_equal(verify_equal(neg[i], halves[0]), 0);
    assert_int_equal(verify_equal("", ""), 0);
    assert_int_equal(verify_equal("\\text{cm}", "\\text{m}"), 0); /* both drop to nothing */
    assert_int_equal(verify_equal(NULL, "1"), 0);
    assert_int_equal(verify_equal("1", NULL), 0);
}

/* Random bytes (and random LaTeX-ish tokens) through the reward: no crash, and a result
 * that is 0 or 1. */
static void test_fuzz(void **state) {
    (void)state;
    static const char *const toks[] = {"\\boxed{", "\\fbox", "{", "}", "\\frac", "\\text{", "\\left", "\\",
                                       "$",       "1",      ",", ".", "-",     "/",       " ",      "Answer:",
                                       "\n",      "^\\circ", "cm", "\\sqrt", "x=",     "{,}",    "\\,",    "%"};
    rng r;
    rng_seed(&r, 7);
    char buf[300], lab[64];
    int ones = 0;
    for (int it = 0; it < 20000; it++) {
        size_t len = (size_t)rng_below(&r, sizeof buf - 40), k = 0;
        if (it % 2) {
            while (k < len) buf[k++] = (char)(1 + rng_below(&r, 255));
        } else {
            while (k < len) {
                const char *t = toks[rng_below(&r, sizeof toks / sizeof toks[0])];
                size_t tl = strlen(t);
                if (k + tl >= sizeof buf) break;
                memcpy(buf + k, t, tl);
                k += tl;
            }
        }
        buf[k] = 0;
        size_t ll = (size_t)rng_below(&r, 12);
        for (size_t j = 0; j < ll; j++) lab[j] = (char)(1 + rng_below(&r, 255));
        lab[ll] = 0;
        float a = verify_math_reward(buf, lab), b = verify_math_reward(buf, "1");
        assert_true(a == 0.0f || a == 1.0f);
        assert_true(b == 0.0f || b == 1.0f);
        ones += b == 1.0f;
        char small[8];
        int rc = verify_normalize(buf, small, sizeof small);
        assert_true(rc == 0 || rc == -1);
        rc = verify_extract(buf, small, sizeof small);
        assert_true(rc >= -1 && rc <= 1);
    }
    print_message("fuzz: 20000 inputs, %d scored 1 against \"1\"\n", ones);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* 100 KB responses, some of them adversarial for brace matching and nesting. */
static void test_huge(void **state) {
    (void)state;
    enum { N = 100 * 1024 };
    char *s = malloc(N + 64);
    assert_non_null(s);
    double t0 = now_s();
    /* long reasoning, answer at the end */
    for (size_t i = 0; i < N; i++) s[i] = "think about it. "[i % 16];
    strcpy(s + N, "\\boxed{\\frac{1}{2}}");
    assert_true(verify_math_reward(s, "0.5") == 1.0f);
    /* many opened, never closed groups */
    for (size_t i = 0; i + 6 <= N; i += 6) memcpy(s + i, "\\text{", 6);
    s[N - N % 6] = 0;
    assert_true(verify_math_reward(s, "1") == 0.0f);
    assert_int_equal(verify_equal(s, s), 1);
    /* very deep nesting inside a box */
    size_t k = 0;
    memcpy(s, "\\boxed{", 7);
    k = 7;
    while (k < N / 2) s[k++] = '{';
    s[k++] = '7';
    while (k < N - 1 && k < 2 * (N / 2) - 6) s[k++] = '}';
    s[k++] = '}';
    s[k] = 0;
    assert_true(verify_math_reward(s, "7") == 1.0f);
    /* nested \frac and \text, deeper than the recursion limit */
    k = 0;
    s[0] = 0;
    while (k + 20 < N) {
        memcpy(s + k, "\\frac{\\text{", 12);
        k += 12;
    }
    s[k] = 0;
    assert_true(verify_math_reward(s, "1") == 0.0f);
    assert_int_equal(verify_equal(s, "1"), 0);
    /* a huge number on both sides */
    for (size_t i = 0; i < N; i++) s[i] = (char)('1' + i % 9);
    s[N] = 0;
    assert_int_equal(verify_equal(s, s), 1);
    /* Answer: lines, many */
    for (size_t i = 0; i + 10 <= N; i += 10) memcpy(s + i, "Answer: 3\n", 10);
    s[N - N % 10] = 0;
    assert_true(verify_math_reward(s, "3") == 1.0f);
    double dt = now_s() - t0;
    print_message("huge inputs: %.3f s\n", dt);
    assert_true(dt < 5.0); /* linear passes: milliseconds in practice */
    free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),   cmocka_unit_test(test_extract), cmocka_unit_test(test_normalize),
        cmocka_unit_test(test_equal),   cmocka_unit_test(test_fuzz),    cmocka_unit_test(test_huge),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
