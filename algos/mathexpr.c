/* algos/mathexpr.c — parsing and comparing answer expressions by value. See mathexpr.h.
 * A recursive-descent parser builds a small tree (MX_MAX_NODES nodes, MX_MAX_DEPTH deep at most);
 * evaluation walks it once per point. A value stays an exact mpq_t until an operation (a root,
 * pi, a function) or its size (MX_MAX_BITS) turns it into an interval [lo, hi] whose bounds are
 * rounded outward, so the true value is always inside. Every size that could make the work grow
 * (powers, factorials, binomials, digits) is bounded, so an input costs milliseconds at most. */
#include "mathexpr.h"

#include <gmp.h>
#include <mpfr.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
    MX_PREC = 384,       /* bits of every interval bound */
    MX_MAX_NODES = 1024, /* tree nodes */
    MX_MAX_DEPTH = 48,   /* parser recursion */
    MX_MAX_BITS = 16384, /* an exact value larger than this becomes an interval */
    MX_MAX_POW = 100000, /* |integer exponent| */
    MX_MAX_ROOT = 64,    /* root index, and denominator of a rational exponent, computed exactly */
    MX_MAX_FACT = 3000,  /* n! */
    MX_MAX_EXP10 = 4000  /* |e| in 1.2e<e> */
};

typedef enum {
    K_NUM, K_PI, K_E, K_INF, K_VAR, K_NEG, K_ADD, K_SUB, K_MUL, K_DIV, K_POW, K_SQRT, K_ROOT,
    K_FN, K_ABS, K_FACT, K_FLOOR, K_CEIL, K_BINOM, K_PCT, K_LOG
} mx_kind;

typedef enum {
    F_SIN, F_COS, F_TAN, F_SEC, F_CSC, F_COT, F_ASIN, F_ACOS, F_ATAN, F_SINH, F_COSH, F_TANH, F_LN, F_EXP
} mx_fn;

typedef struct {
    unsigned char kind, fn;
    int a, b;   /* children */
    int num;    /* K_NUM: index into nums */
    uint64_t h; /* K_VAR: hash of the name */
} mx_node;

/* One value: an exact rational, an interval, or an infinity. dec: a decimal literal went in. */
enum { V_Q, V_R, V_INF };
typedef struct {
    int kind, sign, dec;
    mpq_t q;
    mpfr_t lo, hi;
} mxv;

struct mx_expr {
    mx_node *node;
    int nn, cap, root;
    mpq_t *nums;
    unsigned char *numdec;
    int nnum, numcap;
    int vars, dec, inf;
    mxv val[MX_POINTS];
    signed char st[MX_POINTS]; /* 0 not computed, 1 computed, -1 cannot be evaluated */
};

/* ---- values ---- */

static void v_init(mxv *v) {
    mpq_init(v->q);
    mpfr_init2(v->lo, MX_PREC);
    mpfr_init2(v->hi, MX_PREC);
    v->kind = V_Q;
    v->sign = 0;
    v->dec = 0;
}

static void v_clear(mxv *v) {
    mpq_clear(v->q);
    mpfr_clear(v->lo);
    mpfr_clear(v->hi);
}

static void v_copy(mxv *d, const mxv *s) {
    d->kind = s->kind;
    d->sign = s->sign;
    d->dec = s->dec;
    mpq_set(d->q, s->q);
    mpfr_set(d->lo, s->lo, MPFR_RNDN);
    mpfr_set(d->hi, s->hi, MPFR_RNDN);
}

static void v_real(mxv *v) {
    if (v->kind != V_Q) return;
    mpfr_set_q(v->lo, v->q, MPFR_RNDD);
    mpfr_set_q(v->hi, v->q, MPFR_RNDU);
    v->kind = V_R;
}

/* Keeps exact values small and intervals finite; 0 when the value is lost (overflow, NaN). */
static int v_fit(mxv *v) {
    if (v->kind == V_Q) {
        if (mpz_sizeinbase(mpq_numref(v->q), 2) + mpz_sizeinbase(mpq_denref(v->q), 2) > MX_MAX_BITS) v_real(v);
        else return 1;
    }
    if (v->kind == V_R) return mpfr_number_p(v->lo) && mpfr_number_p(v->hi) && mpfr_lessequal_p(v->lo, v->hi);
    return 1;
}

static void v_set_ui(mxv *v, unsigned long n) {
    v->kind = V_Q;
    mpq_set_ui(v->q, n, 1);
}

/* x = x + y or x - y. */
static int op_add(mxv *x, mxv *y, int sub) {
    x->dec |= y->dec;
    if (x->kind == V_INF || y->kind == V_INF) return 0;
    if (x->kind == V_Q && y->kind == V_Q) {
        if (sub) mpq_sub(x->q, x->q, y->q);
        else mpq_add(x->q, x->q, y->q);
        return v_fit(x);
    }
    v_real(x);
    v_real(y);
    if (sub) {
        mpfr_sub(x->lo, x->lo, y->hi, MPFR_RNDD);
        mpfr_sub(x->hi, x->hi, y->lo, MPFR_RNDU);
    } else {
        mpfr_add(x->lo, x->lo, y->lo, MPFR_RNDD);
        mpfr_add(x->hi, x->hi, y->hi, MPFR_RNDU);
    }
    return v_fit(x);
}

/* [lo, hi] = [alo, ahi] * [blo, bhi], the hull of the four corner products. */
static void iv_mul(mpfr_t lo, mpfr_t hi, mpfr_t alo, mpfr_t ahi, mpfr_t blo, mpfr_t bhi) {
    mpfr_t t, l, h;
    mpfr_inits2(MX_PREC, t, l, h, (mpfr_ptr)0);
    mpfr_ptr as[2] = {alo, ahi}, bs[2] = {blo, bhi};
    for (int k = 0; k < 4; k++) {
        mpfr_mul(t, as[k >> 1], bs[k & 1], MPFR_RNDD);
        if (k == 0 || mpfr_less_p(t, l)) mpfr_set(l, t, MPFR_RNDN);
        mpfr_mul(t, as[k >> 1], bs[k & 1], MPFR_RNDU);
        if (k == 0 || mpfr_greater_p(t, h)) mpfr_set(h, t, MPFR_RNDN);
    }
    mpfr_set(lo, l, MPFR_RNDN);
    mpfr_set(hi, h, MPFR_RNDN);
    mpfr_clears(t, l, h, (mpfr_ptr)0);
}

static int op_mul(mxv *x, mxv *y) {
    x->dec |= y->dec;
    if (x->kind == V_INF || y->kind == V_INF) return 0;
    if (x->kind == V_Q && y->kind == V_Q) {
        mpq_mul(x->q, x->q, y->q);
        return v_fit(x);
    }
    v_real(x);
    v_real(y);
    iv_mul(x->lo, x->hi, x->lo, x->hi, y->lo, y->hi);
    return v_fit(x);
}

/* x = 1 / x; 0 when x may be zero. */
static int op_inv(mxv *x) {
    if (x->kind == V_INF) return 0;
    if (x->kind == V_Q) {
        if (mpq_sgn(x->q) == 0) return 0;
        mpq_inv(x->q, x->q);
        return 1;
    }
    if (mpfr_sgn(x->lo) <= 0 && mpfr_sgn(x->hi) >= 0) return 0;
    mpfr_t t;
    mpfr_init2(t, MX_PREC);
    mpfr_ui_div(t, 1, x->hi, MPFR_RNDD);
    mpfr_ui_div(x->hi, 1, x->lo, MPFR_RNDU);
    mpfr_set(x->lo, t, MPFR_RNDN);
    mpfr_clear(t);
    return v_fit(x);
}

