/* algos/verify_cmp.c — answer equality: the structure of an answer and its comparison by value.
 * See verify.h (verify_equal) for the rules. An answer's normal form is parsed into a small tree —
 * lists, tuples and intervals, sets, unions, matrices, relations, leaves — and two trees are
 * compared; leaves by value through mathexpr.h, or as text when they are not expressions.
 * Sizes are bounded (V_NODES nodes, V_ITEMS items in a collection, V_DEPTH levels), so the
 * pairwise matching of unordered collections stays small. */
#include "verify.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mathexpr.h"

enum { V_NODES = 2048, V_ITEMS = 64, V_DEPTH = 24, V_MAX_PM = 3, V_WORK = 200000 /* comparisons of parts */ };

typedef enum { A_LEAF, A_LIST, A_TUPLE, A_SET, A_UNION, A_MATRIX, A_REL } akind;
typedef enum { R_EQ, R_LT, R_LE, R_GT, R_GE, R_NE } rop;

struct arena;
typedef struct anode {
    akind kind;
    struct arena *ar; /* its arena, which also counts the comparison's work */
    const char *s; /* its text in the normal form */
    size_t n;
    char open, close; /* A_TUPLE: '(' '[' '<' and ')' ']' '>' */
    int rows, cols;   /* A_MATRIX */
    int nkid;
    struct anode **kid;
    rop *op;       /* A_REL: nkid - 1 relations between the parts */
    int pct;       /* A_LEAF: ends in \%; tn is the length without it */
    size_t tn;
    mx_expr *ex;   /* A_LEAF: its expression, parsed on first use */
    int ex_tried;
} anode;

/* Everything one comparison allocates, freed together; work counts calls of same(), so that
 * relations in tuples in relations cannot make the comparison exponential. */
typedef struct arena {
    anode **node;
    int nn, cap;
    char **str;
    int ns, scap;
    int fail;
    long work;
} arena;

static int c_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static int c_digit(char c) { return c >= '0' && c <= '9'; }
static int c_lower(char c) { return c >= 'a' && c <= 'z'; }

static anode *new_node(arena *ar, akind kind, const char *s, size_t n) {
    if (ar->fail || ar->nn >= V_NODES) {
        ar->fail = 1;
        return NULL;
    }
    if (ar->nn == ar->cap) {
        int c = ar->cap ? 2 * ar->cap : 32;
        anode **t = realloc(ar->node, (size_t)c * sizeof *t);
        if (!t) {
            ar->fail = 1;
            return NULL;
        }
        ar->node = t;
        ar->cap = c;
    }
    anode *x = calloc(1, sizeof *x);
    if (!x) {
        ar->fail = 1;
        return NULL;
    }
    x->kind = kind;
    x->ar = ar;
    x->s = s;
    x->n = n;
    ar->node[ar->nn++] = x;
    return x;
}

/* Appends k to x's children (a list child is flattened into a list or a set). */
static int add_kid(arena *ar, anode *x, anode *k, int flatten) {
    if (!k) return 0;
    if (flatten && k->kind == A_LIST) {
        for (int j = 0; j < k->nkid; j++)
            if (!add_kid(ar, x, k->kid[j], 0)) return 0;
        return 1;
    }
    if (x->nkid >= V_ITEMS) {
        ar->fail = 1;
        return 0;
    }
    if (!x->kid) {
        x->kid = calloc(V_ITEMS, sizeof *x->kid);
        if (!x->kid) {
            ar->fail = 1;
            return 0;
        }
    }
    x->kid[x->nkid++] = k;
    return 1;
}

static char *keep_str(arena *ar, char *s) {
    if (!s) {
        ar->fail = 1;
        return NULL;
    }
    if (ar->ns == ar->scap) {
        int c = ar->scap ? 2 * ar->scap : 8;
        char **t = realloc(ar->str, (size_t)c * sizeof *t);
        if (!t) {
            free(s);
            ar->fail = 1;
            return NULL;
        }
        ar->str = t;
        ar->scap = c;
    }
    ar->str[ar->ns++] = s;
    return s;
}

static void arena_free(arena *ar) {
    for (int j = 0; j < ar->nn; j++) {
        mx_free(ar->node[j]->ex);
        free(ar->node[j]->kid);
        free(ar->node[j]->op);
        free(ar->node[j]);
    }
    for (int j = 0; j < ar->ns; j++) free(ar->str[j]);
    free(ar->node);
    free(ar->str);
}

/* ---- scanning at bracket depth 0 ---- */

/* Length of the `\name` command word (or `\` and one character) at s[i]. */
static size_t cmd_len(const char *s, size_t i, size_t b) {
    size_t j = i + 1;
    while (j < b && c_alpha(s[j])) j++;
    if (j == i + 1 && j < b) j++;
    return j - i;
}

