/* algos/verify.h — the math answer verifier behind GRPO's rule-based reward.
 * Owns: final-answer extraction from a response, the normal form of a LaTeX answer, answer
 * equality (the structure of an answer — lists, tuples, intervals, sets, relations — with its
 * leaves compared by value through mathexpr.h, exact or in high-precision intervals) and the 0/1
 * reward. Pure functions on caller buffers: no global state, safe from any thread, and no input
 * (unbalanced braces, huge numbers, 100 KB of noise) makes them crash or take long.
 * verify.c holds extraction and the normal form, verify_cmp.c equality. */
#ifndef MILL_VERIFY_H
#define MILL_VERIFY_H

#include <stddef.h>

/* Options a recipe may set (reward.* keys); a NULL pointer means all off. */
typedef struct {
    /* No box and no Answer: line: take the last number of the response (12, -3, 1,234.5, 3/4).
     * Off by default: a number in the reasoning is not an answer the model committed to. */
    int fallback_last_number;
} verify_options;

/* The final answer of a response. When the response holds "</think>", only the text after the
 * last one is searched (the answer follows the reasoning).
 * - the content of the LAST `\boxed{...}` or `\fbox{...}` (nested braces balanced, `\{` `\}` `\\`
 *   are not structure), or `\boxed 5` (the token after the blank, up to a blank or `$`). When that
 *   last box has unbalanced braces the response has no answer: a truncated box is not an answer,
 *   and an earlier one was revised.
 * - several boxes are one answer when only spacing, punctuation or a short list of words with a
 *   separator stands between them (`\boxed{2}, \boxed{3}`, `\boxed{1} and \boxed{2}`,
 *   `\boxed{(2,2)} \quad\text{and}\quad \boxed{(6,2)}`), never when the text between holds a digit
 *   or a revising word (but, wait, then, actually, final, so, no, ...: `\boxed{3}, no wait,
 *   \boxed{4}` is 4). They come out as "{a}, {b}", one list, in order, repeats dropped; so hedging
 *   with `\boxed{3} or \boxed{4}` gives the list {3, 4}, which a single label never equals.
 * - else the rest of the last line holding `Answer:` (any case, markdown stars allowed) at its
 *   start or right after a sentence's end (`... done. Answer: 5`), trimmed;
 * - else, with opt->fallback_last_number, the last number.
 * 1 when found (out may be "" for `\boxed{}`), 0 when none (out = ""), -1 when cap is too small
 * (out = "" when cap > 0). */
int verify_extract_opts(const char *response, const verify_options *opt, char *out, size_t cap);
int verify_extract(const char *response, char *out, size_t cap); /* opt = NULL */

/* The normal form used for comparison. In order:
 * 0. a doubled backslash before a command word (`\\frac`) is one, outside matrices.
 * 1. `\text{..}` `\textbf{..}` `\textit{..}` `\textrm{..}` `\mathrm{..}` `\mathbf{..}` `\mbox{..}`
 *    keep their content, except a content of unit words only (cm, m, km, mm, inches, feet,
 *    meters, units, dollars, cents, degrees, hours, minutes, seconds, days, years, square,
 *    cubic, sq, ... see verify.c), which is dropped with a following ^2/^3.
 * 2. `\left` `\right` `\displaystyle` `\!` `$` `\$` and the euro, pound, yen and degree signs,
 *    `^\circ` `^{\circ}`, `{,}` go; `\,` `\;` `\:` `\ ` `\quad` `\qquad` `~` are blanks, except a
 *    thin space `\,` before a three-digit group (1\,000) and blanks after `,\!` (32,\! 349), which
 *    join the number; `%` is written `\%`; a word "and" / "or" between items is a comma;
 *    `\dfrac` `\tfrac` `\cfrac` -> `\frac`.
 * 3. trailing unit words after a number or `}` in each top-level item go ("5 cm" -> "5",
 *    "12 square feet" -> "12"; units glued to the number, "5cm", stay); "percent", "percentage",
 *    "pct" after a number become `\%` ("28 percent" -> "28\%").
 * 4. blanks go, except one between a command and a letter (`\pi r`) and one between two digits:
 *    "3 4" stays two numbers, never 34.
 * 5. `\frac12` -> `\frac{1}{2}`, `\frac\pi2` -> `\frac{\pi}{2}`, `\sqrt2` -> `\sqrt{2}`.
 * 6. whole-answer fix-ups: outer `{..}`, a leading `+`, trailing `.`, thousands commas
 *    (`1,000,000` only when the whole answer is such a number: "1,2" and "32, 349" are lists),
 *    decimals lose trailing zeros (`2.50` -> `2.5`, `3.0` -> `3`, `.5` -> `0.5`), `a/b` of
 *    integers -> `\frac{a}{b}`, `\frac{-a}{b}` -> `-\frac{a}{b}`.
 * 0 on success, -1 when cap is too small or memory runs out (out = "" when cap > 0). */