static int op_div(mxv *x, mxv *y) {
    if (!op_inv(y)) return 0;
    return op_mul(x, y);
}

static void op_neg(mxv *x) {
    if (x->kind == V_INF) {
        x->sign = -x->sign;
    } else if (x->kind == V_Q) {
        mpq_neg(x->q, x->q);
    } else {
        mpfr_neg(x->lo, x->lo, MPFR_RNDN);
        mpfr_neg(x->hi, x->hi, MPFR_RNDN);
        mpfr_swap(x->lo, x->hi);
    }
}

/* A monotone function on an interval: increasing (inc = 1) or decreasing. */
typedef int (*mpfr_fn1)(mpfr_ptr, mpfr_srcptr, mpfr_rnd_t);
static void iv_mono(mxv *x, mpfr_fn1 f, int inc) {
    mpfr_t l, h;
    mpfr_inits2(MX_PREC, l, h, (mpfr_ptr)0);
    if (inc) {
        f(l, x->lo, MPFR_RNDD);
        f(h, x->hi, MPFR_RNDU);
    } else {
        f(l, x->hi, MPFR_RNDD);
        f(h, x->lo, MPFR_RNDU);
    }
    mpfr_set(x->lo, l, MPFR_RNDN);
    mpfr_set(x->hi, h, MPFR_RNDN);
    mpfr_clears(l, h, (mpfr_ptr)0);
}

/* sin or cos: |f'| <= 1, so f(x) lies within the interval's half-width of f(midpoint). */
static void iv_lipschitz(mxv *x, mpfr_fn1 f) {
    mpfr_t m, r, t, y;
    mpfr_inits2(MX_PREC, m, r, t, y, (mpfr_ptr)0);
    mpfr_add(m, x->lo, x->hi, MPFR_RNDN);
    mpfr_div_2ui(m, m, 1, MPFR_RNDN);
    mpfr_sub(r, x->hi, m, MPFR_RNDU);
    mpfr_sub(t, m, x->lo, MPFR_RNDU);
    if (mpfr_greater_p(t, r)) mpfr_set(r, t, MPFR_RNDN);
    mpfr_set_ui_2exp(t, 1, -(MX_PREC - 8), MPFR_RNDN); /* f's own rounding, |f| <= 1 */
    mpfr_add(r, r, t, MPFR_RNDU);
    f(y, m, MPFR_RNDN);
    mpfr_sub(x->lo, y, r, MPFR_RNDD);
    mpfr_add(x->hi, y, r, MPFR_RNDU);
    if (mpfr_cmp_si(x->lo, -1) < 0) mpfr_set_si(x->lo, -1, MPFR_RNDN);
    if (mpfr_cmp_si(x->hi, 1) > 0) mpfr_set_si(x->hi, 1, MPFR_RNDN);
    mpfr_clears(m, r, t, y, (mpfr_ptr)0);
}

static int op_fn(mxv *x, int fn) {
    if (x->kind == V_INF) return 0;
    if (x->kind == V_Q && mpq_sgn(x->q) == 0) { /* exact at zero: sin 0 = tan 0 = ... = 0 */
        if (fn == F_SIN || fn == F_TAN || fn == F_ASIN || fn == F_ATAN || fn == F_SINH || fn == F_TANH) return 1;
        if (fn == F_COS || fn == F_SEC || fn == F_COSH || fn == F_EXP) return v_set_ui(x, 1), 1;
    }
    if (x->kind == V_Q && mpq_cmp_ui(x->q, 1, 1) == 0 && fn == F_LN) return v_set_ui(x, 0), 1;
    v_real(x);
    mxv c;
    int ok = 1;
    switch (fn) {
    case F_SIN: iv_lipschitz(x, mpfr_sin); break;
    case F_COS: iv_lipschitz(x, mpfr_cos); break;
    case F_TAN: case F_SEC: case F_CSC: case F_COT:
        v_init(&c);
        v_copy(&c, x);
        iv_lipschitz(&c, mpfr_cos); /* c = cos x */
        iv_lipschitz(x, mpfr_sin);  /* x = sin x */
        if (fn == F_TAN) {
            ok = op_div(x, &c);
        } else if (fn == F_CSC) {
            ok = op_inv(x);
        } else {
            ok = fn == F_COT ? op_div(&c, x) : op_inv(&c);
            v_copy(x, &c);
        }
        v_clear(&c);
        break;
    case F_ASIN: case F_ACOS:
        if (mpfr_cmp_si(x->lo, -1) < 0 || mpfr_cmp_si(x->hi, 1) > 0) return 0;
        iv_mono(x, fn == F_ASIN ? mpfr_asin : mpfr_acos, fn == F_ASIN);
        break;
    case F_ATAN: iv_mono(x, mpfr_atan, 1); break;
    case F_SINH: iv_mono(x, mpfr_sinh, 1); break;
    case F_TANH: iv_mono(x, mpfr_tanh, 1); break;
    case F_COSH:
        if (mpfr_sgn(x->lo) >= 0) {
            iv_mono(x, mpfr_cosh, 1);
        } else if (mpfr_sgn(x->hi) <= 0) {
            iv_mono(x, mpfr_cosh, 0);
        } else {
            mpfr_abs(x->lo, x->lo, MPFR_RNDN);
            if (mpfr_greater_p(x->lo, x->hi)) mpfr_set(x->hi, x->lo, MPFR_RNDN);
            mpfr_cosh(x->hi, x->hi, MPFR_RNDU);
            mpfr_set_ui(x->lo, 1, MPFR_RNDN);
        }
        break;
    case F_LN:
        if (mpfr_sgn(x->lo) <= 0) return 0;
        iv_mono(x, mpfr_log, 1);
        break;
    case F_EXP: iv_mono(x, mpfr_exp, 1); break;
    default: return 0;
    }
    return ok && v_fit(x);
}

/* x = the exact q-th root of x when there is one (x >= 0, or x < 0 with q odd); else 0. */
static int q_root_exact(mpq_t x, unsigned long q) {
    int neg = mpq_sgn(x) < 0;
    if (neg && q % 2 == 0) return 0;
    mpz_t a, b;
    mpz_inits(a, b, (mpz_ptr)0);
    mpz_abs(a, mpq_numref(x));
    int ok = mpz_root(a, a, q) && mpz_root(b, mpq_denref(x), q);
    if (ok) {
        if (neg) mpz_neg(a, a);
        mpq_set_num(x, a);
        mpq_set_den(x, b);
        mpq_canonicalize(x);
    }
    mpz_clears(a, b, (mpz_ptr)0);
    return ok;
}

/* x = x^n for an integer n. */
static int pow_int(mxv *x, long n) {
    if (x->kind == V_INF) return 0;
    unsigned long k = (unsigned long)(n < 0 ? -n : n);
    if (x->kind == V_Q) {
        size_t bits = mpz_sizeinbase(mpq_numref(x->q), 2) + mpz_sizeinbase(mpq_denref(x->q), 2);
        if (bits * k <= MX_MAX_BITS) {
            if (n < 0 && mpq_sgn(x->q) == 0) return 0;
            mpz_pow_ui(mpq_numref(x->q), mpq_numref(x->q), k);
            mpz_pow_ui(mpq_denref(x->q), mpq_denref(x->q), k);
            if (n < 0) mpq_inv(x->q, x->q);
            return 1;
        }
        v_real(x);
    }
    mxv b, r;
    v_init(&b);
    v_init(&r);
    v_copy(&b, x);
    v_set_ui(&r, 1);
    int ok = 1;
    while (ok && k) { /* square and multiply */
        if (k & 1) ok = op_mul(&r, &b);
        k >>= 1;
        if (k && ok) {
            mxv t;
            v_init(&t);
            v_copy(&t, &b);
            ok = op_mul(&b, &t);
            v_clear(&t);
        }
    }
    if (ok) v_copy(x, &r);
    if (ok && n < 0) ok = op_inv(x);
    v_clear(&b);
    v_clear(&r);
    return ok && v_fit(x);
}

