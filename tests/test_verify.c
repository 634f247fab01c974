/* tests/test_verify.c — the math answer verifier: a table of {response, label, expected
 * reward} cases through verify_math_reward (every normalisation, equality by value, each
 * lenient rule with its near misses), the extractor and normaliser on their own (results,
 * return codes, small buffers, options), the agreement with public verifier test suites
 * (tests/data/verifier-suites.jsonl), and random and huge inputs that must not crash or take
 * long. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>
#include <jansson.h>

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
    {"\\boxed{ 3 4 }", "34", 0}, /* digits apart stay apart: two numbers, never 34 */
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
    {"\\boxed{1\\quad 2}", "12", 0},
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
    {"\\boxed{50\\%}", "0.5", 1}, /* 50% is 0.5 */
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
    {"\\boxed{x=1,y=2}", "1,y=2", 1}, /* labels off: 1, 2 both */
    {"\\boxed{x=1,y=2}", "2,y=2", 0},
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
    /* value equality: fractions, roots, powers, pi, e, logs */
    {"\\boxed{\\frac{2}{\\sqrt{2}}}", "\\sqrt{2}", 1},
    {"\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1},
    {"\\boxed{2\\sqrt{2}}", "2\\sqrt{3}", 0},
    {"\\boxed{\\sqrt{12}}", "2\\sqrt3", 1},
    {"\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}", 1},
    {"\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{2}}", 0},
    {"\\boxed{2^{10}}", "1024", 1},
    {"\\boxed{2^{10}}", "1023", 0},
    {"\\boxed{\\frac{9}{4}\\pi}", "\\frac{9\\pi}{4}", 1},
    {"\\boxed{\\frac{9}{4}\\pi}", "\\frac{9}{4}", 0},
    {"\\boxed{2\\pi}", "6.283185307", 1},
    {"\\boxed{2\\pi}", "6.28", 0},
    {"\\boxed{\\pi}", "3.14", 0},
    {"\\boxed{e^{2}}", "e^2", 1},
    {"\\boxed{e^{2}}", "2e", 0},
    {"\\boxed{\\sqrt[3]{27}}", "3", 1},
    {"\\boxed{\\log_2 8}", "3", 1},
    {"\\boxed{\\ln(e^3)}", "3", 1},
    {"\\boxed{\\sin\\frac{\\pi}{6}}", "\\frac{1}{2}", 1},
    {"\\boxed{0.3333333333}", "\\frac{1}{3}", 1},
    {"\\boxed{0.333333}", "\\frac{1}{3}", 0},
    {"\\boxed{1.4142135624}", "\\sqrt{2}", 1},
    {"\\boxed{1.414}", "\\sqrt{2}", 0},
    {"\\boxed{2.0000000001}", "2", 0},
    {"\\boxed{5!}", "120", 1},
    {"\\boxed{\\binom{6}{2}}", "15", 1},
    /* expressions in variables: equal at three random points */
    {"\\boxed{(x+1)^2}", "x^2+2x+1", 1},
    {"\\boxed{(x+1)^2}", "x^2+x+1", 0},
    {"\\boxed{\\frac{x+2}{7}}", "\\frac{x}{7}+\\frac{2}{7}", 1},
    {"\\boxed{2\\sin x\\cos x}", "\\sin 2x", 1},
    {"\\boxed{2\\sin x\\cos x}", "\\sin x", 0},
    {"\\boxed{f(y)}", "f(x)", 0},
    {"\\boxed{3+4i}", "4i+3", 1},
    /* scientific notation */
    {"\\boxed{1.2\\times10^{3}}", "1200", 1},
    {"\\boxed{1.2e3}", "1200", 1},
    {"\\boxed{1.2 \\cdot 10^3}", "1.2e3", 1},
    {"\\boxed{1e3}", "1e4", 0},
    {"\\boxed{3\\times10^{-2}}", "0.03", 1},
    {"\\boxed{3\\times10^{-2}}", "0.3", 0},
    /* percent: x% is x/100; a label's % may be dropped; a prediction's % matches the same number */
    {"\\boxed{10\\%}", "0.1", 1},
    {"\\boxed{0.1}", "10\\%", 1},
    {"\\boxed{10}", "10\\%", 1},
    {"\\boxed{10\\%}", "10", 1},
    {"\\boxed{10}", "100\\%", 0},
    {"\\boxed{100\\%}", "10", 0},
    {"\\boxed{10\\%}", "0.01", 0},
    {"\\boxed{0.1}", "10", 0},
    {"\\boxed{28 percent}", "28\\%", 1},
    {"\\boxed{28\\text{ percent}}", "0.28", 1},
    {"\\boxed{4 4/9\\%}", "\\frac{40}{9}", 0},
    /* labelled answers */
    {"\\boxed{k = 45}", "45", 1},
    {"\\boxed{45}", "k = 45", 1},
    {"\\boxed{k = 46}", "45", 0},
    {"\\boxed{(p,q)=(3,2)}", "(3,2)", 1},
    {"\\boxed{(3,2)}", "(p,q)=(3,2)", 1},
    {"\\boxed{(p,q)=(2,3)}", "(3,2)", 0},
    {"\\boxed{|AB| = 1}", "1", 1},
    {"\\boxed{|AB| = 2}", "1", 0},
    {"\\boxed{x = 3}", "3", 1},
    {"\\boxed{x = 3}", "y = 3", 0},
    {"\\boxed{x = 5 + 6 = 11}", "11", 1},
    {"\\boxed{x = 11 = 5 + 5}", "11", 0},
    {"\\boxed{2x+z=1}", "1", 0},
    {"\\boxed{11a+c}", "7 = 11a+c", 0},
    {"\\boxed{a_3 = 2, a_{37} = 19}", "a_{37} = 19, a_3 = 2", 1},
    {"\\boxed{a_3 = 19, a_{37} = 2}", "a_{37} = 19, a_3 = 2", 0},
    {"\\boxed{AB = 4, CD = 5}", "4, 5", 1},
    {"\\boxed{(5,2),(7,2)}", "p=5,q=2;p=7,q=2", 1},
    {"\\boxed{(2,5),(7,2)}", "p=5,q=2;p=7,q=2", 0},
    /* equations and inequalities */
    {"\\boxed{y = -\\frac{1}{2}x + \\frac{3}{4}}", "2x + 4y - 3 = 0", 1},
    {"\\boxed{y = -\\frac{1}{2}x + \\frac{3}{4}}", "2x + 4y + 3 = 0", 0},
    {"\\boxed{-x > -1}", "x < 1", 1},
    {"\\boxed{x > -1}", "x < 1", 0},
    {"\\boxed{5 \\geq x}", "x \\leq 5", 1},
    {"\\boxed{x \\le 5}", "x < 5", 0},
    {"\\boxed{x \\approx 11}", "11", 1},
    {"\\boxed{x = \\frac{1}{3} \\approx 0.33}", "\\frac{1}{3}", 1},
    /* tuples and points: ordered */
    {"\\boxed{(1,2)}", "(2,1)", 0},
    {"\\boxed{(1,4.5)}", "(1,\\frac{9}{2})", 1},
    {"\\boxed{(1,2,3)}", "(1,2)", 0},
    {"\\boxed{\\left\\langle 1, 2 \\right\\rangle}", "\\langle 1,2\\rangle", 1},
    {"\\boxed{\\left\\langle 1, 2 \\right\\rangle}", "(1,2)", 0},
    /* sets and lists: unordered */
    {"\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1},
    {"\\boxed{\\{1,2\\}}", "\\{1,3\\}", 0},
    {"\\boxed{\\{1,2,2\\}}", "\\{1,2\\}", 1},
    {"\\boxed{2, 1}", "1, 2", 1},
    {"\\boxed{1, 2}", "1, 2, 3", 0},
    {"\\boxed{1, 2}", "1, 1, 2", 0},
    {"\\boxed{1, 2, 2}", "1, 2", 0}, /* a list keeps multiplicity */
    {"\\boxed{-2, 1}", "\\{1, -2\\}", 1},
    {"\\boxed{1, 3}", "(3, 1)", 0},
    {"\\boxed{1, 3}", "(1, 3)", 1},
    {"\\boxed{x=1, y=2}", "(1,2)", 1},
    {"\\boxed{6 \\text{ and } 8}", "6, 8", 1},
    {"\\boxed{(1,2) or (2,1)}", "(2,1), (1,2)", 1},
    /* intervals and unions */
    {"\\boxed{[0,1)}", "[0,1)", 1},
    {"\\boxed{[0,1)}", "[0,1]", 0},
    {"\\boxed{(0,1]}", "(0,1)", 0},
    {"\\boxed{[0,\\frac{1}{2})}", "[0,0.5)", 1},
    {"\\boxed{(-\\infty,3]}", "(-\\infty, 3)", 0},
    {"\\boxed{(1,2)\\cup(3,4)}", "(3,4)\\cup(1,2)", 1},
    {"\\boxed{(1,2)\\cup(3,4)}", "(1,2)\\cup[3,4)", 0},
    {"\\boxed{x \\in [-2,7]}", "[-2,7]", 1},
    {"\\boxed{-2 \\le x \\le 7}", "[-2,7]", 1},
    {"\\boxed{-2 < x \\le 7}", "[-2,7]", 0},
    {"\\boxed{x > 3}", "(3,\\infty)", 1},
    {"\\boxed{x \\ge 3}", "(3,\\infty)", 0},
    /* matrices */
    {"\\boxed{\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}}", "\\begin{bmatrix}1 & 2\\\\ 3 & 4\\end{bmatrix}", 1},
    {"\\boxed{\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}}", "\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", 0},
    {"\\boxed{\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}}", "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}", 0},
    {"\\boxed{\\begin{pmatrix}\\frac12\\\\\\sqrt4\\end{pmatrix}}", "\\begin{pmatrix}0.5\\\\2\\end{pmatrix}", 1},
    /* \pm: two answers */
    {"\\boxed{1 \\pm \\sqrt{2}}", "1+\\sqrt2, 1-\\sqrt2", 1},
    {"\\boxed{1 + \\sqrt{2}}", "1 \\pm \\sqrt{2}", 0},
    {"\\boxed{\\pm 3}", "3, -3", 1},
    {"\\boxed{x = \\frac{-1 \\pm \\sqrt{5}}{2}}", "\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}", 1},
    /* several boxes: one answer when only spacing or a list stands between them */
    {"\\boxed{2}, \\boxed{3}", "2, 3", 1},
    {"\\boxed{1} and \\boxed{2}", "\\{1,2\\}", 1},
    {"\\boxed{3} or \\boxed{4}", "4", 0},
    {"\\boxed{3}. But wait, that is wrong: \\boxed{4}", "4", 1},
    {"\\boxed{(2,2)} \\quad \\text{and} \\quad \\boxed{(6,2)}", "(2,2), (6,2)", 1},
    {"\\boxed{5} ... \\boxed{5}", "5", 1},
    {"\\boxed{1} 2 \\boxed{3}", "3", 1},
    {"\\boxed{1}\\boxed{2}", "1, 2", 1},
    /* units and \text */
    {"\\boxed{12 \\text{ cm}^2}", "12", 1},
    {"\\boxed{\\text{Even}}", "even", 1},
    {"\\boxed{\\text{(C)}}", "C", 1},
    {"\\boxed{\\text{(C)}}", "D", 0},
    {"\\boxed{35 cm, 4}", "35, 4", 1},
    {"\\boxed{\\$ 5.50}", "5.5", 1},
    /* mixed numbers */
    {"\\boxed{2\\frac{1}{2}}", "\\frac{5}{2}", 1},
    {"\\boxed{2\\frac{1}{2}}", "1", 0},
    {"\\boxed{4 4/9}", "\\frac{40}{9}", 1},
    {"\\boxed{11 7/6}", "\\frac{73}{6}", 0},
    /* digit groups join only through LaTeX thousands separators */
    {"\\boxed{32,\\! 349}", "32349", 1},
    {"\\boxed{32{,}349}", "32349", 1},
    {"\\boxed{3 4}", "34", 0},
    {"\\boxed{1 000}", "1000", 0},
    {"\\boxed{0,111}", "111", 0},
    /* the answer follows </think> */
    {"\\boxed{1}</think>The answer is \\boxed{2}", "2", 1},
    {"\\boxed{2}</think>no box here", "2", 0},
    /* Answer: after a sentence's end; doubled backslashes */
    {"All done. Answer: 42", "42", 1},
    {"\\boxed{\\\\frac{1}{2}}", "0.5", 1},
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
    assert_string_equal(out, "{1}, {2}, { 3 }"); /* boxes side by side are one answer */
    assert_int_equal(verify_extract("\\boxed{1}, wait, \\boxed{2}", out, sizeof out), 1);
    assert_string_equal(out, "2");
    assert_int_equal(verify_extract("\\boxed{7} and \\boxed{7}", out, sizeof out), 1);
    assert_string_equal(out, "7");
    assert_int_equal(verify_extract("\\boxed{1} then \\boxed{2} and \\boxed{3}", out, sizeof out), 1);
    assert_string_equal(out, "{2}, {3}");
    assert_int_equal(verify_extract("\\boxed{1}</think>Final: \\boxed{2}", out, sizeof out), 1);
    assert_string_equal(out, "2");
    assert_int_equal(verify_extract("\\boxed{1}</think>none", out, sizeof out), 0);
    assert_int_equal(verify_extract("Long work. Answer: 42", out, sizeof out), 1);
    assert_string_equal(out, "42");
    assert_int_equal(verify_extract("The Answer: 8", out, sizeof out), 0);
    /* cap: "{1}, {2}" needs 9 bytes */
    assert_int_equal(verify_extract("\\boxed{1}, \\boxed{2}", out, 9), 1);
    assert_string_equal(out, "{1}, {2}");
    assert_int_equal(verify_extract("\\boxed{1}, \\boxed{2}", out, 8), -1);
    assert_string_equal(out, "");
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
        {"+5", "5"},                    {"x = 5", "x=5"},                  {"5.", "5"},
        {"5 \\text{ cm}", "5"},         {"\\text{Monday}", "Monday"},      {"45^\\circ", "45"},
        {"50\\%", "50\\%"},                {"$\\$5$", "5"},                   {"\\left( 1, 2 \\right)", "(1,2)"},
        {"\\sqrt2", "\\sqrt{2}"},       {"\\frac{\\sqrt3}2", "\\frac{\\sqrt{3}}{2}"},
        {"-3/4", "-\\frac{3}{4}"},      {"\\frac{-1}{2}", "-\\frac{1}{2}"}, {"\\pi r", "\\pi r"},
        {"\\displaystyle x", "x"},      {"\\leftarrow", "\\leftarrow"},    {"", ""},
        {"3 4", "3 4"},                 {"32,\\! 349", "32349"},          {"32, 349", "32,349"},
        {"28 percent", "28\\%"},        {"4/9pct", "4/9\\%"}, {"6 \\text{ and } 8", "6,8"},
        {"1, 2, and 3", "1,2,3"},       {"\\\\frac12", "\\frac{1}{2}"},    {"0,111", "0,111"},
        {"\\{35 cm, 4\\}", "\\{35,4\\}"}, {"5\xe2\x82\xac", "5"},               {"Sandor", "Sandor"},
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
    /* equality is symmetric: every table answer against its label, both ways */
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char x[512];
        if (strstr(cases[i].label, "boxed") || verify_extract(cases[i].response, x, sizeof x) != 1) continue;
        int ab = verify_equal(x, cases[i].label), ba = verify_equal(cases[i].label, x);
        if (ab != ba) print_error("asymmetric: \"%s\" vs \"%s\": %d / %d\n", x, cases[i].label, ab, ba);
        assert_int_equal(ab, ba);
    }
    assert_int_equal(verify_equal("", ""), 0);
    assert_int_equal(verify_equal("\\text{cm}", "\\text{m}"), 0); /* both drop to nothing */
    assert_int_equal(verify_equal(NULL, "1"), 0);
    assert_int_equal(verify_equal("1", NULL), 0);
}