static int is_cmd(const char *s, size_t i, size_t b, const char *name) {
    size_t k = strlen(name);
    return s[i] == '\\' && cmd_len(s, i, b) == k + 1 && memcmp(s + i + 1, name, k) == 0;
}

/* How a token at s[i] changes the depth: +1 opener, -1 closer, 0 neither; *len its length. */
static int bracket(const char *s, size_t i, size_t b, size_t *len) {
    char c = s[i];
    *len = 1;
    if (c == '(' || c == '[' || c == '{') return 1;
    if (c == ')' || c == ']' || c == '}') return -1;
    if (c != '\\') return 0;
    *len = cmd_len(s, i, b);
    if (*len == 2 && (s[i + 1] == '{' || s[i + 1] == '}')) return s[i + 1] == '{' ? 1 : -1;
    if (is_cmd(s, i, b, "langle") || is_cmd(s, i, b, "begin") || is_cmd(s, i, b, "lbrace")) return 1;
    if (is_cmd(s, i, b, "rangle") || is_cmd(s, i, b, "end") || is_cmd(s, i, b, "rbrace")) return -1;
    return 0;
}

/* Next position >= i where a token starts at depth 0 and `want` says yes; b when none.
 * want(s, i, b) returns the token's length to accept it, 0 to go on. */
typedef size_t (*top_pred)(const char *s, size_t i, size_t b);
static size_t find_top(const char *s, size_t i, size_t b, top_pred want, size_t *len) {
    int depth = 0;
    while (i < b) {
        size_t l;
        int d = bracket(s, i, b, &l);
        if (d < 0 && depth > 0) depth--;
        if (depth == 0 && d <= 0) {
            size_t k = want(s, i, b);
            if (k) {
                *len = k;
                return i;
            }
        }
        if (d > 0) depth++;
        i += l;
    }
    return b;
}

static size_t want_comma(const char *s, size_t i, size_t b) { return (void)b, s[i] == ',' ? 1 : 0; }
static size_t want_semi(const char *s, size_t i, size_t b) { return (void)b, s[i] == ';' ? 1 : 0; }
static size_t want_cup(const char *s, size_t i, size_t b) { return is_cmd(s, i, b, "cup") ? 4 : 0; }
static size_t want_approx(const char *s, size_t i, size_t b) { return is_cmd(s, i, b, "approx") ? 7 : 0; }
static size_t want_row(const char *s, size_t i, size_t b) {
    return i + 1 < b && s[i] == '\\' && s[i + 1] == '\\' ? 2 : 0;
}
static size_t want_cell(const char *s, size_t i, size_t b) { return (void)b, s[i] == '&' ? 1 : 0; }

/* A relation token at s[i]: its length, and its kind in *r. */
static size_t rel_at(const char *s, size_t i, size_t b, rop *r, int *in) {
    *in = 0;
    char c = s[i];
    if (c == '<' || c == '>') {
        int eq = i + 1 < b && s[i + 1] == '=';
        *r = c == '<' ? (eq ? R_LE : R_LT) : (eq ? R_GE : R_GT);
        return eq ? 2 : 1;
    }
    if (c == '!' && i + 1 < b && s[i + 1] == '=') return *r = R_NE, 2;
    if (c == '=') return *r = R_EQ, 1;
    if (c != '\\') return 0;
    static const struct {
        const char *name;
        rop r;
    } rels[] = {{"le", R_LE}, {"leq", R_LE}, {"leqslant", R_LE}, {"leqq", R_LE}, {"ge", R_GE}, {"geq", R_GE},
                {"geqslant", R_GE}, {"geqq", R_GE}, {"lt", R_LT}, {"gt", R_GT}, {"ne", R_NE}, {"neq", R_NE}};
    for (size_t k = 0; k < sizeof rels / sizeof rels[0]; k++)
        if (is_cmd(s, i, b, rels[k].name)) return *r = rels[k].r, strlen(rels[k].name) + 1;
    if (is_cmd(s, i, b, "in")) return *in = 1, *r = R_EQ, 3;
    return 0;
}

static size_t want_rel(const char *s, size_t i, size_t b) {
    rop r;
    int in;
    return rel_at(s, i, b, &r, &in);
}

static void trim(const char *s, size_t *a, size_t *b) {
    while (*a < *b && s[*a] == ' ') (*a)++;
    while (*b > *a && s[*b - 1] == ' ') (*b)--;
}

/* The end of the bracket group opening at a (index past its closer), or 0. */
static size_t group_end(const char *s, size_t a, size_t b) {
    int depth = 0;
    for (size_t i = a; i < b;) {
        size_t l;
        int d = bracket(s, i, b, &l);
        i += l;
        if (d > 0) depth++;
        else if (d < 0 && --depth == 0) return i;
        if (depth <= 0) return 0;
    }
    return 0;
}

