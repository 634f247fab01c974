/* algos/verify.c — answer extraction, the normal form and answer equality. See verify.h.
 * Every pass reads one buffer and writes another through a bounded writer, in one sweep
 * (brace matches are precomputed), so a 100 KB response costs linear time; recursion into
 * brace groups stops at V_MAX_DEPTH, past which text is copied as it is. */
#include "verify.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { V_MAX_DEPTH = 32 };

/* ---- small helpers (no <ctype.h>: it is undefined for negative chars) ---- */

static int v_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static int v_digit(char c) { return c >= '0' && c <= '9'; }
static int v_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
static char v_lower(char c) { return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c; }

/* A bounded writer: a write that would not leave room for the NUL sets `over` instead. */
typedef struct {
    char *p;
    size_t n, cap;
    int over;
} vbuf;

static void vb_put(vbuf *b, const char *s, size_t n) {
    if (b->over || n >= b->cap - b->n) {
        b->over = 1;
        return;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}
static void vb_putc(vbuf *b, char c) { vb_put(b, &c, 1); }

/* Length of `\name` at s[i] when it is there as a whole command word (no letter after). */
static size_t v_cmd(const char *s, size_t i, size_t n, const char *name) {
    size_t k = strlen(name);
    if (i >= n || s[i] != '\\' || n - i - 1 < k || memcmp(s + i + 1, name, k) != 0) return 0;
    if (i + 1 + k < n && v_alpha(s[i + 1 + k])) return 0;
    return 1 + k;
}

/* Index of the '}' that closes the '{' at s[i], or n when it never closes.
 * `\{`, `\}` and `\\` are text, not structure. */
static size_t v_close(const char *s, size_t i, size_t n) {
    size_t depth = 0;
    for (size_t j = i; j < n; j++) {
        if (s[j] == '\\') {
            j++;
        } else if (s[j] == '{') {
            depth++;
        } else if (s[j] == '}' && depth && --depth == 0) {
            return j;
        }
    }
    return n;
}

/* match[i] = v_close(s, i, n) for every unescaped '{', in one sweep (n elsewhere). */
static size_t *v_matches(const char *s, size_t n) {
    size_t *m = malloc(2 * (n + 1) * sizeof *m);
    if (!m) return NULL;
    size_t *stack = m + n + 1, sp = 0;
    for (size_t i = 0; i < n; i++) m[i] = n;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\\') {
            i++;
        } else if (s[i] == '{') {
            stack[sp++] = i;
        } else if (s[i] == '}' && sp) {
            m[stack[--sp]] = i;
        }
    }
    return m;
}

/* Copies len bytes as a string: 1, or -1 (out = "") when cap is too small. */
static int v_copy_out(char *out, size_t cap, const char *s, size_t len) {
    if (len >= cap) {
        out[0] = 0;
        return -1;
    }
    memcpy(out, s, len);
    out[len] = 0;
    return 1;
}

/* ---- extraction ---- */

/* "answer" then ':' at s[p] (any case, markdown stars allowed around the colon);
 * returns the index just past it, or 0. */
static size_t v_answer_tag(const char *s, size_t p, size_t le) {
    static const char tag[] = "answer";
    if (le - p < 7) return 0;
    for (size_t k = 0; k < 6; k++)
        if (v_lower(s[p + k]) != tag[k]) return 0;
    size_t q = p + 6;
    while (q < le && s[q] == '*') q++;
    if (q >= le || s[q] != ':') return 0;
    q++;
    while (q < le && s[q] == '*') q++;
    return q;
}

/* A box: its command at `at`, its content s[c0..c1), and the index past it. */
typedef struct {
    size_t at, c0, c1, end;
} vbox;

/* The box whose command (klen bytes) starts at i and whose braces close before `lim`: 1, or 0 when
 * it has no argument or its braces do not close there. */
static int v_box(const char *s, size_t lim, size_t i, size_t klen, vbox *b) {
    size_t j = i + klen;
    int spaced = 0;
    while (j < lim && v_space(s[j])) {
        j++;
        spaced = 1;
    }
    b->at = i;
    if (j < lim && s[j] == '{') {
        size_t c = v_close(s, j, lim);
        if (c == lim) return 0;
        b->c0 = j + 1;
        b->c1 = c;
        b->end = c + 1;
        return 1;
    }
    if (!spaced || j == lim) return 0;
    size_t e = j; /* \boxed 5: the token after the blank */
    while (e < lim && !v_space(s[e]) && s[e] != '$') e++;
    b->c0 = j;
    b->c1 = e;
    b->end = e;
    return 1;
}

/* Words that revise an answer: a box after them replaces the one before ("\boxed{3}, no wait,
 * \boxed{4}"), so the two are not one answer. */
static const char *const v_revise[] = {
    "but",     "wait",    "then",    "actually", "however", "instead", "correct", "corrected", "correction",
    "final",   "finally", "so",      "thus",     "therefore", "hence", "answer",  "no",        "not",
    "mistake", "oops",    "check",   "recheck",  "again",   "sorry",   "hmm",     "rather",    "wrong",
    "error",   "revise",  "revised", "redo",     "recompute", "recalculate", "earlier", "previous", "should",
    "is",      "was",     "be",      "let",      "means",
};

