/* algos/arith.c — arithmetic problems, checker, held-out split, JSONL export.
 * See arith.h for the contract. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* fsync under -std=c11 */
#endif
#include "arith.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Phrasings; each holds the expression once and no other digit (the held-out hash
 * and the tests find the expression as the span from the first to the last digit). */
static const char *const arith_templates[] = {
    "What is %s?", "Compute %s.", "Calculate %s.", "What does %s equal?", "Work out %s.",
};
enum { ARITH_N_TEMPLATES = (int)(sizeof arith_templates / sizeof arith_templates[0]) };

static long long arith_uniform(rng *r, long long lo, long long hi) {
    return lo + (long long)rng_below(r, (uint64_t)(hi - lo + 1));
}

/* a op b, where op is '+' or '-' drawn from r. */
static long long arith_addsub(rng *r, long long lo, long long hi, char *expr, size_t cap) {
    long long a = arith_uniform(r, lo, hi), b = arith_uniform(r, lo, hi);
    int sub = (int)rng_below(r, 2);
    snprintf(expr, cap, "%lld %c %lld", a, sub ? '-' : '+', b);
    return sub ? a - b : a + b;
}

static long long arith_mul(rng *r, long long alo, long long ahi, long long blo, long long bhi, char *expr, size_t cap) {
    long long a = arith_uniform(r, alo, ahi), b = arith_uniform(r, blo, bhi);
    snprintf(expr, cap, "%lld * %lld", a, b);
    return a * b;
}

void arith_make(arith_problem *p, int level, rng *r) {
    if (level < 1) level = 1;
    if (level > 4) level = 4;
    char expr[96]; /* room for any three long longs, though operands are < 1000 */
    long long v;
    switch (level) {
    case 1: {
        long long a = arith_uniform(r, 0, 9), b = arith_uniform(r, 0, 9);
        snprintf(expr, sizeof expr, "%lld + %lld", a, b);
        v = a + b;
        break;
    }
    case 2:
        v = arith_addsub(r, 10, 99, expr, sizeof expr);
        break;
    case 3:
        if (rng_below(r, 2))
            v = arith_mul(r, 10, 99, 2, 9, expr, sizeof expr); /* x0 and x1 teach nothing */
        else
            v = arith_addsub(r, 100, 999, expr, sizeof expr);
        break;
    default:
        if (rng_below(r, 2)) {
            v = arith_mul(r, 10, 99, 10, 99, expr, sizeof expr);
        } else {
            long long a = arith_uniform(r, 10, 99), b = arith_uniform(r, 10, 99), c = arith_uniform(r, 10, 99);
            int s1 = (int)rng_below(r, 2), s2 = (int)rng_below(r, 2);
            snprintf(expr, sizeof expr, "%lld %c %lld %c %lld", a, s1 ? '-' : '+', b, s2 ? '-' : '+', c);
            v = (s1 ? a - b : a + b);
            v = s2 ? v - c : v + c;
        }
        break;
    }
    int t = (int)rng_below(r, ARITH_N_TEMPLATES);
    memset(p, 0, sizeof *p);
    snprintf(p->prompt, sizeof p->prompt, arith_templates[t], expr);
    snprintf(p->answer, sizeof p->answer, "%lld", v);
    p->value = v;
    p->level = level;
}

int arith_format_prompt(const arith_problem *p, char *out, size_t cap) {
    if (!out || cap == 0) return -1;
    int n = snprintf(out, cap, "Q: %s\nA: ", p->prompt);
    if (n < 0 || (size_t)n >= cap) {
        out[0] = 0;
        return -1;
    }
    return 0;
}

int arith_check(const char *response, const arith_problem *p) {
    if (!response || !p) return 0;
    const char *s = response;
    while (isspace((unsigned char)*s)) s++;
    int neg = 0;
    if (*s == '-') {
        neg = 1;
        s++;
    }
    if (!isdigit((unsigned char)*s)) return 0;
    long long v = 0;
    for (int nd = 0; isdigit((unsigned char)*s); s++) {
        if (++nd > 18) return 0; /* past any answer, and before long long overflows */
        v = v * 10 + (*s - '0');
    }
    return (neg ? -v : v) == p->value;
}

int arith_is_heldout(const arith_problem *p) {
    const char *s = p->prompt;
    size_t n = strnlen(s, sizeof p->prompt), lo = n, hi = 0;
    for (size_t i = 0; i < n; i++)
        if (isdigit((unsigned char)s[i])) {
            if (lo == n) lo = i;
            hi = i + 1;
        }
    if (lo == n) { /* no digits: hash the whole text */
        lo = 0;
        hi = n;
    }
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (size_t i = lo; i < hi; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ull;
    }
    /* FNV's low bits mix poorly on short keys: finish with splitmix64's mixer */
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    h ^= h >> 31;
    return h % 10 == 0;
}

void arith_draw(arith_problem *p, int level, int heldout, rng *r) {
    int want = heldout != 0;
    do arith_make(p, level, r);
    while (arith_is_heldout(p) != want);
}

int arith_export_jsonl(const char *path, int n, int level, uint64_t seed, mill_err *e) {
    if (!path) return mill_errf(e, "arith export: no path");
    if (n < 0) return mill_errf(e, "arith export %s: n = %d problems", path, n);
    if (level < 1 || level > 4) return mill_errf(e, "arith export %s: level %d is not in 1..4", path, level);
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return mill_errf(e, "arith export: path too long: %.200s...", path);
    FILE *fp = fopen(tmp, "w");
    if (!fp) return mill_errf(e, "arith export: cannot create %s: %s", tmp, strerror(errno));
    rng r;
    rng_seed(&r, seed);
    for (int i = 0; i < n; i++) {
        arith_problem p;
        arith_draw(&p, level, 0, &r);
        json_t *o = json_pack("{s:s, s:s}", "prompt", p.prompt, "label", p.answer);
        if (!o) {
            mill_errf(e, "arith export %s: cannot build JSON for line %d", tmp, i + 1);
            goto fail;
        }
        int rc = json_dumpf(o, fp, JSON_COMPACT);
        json_decref(o);
        if (rc != 0 || fputc('\n', fp) == EOF) {
            mill_errf(e, "arith export: cannot write line %d of %s: %s", i + 1, tmp, strerror(errno));
            goto fail;
        }
    }
    if (fflush(fp) != 0 || fsync(fileno(fp)) != 0) {
        mill_errf(e, "arith export: cannot flush %s: %s", tmp, strerror(errno));
        goto fail;
    }
    if (fclose(fp) != 0) {
        fp = NULL;
        mill_errf(e, "arith export: cannot close %s: %s", tmp, strerror(errno));
        goto fail;
    }
    fp = NULL;
    if (rename(tmp, path) != 0) {
        mill_errf(e, "arith export: cannot rename %s to %s: %s", tmp, path, strerror(errno));
        goto fail;
    }
    return 0;
fail:
    if (fp) fclose(fp);
    unlink(tmp);
    return -1;
}