/* ---- names: what may stand left of `=` as a label (x, k, AB, |AB|, f(x), (p,q), a_{37}, A:B) ---- */

static int is_name(const char *s, size_t n) {
    static const char *const not_names[] = {"cdot", "times", "div", "pm", "mp", "sqrt", "infty", "cup", "cap", "sum",
                                            "int", "prod", "lim", "ln", "log", "sin", "cos", "tan", "exp", "pi"};
    int letters = 0, depth = 0;
    for (size_t i = 0; i < n;) {
        char c = s[i];
        if (c == '\\') {
            size_t l = cmd_len(s, i, n);
            for (size_t k = 0; k < sizeof not_names / sizeof not_names[0]; k++)
                if (l == strlen(not_names[k]) + 1 && memcmp(s + i + 1, not_names[k], l - 1) == 0) return 0;
            if (l == 2 && !(s[i + 1] == '{' || s[i + 1] == '}' || s[i + 1] == '|')) return 0;
            letters += l > 2;
            i += l;
        } else if (c_alpha(c)) {
            size_t j = i;
            int lower = 1;
            while (j < n && c_alpha(s[j])) lower &= c_lower(s[j]), j++;
            if (j - i >= 2 && lower && depth == 0) return 0; /* xy is a product */
            letters++;
            i = j;
        } else if (c == '_') {
            i++;
            if (i < n && s[i] == '{') {
                size_t e = group_end(s, i, n);
                if (!e) return 0;
                i = e;
            } else {
                i++;
            }
        } else if (c == '(' || c == '{') {
            depth++;
            i++;
        } else if (c == ')' || c == '}') {
            depth--;
            i++;
        } else if (c == '|' || c == ':' || c == '\'' || c == ' ' || ((c == ',' || c_digit(c)) && depth > 0)) {
            i++;
        } else {
            return 0;
        }
    }
    return letters > 0 && depth == 0;
}

/* ---- parsing ---- */

static anode *parse_answer(arena *ar, const char *s, size_t a, size_t b, int depth);
static anode *parse_item(arena *ar, const char *s, size_t a, size_t b, int depth);

static anode *leaf(arena *ar, const char *s, size_t a, size_t b) {
    anode *x = new_node(ar, A_LEAF, s + a, b - a);
    if (!x) return NULL;
    x->tn = x->n;
    if (x->n >= 2 && memcmp(x->s + x->n - 2, "\\%", 2) == 0) {
        x->pct = 1;
        x->tn = x->n - 2;
        while (x->tn && x->s[x->tn - 1] == ' ') x->tn--;
    }
    return x;
}

/* Elements of a bracket's inside, split at ',' (or ';' when there is no comma). */
static int add_elements(arena *ar, anode *x, const char *s, size_t a, size_t b, int depth) {
    size_t l, k = find_top(s, a, b, want_comma, &l);
    top_pred sep = k < b ? want_comma : want_semi;
    for (size_t i = a;;) {
        size_t e = find_top(s, i, b, sep, &l);
        if (!add_kid(ar, x, parse_item(ar, s, i, e, depth + 1), 1)) return 0;
        if (e >= b) break;
        i = e + l;
    }
    return 1;
}