/* May the text s[a..b) between two boxes join them into one answer? It may when it only spaces
 * them (\quad, $, punctuation) or lists them (",", "and", "or", a few words such as "papers and"),
 * with no digits and no revising word. */
static int v_links(const char *s, size_t a, size_t b) {
    static const char *const neutral[] = {"quad", "qquad", "text", "textbf", "textit", "textrm", "mbox",
                                          "mathrm", "displaystyle", "left", "right", "hspace"};
    if (b - a > 200) return 0;
    int words = 0, sep = 0;
    size_t len = 0;
    for (size_t i = a; i < b;) {
        char c = s[i];
        if (c == '\\') {
            size_t j = i + 1;
            while (j < b && v_alpha(s[j])) j++;
            if (j > i + 1) {
                int ok = 0;
                for (size_t k = 0; !ok && k < sizeof neutral / sizeof neutral[0]; k++)
                    ok = strlen(neutral[k]) == j - i - 1 && memcmp(neutral[k], s + i + 1, j - i - 1) == 0;
                if (!ok) return 0;
            } else {
                j = i + 2 < b ? i + 2 : b; /* \( \) \[ \] \, \\ */
            }
            i = j;
            continue;
        }
        if (v_space(c) || c == '$' || c == '{' || c == '}' || c == '.' || c == '*' || c == ':') {
            i++;
            continue;
        }
        if (c == '_') { /* y_2 = \boxed{..}: a subscript, not a number */
            i++;
            if (i < b && s[i] == '{') {
                while (i < b && s[i] != '}') i++;
            }
            i++;
            continue;
        }
        if (v_digit(c)) return 0;
        if (v_alpha(c)) {
            size_t j = i;
            while (j < b && v_alpha(s[j])) j++;
            for (size_t k = 0; k < sizeof v_revise / sizeof v_revise[0]; k++) {
                size_t m = strlen(v_revise[k]), t = 0;
                while (m == j - i && t < m && v_lower(s[i + t]) == v_revise[k][t]) t++;
                if (m == j - i && t == m) return 0;
            }
            if ((j - i == 3 && v_lower(s[i]) == 'a' && v_lower(s[i + 1]) == 'n' && v_lower(s[i + 2]) == 'd') ||
                (j - i == 2 && v_lower(s[i]) == 'o' && v_lower(s[i + 1]) == 'r'))
                sep = 1;
            words++;
            len += j - i;
            i = j;
            continue;
        }
        if (c == ',' || c == ';' || c == '&') sep = 1;
        len++;
        i++;
    }
    if (!words) return len < 20;
    return sep && words <= 6 && len < 70;
}

enum { V_MAX_BOXES = 16 };

/* The boxed answer of s[from..n): the last box, with the boxes just before it that v_links joins
 * (repeats dropped), written "{a}, {b}" when there are several. 1, 0 when the last box is
 * truncated or absent (-2: no box at all), -1 when cap is too small. */
static int v_boxed(const char *s, size_t from, size_t n, char *out, size_t cap) {
    size_t last = n, klen = 0;
    for (size_t i = from; i < n; i++) {
        if (s[i] != '\\') continue;
        size_t k = v_cmd(s, i, n, "boxed");
        if (!k) k = v_cmd(s, i, n, "fbox");
        if (k) {
            last = i;
            klen = k;
        }
    }
    if (last == n) return -2;
    vbox part[V_MAX_BOXES];
    int np = 0;
    if (!v_box(s, n, last, klen, &part[np])) return 0; /* a truncated box is no answer */
    np++;
    /* walk back over the boxes before it while the text between links them */
    for (size_t i = last; i > from && np < V_MAX_BOXES;) {
        i--;
        if (s[i] != '\\') continue;
        size_t k = v_cmd(s, i, n, "boxed");
        if (!k) k = v_cmd(s, i, n, "fbox");
        if (!k) continue;
        vbox b;
        size_t head = part[np - 1].at;
        if (!v_box(s, head, i, k, &b) || !v_links(s, b.end, head)) break;
        const vbox *prev = &part[np - 1];
        if (b.c1 - b.c0 == prev->c1 - prev->c0 && memcmp(s + b.c0, s + prev->c0, b.c1 - b.c0) == 0)
            part[np - 1].at = b.at; /* the same answer again */
        else
            part[np++] = b;
    }
    if (np == 1) return v_copy_out(out, cap, s + part[0].c0, part[0].c1 - part[0].c0);
    size_t w = 0;
    for (int j = np - 1; j >= 0; j--) {
        size_t len = part[j].c1 - part[j].c0;
        if (len + (j ? 5 : 3) > cap - w) { /* "{..}, " or "{..}" and the NUL */
            out[0] = 0;
            return -1;
        }
        out[w++] = '{';
        memcpy(out + w, s + part[j].c0, len);
        w += len;
        out[w++] = '}';
        if (j) {
            out[w++] = ',';
            out[w++] = ' ';
        }
    }
    out[w] = 0;
    return 1;
}