int verify_normalize(const char *in, char *out, size_t cap);

/* 1 when the two answers are equal, else 0 (also when either is empty after normalising).
 * Both are normalised; equal normal forms are equal. Otherwise each is read as a structure:
 * - a list: items separated by top-level `,` `;` (or "and" / "or"); `;` groups of labelled
 *   items with distinct labels (`p=5,q=2; p=7,q=2`) are tuples. A list is unordered (the
 *   solutions of an equation) and keeps multiplicity: 1, 2 = 2, 1 but 1, 2 != 1, 1, 2 (a
 *   repeated box is dropped at extraction). Against a tuple a list compares in order:
 *   (1, 3) = 1, 3 but (3, 1) != 1, 3.
 * - a tuple or interval: `(..)`, `[..]`, `(..]`, `[..)`, `\langle..\rangle` with two or more
 *   elements: same brackets, same length, equal in order: (1,2) != (2,1), [0,1) != [0,1].
 * - a set `\{..\}`: unordered, repeats ignored: \{1,2\} = \{2,1\}; against a bare list, both
 *   are sets. A union `A \cup B`: its parts unordered.
 * - a matrix (pmatrix, bmatrix, matrix, array): same shape, equal cells.
 * - a relation: `a = b`, `<`, `\le`, `\ge`, `>`, `\ne` and chains. A labelled answer `x = 3`,
 *   `k = 45`, `(p,q) = (3,2)`, `|AB| = 1`, `f(x) = 1`, `A:B = 1` (the left side a name: letters,
 *   subscripts, |..|, f(..), a tuple of names, A:B — not `xy`, a product, nor `2x + z`) equals
 *   its value, the last part of a chain (`x = 5 + 6 = 11` is 11); lists of labelled items with
 *   the same labels compare label by label (a_3 = 2, a_{37} = 19 in any order). Two equations
 *   are equal when one is the other times a constant (2x + 4y - 3 = 0 and y = -x/2 + 3/4), two
 *   inequalities when the constant is positive (x < 1 and -x > -1). `x \in S` is S; a relation
 *   on one name equals the interval it describes (-2 <= x < 7 and [-2, 7)). `a \approx b` is a
 *   (or b when a is only a name).
 * - `\pm` (and `\mp`) makes two items: 1 \pm \sqrt{2} is the list 1 + \sqrt{2}, 1 - \sqrt{2}.
 * - a leaf: by value when both sides are expressions (mathexpr.h): exact rationals compare
 *   exactly (0.5 = \frac{1}{2} = 1/2 but 0.333 != \frac{1}{3}); a decimal against a rational
 *   with an endless expansion, or any value with roots, pi, e or functions, within a relative
 *   1e-9 when a decimal is written (a decimal of ten significant digits is the value, a shorter
 *   one a rounding: 1.414 != \sqrt{2}), else 1e-30 (both exact forms, computed at 384 bits);
 *   expressions in variables by their values at three random points, exactly where rational
 *   (\frac{x+2}{7} = \frac{x}{7} + \frac{2}{7}; x = 3 and y = 3 differ). Scientific notation is
 *   a number: 1.2\times10^{3} = 1.2e3 = 1200; mixed numbers read as such: 2\frac{1}{2} = 2.5,
 *   4 4/9 = 40/9 (11 7/6 is no number). Text leaves (words, unknown commands, `\sum`) compare
 *   as normal forms, words of three letters or more without case (Even = even).
 * - percent: `x\%` is x/100 (10\% = 0.1), and it also matches the same number written without
 *   the sign (10\% = 10: labels and answers often drop it); so a label 10\% accepts 0.1 and 10,
 *   but 10 != 100\% and 4 4/9\% != 40/9.
 * Equality is symmetric: the two arguments may be swapped. Work is bounded (64 items per
 * collection, 2048 parts, 4096-byte expressions), past which an answer compares as text. */
int verify_equal(const char *pred, const char *label);

/* 1.0 when the answer verify_extract_opts finds in the response equals the label, else 0.0.
 * The label is the answer itself ("34", "\frac{3}{4}"); a label holding a `\boxed{}` is
 * reduced to its box(es) first. NULL response or label scores 0; opt may be NULL. */
float verify_math_reward_opts(const char *response, const char *label, const verify_options *opt);
float verify_math_reward(const char *response, const char *label); /* opt = NULL */

#endif