/* A value: a matrix, a union, a bracketed collection, or a leaf. */
static anode *parse_value(arena *ar, const char *s, size_t a, size_t b, int depth) {
    trim(s, &a, &b);
    if (a >= b || depth > V_DEPTH || ar->fail) return ar->fail = 1, NULL;
    size_t l, k = find_top(s, a, b, want_cup, &l);
    if (k < b) {
        anode *u = new_node(ar, A_UNION, s + a, b - a);
        for (size_t i = a; u;) {
            size_t e = find_top(s, i, b, want_cup, &l);
            if (!add_kid(ar, u, parse_value(ar, s, i, e, depth + 1), 0)) return NULL;
            if (e >= b) break;
            i = e + l;
        }
        return u;
    }
    if (is_cmd(s, a, b, "begin") && a + 7 < b && s[a + 6] == '{') {
        /* \begin{pmatrix} cells & cells \\ ... \end{pmatrix}; an array's column spec goes */
        size_t e = group_end(s, a + 6, b), stop = b;
        if (e && e < b && s[e] == '{' && e - (a + 6) == 7 && memcmp(s + a + 6, "{array}", 7) == 0)
            e = group_end(s, e, b);
        for (size_t j = e; e && j < b; j++)
            if (is_cmd(s, j, b, "end")) stop = j;
        if (!e || stop >= b || group_end(s, a, b) != stop + 4 || group_end(s, stop + 4, b) != b)
            return leaf(ar, s, a, b);
        anode *m = new_node(ar, A_MATRIX, s + a, b - a);
        if (!m) return NULL;
        for (size_t r = e; r < stop;) {
            size_t re = find_top(s, r, stop, want_row, &l);
            size_t ra = r, rb = re;
            trim(s, &ra, &rb);
            if (ra < rb) {
                int cols = 0;
                for (size_t c = ra;;) {
                    size_t ce = find_top(s, c, rb, want_cell, &l);
                    if (!add_kid(ar, m, parse_value(ar, s, c, ce, depth + 1), 0)) return NULL;
                    cols++;
                    if (ce >= rb) break;
                    c = ce + 1;
                }
                if (m->rows && cols != m->cols) return leaf(ar, s, a, b);
                m->cols = cols;
                m->rows++;
            }
            if (re >= stop) break;
            r = re + 2;
        }
        return m;
    }
    size_t ol;
    if (bracket(s, a, b, &ol) > 0 && group_end(s, a, b) == b) {
        char o = s[a];
        size_t cl = 1;
        if (o == '\\') { /* \{ or \langle or \lbrace */
            size_t e = b - 1;
            while (e > a && s[e] != '\\') e--;
            cl = b - e;
        }
        size_t ia = a + ol, ib = b - cl;
        if (o == '{') return parse_answer(ar, s, ia, ib, depth + 1);
        int langle = is_cmd(s, a, b, "langle");
        if (o == '\\' && !langle) { /* a set */
            anode *x = new_node(ar, A_SET, s + a, b - a);
            if (!x) return NULL;
            size_t ta = ia, tb = ib;
            trim(s, &ta, &tb);
            if (ta < tb && !add_elements(ar, x, s, ta, tb, depth)) return NULL;
            return x;
        }
        size_t c1 = find_top(s, ia, ib, want_comma, &l), c2 = find_top(s, ia, ib, want_semi, &l);
        if (langle || c1 < ib || c2 < ib) {
            anode *x = new_node(ar, A_TUPLE, s + a, b - a);
            if (!x) return NULL;
            x->open = langle ? '<' : o;
            x->close = langle ? '>' : s[b - 1];
            if (!add_elements(ar, x, s, ia, ib, depth)) return NULL;
            return x;
        }
    }
    return leaf(ar, s, a, b);
}

/* Replaces the \pm and \mp of s[a..b) with signs, every combination: a list of items. */
static anode *expand_pm(arena *ar, const char *s, size_t a, size_t b, size_t *at, int npm, int depth) {
    anode *list = new_node(ar, A_LIST, s + a, b - a);
    for (int mask = 0; list && mask < (1 << npm); mask++) {
        char *t = keep_str(ar, malloc(b - a + 1));
        if (!t) return NULL;
        size_t w = 0;
        int k = 0;
        for (size_t i = a; i < b;) {
            if (k < npm && i == at[k]) {
                int minus = ((mask >> k) & 1) ^ (s[i + 1] == 'm');
                t[w++] = minus ? '-' : '+';
                i += 3;
                k++;
            } else {
                t[w++] = s[i++];
            }
        }
        t[w] = 0;
        if (!add_kid(ar, list, parse_item(ar, t, 0, w, depth + 1), 1)) return NULL;
    }
    return list;
}

/* One item of a list: a relation chain (x = 3, a < x <= b, x \in S), or a value. */
static anode *parse_item(arena *ar, const char *s, size_t a, size_t b, int depth) {
    trim(s, &a, &b);
    if (a >= b || depth > V_DEPTH || ar->fail) return ar->fail = 1, NULL;
    /* \pm: two answers (x = 1 \pm \sqrt{2}) */
    size_t at[V_MAX_PM];
    int npm = 0;
    for (size_t i = a; i < b; i++) {
        if (s[i] == '\\' && (is_cmd(s, i, b, "pm") || is_cmd(s, i, b, "mp"))) {
            if (npm == V_MAX_PM) return leaf(ar, s, a, b);
            at[npm++] = i;
        }
        if (s[i] == '\\') i += cmd_len(s, i, b) - 1;
    }
    if (npm) return expand_pm(ar, s, a, b, at, npm, depth);
    /* x \approx 11: the exact value before, or the value after a bare name */
    size_t l, k = find_top(s, a, b, want_approx, &l);
    if (k < b) {
        size_t pa = a, pb = k;
        trim(s, &pa, &pb);
        if (pa == pb) return parse_item(ar, s, k + l, b, depth + 1);
        size_t r = find_top(s, a, k, want_rel, &l);
        if (r < k || !is_name(s + pa, pb - pa)) return parse_item(ar, s, a, k, depth + 1);
        char *t = keep_str(ar, malloc(b - a + 2)); /* "x \approx 11" -> "x=11" */
        if (!t) return NULL;
        memcpy(t, s + a, k - a);
        t[k - a] = '=';
        memcpy(t + k - a + 1, s + k + 7, b - k - 7);
        t[b - a - 6] = 0;
        return parse_item(ar, t, 0, b - a - 6, depth + 1);
    }
    size_t r = find_top(s, a, b, want_rel, &l);
    if (r >= b) return parse_value(ar, s, a, b, depth + 1);
    anode *x = new_node(ar, A_REL, s + a, b - a);
    if (!x) return NULL;
    x->op = calloc(V_ITEMS, sizeof *x->op);
    if (!x->op) return ar->fail = 1, NULL;
    for (size_t i = a;;) {
        size_t e = find_top(s, i, b, want_rel, &l);
        rop op = R_EQ;
        int in = 0;
        if (e < b) rel_at(s, e, b, &op, &in);
        if (in) { /* x \in S: S, when x is a name */
            size_t pa = i, pb = e;
            trim(s, &pa, &pb);
            if (x->nkid == 0 && is_name(s + pa, pb - pa) && find_top(s, e + l, b, want_rel, &l) >= b)
                return parse_value(ar, s, e + 3, b, depth + 1);
            return leaf(ar, s, a, b);
        }
        if (!add_kid(ar, x, parse_value(ar, s, i, e, depth + 1), 0)) return NULL;
        if (e >= b) break;
        if (x->nkid >= V_ITEMS) return ar->fail = 1, NULL;
        x->op[x->nkid - 1] = op;
        i = e + l;
    }
    return x;
}