/* The rest of the last line holding "Answer:" at its start (after blanks, '*', '#') or after a
 * sentence's end ("... so. Answer: 5"); a == b when there is none. */
static int v_answer_line(const char *s, size_t from, size_t n, size_t *a, size_t *b) {
    int found = 0;
    for (size_t ls = from; ls < n;) {
        size_t le = ls;
        while (le < n && s[le] != '\n') le++;
        size_t p = ls;
        while (p < le && (s[p] == ' ' || s[p] == '\t' || s[p] == '*' || s[p] == '#')) p++;
        for (size_t t = p; t < le; t++) {
            if (v_lower(s[t]) != 'a') continue;
            int start = t == p;
            if (!start && t >= ls + 2 && s[t - 1] == ' ') {
                size_t u = t - 1;
                while (u > ls && s[u - 1] == ' ') u--;
                start = u > ls && (s[u - 1] == '.' || s[u - 1] == '!' || s[u - 1] == '?');
            }
            size_t q = start ? v_answer_tag(s, t, le) : 0;
            if (q) {
                found = 1;
                *a = q;
                *b = le;
            }
        }
        ls = le + 1;
    }
    return found;
}

/* The last number of s[from..n): 12, -3, 1,234.5, 3/4. */
static int v_last_number(const char *s, size_t from, size_t n, size_t *a, size_t *b) {
    size_t e = n;
    while (e > from && !v_digit(s[e - 1])) e--;
    if (e == from) return 0;
    size_t i = e;
    for (;;) {
        while (i > from && v_digit(s[i - 1])) i--;
        /* one '.', a thousands ',' (three digits after it) or a '/' between digits continues it */
        if (i >= from + 2 && v_digit(s[i - 2]) &&
            (s[i - 1] == '.' || s[i - 1] == '/' ||
             (s[i - 1] == ',' && e - i >= 3 && v_digit(s[i]) && v_digit(s[i + 1]) && v_digit(s[i + 2]) &&
              (i + 3 == e || !v_digit(s[i + 3]))))) {
            i--;
            continue;
        }
        break;
    }
    if (i > from && v_alpha(s[i - 1])) return 0; /* x2, a part of a name */
    if (i > from && s[i - 1] == '-' && (i - 1 == from || !(v_digit(s[i - 2]) || v_alpha(s[i - 2])))) i--;
    *a = i;
    *b = e;
    return 1;
}

int verify_extract_opts(const char *response, const verify_options *opt, char *out, size_t cap) {
    if (!out || !cap) return -1;
    out[0] = 0;
    if (!response) return 0;
    const char *s = response;
    size_t n = strlen(s), from = 0;
    /* a reasoning model's answer follows its thinking */
    for (const char *t = s; (t = strstr(t, "</think>")) != NULL; t += 8) from = (size_t)(t - s) + 8;
    int r = v_boxed(s, from, n, out, cap);
    if (r != -2) return r;
    size_t a, b;
    if (!v_answer_line(s, from, n, &a, &b)) {
        if (!(opt && opt->fallback_last_number) || !v_last_number(s, from, n, &a, &b)) return 0;
    }
    while (a < b && v_space(s[a])) a++;
    while (b > a && v_space(s[b - 1])) b--;
    return v_copy_out(out, cap, s + a, b - a);
}

int verify_extract(const char *response, char *out, size_t cap) {
    return verify_extract_opts(response, NULL, out, cap);
}

/* ---- normalisation passes: each reads s[0..n) and writes o ---- */

/* A doubled backslash before a command word (\\frac, from over-escaped JSON) is one backslash,
 * except in a matrix or array, where \\ ends a row. */
static void v_pass_slashes(const char *s, size_t n, vbuf *o) {
    int table = memmem(s, n, "matrix", 6) || memmem(s, n, "array", 5) || memmem(s, n, "cases", 5) ||
                memmem(s, n, "align", 5);
    for (size_t i = 0; i < n; i++) {
        if (!table && s[i] == '\\' && i + 2 < n && s[i + 1] == '\\' && v_alpha(s[i + 2])) continue;
        vb_putc(o, s[i]);
    }
}

static const char *const v_wrappers[] = {"text",   "textbf", "textit", "textrm", "textnormal",
                                         "mathrm", "mathbf", "mathit", "mbox",   "hbox"};

/* Words that only name a unit; a \text{} of these (or trailing after a number) is dropped.
 * Single letters (m, s, g) are here because after a number they are units in practice. */
static const char *const v_units[] = {
    "cm",      "mm",      "km",      "m",           "meter",       "meters",     "metre",      "metres",
    "centimeter", "centimeters", "kilometer", "kilometers", "millimeter", "millimeters", "in", "inch",
    "inches",  "ft",      "foot",    "feet",        "yd",          "yard",       "yards",      "mi",
    "mile",    "miles",   "unit",    "units",       "dollar",      "dollars",    "cent",       "cents",
    "degree",  "degrees", "hour",    "hours",       "hr",
    "hrs",     "minute",  "minutes", "min",         "mins",        "second",     "seconds",    "sec",
    "s",       "day",     "days",    "week",        "weeks",       "month",      "months",     "year",
    "years",   "sq",      "square",  "cubic",       "kg",          "g",          "gram",       "grams",
    "lb",      "lbs",     "pound",   "pounds",      "liter",       "liters",     "litre",      "litres",
    "mph",     "radians", "rad",
};