/* reward.fallback_last_number: an answer without a box or an Answer: line. */
static void test_options(void **state) {
    (void)state;
    const verify_options on = {.fallback_last_number = 1}, off = {0};
    char out[64];
    assert_int_equal(verify_extract_opts("So the total is 1,234.", &on, out, sizeof out), 1);
    assert_string_equal(out, "1,234");
    assert_int_equal(verify_extract_opts("So the total is 1,234.", &off, out, sizeof out), 0);
    assert_int_equal(verify_extract_opts("So the total is 1,234.", NULL, out, sizeof out), 0);
    assert_int_equal(verify_extract_opts("a drop of -3 degrees", &on, out, sizeof out), 1);
    assert_string_equal(out, "-3");
    assert_int_equal(verify_extract_opts("3 - 5 = -2, so x is 2-7", &on, out, sizeof out), 1);
    assert_string_equal(out, "7");
    assert_int_equal(verify_extract_opts("the ratio is 3/4 or 0.75", &on, out, sizeof out), 1);
    assert_string_equal(out, "0.75");
    assert_int_equal(verify_extract_opts("no numbers", &on, out, sizeof out), 0);
    assert_int_equal(verify_extract_opts("the point x2", &on, out, sizeof out), 0); /* part of a name */
    /* a box or an Answer: line still wins */
    assert_int_equal(verify_extract_opts("\\boxed{5} and then 7", &on, out, sizeof out), 1);
    assert_string_equal(out, "5");
    assert_int_equal(verify_extract_opts("Answer: 5\nthen 7", &on, out, sizeof out), 1);
    assert_string_equal(out, "5");
    assert_true(verify_math_reward_opts("2 + 2 makes 4.", "4", &on) == 1.0f);
    assert_true(verify_math_reward_opts("2 + 2 makes 4.", "4", &off) == 0.0f);
    assert_true(verify_math_reward_opts("2 + 2 makes 4.", "4", NULL) == 0.0f);
    assert_true(verify_math_reward_opts("2 + 2 makes 5.", "4", &on) == 0.0f);
}