/* Is this item `label = value` (a name on the left of one or more '=')? */
static int labelled(const anode *x) {
    if (x->kind != A_REL) return 0;
    for (int j = 0; j + 1 < x->nkid; j++)
        if (x->op[j] != R_EQ) return 0;
    const anode *l = x->kid[0];
    return l->kind != A_LEAF ? (l->kind == A_TUPLE && is_name(l->s, l->n)) : is_name(l->s, l->n);
}

/* Items separated by ','; in a ';' group, `p=5,q=2` (distinct labels) is the tuple (5,2). */
static anode *parse_commas(arena *ar, const char *s, size_t a, size_t b, int depth, int semi_group) {
    size_t l, k = find_top(s, a, b, want_comma, &l);
    if (k >= b) return parse_item(ar, s, a, b, depth + 1);
    anode *x = new_node(ar, A_LIST, s + a, b - a);
    for (size_t i = a; x;) {
        size_t e = find_top(s, i, b, want_comma, &l);
        if (!add_kid(ar, x, parse_item(ar, s, i, e, depth + 1), 1)) return NULL;
        if (e >= b) break;
        i = e + 1;
    }
    if (x && semi_group && x->nkid >= 2) {
        int all = 1;
        for (int j = 0; j < x->nkid && all; j++) all = labelled(x->kid[j]);
        for (int j = 0; j < x->nkid && all; j++)
            for (int m = j + 1; m < x->nkid && all; m++)
                all = !(x->kid[j]->kid[0]->n == x->kid[m]->kid[0]->n &&
                        memcmp(x->kid[j]->kid[0]->s, x->kid[m]->kid[0]->s, x->kid[j]->kid[0]->n) == 0);
        if (all) {
            anode *t = new_node(ar, A_TUPLE, s + a, b - a);
            if (!t) return NULL;
            t->open = '(';
            t->close = ')';
            for (int j = 0; j < x->nkid; j++)
                if (!add_kid(ar, t, x->kid[j]->kid[x->kid[j]->nkid - 1], 0)) return NULL;
            return t;
        }
    }
    return x;
}

/* A whole answer: ';'-separated groups of ','-separated items. */
static anode *parse_answer(arena *ar, const char *s, size_t a, size_t b, int depth) {
    trim(s, &a, &b);
    if (a >= b || depth > V_DEPTH || ar->fail) return ar->fail = 1, NULL;
    size_t l, k = find_top(s, a, b, want_semi, &l);
    if (k >= b) return parse_commas(ar, s, a, b, depth, 0);
    anode *x = new_node(ar, A_LIST, s + a, b - a);
    for (size_t i = a; x;) {
        size_t e = find_top(s, i, b, want_semi, &l);
        if (!add_kid(ar, x, parse_commas(ar, s, i, e, depth + 1, 1), 1)) return NULL;
        if (e >= b) break;
        i = e + 1;
    }
    return x;
}

/* ---- comparison: p is the prediction's side, l the label's ---- */

static int same(anode *p, anode *l, int depth);

static int text_eq(const char *a, size_t an, const char *b, size_t bn) {
    if (an != bn) return 0;
    if (memcmp(a, b, an) == 0) return 1;
    /* words compare without case (Even, even); symbols and short names (AB, ab) keep it */
    if (an < 3) return 0;
    for (size_t i = 0; i < an; i++) {
        char x = a[i], y = b[i];
        if (!(c_alpha(x) || x == ' ') || !(c_alpha(y) || y == ' ')) return 0;
        if ((x | 0x20) != (y | 0x20)) return 0;
    }
    return 1;
}