/* One word a unit? A trailing '.', ^2, ^3, ^{2}, ^{3} is allowed ("in.", "cm^2"). */
static int v_unit_word(const char *w, size_t k) {
    if (k && w[k - 1] == '.') k--;
    if (k > 2 && w[k - 2] == '^' && (w[k - 1] == '2' || w[k - 1] == '3')) k -= 2;
    if (k > 4 && w[k - 4] == '^' && w[k - 3] == '{' && (w[k - 2] == '2' || w[k - 2] == '3') && w[k - 1] == '}')
        k -= 4;
    if (!k) return 0;
    for (size_t u = 0; u < sizeof v_units / sizeof v_units[0]; u++) {
        size_t ul = strlen(v_units[u]);
        if (ul != k) continue;
        size_t j = 0;
        while (j < k && v_lower(w[j]) == v_units[u][j]) j++;
        if (j == k) return 1;
    }
    return 0;
}

/* Every blank-separated word of s[0..n) is a unit word, and there is one. */
static int v_all_units(const char *s, size_t n) {
    int words = 0;
    for (size_t i = 0; i < n;) {
        while (i < n && (v_space(s[i]) || s[i] == '~')) i++;
        if (i == n) break;
        size_t j = i;
        while (j < n && !v_space(s[j]) && s[j] != '~') j++;
        if (!v_unit_word(s + i, j - i)) return 0;
        words++;
        i = j;
    }
    return words > 0;
}

/* Past an exponent that belongs to a dropped unit: ^2, ^3, ^{2}, ^{3}. */
static size_t v_skip_power(const char *s, size_t i, size_t n) {
    if (i + 1 < n && s[i] == '^' && (s[i + 1] == '2' || s[i + 1] == '3')) return i + 2;
    if (i + 3 < n && s[i] == '^' && s[i + 1] == '{' && (s[i + 2] == '2' || s[i + 2] == '3') && s[i + 3] == '}')
        return i + 4;
    return i;
}

typedef struct {
    const char *s;
    size_t n;
    const size_t *match;
} vsrc;

/* \text{..} and friends: keep the content (itself unwrapped), or drop a unit. */
static void v_text_range(const vsrc *c, size_t a, size_t b, vbuf *o, int depth) {
    const char *s = c->s;
    for (size_t i = a; i < b;) {
        if (s[i] == '\\' && i + 1 < b && s[i + 1] == '\\') {
            vb_put(o, s + i, 2);
            i += 2;
            continue;
        }
        size_t k = 0;
        if (s[i] == '\\' && depth < V_MAX_DEPTH)
            for (size_t w = 0; !k && w < sizeof v_wrappers / sizeof v_wrappers[0]; w++) k = v_cmd(s, i, b, v_wrappers[w]);
        if (k) {
            size_t j = i + k;
            while (j < b && v_space(s[j])) j++;
            if (j < b && s[j] == '{' && c->match[j] < b) {
                size_t e = c->match[j];
                if (v_all_units(s + j + 1, e - j - 1)) {
                    i = v_skip_power(s, e + 1, b);
                } else {
                    v_text_range(c, j + 1, e, o, depth + 1);
                    i = e + 1;
                }
                continue;
            }
        }
        vb_putc(o, s[i]);
        i++;
    }
}

static void v_pass_text(const char *s, size_t n, vbuf *o) {
    size_t *m = v_matches(s, n);
    if (!m) {
        o->over = 1;
        return;
    }
    vsrc c = {s, n, m};
    v_text_range(&c, 0, n, o, 0);
    free(m);
}

/* Three digits at s[i], and no fourth: a thousands group. */
static int v_group3(const char *s, size_t i, size_t n) {
    return i + 3 <= n && v_digit(s[i]) && v_digit(s[i + 1]) && v_digit(s[i + 2]) && (n - i == 3 || !v_digit(s[i + 3]));
}

/* Spacing commands become blanks ("5\ cm" is then handled with the blanks), except a thin space
 * inside a number (1\,000); sizing, math mode, currency and degree marks go; % becomes \%;
 * "and" / "or" between items become commas; \dfrac \tfrac \cfrac become \frac. */