/* Agreement with public verifier test suites: tests/data/verifier-suites.jsonl holds their
 * boxed / Answer-line cases ({"response", "label", "expect", "source"}, and "expect_override"
 * with a "reason" where the suite contradicts the math). Fails below 95% agreement or on any
 * accepted case the suite rejects. */
static void test_suites(void **state) {
    (void)state;
    FILE *f = fopen(MILL_TEST_DATA "/verifier-suites.jsonl", "r");
    assert_non_null(f);
    size_t cap = 1 << 16, line_no = 0;
    char *line = malloc(cap);
    assert_non_null(line);
    int n = 0, agree = 0, strict = 0, lenient = 0, overrides = 0;
    while (fgets(line, (int)cap, f)) {
        line_no++;
        size_t len = strlen(line);
        while (len == cap - 1 && line[len - 1] != '\n') { /* a long line: grow and read on */
            char *t = realloc(line, 2 * cap);
            assert_non_null(t);
            line = t;
            if (!fgets(line + len, (int)(2 * cap - len), f)) break;
            cap *= 2;
            len = strlen(line);
        }
        if (len <= 1) continue;
        json_error_t err;
        json_t *o = json_loads(line, 0, &err);
        if (!o) print_error("verifier-suites.jsonl:%zu: %s\n", line_no, err.text);
        assert_non_null(o);
        const char *resp = json_string_value(json_object_get(o, "response"));
        const char *label = json_string_value(json_object_get(o, "label"));
        json_t *ov = json_object_get(o, "expect_override");
        assert_non_null(resp);
        assert_non_null(label);
        assert_true(json_is_integer(json_object_get(o, "expect")));
        int want = (int)json_integer_value(ov ? ov : json_object_get(o, "expect"));
        if (ov) {
            overrides++;
            assert_non_null(json_string_value(json_object_get(o, "reason")));
        }
        int got = verify_math_reward(resp, label) == 1.0f;
        n++;
        if (got == want) {
            agree++;
        } else {
            if (want) strict++;
            else lenient++;
            print_message("%s line %zu (%s): label \"%.80s\", response \"%.100s\"\n",
                          want ? "too strict" : "TOO LENIENT", line_no, json_string_value(json_object_get(o, "source")),
                          label, resp);
        }
        json_decref(o);
    }
    fclose(f);
    free(line);
    print_message("public verifier suites: %d cases, agreement %d/%d = %.1f%%, too strict %d, too lenient %d "
                  "(%d expectations overridden)\n",
                  n, agree, n, 100.0 * agree / (n ? n : 1), strict, lenient, overrides);
    assert_true(n >= 300);
    assert_int_equal(lenient, 0);
    assert_true(agree * 100 >= 95 * n);
}

