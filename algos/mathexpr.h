/* algos/mathexpr.h — the value of one answer expression, for the math verifier (verify.h).
 * Owns: parsing one expression written in the verifier's LaTeX normal form — numbers (decimal,
 * scientific 1.2e3, mixed 2\frac{1}{2} and `4 4/9`), + - * / \cdot \times \div, ^, \frac, \sqrt[n],
 * \binom, !, \%, |x|, floor and ceil, \pi, e, \infty, sin cos tan sec csc cot and their arcs,
 * sinh cosh tanh, ln, log, log_b, exp, implicit products (2x, 3\sqrt{2}, \pi r^2) and variables
 * (x, x_1, \alpha) — and comparing two such expressions by value.
 * Values are exact rationals (GMP) while the operations allow, else enclosing intervals (MPFR,
 * MX_PREC bits, every bound rounded outward). Variables get the same pseudo-random rational values
 * on both sides at MX_POINTS points, so two expressions in x are equal when they agree at each.
 * No global state: an mx_expr belongs to its caller; it caches its values, so it is not const.
 * (MPFR's own caches, of pi for one, are per thread in Debian's thread-safe build.) */
#ifndef MILL_MATHEXPR_H
#define MILL_MATHEXPR_H

#include <stddef.h>

enum {
    MX_POINTS = 3,    /* variable assignments tried; three random points make a false match vanishingly rare */
    MX_MAX_LEN = 4096 /* longer text is not an expression here (the verifier compares it as text) */
};

typedef struct mx_expr mx_expr;

/* Parses s[0..n). NULL when it is not a whole expression this module understands (text, a relation,
 * a list, an unknown command, a malformed sign such as `--5`) or memory runs out. */
mx_expr *mx_parse(const char *s, size_t n);
void mx_free(mx_expr *e);

int mx_has_vars(const mx_expr *e);
/* +1 or -1 when e is +infinity or -infinity (\infty, -\infty), else 0. */
int mx_infinite(const mx_expr *e);
/* 1 when e contains a decimal literal (1.5, 2e3): it may then be a rounding of an exact value. */
int mx_decimal(const mx_expr *e);

/* 1 when a * an/ad equals b * bn/bd at every point (ad, bd > 0), else 0 (also when either cannot be
 * evaluated: a zero divisor, a square root of a negative, a huge power). Equality:
 * - two exact rationals: exactly equal; except that, with no variables, a decimal against a
 *   rational whose expansion does not terminate (0.0833333333333333 vs 1/12) may differ by a
 *   relative 1e-9 (a decimal of ten significant digits is that value; 0.333 is not 1/3);
 * - otherwise (roots, pi, logs ...): enclosures within a relative 1e-9 when a decimal literal is
 *   involved, else within 1e-30 (equal forms computed at 384 bits agree far closer than that). */
int mx_equal(mx_expr *a, long an, long ad, mx_expr *b, long bn, long bd);

/* 1 when al - ar = c (bl - br) at every point for one constant c != 0 (c > 0 when positive is set):
 * the same equation (or inequality) written differently. Needs a variable somewhere, else 0. */
int mx_proportional(mx_expr *al, mx_expr *ar, mx_expr *bl, mx_expr *br, int positive);

#endif