static void v_pass_clean(const char *s, size_t n, vbuf *o) {
    static const char *const drop[] = {"left", "right", "displaystyle", "bigl", "bigr", "Bigl", "Bigr"};
    static const char *const fracs[] = {"dfrac", "tfrac", "cfrac"};
    for (size_t i = 0; i < n;) {
        char ch = s[i];
        size_t k = 0;
        if (ch == '\\' && i + 1 < n) {
            char d = s[i + 1];
            if (d == ',' || d == ';' || d == ':' || d == '>' || v_space(d)) {
                /* 1\,000: a thin space between digit groups is a thousands separator */
                if (d == ',' && o->n && v_digit(o->p[o->n - 1]) && v_group3(s, i + 2, n)) {
                    i += 2;
                    continue;
                }
                vb_putc(o, ' ');
                i += 2;
                continue;
            }
            if (d == '!') { /* 32,\! 349: the comma before \! separates thousands, not items */
                i += 2;
                if (o->n && o->p[o->n - 1] == ',')
                    while (i < n && v_space(s[i])) i++;
                continue;
            }
            if (d == '%') {
                vb_put(o, "\\%", 2);
                i += 2;
                continue;
            }
            if (d == '$') {
                i += 2;
                continue;
            }
            for (size_t w = 0; !k && w < sizeof drop / sizeof drop[0]; w++) k = v_cmd(s, i, n, drop[w]);
            if (k) {
                i += k;
                if (i < n && s[i] == '.') i++; /* \left. is an invisible delimiter */
                continue;
            }
            if ((k = v_cmd(s, i, n, "quad")) || (k = v_cmd(s, i, n, "qquad"))) {
                vb_putc(o, ' ');
                i += k;
                continue;
            }
            for (size_t w = 0; !k && w < sizeof fracs / sizeof fracs[0]; w++) k = v_cmd(s, i, n, fracs[w]);
            if (k) {
                vb_put(o, "\\frac", 5);
                i += k;
                continue;
            }
            /* Any other command is copied whole, so its letters are never read as text. */
            size_t j = i + 1;
            while (j < n && v_alpha(s[j])) j++;
            if (j == i + 1) j++;
            vb_put(o, s + i, j - i);
            i = j;
            continue;
        }
        if (ch == '^') {
            if (n - i >= 8 && memcmp(s + i, "^{\\circ}", 8) == 0) {
                i += 8;
                continue;
            }
            if ((k = v_cmd(s, i + 1, n, "circ"))) {
                i += 1 + k;
                continue;
            }
        }
        if (ch == '$') {
            i++;
            continue;
        }
        if (ch == '%') {
            vb_put(o, "\\%", 2);
            i++;
            continue;
        }
        const unsigned char *u = (const unsigned char *)s + i;
        if (u[0] == 0xE2 && n - i >= 3 && u[1] == 0x82 && u[2] == 0xAC) {
            i += 3; /* the euro sign, a currency like $ */
            continue;
        }
        if (u[0] == 0xC2 && i + 1 < n && (u[1] == 0xA3 || u[1] == 0xA5)) {
            i += 2; /* pound and yen signs */
            continue;
        }
        /* "and" / "or" between items separate them, as a comma does ("6 and 8", "(1,2) or (2,1)") */
        if ((ch == 'a' || ch == 'o') && (i == 0 || !(v_alpha(s[i - 1]) || s[i - 1] == '\\'))) {
            size_t w = ch == 'a' ? 3 : 2;
            if (n - i >= w && memcmp(s + i, ch == 'a' ? "and" : "or", w) == 0 && (i + w == n || !v_alpha(s[i + w]))) {
                size_t back = o->n;
                while (back && v_space(o->p[back - 1])) back--;
                size_t fwd = i + w;
                while (fwd < n && v_space(s[fwd])) fwd++;
                if (back && fwd < n) {
                    vb_putc(o, o->p[back - 1] == ',' ? ' ' : ',');
                    i += w;
                    continue;
                }
            }
        }
        if (ch == '~') {
            vb_putc(o, ' ');
            i++;
            continue;
        }
        if (ch == '{' && n - i >= 3 && s[i + 1] == ',' && s[i + 2] == '}') {
            i += 3;
            continue;
        }
        if ((unsigned char)ch == 0xC2 && i + 1 < n && (unsigned char)s[i + 1] == 0xB0) { /* the degree sign */
            i += 2;
            continue;
        }
        vb_putc(o, ch);
        i++;
    }
}

static int v_word_is(const char *w, size_t k, const char *word) {
    size_t m = strlen(word);
    if (k != m) return 0;
    for (size_t j = 0; j < m; j++)
        if (v_lower(w[j]) != word[j]) return 0;
    return 1;
}

static const char *const v_pct_words[] = {"percent", "percentage", "pct"};

/* Where s[a..e) ends without its trailing unit words (up to four, after a number or a '}');
 * *pct when the last one names a percent (it becomes \%). e when there are none. */