static mx_expr *leaf_expr(anode *x) {
    if (!x->ex_tried) {
        x->ex_tried = 1;
        x->ex = mx_parse(x->s, x->tn);
    }
    return x->ex;
}

/* Leaves: by value when both are expressions, else as text. A trailing % is x/100, and a
 * number with a percent also matches the same number written without it (10% and 10: the
 * label or the answer dropped the sign), so 10% = 0.1 = 10 but 10 != 100%. Symmetric. */
static int same_leaf(anode *p, anode *l) {
    if (text_eq(p->s, p->n, l->s, l->n)) return 1;
    if (p->pct != l->pct && text_eq(p->s, p->tn, l->s, l->tn)) return 1;
    mx_expr *a = leaf_expr(p), *b = leaf_expr(l);
    if (!a || !b) return 0;
    if (p->pct == l->pct) return mx_equal(a, 1, 1, b, 1, 1);
    return p->pct ? mx_equal(a, 1, 100, b, 1, 1) : mx_equal(a, 1, 1, b, 1, 100);
}

/* The value of a labelled item (x = 3 -> 3; x = 1 + 2 = 3 -> 3), else NULL. */
static anode *value_of(anode *x) { return labelled(x) ? x->kid[x->nkid - 1] : NULL; }

static int label_eq(const anode *a, const anode *b) {
    return text_eq(a->kid[0]->s, a->kid[0]->n, b->kid[0]->s, b->kid[0]->n);
}

/* Relations: '>' chains turn around to '<'; equations compare as a label's value, or as
 * lhs - rhs proportional (any constant for '=' and '!=', a positive one for inequalities), or
 * part by part. */
static int same_rel(anode *p, anode *l, int depth) {
    if (labelled(p) && labelled(l) && label_eq(p, l)) return same(value_of(p), value_of(l), depth + 1);
    anode *pp[V_ITEMS], *lp[V_ITEMS];
    rop po[V_ITEMS], lo[V_ITEMS];
    int pn = p->nkid, ln = l->nkid;
    for (int side = 0; side < 2; side++) {
        anode *x = side ? l : p, **parts = side ? lp : pp;
        rop *ops = side ? lo : po;
        int n = x->nkid, down = 1, eq = 1;
        for (int j = 0; j + 1 < n; j++) {
            down &= x->op[j] == R_GT || x->op[j] == R_GE;
            eq &= x->op[j] == R_EQ;
        }
        if (eq && n > 2) { /* a = b = c: the first and the last */
            parts[0] = x->kid[0];
            parts[1] = x->kid[n - 1];
            ops[0] = R_EQ;
            if (side) ln = 2;
            else pn = 2;
            continue;
        }
        for (int j = 0; j < n; j++) parts[j] = x->kid[down ? n - 1 - j : j];
        for (int j = 0; j + 1 < n; j++) {
            rop o = x->op[down ? n - 2 - j : j];
            ops[j] = !down ? o : o == R_GT ? R_LT : R_LE;
        }
    }
    if (pn != ln) return 0;
    for (int j = 0; j + 1 < pn; j++)
        if (po[j] != lo[j]) return 0;
    if (pn == 2) {
        anode *a = pp[0], *b = pp[1], *c = lp[0], *d = lp[1];
        if (a->kind == A_LEAF && b->kind == A_LEAF && c->kind == A_LEAF && d->kind == A_LEAF && !a->pct && !b->pct &&
            !c->pct && !d->pct) {
            mx_expr *ea = leaf_expr(a), *eb = leaf_expr(b), *ec = leaf_expr(c), *ed = leaf_expr(d);
            if (ea && eb && ec && ed && mx_proportional(ea, eb, ec, ed, po[0] != R_EQ && po[0] != R_NE)) return 1;
        }
        if (same(a, c, depth + 1) && same(b, d, depth + 1)) return 1;
        return (po[0] == R_EQ || po[0] == R_NE) && same(a, d, depth + 1) && same(b, c, depth + 1);
    }
    for (int j = 0; j < pn; j++)
        if (!same(pp[j], lp[j], depth + 1)) return 0;
    return 1;
}

/* An interval bound against a tuple element: a value, or an infinity (sign inf, x NULL). */
static int same_bound(anode *k, anode *x, int inf, int depth) {
    if (x) return same(k, x, depth + 1);
    if (k->kind != A_LEAF) return 0;
    mx_expr *e = leaf_expr(k);
    return e && mx_infinite(e) == inf;
}

