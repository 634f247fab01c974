/* algos/arith.h — synthetic arithmetic problems with verifiable integer answers.
 * Owns: the problem generator (deterministic given the rng), the prompt template,
 * the answer checker, the held-out split and the JSONL export.
 * Levels: 1 a+b, a,b in [0,9]; 2 a+b or a-b, a,b in [10,99]; 3 a+b or a-b with
 * a,b in [100,999], or a*b with a in [10,99], b in [2,9]; 4 a*b with a,b in [10,99],
 * or a+-b+-c with a,b,c in [10,99]. Results may be negative. The prompt holds the
 * expression literally ("What is 37 + 48?"), operators ' + ', ' - ', ' * '. */
#ifndef MILL_ARITH_H
#define MILL_ARITH_H

#include <stddef.h>
#include <stdint.h>

#include "../common/err.h"
#include "../common/rng.h"

typedef struct {
    char prompt[160];  /* the question, e.g. "What is 37 + 48?" (under 60 chars) */
    char answer[32];   /* the decimal value, e.g. "85", "-12" */
    long long value;
    int level;
} arith_problem;

/* One problem of the level (levels outside 1..4 are clamped to it: the recipe
 * loader checks them); draws a fixed sequence from r, so a seed fixes the stream. */
void arith_make(arith_problem *p, int level, rng *r);

/* The model's input: "Q: <prompt>\nA: ". The target is p->answer then eos.
 * 0, or -1 when cap is too small (out then holds "" when cap > 0). */
int arith_format_prompt(const arith_problem *p, char *out, size_t cap);

/* 1 when the response's first integer (leading whitespace, optional '-', digits,
 * ending at the first non-digit) equals p->value; 0 otherwise, or when malformed. */
int arith_check(const char *response, const arith_problem *p);

/* 1 for the ~10% of problems in the held-out split. A hash of the expression part of
 * the prompt (first to last digit), so the split ignores the phrasing: the same sum
 * asked two ways is on one side only. */
int arith_is_heldout(const arith_problem *p);

/* arith_make until arith_is_heldout(p) == (heldout != 0): training draws (heldout 0)
 * never see eval problems (heldout 1). */
void arith_draw(arith_problem *p, int level, int heldout, rng *r);

/* n training-split problems of the level from seed, one JSON object a line:
 * {"prompt":"What is 37 + 48?","label":"85"}. Writes path.tmp, fsyncs, renames. */
int arith_export_jsonl(const char *path, int n, int level, uint64_t seed, mill_err *e);

#endif