static size_t v_unit_cut(const char *s, size_t a, size_t e, int *pct) {
    *pct = 0;
    for (size_t w = 0; w < sizeof v_pct_words / sizeof v_pct_words[0]; w++) { /* 28pct, 4/9percent */
        size_t m = strlen(v_pct_words[w]);
        if (e - a > m && v_digit(s[e - m - 1]) && v_word_is(s + e - m, m, v_pct_words[w])) {
            *pct = 1;
            return e - m;
        }
    }
    for (int words = 0; words < 4; words++) {
        while (e > a && v_space(s[e - 1])) e--;
        size_t w = e;
        while (w > a && !v_space(s[w - 1])) w--;
        if (w == e) break;
        int pw = 0;
        for (size_t k = 0; words == 0 && k < sizeof v_pct_words / sizeof v_pct_words[0]; k++)
            pw |= v_word_is(s + w, e - w, v_pct_words[k]);
        if (!pw && !v_unit_word(s + w, e - w)) break;
        size_t p = w;
        while (p > a && v_space(s[p - 1])) p--;
        if (p == a || p == w) break; /* nothing before it, or not a separate word */
        if (words == 0) *pct = pw;
        if (v_digit(s[p - 1]) || s[p - 1] == '}') return p;
        e = p;
    }
    *pct = 0;
    return (size_t)-1;
}

/* Trailing unit words after a number ("5 cm", "30 square units", "\frac{1}{2} inch"), in each
 * item of a list ("35 cm, 4"); closing braces after them stay. */
static void v_pass_units(const char *s, size_t n, vbuf *o) {
    int depth = 0;
    size_t a = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n) {
            char c = s[i];
            if (c == '\\' && i + 1 < n) {
                i++;
                continue;
            }
            if (c == '(' || c == '[') depth++;
            else if ((c == ')' || c == ']') && depth) depth--;
            if (depth || (c != ',' && c != ';')) continue;
        }
        size_t t = i;
        while (t > a && (v_space(s[t - 1]) || s[t - 1] == '}')) t--;
        while (t < i && v_space(s[t])) t++;
        int pct;
        size_t cut = v_unit_cut(s, a, t, &pct);
        if (cut != (size_t)-1) {
            vb_put(o, s + a, cut - a);
            if (pct) vb_put(o, "\\%", 2);
            vb_put(o, s + t, i - t);
        } else {
            vb_put(o, s + a, i - a);
        }
        if (i < n) vb_putc(o, s[i]);
        a = i + 1;
    }
}

/* Blanks go, except one between a command word and a letter ("\pi r" is not "\pir") and one
 * between digits ("3 4" is not 34); a blank after a digit's comma leaves a mark (V_LIST) so
 * "32, 349" is never read as 32349. */
#define V_LIST '\x01'
static void v_pass_squeeze(const char *s, size_t n, vbuf *o) {
    int st = 0; /* 0 text, 1 just after a backslash, 2 inside a command word */
    for (size_t i = 0; i < n;) {
        char ch = s[i];
        if (v_space(ch) && st != 1) {
            if (i >= 2 && s[i - 1] == ',' && v_digit(s[i - 2])) vb_putc(o, V_LIST);
            int after_digit = i >= 1 && v_digit(s[i - 1]);
            while (i < n && v_space(s[i])) i++;
            if (after_digit && i < n && v_digit(s[i])) { /* "3 4" is two numbers, never 34 */
                vb_putc(o, ' ');
                continue;
            }
            if (st == 2 && i < n && v_alpha(s[i])) {
                vb_putc(o, ' ');
                st = 0;
            }
            continue;
        }
        if (st == 1)
            st = v_alpha(ch) ? 2 : 0;
        else if (ch == '\\')
            st = 1;
        else if (!v_alpha(ch))
            st = 0;
        vb_putc(o, ch);
        i++;
    }
}

static void v_expand_range(const vsrc *c, size_t a, size_t b, vbuf *o, int depth);

/* One argument at j written as {..}: a group (expanded inside), a digit or letter, or a
 * command word. Returns the index past it, or j when there is no argument there. */
static size_t v_arg(const vsrc *c, size_t j, size_t b, vbuf *o, int depth) {
    const char *s = c->s;
    size_t j0 = j;
    if (j < b && s[j] == ' ') j++;
    if (j >= b) return j0;
    if (s[j] == '{') {
        size_t e = c->match[j];
        if (e >= b) return j0;
        vb_putc(o, '{');
        v_expand_range(c, j + 1, e, o, depth + 1);
        vb_putc(o, '}');
        return e + 1;
    }
    if (v_digit(s[j]) || v_alpha(s[j])) {
        char g[3] = {'{', s[j], '}'};
        vb_put(o, g, 3);
        return j + 1;
    }
    if (s[j] == '\\' && j + 1 < b && v_alpha(s[j + 1])) {
        size_t k = j + 1;
        while (k < b && v_alpha(s[k])) k++;
        vb_putc(o, '{');
        vb_put(o, s + j, k - j);
        vb_putc(o, '}');
        return k;
    }
    return j0;
}