/* A relation on one name (a < x <= b, x > 3, 3 <= x) against an interval (a, b], [3, \infty). */
static int rel_interval(anode *r, anode *t, int depth) {
    if (t->kind != A_TUPLE || t->nkid != 2) return 0;
    if ((t->open != '(' && t->open != '[') || (t->close != ')' && t->close != ']')) return 0;
    int n = r->nkid, up = 1, down = 1;
    for (int j = 0; j + 1 < n; j++) {
        up &= r->op[j] == R_LT || r->op[j] == R_LE;
        down &= r->op[j] == R_GT || r->op[j] == R_GE;
    }
    if (!(up || down) || n < 2 || n > 3) return 0;
    anode *part[3];
    int strict[2];
    for (int j = 0; j < n; j++) part[j] = r->kid[down ? n - 1 - j : j];
    for (int j = 0; j + 1 < n; j++) {
        rop o = r->op[down ? n - 2 - j : j];
        strict[j] = o == R_LT || o == R_GT;
    }
    anode *lo = NULL, *hi = NULL;
    int lo_open = 1, hi_open = 1;
    if (n == 3) {
        if (!is_name(part[1]->s, part[1]->n)) return 0;
        lo = part[0];
        hi = part[2];
        lo_open = strict[0];
        hi_open = strict[1];
    } else if (is_name(part[0]->s, part[0]->n)) {
        hi = part[1];
        hi_open = strict[0];
    } else if (is_name(part[1]->s, part[1]->n)) {
        lo = part[0];
        lo_open = strict[0];
    } else {
        return 0;
    }
    if ((t->open == '(') != lo_open || (t->close == ')') != hi_open) return 0;
    return same_bound(t->kid[0], lo, -1, depth) && same_bound(t->kid[1], hi, 1, depth);
}

/* Does items[k] repeat an earlier item? */
static int repeats(anode **it, int k, int depth) {
    for (int j = 0; j < k; j++)
        if (same(it[k], it[j], depth + 1)) return 1;
    return 0;
}

/* Kuhn's augmenting path from label item j in the equality matrix eq[p][l]. */
static int augment(const unsigned char (*eq)[V_ITEMS], int np, int j, int *owner, unsigned char *seen) {
    for (int m = 0; m < np; m++) {
        if (!eq[m][j] || seen[m]) continue;
        seen[m] = 1;
        if (owner[m] < 0 || augment(eq, np, owner[m], owner, seen)) {
            owner[m] = j;
            return 1;
        }
    }
    return 0;
}

/* Unordered collections: a perfect matching of equal items, so the answer does not depend on
 * the order either side lists them in. Sets drop repeats first; lists keep them (1, 1, 2 is
 * not 1, 2: a multiplicity counts). */
static int match_unordered(anode **p, int np, anode **l, int nl, int set, int depth) {
    anode *pu[V_ITEMS], *lu[V_ITEMS];
    int pun = 0, lun = 0;
    for (int j = 0; j < np; j++)
        if (!set || !repeats(p, j, depth)) pu[pun++] = p[j];
    for (int j = 0; j < nl; j++)
        if (!set || !repeats(l, j, depth)) lu[lun++] = l[j];
    if (pun != lun) return 0;
    unsigned char eq[V_ITEMS][V_ITEMS], seen[V_ITEMS];
    int owner[V_ITEMS];
    for (int m = 0; m < pun; m++) {
        owner[m] = -1;
        for (int j = 0; j < lun; j++) eq[m][j] = (unsigned char)same(pu[m], lu[j], depth + 1);
    }
    for (int j = 0; j < lun; j++) {
        memset(seen, 0, sizeof seen);
        if (!augment((const unsigned char (*)[V_ITEMS])eq, pun, j, owner, seen)) return 0;
    }
    return 1;
}

/* A list against anything: label by label when both are fully labelled with the same labels;
 * in order against a tuple; as sets against a set; else unordered. */