/* x = x^y. */
static int op_pow(mxv *x, mxv *y) {
    int dec = x->dec | y->dec;
    if (x->kind == V_INF || y->kind == V_INF) return 0;
    int ok;
    if (y->kind == V_Q && mpz_cmp_ui(mpq_denref(y->q), 1) == 0) {
        if (!mpz_fits_slong_p(mpq_numref(y->q)) || labs(mpz_get_si(mpq_numref(y->q))) > MX_MAX_POW) return 0;
        ok = pow_int(x, mpz_get_si(mpq_numref(y->q)));
        x->dec = dec;
        return ok;
    }
    if (y->kind == V_Q && mpz_cmp_ui(mpq_denref(y->q), MX_MAX_ROOT) <= 0 && mpz_fits_slong_p(mpq_numref(y->q)) &&
        labs(mpz_get_si(mpq_numref(y->q))) <= MX_MAX_POW) {
        unsigned long q = mpz_get_ui(mpq_denref(y->q));
        long p = mpz_get_si(mpq_numref(y->q));
        if (x->kind == V_Q) {
            mxv t;
            v_init(&t);
            v_copy(&t, x);
            if (q_root_exact(t.q, q)) {
                ok = pow_int(&t, p);
                if (ok) v_copy(x, &t);
                v_clear(&t);
                x->dec = dec;
                return ok;
            }
            v_clear(&t);
        }
        v_real(x);
        if (mpfr_sgn(x->hi) < 0 && q % 2) { /* odd root of a negative: -(|x|^(1/q)) */
            op_neg(x);
            mpfr_t l, h;
            mpfr_inits2(MX_PREC, l, h, (mpfr_ptr)0);
            mpfr_rootn_ui(l, x->lo, q, MPFR_RNDD);
            mpfr_rootn_ui(h, x->hi, q, MPFR_RNDU);
            mpfr_set(x->lo, l, MPFR_RNDN);
            mpfr_set(x->hi, h, MPFR_RNDN);
            mpfr_clears(l, h, (mpfr_ptr)0);
            op_neg(x);
            ok = pow_int(x, p);
            x->dec = dec;
            return ok;
        }
    }
    /* general: x > 0, x^y = exp(y ln x) */
    v_real(x);
    if (mpfr_sgn(x->lo) <= 0) return 0;
    ok = op_fn(x, F_LN) && op_mul(x, y) && op_fn(x, F_EXP);
    x->dec = dec;
    return ok;
}

/* x = the n-th root of x (n = 2 for \sqrt). */
static int op_root(mxv *x, unsigned long n) {
    if (x->kind == V_INF || n < 2 || n > MX_MAX_ROOT) return 0;
    if (x->kind == V_Q) {
        if (mpq_sgn(x->q) < 0 && n % 2 == 0) return 0;
        mxv t;
        v_init(&t);
        v_copy(&t, x);
        int exact = q_root_exact(t.q, n);
        if (exact) v_copy(x, &t);
        v_clear(&t);
        if (exact) return 1;
        v_real(x);
    }
    if (n % 2 == 0) {
        if (mpfr_sgn(x->hi) < 0) return 0;
        if (mpfr_sgn(x->lo) < 0) mpfr_set_zero(x->lo, 1); /* rounding noise around 0 */
    }
    mpfr_t l, h;
    mpfr_inits2(MX_PREC, l, h, (mpfr_ptr)0);
    mpfr_rootn_ui(l, x->lo, n, MPFR_RNDD);
    mpfr_rootn_ui(h, x->hi, n, MPFR_RNDU);
    mpfr_set(x->lo, l, MPFR_RNDN);
    mpfr_set(x->hi, h, MPFR_RNDN);
    mpfr_clears(l, h, (mpfr_ptr)0);
    return v_fit(x);
}

/* An exact small non-negative integer, or -1. */
static long v_small_int(const mxv *x, long max) {
    if (x->kind != V_Q || mpz_cmp_ui(mpq_denref(x->q), 1) != 0 || mpq_sgn(x->q) < 0) return -1;
    if (mpz_cmp_si(mpq_numref(x->q), max) > 0) return -1;
    return mpz_get_si(mpq_numref(x->q));
}

/* floor (up = 0) or ceil (up = 1); an interval must lie between two integers. */
static int op_round(mxv *x, int up) {
    if (x->kind == V_INF) return 0;
    if (x->kind == V_Q) {
        if (up) mpz_cdiv_q(mpq_numref(x->q), mpq_numref(x->q), mpq_denref(x->q));
        else mpz_fdiv_q(mpq_numref(x->q), mpq_numref(x->q), mpq_denref(x->q));
        mpz_set_ui(mpq_denref(x->q), 1);
        return 1;
    }
    mpz_t a, b;
    mpz_inits(a, b, (mpz_ptr)0);
    if (up) {
        mpfr_get_z(a, x->lo, MPFR_RNDU);
        mpfr_get_z(b, x->hi, MPFR_RNDU);
    } else {
        mpfr_get_z(a, x->lo, MPFR_RNDD);
        mpfr_get_z(b, x->hi, MPFR_RNDD);
    }
    int ok = mpz_cmp(a, b) == 0;
    if (ok) {
        x->kind = V_Q;
        mpq_set_z(x->q, a);
    }
    mpz_clears(a, b, (mpz_ptr)0);
    return ok;
}

/* ---- the parser ---- */

typedef struct {
    const char *s;
    size_t n, i;
    mx_expr *e;
    int depth, abs_open;
} mxp;

static int vx_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static int vx_digit(char c) { return c >= '0' && c <= '9'; }

static int node(mxp *p, int kind, int a, int b) {
    mx_expr *e = p->e;
    if (e->nn >= MX_MAX_NODES) return -1;
    if (e->nn == e->cap) {
        int c = e->cap ? 2 * e->cap : 32;
        mx_node *t = realloc(e->node, (size_t)c * sizeof *t);
        if (!t) return -1;
        e->node = t;
        e->cap = c;
    }
    mx_node *d = &e->node[e->nn];
    memset(d, 0, sizeof *d);
    d->kind = (unsigned char)kind;
    d->a = a;
    d->b = b;
    return e->nn++;
}

/* A new K_NUM node holding an mpq constant; the caller sets it through *q. */
static int num_node(mxp *p, mpq_ptr *q, int dec) {
    mx_expr *e = p->e;
    if (e->nnum == e->numcap) {
        int c = e->numcap ? 2 * e->numcap : 8;
        mpq_t *t = realloc(e->nums, (size_t)c * sizeof *t);
        if (!t) return -1;
        e->nums = t;
        unsigned char *d = realloc(e->numdec, (size_t)c);
        if (!d) return -1;
        e->numdec = d;
        e->numcap = c;
    }
    int k = node(p, K_NUM, -1, -1);
    if (k < 0) return -1;
    mpq_init(e->nums[e->nnum]);
    e->numdec[e->nnum] = (unsigned char)dec;
    e->node[k].num = e->nnum;
    *q = e->nums[e->nnum++];
    if (dec) e->dec = 1;
    return k;
}