/* \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2} (and \binom). */
static void v_expand_range(const vsrc *c, size_t a, size_t b, vbuf *o, int depth) {
    const char *s = c->s;
    for (size_t i = a; i < b;) {
        size_t k = 0;
        if (s[i] == '\\' && depth < V_MAX_DEPTH) {
            if ((k = v_cmd(s, i, b, "frac")) || (k = v_cmd(s, i, b, "binom"))) {
                vb_put(o, s + i, k);
                size_t j = v_arg(c, i + k, b, o, depth);
                if (j > i + k) j = v_arg(c, j, b, o, depth);
                i = j > i + k ? j : i + k;
                continue;
            }
            if ((k = v_cmd(s, i, b, "sqrt"))) {
                vb_put(o, s + i, k);
                size_t j = i + k;
                if (j < b && s[j] == '[') { /* an index: \sqrt[3]{x} */
                    size_t e = j;
                    while (e < b && s[e] != ']') e++;
                    if (e < b) {
                        vb_put(o, s + j, e + 1 - j);
                        j = e + 1;
                    }
                }
                size_t after = v_arg(c, j, b, o, depth);
                i = after > j ? after : j;
                continue;
            }
        }
        if (s[i] == '\\' && i + 1 < b) {
            size_t j = i + 1;
            while (j < b && v_alpha(s[j])) j++;
            if (j == i + 1) j++;
            vb_put(o, s + i, j - i);
            i = j;
            continue;
        }
        vb_putc(o, s[i]);
        i++;
    }
}

static void v_pass_expand(const char *s, size_t n, vbuf *o) {
    size_t *m = v_matches(s, n);
    if (!m) {
        o->over = 1;
        return;
    }
    vsrc c = {s, n, m};
    v_expand_range(&c, 0, n, o, 0);
    free(m);
}

/* Strips every outer {..} layer at once ("{{{7}}}" -> "7"). In place; returns the new length. */
static size_t v_strip_braces(char *s, size_t n) {
    if (n < 2 || s[0] != '{') return n;
    size_t *m = v_matches(s, n);
    if (!m) return n;
    size_t k = 0;
    while (k < n - 1 - k && s[k] == '{' && m[k] == n - 1 - k) k++;
    free(m);
    if (k) {
        memmove(s, s + k, n - 2 * k);
        n -= 2 * k;
        s[n] = 0;
    }
    return n;
}

/* Outer {..}, a leading '+', trailing dots; repeated since one can uncover another ("{+5}.").
 * In place; returns the new length. */
static size_t v_fix_ends(char *s, size_t n) {
    for (int round = 0; round < 8; round++) {
        size_t before = n;
        n = v_strip_braces(s, n);
        if (n >= 1 && s[0] == '+') {
            memmove(s, s + 1, n - 1);
            n--;
        }
        while (n > 0 && s[n - 1] == '.' && !(n >= 2 && s[n - 2] == '\\')) n--;
        if (n == before) break;
    }
    s[n] = 0;
    return n;
}

/* "1,234,567" (the whole answer, optionally signed, with a decimal part) -> "1234567".
 * Only then: "1,2" or "(1,000)" may be lists. In place. */
static size_t v_fix_thousands(char *s, size_t n) {
    size_t i = (n && s[0] == '-') ? 1 : 0, d = 0;
    while (i + d < n && v_digit(s[i + d])) d++;
    if (d < 1 || d > 3 || s[i] == '0') return n; /* 0,111 is no thousands number */
    size_t j = i + d;
    int groups = 0;
    while (j < n && s[j] == ',') {
        if (n - j < 4 || !v_digit(s[j + 1]) || !v_digit(s[j + 2]) || !v_digit(s[j + 3])) return n;
        j += 4;
        groups++;
    }
    if (!groups || (j < n && v_digit(s[j]))) return n;
    if (j < n && s[j] == '.') {
        size_t f = ++j;
        while (j < n && v_digit(s[j])) j++;
        if (j == f) return n;
    }
    if (j != n) return n;
    size_t w = 0;
    for (size_t r = 0; r < n; r++)
        if (s[r] != ',') s[w++] = s[r];
    s[w] = 0;
    return w;
}

/* Decimal literals: "2.50" -> "2.5", "3.0" -> "3", ".5" -> "0.5"; "1.2.3" stays. */
static void v_pass_decimals(const char *s, size_t n, vbuf *o) {
    for (size_t i = 0; i < n;) {
        char ch = s[i];
        int starts = i == 0 || !(v_alpha(s[i - 1]) || v_digit(s[i - 1]) || s[i - 1] == '.' || s[i - 1] == '\\');
        if (starts && (v_digit(ch) || (ch == '.' && i + 1 < n && v_digit(s[i + 1])))) {
            size_t dot = i;
            while (dot < n && v_digit(s[dot])) dot++;
            if (dot + 1 < n && s[dot] == '.' && v_digit(s[dot + 1])) {
                size_t f = dot + 1;
                while (f < n && v_digit(s[f])) f++;
                if ((f < n && s[f] == '.') || (f + 1 < n && s[f] == ' ' && v_digit(s[f + 1]))) {
                    /* a dotted sequence, not a number; or "11.0 4/9", which stays no mixed number */
                    vb_put(o, s + i, f - i);
                    i = f;
                    continue;
                }
                size_t e = f;
                while (e > dot + 1 && s[e - 1] == '0') e--;
                if (dot == i) vb_putc(o, '0');
                vb_put(o, s + i, dot - i);
                if (e > dot + 1) vb_put(o, s + dot, e - dot);
                i = f;
                continue;
            }
            vb_put(o, s + i, dot - i);
            i = dot;
            continue;
        }
        vb_putc(o, ch);
        i++;
    }
}

