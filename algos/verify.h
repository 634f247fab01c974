/* algos/verify.h — the math answer verifier behind GRPO's rule-based reward.
 * Owns: final-answer extraction from a response, the normal form of a LaTeX answer,
 * answer equality (exact rationals, then normal-form strings) and the 0/1 reward.
 * Pure functions on caller buffers: no global state, safe from any thread, and no
 * input (unbalanced braces, huge numbers, 100 KB of noise) makes them crash. */
#ifndef MILL_VERIFY_H
#define MILL_VERIFY_H

#include <stddef.h>

/* The final answer of a response:
 * - the content of the LAST `\boxed{...}` or `\fbox{...}` (nested braces balanced,
 *   `\{` `\}` `\\` are not structure), or `\boxed 5` (the token after the space, up to
 *   the next whitespace or `$`). When that last box has unbalanced braces the response
 *   has no answer: a truncated box is not an answer, and an earlier one was revised.
 * - else the rest of the last line that starts (after blanks) with `Answer:`, any case,
 *   trimmed.
 * 1 when found (out may be "" for `\boxed{}`), 0 when none (out = ""), -1 when cap is
 * too small (out = "" when cap > 0). */
int verify_extract(const char *response, char *out, size_t cap);

/* The normal form used for comparison. In order:
 * 1. `\text{..}` `\textbf{..}` `\textit{..}` `\textrm{..}` `\mathrm{..}` `\mathbf{..}` `\mbox{..}`
 *    keep their content, except a content of unit words only (cm, m, km, mm, inches, feet,
 *    meters, units, dollars, cents, degrees, percent, hours, minutes, seconds, days, years,
 *    square, cubic, sq, ... see verify.c), which is dropped with a following ^2/^3.
 *    Bare trailing unit words after a digit or `}` go too ("5 cm" -> "5", "12 square feet"
 *    -> "12"); units glued to the number ("5cm") stay.
 * 2. `\left` `\right` `\displaystyle` `\!` `\,` `\;` `\:` `\ ` `\quad` `\qquad`, `$` `\$`,
 *    `%` `\%` (50\% -> 50), `^\circ` `^{\circ}` and the degree sign, `{,}`, whitespace
 *    (one blank is kept between a command and a letter: `\pi r`); `\dfrac` `\tfrac`
 *    `\cfrac` -> `\frac`.
 * 3. `\frac12` -> `\frac{1}{2}`, `\frac\pi2` -> `\frac{\pi}{2}`, `\sqrt2` -> `\sqrt{2}`.
 * 4. whole-answer fix-ups: outer `{..}`, a one-letter `x=` prefix (when it is the only
 *    `=`), a leading `+`, trailing `.`, thousands commas (`1,000,000` only when the whole
 *    answer is such a number), decimals lose trailing zeros (`2.50` -> `2.5`, `3.0` -> `3`,
 *    `.5` -> `0.5`), `a/b` of integers -> `\frac{a}{b}`, `\frac{-a}{b}` -> `-\frac{a}{b}`.
 * 0 on success, -1 when cap is too small or memory runs out (out = "" when cap > 0). */
int verify_normalize(const char *in, char *out, size_t cap);

/* 1 when the two answers are equal, else 0 (also when either is empty after normalising).
 * Both are normalised; when both then read as numbers (integers, decimals, `\frac{a}{b}`,
 * `a/b`, with signs) they are compared as exact rationals in long long — so 0.5 =
 * \frac{1}{2} = 1/2 but 0.333 != \frac{1}{3}; numbers too big for that fall back to
 * comparing normal forms as strings, as does everything else (`\sqrt2` = `\sqrt{2}`). */
int verify_equal(const char *pred, const char *label);

/* 1.0 when the answer verify_extract finds in the response equals the label, else 0.0.
 * The label is the answer itself ("34", "\frac{3}{4}"); a label holding a `\boxed{}` is
 * reduced to its box first. NULL arguments score 0. */
float verify_math_reward(const char *response, const char *label);

#endif