/* `\name` at i as a whole command word; its length or 0. */
static size_t cmd_at(const mxp *p, size_t i, const char *name) {
    size_t k = strlen(name);
    if (i >= p->n || p->s[i] != '\\' || p->n - i - 1 < k || memcmp(p->s + i + 1, name, k) != 0) return 0;
    if (i + 1 + k < p->n && vx_alpha(p->s[i + 1 + k])) return 0;
    return 1 + k;
}

static int eat(mxp *p, const char *name) {
    size_t k = cmd_at(p, p->i, name);
    p->i += k;
    return k != 0;
}

static void skip_blank(mxp *p) {
    while (p->i < p->n && p->s[p->i] == ' ') p->i++;
}

static int parse_expr(mxp *p);
static int parse_unary(mxp *p);
static int parse_power(mxp *p);
static int parse_primary(mxp *p);

static const struct {
    const char *name;
    int fn, inv;
} fn_names[] = {
    {"sin", F_SIN, F_ASIN},  {"cos", F_COS, F_ACOS},   {"tan", F_TAN, F_ATAN},  {"sec", F_SEC, -1},
    {"csc", F_CSC, -1},      {"cot", F_COT, -1},       {"arcsin", F_ASIN, -1},  {"arccos", F_ACOS, -1},
    {"arctan", F_ATAN, -1},  {"sinh", F_SINH, -1},     {"cosh", F_COSH, -1},    {"tanh", F_TANH, -1},
    {"ln", F_LN, -1},        {"log", F_LN, -1},        {"exp", F_EXP, -1},
};

/* The function named s[i..i+k), or -1. */
static int fn_lookup(const char *s, size_t k) {
    for (size_t f = 0; f < sizeof fn_names / sizeof fn_names[0]; f++)
        if (strlen(fn_names[f].name) == k && memcmp(fn_names[f].name, s, k) == 0) return (int)f;
    return -1;
}

static const char *const greek[] = {
    "alpha", "beta",  "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta",   "theta", "vartheta",
    "iota",  "kappa", "lambda", "mu",   "nu",      "xi",         "rho",  "sigma", "tau",   "upsilon",
    "phi",   "varphi", "chi",  "psi",   "omega",   "Gamma",      "Delta", "Theta", "Lambda", "Xi",
    "Sigma", "Phi",   "Psi",   "Omega", "ell",
};