/* Digits-only span length at s[i]. */
static size_t v_digits(const char *s, size_t i, size_t n) {
    size_t j = i;
    while (j < n && v_digit(s[j])) j++;
    return j - i;
}

/* Whole-answer forms: "-3/4" -> "-\frac{3}{4}", "\frac{-3}{4}" -> "-\frac{3}{4}". */
static void v_pass_fraction(const char *s, size_t n, vbuf *o) {
    size_t i = (n && s[0] == '-') ? 1 : 0;
    size_t a = v_digits(s, i, n);
    if (a && i + a < n && s[i + a] == '/') {
        size_t b = v_digits(s, i + a + 1, n);
        if (b && i + a + 1 + b == n) {
            vb_put(o, s, i);
            vb_put(o, "\\frac{", 6);
            vb_put(o, s + i, a);
            vb_put(o, "}{", 2);
            vb_put(o, s + i + a + 1, b);
            vb_putc(o, '}');
            return;
        }
    }
    /* [-]\frac{[-]A}{[-]B} with brace-free A and B: the sign moves out front. */
    if (n - i >= 9 && memcmp(s + i, "\\frac{", 6) == 0) {
        size_t p = i + 6, a0 = p;
        while (p < n && s[p] != '{' && s[p] != '}') p++;
        size_t a1 = p;
        if (p + 1 < n && s[p] == '}' && s[p + 1] == '{') {
            size_t b0 = p + 2, q = b0;
            while (q < n && s[q] != '{' && s[q] != '}') q++;
            if (q == n - 1 && s[q] == '}' && a1 > a0 && q > b0) {
                int neg = i == 1;
                if (s[a0] == '-') {
                    neg ^= 1;
                    a0++;
                }
                if (s[b0] == '-') {
                    neg ^= 1;
                    b0++;
                }
                if (a1 > a0 && q > b0) {
                    if (neg) vb_putc(o, '-');
                    vb_put(o, "\\frac{", 6);
                    vb_put(o, s + a0, a1 - a0);
                    vb_put(o, "}{", 2);
                    vb_put(o, s + b0, q - b0);
                    vb_putc(o, '}');
                    return;
                }
            }
        }
    }
    vb_put(o, s, n);
}

typedef void (*v_pass)(const char *s, size_t n, vbuf *o);

/* Runs one pass from *cur into *tmp and swaps them. */
static int v_apply(v_pass f, char **cur, char **tmp, size_t *len, size_t cap) {
    vbuf o = {*tmp, 0, cap, 0};
    f(*cur, *len, &o);
    if (o.over) return -1;
    o.p[o.n] = 0;
    char *t = *cur;
    *cur = *tmp;
    *tmp = t;
    *len = o.n;
    return 0;
}

int verify_normalize(const char *in, char *out, size_t cap) {
    if (!out || !cap) return -1;
    out[0] = 0;
    if (!in) in = "";
    size_t n = strlen(in);
    if (n > (SIZE_MAX - 64) / 4) return -1;
    size_t wcap = 4 * n + 64; /* the passes at most double the text; room to spare */
    char *cur = malloc(wcap), *tmp = malloc(wcap);
    int rc = -1;
    if (!cur || !tmp) goto done;
    memcpy(cur, in, n + 1);
    static const v_pass early[] = {v_pass_slashes, v_pass_text,    v_pass_clean,
                                   v_pass_units,   v_pass_squeeze, v_pass_expand};
    for (size_t p = 0; p < sizeof early / sizeof early[0]; p++)
        if (v_apply(early[p], &cur, &tmp, &n, wcap)) goto done;
    n = v_fix_ends(cur, n);
    n = v_fix_thousands(cur, n);
    size_t w = 0; /* the list marks have done their work */
    for (size_t r = 0; r < n; r++)
        if (cur[r] != V_LIST) cur[w++] = cur[r];
    cur[w] = 0;
    n = w;
    if (v_apply(v_pass_decimals, &cur, &tmp, &n, wcap) || v_apply(v_pass_fraction, &cur, &tmp, &n, wcap)) goto done;
    rc = v_copy_out(out, cap, cur, n) == 1 ? 0 : -1;
done:
    free(cur);
    free(tmp);
    return rc;
}

float verify_math_reward_opts(const char *response, const char *label, const verify_options *opt) {
    if (!response || !label) return 0.0f;
    size_t n = strlen(response) + 1;
    char *ans = malloc(n);
    float r = 0.0f;
    if (ans && verify_extract_opts(response, opt, ans, n) == 1) {
        char *boxed = NULL;
        const char *want = label;
        if (strstr(label, "\\boxed") || strstr(label, "\\fbox")) {
            size_t m = strlen(label) + 1;
            boxed = malloc(m);
            if (boxed && verify_extract(label, boxed, m) == 1) want = boxed;
        }
        r = verify_equal(ans, want) ? 1.0f : 0.0f;
        free(boxed);
    }
    free(ans);
    return r;
}

float verify_math_reward(const char *response, const char *label) {
    return verify_math_reward_opts(response, label, NULL);
}
