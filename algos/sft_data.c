/* algos/sft_data.c — SFT batches. See sft_data.h for the contract. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strnlen under -std=c11 */
#endif
#include "sft_data.h"

#include <stdlib.h>
#include <string.h>

/* Text bounds: the formatted prompt fits 256 bytes (prompt < 160 + template), the
 * answer 32. A byte-level tokenizer never makes more ids than bytes, so a row needs at
 * most bos + 256 + 32 + eos ids. */
enum { SFT_PROMPT_BYTES = 256, SFT_ROW_CAP = 1 + SFT_PROMPT_BYTES + 32 + 1 };

void sft_batch_free(sft_batch *b) {
    if (!b) return;
    free(b->ids);
    free(b->targets);
    memset(b, 0, sizeof *b);
}

int sft_batch_make(sft_batch *b, const tokenizer *tok, const arith_problem *probs, int n, int T_max, mill_err *e) {
    memset(b, 0, sizeof *b);
    if (n < 1) return mill_errf(e, "sft batch: n = %d problems (need >= 1)", n);
    if (T_max < 2) return mill_errf(e, "sft batch: T_max = %d (need >= 2 for bos and eos)", T_max);
    int32_t *rows = malloc(sizeof(int32_t) * (size_t)n * SFT_ROW_CAP);
    int *lens = malloc(sizeof(int) * (size_t)n), *resp_start = malloc(sizeof(int) * (size_t)n);
    int rc = -1, T = 0;
    if (!rows || !lens || !resp_start) {
        mill_errf(e, "sft batch: out of memory for %d rows", n);
        goto out;
    }
    /* Pass 1: every row's ids, to find T before sizing the batch. */
    for (int i = 0; i < n; i++) {
        char text[SFT_PROMPT_BYTES];
        if (arith_format_prompt(&probs[i], text, sizeof text)) {
            mill_errf(e, "sft batch: row %d: formatted prompt is over %d bytes", i, SFT_PROMPT_BYTES - 1);
            goto out;
        }
        int32_t *row = rows + (size_t)i * SFT_ROW_CAP;
        size_t tl = strlen(text), al = strnlen(probs[i].answer, sizeof probs[i].answer);
        int np, na;
        row[0] = tokenizer_bos(tok);
        if (tokenizer_encode(tok, text, tl, row + 1, (int)tl, &np, e) ||
            tokenizer_encode(tok, probs[i].answer, al, row + 1 + np, (int)al, &na, e)) {
            mill_err_wrap(e, "sft batch: row %d", i);
            goto out;
        }
        row[1 + np + na] = tokenizer_eos(tok);
        lens[i] = 1 + np + na + 1;
        resp_start[i] = 1 + np;
        if (lens[i] > T_max) {
            mill_errf(e, "sft batch: row %d (\"%s\") has %d tokens, over T_max %d", i, probs[i].prompt, lens[i], T_max);
            goto out;
        }
        if (lens[i] > T) T = lens[i];
    }
    /* Pass 2: pad and mark the response targets. */
    b->ids = malloc(sizeof(int32_t) * (size_t)n * (size_t)T);
    b->targets = malloc(sizeof(int32_t) * (size_t)n * (size_t)T);
    if (!b->ids || !b->targets) {
        mill_errf(e, "sft batch: out of memory for %d x %d", n, T);
        goto out;
    }
    int pad = tokenizer_pad(tok), count = 0;
    for (int i = 0; i < n; i++) {
        const int32_t *row = rows + (size_t)i * SFT_ROW_CAP;
        int32_t *ids = b->ids + (size_t)i * T, *tg = b->targets + (size_t)i * T;
        for (int t = 0; t < T; t++) ids[t] = t < lens[i] ? row[t] : pad;
        for (int t = 0; t < T; t++) {
            int next = t + 1; /* the position whose token t predicts */
            tg[t] = next >= resp_start[i] && next < lens[i] ? ids[next] : -1;
            count += tg[t] >= 0;
        }
    }
    b->B = n;
    b->T = T;
    b->n_target = count;
    rc = 0;
out:
    free(rows);
    free(lens);
    free(resp_start);
    if (rc) sft_batch_free(b);
    return rc;
}