static uint64_t hash_bytes(uint64_t h, const char *s, size_t k) {
    for (size_t j = 0; j < k; j++) {
        h ^= (unsigned char)s[j];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* A variable named s[a..b) plus its subscript (`_1`, `_{12}`, braces ignored). */
static int var_node(mxp *p, size_t a, size_t b) {
    uint64_t h = hash_bytes(0xcbf29ce484222325ULL, p->s + a, b - a);
    if (p->i < p->n && p->s[p->i] == '_') {
        p->i++;
        h = hash_bytes(h, "_", 1);
        if (p->i < p->n && p->s[p->i] == '{') {
            size_t d = 0, j = p->i;
            for (; j < p->n; j++) {
                if (p->s[j] == '{') d++;
                else if (p->s[j] == '}' && --d == 0) break;
            }
            if (j >= p->n) return -1;
            for (size_t k = p->i + 1; k < j; k++)
                if (p->s[k] != '{' && p->s[k] != '}') h = hash_bytes(h, p->s + k, 1);
            p->i = j + 1;
        } else if (p->i < p->n && (vx_alpha(p->s[p->i]) || vx_digit(p->s[p->i]))) {
            h = hash_bytes(h, p->s + p->i, 1);
            p->i++;
        } else {
            return -1;
        }
    }
    int k = node(p, K_VAR, -1, -1);
    if (k < 0) return -1;
    p->e->node[k].h = h;
    p->e->vars = 1;
    return k;
}

/* `{expr}` (or the given bracket pair) at i. */
static int parse_group(mxp *p, char open, char close) {
    if (p->i >= p->n || p->s[p->i] != open) return -1;
    p->i++;
    int k = parse_expr(p);
    if (k < 0 || p->i >= p->n || p->s[p->i] != close) return -1;
    p->i++;
    return k;
}

/* One argument of \frac, \sqrt, \binom, ^: a group, one digit, one letter, or a command atom. */
static int parse_arg(mxp *p) {
    if (p->i < p->n && p->s[p->i] == ' ') p->i++;
    if (p->i >= p->n) return -1;
    char c = p->s[p->i];
    if (c == '{') return parse_group(p, '{', '}');
    if (vx_digit(c)) {
        mpq_ptr q;
        int k = num_node(p, &q, 0);
        if (k >= 0) mpq_set_ui(q, (unsigned long)(c - '0'), 1);
        p->i++;
        return k;
    }
    if (vx_alpha(c)) {
        p->i++;
        if (c == 'e' && !(p->i < p->n && p->s[p->i] == '_')) return node(p, K_E, -1, -1);
        return var_node(p, p->i - 1, p->i);
    }
    if (c == '\\') return parse_primary(p);
    return -1;
}

/* An integer literal s[a..b) into q. */
static void set_int(mpq_ptr q, const char *s, size_t a, size_t b) {
    char buf[64];
    char *t = b - a < sizeof buf ? buf : malloc(b - a + 1);
    if (!t) return;
    memcpy(t, s + a, b - a);
    t[b - a] = 0;
    mpz_set_str(mpq_numref(q), t, 10);
    mpz_set_ui(mpq_denref(q), 1);
    if (t != buf) free(t);
}

/* Digits only, s[a..b). */
static int all_digits(const char *s, size_t a, size_t b) {
    if (a >= b) return 0;
    for (size_t j = a; j < b; j++)
        if (!vx_digit(s[j])) return 0;
    return 1;
}

/* A mixed number's fraction after the whole part W at p->i: `\frac{A}{B}` or ` A/B` with A < B.
 * Sets q = W + A/B (sign of W ignored: a leading minus is a unary operator) and returns 1. */
static int mixed_tail(mxp *p, mpq_ptr q) {
    const char *s = p->s;
    size_t n = p->n, i = p->i, a0, a1, b0, b1;
    if (i + 6 < n && memcmp(s + i, "\\frac{", 6) == 0) {
        a0 = i + 6;
        a1 = a0;
        while (a1 < n && vx_digit(s[a1])) a1++;
        if (a1 + 1 >= n || s[a1] != '}' || s[a1 + 1] != '{') return 0;
        b0 = a1 + 2;
        b1 = b0;
        while (b1 < n && vx_digit(s[b1])) b1++;
        if (b1 >= n || s[b1] != '}') return 0;
        i = b1 + 1;
    } else if (i + 3 < n && s[i] == ' ' && vx_digit(s[i + 1])) {
        a0 = i + 1;
        a1 = a0;
        while (a1 < n && vx_digit(s[a1])) a1++;
        if (a1 >= n || s[a1] != '/') return 0;
        b0 = a1 + 1;
        b1 = b0;
        while (b1 < n && vx_digit(s[b1])) b1++;
        i = b1;
    } else {
        return 0;
    }
    if (!all_digits(s, a0, a1) || !all_digits(s, b0, b1) || a1 - a0 > 30 || b1 - b0 > 30) return 0;
    if (i < n && (vx_digit(s[i]) || s[i] == '.' || s[i] == '^' || s[i] == '_' || s[i] == '/')) return 0;
    mpq_t f;
    mpq_init(f);
    set_int(f, s, a0, a1);
    mpq_t d;
    mpq_init(d);
    set_int(d, s, b0, b1);
    int ok = mpq_sgn(d) > 0 && mpq_cmp(f, d) < 0;
    if (ok) {
        mpq_div(f, f, d);
        mpq_add(q, q, f);
        p->i = i;
    }
    mpq_clear(f);
    mpq_clear(d);
    return ok;
}

/* A number literal: 12, 1.25, 1.2e3, 1.2E-3, and a mixed number after an integer. */
static int parse_number(mxp *p) {
    const char *s = p->s;
    size_t n = p->n, a = p->i, j = a;
    while (j < n && vx_digit(s[j])) j++;
    size_t ip = j, f0 = j, f1 = j;
    if (j + 1 < n && s[j] == '.' && vx_digit(s[j + 1])) {
        f0 = j + 1;
        j = f0;
        while (j < n && vx_digit(s[j])) j++;
        f1 = j;
    }
    long ex = 0;
    int sci = 0;
    if (j + 1 < n && (s[j] == 'e' || s[j] == 'E')) {
        size_t k = j + 1;
        int neg = 0;
        if (k < n && (s[k] == '+' || s[k] == '-')) neg = s[k++] == '-';
        if (k < n && vx_digit(s[k])) {
            size_t k0 = k;
            while (k < n && vx_digit(s[k])) k++;
            if (k - k0 > 5) return -1;
            ex = strtol(s + k0, NULL, 10);
            if (ex > MX_MAX_EXP10) return -1;
            if (neg) ex = -ex;
            sci = 1;
            j = k;
        }
    }
    if (ip - a + (f1 - f0) > MX_MAX_LEN) return -1;
    int dec = f1 > f0 || sci;
    mpq_ptr q;
    int k = num_node(p, &q, dec);
    if (k < 0) return -1;
    /* digits without the dot, over 10^(fraction digits) */
    size_t len = (ip - a) + (f1 - f0);
    char *t = malloc(len + 1);
    if (!t) return -1;
    memcpy(t, s + a, ip - a);
    memcpy(t + (ip - a), s + f0, f1 - f0);
    t[len] = 0;
    mpz_set_str(mpq_numref(q), t, 10);
    free(t);
    mpz_ui_pow_ui(mpq_denref(q), 10, f1 - f0);
    mpq_canonicalize(q);
    if (ex) {
        mpz_t m;
        mpz_init(m);
        mpz_ui_pow_ui(m, 10, (unsigned long)(ex < 0 ? -ex : ex));
        if (ex > 0) mpz_mul(mpq_numref(q), mpq_numref(q), m);
        else mpz_mul(mpq_denref(q), mpq_denref(q), m);
        mpz_clear(m);
        mpq_canonicalize(q);
    }
    p->i = j;
    /* a mixed number starts a term: `2\frac{1}{2}`, `4 4/9` (not after / or ^) */
    if (!dec && (a == 0 || strchr("+-({[ ", s[a - 1]))) mixed_tail(p, q);
    return k;
}

/* A function's argument: (..), {..}, or a product of factors up to the next function or sign. */
static int parse_fn_arg(mxp *p) {
    skip_blank(p);
    if (p->i >= p->n) return -1;
    if (p->s[p->i] == '(') return parse_group(p, '(', ')');
    if (p->s[p->i] == '{') return parse_group(p, '{', '}');
    int k = parse_power(p);
    while (k >= 0 && p->i < p->n) {
        char c = p->s[p->i];
        if (!(vx_digit(c) || vx_alpha(c) || c == '\\')) break;
        if (c == '\\') { /* stop before another function or an operator command */
            size_t j = p->i + 1;
            while (j < p->n && vx_alpha(p->s[j])) j++;
            if (fn_lookup(p->s + p->i + 1, j - p->i - 1) >= 0 || j == p->i + 1) break;
            if (cmd_at(p, p->i, "cdot") || cmd_at(p, p->i, "times") || cmd_at(p, p->i, "div")) break;
        } else if (vx_alpha(c)) {
            size_t j = p->i;
            while (j < p->n && vx_alpha(p->s[j])) j++;
            if (fn_lookup(p->s + p->i, j - p->i) >= 0) break;
        }
        int r = parse_power(p);
        k = r < 0 ? -1 : node(p, K_MUL, k, r);
    }
    return k;
}

/* A function named by fn_names[f], at p->i just past its name. */
static int parse_function(mxp *p, int f) {
    int inv = 0, power = -1, base = -1;
    for (int round = 0; round < 2; round++) {
        if (p->i < p->n && p->s[p->i] == '^') {
            p->i++;
            if (p->n - p->i >= 4 && memcmp(p->s + p->i, "{-1}", 4) == 0 && fn_names[f].inv >= 0) {
                p->i += 4;
                inv = 1;
            } else if ((power = parse_arg(p)) < 0) {
                return -1;
            }
        } else if (p->i < p->n && p->s[p->i] == '_' && fn_names[f].fn == F_LN) {
            p->i++;
            if ((base = parse_arg(p)) < 0) return -1;
        }
    }
    int arg = parse_fn_arg(p);
    if (arg < 0) return -1;
    int k = node(p, K_FN, arg, -1);
    if (k < 0) return -1;
    p->e->node[k].fn = (unsigned char)(inv ? fn_names[f].inv : fn_names[f].fn);
    if (base >= 0) {
        k = node(p, K_LOG, base, arg);
        if (k < 0) return -1;
    }
    if (power >= 0) k = node(p, K_POW, k, power);
    return k;
}

static int parse_primary(mxp *p) {
    if (++p->depth > MX_MAX_DEPTH) return -1;
    int k = -1;
    const char *s = p->s;
    size_t n = p->n;
    if (p->i >= n) goto out;
    char c = s[p->i];
    if (vx_digit(c) || (c == '.' && p->i + 1 < n && vx_digit(s[p->i + 1]))) {
        k = parse_number(p);
        if (k >= 0 && p->i < n && s[p->i] == '_') k = -1; /* 204_5: a base, not a number here */
    } else if (c == '(') {
        k = parse_group(p, '(', ')');
    } else if (c == '[') {
        k = parse_group(p, '[', ']');
    } else if (c == '{') {
        k = parse_group(p, '{', '}');
    } else if (c == '|') {
        p->i++;
        p->abs_open++;
        int a = parse_expr(p);
        p->abs_open--;
        if (a >= 0 && p->i < n && s[p->i] == '|') {
            p->i++;
            k = node(p, K_ABS, a, -1);
        }
    } else if (vx_alpha(c)) {
        size_t j = p->i;
        while (j < n && vx_alpha(s[j])) j++;
        int f = fn_lookup(s + p->i, j - p->i);
        int run_start = p->i == 0 || !vx_alpha(s[p->i - 1]);
        if (f >= 0 && run_start) {
            p->i = j;
            k = parse_function(p, f);
        } else if (run_start && j - p->i > 2) {
            k = -1; /* a word: text, not a product of letters */
        } else {
            p->i++;
            if (c == 'e' && !(p->i < n && s[p->i] == '_')) k = node(p, K_E, -1, -1);
            else k = var_node(p, p->i - 1, p->i);
        }
    } else if (c == '\\') {
        size_t j = p->i + 1;
        while (j < n && vx_alpha(s[j])) j++;
        const char *w = s + p->i + 1;
        size_t wl = j - p->i - 1;
        int f = fn_lookup(w, wl);
        size_t m;
        if (f >= 0) {
            p->i = j;
            k = parse_function(p, f);
        } else if ((m = cmd_at(p, p->i, "frac")) || (m = cmd_at(p, p->i, "dfrac")) || (m = cmd_at(p, p->i, "tfrac")) ||
                   (m = cmd_at(p, p->i, "cfrac"))) {
            p->i += m;
            int a = parse_arg(p), b = a < 0 ? -1 : parse_arg(p);
            if (b >= 0) k = node(p, K_DIV, a, b);
        } else if ((m = cmd_at(p, p->i, "binom")) || (m = cmd_at(p, p->i, "dbinom")) ||
                   (m = cmd_at(p, p->i, "tbinom"))) {
            p->i += m;
            int a = parse_arg(p), b = a < 0 ? -1 : parse_arg(p);
            if (b >= 0) k = node(p, K_BINOM, a, b);
        } else if ((m = cmd_at(p, p->i, "sqrt"))) {
            p->i += m;
            int idx = -1;
            if (p->i < n && s[p->i] == '[') {
                if ((idx = parse_group(p, '[', ']')) < 0) goto out;
            }
            int a = parse_arg(p);
            if (a >= 0) k = idx >= 0 ? node(p, K_ROOT, idx, a) : node(p, K_SQRT, a, -1);
        } else if ((m = cmd_at(p, p->i, "pi"))) {
            p->i += m;
            k = node(p, K_PI, -1, -1);
        } else if ((m = cmd_at(p, p->i, "infty"))) {
            p->i += m;
            k = node(p, K_INF, -1, -1);
        } else if ((m = cmd_at(p, p->i, "lfloor")) || (m = cmd_at(p, p->i, "lceil"))) {
            int up = s[p->i + 2] == 'c';
            p->i += m;
            int a = parse_expr(p);
            if (a >= 0 && eat(p, up ? "rceil" : "rfloor")) k = node(p, up ? K_CEIL : K_FLOOR, a, -1);
        } else if ((m = cmd_at(p, p->i, "lvert")) || (m = cmd_at(p, p->i, "vert"))) {
            p->i += m;
            int a = parse_expr(p);
            if (a >= 0 && (eat(p, "rvert") || eat(p, "vert"))) k = node(p, K_ABS, a, -1);
        } else if ((m = cmd_at(p, p->i, "left")) || (m = cmd_at(p, p->i, "right"))) {
            p->i += m; /* a sizing word the normal form kept: read what it sizes */
            p->depth--;
            return parse_primary(p);
        } else {
            for (size_t g = 0; g < sizeof greek / sizeof greek[0]; g++)
                if (strlen(greek[g]) == wl && memcmp(greek[g], w, wl) == 0) {
                    p->i = j;
                    k = var_node(p, (size_t)(w - s - 1), j);
                    break;
                }
        }
    }
out:
    p->depth--;
    return k;
}

/* primary, then ! and \% */
static int parse_postfix(mxp *p) {
    int k = parse_primary(p);
    while (k >= 0 && p->i < p->n) {
        if (p->s[p->i] == '!') {
            p->i++;
            k = node(p, K_FACT, k, -1);
        } else if (eat(p, "%")) {
            k = node(p, K_PCT, k, -1);
        } else {
            break;
        }
    }
    return k;
}

static int parse_power(mxp *p) {
    int k = parse_postfix(p);
    if (k < 0 || p->i >= p->n || p->s[p->i] != '^') return k;
    p->i++;
    if (++p->depth > MX_MAX_DEPTH) return -1;
    int x;
    if (p->i < p->n && (p->s[p->i] == '-' || p->s[p->i] == '+')) { /* x^-1 */
        int neg = p->s[p->i++] == '-';
        x = parse_arg(p);
        if (x >= 0 && neg) x = node(p, K_NEG, x, -1);
    } else {
        x = parse_arg(p);
    }
    p->depth--;
    if (x < 0) return -1;
    k = node(p, K_POW, k, x);
    /* a factorial or percent after a power applies to the power */
    while (k >= 0 && p->i < p->n && p->s[p->i] == '!') {
        p->i++;
        k = node(p, K_FACT, k, -1);
    }
    return k;
}

static int parse_unary(mxp *p) {
    if (p->i < p->n && (p->s[p->i] == '-' || p->s[p->i] == '+')) {
        int neg = p->s[p->i++] == '-';
        skip_blank(p);
        if (p->i < p->n && (p->s[p->i] == '-' || p->s[p->i] == '+')) return -1; /* --5 is malformed */
        int k = parse_power(p);
        return k >= 0 && neg ? node(p, K_NEG, k, -1) : k;
    }
    return parse_power(p);
}

/* Can a factor start at i (an implicit product continues)? */
static int starts_factor(const mxp *p, size_t i) {
    if (i >= p->n) return 0;
    char c = p->s[i];
    if (vx_digit(c) || vx_alpha(c) || c == '(' || c == '{') return 1;
    if (c == '|') return p->abs_open == 0;
    if (c != '\\' || i + 1 >= p->n || !vx_alpha(p->s[i + 1])) return 0;
    static const char *const ops[] = {"cdot",  "times", "div",   "ast", "rfloor", "rceil",
                                      "rvert", "vert",  "right", "pm",  "mp"};
    for (size_t k = 0; k < sizeof ops / sizeof ops[0]; k++)
        if (cmd_at(p, i, ops[k])) return 0;
    return 1;
}

static int parse_term(mxp *p) {
    int k = parse_unary(p);
    while (k >= 0 && p->i < p->n) {
        size_t m;
        char c = p->s[p->i];
        int op = 0; /* 1 multiply, 2 divide */
        if (c == '*') op = 1, p->i++;
        else if (c == '/') op = 2, p->i++;
        else if ((m = cmd_at(p, p->i, "cdot")) || (m = cmd_at(p, p->i, "times")) || (m = cmd_at(p, p->i, "ast")))
            op = 1, p->i += m;
        else if ((m = cmd_at(p, p->i, "div"))) op = 2, p->i += m;
        if (op) {
            skip_blank(p);
            int r = parse_unary(p);
            k = r < 0 ? -1 : node(p, op == 1 ? K_MUL : K_DIV, k, r);
            continue;
        }
        size_t j = p->i;
        if (c == ' ') { /* a blank before a digit is two numbers, not a product */
            while (j < p->n && p->s[j] == ' ') j++;
            if (j < p->n && vx_digit(p->s[j])) return -1;
        }
        if (!starts_factor(p, j)) break;
        p->i = j;
        int r = parse_power(p);
        k = r < 0 ? -1 : node(p, K_MUL, k, r);
    }
    return k;
}

static int parse_expr(mxp *p) {
    if (++p->depth > MX_MAX_DEPTH) return -1;
    skip_blank(p);
    int k = parse_term(p);
    while (k >= 0 && p->i < p->n) {
        skip_blank(p);
        if (p->i >= p->n) break;
        char c = p->s[p->i];
        if (c != '+' && c != '-') break;
        p->i++;
        skip_blank(p);
        if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-')) return -1;
        int r = parse_term(p);
        k = r < 0 ? -1 : node(p, c == '+' ? K_ADD : K_SUB, k, r);
    }
    p->depth--;
    return k;
}

mx_expr *mx_parse(const char *s, size_t n) {
    if (!s || n == 0 || n > MX_MAX_LEN) return NULL;
    mx_expr *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    mxp p = {s, n, 0, e, 0, 0};
    int k = parse_expr(&p);
    skip_blank(&p);
    if (k < 0 || p.i != n) {
        mx_free(e);
        return NULL;
    }
    e->root = k;
    /* an infinity only stands alone, signed or not */
    int inf_used = 0;
    for (int j = 0; j < e->nn; j++) inf_used |= e->node[j].kind == K_INF;
    if (inf_used) {
        const mx_node *r = &e->node[k];
        if (r->kind == K_INF) e->inf = 1;
        else if (r->kind == K_NEG && e->node[r->a].kind == K_INF) e->inf = -1;
        else {
            mx_free(e);
            return NULL;
        }
    }
    return e;
}

void mx_free(mx_expr *e) {
    if (!e) return;
    for (int j = 0; j < e->nnum; j++) mpq_clear(e->nums[j]);
    for (int p = 0; p < MX_POINTS; p++)
        if (e->st[p] == 1) v_clear(&e->val[p]);
    free(e->nums);
    free(e->numdec);
    free(e->node);
    free(e);
}

int mx_has_vars(const mx_expr *e) { return e && e->vars; }
int mx_infinite(const mx_expr *e) { return e ? e->inf : 0; }
int mx_decimal(const mx_expr *e) { return e && e->dec; }

/* ---- evaluation ---- */

static uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* x = the value of node k at point pt; 0 when it cannot be evaluated. */
static int eval(const mx_expr *e, int k, int pt, mxv *x, int depth) {
    if (depth > 2 * MX_MAX_DEPTH + 8) return 0; /* deeper than the parser makes */
    const mx_node *d = &e->node[k];
    mxv y;
    int ok = 0;
    long a, b;
    switch (d->kind) {
    case K_NUM:
        x->kind = V_Q;
        mpq_set(x->q, e->nums[d->num]);
        x->dec = e->numdec[d->num];
        return 1;
    case K_PI:
        x->kind = V_R;
        mpfr_const_pi(x->lo, MPFR_RNDD);
        mpfr_const_pi(x->hi, MPFR_RNDU);
        return 1;
    case K_E:
        x->kind = V_R;
        mpfr_set_ui(x->lo, 1, MPFR_RNDN);
        mpfr_exp(x->lo, x->lo, MPFR_RNDD);
        mpfr_set_ui(x->hi, 1, MPFR_RNDN);
        mpfr_exp(x->hi, x->hi, MPFR_RNDU);
        return 1;
    case K_INF:
        x->kind = V_INF;
        x->sign = 1;
        return 1;
    case K_VAR: {
        /* a rational in [0.3, 0.9) with a prime denominator, fixed by the name and the point */
        uint64_t h = mix64(d->h ^ mix64((uint64_t)pt + 1));
        x->kind = V_Q;
        mpq_set_ui(x->q, 300000 + (unsigned long)(h % 600000), 1000003);
        mpq_canonicalize(x->q);
        return 1;
    }
    case K_NEG:
        if (!eval(e, d->a, pt, x, depth + 1)) return 0;
        op_neg(x);
        return 1;
    case K_ABS:
        if (!eval(e, d->a, pt, x, depth + 1) || x->kind == V_INF) return 0;
        if (x->kind == V_Q) {
            mpq_abs(x->q, x->q);
        } else if (mpfr_sgn(x->hi) <= 0) {
            op_neg(x);
        } else if (mpfr_sgn(x->lo) < 0) {
            mpfr_neg(x->lo, x->lo, MPFR_RNDN);
            if (mpfr_less_p(x->hi, x->lo)) mpfr_set(x->hi, x->lo, MPFR_RNDN);
            mpfr_set_zero(x->lo, 1);
        }
        return 1;
    case K_FLOOR:
    case K_CEIL:
        return eval(e, d->a, pt, x, depth + 1) && op_round(x, d->kind == K_CEIL);
    case K_PCT:
        if (!eval(e, d->a, pt, x, depth + 1) || x->kind == V_INF) return 0;
        v_init(&y);
        v_set_ui(&y, 100);
        ok = op_div(x, &y);
        v_clear(&y);
        return ok;
    case K_FN:
        return eval(e, d->a, pt, x, depth + 1) && op_fn(x, d->fn);
    case K_SQRT:
        return eval(e, d->a, pt, x, depth + 1) && op_root(x, 2);
    case K_FACT:
        if (!eval(e, d->a, pt, x, depth + 1) || (a = v_small_int(x, MX_MAX_FACT)) < 0) return 0;
        mpz_fac_ui(mpq_numref(x->q), (unsigned long)a);
        mpz_set_ui(mpq_denref(x->q), 1);
        return v_fit(x);
    default:
        break;
    }
    /* binary nodes */
    if (!eval(e, d->a, pt, x, depth + 1)) return 0;
    v_init(&y);
    if (eval(e, d->b, pt, &y, depth + 1)) {
        switch (d->kind) {
        case K_ADD: ok = op_add(x, &y, 0); break;
        case K_SUB: ok = op_add(x, &y, 1); break;
        case K_MUL: ok = op_mul(x, &y); break;
        case K_DIV: ok = op_div(x, &y); break;
        case K_POW: ok = op_pow(x, &y); break;
        case K_ROOT:
            a = v_small_int(x, MX_MAX_ROOT);
            if (a >= 2) {
                v_copy(x, &y);
                ok = op_root(x, (unsigned long)a);
            }
            break;
        case K_LOG: /* log_x(y) = ln y / ln x */
            ok = op_fn(&y, F_LN) && op_fn(x, F_LN) && op_div(&y, x);
            if (ok) v_copy(x, &y);
            break;
        case K_BINOM:
            a = v_small_int(x, MX_MAX_BITS);
            b = v_small_int(&y, MX_MAX_BITS);
            if (a >= 0 && b >= 0) {
                x->kind = V_Q;
                mpz_bin_uiui(mpq_numref(x->q), (unsigned long)a, (unsigned long)b);
                mpz_set_ui(mpq_denref(x->q), 1);
                ok = v_fit(x);
            }
            break;
        default: break;
        }
    }
    v_clear(&y);
    return ok;
}

/* The cached value of e at point pt, or NULL. */
static const mxv *value_at(mx_expr *e, int pt) {
    if (!e->vars) pt = 0;
    if (e->st[pt] == 0) {
        v_init(&e->val[pt]);
        if (eval(e, e->root, pt, &e->val[pt], 0)) {
            e->st[pt] = 1;
        } else {
            v_clear(&e->val[pt]);
            e->st[pt] = -1;
        }
    }
    return e->st[pt] == 1 ? &e->val[pt] : NULL;
}

/* x = x * num / den, exactly. */
static int scale(mxv *x, long num, long den) {
    if (num == 1 && den == 1) return 1;
    if (x->kind == V_INF) return num > 0;
    mxv y;
    v_init(&y);
    y.kind = V_Q;
    mpq_set_si(y.q, num, (unsigned long)den);
    mpq_canonicalize(y.q);
    int ok = op_mul(x, &y);
    v_clear(&y);
    return ok;
}

/* Does the decimal expansion of q terminate (its denominator is 2^a 5^b)? */
static int terminates(const mpq_t q) {
    mpz_t d, f;
    mpz_init_set(d, mpq_denref(q));
    mpz_init_set_ui(f, 2);
    mpz_remove(d, d, f);
    mpz_set_ui(f, 5);
    mpz_remove(d, d, f);
    int t = mpz_cmp_ui(d, 1) == 0;
    mpz_clears(d, f, (mpz_ptr)0);
    return t;
}

/* The rules of mx_equal for two values; vars: variables were involved. */
static int same_value(mxv *x, mxv *y, int vars) {
    if (x->kind == V_INF || y->kind == V_INF) return x->kind == y->kind && x->sign == y->sign;
    int dec = x->dec || y->dec;
    if (x->kind == V_Q && y->kind == V_Q) {
        if (mpq_equal(x->q, y->q)) return 1;
        if (vars || x->dec == y->dec) return 0;
        /* a decimal against a fraction whose expansion never ends: a rounding of it */
        const mxv *ex = x->dec ? y : x;
        if (terminates(ex->q)) return 0;
        mpq_t d, t, tol;
        mpq_inits(d, t, tol, (mpq_ptr)0);
        mpq_sub(d, x->q, y->q);
        mpq_abs(d, d);
        mpq_abs(t, ex->q);
        mpq_set_ui(tol, 1, 1000000000);
        mpq_mul(t, t, tol);
        int r = mpq_cmp(d, t) <= 0;
        mpq_clears(d, t, tol, (mpq_ptr)0);
        return r;
    }
    v_real(x);
    v_real(y);
    mpfr_t m, t, thr;
    mpfr_inits2(MX_PREC, m, t, thr, (mpfr_ptr)0);
    mpfr_set_zero(m, 1);
    mpfr_ptr b[4] = {x->lo, x->hi, y->lo, y->hi};
    for (int k = 0; k < 4; k++) {
        mpfr_abs(t, b[k], MPFR_RNDN);
        if (mpfr_greater_p(t, m)) mpfr_set(m, t, MPFR_RNDN);
    }
    /* tolerance: relative 1e-9 with a decimal, else 1e-30; plus 2^-300 for noise around zero */
    mpfr_set_d(thr, dec ? 1e-9 : 1e-30, MPFR_RNDU);
    mpfr_mul(thr, thr, m, MPFR_RNDU);
    mpfr_set_ui_2exp(t, 1, -300, MPFR_RNDN);
    mpfr_add(thr, thr, t, MPFR_RNDU);
    int r = 1;
    for (int k = 0; k < 2 && r; k++) { /* each enclosure must be narrow enough to decide */
        mxv *v = k ? y : x;
        mpfr_sub(t, v->hi, v->lo, MPFR_RNDU);
        r = mpfr_lessequal_p(t, thr);
    }
    if (r) {
        mpfr_sub(t, x->lo, y->hi, MPFR_RNDD);
        r = mpfr_lessequal_p(t, thr);
        mpfr_sub(t, y->lo, x->hi, MPFR_RNDD);
        r = r && mpfr_lessequal_p(t, thr);
    }
    mpfr_clears(m, t, thr, (mpfr_ptr)0);
    return r;
}

int mx_equal(mx_expr *a, long an, long ad, mx_expr *b, long bn, long bd) {
    if (!a || !b || ad <= 0 || bd <= 0) return 0;
    int vars = a->vars || b->vars, pts = vars ? MX_POINTS : 1, eq = 1;
    for (int pt = 0; pt < pts && eq; pt++) {
        const mxv *va = value_at(a, pt), *vb = value_at(b, pt);
        if (!va || !vb) return 0;
        mxv x, y;
        v_init(&x);
        v_init(&y);
        v_copy(&x, va);
        v_copy(&y, vb);
        eq = scale(&x, an, ad) && scale(&y, bn, bd) && same_value(&x, &y, vars);
        v_clear(&x);
        v_clear(&y);
    }
    return eq;
}

/* Is v zero, as far as a difference of two values of size about mag can tell? */
static int near_zero(mxv *v, mpfr_t mag) {
    if (v->kind == V_Q) return mpq_sgn(v->q) == 0;
    if (v->kind != V_R || mpfr_sgn(v->lo) > 0 || mpfr_sgn(v->hi) < 0) return 0;
    mpfr_t t;
    mpfr_init2(t, MX_PREC);
    mpfr_mul_d(t, mag, 1e-30, MPFR_RNDU);
    mpfr_t f;
    mpfr_init2(f, MX_PREC);
    mpfr_set_ui_2exp(f, 1, -300, MPFR_RNDN);
    mpfr_add(t, t, f, MPFR_RNDU);
    mpfr_sub(f, v->hi, v->lo, MPFR_RNDU);
    int z = mpfr_lessequal_p(f, t);
    mpfr_clears(t, f, (mpfr_ptr)0);
    return z;
}

/* d = l - r at point pt, and mag = the larger magnitude of the two. */
static int difference(mx_expr *l, mx_expr *r, int pt, mxv *d, mpfr_t mag) {
    const mxv *vl = value_at(l, pt), *vr = value_at(r, pt);
    if (!vl || !vr || vl->kind == V_INF || vr->kind == V_INF) return 0;
    mxv y;
    v_init(&y);
    v_copy(d, vl);
    v_copy(&y, vr);
    mpfr_set_zero(mag, 1);
    mpfr_t t;
    mpfr_init2(t, MX_PREC);
    for (int k = 0; k < 2; k++) {
        mxv *v = k ? &y : d;
        v_real(v);
        mpfr_abs(t, v->lo, MPFR_RNDN);
        if (mpfr_greater_p(t, mag)) mpfr_set(mag, t, MPFR_RNDN);
        mpfr_abs(t, v->hi, MPFR_RNDN);
        if (mpfr_greater_p(t, mag)) mpfr_set(mag, t, MPFR_RNDN);
    }
    mpfr_clear(t);
    v_copy(d, vl); /* back to exact where it was */
    v_copy(&y, vr);
    int ok = op_add(d, &y, 1);
    v_clear(&y);
    return ok;
}

int mx_proportional(mx_expr *al, mx_expr *ar, mx_expr *bl, mx_expr *br, int positive) {
    if (!al || !ar || !bl || !br) return 0;
    if (!(al->vars || ar->vars || bl->vars || br->vars)) return 0;
    mxv f, g, c0, c;
    v_init(&f);
    v_init(&g);
    v_init(&c0);
    v_init(&c);
    mpfr_t mf, mg;
    mpfr_inits2(MX_PREC, mf, mg, (mpfr_ptr)0);
    int ok = 1, have = 0;
    for (int pt = 0; pt < MX_POINTS && ok; pt++) {
        if (!difference(al, ar, pt, &f, mf) || !difference(bl, br, pt, &g, mg)) {
            ok = 0;
            break;
        }
        int zf = near_zero(&f, mf), zg = near_zero(&g, mg);
        if (zf || zg) {
            ok = zf && zg;
            continue;
        }
        v_copy(&c, &f);
        if (!op_div(&c, &g)) {
            ok = 0;
            break;
        }
        if (positive) {
            v_real(&c);
            if (mpfr_sgn(c.lo) <= 0) ok = 0;
        }
        if (!have) {
            v_copy(&c0, &c);
            have = 1;
        } else {
            mxv t;
            v_init(&t);
            v_copy(&t, &c0);
            ok = ok && same_value(&t, &c, 0);
            v_clear(&t);
        }
    }
    mpfr_clears(mf, mg, (mpfr_ptr)0);
    v_clear(&f);
    v_clear(&g);
    v_clear(&c0);
    v_clear(&c);
    return ok;
}