static int same_list(anode *p, anode *l, int depth) {
    anode *one_p[1] = {p}, *one_l[1] = {l};
    anode **pi = p->kind == A_LIST ? p->kid : one_p, **li = l->kind == A_LIST ? l->kid : one_l;
    int np = p->kind == A_LIST ? p->nkid : 1, nl = l->kind == A_LIST ? l->nkid : 1;
    if (p->kind == A_TUPLE || l->kind == A_TUPLE) { /* (1, 3) against 1, 3: in order */
        anode *t = p->kind == A_TUPLE ? p : l;
        anode **it = p->kind == A_TUPLE ? li : pi;
        int n = p->kind == A_TUPLE ? nl : np;
        if (n != t->nkid) return 0;
        for (int j = 0; j < n; j++) {
            anode *v = value_of(it[j]) ? value_of(it[j]) : it[j];
            if (!(p->kind == A_TUPLE ? same(t->kid[j], v, depth + 1) : same(v, t->kid[j], depth + 1))) return 0;
        }
        return 1;
    }
    int all = np == nl;
    for (int j = 0; j < np && all; j++) all = labelled(pi[j]);
    for (int j = 0; j < nl && all; j++) all = labelled(li[j]);
    for (int j = 0; j < nl && all; j++)
        for (int m = j + 1; m < nl && all; m++) all = !label_eq(li[j], li[m]);
    if (all) {
        for (int j = 0; j < nl; j++) {
            int found = 0;
            for (int m = 0; m < np && !found; m++)
                if (label_eq(pi[m], li[j])) {
                    if (!same(value_of(pi[m]), value_of(li[j]), depth + 1)) return 0;
                    found = 1;
                }
            if (!found) return 0;
        }
        return 1;
    }
    anode *pv[V_ITEMS], *lv[V_ITEMS];
    for (int j = 0; j < np; j++) pv[j] = value_of(pi[j]) ? value_of(pi[j]) : pi[j];
    for (int j = 0; j < nl; j++) lv[j] = value_of(li[j]) ? value_of(li[j]) : li[j];
    if (p->kind == A_SET || l->kind == A_SET) /* a list against a set: both as sets */
        return match_unordered(p->kind == A_SET ? p->kid : pv, p->kind == A_SET ? p->nkid : np,
                               l->kind == A_SET ? l->kid : lv, l->kind == A_SET ? l->nkid : nl, 1, depth);
    if (np == 1 && nl == 1) return same(pv[0], lv[0], depth + 1);
    return match_unordered(pv, np, lv, nl, 0, depth);
}

static int same(anode *p, anode *l, int depth) {
    if (!p || !l || depth > 3 * V_DEPTH || ++p->ar->work > V_WORK) return 0;
    if (p->n == l->n && memcmp(p->s, l->s, p->n) == 0) return 1;
    if (p->kind == A_REL || l->kind == A_REL) {
        if (p->kind == A_REL && l->kind == A_REL) return same_rel(p, l, depth);
        anode *r = p->kind == A_REL ? p : l, *o = r == p ? l : p, *v = value_of(r);
        if (v) return r == p ? same(v, o, depth + 1) : same(o, v, depth + 1);
        return rel_interval(r, o, depth);
    }
    if (p->kind == A_LIST || l->kind == A_LIST) return same_list(p, l, depth);
    if (p->kind == A_SET && l->kind == A_SET) return match_unordered(p->kid, p->nkid, l->kid, l->nkid, 1, depth);
    if (p->kind == A_SET && p->nkid == 1 && l->kind != A_SET) return same(p->kid[0], l, depth + 1);
    if (l->kind == A_SET && l->nkid == 1 && p->kind != A_SET) return same(p, l->kid[0], depth + 1);
    if (p->kind != l->kind) return 0;
    switch (p->kind) {
    case A_LEAF: return same_leaf(p, l);
    case A_TUPLE:
        if (p->open != l->open || p->close != l->close || p->nkid != l->nkid) return 0;
        for (int j = 0; j < p->nkid; j++)
            if (!same(p->kid[j], l->kid[j], depth + 1)) return 0;
        return 1;
    case A_UNION: return match_unordered(p->kid, p->nkid, l->kid, l->nkid, 0, depth);
    case A_MATRIX:
        if (p->rows != l->rows || p->cols != l->cols || p->nkid != l->nkid) return 0;
        for (int j = 0; j < p->nkid; j++)
            if (!same(p->kid[j], l->kid[j], depth + 1)) return 0;
        return 1;
    default: return 0;
    }
}

int verify_equal(const char *pred, const char *label) {
    if (!pred || !label) return 0;
    size_t cp = strlen(pred) + 1, cl = strlen(label) + 1;
    /* the normal form of a text can be longer than the text (\frac12 -> \frac{1}{2}) */
    if (cp > (SIZE_MAX - 64) / 4 || cl > (SIZE_MAX - 64) / 4) return 0;
    cp = 4 * cp + 64;
    cl = 4 * cl + 64;
    char *a = malloc(cp), *b = malloc(cl);
    int eq = 0;
    if (a && b && verify_normalize(pred, a, cp) == 0 && verify_normalize(label, b, cl) == 0 && a[0] && b[0]) {
        if (strcmp(a, b) == 0) {
            eq = 1;
        } else {
            arena ar = {0};
            size_t na = strlen(a), nb = strlen(b);
            anode *x = parse_answer(&ar, a, 0, na, 0), *y = ar.fail ? NULL : parse_answer(&ar, b, 0, nb, 0);
            if (x && y && !ar.fail) eq = same(x, y, 0);
            arena_free(&ar);
        }
    }
    free(a);
    free(b);
    return eq;
}