/* Random bytes (and random LaTeX-ish tokens) through the reward: no crash, and a result
 * that is 0 or 1. */
static void test_fuzz(void **state) {
    (void)state;
    static const char *const toks[] = {"\\boxed{", "\\fbox", "{", "}", "\\frac", "\\text{", "\\left", "\\",
                                       "$",       "1",      ",", ".", "-",     "/",       " ",      "Answer:",
                                       "\n",      "^\\circ", "cm", "\\sqrt", "x=",     "{,}",    "\\,",    "%",
                                       "\\pm",    "\\cup",  "(",  ")",      "[",      "]",      "=",      "<",
                                       "\\le",    "\\{",    "\\}", "^",      "e",      "x",      "2",      "and",
                                       "</think>", "&",      "\\\\", "\\begin{pmatrix}", "\\end{pmatrix}", "\\infty",
                                       "!",       "\\sin",  "\\pi", "10^{",   "\\approx", "\\in", "|",      ";",
                                       "\\boxed{1}", "0.5", "1e5", "percent"};
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
        assert_int_equal(verify_equal(buf, lab), verify_equal(lab, buf));
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
    /* many boxes in a row: one answer of at most a few parts, found in linear time */
    for (size_t i = 0; i + 11 <= N; i += 11) memcpy(s + i, "\\boxed{1}, ", 11);
    s[N - N % 11] = 0;
    assert_true(verify_math_reward(s, "1") == 1.0f); /* repeats of one answer */
    for (size_t i = 0; i + 10 <= N; i += 10) memcpy(s + i, i % 20 ? "\\boxed{2} " : "\\boxed{1} ", 10);
    s[N - N % 10] = 0;
    assert_true(verify_math_reward(s, "1") == 0.0f);
    /* deep brackets, long lists, long sums, many \pm, as answers */
    static const char *const units[] = {"(", "1,", "1+", "\\pm1", "\\sqrt{", "[0,1)\\cup", "x=", "\\{", "2^{"};
    for (size_t u = 0; u < sizeof units / sizeof units[0]; u++) {
        size_t ul = strlen(units[u]);
        memcpy(s, "\\boxed{", 7);
        k = 7;
        while (k + ul + 2 < N) {
            memcpy(s + k, units[u], ul);
            k += ul;
        }
        s[k++] = '1';
        s[k++] = '}';
        s[k] = 0;
        float r = verify_math_reward(s, "1");
        assert_true(r == 0.0f || r == 1.0f);
        assert_int_equal(verify_equal(s, s), 1);
    }
    /* numbers too large to compute exactly, compared without blowing up */
    static const char *const big[][2] = {{"9^{9^{9}}", "9^{387420489}"},    {"100000!", "100000!"},
                                         {"2^{2^{20}}", "2^{1048576}"},      {"\\binom{100000}{50000}", "1"},
                                         {"10^{10^{6}}", "10^{1000000}"},    {"1e99999", "1e99999"}};
    for (size_t b = 0; b < sizeof big / sizeof big[0]; b++) {
        int e = verify_equal(big[b][0], big[b][1]);
        assert_true(e == 0 || e == 1);
    }
    double dt = now_s() - t0;
    print_message("huge inputs: %.3f s\n", dt);
    assert_true(dt < 5.0); /* linear passes: milliseconds in practice */
    free(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),   cmocka_unit_test(test_extract), cmocka_unit_test(test_normalize),
        cmocka_unit_test(test_equal),   cmocka_unit_test(test_options), cmocka_unit_test(test_suites),
        cmocka_unit_test(test_fuzz),    cmocka_unit_test(test_huge),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
